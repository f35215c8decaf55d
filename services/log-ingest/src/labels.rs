//! Loki labels from a small fixed set (`service`, `level`, `host`, `environment`), never
//! from a record's text, and a guard on how many streams they make.
//!
//! `service` (a forward tag or OTLP `service.name`) and `host` (a record field) come from
//! senders, so their values are not ours to bound: a misconfigured Fluent Bit that puts a
//! file path or a pod name in `host` would make a stream per value, and Loki slows down (or
//! refuses, with `max_streams_per_user`) long before that is noticed. The guard admits the
//! first (service, host) pairs it sees; a record of any other pair keeps its service when
//! that service was admitted with some host, else becomes service `other`, and always gets
//! host `other`; the real values go to structured metadata (`service`, `host`), so nothing
//! is lost and a query can still find them. Each admitted service holds a place for the
//! pair (service, `other`) its later hosts share (while it has pairs, or that one had a
//! record within [`QUIET`]), so admitted pairs and those places stay within `max_streams`,
//! and streams are at most (`max_streams` + 1) × levels, the 1 for (`other`, `other`),
//! however many services there are.
//!
//! A pair without a record for [`QUIET`] gives up its place to the next new pair, as Loki
//! stops counting a stream that went quiet: pods replaced by a rollout (a `host` each) or a
//! server taken out of service do not hold places until log-ingest restarts.
//!
//! The admitted pairs live in memory: after a restart they are admitted again in the order
//! they arrive.

// foldhash, not SipHash: looked up for every record; the admitted set is capped.
use foldhash::{HashMap, HashMapExt as _};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::record::Level;

/// Stands for every value past the guard's limit.
pub const OTHER: &str = "other";

/// Loki's default `max_label_value_length`: a longer `service` or `host` is folded into
/// `other` like a pair past the limit (Loki would refuse every record of it).
pub const MAX_VALUE_BYTES: usize = 2048;

/// A record's labels and what the guard moved out of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Loki's stream selector, `{service="…", level="…", …}`.
    pub selector: Arc<str>,
    /// (name, real value) of each label folded into `other`.
    pub folded: Vec<(&'static str, String)>,
}

/// How long a (service, host) pair without a record keeps its place while new pairs wait:
/// twice Loki's default `chunk_idle_period` (30 minutes), after which Loki has flushed the
/// pair's streams and no longer counts them against `max_streams_per_user`.
pub const QUIET: Duration = Duration::from_secs(60 * 60);

/// How often at most a pair past the limit looks for quiet pairs to forget (each look walks
/// every admitted pair).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// An admitted pair: its selectors per level (built once), and when it last had a record.
#[derive(Debug)]
struct Admitted {
    selectors: [Option<Arc<str>>; 7],
    seen: Instant,
}

/// An admitted service: it holds a place for its (service, `other`) while it has pairs, and
/// while that pair had a record within [`QUIET`] (Loki still counts its streams).
#[derive(Debug, Default)]
struct Service {
    pairs: usize,
    other_seen: Option<Instant>,
}

/// The streams admitted so far.
#[derive(Debug)]
pub struct Guard {
    max_streams: usize,
    environment: String,
    admitted: HashMap<(String, String), Admitted>,
    /// Per admitted service, its pairs and when its (service, `other`) last had a record.
    services: HashMap<String, Service>,
    /// The time records are stamped with ([`Guard::set_now`]): one clock read per push,
    /// not per record.
    now: Instant,
    /// When quiet pairs were last looked for.
    swept: Option<Instant>,
    /// Reused for lookups, so a record of an admitted pair allocates nothing.
    key: (String, String),
}

impl Guard {
    /// A guard admitting at most `max_streams` (service, host) pairs, for streams of
    /// `environment`.
    pub fn new(max_streams: usize, environment: &str) -> Self {
        Self {
            max_streams,
            environment: environment.to_owned(),
            admitted: HashMap::new(),
            services: HashMap::new(),
            now: Instant::now(),
            swept: None,
            key: (String::new(), String::new()),
        }
    }

