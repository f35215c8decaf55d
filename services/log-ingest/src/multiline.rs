//! Multi-line grouping: a record starts at a line its parser recognises as a start; every
//! line after it that is not a start joins it (stack trace lines to `stack_trace`, others
//! to `message`), so a Java stack trace stays whole in one record. A line the parser calls
//! an aside (the service wrapper's own, which it writes between the JVM's lines, inside a
//! stack trace too) does not end the record in progress: it is a record of its own, held
//! behind that record and completed with it, so records still come out in the order of
//! their first lines. A line that is not stack trace after an aside ends the record in
//! progress and joins the aside (the JVM stopped: the new JVM's first output), but for the
//! wrapper's lines that pass (its debug lines, slow pings and CPU-starvation reports, which
//! come between any two of the JVM's lines): between an aside and that line they do not
//! count; after them alone the line joins the record in progress; and one of them with
//! nothing in progress is complete at once, taking no text. Stack trace never joins a
//! record of the wrapper's.
//!
//! One [`Grouper`] per stream (a source and host, or file): its state outlives chunks and
//! connections, so a trace split across them is still one record. The record in progress is
//! complete when the next start arrives (or a line after an aside that is not stack trace,
//! or stack trace after a record of the wrapper's), or when it has had no line of its own
//! for a while (the caller calls [`Grouper::flush_quiet`]). A record is capped in lines and
//! bytes, with the asides held behind it, so a stream holds at most a record's caps: one
//! that reaches a cap is complete, and the line that did not fit starts the next record
//! (without a header, but for the wrapper's own line, which has its own; a line of the
//! wrapper's that passes is complete at once, unless a wrapper's line that interrupts was
//! held before it: that one becomes the record in progress, and the line that passes is
//! held behind it), so a runaway trace or
//! a stream of lines no parser recognises cannot exhaust memory, exceed what Loki takes for
//! one line, or lose a line. Only a single line longer than the byte cap is cut (the cut is
//! counted in `truncated_bytes`). The rest of a trace cut from its head (by a cap, the
//! quiet, memory) keeps what the head's header said: level, logger, thread, trace id, and
//! its time a millisecond later (a microsecond when the head's time has microseconds) (after
//! the quiet or memory, when it begins with stack trace that is not another exception, and
//! comes before the caller forgets the head).

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

/// The record in progress of one stream, and the asides held behind it.
///
/// Each record carries an origin `O` from the line that began it (the pipeline's: where
/// that line is in the buffer, for the record's place in Loki and for the
/// acknowledgement); a completed record comes out with its own.
#[derive(Debug)]
pub struct Grouper<O = ()> {
    pending: Option<(Record, O)>,
    /// Whether the record in progress began with the wrapper's own line: stack trace never
    /// joins it (the wrapper writes none).
    pending_aside: bool,
    /// What the header of the last trace completed without a start after it said (the
    /// stream went quiet, memory, the caps): the rest of that trace, arriving next without
    /// a header, keeps it. Gone once the JVM writes anything else (a record begins, a line
    /// that is not stack trace), or when the caller forgets it ([`Grouper::forget_cut`]).
    cut: Option<Head>,
    /// Heads kept in `cut` so far: which one is there, for the caller's clock.
    cuts: u64,
    /// The wrapper's own lines that came after the pending record's first line, as records
    /// of their own (in line order). They come out right after it, when it is
    /// complete, so records leave in the order of their first lines and everything from
    /// the pending record's first line on is held (the acknowledgement's book-keeping
    /// relies on it).
    asides: Vec<(Record, O)>,
    /// Bytes of text of the asides.
    asides_bytes: usize,
    /// Whether the latest line was an aside held.
    after_aside: bool,
    /// Which of `asides` is the latest that says the JVM's next text is new (the JVM
    /// stopped, another started), when only asides came after it (the wrapper's lines that
    /// pass, which do not say so, may have).
    interrupting: Option<usize>,
}

impl<O> Default for Grouper<O> {
    fn default() -> Self {
        Self {
            pending: None,
            pending_aside: false,
            cut: None,
            cuts: 0,
            asides: Vec::new(),
            asides_bytes: 0,
            after_aside: false,
            interrupting: None,
        }
    }
}

