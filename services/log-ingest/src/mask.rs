//! Masking of personal data: the legacy platform writes customers' e-mail addresses and
//! phone numbers into its lines. Every record is masked before it leaves the service
//! (Loki, TailLogs, TestParse, metric labels and exemplars), with configured patterns,
//! counted per pattern.
//!
//! The patterns are regular expressions (the `regex` crate: linear time, no catastrophic
//! backtracking on hostile lines); each may name literals one of which every match
//! contains (`@` or `%40` for e-mail addresses), checked first, so most texts cost a
//! substring search per pattern.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::record::Record;

/// One masking pattern as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatternSettings {
    /// Name, for the `mall_log_ingest_masked_total{pattern}` counter.
    pub name: String,
    /// The regular expression (Rust `regex` syntax) of what to mask.
    pub regex: String,
    /// What replaces each match.
    pub replacement: String,
    /// Literals one of which every match contains, checked before the regular expression
    /// runs (a speed-up; empty: always run it).
    #[serde(default)]
    pub requires: Vec<String>,
    /// A match with a digit right before or after it is part of a longer number and left
    /// alone (what `\b` cannot say for numbers next to letters: `고객01012345678님`).
    #[serde(default)]
    pub digit_bounded: bool,
}

/// The default patterns: e-mail addresses and Korean mobile numbers.
pub fn default_patterns() -> Vec<PatternSettings> {
    vec![
        PatternSettings {
            name: "email".to_owned(),
            // Also URL-encoded (`%40`, in query strings) and with non-ASCII letters.
            regex: r"[\p{L}\p{N}._%+\-]+(?:@|%40)[\p{L}\p{N}\-]+(?:\.[\p{L}\p{N}\-]+)*\.\p{L}{2,}"
                .to_owned(),
            replacement: "<email>".to_owned(),
            requires: vec!["@".to_owned(), "%40".to_owned()],
            digit_bounded: false,
        },
        PatternSettings {
            name: "kr_mobile".to_owned(),
            // 010-1234-5678, 010 1234 5678, 01012345678, +82 10-1234-5678, next to letters
            // or Hangul too; not inside a longer number (`digit_bounded`).
            regex: r"(?:\+82[ .\-]?|0)1[016789][ .\-]?[0-9]{3,4}[ .\-]?[0-9]{4}".to_owned(),
            replacement: "<phone>".to_owned(),
            requires: Vec::new(),
            digit_bounded: true,
        },
    ]
}

/// Compiled patterns.
#[derive(Debug, Clone)]
pub struct Masker {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    regex: Regex,
    replacement: String,
    requires: Vec<String>,
    digit_bounded: bool,
}

