//! The partner adapters against the partner simulator, over real HTTP: each answer of each
//! dialect is sorted by whose fault it is, and what the partner accepted is what was sent.

use std::{collections::BTreeSet, num::NonZeroU32, time::Duration};

use member_export::{
    partner::{
        AnyPartner, Channels, Delivery, Outcome, Partner, PartnerSettings, Profile, Refusal,
    },
    simulator::{Behaviour, Simulator},
};
use secrecy::SecretString;

const KEY: &str = "test-api-key";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn simulator() -> Simulator {
    Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        KEY,
        SECRET,
        Behaviour::default(),
    )
    .await
    .expect("simulator starts")
}

fn groobee(simulator: &Simulator, key: &str) -> AnyPartner {
    AnyPartner::new(&PartnerSettings {
        request_timeout: Duration::from_millis(500),
        ..PartnerSettings::groobee(simulator.groobee_url(), SecretString::from(key.to_owned()))
    })
    .expect("adapter")
}

fn webhook(simulator: &Simulator, secret: &str, max_batch: usize) -> AnyPartner {
    AnyPartner::new(&PartnerSettings {
        max_batch: Some(max_batch),
        request_timeout: Duration::from_millis(500),
        ..PartnerSettings::webhook(
            simulator.webhook_url(),
            SecretString::from(secret.to_owned()),
        )
    })
    .expect("adapter")
}

fn member(id: &str, version: u64) -> Delivery {
    Delivery {
        member_id: id.to_owned(),
        version,
        consent: Channels {
            email: true,
            sms: false,
            push: true,
        },
        erase: false,
        recorded_micros: 0,
        profile: Some(Profile {
            email: Some(format!("{id}@example.com")),
            phone: None,
            display_name: "Test Member".into(),
            preferred_language: "ko".into(),
            grade: "GOLD".into(),
            interests: vec!["golf".into()],
        }),
    }
}

fn opt_out(id: &str, version: u64) -> Delivery {
    Delivery {
        member_id: id.to_owned(),
        version,
        consent: Channels::default(),
        profile: None,
        erase: false,
        recorded_micros: 0,
    }
}

fn accepted_all() -> Outcome {
    Outcome::Accepted { refused: vec![] }
}

/// Sends `batch` until the partner's one-per-second limit answers (a second request right
/// after the first; a few tries in case this machine stalled past the second).
async fn limited(partner: &AnyPartner, batch: &[Delivery]) -> Outcome {
    for _ in 0..3 {
        let outcome = partner.send(batch, "k").await;
        if outcome != accepted_all() {
            return outcome;
        }
    }
    accepted_all()
}

#[tokio::test]
async fn groobee_takes_a_batch_and_names_the_members_it_refused() {
    let simulator = simulator().await;
    let partner = groobee(&simulator, KEY);
    let batch = [member("M-1", 3), opt_out("M-2", 7), member("M-3", 1)];
    assert_eq!(partner.send(&batch, "k1").await, accepted_all());
    let members = simulator.members();
    assert_eq!(members["M-1"].version, 3);
    assert!(members["M-1"].consent.email && !members["M-1"].opt_out);
    assert!(members["M-2"].opt_out && !members["M-2"].consent.any());

    simulator.set_behaviour(Behaviour {
        refused_members: BTreeSet::from(["M-3".to_owned()]),
        ..Behaviour::default()
    });
    let batch = [member("M-1", 4), member("M-3", 2)];
    assert_eq!(
        partner.send(&batch, "k2").await,
        Outcome::Accepted {
            refused: vec![Refusal {
                index: 1,
                reason: "groobee:-1007".into()
            }]
        }
    );
    assert_eq!(simulator.members()["M-1"].version, 4, "the rest was taken");
    assert_eq!(simulator.members()["M-3"].version, 1);
}

#[tokio::test]
async fn groobee_configuration_errors_stop_rather_than_retry() {
    let simulator = simulator().await;
    let batch = [member("M-1", 1)];
    assert!(matches!(
        groobee(&simulator, "another-key").send(&batch, "k").await,
        Outcome::Configuration { reason } if reason == "groobee:-1001"
    ));
    simulator.set_behaviour(Behaviour {
        configuration_error: true,
        ..Behaviour::default()
    });
    assert!(matches!(
        groobee(&simulator, KEY).send(&batch, "k").await,
        Outcome::Configuration { reason } if reason == "groobee:-1003"
    ));
    assert!(simulator.members().is_empty());
}

