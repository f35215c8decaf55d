//! The `webhook` dialect: a JSON POST per member (or per batch) to a receiver that verifies
//! it by the Standard Webhooks headers (<https://www.standardwebhooks.com/>):
//! - `webhook-id`: the message id, the same on every retry of the same batch (the receiver
//!   deduplicates on it), also sent as `Idempotency-Key`;
//! - `webhook-timestamp`: seconds since the epoch at this attempt;
//! - `webhook-signature`: `v1,` and base64 of HMAC-SHA256 over `<id>.<timestamp>.<body>`,
//!   keyed with the secret (`whsec_` and base64 of the key).
//!
//! The body is `{"type", "timestamp", "data"}`: `member.upserted`, `member.opted_out` or
//! `member.erased` with one member as `data`, or `members.upserted` with `{"members": [...]}`
//! (each member flagged `optOut` or `erased` where it applies). A 2xx takes the
//! request; for a batch, its body may name refused members ([`wire::Answer::refused`], the one
//! place that reads it, shared with the simulator). A 400, 409, 410 or 422 refuses a single
//! member for its own fault (a batch is split to find which); 429 and `Retry-After` limit our
//! rate; 408 and 5xx are the environment's; 401, 403 and 404 are our configuration.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{KeyInit as _, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};

use super::{
    Delivery, Outcome, Partner, Refusal, by_status, json, post_json, retry_after, transport_failure,
};

/// Most members one batch request may carry.
pub const MAX_BATCH: usize = 1_000;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The JSON a webhook receiver takes and answers, shared with the partner simulator.
pub mod wire {
    use serde::{Deserialize, Serialize};

    pub use crate::partner::json::Member;

    /// The event of one request.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Event<T> {
        /// `member.upserted`, `member.opted_out` or `members.upserted`.
        #[serde(rename = "type")]
        pub kind: String,
        /// When the request was made (RFC 3339).
        pub timestamp: String,
        /// The member, or `{"members": [...]}`.
        pub data: T,
    }

    /// The data of a batch event.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Members {
        /// The members.
        pub members: Vec<Member>,
    }

    /// A receiver's optional answer to a batch, with a 2xx status.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct Answer {
        /// The members it refused, each for its own fault.
        #[serde(default)]
        pub refused: Vec<RefusedMember>,
    }

    /// One refused member.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct RefusedMember {
        /// The refused member's id.
        pub member_id: String,
        /// Why, as a short code (never personal data).
        pub reason: String,
    }

    impl Answer {
        /// The members of `sent` (member ids in batch order) this answer refuses, by
        /// position, with their reasons: a refused member is named by its id, a name
        /// matching no member sent is ignored, a member not named was accepted.
        pub fn refused(&self, sent: &[&str]) -> Vec<(usize, String)> {
            let mut refused: Vec<(usize, String)> = self
                .refused
                .iter()
                .flat_map(|r| {
                    sent.iter()
                        .enumerate()
                        .filter(move |(_, id)| **id == r.member_id)
                        .map(move |(index, _)| (index, r.reason.clone()))
                })
                .collect();
            refused.sort_unstable();
            refused.dedup_by_key(|(index, _)| *index);
            refused
        }
    }
}

/// The `webhook` adapter.
#[derive(Debug)]
pub struct Webhook {
    client: reqwest::Client,
    url: url::Url,
    key: Key,
    max_batch: usize,
}

/// The signing key, decoded from the secret.
struct Key(SecretString);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Webhook {
    /// An adapter posting to `url`, signing with `secret` (`whsec_<base64>`), at most
    /// `max_batch` members per request, each request bounded by `timeout`.
    ///
    /// # Errors
    /// When the secret is malformed, `max_batch` is not within 1 to 1,000, or the HTTP
    /// client cannot be built.
    pub fn new(
        url: url::Url,
        secret: &SecretString,
        max_batch: usize,
        client: reqwest::Client,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=MAX_BATCH).contains(&max_batch),
            "partner.max_batch must be 1 to {MAX_BATCH} for webhook, not {max_batch}"
        );
        // Check it once here rather than on every request.
        signing_key(secret)?;
        Ok(Self {
            client,
            url,
            key: Key(secret.clone()),
            max_batch,
        })
    }
}

/// The key bytes of a `whsec_<base64>` secret.
fn signing_key(secret: &SecretString) -> anyhow::Result<Vec<u8>> {
    let encoded = secret.expose_secret();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    // The error must not echo the secret.
    STANDARD.decode(encoded).map_err(|_| {
        anyhow::anyhow!("partner.secret is not `whsec_` followed by base64 of the signing key")
    })
}

