//! Masking of personal data: the legacy platform writes customers' e-mail addresses and
//! phone numbers into its lines. Every record is masked before it leaves the service
//! (Loki, TailLogs, TestParse, metric labels and exemplars), with configured patterns,
//! counted per pattern.
//!
//! The patterns are regular expressions (the `regex` crate: linear time, no catastrophic
//! backtracking on hostile lines); each has a cheap required literal (`@` for e-mail
//! addresses) checked first, so most lines cost one `memchr` per pattern.

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
    /// Text every match contains, checked before the regular expression runs (a speed-up;
    /// empty: always run it).
    #[serde(default)]
    pub requires: String,
}

/// The default patterns: e-mail addresses and Korean mobile numbers.
pub fn default_patterns() -> Vec<PatternSettings> {
    vec![
        PatternSettings {
            name: "email".to_owned(),
            regex: r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
                .to_owned(),
            replacement: "<email>".to_owned(),
            requires: "@".to_owned(),
        },
        PatternSettings {
            name: "kr_mobile".to_owned(),
            // 010-1234-5678, 010 1234 5678, 01012345678, +82 10-1234-5678; not inside a
            // longer number.
            regex: r"(?:\+82[ \-]?|\b0)1[016789][ \-.]?\d{3,4}[ \-.]?\d{4}\b".to_owned(),
            replacement: "<phone>".to_owned(),
            requires: String::new(),
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
    requires: String,
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
        for (pattern, count) in self.patterns.iter().zip(counts.iter_mut()) {
            if !pattern.requires.is_empty() && !text.contains(pattern.requires.as_str()) {
                continue;
            }
            let mut found = 0;
            let masked = pattern.regex.replace_all(text, |_: &regex::Captures<'_>| {
                found += 1;
                pattern.replacement.as_str()
            });
            if let std::borrow::Cow::Owned(masked) = masked {
                *text = masked;
                *count += found;
            }
        }
    }

    /// Masks every text of `record` (message, stack trace, field values, logger, thread).
    pub fn record(&self, record: &mut Record, counts: &mut [u64]) {
        self.text(&mut record.message, counts);
        self.text(&mut record.stack_trace, counts);
        self.text(&mut record.logger, counts);
        self.text(&mut record.thread, counts);
        for value in record.fields.values_mut() {
            self.text(value, counts);
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
    fn every_text_of_a_record_is_masked() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let mut record = Record {
            message: "user a@b.com".to_owned(),
            stack_trace: "java.lang.IllegalStateException: no user c@d.org".to_owned(),
            fields: [("phone".to_owned(), "010-9999-8888".to_owned())].into(),
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
        assert_eq!(counts, vec![2, 1]);
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_named() {
        let error = Masker::new(&[PatternSettings {
            name: "broken".to_owned(),
            regex: "(".to_owned(),
            replacement: String::new(),
            requires: String::new(),
        }])
        .expect_err("does not compile");
        assert!(error.contains("\"broken\""), "{error}");
    }
}
