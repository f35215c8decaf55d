//! Multi-line grouping: a record starts at a line its parser recognises as a start; every
//! line after it that is not a start joins it (stack trace lines to `stack_trace`, others
//! to `message`), so a Java stack trace stays whole in one record.
//!
//! One [`Grouper`] per stream (a source and host, or file): its state outlives chunks and
//! connections, so a trace split across them is still one record. The record in progress
//! is complete when the next start arrives, or when its stream has been quiet for a while
//! (the caller calls [`Grouper::flush`]). A record is capped in lines and bytes: one that
//! reaches a cap is complete, and the line that did not fit starts the next record (without
//! a header), so a runaway trace or a stream of lines no parser recognises cannot exhaust
//! memory, exceed what Loki takes for one line, or lose a line. Only a single line longer
//! than the byte cap is cut (the cut is counted in `truncated_bytes`).

use crate::{
    parse::{Line, Parser},
    record::Record,
};

/// Caps on one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most lines kept in one record.
    pub lines: usize,
    /// Most bytes of text (message and stack trace) kept in one record.
    pub bytes: usize,
}

/// The record in progress of one stream.
#[derive(Debug, Default)]
pub struct Grouper {
    pending: Option<Record>,
}

impl Grouper {
    /// Feeds one line at `index`: a record it completes goes to `out`.
    pub fn push(
        &mut self,
        parser: &Parser,
        caps: Caps,
        line: &str,
        index: usize,
        out: &mut Vec<Record>,
    ) {
        let plain;
        let line = if line.contains('\x1b') {
            plain = without_escapes(line);
            plain.as_str()
        } else {
            line
        };
        match parser.line(line, index) {
            Line::Start(mut record) => {
                cap_first(&mut record, caps);
                out.extend(self.pending.replace(record));
            }
            Line::Continue {
                text,
                stack,
                unparsed,
            } => match &mut self.pending {
                // Inside one printed trace only frames, `Caused by:`, `Suppressed:` and
                // `... N more` follow a frame: an exception line there is another trace
                // (`printStackTrace()` without a header), a record of its own, so each
                // exception is counted by its class.
                Some(record)
                    if fits(record, caps, text)
                        && !(stack && ends_a_trace(record) && starts_a_trace(text)) =>
                {
                    join(record, text, stack);
                    record.parse_error |= unparsed;
                }
                _ => {
                    // Nothing to join (a stream that began mid-trace, a trace that went
                    // quiet longer than the flush delay, another trace), or the record is
                    // full: a record without a header. The rest of a full record keeps what
                    // its header said (level, logger, thread, trace id, time), so a query
                    // for the ERROR finds this part of its trace too.
                    let previous = self.pending.take();
                    let mut record = Record::raw(text, index);
                    record.parse_error = unparsed;
                    let mut to_stack = stack;
                    if let Some(full) = previous.as_ref().filter(|r| !fits(r, caps, text)) {
                        record.level = full.level;
                        // A microsecond after it, so the rest sorts after the head in its
                        // stream (below the microsecond is the tie-breaker, in no order).
                        record.time_micros = full.time_micros.map(|t| t + 1);
                        record.logger.clone_from(&full.logger);
                        record.thread.clone_from(&full.thread);
                        record.trace_id.clone_from(&full.trace_id);
                        to_stack |= !full.stack_trace.is_empty();
                    }
                    out.extend(previous);
                    if to_stack {
                        record.stack_trace = std::mem::take(&mut record.message);
                    }
                    cap_first(&mut record, caps);
                    self.pending = Some(record);
                }
            },
        }
    }

    /// The record in progress, now complete (the stream went quiet, or its input ended).
    pub fn flush(&mut self) -> Option<Record> {
        self.pending.take()
    }

    /// Whether a record is in progress.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Bytes of text of the record in progress (0 without one).
    pub fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, Record::text_len)
    }

    /// The first line of the record in progress, if any.
    pub fn pending_first_line(&self) -> Option<usize> {
        self.pending.as_ref().map(|r| r.first_line)
    }
}

