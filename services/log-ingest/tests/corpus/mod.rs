//! The legacy corpus as the tests understand it, independently of the service's parsers:
//! the generator's header lines, the records they start, the masking of its addresses, and
//! forward frames as Fluent Bit sends them.

#![allow(dead_code)] // each test binary uses part of it

use rmpv::Value;

/// Settings of an in-process log-ingest for a test: every listener on a free loopback port,
/// the buffer in `dir`.
pub fn local_settings(dir: &std::path::Path) -> log_ingest::Settings {
    let mut settings = log_ingest::Settings::default();
    let any = || "127.0.0.1:0".parse().expect("an address");
    settings.server.listen_addr = any();
    settings.server.admin_addr = any();
    settings.forward.listen_addr = any();
    settings.buffer.dir = dir.to_owned();
    settings
}

/// Whether the text after the wrapper's prefix is one of the generator's header lines.
pub fn is_header(text: &str) -> bool {
    ["INFO  [", "WARN  [", "DEBUG [", "ERROR ["]
        .iter()
        .any(|h| text.starts_with(h))
}

/// What Loki must hold for `lines`: (level, line) per record, the line being the header's
/// message then each joined line, addresses masked.
pub fn model<S: AsRef<str>>(lines: &[S]) -> Vec<(String, String)> {
    let mut records: Vec<(String, String)> = Vec::new();
    for line in lines {
        let text = line
            .as_ref()
            .splitn(5, " | ")
            .nth(4)
            .expect("a wrapper prefix");
        if is_header(text) {
            // `LEVEL [thread] [Logger] message`
            let after_thread = &text[text.find("] [").expect("a logger") + 3..];
            let message = &after_thread[after_thread.find("] ").expect("a message") + 2..];
            records.push((text[..5].trim().to_owned(), mask(message)));
        } else {
            let last = records.last_mut().expect("a header first");
            last.1.push('\n');
            last.1.push_str(&mask(text));
        }
    }
    records
}

/// `text` with the corpus's addresses (`customerN@example.com`) as the default masking
/// leaves them.
pub fn mask(text: &str) -> String {
    text.split(' ')
        .map(|word| match word.find("@example.com") {
            Some(at) => {
                let start = word[..at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                    .map_or(0, |i| i + 1);
                format!(
                    "{}<email>{}",
                    &word[..start],
                    &word[at + "@example.com".len()..]
                )
            }
            None => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Forward-mode message of `lines` (tag `hybris.wrapper`, host `hybris-1`) with `chunk`.
pub fn frame<S: AsRef<str>>(chunk: &str, lines: &[S]) -> Vec<u8> {
    let entries = lines
        .iter()
        .map(|line| {
            Value::Array(vec![
                Value::from(1_730_103_120_u32),
                Value::Map(vec![
                    (Value::from("log"), Value::from(line.as_ref())),
                    (Value::from("host"), Value::from("hybris-1")),
                ]),
            ])
        })
        .collect();
    let mut out = Vec::new();
    rmpv::encode::write_value(
        &mut out,
        &Value::Array(vec![
            Value::from("hybris.wrapper"),
            Value::Array(entries),
            Value::Map(vec![(Value::from("chunk"), Value::from(chunk))]),
        ]),
    )
    .expect("encodes");
    out
}