impl<O> Grouper<O> {
    /// Feeds one line at `index`, which came from `origin`: records it completes go to
    /// `out`, each with the origin of its first line.
    pub fn push(
        &mut self,
        parser: &Parser,
        caps: Caps,
        line: &str,
        index: usize,
        origin: O,
        out: &mut Vec<(Record, O)>,
    ) {
        let plain;
        let line = if line.contains('\x1b') {
            plain = without_escapes(line);
            plain.as_str()
        } else {
            line
        };
        self.after_aside = false;
        let interrupting = self.interrupting.take();
        // What is held behind the record in progress counts against its caps.
        let held = (self.asides.len(), self.asides_bytes);
        match parser.line(line, index) {
            // The wrapper's own line (it pings the JVM while the JVM writes a trace): held
            // behind the record in progress, which goes on.
            Line::Aside {
                mut record,
                interrupts,
            } => {
                cap_first(&mut record, caps);
                let (mut held, mut interrupting, mut resumed) = (held, interrupting, false);
                let fits_behind = |grouper: &Self, held| {
                    grouper
                        .pending
                        .as_ref()
                        .is_some_and(|(pending, _)| fits(pending, caps, &record.message, held))
                };
                if !interrupts
                    && !fits_behind(self, held)
                    && let Some(at) = interrupting.take()
                {
                    // A line that passes, past the caps of the record in progress, after a
                    // wrapper's line that says the JVM's next text is new (`Launching a
                    // JVM...`): that record is complete, and the wrapper's line becomes the
                    // record in progress, so the new JVM's first text still joins it. A
                    // record of its own now, as after a quiet flush: its quiet starts here
                    // (`latest_held` is false, so the pipeline takes this line for the
                    // record's own).
                    self.resume_at(at, out);
                    held = (self.asides.len(), self.asides_bytes);
                    resumed = true;
                }
                if fits_behind(self, held) {
                    self.asides_bytes += record.text_len();
                    self.asides.push((record, origin));
                    self.after_aside = !resumed;
                    self.interrupting = if interrupts {
                        Some(self.asides.len() - 1)
                    } else {
                        interrupting
                    };
                } else if interrupts {
                    // Nothing in progress, or it is at its caps: a start like any other.
                    self.complete(out);
                    self.begin((record, origin), true);
                } else {
                    // A line that passes (see `Line::Aside`) with nothing to be held behind:
                    // complete at once, so no text of the JVM's joins it (a trace cut before
                    // keeps its head for its rest).
                    self.complete(out);
                    out.push((record, origin));
                }
            }
            Line::Start(mut record) => {
                cap_first(&mut record, caps);
                self.complete(out);
                self.begin((record, origin), false);
            }
            Line::Continue {
                text,
                stack,
                unparsed,
            } => {
                let mut held = held;
                if !stack {
                    // The JVM writes something else: a trace cut before is over.
                    self.cut = None;
                }
                if let Some(at) = interrupting.filter(|_| !stack) {
                    // Text right after the wrapper's line (and lines that pass): the
                    // record in progress ended there (the JVM stopped and the wrapper said
                    // so, or started another). It is complete, with the asides before that
                    // line, and the text joins the wrapper's line, as it joins any record it
                    // follows; the lines that pass after it are held behind it.
                    self.resume_at(at, out);
                    // That record is over, not cut.
                    self.cut = None;
                    held = (self.asides.len(), self.asides_bytes);
                } else if stack && self.pending_aside {
                    // The JVM's stack trace after a record of the wrapper's (the rest of a
                    // trace that went quiet while the JVM stalled, the wrapper saying it
                    // appears hung): never the wrapper's; a record of its own, which keeps the
                    // cut trace's head (below) as after any quiet.
                    self.complete(out);
                }
                match &mut self.pending {
                    // Inside one printed trace only frames, `Caused by:`, `Suppressed:` and `... N
                    // more` follow a frame: an exception line there is another trace
                    // (`printStackTrace()` without a header), a record of its own, so each
                    // exception is counted by its class.
                    Some((record, _))
                        if fits(record, caps, text, held)
                            && !(stack && ends_a_trace(record) && starts_a_trace(text)) =>
                    {
                        join(record, text, stack);
                        record.parse_error |= unparsed;
                    }
                    _ => {
                        // Nothing to join (a stream that began mid-trace, a trace that went quiet
                        // longer than the flush delay, another trace), or the record is full: a
                        // record without a header. The rest of a full record, or of a trace cut
                        // from its head (the quiet, memory, the wrapper's line at the caps: a
                        // stack line that is not another trace), keeps what its header said
                        // (level, logger, thread, trace id, time), so a query for the ERROR
                        // finds this part of its trace too.
                        let mut record = Record::raw(text, index);
                        record.parse_error = unparsed;
                        let mut to_stack = stack;
                        // Another trace after a finished one is never a rest; nor is the
                        // JVM's text past the caps of a record of the wrapper's (its own).
                        let another = |r: &Record| stack && ends_a_trace(r) && starts_a_trace(text);
                        let full = self.pending.as_ref().filter(|(r, _)| {
                            !self.pending_aside && !fits(r, caps, text, held) && !another(r)
                        });
                        let head = match full {
                            Some((full, _)) => {
                                to_stack |= !full.stack_trace.is_empty();
                                Some(Head::of(full))
                            }
                            None if stack && !starts_a_trace(text) => self.cut.take(),
                            None => None,
                        };
                        if let Some(head) = head {
                            head.give(&mut record);
                        }
                        self.complete(out);
                        if to_stack {
                            record.stack_trace = std::mem::take(&mut record.message);
                        }
                        cap_first(&mut record, caps);
                        self.begin((record, origin), false);
                    }
                }
            }
        }
    }

    /// Completes the record in progress with the asides held before `asides[at]`, which
    /// becomes the record in progress, with the asides after it held behind it.
    fn resume_at(&mut self, at: usize, out: &mut Vec<(Record, O)>) {
        let mut after = self.asides.split_off(at).into_iter();
        let Some(first) = after.next() else {
            return;
        };
        self.complete(out);
        self.begin(first, true);
        for aside in after {
            self.asides_bytes += aside.0.text_len();
            self.asides.push(aside);
        }
    }

    /// Makes `record` the record in progress (nothing is); `aside`: it is the wrapper's.
    fn begin(&mut self, record: (Record, O), aside: bool) {
        debug_assert!(self.pending.is_none() && self.asides.is_empty());
        self.pending = Some(record);
        self.pending_aside = aside;
        if !aside {
            self.cut = None;
        }
    }

    /// Completes the record in progress: it goes to `out`, then the asides held behind it.
    /// A trace of the JVM's leaves its head in `cut` (what begins next clears it, unless
    /// it is the wrapper's).
    fn complete(&mut self, out: &mut Vec<(Record, O)>) {
        if let Some((record, _)) = self.pending.as_ref()
            && !self.pending_aside
            && !record.stack_trace.is_empty()
        {
            self.cut = Some(Head::of(record));
            self.cuts += 1;
        }
        self.pending_aside = false;
        out.extend(self.pending.take());
        out.append(&mut self.asides);
        self.asides_bytes = 0;
    }

    /// Completes the record in progress (its input ended, or it must go: memory, a
    /// stream forgotten): it goes to `out`, then the asides held behind it.
    pub fn flush(&mut self, out: &mut Vec<(Record, O)>) {
        self.after_aside = false;
        self.interrupting = None;
        self.complete(out);
    }

    /// Completes the record in progress because it went quiet, as [`Grouper::flush`] does,
    /// but for a wrapper's line after which the stream had only asides that pass:
    /// that becomes the record in progress, with those held behind it, so text right after
    /// them still joins it (the new JVM's first output after `Launching a JVM...`); the
    /// caller judges its quiet from the stream's latest line.
    pub fn flush_quiet(&mut self, out: &mut Vec<(Record, O)>) {
        match self.interrupting.take() {
            Some(at) => {
                self.after_aside = false;
                self.resume_at(at, out);
            }
            None => self.flush(out),
        }
    }

    /// Which head of a cut trace is kept (a number that changes with every new one), if
    /// any: the caller times it, to [`Grouper::forget_cut`] it.
    pub fn cut(&self) -> Option<u64> {
        self.cut.as_ref().map(|_| self.cuts)
    }

