//! The `groobee` dialect: the mall's marketing platform's bulk member upsert.
//!
//! One POST of up to 1,000 members (keyed by member id) with the key in `x-api-key`. The
//! platform answers HTTP 200 even when it fails and puts the outcome in the body's
//! `processCode` ([`code`]); a partial success names the refused members in `failedMembers`
//! ([`wire::Response::refused`], the one place that reads it; the simulator writes it with the
//! same types). The platform publishes no rate limit, no `Retry-After` and no idempotency keys:
//! a batch sent twice is upserted twice, which its keying by member makes harmless. Its API
//! has no separate delete call that we know of: an erased member is sent in the upsert as
//! `"erased": true` (with `optOut`) and no profile; this is the assumption to confirm with the
//! platform before production.

use secrecy::{ExposeSecret as _, SecretString};

use super::{
    Delivery, Outcome, Partner, Refusal, by_status, post_json, retry_after, transport_failure,
};

/// The platform's largest batch.
pub const MAX_BATCH: usize = 1_000;

/// The platform's `processCode` values.
pub mod code {
    /// Every member was taken.
    pub const SUCCESS: i32 = 0;
    /// Some members were taken; `failedMembers` names the others.
    pub const PARTIAL_SUCCESS: i32 = 1;
    /// The `x-api-key` header is missing.
    pub const KEY_MISSING: i32 = -1000;
    /// The key names no account.
    pub const UNKNOWN_ACCOUNT: i32 = -1001;
    /// The account is not approved.
    pub const NOT_APPROVED: i32 = -1002;
    /// The account's contract has expired.
    pub const CONTRACT_EXPIRED: i32 = -1003;
    /// The data or request limit is exceeded (the platform's rate limit).
    pub const LIMIT_EXCEEDED: i32 = -1004;
    /// Another process of the account is in progress.
    pub const ANOTHER_PROCESS: i32 = -1005;
    /// A member id is invalid.
    pub const INVALID_MEMBER_ID: i32 = -1006;
    /// A phone number is invalid.
    pub const INVALID_PHONE: i32 = -1007;
    /// A name is too long.
    pub const NAME_TOO_LONG: i32 = -1013;
    /// The data is invalid.
    pub const INVALID_DATA: i32 = -9997;
    /// The platform's HTTP layer failed.
    pub const HTTP_ERROR: i32 = -9998;
    /// The platform failed.
    pub const SERVER_ERROR: i32 = -9999;

    /// Whether `code` is a member's own fault (the member is refused; retrying it cannot
    /// help).
    pub fn is_member_fault(code: i32) -> bool {
        matches!(
            code,
            INVALID_MEMBER_ID | INVALID_PHONE | NAME_TOO_LONG | INVALID_DATA
        )
    }
}

/// The JSON the platform takes and answers, shared with the partner simulator.
pub mod wire {
    use serde::{Deserialize, Serialize};

    pub use crate::partner::json::Member;

    /// A bulk upsert.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Request {
        /// The members, keyed by `memberId`.
        pub members: Vec<Member>,
    }

    /// The platform's answer (always HTTP 200).
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Response {
        /// The outcome ([`super::code`]).
        pub process_code: i32,
        /// A human-readable message; may echo input, so it is never logged.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub message: String,
        /// With a partial success (or a member's fault), the refused members.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub failed_members: Vec<FailedMember>,
    }

    /// One refused member.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct FailedMember {
        /// The refused member's id.
        pub member_id: String,
        /// Why ([`super::code`]).
        pub process_code: i32,
    }

    impl Response {
        /// The members of `sent` (member ids in batch order) that this answer refuses, by
        /// position, with their codes: the rule both sides share. A refused member is named
        /// by its id; a name matching no member sent is ignored; a member not named was
        /// accepted.
        pub fn refused(&self, sent: &[&str]) -> Vec<(usize, i32)> {
            let mut refused: Vec<(usize, i32)> = self
                .failed_members
                .iter()
                .flat_map(|failed| {
                    sent.iter()
                        .enumerate()
                        .filter(move |(_, id)| **id == failed.member_id)
                        .map(move |(index, _)| (index, failed.process_code))
                })
                .collect();
            refused.sort_unstable();
            refused.dedup_by_key(|(index, _)| *index);
            refused
        }
    }
}

/// The `groobee` adapter.
#[derive(Debug)]
pub struct Groobee {
    client: reqwest::Client,
    url: url::Url,
    api_key: SecretString,
    max_batch: usize,
}

impl Groobee {
    /// An adapter posting to `url` with `api_key`, at most `max_batch` members per request,
    /// each request bounded by `timeout`.
    ///
    /// # Errors
    /// When `max_batch` is not within 1 to 1,000, or the HTTP client cannot be built.
    pub fn new(
        url: url::Url,
        api_key: SecretString,
        max_batch: usize,
        client: reqwest::Client,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=MAX_BATCH).contains(&max_batch),
            "partner.max_batch must be 1 to {MAX_BATCH} for groobee, not {max_batch}"
        );
        Ok(Self {
            client,
            url,
            api_key,
            max_batch,
        })
    }
}

