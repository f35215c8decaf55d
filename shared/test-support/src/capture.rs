//! Everything a process logs, kept in memory, for tests that search what was logged (the
//! privacy and scan tests): install with [`Captured::install_at_trace`].

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
};

/// Every log line and span event written so far, by every crate.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Installs a global subscriber writing everything, at TRACE with span events, here.
    ///
    /// # Panics
    /// When a global subscriber is installed already (one per test binary).
    pub fn install_at_trace() -> Self {
        let captured = Self::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
            .with_writer(move || writer.clone())
            .init();
        captured
    }

    /// Captures what this thread logs at INFO and above, as plain text lines, until the
    /// guard is dropped: with a current-thread runtime (`#[tokio::test]`), every task's.
    /// For a test that reads one log line without installing a global subscriber.
    pub fn set_default() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    /// What was written, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