    /// Forgets the head of a trace cut before (see `cut`): its rest, if it comes now, is too
    /// late to be placed just after it (the caller's clock decides).
    pub fn forget_cut(&mut self) {
        self.cut = None;
    }

    /// Whether the latest line was held behind the record in progress (an aside): the
    /// record itself got no line (for judging its quiet). Not when that line made a line
    /// held before it the record in progress (at the caps): that record is new.
    pub fn latest_held(&self) -> bool {
        self.after_aside
    }

    /// Whether a record is in progress.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Bytes of text held: the record in progress and the asides behind it (0 without
    /// one).
    pub fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |(r, _)| r.text_len()) + self.asides_bytes
    }

    /// The first line of the record in progress and its origin, if any: every line from
    /// there on is held.
    pub fn pending(&self) -> Option<(usize, &O)> {
        self.pending
            .as_ref()
            .map(|(r, origin)| (r.first_line, origin))
    }
}

/// What a record's header said: what the rest of its trace, cut from it, keeps.
#[derive(Debug, Clone)]
struct Head {
    level: Option<crate::record::Level>,
    time_micros: Option<i64>,
    logger: String,
    thread: String,
    trace_id: String,
    /// Whether the head had a header (a level or a time): lines without one joined up to
    /// a cap are no record's rest.
    header: bool,
}

impl Head {
    fn of(record: &Record) -> Self {
        Self {
            level: record.level,
            time_micros: record.time_micros,
            logger: record.logger.clone(),
            thread: record.thread.clone(),
            trace_id: record.trace_id.clone(),
            header: record.level.is_some() || record.time_micros.is_some(),
        }
    }