/// `line` without terminal escape sequences: Hybris colours its console (`ESC[0;32mINFO`),
/// and a colour code before the level hides the header, which would join every line of a
/// coloured log into one record. CSI sequences (`ESC [` parameters, intermediates, a final
/// byte), OSC strings (`ESC ]` to BEL or `ESC \`) and other escapes (`ESC ( B`) go;
/// everything else, tabs included, stays.
///
/// Written here: `strip-ansi-escapes` also drops tabs and carriage returns (it keeps only
/// printable characters and line feeds), and a frame's leading tab is what makes it one.
pub fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('\x1b') {
        out.push_str(&rest[..at]);
        let after = &rest.as_bytes()[at + 1..];
        let skip = match after.first() {
            Some(b'[') => {
                // Parameters and intermediates, then one final byte.
                let body = after[1..]
                    .iter()
                    .take_while(|b| (0x20..=0x3f).contains(*b))
                    .count();
                let final_byte = usize::from(
                    after
                        .get(1 + body)
                        .is_some_and(|b| (0x40..=0x7e).contains(b)),
                );
                1 + body + final_byte
            }
            Some(b']') => {
                let end = after[1..]
                    .iter()
                    .enumerate()
                    .find_map(|(i, b)| match b {
                        0x07 => Some(i + 1),
                        0x1b if after.get(i + 2) == Some(&b'\\') => Some(i + 2),
                        _ => None,
                    })
                    .unwrap_or(after.len() - 1);
                1 + end
            }
            // Others: intermediates, then one final byte (`ESC ( B`, `ESC 7`).
            _ => {
                let body = after
                    .iter()
                    .take_while(|b| (0x20..=0x2f).contains(*b))
                    .count();
                body + usize::from(after.get(body).is_some_and(|b| (0x30..=0x7e).contains(b)))
            }
        };
        // Never inside a character: every byte skipped is ASCII.
        rest = &rest[at + 1 + skip..];
    }
    out.push_str(rest);
    out
}

/// Whether `record`'s stack trace ends with a frame or `... N more`.
fn ends_a_trace(record: &Record) -> bool {
    let last = record
        .stack_trace
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .trim_start();
    last.starts_with("at ") || last.starts_with("... ")
}

/// Whether `text` is the first line of a printed trace: an exception line (not `Caused
/// by:` or `Suppressed:`, which continue one).
fn starts_a_trace(text: &str) -> bool {
    crate::parse::is_exception_line(text.trim_start())
}

/// Whether one more line of `text` keeps `record` within the caps.
fn fits(record: &Record, caps: Caps, text: &str) -> bool {
    record.line_count < caps.lines && record.text_len() + text.len() < caps.bytes
}

/// Appends a continuation line to `record`: to the stack trace when it is stack trace or
/// follows stack trace (a `Detail:` line of a database error, a thread dump's `- locked`
/// lines: read in the order written), else to the message (as the contract says).
fn join(record: &mut Record, text: &str, stack: bool) {
    record.line_count += 1;
    let to = if stack || !record.stack_trace.is_empty() {
        &mut record.stack_trace
    } else {
        &mut record.message
    };
    if !to.is_empty() {
        to.push('\n');
    }
    to.push_str(text);
}

/// Cuts a record's message and stack trace to the byte cap (at a character boundary, and
/// before a word the cap falls in), counting what was cut.
///
/// Masking runs later, on what is kept: cut inside an address or a phone number
/// (`kim@example.c`, `010-1234-5`), what is left would no longer match its pattern and
/// would leave unmasked. So a word the cap falls in is dropped whole when it is short
/// enough to be an address or a number ([`before_word`]).
///
/// The cap holds for both together, as Loki's line has them (the message, a line break,
/// the stack trace): a JSON line can carry each of them near the cap.
pub fn cap_first(record: &mut Record, caps: Caps) {
    record.truncated_bytes += cut(&mut record.message, caps.bytes);
    if !record.stack_trace.is_empty() {
        let room = caps.bytes.saturating_sub(record.message.len() + 1);
        record.truncated_bytes += cut(&mut record.stack_trace, room);
    }
}

/// Cuts `text` to at most `bytes` (before the word the cut falls in); what was cut.
fn cut(text: &mut String, bytes: usize) -> usize {
    if text.len() <= bytes {
        return 0;
    }
    let at = before_word(text, text.floor_char_boundary(bytes));
    let cut = text.len() - at;
    text.truncate(at);
    cut
}

/// Bytes a cut moves back at most to drop the word it falls in: longer than any e-mail
/// address (254) or phone number.
const WORD_BACKOFF: usize = 320;