#[tokio::test]
async fn groobee_rate_limits_errors_and_hangs_are_retried() {
    let simulator = simulator().await;
    let partner = groobee(&simulator, KEY);
    let batch = [member("M-1", 1)];
    for as_429 in [true, false] {
        simulator.set_behaviour(Behaviour {
            rate_limit: NonZeroU32::new(1),
            rate_limit_as_429: as_429,
            ..Behaviour::default()
        });
        assert_eq!(partner.send(&batch, "k").await, accepted_all());
        let expected = Outcome::RateLimited {
            after: as_429.then_some(Duration::from_secs(1)),
        };
        assert_eq!(limited(&partner, &batch).await, expected, "429: {as_429}");
    }
    simulator.set_behaviour(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    });
    assert!(matches!(
        partner.send(&batch, "k").await,
        Outcome::Retry { reason, .. } if reason == "groobee:-9999"
    ));
    simulator.set_behaviour(Behaviour {
        hang_rate: 1.0,
        ..Behaviour::default()
    });
    let started = std::time::Instant::now();
    assert!(matches!(
        partner.send(&batch, "k").await,
        Outcome::Retry { reason, .. } if reason == "timeout"
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout ends a hung request"
    );
    let counts = simulator.counts();
    assert_eq!((counts.errors, counts.hung), (1, 1));
    assert!(counts.rate_limited >= 2, "{counts:?}");
}

#[tokio::test]
async fn webhook_requests_are_signed_and_carry_a_stable_idempotency_key() {
    let simulator = simulator().await;
    let partner = webhook(&simulator, SECRET, 1);
    assert_eq!(
        partner.send(&[member("M-1", 1)], "M-1:1").await,
        accepted_all()
    );
    // A retry of the same delivery carries the same key, so the receiver can drop it.
    assert_eq!(
        partner.send(&[member("M-1", 1)], "M-1:1").await,
        accepted_all()
    );
    assert_eq!(
        partner.send(&[opt_out("M-1", 2)], "M-1:2").await,
        accepted_all()
    );
    let accepted = &simulator.members()["M-1"];
    assert_eq!(accepted.idempotency_keys, ["M-1:1", "M-1:1", "M-1:2"]);
    assert!(accepted.opt_out && accepted.version == 2);

    // A request signed with another secret fails the receiver's verification: ours to fix.
    let wrong = webhook(&simulator, "whsec_c2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==", 1);
    assert!(matches!(
        wrong.send(&[member("M-2", 1)], "M-2:1").await,
        Outcome::Configuration { reason } if reason == "http:401"
    ));
    assert!(!simulator.members().contains_key("M-2"));
}

#[tokio::test]
async fn webhook_answers_are_sorted_by_whose_fault_they_are() {
    let simulator = simulator().await;
    simulator.set_behaviour(Behaviour {
        refused_members: BTreeSet::from(["M-BAD".to_owned()]),
        ..Behaviour::default()
    });
    let single = webhook(&simulator, SECRET, 1);
    assert_eq!(
        single.send(&[member("M-BAD", 1)], "M-BAD:1").await,
        Outcome::Accepted {
            refused: vec![Refusal {
                index: 0,
                reason: "http:422".into()
            }]
        }
    );
    let batched = webhook(&simulator, SECRET, 100);
    let batch = [member("M-1", 1), member("M-BAD", 1), member("M-2", 1)];
    assert_eq!(
        batched.send(&batch, "batch-1").await,
        Outcome::Accepted {
            refused: vec![Refusal {
                index: 1,
                reason: "webhook:invalid_phone".into()
            }]
        }
    );
    assert_eq!(
        simulator.members().keys().collect::<Vec<_>>(),
        ["M-1", "M-2"]
    );

    simulator.set_behaviour(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    });
    assert!(matches!(
        single.send(&[member("M-3", 1)], "M-3:1").await,
        Outcome::Retry { reason, .. } if reason == "http:503"
    ));
    simulator.set_behaviour(Behaviour {
        rate_limit: NonZeroU32::new(1),
        ..Behaviour::default()
    });
    assert_eq!(
        single.send(&[member("M-3", 1)], "M-3:1").await,
        accepted_all()
    );
    assert_eq!(
        limited(&single, &[member("M-4", 1)]).await,
        Outcome::RateLimited {
            after: Some(Duration::from_secs(1))
        }
    );
    simulator.set_behaviour(Behaviour {
        configuration_error: true,
        ..Behaviour::default()
    });
    assert!(matches!(
        single.send(&[member("M-5", 1)], "M-5:1").await,
        Outcome::Configuration { reason } if reason == "http:403"
    ));
}