    /// Gives `rest` what the header said; its time a millisecond after the head's (a
    /// microsecond when the head's time has microseconds), so the rest sorts after the head
    /// in its stream: below that is the pipeline's tie-breaker, which may be up to a
    /// millisecond when the head's time has no microseconds.
    fn give(self, rest: &mut Record) {
        rest.level = self.level;
        rest.time_micros = self
            .time_micros
            .map(|t| t + if t.rem_euclid(1_000) == 0 { 1_000 } else { 1 });
        rest.logger = self.logger;
        rest.thread = self.thread;
        rest.trace_id = self.trace_id;
        rest.continued = self.header;
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
/// by:` or `Suppressed:`, which continue one), or the JVM's `Exception in thread "…"`.
fn starts_a_trace(text: &str) -> bool {
    let text = text.trim_start();
    crate::parse::is_exception_line(text) || text.starts_with("Exception in thread \"")
}

/// Whether one more line of `text` keeps `record`, with the asides held behind it (`held`:
/// lines, bytes), within the caps: one stream never holds more than a record's caps.
fn fits(record: &Record, caps: Caps, text: &str, (lines, bytes): (usize, usize)) -> bool {
    record.line_count + lines < caps.lines && record.text_len() + bytes + text.len() < caps.bytes
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
    cap_text(record, caps.bytes);
}

/// Cuts a record's message and stack trace to `bytes` together, as [`cap_first`] does
/// (a no-op when they fit).
pub(crate) fn cap_text(record: &mut Record, bytes: usize) {
    record.truncated_bytes += cut(&mut record.message, bytes);
    if !record.stack_trace.is_empty() {
        let room = bytes.saturating_sub(record.message.len() + 1);
        record.truncated_bytes += cut(&mut record.stack_trace, room);
    }
}

/// Cuts `text` to at most `bytes` (before the word the cut falls in); what was cut.
pub(crate) fn cut(text: &mut String, bytes: usize) -> usize {
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

/// Bytes before a cut within which a space or a tab can join a number's groups: past a
/// phone number's first group, written in ASCII or full-width. (Farther back, in a table of
/// numbers, a space ends the word, so the cut keeps the table rather than dropping
/// [`WORD_BACKOFF`] bytes of it.)
const NUMBER_SPAN: usize = 40;

/// Bytes past a cut that [`cut`] reads, and a margin: a digit up to six bytes on, a
/// full-width digit's three bytes from there. A caller cutting a prefix of a longer text
/// must keep this many more.
pub(crate) const CUT_LOOKAHEAD: usize = 12;

/// `cut` (a character boundary), or where the word it falls in starts, when that is within
/// [`WORD_BACKOFF`] bytes, or else [`WORD_BACKOFF`] bytes back (a run longer than any
/// address or number: what the cut fell in starts after there). A word is what the
/// default patterns match: ASCII letters and digits, `._%+-@`, a backslash (JSON's `\t`
/// between a number's groups), any non-ASCII character (addresses in every script;
/// full-width digits, `－ – ㅡ` and the no-break space), and a space or a tab with a digit
/// (ASCII or full-width) on either side, a few separators away at most (`010 1234 5678`,
/// `010 - 1234`, `010. 1234`, `010 – 1234`, `０１０ １２３４`), within [`NUMBER_SPAN`] bytes
/// of the cut. A cut is inside a word when the text goes on with one of its characters
/// there.
fn before_word(text: &str, cut: usize) -> usize {
    let bytes = text.as_bytes();
    let word = |b: u8| b >= 0x80 || b.is_ascii_alphanumeric() || b"._%+-@\\".contains(&b);
    // A digit (ASCII, or full-width: EF BC 90..99) within a few bytes of `at` going `back`
    // or forward, over separators and non-ASCII characters (a dash) only.
    let full_width_digit = |first: usize| {
        bytes
            .get(first..first + 3)
            .is_some_and(|b| b[0] == 0xEF && b[1] == 0xBC && (0x90..=0x99).contains(&b[2]))
    };
    let digit_near = |from: usize, back: bool| {
        let mut at = from;
        for _ in 0..6 {
            let next = if back {
                at.checked_sub(1)
            } else {
                at.checked_add(1)
            };
            let Some(next) = next else {
                return false;
            };
            at = next;
            // The digit's last byte going back, its first going forward.
            let full_width = if back {
                at.checked_sub(2).is_some_and(full_width_digit)
            } else {
                full_width_digit(at)
            };
            if full_width {
                return true;
            }
            match bytes.get(at) {
                Some(b'0'..=b'9') => return true,
                Some(b' ' | b'\t' | b'.' | b'-' | 0x80..) => {}
                _ => return false,
            }
        }
        false
    };
    // Byte `at` belongs to the word around it.
    let joins = |at: usize| {
        word(bytes[at])
            || (matches!(bytes[at], b' ' | b'\t')
                && cut.saturating_sub(at) <= NUMBER_SPAN
                && digit_near(at, true)
                && digit_near(at, false))
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
        // A run longer than any address or number (a table of numbers joined by dots or
        // JSON's `\t`, a long encoded path): whatever the cut fell in starts after here.
        // (Staying at the cut would keep part of it.)
        text.floor_char_boundary(floor)
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
        grouper.push(parser, caps, line, index, (), &mut out);
    }
    grouper.flush(&mut out);
    out.into_iter().map(|(record, ())| record).collect()
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
    /// The prefix of the wrapper's own lines.
    const W: &str = "STATUS | wrapper  | 2024/10/28 17:12:31 | ";

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

    /// The wrapper pings the JVM while the JVM writes a trace; its line came between frames.
    #[test]
    fn the_wrappers_own_line_inside_a_trace_leaves_the_trace_whole() {
        let lines = [
            format!("{P}ERROR [hybrisHTTP12] [DefaultCartService] cart 8812 failed"),
            format!("{P}java.lang.IllegalStateException: broken"),
            format!("{P}\tat a.B.c(B.java:1)"),
            format!("{W}Pinging the JVM took 12 seconds to respond."),
            format!("{P}\tat a.B.d(B.java:2)"),
            format!("{P}Caused by: java.io.IOException: x"),
            format!("{P}\t... 3 more"),
            format!("{P}INFO  [main] [L] next"),
            // After a record without a trace too: held behind it, out after it.
            format!("{W}JVM exited unexpectedly."),
            format!("{P}INFO  [main] [L] after"),
        ];
        assert_eq!(
            summary(&group_all(
                &parser(),
                CAPS,
                lines.iter().map(String::as_str)
            )),
            [
                (
                    0,
                    6,
                    "cart 8812 failed",
                    "java.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)\n\
                     Caused by: java.io.IOException: x\n\t... 3 more"
                ),
                // Held behind the trace's record, out after it: in line order.
                (3, 1, "Pinging the JVM took 12 seconds to respond.", ""),
                (7, 1, "next", ""),
                (8, 1, "JVM exited unexpectedly.", ""),
                (9, 1, "after", ""),
            ]
        );
        // The same lines in a grouper fed one at a time: nothing comes out before the
        // trace's record, and the aside's record keeps its own origin.
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        for (index, line) in lines.iter().enumerate().take(8) {
            grouper.push(&parser(), CAPS, line, index, index * 10, &mut out);
            if index < 7 {
                assert!(out.is_empty(), "held at line {index}");
                assert_eq!(
                    grouper.pending().map(|(first, o)| (first, *o)),
                    Some((0, 0))
                );
            }
        }
        let got: Vec<(usize, usize, &str)> = out
            .iter()
            .map(|(r, origin)| (r.first_line, *origin, r.logger.as_str()))
            .collect();
        assert_eq!(got, [(0, 0, "DefaultCartService"), (3, 30, "wrapper")]);
    }

    /// A record that goes quiet is complete with what is held behind it, but for a wrapper
    /// line that came last: it stays in progress, and text right after it joins it.
    #[test]
    fn a_quiet_record_keeps_a_wrapper_line_that_came_last_in_progress() {
        let lines = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.OutOfMemoryError: Java heap space".to_owned(),
            format!("{W}JVM exited unexpectedly."),
            format!("{W}Launching a JVM..."),
        ];
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            grouper.push(&parser(), CAPS, line, index, index, &mut out);
        }
        grouper.flush_quiet(&mut out);
        let firsts: Vec<usize> = out.iter().map(|(_, origin)| *origin).collect();
        assert_eq!(firsts, [0, 2]);
        assert_eq!(
            grouper.pending().map(|(first, o)| (first, *o)),
            Some((3, 3))
        );
        assert!(!grouper.latest_held());
        let text = "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing...";
        grouper.push(&parser(), CAPS, text, 4, 4, &mut out);
        assert_eq!(out.len(), 2, "joined");
        // Its quiet: complete, nothing held back.
        grouper.flush_quiet(&mut out);
        let (last, _) = out.last().expect("completed");
        assert_eq!(
            last.message,
            "Launching a JVM...\nWrapperManager: Initializing..."
        );
        assert!(!grouper.is_pending());
        // A record whose last line was its own: everything goes.
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        for (index, line) in lines[..3].iter().chain([&lines[1]]).enumerate() {
            grouper.push(&parser(), CAPS, line, index, index, &mut out);
        }
        grouper.flush_quiet(&mut out);
        assert_eq!(out.len(), 2);
        assert!(!grouper.is_pending());
    }

    /// The JVM dies in the middle of a trace and the wrapper starts another: the new JVM's
    /// first lines (no log4j header) join the wrapper's last line, not the dead JVM's trace.
    #[test]
    fn text_after_the_wrappers_line_ends_the_trace() {
        let lines = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.OutOfMemoryError: Java heap space".to_owned(),
            "\tat a.B.c(B.java:1)".to_owned(),
            format!("{W}JVM exited unexpectedly."),
            format!("{W}Launching a JVM..."),
            "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing..."
                .to_owned(),
            "\tat a.B.d(B.java:2)".to_owned(),
        ];
        assert_eq!(
            summary(&group_all(
                &parser(),
                CAPS,
                lines.iter().map(String::as_str)
            )),
            [
                (
                    0,
                    3,
                    "failed",
                    "java.lang.OutOfMemoryError: Java heap space\n\tat a.B.c(B.java:1)"
                ),
                (3, 1, "JVM exited unexpectedly.", ""),
                // A record of the wrapper's, as before the trace: text joins it, stack
                // trace never does (the wrapper writes none).
                (
                    4,
                    2,
                    "Launching a JVM...\nWrapperManager: Initializing...",
                    ""
                ),
                (6, 1, "", "\tat a.B.d(B.java:2)"),
            ]
        );
    }

