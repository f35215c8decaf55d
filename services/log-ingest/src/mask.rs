//! Masking of personal data: the legacy platform writes customers' e-mail addresses and
//! phone numbers into its lines. Every record is masked before it leaves the service
//! (Loki, TailLogs, TestParse, metric labels and exemplars), with configured patterns,
//! counted per pattern.
//!
//! The patterns are regular expressions (the `regex` crate: linear time, no catastrophic
//! backtracking on hostile lines); each may name literals one of which every match
//! contains (`@` or `%40`, among others, for e-mail addresses, `01` or `+82` for mobile
//! numbers). The literals of every pattern are searched for together, in one pass over a
//! text (an Aho-Corasick automaton), plus one `memchr` pass per one-byte literal (`@`), and
//! only the patterns whose literals were found run: most texts cost those passes.

use aho_corasick::AhoCorasick;
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
    /// A match with a digit (ASCII or full-width) right before or after it is part of a
    /// longer number and left alone (what `\b` cannot say for numbers next to letters:
    /// `고객01012345678님`); the last digit of a URL escape before it (`%20`, `%22`) does not
    /// count. A match that stops before a separator (those of the default `kr_mobile`
    /// pattern: see `separator_then_digit`) and a digit gives way to a match starting
    /// inside it that runs on past it (the phone in `.019 010-1234-5678`).
    /// Nor is a match of digits alone masked inside a hex id (a word of 16 hex digits or
    /// more around it, as in a session id `3F0107435786BCAA`), nor a match inside a UUID.
    #[serde(default)]
    pub digit_bounded: bool,
}

/// The default patterns: e-mail addresses and Korean mobile numbers.
pub fn default_patterns() -> Vec<PatternSettings> {
    vec![
        PatternSettings {
            name: "email".to_owned(),
            // Also URL-encoded (`%40`, in query strings; `%2540`, encoded twice in a redirect's
            // encoded query), with the full-width `＠` (U+FF20) and `．` (U+FF0E) Korean input
            // methods type, and with non-ASCII letters. The local part may hold RFC 5322's
            // other atext characters (`o'brien`), though not first, so the quotes or braces
            // around an address are kept (`'<email>'`), and never `= & / ?` (a whole query
            // string would go with it) nor `|` (the separator of pipe-delimited fields); or it
            // is quoted (`"kim.lee"@`).
            regex: r#"(?:"[\p{L}\p{N}._%+\-'!#$*^`{}~ ]+"|[\p{L}\p{N}._%+\-][\p{L}\p{N}._%+\-'!#$*^`{}~]*)(?:@|\x{FF20}|%40|%2540)[\p{L}\p{N}\-]+(?:[.\x{FF0E}][\p{L}\p{N}\-]+)*[.\x{FF0E}]\p{L}{2,}"#
                .to_owned(),
            replacement: "<email>".to_owned(),
            requires: ["@", "\u{ff20}", "%40", "%2540"].map(str::to_owned).into(),
            digit_bounded: false,
        },
        PatternSettings {
            name: "kr_mobile".to_owned(),
            // 010-1234-5678, 010 1234 5678, 01012345678, (010) 1234-5678, +82 10-1234-5678,
            // +82 010-1234-5678, +82 (0)10-1234-5678 (the 0 kept) and (+82) 10-1234-5678,
            // `+` URL-encoded (`%2B82`, in query strings) or left out (821012345678, as SMS
            // gateways log them), spaces URL-encoded in a query string (`010+1234+5678`,
            // `010%201234%205678`), hyphens with spaces around them (`010 - 1234 - 5678`),
            // full-width digits, hyphens, spaces, parentheses and `＋` as Korean input
            // methods type them (`０１０－１２３４－５６７８`, `＋８２ １０…`), next to letters
            // or Hangul too; between the groups also a no-break space or a tab (text pasted
            // from a web page or a spreadsheet; a tab also as JSON writes it, `\t`, in a line
            // shipped as it came), a dot and a space (`010. 1234. 5678`), and
            // the dashes a word processor or a Korean keyboard puts for a hyphen (`‐ – −`, and
            // the vowel `ㅡ`); not inside a longer number (`digit_bounded`). A bare `82` (ASCII,
            // its `1` too) takes at most a space (or `+`, `%20`) or hyphen
            // before the `1x`: not a `.` (`82.1012345678` is a number), nor a 0
            // (`8201012345678` is an EAN-13 code).
            regex: r"(?:(?:(?:(?:\+|＋|%2[Bb])82|[+＋]８２)|[(（](?:(?:\+|＋|%2[Bb])82|[+＋]８２)[)）])(?:[ .+　\x{A0}\t]|%20|\\t|\. | ?[\-－‐–−ㅡ] ?)?(?:[0０]|[(（][0０][)）][ 　]?)?[1１][016-9０１６-９]|82(?:[ +\-]|%20)?1[016789]|[0０][1１][016-9０１６-９]|[(（][0０][1１][016-9０１６-９][)）])(?:[ .+　\x{A0}\t]|%20|\\t|\. | ?[\-－‐–−ㅡ] ?)?[0-9０-９]{3,4}(?:[ .+　\x{A0}\t]|%20|\\t|\. | ?[\-－‐–−ㅡ] ?)?[0-9０-９]{4}"
                .to_owned(),
            replacement: "<phone>".to_owned(),
            // Every match holds `01` (the 0 kept, in parentheses too; full-width or not), `+82`
            // (`＋`, `８２` full-width too) or `%2B82`, or a bare `82` with its `1` (ASCII
            // only); not `82` alone, which many more lines' numbers hold (each such line would
            // run the regular expression).
            requires: [
                "01", "０１", "０1", "0１", "+82", "＋82", "+８２", "＋８２", "%2B82", "%2b82",
                "821", "82 1", "82-1", "82+1", "82%201",
            ]
            .map(str::to_owned)
            .into(),
            digit_bounded: true,
        },
    ]
}