impl Masker {
    /// Compiles `patterns`.
    ///
    /// # Errors
    /// Naming the pattern whose regular expression does not compile.
    pub fn new(patterns: &[PatternSettings]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Ok(Pattern {
                    regex: Regex::new(&p.regex)
                        .map_err(|e| format!("masking pattern {:?}: {e}", p.name))?,
                    replacement: p.replacement.clone(),
                    requires: p.requires.clone(),
                    digit_bounded: p.digit_bounded,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { patterns })
    }

    /// How many patterns there are (the length of [`Self::record`]'s counts).
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Masks `text` in place, adding the matches of each pattern to `counts` (one slot per
    /// pattern, in configured order).
    pub fn text(&self, text: &mut String, counts: &mut [u64]) {
        // Most records have no stack trace and some no logger or thread.
        if text.is_empty() {
            return;
        }
        for (pattern, count) in self.patterns.iter().zip(counts.iter_mut()) {
            if !pattern.requires.is_empty()
                && !pattern.requires.iter().any(|r| text.contains(r.as_str()))
            {
                continue;
            }
            let mut masked = String::new();
            let mut kept = 0;
            for found in pattern.regex.find_iter(text) {
                let bytes = text.as_bytes();
                if pattern.digit_bounded
                    && (bytes[..found.start()]
                        .last()
                        .is_some_and(u8::is_ascii_digit)
                        || bytes.get(found.end()).is_some_and(u8::is_ascii_digit))
                {
                    continue;
                }
                masked.push_str(&text[kept..found.start()]);
                masked.push_str(&pattern.replacement);
                kept = found.end();
                *count += 1;
            }
            if kept > 0 {
                masked.push_str(&text[kept..]);
                *text = masked;
            }
        }
    }

    /// Masks every text of `record`: message, stack trace, logger, thread, and the keys and
    /// values of its fields.
    pub fn record(&self, record: &mut Record, counts: &mut [u64]) {
        self.text(&mut record.message, counts);
        self.text(&mut record.stack_trace, counts);
        self.text(&mut record.logger, counts);
        self.text(&mut record.thread, counts);
        if record.fields.is_empty() {
            return;
        }
        let fields = std::mem::take(&mut record.fields);
        for (mut key, mut value) in fields {
            self.text(&mut key, counts);
            self.text(&mut value, counts);
            record.fields.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> (String, Vec<u64>) {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let mut text = text.to_owned();
        let mut counts = vec![0; masker.len()];
        masker.text(&mut text, &mut counts);
        (text, counts)
    }

    #[test]
    fn email_addresses_are_masked_and_counted() {
        assert_eq!(
            masked("order 1 placed by customer customer4711@example.com total 3.00 EUR"),
            (
                "order 1 placed by customer <email> total 3.00 EUR".to_owned(),
                vec![1, 0]
            )
        );
        assert_eq!(
            masked("a.b+c@mail.example.co.kr and x_y@host.io"),
            ("<email> and <email>".to_owned(), vec![2, 0])
        );
        assert_eq!(masked("no address @ here").1, vec![0, 0]);
        assert_eq!(
            masked("GET /acme-de/en/login?email=customer4711%40example.com 200"),
            (
                "GET /acme-de/en/login?email=<email> 200".to_owned(),
                vec![1, 0]
            )
        );
        assert_eq!(
            masked("jöhn@example.com, 홍길동@회사.kr").0,
            "<email>, <email>"
        );
        // A Java object's identity is not an address.
        assert_eq!(masked("Validator@5bf508a0]: missing").1, vec![0, 0]);
    }

    #[test]
    fn korean_mobile_numbers_are_masked_but_not_other_numbers() {
        for phone in [
            "010-1234-5678",
            "010 1234 5678",
            "01012345678",
            "011-123-4567",
            "+82 10-1234-5678",
        ] {
            assert_eq!(
                masked(&format!("call {phone} now")),
                ("call <phone> now".to_owned(), vec![0, 1]),
                "{phone}"
            );
        }
        for not in [
            "order 99010123456789",
            "cart 8812 recalculated in 12 ms",
            "10.1.2.3",
            "2024/10/28 17:12:00.040",
        ] {
            assert_eq!(masked(not), (not.to_owned(), vec![0, 0]), "{not}");
        }
    }

    #[test]
    fn numbers_next_to_hangul_and_letters_are_masked_and_lists_of_them_too() {
        for (text, want) in [
            ("고객01012345678님", "고객<phone>님"),
            ("010-1234-5678로 발송", "<phone>로 발송"),
            ("tel_01012345678", "tel_<phone>"),
            ("010-1234-5678,010-2222-3333", "<phone>,<phone>"),
        ] {
            assert_eq!(masked(text).0, want, "{text}");
        }
    }

    #[test]
    fn every_text_of_a_record_is_masked_field_keys_too() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let mut record = Record {
            message: "user a@b.com".to_owned(),
            stack_trace: "java.lang.IllegalStateException: no user c@d.org".to_owned(),
            fields: [
                ("phone".to_owned(), "010-9999-8888".to_owned()),
                ("e@mail.com".to_owned(), "bounced".to_owned()),
            ]
            .into(),
            ..Record::default()
        };
        let mut counts = vec![0; 2];
        masker.record(&mut record, &mut counts);
        assert_eq!(record.message, "user <email>");
        assert_eq!(
            record.stack_trace,
            "java.lang.IllegalStateException: no user <email>"
        );
        assert_eq!(record.fields["phone"], "<phone>");
        assert_eq!(record.fields["<email>"], "bounced");
        assert_eq!(counts, vec![3, 1]);
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_named() {
        let error = Masker::new(&[PatternSettings {
            name: "broken".to_owned(),
            regex: "(".to_owned(),
            replacement: String::new(),
            requires: Vec::new(),
            digit_bounded: false,
        }])
        .expect_err("does not compile");
        assert!(error.contains("\"broken\""), "{error}");
    }
}