    /// The wrapper's debug lines (`wrapper.debug`: `DEBUG`, and `wrapperp`, its protocol's)
    /// and its reports of a slow ping come between any two of the JVM's lines: the JVM's
    /// text after one still joins the record in progress, which they do not end.
    #[test]
    fn text_after_the_wrappers_debug_lines_and_pings_goes_on() {
        let lines = [
            format!("{P}INFO  [main] [X] SQL:"),
            "DEBUG  | wrapperp | 2024/10/28 17:12:31 | send a packet PING : ping".to_owned(),
            format!("{P}select * from cart"),
            "DEBUG  | wrapper  | 2024/10/28 17:12:31 | read a packet PING : ping".to_owned(),
            format!("{P}where id = 1"),
            format!("{W}Pinging the JVM took 12 seconds to respond."),
            format!("{P}and total > 0"),
        ];
        assert_eq!(
            summary(&group_all(
                &parser(),
                CAPS,
                lines.iter().map(String::as_str)
            )),
            [
                (
                    0,
                    4,
                    "SQL:\nselect * from cart\nwhere id = 1\nand total > 0",
                    ""
                ),
                (1, 1, "send a packet PING : ping", ""),
                (3, 1, "read a packet PING : ping", ""),
                (5, 1, "Pinging the JVM took 12 seconds to respond.", ""),
            ]
        );
    }