/// Whether `before` ends in a digit that is part of a number: not the second hex digit of
/// a URL escape (`%20` a space, `%22` a quote, `%28` a parenthesis; encoded twice, `%2520`),
/// which a number in a query string follows as it would follow the character itself.
fn digit_before(before: &[u8]) -> bool {
    match before {
        [.., b'%', high, low] if high.is_ascii_hexdigit() && low.is_ascii_digit() => false,
        [.., b'%', b'2', b'5', high, low] if high.is_ascii_hexdigit() && low.is_ascii_digit() => {
            false
        }
        [.., 0xEF, 0xBC, 0x90..=0x99] => true,
        [.., last] => last.is_ascii_digit(),
        [] => false,
    }
}

/// Whether `text` starts with a digit, ASCII or full-width (`０` to `９`).
fn starts_with_digit(text: &[u8]) -> bool {
    matches!(text, [b'0'..=b'9', ..] | [0xEF, 0xBC, 0x90..=0x99, ..])
}

/// Whether `rest` starts with a separator the phone pattern takes between groups (a space,
/// `.`, `. `, `+`, `%20`, a no-break space, a tab or JSON's `\t`, the full-width space, or
/// a hyphen with or without a space on either side: `-`, the full-width `－`, `‐ – −` and
/// `ㅡ`) and then a digit.
fn separator_then_digit(rest: &[u8]) -> bool {
    /// Separators alone between groups (as the default `kr_mobile` pattern takes them).
    const SEPARATORS: [&str; 6] = ["%20", "\u{3000}", "\u{a0}", "\t", "\\t", ". "];
    /// Hyphens, a space on either side or both.
    const HYPHENS: [&str; 6] = ["-", "－", "‐", "–", "−", "ㅡ"];
    let after = if let Some(after) = SEPARATORS
        .iter()
        .find_map(|s| rest.strip_prefix(s.as_bytes()))
    {
        after
    } else {
        let spaced = rest.strip_prefix(b" ");
        let before_hyphen = spaced.unwrap_or(rest);
        match HYPHENS
            .iter()
            .find_map(|h| before_hyphen.strip_prefix(h.as_bytes()))
        {
            Some(after) => after.strip_prefix(b" ").unwrap_or(after),
            None => match (spaced, before_hyphen) {
                (Some(after), _) => after,
                (None, [b'.' | b'+', after @ ..]) => after,
                (None, _) => return false,
            },
        }
    };
    starts_with_digit(after)
}

/// Where the character at `at` ends (one past the text's end at its end).
fn after_first_char(text: &str, at: usize) -> usize {
    at + text[at..].chars().next().map_or(1, char::len_utf8)
}

/// Whether `start..end`, all digits, is part of a hex id: the word around it (the ASCII
/// letters and digits it is written in) is longer than it, at least [`HEX_ID`] long, and
/// all hex digits (a session, span or trace id: `3F0107435786BCAA`, `01116450459DB735`). A
/// number written beside other letters (`tel_01012345678`, `Called01012345678Added`,
/// `고객01012345678님`) or in a shorter word (`ab01012345678cd`) is not.
fn inside_hex_id(bytes: &[u8], start: usize, end: usize) -> bool {
    if !bytes[start..end].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let word = |b: &&u8| b.is_ascii_alphanumeric();
    // Bounded: a word longer than this either side is long enough; its hex is judged on
    // what was looked at.
    let before = bytes[..start].iter().rev().take(HEX_SCAN).take_while(word);
    let after = bytes[end..].iter().take(HEX_SCAN).take_while(word);
    let (mut around, mut hex) = (0, true);
    for b in before.chain(after) {
        around += 1;
        hex &= b.is_ascii_hexdigit();
    }
    hex && around > 0 && around + (end - start) >= HEX_ID
}

/// Whether `start..end` lies inside a UUID (`123e4567-e89b-12d3-a456-a01012345678`), whose
/// groups of 4 and 12 hex digits are words too short for [`inside_hex_id`].
fn inside_uuid(bytes: &[u8], start: usize, end: usize) -> bool {
    const LEN: usize = 36;
    if end - start > LEN {
        return false;
    }
    let is_uuid = |at: usize| {
        let Some(candidate) = bytes.get(at..at + LEN) else {
            return false;
        };
        let apart = |i: Option<&u8>| !i.is_some_and(u8::is_ascii_alphanumeric);
        candidate.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        }) && apart(at.checked_sub(1).and_then(|i| bytes.get(i)))
            && apart(bytes.get(at + LEN))
    };
    (end.saturating_sub(LEN)..=start).any(is_uuid)
}