/// The `webhook-signature` value of `body` sent as message `id` at `timestamp`.
///
/// # Errors
/// When the secret is malformed.
pub fn signature(
    secret: &SecretString,
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> anyhow::Result<String> {
    let key = signing_key(secret)?;
    let mut mac = HmacSha256::new_from_slice(&key)
        .map_err(|_| anyhow::anyhow!("partner.secret has an unusable key length"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The body of one request for `batch`, at `now`.
fn body(batch: &[Delivery], now: SystemTime) -> serde_json::Result<Vec<u8>> {
    let timestamp = chrono::DateTime::<chrono::Utc>::from(now).to_rfc3339();
    match batch {
        [one] => serde_json::to_vec(&wire::Event {
            kind: if one.erase {
                "member.erased"
            } else if one.profile.is_some() {
                "member.upserted"
            } else {
                "member.opted_out"
            }
            .to_owned(),
            timestamp,
            data: json::member(one),
        }),
        many => serde_json::to_vec(&wire::Event {
            kind: "members.upserted".to_owned(),
            timestamp,
            data: wire::Members {
                members: many.iter().map(json::member).collect(),
            },
        }),
    }
}

impl Partner for Webhook {
    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn send(&self, batch: &[Delivery], idempotency_key: &str) -> Outcome {
        let now = SystemTime::now();
        let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let signed = body(batch, now)
            .map_err(anyhow::Error::new)
            .and_then(|body| {
                let signature = signature(&self.key.0, idempotency_key, timestamp, &body)?;
                Ok((body, signature))
            });
        let (body, signature) = match signed {
            Ok(signed) => signed,
            Err(error) => {
                return Outcome::Configuration {
                    reason: format!("cannot sign the request: {error}"),
                };
            }
        };
        let timestamp = timestamp.to_string();
        let headers = [
            ("webhook-id", idempotency_key),
            ("webhook-timestamp", timestamp.as_str()),
            ("webhook-signature", signature.as_str()),
            ("idempotency-key", idempotency_key),
        ];
        let response = match post_json(&self.client, &self.url, &headers, body).await {
            Ok(response) => response,
            Err(outcome) => return outcome,
        };
        let status = response.status();
        let after = retry_after(&response);
        if status.is_success() {
            if batch.len() == 1 {
                return Outcome::Accepted {
                    refused: Vec::new(),
                };
            }
            // A receiver that says nothing took every member.
            let answer: wire::Answer = match response.bytes().await {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                Err(error) => return transport_failure(&error),
            };
            let ids: Vec<&str> = batch.iter().map(|d| d.member_id.as_str()).collect();
            return Outcome::Accepted {
                refused: answer
                    .refused(&ids)
                    .into_iter()
                    .map(|(index, reason)| Refusal {
                        index,
                        reason: format!("webhook:{}", reason_code(&reason)),
                    })
                    .collect(),
            };
        }
        match status.as_u16() {
            code @ (400 | 409 | 410 | 422) if batch.len() == 1 => Outcome::Accepted {
                refused: vec![Refusal {
                    index: 0,
                    reason: format!("http:{code}"),
                }],
            },
            code @ (400 | 409 | 410 | 413 | 422) => Outcome::Split {
                reason: format!("http:{code}"),
            },
            _ => by_status(status, after),
        }
    }
}

/// A receiver's reason as we keep it: a short code, or `refused` when it is anything else (a
/// free-text reason could carry the member's data into our logs, table and API).
fn reason_code(reason: &str) -> &str {
    let code = !reason.is_empty()
        && reason.len() <= 64
        && reason
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if code { reason } else { "refused" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_codes_of_a_receiver_are_kept() {
        assert_eq!(reason_code("invalid_phone"), "invalid_phone");
        assert_eq!(reason_code("invalid email kim@example.com"), "refused");
        assert_eq!(reason_code(&"x".repeat(65)), "refused");
    }

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The example of the Standard Webhooks specification and its reference libraries.
        let secret = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body)
                .expect("a valid secret"),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_malformed_secret_is_refused_without_echoing_it() {
        let error = Webhook::new(
            "http://127.0.0.1:1/hook".parse().expect("url"),
            &SecretString::from("whsec_not base64 at all!"),
            1,
            reqwest::Client::new(),
        )
        .expect_err("malformed");
        assert!(!error.to_string().contains("not base64 at all"), "{error}");
    }
}