impl Partner for Groobee {
    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn send(&self, batch: &[Delivery], _idempotency_key: &str) -> Outcome {
        let request = wire::Request {
            members: batch.iter().map(super::json::member).collect(),
        };
        let body = match serde_json::to_vec(&request) {
            Ok(body) => body,
            Err(error) => {
                return Outcome::Configuration {
                    reason: format!("cannot encode the request: {error}"),
                };
            }
        };
        let key = [("x-api-key", self.api_key.expose_secret())];
        let response = match post_json(&self.client, &self.url, &key, body).await {
            Ok(response) => response,
            Err(outcome) => return outcome,
        };
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            // The platform itself always answers 200: this is a gateway or proxy in front.
            return by_status(status, retry_after(&response));
        }
        let answer: wire::Response = match response.bytes().await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(answer) => answer,
                Err(_) => {
                    return Outcome::Retry {
                        reason: "groobee:unreadable answer".into(),
                        after: None,
                    };
                }
            },
            Err(error) => return transport_failure(&error),
        };
        let ids: Vec<&str> = batch.iter().map(|d| d.member_id.as_str()).collect();
        outcome(&answer, &ids)
    }
}

/// Sorts the platform's answer to a batch of the members `sent`.
pub fn outcome(answer: &wire::Response, sent: &[&str]) -> Outcome {
    let refusals = || {
        answer
            .refused(sent)
            .into_iter()
            .map(|(index, code)| Refusal {
                index,
                reason: format!("groobee:{code}"),
            })
            .collect::<Vec<_>>()
    };
    match answer.process_code {
        code::SUCCESS => Outcome::Accepted {
            refused: Vec::new(),
        },
        code::PARTIAL_SUCCESS => Outcome::Accepted {
            refused: refusals(),
        },
        code::KEY_MISSING | code::UNKNOWN_ACCOUNT | code::NOT_APPROVED | code::CONTRACT_EXPIRED => {
            Outcome::Configuration {
                reason: format!("groobee:{}", answer.process_code),
            }
        }
        code::LIMIT_EXCEEDED => Outcome::RateLimited { after: None },
        member_fault if code::is_member_fault(member_fault) => {
            let refused = refusals();
            if !refused.is_empty() {
                // The members named are refused; as with a partial success, the rest was
                // taken.
                Outcome::Accepted { refused }
            } else if sent.len() == 1 {
                Outcome::Accepted {
                    refused: vec![Refusal {
                        index: 0,
                        reason: format!("groobee:{member_fault}"),
                    }],
                }
            } else {
                Outcome::Split {
                    reason: format!("groobee:{member_fault}"),
                }
            }
        }
        // Busy, its HTTP layer, its server, or a code this adapter does not know: nothing
        // says the batch is at fault, so it is sent again later.
        other => Outcome::Retry {
            reason: format!("groobee:{other}"),
            after: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(process_code: i32, failed: &[(&str, i32)]) -> wire::Response {
        wire::Response {
            process_code,
            message: String::new(),
            failed_members: failed
                .iter()
                .map(|(id, code)| wire::FailedMember {
                    member_id: (*id).to_owned(),
                    process_code: *code,
                })
                .collect(),
        }
    }

    #[test]
    fn every_process_code_is_sorted_by_whose_fault_it_is() {
        let sent = ["A", "B", "C"];
        assert_eq!(
            outcome(&answer(0, &[]), &sent),
            Outcome::Accepted { refused: vec![] }
        );
        assert_eq!(
            outcome(&answer(1, &[("B", -1007), ("Z", -1006)]), &sent),
            Outcome::Accepted {
                refused: vec![Refusal {
                    index: 1,
                    reason: "groobee:-1007".into()
                }]
            },
            "a name matching no member sent is ignored; the others were taken"
        );
        for configuration in [-1000, -1001, -1002, -1003] {
            assert!(matches!(
                outcome(&answer(configuration, &[]), &sent),
                Outcome::Configuration { .. }
            ));
        }
        assert_eq!(
            outcome(&answer(-1004, &[]), &sent),
            Outcome::RateLimited { after: None }
        );
        for environment in [-1005, -9998, -9999, -4242] {
            assert!(matches!(
                outcome(&answer(environment, &[]), &sent),
                Outcome::Retry { .. }
            ));
        }
        for member_fault in [-1006, -1007, -1013, -9997] {
            assert!(matches!(
                outcome(&answer(member_fault, &[]), &sent),
                Outcome::Split { .. }
            ));
            assert_eq!(
                outcome(&answer(member_fault, &[]), &["A"]),
                Outcome::Accepted {
                    refused: vec![Refusal {
                        index: 0,
                        reason: format!("groobee:{member_fault}")
                    }]
                }
            );
            assert_eq!(
                outcome(&answer(member_fault, &[("C", member_fault)]), &sent),
                Outcome::Accepted {
                    refused: vec![Refusal {
                        index: 2,
                        reason: format!("groobee:{member_fault}")
                    }]
                }
            );
        }
    }
}