/// The shortest hex id [`inside_hex_id`] knows: a span id's 16 digits.
const HEX_ID: usize = 16;

/// How far [`inside_hex_id`] looks either side of a match.
const HEX_SCAN: usize = 64;

/// Whether `found`, a match of a `digit_bounded` pattern, is a number of its own: no digit
/// right before or after it, and no match starting inside it that runs on where it stops
/// in the middle of a number (`019 010-1234` in `12:00:01.019 010-1234-5678` stops before
/// `-5678`; `010-1234-5678` starting inside it does not), which is taken instead.
fn stands_alone(pattern: &Pattern, text: &str, found: &regex::Match<'_>) -> bool {
    let bounded = |m: &regex::Match<'_>| {
        let bytes = text.as_bytes();
        !digit_before(&bytes[..m.start()])
            && !starts_with_digit(&bytes[m.end()..])
            && !inside_hex_id(bytes, m.start(), m.end())
            && !inside_uuid(bytes, m.start(), m.end())
    };
    if !bounded(found) {
        return false;
    }
    // Only where the text goes on with a separator and a digit: a second search then.
    !separator_then_digit(&text.as_bytes()[found.end()..])
        || !pattern
            .regex
            .find_at(text, after_first_char(text, found.start()))
            .is_some_and(|later| {
                later.start() < found.end() && later.end() > found.end() && bounded(&later)
            })
}

/// Compiled patterns.
#[derive(Debug, Clone)]
pub struct Masker {
    /// Shared by every clone (a push's masker is one): a cloned `Regex` would start with
    /// empty search caches and rebuild its lazy DFA's states on every push.
    patterns: std::sync::Arc<[Pattern]>,
    /// Every pattern's `requires` literals of two bytes or more, in one automaton (none
    /// when there are none).
    literals: Option<AhoCorasick>,
    /// For each byte, the literals of two bytes or more that start with it: the rest of the
    /// literal and the bit of its pattern.
    by_first: std::sync::Arc<[Tails]>,
    /// The bytes that are literals on their own (`@`), each with the bits of the patterns
    /// listing it.
    single_bytes: std::sync::Arc<[(u8, u64)]>,
    /// Bits of the patterns with literals.
    with_literals: u64,
    /// Bit `i` set: pattern `i` runs on every text (it has no literals, or an empty one).
    always: u64,
}

/// Literals after their first byte, each with the bit of its pattern.
type Tails = Box<[(Box<[u8]>, u64)]>;