    /// The JVM dies and the wrapper starts another with `wrapper.debug` on: its debug line
    /// after `Launching a JVM...` leaves the new JVM's first output joining that line, not
    /// the dead JVM's trace; after a quiet too.
    #[test]
    fn text_after_the_wrappers_line_and_its_debug_lines_ends_the_trace() {
        let lines = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.OutOfMemoryError: Java heap space".to_owned(),
            format!("{W}JVM exited unexpectedly."),
            format!("{W}Launching a JVM..."),
            "DEBUG  | wrapper  | 2024/10/28 17:12:31 | JVM started (PID=4242)".to_owned(),
            "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing..."
                .to_owned(),
        ];
        let want = [
            (
                0,
                2,
                "failed",
                "java.lang.OutOfMemoryError: Java heap space",
            ),
            (2, 1, "JVM exited unexpectedly.", ""),
            (
                3,
                2,
                "Launching a JVM...\nWrapperManager: Initializing...",
                "",
            ),
            (4, 1, "JVM started (PID=4242)", ""),
        ];
        assert_eq!(
            summary(&group_all(
                &parser(),
                CAPS,
                lines.iter().map(String::as_str)
            )),
            want
        );
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            if index == 5 {
                grouper.flush_quiet(&mut out);
                assert_eq!(
                    out.len(),
                    2,
                    "the trace and the first line of the wrapper's"
                );
            }
            grouper.push(&parser(), CAPS, line, index, (), &mut out);
        }
        grouper.flush(&mut out);
        let records: Vec<Record> = out.into_iter().map(|(r, ())| r).collect();
        assert_eq!(summary(&records), want);
    }

    /// A debug line of the wrapper's with nothing in progress is complete at once: the
    /// JVM's text after it is not the wrapper's, and the rest of a trace cut before it
    /// keeps the trace's head.
    #[test]
    fn a_debug_line_of_the_wrappers_takes_no_text() {
        use crate::record::Level;

        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        let lines = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.IllegalStateException: broken".to_owned(),
            "DEBUG  | wrapperp | 2024/10/28 17:12:31 | send a packet PING : ping".to_owned(),
            "\tat a.B.c(B.java:1)".to_owned(),
            "DEBUG  | wrapperp | 2024/10/28 17:12:36 | send a packet PING : ping".to_owned(),
            format!("{P}some text"),
        ];
        for (index, line) in lines.iter().enumerate() {
            if index == 2 {
                // The trace went quiet before the wrapper's debug line.
                grouper.flush_quiet(&mut out);
            }
            if index == 4 {
                grouper.flush_quiet(&mut out);
            }
            grouper.push(&parser(), CAPS, line, index, (), &mut out);
        }
        grouper.flush(&mut out);
        let got: Vec<(usize, Option<Level>, &str, &str, &str)> = out
            .iter()
            .map(|(r, ())| {
                (
                    r.first_line,
                    r.level,
                    r.logger.as_str(),
                    r.message.as_str(),
                    r.stack_trace.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    0,
                    Some(Level::Error),
                    "X",
                    "failed",
                    "java.lang.IllegalStateException: broken"
                ),
                (
                    2,
                    Some(Level::Debug),
                    "wrapper",
                    "send a packet PING : ping",
                    ""
                ),
                // The rest of the cut trace, with its head's level and logger.
                (3, Some(Level::Error), "X", "", "\tat a.B.c(B.java:1)"),
                (
                    4,
                    Some(Level::Debug),
                    "wrapper",
                    "send a packet PING : ping",
                    ""
                ),
                (5, None, "", "some text", ""),
            ]
        );
    }

    /// The JVM stalls in the middle of a trace (a GC pause) longer than the quiet, and the
    /// wrapper's ping comes before the rest (complete at once), or its report that the JVM
    /// appears hung (a record in progress, which stack trace does not join): the rest is a
    /// record of its own, as after any quiet, not part of the wrapper's record.
    #[test]
    fn the_rest_of_a_quiet_trace_after_the_wrappers_line_is_not_the_wrappers() {
        for (said, level) in [
            (
                format!("{W}Pinging the JVM took 12 seconds to respond."),
                crate::record::Level::Info,
            ),
            // Written at ERROR.
            (
                "ERROR  | wrapper  | 2024/10/28 17:12:31 | JVM appears hung: Timed out waiting \
                 for signal from JVM."
                    .to_owned(),
                crate::record::Level::Error,
            ),
        ] {
            let lines = [
                format!("{P}ERROR [main] [X] failed"),
                "java.lang.IllegalStateException: broken".to_owned(),
                "\tat a.B.c(B.java:1)".to_owned(),
                said.clone(),
                "\tat a.B.d(B.java:2)".to_owned(),
                "Caused by: java.io.IOException: x".to_owned(),
            ];
            let mut grouper = Grouper::default();
            let mut out = Vec::new();
            for (index, line) in lines.iter().enumerate() {
                if index == 3 {
                    // The stall: the trace goes quiet before the wrapper's line.
                    grouper.flush_quiet(&mut out);
                }
                grouper.push(&parser(), CAPS, line, index, (), &mut out);
            }
            grouper.flush(&mut out);
            let records: Vec<Record> = out.into_iter().map(|(r, ())| r).collect();
            assert_eq!(
                summary(&records),
                [
                    (
                        0,
                        3,
                        "failed",
                        "java.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)"
                    ),
                    (3, 1, said.splitn(4, " | ").nth(3).unwrap_or_default(), ""),
                    (
                        4,
                        2,
                        "",
                        "\tat a.B.d(B.java:2)\nCaused by: java.io.IOException: x"
                    ),
                ],
                "{said}"
            );
            // The rest keeps what the trace's header said: a query for the ERROR finds it.
            let (head, rest) = (&records[0], &records[2]);
            assert_eq!(rest.level, Some(crate::record::Level::Error));
            assert_eq!((rest.logger.as_str(), rest.thread.as_str()), ("X", "main"));
            assert_eq!(rest.time_micros, head.time_micros.map(|t| t + 1_000));
            // ... and is marked as a rest, which the derived metrics do not count as a
            // record.
            assert!(rest.continued && !head.continued && !records[1].continued);
            assert_eq!(records[1].level, Some(level));
        }
    }

    /// The rest of a trace cut by the quiet keeps its header's fields; a new trace after
    /// the quiet, or lines after the JVM wrote something else, do not.
    #[test]
    fn only_the_rest_of_a_cut_trace_keeps_its_header() {
        const QUIET: &str = "(quiet)";
        let head = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.IllegalStateException: broken".to_owned(),
            "\tat a.B.c(B.java:1)".to_owned(),
        ];
        // The records after the head's: (level, message, stack trace).
        let after = |lines: &[&str]| {
            let mut grouper = Grouper::default();
            let mut out = Vec::new();
            let all = head.iter().map(String::as_str).chain(lines.iter().copied());
            for (index, line) in all.enumerate() {
                if line == QUIET {
                    grouper.flush_quiet(&mut out);
                } else {
                    grouper.push(&parser(), CAPS, line, index, (), &mut out);
                }
            }
            grouper.flush(&mut out);
            out.into_iter()
                .skip(1)
                .map(|(r, ())| (r.level, r.message, r.stack_trace))
                .collect::<Vec<_>>()
        };
        use crate::record::Level;
        let frame = "\tat a.B.d(B.java:2)";
        let rest = |level| (level, String::new(), frame.to_owned());
        assert_eq!(after(&[QUIET, frame]), [rest(Some(Level::Error))]);
        // Another trace (an exception line, the JVM's uncaught one), then its frame.
        for exception in [
            "java.lang.NullPointerException",
            "Exception in thread \"t1\" x.Y",
        ] {
            let trace = format!("{exception}\n{frame}");
            assert_eq!(
                after(&[QUIET, exception, frame]),
                [(None, String::new(), trace)]
            );
        }
        // A record began between, and went quiet too.
        let next = format!("{P}INFO  [main] [L] next");
        assert_eq!(
            after(&[QUIET, &next, QUIET, frame]),
            [
                (Some(Level::Info), "next".to_owned(), String::new()),
                rest(None)
            ]
        );
        // The JVM died in its trace and another started after a quiet: its first output
        // joins the wrapper's line, and a trace after that is not the dead JVM's.
        let exited = format!("{W}JVM exited unexpectedly.");
        let launching = format!("{W}Launching a JVM...");
        let started = "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing...";
        let caused = "Caused by: java.lang.ClassNotFoundException: X";
        assert_eq!(
            after(&[&exited, &launching, QUIET, started, caused]),
            [
                (
                    Some(Level::Info),
                    "JVM exited unexpectedly.".to_owned(),
                    String::new()
                ),
                (
                    Some(Level::Info),
                    "Launching a JVM...\nWrapperManager: Initializing...".to_owned(),
                    String::new()
                ),
                (None, String::new(), caused.to_owned()),
            ]
        );
    }

    /// What is held behind a record counts against its caps: past them, the next aside
    /// completes it as any start does, and a stream never holds more than one record's caps.
    #[test]
    fn asides_held_behind_a_record_count_against_its_caps() {
        let trace = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.IllegalStateException: broken".to_owned(),
        ];
        let aside = |n: usize| {
            format!("{W}on_exit trigger matched.  Restarting the JVM.  (Exit code: {n})")
        };
        // Lines: the trace's two and three asides make five.
        let caps = Caps {
            lines: 5,
            bytes: 10_000,
        };
        let mut lines = trace.to_vec();
        lines.extend((1..=5).map(aside));
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        let mut completed = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            grouper.push(&parser(), caps, line, index, index, &mut out);
            completed.push(out.iter().map(|(_, first)| *first).collect::<Vec<_>>());
        }
        // Held up to the third aside; the fourth completes the trace and its three asides,
        // and the fifth is held behind the fourth.
        assert_eq!(
            completed,
            [
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![0, 2, 3, 4],
                vec![0, 2, 3, 4]
            ]
        );
        // Bytes: the trace's text and one aside fit, a second does not.
        let one = format!("{W}{}", "x".repeat(40));
        let caps = Caps {
            lines: 1_000,
            bytes: "failed".len() + "java.lang.IllegalStateException: broken".len() + 40 + 30,
        };
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        for (index, line) in trace.iter().chain([&one, &one, &one]).enumerate() {
            grouper.push(&parser(), caps, line, index, index, &mut out);
            assert!(grouper.pending_len() < caps.bytes, "at line {index}");
        }
        let firsts: Vec<usize> = out.iter().map(|(_, first)| *first).collect();
        assert_eq!(firsts, [0, 2], "the second aside completed the trace");
        assert_eq!(grouper.pending().map(|(first, _)| first), Some(3));
    }

    /// At the caps of the record in progress, a line that passes after `Launching a
    /// JVM...` completes that record, not the launch line: the new JVM's first text still
    /// joins the launch line, the line that passes held behind it.
    #[test]
    fn a_line_that_passes_at_the_caps_leaves_the_launch_line_in_progress() {
        let lines = [
            format!("{P}ERROR [main] [X] failed"),
            "java.lang.OutOfMemoryError: Java heap space".to_owned(),
            format!("{W}Launching a JVM..."),
            "DEBUG  | wrapper  | 2024/10/28 17:12:31 | JVM started (PID=4242)".to_owned(),
            "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing..."
                .to_owned(),
        ];
        // The trace's two lines and the launch line held behind them make three.
        let caps = Caps {
            lines: 3,
            bytes: 10_000,
        };
        let mut grouper = Grouper::default();
        let mut out = Vec::new();
        let mut completed = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            grouper.push(&parser(), caps, line, index, (), &mut out);
            completed.push(out.len());
        }
        assert_eq!(
            completed,
            [0, 0, 0, 1, 1],
            "the debug line completed the trace"
        );
        grouper.flush(&mut out);
        let records: Vec<Record> = out.into_iter().map(|(r, ())| r).collect();
        assert_eq!(
            summary(&records),
            [
                (
                    0,
                    2,
                    "failed",
                    "java.lang.OutOfMemoryError: Java heap space"
                ),
                (
                    2,
                    2,
                    "Launching a JVM...\nWrapperManager: Initializing...",
                    ""
                ),
                (3, 1, "JVM started (PID=4242)", ""),
            ]
        );
        // The launch line's quiet starts at the debug line, as after a quiet flush.
        let mut grouper = Grouper::default();
        for (index, line) in lines[..4].iter().enumerate() {
            grouper.push(&parser(), caps, line, index, (), &mut Vec::new());
        }
        assert_eq!(grouper.pending().map(|(first, ())| first), Some(2));
        assert!(!grouper.latest_held());
    }

    /// (first line, lines, message, stack trace) of each record.
    fn summary(records: &[Record]) -> Vec<(usize, usize, &str, &str)> {
        records
            .iter()
            .map(|r| {
                let (message, trace) = (r.message.as_str(), r.stack_trace.as_str());
                (r.first_line, r.line_count, message, trace)
            })
            .collect()
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
        assert_eq!(rest.time_micros, head.time_micros.map(|t| t + 1_000));
        assert_eq!(rest.message, "");
        assert_eq!(rest.stack_trace, "\tat a.B.d(B.java:2)\nafter the trace");
        assert!(!rest.parse_error);
        assert!(rest.continued && !head.continued);
        // A stream that begins mid-trace has nothing to inherit.
        let records = group_all(&parser(), caps, ["\tat a.B.c(B.java:1)"]);
        assert_eq!(records[0].level, None);
        // Another trace right at the cap is no rest: no header, as below the cap.
        let mut other = lines[..3].to_vec();
        other.push(format!("{P}java.lang.NullPointerException"));
        let records = group_all(&parser(), caps, other.iter().map(String::as_str));
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[1].level, records[1].continued),
            (None, false),
            "{records:?}"
        );
        assert_eq!(records[1].stack_trace, "java.lang.NullPointerException");
        // Lines without a header, past the cap, are no record's rest: each piece counts.
        let unparsed = ["one", "two", "three", "four"];
        let records = group_all(&parser(), caps, unparsed);
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| !r.continued && r.level.is_none()));
        // The JVM's text past the caps of a record of the wrapper's is not the wrapper's.
        let caps = Caps {
            lines: 2,
            bytes: 10_000,
        };
        let restart = [
            format!("{W}Launching a JVM..."),
            "DEBUG  | wrapper  | 2024/10/28 17:12:31 | JVM started (PID=4242)".to_owned(),
            "INFO   | jvm 2    | main    | 2024/10/28 17:12:40.000 | WrapperManager: Initializing..."
                .to_owned(),
        ];
        let records = group_all(&parser(), caps, restart.iter().map(String::as_str));
        assert_eq!(records.len(), 3, "{records:?}");
        let text = &records[2];
        assert_eq!(text.message, "WrapperManager: Initializing...");
        assert_eq!(
            (text.level, text.logger.as_str(), text.continued),
            (None, "", false)
        );
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
        // The other separators the phone pattern takes, with spaces around them too, and a
        // tab written as JSON writes it: a cut in the last group goes back to the start.
        for call in [
            "call 010\t1234\t5678 now",
            "call 010. 1234. 5678 now",
            "call 010 - 1234 - 5678 now",
            "call 010 – 1234 – 5678 now",
            "call 010\u{a0}1234\u{a0}5678 now",
            "call 010\\t1234\\t5678 now",
        ] {
            let last = call.rfind("56").expect("the last group") + 1;
            assert_eq!(before_word(call, last), 5, "{call:?}");
        }
        // After a table of numbers longer than the back-off: the number at the cut goes
        // whole, with a little of the table at most (the whole table would be past the
        // back-off, and the cut would stay inside the number).
        for gap in ["\t", " ", "  "] {
            let table = vec!["123"; 100].join(gap);
            let text = format!("{table}{gap}010-1234-5678 end");
            let start = text.find("010").expect("the number");
            let kept = before_word(&text, start + 11);
            assert!(
                kept <= start && start - kept <= NUMBER_SPAN,
                "{gap:?}: {kept} {start}"
            );
        }
        // An address in another script, cut inside a character's neighbour.
        let korean = "주문 홍길동@회사.kr 실패";
        let cut = korean.find("사").expect("there");
        assert_eq!(before_word(korean, cut), korean.find("홍").expect("there"));
        // A word from the text's start, shorter than the back-off: nothing of it kept.
        assert_eq!(before_word("kim@example.com", 6), 0);
        // A run longer than any address or number: cut the back-off before the cap, before
        // any address or number the cap fell in (a table of numbers joined by JSON's `\t`,
        // then a number).
        let run = "y".repeat(WORD_BACKOFF + 10);
        assert_eq!(before_word(&run, WORD_BACKOFF + 5), 5);
        let table = format!("{}010\\t1234\\t5678 end", "123\\t".repeat(120));
        let cut = table.rfind("56").expect("the last group") + 1;
        assert_eq!(before_word(&table, cut), cut - WORD_BACKOFF);
        // Full-width digits with ASCII spaces between their groups.
        let wide = "call ０１０ １２３４ ５６７８ now";
        let cut = wide.find("６").expect("the last group");
        assert_eq!(before_word(wide, cut), 5);
    }

    /// What a generated line is, as the test knows it (not as the parser decides).
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        Header,
        /// An exception line: the first line of a printed trace.
        Exception,
        Stack,
        Text,
        /// The wrapper's own line.
        Aside,
        /// The wrapper's line that says nothing of the JVM's life (a debug line, a slow
        /// ping), which does not end the record before it for the text after it.
        Passing,
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
            1 => (1_u32..30).prop_map(|n| (
                format!("{W}Pinging the JVM took {n} seconds to respond."),
                Kind::Passing,
                format!("Pinging the JVM took {n} seconds to respond."),
            )),
            1 => Just((format!("{W}Launching a JVM..."), Kind::Aside, "Launching a JVM...".to_owned())),
            1 => Just((format!("{W}JVM exited unexpectedly."), Kind::Aside, "JVM exited unexpectedly.".to_owned())),
            1 => Just((
                "DEBUG  | wrapperp | 2024/10/28 17:12:31 | send a packet PING : ping".to_owned(),
                Kind::Passing,
                "send a packet PING : ping".to_owned(),
            )),
        ]
    }

    proptest! {
        /// Records start exactly at the header lines, the wrapper's own lines and the first
        /// line (or at a second trace, or after a quiet time), cover every line once, come
        /// out in the order of their first lines, and keep each continuation line's text in
        /// the stack trace or the message as the test's own model says; the wrapper's own
        /// lines leave the record in progress going on (a trace whole), and text right after
        /// one (its lines that pass between not counting) joins it, after a quiet time too;
        /// text after lines that pass alone joins the record in progress.
        #[test]
        fn records_are_what_a_model_of_the_format_says(
            lines in proptest::collection::vec(proptest::option::weighted(0.95, line()), 0..200),
        ) {
            // `None`: the stream went quiet there ([`Grouper::flush_quiet`]).
            let mut grouper = Grouper::default();
            let mut out = Vec::new();
            let mut index = 0;
            for line in &lines {
                match line {
                    Some((text, ..)) => {
                        grouper.push(&parser(), CAPS, text, index, (), &mut out);
                        index += 1;
                    }
                    None => grouper.flush_quiet(&mut out),
                }
            }
            grouper.flush(&mut out);
            let records: Vec<Record> = out.into_iter().map(|(r, ())| r).collect();
            // In the order of their first lines; `current` is the one lines join.
            let mut expected: Vec<Record> = Vec::new();
            let mut current: Option<usize> = None;
            // Whether `current` is the wrapper's.
            let mut current_aside = false;
            // The latest of the wrapper's lines with only lines that pass after it.
            let mut interrupting: Option<usize> = None;
            let mut index = 0;
            for line in &lines {
                let Some((_, kind, text)) = line else {
                    // Quiet: the record in progress is complete, but for the wrapper's line
                    // with only lines that pass after it, which text still joins.
                    current = interrupting.take();
                    current_aside = current.is_some();
                    continue;
                };
                let first_line = index;
                index += 1;
                // An exception line after a frame or `... N more` is another trace.
                let after_frame = current.is_some_and(|c| {
                    let last = expected[c].stack_trace.rsplit('\n').next().unwrap_or_default().trim_start();
                    last.starts_with("at ") || last.starts_with("... ")
                });
                let mut record = Record { first_line, line_count: 1, ..Record::default() };
                if *kind == Kind::Passing {
                    // A record of its own, held or complete; nothing joins it.
                    record.message.clone_from(text);
                    expected.push(record);
                    continue;
                }
                if *kind == Kind::Aside && current.is_some() {
                    record.message.clone_from(text);
                    expected.push(record);
                    interrupting = Some(expected.len() - 1);
                    continue;
                }
                if let Some(aside) = interrupting.take().filter(|_| *kind == Kind::Text) {
                    // The trace ended at the aside before: the text joins the aside.
                    current = Some(aside);
                    current_aside = true;
                }
                // Stack trace never joins a record of the wrapper's.
                let after_wrapper = current_aside && matches!(kind, Kind::Stack | Kind::Exception);
                if matches!(kind, Kind::Header | Kind::Aside)
                    || current.is_none()
                    || (*kind == Kind::Exception && after_frame)
                    || after_wrapper
                {
                    current_aside = *kind == Kind::Aside;
                    match kind {
                        Kind::Header | Kind::Text | Kind::Aside | Kind::Passing => {
                            record.message.clone_from(text);
                        }
                        Kind::Stack | Kind::Exception => record.stack_trace.clone_from(text),
                    }
                    expected.push(record);
                    current = Some(expected.len() - 1);
                    continue;
                }
                let record = &mut expected[current.expect("one")];
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

        /// Under small caps and with quiet times between lines (a stream's record in
        /// progress completed as [`Grouper::flush_quiet`] does), every line is in exactly
        /// one record, records come out in the order of their first lines, and none holds
        /// more lines or bytes than the caps.
        #[test]
        fn records_stay_within_small_caps_and_quiet_times_and_lose_no_line(
            lines in proptest::collection::vec(proptest::option::weighted(0.9, line()), 0..150),
            cap_lines in 1_usize..10,
            cap_bytes in 40_usize..400,
        ) {
            let caps = Caps { lines: cap_lines, bytes: cap_bytes };
            let parser = parser();
            let mut grouper = Grouper::default();
            let mut out = Vec::new();
            let mut index = 0;
            for line in &lines {
                match line {
                    Some((text, ..)) => {
                        grouper.push(&parser, caps, text, index, (), &mut out);
                        index += 1;
                    }
                    None => grouper.flush_quiet(&mut out),
                }
            }
            grouper.flush(&mut out);
            let records: Vec<Record> = out.into_iter().map(|(r, ())| r).collect();
            prop_assert_eq!(records.iter().map(|r| r.line_count).sum::<usize>(), index);
            for pair in records.windows(2) {
                prop_assert!(pair[0].first_line < pair[1].first_line, "{:?}", pair);
            }
            for record in &records {
                prop_assert!(
                    record.line_count >= 1 && record.line_count <= cap_lines,
                    "{:?}",
                    record
                );
                prop_assert!(record.text_len() <= cap_bytes, "{:?}", record);
            }
        }
    }
}