    /// The time of the records labelled from now on (never earlier than the last).
    pub fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Forgets the pairs quiet for [`QUIET`], at most once every [`SWEEP_EVERY`].
    fn forget_quiet(&mut self) {
        if self
            .swept
            .is_some_and(|at| self.now.saturating_duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(self.now);
        let (now, services) = (self.now, &mut self.services);
        let recent = |at: Instant| now.saturating_duration_since(at) < QUIET;
        self.admitted.retain(|(service, _), pair| {
            let keep = recent(pair.seen);
            if !keep && let Some(service) = services.get_mut(service) {
                service.pairs -= 1;
            }
            keep
        });
        services.retain(|_, service| service.pairs > 0 || service.other_seen.is_some_and(recent));
    }

    /// Whether a new pair of `service` fits: it, the admitted pairs and a place for each
    /// admitted service's (service, `other`), its own service's too, within `max_streams`.
    fn room_for(&self, service: &str) -> bool {
        let new_service = usize::from(!self.services.contains_key(service));
        self.admitted.len() + self.services.len() + new_service < self.max_streams
    }

    /// Labels of a record of `service` on `host` at `level`.
    pub fn labels(&mut self, service: &str, level: Option<Level>, host: &str) -> Labels {
        let level_name = level.map_or("unknown", Level::as_str);
        let slot = level.map_or(6, |l| l as usize);
        let mut key = std::mem::take(&mut self.key);
        key.0.clear();
        key.0.push_str(service);
        key.1.clear();
        key.1.push_str(host);
        let fits = service.len() <= MAX_VALUE_BYTES && host.len() <= MAX_VALUE_BYTES;
        if fits && !self.admitted.contains_key(&key) {
            if !self.room_for(service) {
                self.forget_quiet();
            }
            if self.room_for(service) {
                self.services.entry(key.0.clone()).or_default().pairs += 1;
                self.admitted.insert(
                    key.clone(),
                    Admitted {
                        selectors: Default::default(),
                        seen: self.now,
                    },
                );
            }
        }
        let labels = if let Some(pair) = self.admitted.get_mut(&key) {
            pair.seen = self.now;
            let selector = pair.selectors[slot]
                .get_or_insert_with(|| {
                    selector(&[
                        ("service", service),
                        ("level", level_name),
                        ("host", host),
                        ("environment", &self.environment),
                    ])
                    .into()
                })
                .clone();
            Labels {
                selector,
                folded: Vec::new(),
            }
        } else {
            let mut folded = Vec::new();
            let service_label = if let Some(admitted) = self.services.get_mut(service) {
                admitted.other_seen = Some(self.now);
                service
            } else {
                folded.push(("service", service.to_owned()));
                OTHER
            };
            if !host.is_empty() {
                folded.push(("host", host.to_owned()));
            }
            Labels {
                selector: selector(&[
                    ("service", service_label),
                    ("level", level_name),
                    ("host", OTHER),
                    ("environment", &self.environment),
                ])
                .into(),
                folded,
            }
        };
        self.key = key;
        labels
    }

    /// How many (service, host) pairs are admitted.
    pub fn admitted(&self) -> usize {
        self.admitted.len()
    }
}

/// `name` as a label name as Loki 3.7+ would store it (Prometheus' otlptranslator, which it
/// names structured metadata with): every run of characters other than ASCII letters and
/// digits one underscore (`http.request.method` → `http_request_method`, `a__b` → `a_b`),
/// and an underscore before a leading digit (empty: `_`); a name of underscores only (`_`,
/// `주문번호`, `@`, empty) gets `key` before it (`key_`). Named as Loki stores them, two
/// fields whose names Loki would make one are seen here as one name (the second left out,
/// counted) instead of Loki keeping one value of the two without a word.
pub fn label_name(name: String) -> String {
    let alphanumeric = |b: u8| b.is_ascii_alphanumeric();
    let normal = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| alphanumeric(b) || b == b'_')
        && !name.contains("__");
    let mut out = if normal {
        name
    } else {
        let mut out = String::with_capacity(name.len() + 1);
        if name.chars().next().is_none_or(|c| c.is_ascii_digit()) {
            out.push('_');
        }
        for c in name.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c);
            } else if !out.ends_with('_') {
                out.push('_');
            }
        }
        out
    };
    // Loki 3.7+ refuses a name of underscores only: the whole push fails with 500, retried
    // for ever, and the output stalls. `key` before it (as Prometheus' normaliser puts it
    // before a name starting with one underscore) makes a valid name; the same name always
    // gives the same result.
    if out.bytes().all(|b| b == b'_') {
        out.insert_str(0, "key");
    }
    out
}