/// `cut` (a character boundary), or where the word it falls in starts, when that is within
/// [`WORD_BACKOFF`] bytes. A word is what the default patterns match: ASCII letters and
/// digits, `._%+-@`, any non-ASCII character (addresses in every script), and a space,
/// `.` or `-` between two digits (`010 1234 5678`). A cut is inside a word when the text
/// goes on with one of its characters there.
fn before_word(text: &str, cut: usize) -> usize {
    let bytes = text.as_bytes();
    let word = |b: u8| b >= 0x80 || b.is_ascii_alphanumeric() || b"._%+-@".contains(&b);
    let separator = |b: u8| matches!(b, b' ' | b'.' | b'-');
    let digit = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_digit);
    // Byte `at` belongs to the word around it.
    let joins = |at: usize| {
        word(bytes[at]) || (separator(bytes[at]) && at > 0 && digit(at - 1) && digit(at + 1))
    };
    if cut == 0 || cut >= bytes.len() || !joins(cut) || !joins(cut - 1) {
        return cut;
    }
    let floor = cut.saturating_sub(WORD_BACKOFF);
    let mut start = cut;
    while start > floor && joins(start - 1) {
        start -= 1;
    }
    if start > floor || start == 0 {
        // Where the word starts: at a character boundary (a non-ASCII character is walked
        // over whole, every byte of it joins).
        start
    } else {
        // A run longer than any address or number.
        cut
    }
}