/// Patterns past this many are run on every text (their candidates are a bit set).
const PREFILTERED: usize = 64;

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
            .collect::<Result<Vec<Pattern>, String>>()?;
        let (mut literals, mut always, mut with_literals) = (Vec::new(), 0, 0);
        let (mut by_first, mut single_bytes) = (vec![Vec::new(); 256], Vec::<(u8, u64)>::new());
        for (i, pattern) in patterns.iter().enumerate().take(PREFILTERED) {
            let bit = 1 << i;
            if pattern.requires.is_empty() {
                always |= bit;
            } else {
                with_literals |= bit;
            }
            // One-byte literals are searched for apart (by `memchr`): in the automaton they
            // would make its prefilter stop at every byte any literal starts with (`0`,
            // `8` in numbers); without them it looks for the first two bytes of each.
            for literal in &pattern.requires {
                match literal.as_bytes() {
                    // An empty literal is in every text.
                    [] => always |= bit,
                    &[byte] => match single_bytes.iter_mut().find(|(b, _)| *b == byte) {
                        Some((_, bits)) => *bits |= bit,
                        None => single_bytes.push((byte, bit)),
                    },
                    [first, rest @ ..] => {
                        by_first[usize::from(*first)].push((rest.into(), bit));
                        literals.push(literal);
                    }
                }
            }
        }
        let literals = if literals.is_empty() {
            None
        } else {
            // Leftmost-first finds take the automaton's SIMD prefilter (overlapping finds
            // would walk every byte); `candidates` restarts one byte after each find.
            let automaton = AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                .build(literals)
                .map_err(|e| format!("masking patterns' `requires` literals: {e}"))?;
            Some(automaton)
        };
        Ok(Self {
            patterns: patterns.into(),
            literals,
            by_first: by_first.into_iter().map(Vec::into_boxed_slice).collect(),
            single_bytes: single_bytes.into(),
            with_literals,
            always,
        })
    }

    /// Bit `i` set: pattern `i` may match `text` (one of its literals is in it, or it has
    /// none). Patterns past [`PREFILTERED`] have no bit: [`Self::text`] searches for their
    /// literals itself.
    fn candidates(&self, text: &str) -> u64 {
        let bytes = text.as_bytes();
        let mut found = self.always;
        for &(byte, bits) in self.single_bytes.iter() {
            if found & bits != bits && memchr::memchr(byte, bytes).is_some() {
                found |= bits;
            }
        }
        let Some(automaton) = &self.literals else {
            return found;
        };
        let mut at = 0;
        // Every place a literal starts is visited: after a find, the search goes on one
        // byte later (not after its end), so a literal inside or across another (`%40`
        // and `01` in `%4010`) is not missed, and every literal starting at a find is
        // checked there (leftmost-first reports only one of those starting at one place,
        // `821` of one pattern and `82` of another).
        while found & self.with_literals != self.with_literals
            && let Some(hit) = automaton.find(aho_corasick::Input::new(text).span(at..text.len()))
        {
            let start = hit.start();
            found |= self.by_first[usize::from(bytes[start])]
                .iter()
                .filter(|(rest, _)| bytes[start + 1..].starts_with(rest))
                .fold(0, |bits, (_, bit)| bits | bit);
            at = start + 1;
        }
        found
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
        let mut candidates = self.candidates(text);
        for (i, (pattern, count)) in self.patterns.iter().zip(counts.iter_mut()).enumerate() {
            // Past the bit set, a pattern's own literals are searched for one by one.
            let candidate = if i < PREFILTERED {
                candidates & (1 << i) != 0
            } else {
                pattern.requires.is_empty()
                    || pattern.requires.iter().any(|r| text.contains(r.as_str()))
            };
            if !candidate {
                continue;
            }
            let mut masked = String::new();
            // Where the text is kept from (the end of the last match replaced, if any).
            let (mut kept, mut replaced, mut from) = (0, false, 0);
            while from <= text.len()
                && let Some(found) = pattern.regex.find_at(text, from)
            {
                // An empty match right after a replaced one is no match of its own (as
                // `find_iter` has it: `[0-9]*` on `12a` is one match before `a`, not two).
                let after_last = replaced && found.is_empty() && found.start() == kept;
                if after_last || pattern.digit_bounded && !stands_alone(pattern, text, &found) {
                    // Part of a longer number; a match may still start inside it (the phone
                    // after `2010 ` in `02-555-2010 010-1234-5678`, which the refused match
                    // `010 010-1234` ran into): search again from its next character, not
                    // from its end.
                    from = after_first_char(text, found.start());
                    continue;
                }
                masked.push_str(&text[kept..found.start()]);
                masked.push_str(&pattern.replacement);
                (kept, replaced) = (found.end(), true);
                *count += 1;
                // After an empty match (a configured pattern may allow one), a character on.
                from = if found.is_empty() {
                    after_first_char(text, found.end())
                } else {
                    found.end()
                };
            }
            if replaced {
                masked.push_str(&text[kept..]);
                *text = masked;
                // A replacement may hold a later pattern's literal: judge the new text.
                candidates = self.candidates(text);
            }
        }
    }

    /// Masks every text of `record`: message, stack trace, logger, thread, and the keys and
    /// values of its fields.
    ///
    /// A replacement longer than what it replaced (`<email>` for `a@b.co`, or a longer
    /// configured one) can take a record's text past the cap it was cut to (`cap` bytes),
    /// and past Loki's line limit, which would refuse the record for good: message and
    /// stack trace are cut again, together, to Loki's default limit, or to `cap` when that
    /// is higher (the operator raised both). What is cut then, in `truncated_bytes`, is
    /// counted in masked text. Cutting masked text shows nothing masked.
    pub fn record(&self, record: &mut Record, counts: &mut [u64], cap: usize) {
        self.text(&mut record.message, counts);
        self.text(&mut record.stack_trace, counts);
        crate::multiline::cap_text(record, cap.max(crate::loki::DEFAULT_MAX_LINE_BYTES));
        self.text(&mut record.logger, counts);
        self.text(&mut record.thread, counts);
        if record.fields.is_empty() {
            return;
        }
        let fields = std::mem::take(&mut record.fields);
        for (mut key, mut value) in fields {
            self.text(&mut key, counts);
            self.text(&mut value, counts);
            // Keys that mask to the same text (two addresses as keys) are kept apart.
            if record.fields.contains_key(&key) {
                let base = key.clone();
                key = (2..)
                    .map(|n| format!("{base}_{n}"))
                    .find(|k| !record.fields.contains_key(k))
                    .expect("a free key");
            }
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
    fn addresses_encoded_twice_full_width_or_with_rfc_5322_characters_are_masked() {
        for (text, want, count) in [
            // Encoded twice, in a redirect's encoded query: the encoded path before it goes
            // with it (`%` and letters are address characters), nothing of it is left.
            (
                "GET /login?redirect=%2Flogin%3Femail%3Dkim%2540example.com 302",
                "GET /login?redirect=<email> 302",
                1,
            ),
            ("kim%2540example.com", "<email>", 1),
            ("회원 kim\u{ff20}naver.com 가입", "회원 <email> 가입", 1),
            // The full-width dot too (`．`, U+FF0E), and full-width letters.
            (
                "회원 kim\u{ff20}naver\u{ff0e}com 가입",
                "회원 <email> 가입",
                1,
            ),
            (
                "회원 kim@naver\u{ff0e}co\u{ff0e}kr 가입",
                "회원 <email> 가입",
                1,
            ),
            (
                "회원 ｋｉｍ＠ｎａｖｅｒ．ｃｏｍ 가입",
                "회원 <email> 가입",
                1,
            ),
            ("from o'brien@example.com", "from <email>", 1),
            ("to a!b#c$d*e^f`g{h}j~k@example.com", "to <email>", 1),
            // Not as an address's first character: the quotes and braces around it stay.
            (
                "'kim@example.com', {lee@example.com}, `park@example.com`",
                "'<email>', {<email>}, `<email>`",
                3,
            ),
            (r#"rcpt "kim.lee"@example.com ok"#, "rcpt <email> ok", 1),
            (r#"rcpt "kim lee"@example.com ok"#, "rcpt <email> ok", 1),
            (
                r#"{"email":"kim@example.com","id":7}"#,
                r#"{"email":"<email>","id":7}"#,
                1,
            ),
            // `= & / ?` end an address: the path and the query's other parameters stay.
            (
                "GET /u/kim@example.com?a=1&email=lee@example.com&next=/x 200",
                "GET /u/<email>?a=1&email=<email>&next=/x 200",
                2,
            ),
        ] {
            assert_eq!(masked(text), (want.to_owned(), vec![count, 0]), "{text}");
        }
    }

    /// A replacement longer than what it replaced does not take a record past Loki's line
    /// limit: its text is cut again (counted); past the record's cap but within Loki's limit,
    /// nothing is cut.
    #[test]
    fn masking_keeps_a_record_within_lokis_line_limit() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let limit = crate::loki::DEFAULT_MAX_LINE_BYTES;
        // The line Loki gets: message, a line break, stack trace.
        let line = |r: &Record| {
            r.message.len()
                + usize::from(!r.message.is_empty() && !r.stack_trace.is_empty())
                + r.stack_trace.len()
        };
        // 7 bytes each, 8 masked.
        let record = |addresses: usize| Record {
            message: "failed".to_owned(),
            stack_trace: format!(
                "java.lang.IllegalStateException: {}",
                "a@b.co ".repeat(addresses)
            ),
            ..Record::default()
        };
        let cap = 196_608;
        let mut cut = record(36_000);
        let before = line(&cut);
        assert!(before < limit && before + 36_000 > limit);
        let mut counts = vec![0; masker.len()];
        masker.record(&mut cut, &mut counts, cap);
        assert!(line(&cut) <= limit, "{} > {limit}", line(&cut));
        assert!(line(&cut) > limit - 8, "cut where the limit falls");
        assert_eq!(cut.truncated_bytes, before + 36_000 - line(&cut));
        assert!(!cut.stack_trace.contains('@'));
        assert_eq!(counts, [36_000, 0]);
        // Past the cap, within Loki's limit: whole.
        let mut whole = record(25_000);
        let before = line(&whole);
        assert!(before < cap && before + 25_000 > cap);
        masker.record(&mut whole, &mut counts, cap);
        assert_eq!(whole.truncated_bytes, 0);
        assert_eq!(line(&whole), before + 25_000);
        // A cap above Loki's limit (raised with it) is the limit.
        let mut raised = record(36_000);
        let before = line(&raised);
        masker.record(&mut raised, &mut counts, 2 * limit);
        assert_eq!(raised.truncated_bytes, 0);
        assert_eq!(line(&raised), before + 36_000);
    }

    /// Field keys that mask to the same text are both kept.
    #[test]
    fn keys_masked_alike_are_kept_apart() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let mut record = Record::default();
        record.fields.insert("kim@a.com".to_owned(), "1".to_owned());
        record.fields.insert("lee@b.com".to_owned(), "2".to_owned());
        let mut counts = vec![0; masker.len()];
        masker.record(&mut record, &mut counts, usize::MAX);
        assert_eq!(
            record.fields.into_iter().collect::<Vec<_>>(),
            [
                ("<email>".to_owned(), "1".to_owned()),
                ("<email>_2".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(counts, [2, 0]);
    }

    #[test]
    fn korean_mobile_numbers_are_masked_but_not_other_numbers() {
        for phone in [
            "010-1234-5678",
            "010 1234 5678",
            "01012345678",
            "010.1234.5678",
            "011-123-4567",
            "016-123-4567",
            "017-1234-5678",
            "018 123 4567",
            "019.1234.5678",
            "+82 10-1234-5678",
            "+82-10-1234-5678",
            "+821012345678",
            // The 0 kept after the country code.
            "+8201012345678",
            "+82-010-1234-5678",
            "+82 (0)10-1234-5678",
            // `+` URL-encoded (query strings) or left out (SMS gateways).
            "%2B821012345678",
            "%2b82-10-1234-5678",
            "%2B8201012345678",
            "821012345678",
            "82-10-1234-5678",
            "82 10 1234 5678",
            // The area code in parentheses.
            "(010)1234-5678",
            "(010) 1234-5678",
            "(011)123-4567",
            // The country code in parentheses.
            "(+82) 10-1234-5678",
            "(+82)10-1234-5678",
            "(+82) 010-1234-5678",
            "(%2B82)1012345678",
            // Hyphens with spaces around them.
            "010 - 1234 - 5678",
            "010- 1234 -5678",
            // Full-width digits and hyphens (Korean input methods), or some of them.
            "０１０－１２３４－５６７８",
            "０１０１２３４５６７８",
            "010－1234－5678",
            "０１０-1234-5678",
            "０１０\u{3000}１２３４\u{3000}５６７８",
            "（０１０）１２３４－５６７８",
            // The country code with those separators, or full-width.
            "+82 - 10 - 1234 - 5678",
            "+82－１０－１２３４－５６７８",
            "(+82)－10－1234－5678",
            "＋８２ １０－１２３４－５６７８",
            "＋82-10-1234-5678",
            "（＋８２）１０１２３４５６７８",
            "＋８２（０）１０－１２３４－５６７８",
            "+82 （０） １０－１２３４－５６７８",
            // A no-break space or a tab (pasted from a web page, a spreadsheet), a dot and a
            // space, a word processor's dashes, the vowel ㅡ typed for a hyphen.
            "010\u{a0}1234\u{a0}5678",
            "+82\u{a0}10\u{a0}1234\u{a0}5678",
            "010\t1234\t5678",
            // A tab as JSON writes it (a JSON line without a message is shipped as it came).
            r"010\t1234\t5678",
            "010. 1234. 5678",
            "010‐1234‐5678",
            "010–1234–5678",
            "010 – 1234 – 5678",
            "010−1234−5678",
            "010ㅡ1234ㅡ5678",
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
            "at 20241028123456",
            // A bare `82` in longer numbers, EAN-13 codes (`8201…` too) and decimals.
            "order 1821012345678",
            "order 8210123456789",
            "t=1821012345678",
            "ean 8801012345678",
            "ean 8201012345678",
            "id 821012345",
            "took 82.1012345678 s",
            "cart 82 recalculated in 1012 ms",
            "+821012345678901",
            // Sums and query strings of other numbers; a number running on past a phone's
            // length, after a separator a query string encoded.
            "q=1+2+3&n=0100",
            "total=10+1234+5678",
            "page=%20010%2012",
            "n=010+1234+56789",
            "n=010%201234%2056789",
            // A digit before, not an escape's.
            "n=%G2010-1234-5678",
            "n=7010-1234-5678",
            // Full-width digits running on, or before.
            "０１０１２３４５６７８９",
            "７０１０１２３４５６７８",
            "01012345678９",
            // Running on past a phone's length, with the other separators.
            "n=010–1234–56789",
            "n=010\u{a0}1234\u{a0}56789",
        ] {
            assert_eq!(masked(not), (not.to_owned(), vec![0, 0]), "{not}");
        }
    }

    /// Where gateways and access logs write numbers: the quotes and parameters around them
    /// are kept.
    #[test]
    fn numbers_in_json_and_query_strings_are_masked() {
        for (text, want) in [
            (
                r#"{"to":"821012345678","text":"인증번호"}"#,
                r#"{"to":"<phone>","text":"인증번호"}"#,
            ),
            (
                "GET /sms/send?phone=%2B821012345678&lang=ko 200",
                "GET /sms/send?phone=<phone>&lang=ko 200",
            ),
            ("고객821012345678님", "고객<phone>님"),
            // A space in a query string is `+` or `%20`.
            (
                "GET /ko/search?text=010+1234+5678&page=1 200",
                "GET /ko/search?text=<phone>&page=1 200",
            ),
            (
                "GET /ko/orders/guest?phone=010%201234%205678 200",
                "GET /ko/orders/guest?phone=<phone> 200",
            ),
            (
                "GET /sms?to=%2B82%2010%201234%205678 200",
                "GET /sms?to=<phone> 200",
            ),
            (
                "GET /sms?to=%2B82+10+1234+5678 200",
                "GET /sms?to=<phone> 200",
            ),
            ("GET /sms?to=82+10+1234+5678 200", "GET /sms?to=<phone> 200"),
            (
                "GET /sms?to=82%2010%201234%205678 200",
                "GET /sms?to=<phone> 200",
            ),
            // After an escape ending in a digit: a name and an encoded space, JSON's quotes.
            (
                "GET /search?q=%ED%99%8D%EA%B8%B8%EB%8F%99%20010%201234%205678 200",
                "GET /search?q=%ED%99%8D%EA%B8%B8%EB%8F%99%20<phone> 200",
            ),
            (
                "GET /orders?filter=%7B%22phone%22%3A%22010-1234-5678%22%7D 200",
                "GET /orders?filter=%7B%22phone%22%3A%22<phone>%22%7D 200",
            ),
            // Encoded twice (a redirect's encoded query), and right at the start.
            (
                "GET /login?next=%2Forders%3Fq%3D%2522010-1234-5678%2522 302",
                "GET /login?next=%2Forders%3Fq%3D%2522<phone>%2522 302",
            ),
            ("%20010-1234-5678", "%20<phone>"),
        ] {
            assert_eq!(masked(text), (want.to_owned(), vec![0, 1]), "{text}");
        }
    }

    #[test]
    fn numbers_next_to_hangul_and_letters_are_masked_and_lists_of_them_too() {
        for (text, want) in [
            ("고객01012345678님", "고객<phone>님"),
            ("010-1234-5678로 발송", "<phone>로 발송"),
            ("tel_01012345678", "tel_<phone>"),
            ("010-1234-5678,010-2222-3333", "<phone>,<phone>"),
            // Hex ids that happen to hold a mobile number's digits stay as they are.
            ("session 3F0107435786BCAA", "session 3F0107435786BCAA"),
            ("span_id=3f01012345678bca", "span_id=3f01012345678bca"),
            (
                "trace 4bf92f3577b34da6a01012345678e4736",
                "trace 4bf92f3577b34da6a01012345678e4736",
            ),
            // At an id's start or end.
            ("session 01116450459DB735", "session 01116450459DB735"),
            ("session 1869FD0112714356", "session 1869FD0112714356"),
            // In a UUID's last group.
            (
                "request 123e4567-e89b-12d3-a456-a01012345678 done",
                "request 123e4567-e89b-12d3-a456-a01012345678 done",
            ),
            (
                "123e4567-e89b-12d3-a456-a01012345678",
                "123e4567-e89b-12d3-a456-a01012345678",
            ),
            // Glued to a letter, or a group too long: no UUID.
            (
                "x123e4567-e89b-12d3-a456-a01012345678",
                "x123e4567-e89b-12d3-a456-a<phone>",
            ),
            (
                "123e4567-e89b-12d3-a456-ba01012345678",
                "123e4567-e89b-12d3-a456-ba<phone>",
            ),
            // Beside hex letters, but no id of 16, or beside other letters: masked.
            ("ab01012345678cd", "ab<phone>cd"),
            ("Called01012345678Added", "Called<phone>Added"),
            ("cafe01012345678", "cafe<phone>"),
            ("id=ABCDEF", "id=ABCDEF"),
        ] {
            assert_eq!(masked(text).0, want, "{text}");
        }
    }

    /// A number ending in `010`, `011` or `016` to `019` just before a phone: the match the
    /// regular expression finds first starts inside that number (`010 010-1234` in `2010
    /// 010-1234-5678`) and is refused; the phone after it is still found.
    #[test]
    fn a_phone_right_after_a_number_ending_like_a_mobile_prefix_is_masked() {
        for (text, want) in [
            ("tel 02-555-2010 010-1234-5678", "tel 02-555-2010 <phone>"),
            ("since 2018 01012345678", "since 2018 <phone>"),
            ("order 20241028010 01012345678", "order 20241028010 <phone>"),
            ("12:00:01.019 010-1234-5678", "12:00:01.019 <phone>"),
            ("12:00:01.019 010 - 1234 - 5678", "12:00:01.019 <phone>"),
            ("12:00:01.019 010－1234－5678", "12:00:01.019 <phone>"),
            (
                "12:00:01.019 010\u{3000}1234\u{3000}5678",
                "12:00:01.019 <phone>",
            ),
            ("n=2017+010+1234+5678", "n=2017+<phone>"),
            ("ref 7011-016-123-4567 ok", "ref 7011-<phone> ok"),
        ] {
            assert_eq!(masked(text), (want.to_owned(), vec![0, 1]), "{text}");
        }
        // Two phones after such numbers, and a longer number still left alone.
        assert_eq!(
            masked("2010 010-1234-5678 2019 019-123-4567 order 0101012345678"),
            (
                "2010 <phone> 2019 <phone> order 0101012345678".to_owned(),
                vec![0, 2]
            )
        );
    }

    /// A configured pattern that can match nothing still ends.
    #[test]
    fn a_pattern_that_can_match_the_empty_text_ends() {
        let masker = Masker::new(&[masker_settings()]).expect("compiles");
        let (mut text, mut counts) = ("a1 é22".to_owned(), vec![0]);
        masker.text(&mut text, &mut counts);
        assert!(counts[0] >= 2, "{text} {counts:?}");
        assert!(!text.contains(char::is_numeric), "{text}");
        // As `replace_all` has it: one match before `a`, none right after a match; an
        // empty match at the start is replaced too.
        let masker = Masker::new(&[PatternSettings {
            digit_bounded: false,
            ..masker_settings()
        }])
        .expect("compiles");
        let regex = regex::Regex::new("[0-9]*").expect("compiles");
        for (text, want) in [("12a", "#a#"), ("a", "#a#"), ("1a22", "#a#")] {
            let (mut masked, mut counts) = (text.to_owned(), vec![0]);
            masker.text(&mut masked, &mut counts);
            assert_eq!(masked, regex.replace_all(text, "#"), "{text}");
            assert_eq!(masked, want, "{text}");
        }
    }

    fn masker_settings() -> PatternSettings {
        PatternSettings {
            name: "digits".to_owned(),
            regex: "[0-9]*".to_owned(),
            replacement: "#".to_owned(),
            requires: Vec::new(),
            digit_bounded: true,
        }
    }

    #[test]
    fn every_text_of_a_record_is_masked_field_keys_too() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        let mut record = Record {
            message: "user a@b.com".to_owned(),
            stack_trace: "java.lang.IllegalStateException: no user c@d.org".to_owned(),
            logger: "a.B kim@x.com".to_owned(),
            thread: "010-1234-5678".to_owned(),
            fields: [
                ("phone".to_owned(), "010-9999-8888".to_owned()),
                ("e@mail.com".to_owned(), "bounced".to_owned()),
            ]
            .into(),
            ..Record::default()
        };
        let mut counts = vec![0; 2];
        masker.record(&mut record, &mut counts, usize::MAX);
        assert_eq!(record.message, "user <email>");
        assert_eq!(
            record.stack_trace,
            "java.lang.IllegalStateException: no user <email>"
        );
        assert_eq!(record.fields["phone"], "<phone>");
        assert_eq!(record.logger, "a.B <email>");
        assert_eq!(record.thread, "<phone>");
        assert_eq!(record.fields["<email>"], "bounced");
        assert_eq!(counts, vec![4, 2]);
    }

    #[test]
    fn the_prefilter_finds_literals_inside_and_across_each_other() {
        let masker = Masker::new(&default_patterns()).expect("defaults compile");
        // `%40` and `01` share the `0`.
        assert_eq!(masker.candidates("%4010-1234-5678"), 0b11);
        assert_eq!(masker.candidates("a@b.kr +8210"), 0b11);
        assert_eq!(masker.candidates("cart 8812 recalculated"), 0);
        assert_eq!(masker.candidates("at 10:01"), 0b10);
        // The other at-signs; a bare `82` only with a `1` after it.
        assert_eq!(masker.candidates("kim\u{ff20}naver.com"), 0b01);
        assert_eq!(masker.candidates("kim%2540example.com"), 0b01);
        assert_eq!(masker.candidates("to 821712345678"), 0b10);
        assert_eq!(masker.candidates("to 82-10-1234-5678"), 0b10);
        assert_eq!(masker.candidates("to 82 10 1234 5678"), 0b10);
        assert_eq!(masker.candidates("?phone=%2b82(0)10"), 0b10);
        assert_eq!(masker.candidates("cart 82 in 1.82 ms"), 0);
    }

    proptest::proptest! {
        /// The prefilter says what searching for each literal on its own says, with
        /// literals of one byte and more that are prefixes of, inside and across each other.
        #[test]
        fn the_prefilter_agrees_with_a_search_per_literal(text in "[@%40182+a5\\-\u{ff20}]{0,90}") {
            let mut patterns = default_patterns();
            for (name, requires) in [
                ("zero", vec!["0"]),
                ("tail", vec!["40", "1+"]),
                ("empty", vec!["", "a"]),
                ("prefixes", vec!["18", "182"]),
                ("bytes", vec!["+", "a@", "@a", "@"]),
                // Prefixes of another pattern's literals, listed after it and before it.
                ("shorter", vec!["82"]),
                ("longer", vec!["184"]),
                ("none", vec![]),
            ] {
                patterns.push(PatternSettings {
                    name: name.to_owned(),
                    regex: "x".to_owned(),
                    replacement: String::new(),
                    requires: requires.into_iter().map(str::to_owned).collect(),
                    digit_bounded: false,
                });
            }
            let naive = |patterns: &[PatternSettings]| patterns.iter().enumerate().fold(0_u64, |bits, (i, p)| {
                if p.requires.is_empty() || p.requires.iter().any(|r| text.contains(r.as_str())) {
                    bits | 1 << i
                } else {
                    bits
                }
            });
            let masker = Masker::new(&patterns).expect("compiles");
            proptest::prop_assert_eq!(masker.candidates(&text), naive(&patterns));
            // Only literals of one byte or none (no automaton).
            let patterns: Vec<_> = patterns
                .into_iter()
                .filter(|p| p.requires.iter().all(|r| r.len() <= 1))
                .collect();
            proptest::prop_assert_eq!(patterns.len(), 3);
            let masker = Masker::new(&patterns).expect("compiles");
            proptest::prop_assert_eq!(masker.candidates(&text), naive(&patterns));
        }
    }

    #[test]
    fn patterns_without_literals_always_run_those_past_the_prefilter_check_their_own_and_replacements_are_judged_again()
     {
        let pattern =
            |name: &str, regex: &str, replacement: &str, requires: &[&str]| PatternSettings {
                name: name.to_owned(),
                regex: regex.to_owned(),
                replacement: replacement.to_owned(),
                requires: requires.iter().map(|r| (*r).to_owned()).collect(),
                digit_bounded: false,
            };
        // The first pattern's replacement holds the second's literal, which the text did
        // not: the second still runs on what the first made.
        let mut patterns = vec![
            pattern("secret", "s3cr3t", "[token]", &["s3cr3t"]),
            pattern("token", r"\[token\]", "<redacted>", &["[token]"]),
        ];
        // Past the 64 the prefilter covers: each checks its own literals.
        for i in 0..PREFILTERED {
            patterns.push(pattern(&format!("p{i}"), "never-matches-zzz", "", &["zzz"]));
        }
        patterns.push(pattern("absent", "kept", "gone", &["absent"]));
        patterns.push(pattern("present", "kept", "held", &["ep"]));
        patterns.push(pattern("bare", "plain", "PLAIN", &[]));
        let masker = Masker::new(&patterns).expect("compiles");
        let mut text = "s3cr3t kept plain".to_owned();
        let mut counts = vec![0; masker.len()];
        masker.text(&mut text, &mut counts);
        assert_eq!(text, "<redacted> held PLAIN");
        assert_eq!((counts[0], counts[1]), (1, 1));
        assert_eq!(counts[counts.len() - 3..], [0, 1, 1]);
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