/// `{name="value", …}` with Prometheus' label name rules and escapes (`\uXXXX` too, as
/// Go's `strconv.Unquote` reads it); `None` when it does not parse (or is empty, which
/// Loki refuses too), or holds a raw U+FFFD (Loki's lexer cannot tell it from a byte that
/// is not UTF-8, and refuses it).
pub fn parse_selector(text: &str) -> Option<Vec<(String, String)>> {
    if text.contains('\u{FFFD}') {
        return None;
    }
    let inner = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return None;
        }
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    'u' => {
                        let hex: String = (0..4)
                            .map(|_| chars.next().map(|(_, c)| c).filter(char::is_ascii_hexdigit))
                            .collect::<Option<_>>()?;
                        value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.push((name.to_owned(), value));
        rest = after[end + 1..].trim_start();
        if let Some(next) = rest.strip_prefix(',') {
            rest = next.trim_start();
        } else if !rest.is_empty() {
            return None;
        }
    }
    (!labels.is_empty()).then_some(labels)
}

/// `{name="value", …}` with Loki's escaping, empty values left out.
pub fn selector(pairs: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (name, value) in pairs {
        if value.is_empty() {
            continue;
        }
        if out.len() > 1 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                // A value decoded lossily from invalid UTF-8 (a host or tag) holds U+FFFD,
                // which Loki's label parser takes for a bad byte ("invalid UTF-8 rune") and
                // refuses the stream for; escaped, it reads back as the same character.
                '\u{FFFD}' => out.push_str("\\ufffd"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_become_label_names() {
        for (name, want) in [
            ("status", "status"),
            ("http.request.method", "http_request_method"),
            ("@timestamp", "_timestamp"),
            ("2xx", "_2xx"),
            ("", "key_"),
            ("a_1", "a_1"),
            ("ключ", "key_"),
            // Runs collapse, as Loki 3.7+ collapses them.
            ("a__b", "a_b"),
            ("a._b", "a_b"),
            ("x-_-y", "x_y"),
            ("__name__", "_name_"),
            // Underscores only: Loki 3.7+ would fail the whole push (500).
            ("_", "key_"),
            ("__", "key_"),
            ("주문번호", "key_"),
            ("=", "key_"),
            ("@", "key_"),
            ("-", "key_"),
            // Not only underscores: left as they were.
            ("_id", "_id"),
            ("@a", "_a"),
        ] {
            assert_eq!(label_name(name.to_owned()), want, "{name}");
        }
    }

    /// A service whose last pair went quiet keeps its place while its `other` has records
    /// (Loki still counts those streams, and its other hosts keep its name); an hour after
    /// that went quiet too, the place is free.
    #[test]
    fn a_service_keeps_its_place_while_its_other_has_records() {
        let start = Instant::now();
        let host = |name: &str| [("host", name.to_owned())];
        let mut guard = Guard::new(3, "prod");
        guard.set_now(start);
        guard.labels("shop", None, "web-1");
        guard.labels("shop", None, "web-2");
        // Full (two pairs and shop's place): web-3 goes to (shop, other) and goes on
        // logging; web-1 and web-2 stop.
        guard.set_now(start + QUIET / 2);
        assert_eq!(guard.labels("shop", None, "web-3").folded, host("web-3"));
        // An hour after they stopped, a new service's pair looks for quiet ones: web-1 and
        // web-2 go, shop's place stays (web-3 keeps its `other` busy).
        let swept = start + QUIET + SWEEP_EVERY;
        guard.set_now(swept);
        assert!(guard.labels("cart", None, "cart-1").folded.is_empty());
        assert_eq!(guard.admitted(), 1);
        // So a second cart pair finds no room (cart-1, cart's place and shop's), and web-3
        // keeps its service's name.
        assert_eq!(guard.labels("cart", None, "cart-2").folded, host("cart-2"));
        assert_eq!(guard.labels("shop", None, "web-3").folded, host("web-3"));
        // An hour after shop's last record (cart-1 going on), shop's place is cart-2's.
        guard.set_now(swept + QUIET - Duration::from_secs(1));
        guard.labels("cart", None, "cart-1");
        guard.set_now(swept + QUIET + SWEEP_EVERY);
        assert!(guard.labels("cart", None, "cart-2").folded.is_empty());
        assert_eq!(guard.admitted(), 2);
    }

    proptest::proptest! {
        /// Whatever the name, the result is one Loki 3.7+ stores as it is (its
        /// otlptranslator leaves alone a name of ASCII letters, digits and single
        /// underscores that starts with no digit and is not underscores only), and naming
        /// it again changes nothing.
        #[test]
        fn a_label_name_is_one_loki_keeps_as_it_is(name in "[a-zA-Z0-9_.@:\\-é주 ]{0,12}") {
            let named = label_name(name);
            proptest::prop_assert!(!named.is_empty());
            proptest::prop_assert!(!named.starts_with(|c: char| c.is_ascii_digit()), "{named}");
            proptest::prop_assert!(named.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{named}");
            proptest::prop_assert!(!named.contains("__"), "{named}");
            proptest::prop_assert!(!named.bytes().all(|b| b == b'_'), "{named}");
            proptest::prop_assert_eq!(label_name(named.clone()), named);
        }
    }

    #[test]
    fn values_longer_than_loki_takes_fold_into_other_with_their_value_kept() {
        let mut guard = Guard::new(10, "test");
        let long = "h".repeat(MAX_VALUE_BYTES + 1);
        let labels = guard.labels("hybris", Some(Level::Info), &long);
        assert!(
            labels.selector.contains(r#"host="other""#),
            "{}",
            labels.selector
        );
        assert_eq!(
            labels.folded,
            [("service", "hybris".to_owned()), ("host", long)]
        );
        assert_eq!(guard.admitted(), 0, "takes no slot");
        let longest = "h".repeat(MAX_VALUE_BYTES);
        let labels = guard.labels("hybris", Some(Level::Info), &longest);
        assert!(labels.folded.is_empty());
        // A service too long for a label goes as `other`, its hosts too.
        let labels = guard.labels(&"s".repeat(MAX_VALUE_BYTES + 1), None, "web-1");
        assert!(
            labels.selector.contains(r#"service="other""#),
            "{}",
            labels.selector
        );
        assert_eq!(labels.folded.len(), 2);
    }

    #[test]
    fn selectors_escape_and_leave_out_empty_values() {
        assert_eq!(
            selector(&[("service", "a\"b\\c"), ("host", ""), ("level", "INFO")]),
            r#"{service="a\"b\\c", level="INFO"}"#
        );
        // What Loki (our receiver, checked against winston-loki) reads back.
        assert_eq!(
            crate::loki_receiver::parse_labels(&selector(&[("service", "a\"b\\c")])),
            Some(vec![("service".to_owned(), "a\"b\\c".to_owned())])
        );
    }

    #[test]
    fn a_replacement_character_is_escaped_in_selectors() {
        // What `String::from_utf8_lossy` makes of a host name in Latin-1.
        let host = String::from_utf8_lossy(b"caf\xe9-1").into_owned();
        let text = selector(&[("host", &host)]);
        assert_eq!(text, r#"{host="caf\ufffd-1"}"#);
        assert!(!text.contains('\u{FFFD}'), "Loki refuses it raw");
        assert_eq!(
            crate::loki_receiver::parse_labels(&text),
            Some(vec![("host".to_owned(), host)])
        );
        // Our receiver refuses it raw, as Loki does.
        assert_eq!(
            crate::loki_receiver::parse_labels("{host=\"caf\u{FFFD}-1\"}"),
            None
        );
    }

    #[test]
    fn pairs_past_the_limit_fold_into_other_with_their_values_kept() {
        // Two pairs of one service and the place of its `other`.
        let mut guard = Guard::new(3, "prod");
        let plain = guard.labels("shop", Some(Level::Info), "web-1");
        assert_eq!(
            &*plain.selector,
            r#"{service="shop", level="INFO", host="web-1", environment="prod"}"#
        );
        assert!(plain.folded.is_empty());
        guard.labels("shop", Some(Level::Info), "web-2");
        // Admitted pairs stay as they are at any level.
        assert!(
            guard
                .labels("shop", Some(Level::Error), "web-2")
                .folded
                .is_empty()
        );
        // A new host of an admitted service keeps the service.
        let new_host = guard.labels("shop", Some(Level::Info), "web-3");
        assert_eq!(
            &*new_host.selector,
            r#"{service="shop", level="INFO", host="other", environment="prod"}"#
        );
        assert_eq!(new_host.folded, [("host", "web-3".to_owned())]);
        // A new service folds too.
        let new_service = guard.labels("/var/log/x.log", Some(Level::Warn), "");
        assert_eq!(
            &*new_service.selector,
            r#"{service="other", level="WARN", host="other", environment="prod"}"#
        );
        assert_eq!(
            new_service.folded,
            [("service", "/var/log/x.log".to_owned())]
        );
        assert_eq!(guard.admitted(), 2);
    }

    /// A pair quiet for an hour gives its place to a new one (a pod replaced by a rollout);
    /// one with records keeps it, and a service whose last pair went is folded again.
    #[test]
    fn a_pair_quiet_for_an_hour_gives_its_place_to_a_new_one() {
        let start = Instant::now();
        // Two pairs of two services, each with the place of its `other`.
        let mut guard = Guard::new(4, "prod");
        guard.set_now(start);
        guard.labels("shop", Some(Level::Info), "shop-old");
        guard.labels("cart", Some(Level::Info), "cart-1");
        // Both admitted: the rollout's new pod is folded.
        let folded = guard.labels("shop", Some(Level::Info), "shop-new");
        assert_eq!(folded.folded, [("host", "shop-new".to_owned())]);
        // cart-1 goes on logging; shop-old stops.
        guard.set_now(start + Duration::from_secs(40 * 60));
        guard.labels("cart", Some(Level::Info), "cart-1");
        // Not quiet for an hour yet.
        guard.set_now(start + QUIET - Duration::from_secs(1));
        assert_eq!(
            guard.labels("shop", Some(Level::Info), "shop-new").folded,
            [("host", "shop-new".to_owned())]
        );
        // An hour without a record (and a minute since the last look): shop-old's place is
        // the new pod's; cart-1, seen 40 minutes in, keeps its.
        guard.set_now(start + QUIET + SWEEP_EVERY);
        let admitted = guard.labels("shop", Some(Level::Info), "shop-new");
        assert!(admitted.folded.is_empty());
        assert_eq!(
            &*admitted.selector,
            r#"{service="shop", level="INFO", host="shop-new", environment="prod"}"#
        );
        assert!(
            guard
                .labels("cart", Some(Level::Warn), "cart-1")
                .folded
                .is_empty()
        );
        assert_eq!(guard.admitted(), 2);
        // shop-old is now past the limit, under its service.
        assert_eq!(
            guard.labels("shop", Some(Level::Info), "shop-old").folded,
            [("host", "shop-old".to_owned())]
        );
        // Both go quiet and their places are taken: cart has no pair left, so a cart record
        // past the limit is service `other`.
        guard.set_now(start + QUIET * 3);
        guard.labels("search", Some(Level::Info), "search-1");
        guard.labels("search", Some(Level::Info), "search-2");
        assert_eq!(guard.admitted(), 2);
        let cart = guard.labels("cart", Some(Level::Info), "cart-2");
        assert_eq!(
            &*cart.selector,
            r#"{service="other", level="INFO", host="other", environment="prod"}"#
        );
        // A clock read earlier than the last does not move the guard back.
        guard.set_now(start);
        assert!(
            guard
                .labels("search", Some(Level::Info), "search-1")
                .folded
                .is_empty()
        );
    }

    proptest::proptest! {
        /// However many pairs arrive, the distinct selectors stay within the bound.
        #[test]
        fn streams_stay_bounded(pairs in proptest::collection::vec((0_u8..20, 0_u8..50), 0..500)) {
            let max = 10;
            let mut guard = Guard::new(max, "e");
            let mut selectors = std::collections::HashSet::new();
            for (service, host) in pairs {
                let labels = guard.labels(&format!("s{service}"), None, &format!("h{host}"));
                selectors.insert(labels.selector);
            }
            // Every pair with a stream of its own (each service's `other` too) within the
            // limit, and (`other`, `other`).
            proptest::prop_assert!(selectors.len() <= max + 1);
        }
    }

    /// The place each admitted service holds for its `other`: a new service is admitted
    /// only with room for both, and a pair of an admitted service needs room for itself.
    #[test]
    fn each_admitted_service_holds_a_place_for_its_other() {
        let mut guard = Guard::new(4, "prod");
        for (service, host) in [("shop", "web-1"), ("cart", "cart-1")] {
            assert!(guard.labels(service, None, host).folded.is_empty());
        }
        // Two pairs and two places: full, for a new pair of either service or a new one.
        assert_eq!(
            guard.labels("shop", None, "web-2").folded,
            [("host", "web-2".to_owned())]
        );
        assert_eq!(
            guard.labels("search", None, "s-1").folded,
            [("service", "search".to_owned()), ("host", "s-1".to_owned())]
        );
        assert_eq!(guard.admitted(), 2);
        // One place left: a second pair of a service admitted already fits, a new service
        // (a pair and a place) does not.
        let mut guard = Guard::new(3, "prod");
        guard.labels("shop", None, "web-1");
        assert_eq!(
            guard.labels("cart", None, "cart-1").folded,
            [
                ("service", "cart".to_owned()),
                ("host", "cart-1".to_owned())
            ]
        );
        assert!(guard.labels("shop", None, "web-2").folded.is_empty());
        assert_eq!(guard.admitted(), 2);
    }
}
