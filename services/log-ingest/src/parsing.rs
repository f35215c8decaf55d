//! TestParse: lines parsed, grouped and masked as ingestion does, without shipping them.

use chrono_tz::Tz;
use mall_grpc::{ServiceError, Violations};

use crate::{
    config::{MaskingSettings, ParsingSettings},
    mask::Masker,
    multiline::{self, Caps},
    parse::{self, Format, Formats, Parser},
    record::Record,
};

/// Most lines in one TestParse request.
pub const MAX_LINES: usize = 1_000;
/// Longest line in a TestParse request, bytes.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why a request of `lines` lines, more than [`MAX_LINES`], is refused.
pub fn too_many_lines(lines: usize) -> String {
    format!("at most {MAX_LINES} lines per request, not {lines}")
}

/// The configured parsing: source zone, caps, masking.
#[derive(Debug, Clone)]
pub struct Parsing {
    /// Source time zone.
    pub zone: Tz,
    /// Caps on one record.
    pub caps: Caps,
    /// Masking.
    pub masker: Masker,
    /// The parsers by name.
    pub formats: Formats,
}

impl Parsing {
    /// From settings.
    ///
    /// # Errors
    /// When the time zone is unknown, a cap is zero or a masking pattern does not compile.
    pub fn new(parsing: &ParsingSettings, masking: &MaskingSettings) -> anyhow::Result<Self> {
        let zone = parse::zone(&parsing.time_zone)
            .map_err(|e| anyhow::anyhow!("parsing.time_zone: {e}"))?;
        anyhow::ensure!(
            parsing.max_record_lines > 0 && parsing.max_record_bytes > 0,
            "parsing.max_record_lines and parsing.max_record_bytes must be above 0"
        );
        let masker =
            Masker::new(&masking.patterns).map_err(|e| anyhow::anyhow!("masking.patterns: {e}"))?;
        let formats = Formats::new(&parsing.parsers).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Self {
            formats,
            zone,
            caps: Caps {
                lines: parsing.max_record_lines,
                bytes: parsing.max_record_bytes,
            },
            masker,
        })
    }

    /// Parses `lines` with the parser named `parser` (empty: chosen per line), groups them
    /// as one stream whose last record is complete at the end, and masks the records.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming each problem: an unknown parser, too many lines, a line too
    /// long or holding a line break.
    pub fn test(&self, parser: &str, lines: &[String]) -> Result<Vec<Record>, ServiceError> {
        let mut violations = Violations::default();
        let format = self.formats.named(parser);
        if format.is_none() {
            violations.add(
                "parser",
                format!(
                    "not a configured parser; use one of {} or leave it empty",
                    self.formats.names().join(", ")
                ),
            );
        }
        if lines.len() > MAX_LINES {
            violations.add("lines", too_many_lines(lines.len()));
        }
        for (i, line) in lines.iter().enumerate().take(MAX_LINES) {
            // Ingestion splits a record's line field at line breaks: one here would be
            // parsed as one line, unlike ingestion.
            if line.contains('\n') {
                violations.add(
                    format!("lines[{i}]"),
                    "holds a line break; give each line as an entry of its own".to_owned(),
                );
            }
            if line.len() > MAX_LINE_BYTES {
                violations.add(
                    format!("lines[{i}]"),
                    format!(
                        "at most {MAX_LINE_BYTES} bytes per line, not {}",
                        line.len()
                    ),
                );
            }
        }
        violations.into_result()?;
        let parser = Parser::new(format.unwrap_or(Format::Auto), self.zone);
        // A line's `\r` before its end is cut, as ingestion cuts it.
        let lines = lines
            .iter()
            .map(|line| line.strip_suffix('\r').unwrap_or(line));
        let mut records = multiline::group_all(&parser, self.caps, lines);
        let mut counts = vec![0; self.masker.len()];
        for record in &mut records {
            self.masker.record(record, &mut counts, self.caps.bytes);
        }
        Ok(records)
    }
}