/// Groups `lines` as one stream and completes the last record: what TestParse returns.
pub fn group_all<'a>(
    parser: &Parser,
    caps: Caps,
    lines: impl IntoIterator<Item = &'a str>,
) -> Vec<Record> {
    let mut grouper = Grouper::default();
    let mut out = Vec::new();
    for (index, line) in lines.into_iter().enumerate() {
        grouper.push(parser, caps, line, index, &mut out);
    }
    out.extend(grouper.flush());
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::parse::Format;

    const CAPS: Caps = Caps {
        lines: 1_000,
        bytes: 256 * 1024,
    };

    fn parser() -> Parser {
        Parser::new(Format::Wrapper, chrono_tz::Asia::Seoul)
    }

    const P: &str = "INFO   | jvm 1    | main    | 2024/10/28 17:12:00.040 | ";

    #[test]
    fn a_header_and_its_wrapper_prefixed_trace_are_one_record() {
        let lines = [
            format!("{P}ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed"),
            format!("{P}java.lang.IllegalStateException: Cart 8812 is in an inconsistent state"),
            format!(
                "{P}\tat de.hybris.platform.order.impl.DefaultCalculationService.recalculate(DefaultCalculationService.java:120)"
            ),
            format!("{P}Caused by: java.io.IOException: Broken pipe"),
            format!("{P}\tat java.lang.Thread.run(Thread.java:840)"),
            format!("{P}\t... 12 more"),
            format!("{P}INFO  [main] [X] next"),
        ];
        let records = group_all(&parser(), CAPS, lines.iter().map(String::as_str));
        assert_eq!(records.len(), 2);
        let first = &records[0];
        assert_eq!(first.message, "cart 8812 failed");
        assert_eq!(
            first.stack_trace,
            "java.lang.IllegalStateException: Cart 8812 is in an inconsistent state\n\
             \tat de.hybris.platform.order.impl.DefaultCalculationService.recalculate(DefaultCalculationService.java:120)\n\
             Caused by: java.io.IOException: Broken pipe\n\
             \tat java.lang.Thread.run(Thread.java:840)\n\
             \t... 12 more"
        );
        assert_eq!((first.first_line, first.line_count), (0, 6));
        assert_eq!((records[1].first_line, records[1].line_count), (6, 1));
    }

    #[test]
    fn colour_codes_do_not_hide_headers_and_tabs_stay() {
        assert_eq!(without_escapes("plain\tline"), "plain\tline");
        assert_eq!(
            without_escapes("\x1b[m\x1b[0;32mINFO\x1b[0m x \x1b]0;title\x07y \x1b(Bz\x1b"),
            "INFO x y z"
        );
        assert_eq!(without_escapes("주문 \x1b[1;31m실패\x1b[m"), "주문 실패");
        let lines = [
            format!(
                "{P}\x1b[m\x1b[0;31mERROR [hybrisHTTP12] [DefaultCartService] cart failed\x1b[m"
            ),
            format!("{P}\tat a.B.c(B.java:1)"),
            format!("\x1b[;0;33m{P}\x1b[m\x1b[0;32mINFO  [main] [X] next\x1b[m"),
        ];
        let records = group_all(&parser(), CAPS, lines.iter().map(String::as_str));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].level, Some(crate::record::Level::Error));
        assert_eq!(records[0].message, "cart failed");
        assert_eq!(records[0].stack_trace, "\tat a.B.c(B.java:1)");
        assert_eq!(records[1].message, "next");
    }

    #[test]
    fn uncaught_exceptions_and_a_second_trace_are_records_of_their_own() {
        let lines = [
            format!("{P}INFO  [main] [X] started"),
            format!(
                "{P}Exception in thread \"hybrisHTTP5\" java.lang.OutOfMemoryError: Java heap space"
            ),
            format!("{P}\tat a.B.c(B.java:1)"),
            // `printStackTrace()` of another exception, no header: another trace.
            "java.lang.NullPointerException".to_owned(),
            "\tat a.B.d(B.java:2)".to_owned(),
            // A database error's detail after the frames: read in the order written.
            "  Detail: Key (id)=(1) already exists.".to_owned(),
        ];
        let records = group_all(&parser(), CAPS, lines.iter().map(String::as_str));
        let got: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.level,
                    r.thread.as_str(),
                    r.message.as_str(),
                    r.stack_trace.as_str(),
                )
            })
            .collect();
        use crate::record::Level;
        assert_eq!(
            got,
            [
                (Some(Level::Info), "main", "started", ""),
                (
                    Some(Level::Error),
                    "hybrisHTTP5",
                    "",
                    "Exception in thread \"hybrisHTTP5\" java.lang.OutOfMemoryError: Java heap space\n\tat a.B.c(B.java:1)"
                ),
                (
                    None,
                    "",
                    "",
                    "java.lang.NullPointerException\n\tat a.B.d(B.java:2)\n  Detail: Key (id)=(1) already exists."
                ),
            ]
        );
        assert!(records[1].time_micros.is_some(), "the wrapper's time");
        // A `Caused by:` after frames continues the trace.
        let lines = ["\tat a.B.c(B.java:1)", "Caused by: java.io.IOException: x"];
        assert_eq!(group_all(&parser(), CAPS, lines).len(), 1);
    }

    #[test]
    fn the_rest_of_a_full_record_keeps_what_its_header_said() {
        let caps = Caps {
            lines: 3,
            bytes: 10_000,
        };
        let lines = [
            format!(
                "{P}ERROR [hybrisHTTP12] [DefaultCartService] {{traceId=4bf92f3577b34da6a3ce929d0e0e4736}} cart failed"
            ),
            format!("{P}java.lang.IllegalStateException: broken"),
            format!("{P}\tat a.B.c(B.java:1)"),
            format!("{P}\tat a.B.d(B.java:2)"),
            "after the trace".to_owned(),
        ];
        let records = group_all(&parser(), caps, lines.iter().map(String::as_str));
        assert_eq!(records.len(), 2);
        let (head, rest) = (&records[0], &records[1]);
        assert_eq!(rest.level, Some(crate::record::Level::Error));
        assert_eq!(
            (
                rest.logger.as_str(),
                rest.thread.as_str(),
                rest.trace_id.as_str()
            ),
            (
                "DefaultCartService",
                "hybrisHTTP12",
                "4bf92f3577b34da6a3ce929d0e0e4736"
            )
        );
        assert_eq!(rest.time_micros, head.time_micros.map(|t| t + 1));
        assert_eq!(rest.message, "");
        assert_eq!(rest.stack_trace, "\tat a.B.d(B.java:2)\nafter the trace");
        assert!(!rest.parse_error);
        // A stream that begins mid-trace has nothing to inherit.
        let records = group_all(&parser(), caps, ["\tat a.B.c(B.java:1)"]);
        assert_eq!(records[0].level, None);
    }

    #[test]
    fn text_that_is_not_trace_joins_the_message() {
        let lines = [
            format!("{P}INFO  [main] [X] first"),
            format!("{P}second line"),
        ];
        let records = group_all(&parser(), CAPS, lines.iter().map(String::as_str));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].message, "first\nsecond line");
        assert_eq!(records[0].stack_trace, "");
    }

    #[test]
    fn a_stream_that_begins_mid_trace_keeps_those_lines_as_a_record() {
        let lines = ["\tat a.B.c(B.java:1)", "\tat a.B.d(B.java:2)"];
        let records = group_all(&parser(), CAPS, lines);
        assert_eq!(records.len(), 1);
        assert_eq!(
            records[0].stack_trace,
            "\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)"
        );
        assert_eq!(records[0].line_count, 2);
    }

    #[test]
    fn a_record_at_its_caps_is_complete_and_the_next_line_starts_another() {
        let caps = Caps {
            lines: 3,
            bytes: 1_000,
        };
        let mut lines = vec![format!("{P}ERROR [main] [X] boom")];
        lines.extend((0..10).map(|i| format!("\tat a.B.c{i}(B.java:1)")));
        let records = group_all(&parser(), caps, lines.iter().map(String::as_str));
        let counts: Vec<usize> = records.iter().map(|r| r.line_count).collect();
        assert_eq!(
            counts,
            [3, 3, 3, 2],
            "every line kept, in records of at most 3"
        );
        assert_eq!(
            records[1].stack_trace.lines().next(),
            Some("\tat a.B.c2(B.java:1)")
        );
        let small = Caps {
            lines: 100,
            bytes: 30,
        };
        let records = group_all(&parser(), small, lines.iter().map(String::as_str));
        assert_eq!(records.iter().map(|r| r.line_count).sum::<usize>(), 11);
        assert!(records.iter().all(|r| r.text_len() <= 30));
        // One line longer than the cap is cut, and says so.
        let long = format!("{P}ERROR [main] [X] {}", "y ".repeat(50));
        let records = group_all(&parser(), small, [long.as_str()]);
        assert_eq!(
            (records[0].text_len(), records[0].truncated_bytes),
            (30, 70)
        );
    }

    /// A record whose message and stack trace each come near the cap in one line (a JSON
    /// line) is held to the cap as a whole, as Loki's line has it.
    #[test]
    fn a_first_lines_message_and_stack_trace_share_the_cap() {
        let caps = Caps {
            lines: 10,
            bytes: 192,
        };
        let mut record = Record {
            message: "m ".repeat(50),
            stack_trace: "s ".repeat(90),
            ..Record::default()
        };
        cap_first(&mut record, caps);
        assert_eq!(
            record.message.len(),
            100,
            "the message within the cap is kept"
        );
        assert!(record.text_len() <= 192, "{}", record.text_len());
        assert_eq!(record.truncated_bytes, 280 - 100 - record.stack_trace.len());
        // A message at the cap leaves no room for the stack trace.
        let mut record = Record {
            message: "m ".repeat(150),
            stack_trace: "s ".repeat(5),
            ..Record::default()
        };
        cap_first(&mut record, caps);
        assert_eq!((record.message.len(), record.stack_trace.len()), (192, 0));
        assert_eq!(record.truncated_bytes, 118);
    }

    #[test]
    fn a_cut_never_leaves_part_of_an_address_or_a_number() {
        let caps = Caps {
            lines: 10,
            bytes: 28,
        };
        // The cap falls inside the address: it is dropped whole, the space before it kept.
        let line = format!("{P}WARN  [main] [X] order 8812 for kim.lee@example.com failed");
        let records = group_all(&parser(), caps, [line.as_str()]);
        assert_eq!(records[0].message, "order 8812 for ");
        assert_eq!(
            records[0].truncated_bytes,
            "kim.lee@example.com failed".len()
        );
        // A cut between words, or at a character that is not a word's, stays where it is.
        assert_eq!(before_word("ab cd", 2), 2);
        assert_eq!(before_word("ab cd", 3), 3);
        assert_eq!(before_word("ab(cd", 4), 3);
        assert_eq!(before_word("ab(cd", 2), 2);
        // A phone number cut anywhere goes whole, its separators included.
        let call = "call 010-1234-5678 now";
        for cut in 6..18 {
            assert_eq!(before_word(call, cut), 5, "cut at {cut}");
        }
        let spaced = "call 010 1234 5678 now";
        for cut in 6..18 {
            assert_eq!(before_word(spaced, cut), 5, "cut at {cut}");
        }
        assert_eq!(before_word(spaced, 18), 18, "after the number");
        // An address in another script, cut inside a character's neighbour.
        let korean = "주문 홍길동@회사.kr 실패";
        let cut = korean.find("사").expect("there");
        assert_eq!(before_word(korean, cut), korean.find("홍").expect("there"));
        // A word from the text's start, shorter than the back-off: nothing of it kept.
        assert_eq!(before_word("kim@example.com", 6), 0);
        // A run longer than any address or number: cut where the cap is.
        let run = "y".repeat(WORD_BACKOFF + 10);
        assert_eq!(before_word(&run, WORD_BACKOFF + 5), WORD_BACKOFF + 5);
    }

    /// What a generated line is, as the test knows it (not as the parser decides).
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        Header,
        /// An exception line: the first line of a printed trace.
        Exception,
        Stack,
        Text,
    }

    /// Lines of the legacy format with what each is: headers, trace lines with and
    /// without the wrapper's prefix, plain continuation text (with and without it).
    fn line() -> impl Strategy<Value = (String, Kind, String)> {
        // (line, kind, the text the record keeps of it)
        prop_oneof![
            4 => (0_u32..5).prop_map(|n| (format!("{P}INFO  [t{n}] [L] message {n}"), Kind::Header, format!("message {n}"))),
            1 => Just((format!("{P}ERROR [main] [DefaultCartService] failed"), Kind::Header, "failed".to_owned())),
            2 => Just(("java.lang.IllegalStateException: broken".to_owned(), Kind::Exception, "java.lang.IllegalStateException: broken".to_owned())),
            3 => (0_u32..50).prop_map(|n| (format!("{P}\tat a.B.c(B.java:{n})"), Kind::Stack, format!("\tat a.B.c(B.java:{n})"))),
            2 => (0_u32..50).prop_map(|n| (format!("\tat a.B.d(B.java:{n})"), Kind::Stack, format!("\tat a.B.d(B.java:{n})"))),
            1 => Just((format!("{P}Caused by: java.io.IOException: x"), Kind::Stack, "Caused by: java.io.IOException: x".to_owned())),
            1 => (1_u32..40).prop_map(|n| (format!("\t... {n} more"), Kind::Stack, format!("\t... {n} more"))),
            1 => Just((format!("{P}Status [200] OK from the gateway"), Kind::Text, "Status [200] OK from the gateway".to_owned())),
            1 => Just(("plain continuation".to_owned(), Kind::Text, "plain continuation".to_owned())),
        ]
    }

    proptest! {
        /// Records start exactly at the header lines (and at the first line), cover every
        /// line once and in order, and keep each continuation line's text in the stack
        /// trace or the message as the test's own model says.
        #[test]
        fn records_are_what_a_model_of_the_format_says(
            lines in proptest::collection::vec(line(), 0..200),
        ) {
            let records = group_all(&parser(), CAPS, lines.iter().map(|l| l.0.as_str()));
            let mut expected: Vec<Record> = Vec::new();
            for (index, (_, kind, text)) in lines.iter().enumerate() {
                // An exception line after a frame or `... N more` is another trace.
                let after_frame = expected.last().is_some_and(|r| {
                    let last = r.stack_trace.rsplit('\n').next().unwrap_or_default().trim_start();
                    last.starts_with("at ") || last.starts_with("... ")
                });
                if *kind == Kind::Header
                    || expected.is_empty()
                    || (*kind == Kind::Exception && after_frame)
                {
                    let mut record = Record { first_line: index, line_count: 1, ..Record::default() };
                    match kind {
                        Kind::Header | Kind::Text => record.message.clone_from(text),
                        Kind::Stack | Kind::Exception => record.stack_trace.clone_from(text),
                    }
                    expected.push(record);
                    continue;
                }
                let record = expected.last_mut().expect("one");
                record.line_count += 1;
                // Stack trace, and whatever follows it, to the stack trace.
                let to = if *kind != Kind::Text || !record.stack_trace.is_empty() {
                    &mut record.stack_trace
                } else {
                    &mut record.message
                };
                if !to.is_empty() {
                    to.push('\n');
                }
                to.push_str(text);
            }
            let got: Vec<(usize, usize, &str, &str)> = records
                .iter()
                .map(|r| (r.first_line, r.line_count, r.message.as_str(), r.stack_trace.as_str()))
                .collect();
            let want: Vec<(usize, usize, &str, &str)> = expected
                .iter()
                .map(|r| (r.first_line, r.line_count, r.message.as_str(), r.stack_trace.as_str()))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
