//! The durable buffer between the inputs and Loki: an append-only log of batches in
//! segment files under the data directory, bounded in bytes.
//!
//! - [`Buffer::append`] returns only once its batch is on disk (`fdatasync`), which is when
//!   an input may acknowledge it (a forward chunk's ack, an OTLP export's answer). Appends
//!   that arrive together share one write and one sync (group commit), so many small
//!   chunks cost one sync, not one each.
//! - When the unacknowledged bytes would pass `max_bytes`, an append is refused at once
//!   with [`BufferError::Full`] and nothing is written: the input does not acknowledge, and
//!   its sender retries (Fluent Bit), or gets UNAVAILABLE (OTLP). Nothing is dropped.
//! - A [`Reader`] reads batches in order from the last acknowledged position up to what is
//!   durable; [`Buffer::acknowledge`] records (atomically, synced) how far the output got and
//!   deletes segments wholly before it. After a crash the reader starts again at the last
//!   acknowledgement: a batch may be read twice, never lost.
//! - Each batch is framed `[length u32][crc32 u32][bytes]`. On open, the last segment is
//!   scanned and cut at the first frame that is incomplete or fails its checksum (a write
//!   torn by a crash; such a batch was never acknowledged to its sender).
//!
//! Hand-written rather than a crate: the disk queues on crates.io either sync every
//! append (no group commit), keep one circular file, or are unmaintained, and this
//! contract (acknowledge only after a sync, refuse rather than drop) is the heart of the
//! service.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use mall_telemetry::metrics::IntGauge;
use tokio::sync::{mpsc, oneshot, watch};

use crate::lock;

/// Bytes of a frame's header: length and checksum.
const HEADER: u64 = 8;
/// Bytes written in one group before syncing, at most.
const GROUP_BYTES: usize = 8 * 1024 * 1024;
/// Appends waiting for the writer, at most (callers wait beyond it).
const QUEUE: usize = 1_024;

/// Where a batch starts (or the buffer ends): a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The segment's number (its file is `<number>.seg`).
    pub segment: u64,
    /// Bytes into the segment.
    pub offset: u64,
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The buffer holds `max_bytes` of unacknowledged batches: retry later.
    #[error("the buffer is full ({0} bytes unacknowledged)")]
    Full(u64),
    /// One batch larger than a segment.
    #[error("a batch of {0} bytes is larger than a segment")]
    TooLarge(usize),
    /// The disk failed (or the buffer is closed).
    #[error("buffer I/O: {0}")]
    Io(#[from] io::Error),
}

/// Limits of the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most unacknowledged bytes on disk (frames included).
    pub max_bytes: u64,
    /// Largest segment file.
    pub segment_bytes: u64,
}

/// The latest append the buffer refused for want of room.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// When, by the monotonic clock.
    pub when: std::time::Instant,
    /// When, in milliseconds since the Unix epoch (the clock of [`crate::batch::Batch::received_ms`]).
    pub ms: i64,
    /// Where durable data ended then.
    pub end: Position,
}

/// The writing side; clones share one writer thread.
#[derive(Debug, Clone)]
pub struct Buffer {
    appends: mpsc::Sender<Append>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    limits: Limits,
    /// Where durable data ends.
    end: watch::Sender<Position>,
    /// Sizes of the segments on disk, and the last acknowledged position.
    books: Mutex<Books>,
    /// The note left with the acknowledgement found at open.
    note: Vec<u8>,
    /// Set once a write or sync failed (see [`Writer::broken`]), or acknowledgements
    /// could not be recorded [`ACK_FAILURES`] times in a row.
    failed: watch::Sender<bool>,
    /// Acknowledgements that could not be recorded since the last that could.
    ack_failures: std::sync::atomic::AtomicU32,
    /// When an append was last refused because the buffer was full, and where the buffer
    /// ended then (see [`Buffer::last_refused`]).
    refused: Mutex<Option<Refusal>>,
    /// Where [`Buffer::used_bytes`] is reported each time it changes (see
    /// [`Buffer::report_used_bytes`]).
    used_gauge: std::sync::OnceLock<IntGauge>,
    /// When the writer began the write (and sync) under way, if one is (see
    /// [`Buffer::write_stalled_for`]).
    writing_since: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    /// Reports `books`' unacknowledged bytes, if a gauge was given.
    fn report(&self, books: &Books) {
        if let Some(gauge) = self.used_gauge.get() {
            gauge.set(i64::try_from(books.used()).unwrap_or(i64::MAX));
        }
    }
}

/// Acknowledgements failing in a row after which the buffer counts as failed: nothing
/// acknowledged, nothing is freed, the buffer fills and every sender is refused while the
/// process looks healthy; a restart (which reopens the directory) is better.
const ACK_FAILURES: u32 = 3;

#[derive(Debug)]
struct Books {
    sizes: BTreeMap<u64, u64>,
    acknowledged: Position,
}

impl Books {
    /// Bytes from the acknowledged position to the end.
    fn used(&self) -> u64 {
        self.from(self.acknowledged)
    }

    /// Bytes from `position` to the end.
    fn from(&self, position: Position) -> u64 {
        self.sizes
            .range(position.segment..)
            .map(|(_, size)| size)
            .sum::<u64>()
            .saturating_sub(position.offset)
    }
}

#[derive(Debug)]
struct Append {
    bytes: Bytes,
    done: oneshot::Sender<Result<Position, BufferError>>,
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`, cutting a torn last frame, and starts its
    /// writer thread. Returns it and where the unacknowledged batches start.
    ///
    /// # Errors
    /// When the directory cannot be created or read.
    pub fn open(dir: &Path, limits: Limits) -> io::Result<(Self, Position)> {
        fs::create_dir_all(dir)?;
        let (acknowledged, note) = read_checkpoint(dir)?;
        let mut sizes = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if number < acknowledged.segment {
                fs::remove_file(segment_path(dir, number))?;
            } else {
                sizes.insert(number, 0);
            }
        }
        // Every segment but the last was synced whole before the next began.
        let last = sizes
            .keys()
            .next_back()
            .copied()
            .unwrap_or(acknowledged.segment.max(1));
        for (&number, size) in &mut sizes {
            *size = fs::metadata(segment_path(dir, number))?.len();
        }
        let valid = valid_length(&segment_path(dir, last))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, last))?;
        if file.metadata()?.len() != valid {
            tracing::warn!(
                segment = last,
                cut_bytes = file.metadata()?.len() - valid,
                "the buffer's last write was torn by a crash; cut (it was never acknowledged)"
            );
            file.set_len(valid)?;
        }
        file.sync_all()?;
        sync_dir(dir)?;
        sizes.insert(last, valid);
        let start = if acknowledged.segment == 0 {
            Position {
                segment: *sizes.keys().next().unwrap_or(&last),
                offset: 0,
            }
        } else {
            acknowledged
        };
        let end = Position {
            segment: last,
            offset: valid,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            limits,
            end: watch::channel(end).0,
            books: Mutex::new(Books {
                sizes,
                acknowledged: start,
            }),
            note,
            failed: watch::channel(false).0,
            ack_failures: std::sync::atomic::AtomicU32::new(0),
            refused: Mutex::new(None),
            used_gauge: std::sync::OnceLock::new(),
            writing_since: Mutex::new(None),
        });
        let (appends, receiver) = mpsc::channel(QUEUE);
        let writer = Writer {
            shared: shared.clone(),
            file,
            position: end,
            broken: false,
        };
        std::thread::Builder::new()
            .name("log-buffer-writer".to_owned())
            .spawn(move || writer.run(receiver))?;
        Ok((Self { appends, shared }, start))
    }

    /// Completes once a write or sync has failed: from then on every append is refused
    /// until the process restarts (and reopening rescans the last segment), so whoever
    /// runs the buffer stops the process rather than serve on, refusing everything. Also
    /// once acknowledgements could not be recorded [`ACK_FAILURES`] times in a row (then
    /// nothing is freed and the buffer would fill).
    pub async fn failed(&self) {
        let mut failed = self.shared.failed.subscribe();
        // The sender lives as long as `self`: waiting cannot end otherwise.
        let _ = failed.wait_for(|failed| *failed).await;
    }

    /// Appends one batch; returns where it starts once it is on disk. (`Bytes`, so that a
    /// caller that tries again after [`BufferError::Full`] keeps its batch without a copy.)
    ///
    /// # Errors
    /// [`BufferError::Full`] (nothing written), [`BufferError::TooLarge`], or I/O.
    pub async fn append(&self, bytes: impl Into<Bytes>) -> Result<Position, BufferError> {
        let bytes = bytes.into();
        // A frame of length 0 reads as a torn write: never written.
        if bytes.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty batch").into());
        }
        if bytes.len() as u64 + HEADER > self.shared.limits.segment_bytes
            || u32::try_from(bytes.len()).is_err()
        {
            return Err(BufferError::TooLarge(bytes.len()));
        }
        let (done, answer) = oneshot::channel();
        self.appends
            .send(Append { bytes, done })
            .await
            .map_err(|_| io::Error::other("the buffer's writer stopped"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the buffer's writer stopped"))?
    }

    /// Records that every batch before `position` reached its output, so they are not read
    /// again after a restart, and deletes the segments wholly before it.
    ///
    /// # Errors
    /// When the checkpoint cannot be written.
    ///
    /// Blocking (two syncs): call it from a blocking thread, one call at a time.
    pub fn acknowledge(&self, position: Position) -> io::Result<()> {
        self.acknowledge_with(position, &[])
    }

    /// [`Buffer::acknowledge`], leaving `note` with it: what the reader needs to know to
    /// resume there (returned by [`Buffer::note`] after a restart).
    ///
    /// # Errors
    /// When the checkpoint cannot be written.
    pub fn acknowledge_with(&self, position: Position, note: &[u8]) -> io::Result<()> {
        if position < lock(&self.shared.books).acknowledged {
            return Ok(());
        }
        // Outside the lock: the writer takes it after every sync.
        if let Err(error) = write_checkpoint(&self.shared.dir, position, note) {
            let failures = self
                .shared
                .ack_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if failures >= ACK_FAILURES {
                self.shared.failed.send_replace(true);
            }
            return Err(error);
        }
        self.shared
            .ack_failures
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let old: Vec<u64> = {
            let mut books = lock(&self.shared.books);
            books.acknowledged = position;
            let old: Vec<u64> = books
                .sizes
                .range(..position.segment)
                .map(|(n, _)| *n)
                .collect();
            for number in &old {
                books.sizes.remove(number);
            }
            self.shared.report(&books);
            old
        };
        for number in old {
            // Acknowledged already: a segment left behind is only disk space (the next
            // start deletes it), not a reason to report the acknowledgement failed.
            if let Err(error) = fs::remove_file(segment_path(&self.shared.dir, number)) {
                tracing::warn!(%error, segment = number, "cannot delete an acknowledged segment; it stays on disk until a restart");
            }
        }
        Ok(())
    }

    /// When an append was last refused because the buffer was full, and where the buffer
    /// ended then: a sender whose lines came before that position may have had its next
    /// chunk refused, and sends it again after its own backoff.
    pub fn last_refused(&self) -> Option<Refusal> {
        *lock(&self.shared.refused)
    }

    /// The largest batch [`Buffer::append`] takes: a segment less its frame's header.
    pub fn largest_batch(&self) -> usize {
        usize::try_from(self.shared.limits.segment_bytes.saturating_sub(HEADER))
            .unwrap_or(usize::MAX)
    }

    /// Where durable data ends now.
    pub fn end(&self) -> Position {
        *self.shared.end.borrow()
    }

    /// The note left with the acknowledgement this buffer was opened at (empty if none).
    pub fn note(&self) -> &[u8] {
        &self.shared.note
    }

    /// Keeps `gauge` at [`Buffer::used_bytes`] from now on: set after every synced append
    /// and every acknowledgement, so it rises while Loki is down (nothing is acknowledged
    /// then) and is right from the start (what a restart found on disk). Once: a second
    /// gauge is ignored.
    pub fn report_used_bytes(&self, gauge: IntGauge) {
        let books = lock(&self.shared.books);
        if self.shared.used_gauge.set(gauge).is_ok() {
            self.shared.report(&books);
        }
    }

    /// How long the write (and sync) under way has taken so far; `None` when the writer
    /// waits for appends. A disk that stalls holds every input's answer for as long, with no
    /// way to time out a local write: this is how a readiness probe sees it.
    pub fn write_stalled_for(&self) -> Option<std::time::Duration> {
        lock(&self.shared.writing_since).map(|since| since.elapsed())
    }

    /// Unacknowledged bytes on disk.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.shared.books).used()
    }

    /// Bytes on disk from `position` (not before the acknowledged one) to the end.
    pub fn bytes_from(&self, position: Position) -> u64 {
        let books = lock(&self.shared.books);
        books.from(position.max(books.acknowledged))
    }

    /// The bound on unacknowledged bytes (`buffer.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.shared.limits.max_bytes
    }

    /// Where the newest batches of about `bytes` start, not before `from`: the start of
    /// the oldest segment from which the segments to the end hold at most `bytes` (the
    /// last segment at least), without reading any of them.
    pub fn newest_from(&self, from: Position, bytes: u64) -> Position {
        let books = lock(&self.shared.books);
        let mut held = 0_u64;
        let mut first = None;
        for (&segment, &size) in books.sizes.iter().rev() {
            held = held.saturating_add(size);
            if first.is_some() && held > bytes {
                break;
            }
            first = Some(segment);
        }
        first.map_or(from, |segment| from.max(Position { segment, offset: 0 }))
    }

    /// A reader from `from` (what [`Buffer::open`] returned, or a later position).
    pub fn reader(&self, from: Position) -> Reader {
        Reader {
            shared: self.shared.clone(),
            end: self.shared.end.subscribe(),
            position: from,
            file: None,
        }
    }
}

/// Records framed for the current segment, not written yet: each one's header (length,
/// CRC-32) and bytes, and the bytes of them all.
#[derive(Default)]
struct Pending {
    records: Vec<([u8; HEADER as usize], Bytes)>,
    bytes: u64,
}

/// `write_all` for several slices at once (`Write::write_all_vectored` is not stable).
fn write_all_vectored(file: &mut File, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    position: Position,
    /// Set after a write or sync failed: from then on every append is refused (after a
    /// failed fsync the kernel may have dropped pages it said were written, so nothing
    /// after it can be trusted until a restart rescans the segment).
    broken: bool,
}

impl Writer {
    fn run(mut self, mut appends: mpsc::Receiver<Append>) {
        while let Some(first) = appends.blocking_recv() {
            let mut group = vec![first];
            let mut bytes = group[0].bytes.len();
            while bytes < GROUP_BYTES {
                match appends.try_recv() {
                    Ok(next) => {
                        bytes += next.bytes.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            self.write(group);
        }
    }

    /// Writes and syncs what fits, then answers everyone: refused ones at once, written
    /// ones after the sync.
    fn write(&mut self, group: Vec<Append>) {
        /// Ends the write's time however it ends. A panic also marks the buffer failed: the
        /// writer thread is gone, every append would fail, and the process must restart
        /// (rather than report a stalled disk for ever).
        struct Writing(Arc<Shared>);
        impl Drop for Writing {
            fn drop(&mut self) {
                *lock(&self.0.writing_since) = None;
                if std::thread::panicking() {
                    self.0.failed.send_replace(true);
                }
            }
        }
        *lock(&self.shared.writing_since) = Some(std::time::Instant::now());
        let _writing = Writing(self.shared.clone());
        self.write_group(group);
    }

    fn write_group(&mut self, group: Vec<Append>) {
        if self.broken {
            for append in group {
                let refused =
                    io::Error::other("the buffer's disk failed earlier; restart to recover");
                let _ = append.done.send(Err(refused.into()));
            }
            return;
        }
        let mut written: Vec<(oneshot::Sender<Result<Position, BufferError>>, Position)> =
            Vec::new();
        let mut out = Pending::default();
        let mut used = lock(&self.shared.books).used();
        let limits = self.shared.limits;
        let mut failed = None;
        for append in group {
            let framed = append.bytes.len() as u64 + HEADER;
            if used + framed > limits.max_bytes {
                let end = Position {
                    offset: self.position.offset + out.bytes,
                    ..self.position
                };
                *lock(&self.shared.refused) = Some(Refusal {
                    when: std::time::Instant::now(),
                    ms: crate::batch::now_ms(),
                    end,
                });
                let _ = append.done.send(Err(BufferError::Full(used)));
                continue;
            }
            let full_segment = self.position.offset + out.bytes + framed > limits.segment_bytes
                && self.position.offset + out.bytes > 0;
            if full_segment && let Err(e) = self.flush(&mut out).and_then(|()| self.roll()) {
                failed = Some(e);
                let _ = append
                    .done
                    .send(Err(io::Error::other("buffer I/O failed").into()));
                break;
            }
            let at = Position {
                segment: self.position.segment,
                offset: self.position.offset + out.bytes,
            };
            let length = u32::try_from(append.bytes.len()).unwrap_or(u32::MAX);
            let mut header = [0; HEADER as usize];
            header[..4].copy_from_slice(&length.to_le_bytes());
            header[4..].copy_from_slice(&crc32fast::hash(&append.bytes).to_le_bytes());
            out.bytes += framed;
            out.records.push((header, append.bytes));
            used += framed;
            written.push((append.done, at));
        }
        let result = match failed {
            Some(e) => Err(e),
            None => self.flush(&mut out),
        };
        match result {
            Ok(()) => {
                for (done, at) in written {
                    let _ = done.send(Ok(at));
                }
            }
            Err(e) => {
                self.broken = true;
                self.shared.failed.send_replace(true);
                tracing::error!(error = %e, "the log buffer cannot write to its disk; every append is refused until a restart");
                for (done, _) in written {
                    let _ = done.send(Err(io::Error::new(e.kind(), e.to_string()).into()));
                }
            }
        }
    }

    /// Writes `out` to the current segment and syncs it; then the data is durable.
    fn flush(&mut self, out: &mut Pending) -> io::Result<()> {
        if out.records.is_empty() {
            return Ok(());
        }
        // Each record's header and bytes as they are, not copied into one buffer first.
        let mut slices: Vec<io::IoSlice<'_>> = out
            .records
            .iter()
            .flat_map(|(header, bytes)| [io::IoSlice::new(header), io::IoSlice::new(bytes)])
            // None empty: a write of only empty slices returns 0, taken for a failure.
            .filter(|slice| !slice.is_empty())
            .collect();
        let result =
            write_all_vectored(&mut self.file, &mut slices).and_then(|()| self.file.sync_data());
        drop(slices);
        let written = out.bytes;
        *out = Pending::default();
        // On failure nothing of this group was acknowledged; the writer stops (see
        // `broken`). What of it reached the file is cut now: after a failed sync its pages
        // may still be in the page cache, where a restart in the same pod would read them
        // as valid (and a second sync reports no error), though they may never reach the
        // disk. Reopening cuts whatever is left of it still.
        if let Err(e) = result {
            if let Err(cut) = self.file.set_len(self.position.offset) {
                tracing::error!(error = %cut, "the log buffer could not cut a failed write");
            }
            return Err(e);
        }
        self.position.offset += written;
        {
            let mut books = lock(&self.shared.books);
            books
                .sizes
                .insert(self.position.segment, self.position.offset);
            self.shared.report(&books);
        }
        self.shared.end.send_replace(self.position);
        Ok(())
    }

    /// Starts the next segment (the current one is synced whole).
    fn roll(&mut self) -> io::Result<()> {
        let next = self.position.segment + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.shared.dir, next))?;
        sync_dir(&self.shared.dir)?;
        self.file = file;
        lock(&self.shared.books).sizes.insert(next, 0);
        self.position = Position {
            segment: next,
            offset: 0,
        };
        self.shared.end.send_replace(self.position);
        Ok(())
    }
}

impl Reader {
    /// Whether everything durable has been read.
    pub fn at_end(&self) -> bool {
        self.position >= *self.end.borrow()
    }

    /// Gives up on the rest of the current segment (its data is corrupt): reading goes on
    /// at the next one, or, when the writer is still appending to this one, at where it has
    /// written to now (what it appends after that is read; the next segment would never
    /// come). Returns the positions skipped from and to.
    pub fn skip_segment(&mut self) -> (Position, Position) {
        let from = self.position;
        let end = *self.end.borrow();
        self.position = if from.segment < end.segment {
            Position {
                segment: from.segment + 1,
                offset: 0,
            }
        } else {
            end.max(from)
        };
        self.file = None;
        (from, self.position)
    }
}

/// Reads durable batches in order.
#[derive(Debug)]
pub struct Reader {
    shared: Arc<Shared>,
    end: watch::Receiver<Position>,
    position: Position,
    file: Option<(u64, File)>,
}

impl Reader {
    /// The next batch and the position after it, waiting until one is durable.
    ///
    /// # Errors
    /// When a segment cannot be read or a frame fails its checksum (the disk corrupted
    /// data that was synced).
    pub async fn next(&mut self) -> io::Result<(Vec<u8>, Position)> {
        loop {
            if let Some(batch) = self.try_next()? {
                return Ok(batch);
            }
            if self.end.changed().await.is_err() {
                return Err(io::Error::other("the buffer's writer stopped"));
            }
        }
    }

    /// The next durable batch, if there is one now.
    ///
    /// # Errors
    /// As [`Reader::next`].
    pub fn try_next(&mut self) -> io::Result<Option<(Vec<u8>, Position)>> {
        let end = *self.end.borrow_and_update();
        loop {
            if self.position >= end {
                return Ok(None);
            }
            let size = lock(&self.shared.books)
                .sizes
                .get(&self.position.segment)
                .copied();
            match size {
                // The end of a finished segment (or one deleted under us): the next.
                Some(size)
                    if self.position.offset >= size && self.position.segment < end.segment =>
                {
                    self.position = Position {
                        segment: self.position.segment + 1,
                        offset: 0,
                    };
                }
                None if self.position.segment < end.segment => {
                    self.position = Position {
                        segment: self.position.segment + 1,
                        offset: 0,
                    };
                }
                _ => break,
            }
        }
        if self.position >= end {
            return Ok(None);
        }
        let segment = self.position.segment;
        if self.file.as_ref().is_none_or(|(n, _)| *n != segment) {
            self.file = Some((
                segment,
                File::open(segment_path(&self.shared.dir, segment))?,
            ));
        }
        let (_, file) = self.file.as_mut().expect("opened above");
        file.seek(SeekFrom::Start(self.position.offset))?;
        let mut header = [0_u8; HEADER as usize];
        file.read_exact(&mut header)?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let room = file
            .metadata()?
            .len()
            .saturating_sub(self.position.offset + HEADER);
        if length == 0 || u64::from(length) > room {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "buffer segment {segment} is corrupt at byte {} (a frame of {length} bytes)",
                    self.position.offset
                ),
            ));
        }
        let mut bytes = vec![0; length as usize];
        file.read_exact(&mut bytes)?;
        if crc32fast::hash(&bytes) != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "buffer segment {segment} is corrupt at byte {}",
                    self.position.offset
                ),
            ));
        }
        self.position.offset += HEADER + u64::from(length);
        Ok(Some((bytes, self.position)))
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.seg"))
}

/// The length of the valid frames at the start of the segment file at `path` (0 when it
/// does not exist).
fn valid_length(path: &Path) -> io::Result<u64> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let length = file.metadata()?.len();
    // Read through a small buffer, each frame's checksum computed as it goes: a segment
    // (up to `segment_bytes`, 64 MiB) is not read into memory whole at every start.
    let mut file = io::BufReader::with_capacity(64 * 1024, file);
    let mut piece = vec![0; 64 * 1024];
    let mut at = 0_u64;
    while at + HEADER <= length {
        let mut header = [0; HEADER as usize];
        file.read_exact(&mut header)?;
        let frame = u64::from(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if frame == 0 || at + HEADER + frame > length {
            break;
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut left = frame;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(piece.len());
            file.read_exact(&mut piece[..n])?;
            hasher.update(&piece[..n]);
            left -= n as u64;
        }
        if hasher.finalize() != crc {
            break;
        }
        at += HEADER + frame;
    }
    Ok(at)
}

const CHECKPOINT: &str = "acknowledged";

/// The checkpoint: `<segment> <offset>\n`, then the note its writer left (any bytes).
fn read_checkpoint(dir: &Path) -> io::Result<(Position, Vec<u8>)> {
    let bytes = match fs::read(dir.join(CHECKPOINT)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok((Position::default(), Vec::new()));
        }
        Err(e) => return Err(e),
    };
    let end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut parts = text.trim().split(' ').map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Ok((
            Position { segment, offset },
            bytes.get(end + 1..).unwrap_or_default().to_vec(),
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not `<segment> <offset>`",
                dir.join(CHECKPOINT).display()
            ),
        )),
    }
}

/// Writes the checkpoint atomically: a synced temporary file renamed over the old one.
fn write_checkpoint(dir: &Path, position: Position, note: &[u8]) -> io::Result<()> {
    let temporary = dir.join(format!("{CHECKPOINT}.tmp"));
    let mut file = File::create(&temporary)?;
    file.write_all(format!("{} {}\n", position.segment, position.offset).as_bytes())?;
    file.write_all(note)?;
    file.sync_all()?;
    fs::rename(&temporary, dir.join(CHECKPOINT))?;
    sync_dir(dir)
}

/// Syncs a directory, so files created or renamed in it survive a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 20,
        segment_bytes: 1024,
    };

    fn batch(i: usize) -> Vec<u8> {
        format!("batch {i} {}", "x".repeat(i % 300)).into_bytes()
    }

    async fn read_all(buffer: &Buffer, from: Position) -> Vec<(Vec<u8>, Position)> {
        let mut reader = buffer.reader(from);
        let mut out = Vec::new();
        while let Some(next) = reader.try_next().expect("reads") {
            out.push(next);
        }
        out
    }

    #[tokio::test]
    async fn batches_come_back_in_order_across_segments_and_a_reopen() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        for i in 0..100 {
            buffer.append(batch(i)).await.expect("appends");
        }
        let read = read_all(&buffer, start).await;
        assert_eq!(read.len(), 100);
        assert!(read.iter().enumerate().all(|(i, (b, _))| *b == batch(i)));
        assert!(read.last().expect("some").1.segment > 3, "several segments");
        // Half acknowledged; the rest comes back after a reopen (no clean shutdown).
        buffer.acknowledge(read[49].1).expect("acknowledges");
        drop(buffer);
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("reopens");
        assert_eq!(start, read[49].1);
        let again = read_all(&buffer, start).await;
        assert_eq!(again.len(), 50);
        assert!(
            again
                .iter()
                .enumerate()
                .all(|(i, (b, _))| *b == batch(i + 50))
        );
    }

    /// The gauge given to it follows the unacknowledged bytes: what a reopen found at once,
    /// then every append and acknowledgement (not only the latter: nothing is acknowledged
    /// while Loki is down, when the buffer fills).
    #[tokio::test]
    async fn the_used_bytes_gauge_follows_appends_acknowledgements_and_a_reopen() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("opens");
        let gauge = IntGauge::default();
        buffer.report_used_bytes(gauge.clone());
        assert_eq!(gauge.get(), 0);
        let mut positions = Vec::new();
        for i in 0..20 {
            positions.push(buffer.append(batch(i)).await.expect("appends"));
            assert_eq!(
                gauge.get(),
                i64::try_from(buffer.used_bytes()).expect("fits")
            );
        }
        assert!(gauge.get() > 0);
        drop(buffer);
        let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("reopens");
        let after = IntGauge::default();
        buffer.report_used_bytes(after.clone());
        assert_eq!(after.get(), gauge.get(), "what the reopen found, at once");
        buffer.acknowledge(positions[10]).expect("acknowledges");
        assert!(after.get() < gauge.get());
        assert_eq!(
            after.get(),
            i64::try_from(buffer.used_bytes()).expect("fits")
        );
        let end = buffer.append(batch(20)).await.expect("appends");
        let end = read_all(&buffer, end)
            .await
            .last()
            .map_or(end, |(_, after)| *after);
        buffer.acknowledge(end).expect("acknowledges");
        assert_eq!(after.get(), 0, "everything acknowledged");
    }

    /// A write that does not finish shows, for as long as it takes; none once it is done.
    /// (Two workers: the append runs while this thread holds the books.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_under_way_says_how_long_it_has_taken() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("opens");
        assert_eq!(buffer.write_stalled_for(), None, "nothing written");
        buffer.append(batch(1)).await.expect("appends");
        write_ends(&buffer);
        // The writer records a synced write in the books: holding them holds it, as a
        // stalled disk would.
        let books = lock(&buffer.shared.books);
        let appending = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.append(batch(2)).await }
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let stalled = buffer.write_stalled_for().expect("a write under way");
        assert!(
            stalled >= std::time::Duration::from_millis(250),
            "{stalled:?}"
        );
        drop(books);
        appending.await.expect("joins").expect("appends");
        write_ends(&buffer);
    }

    /// Waits (5 s at most) until the writer has ended its write: it answers the appenders
    /// just before.
    fn write_ends(buffer: &Buffer) {
        let since = std::time::Instant::now();
        while buffer.write_stalled_for().is_some() {
            assert!(
                since.elapsed() < std::time::Duration::from_secs(5),
                "the write ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A frame of the segment still being written fails its checksum: reading goes on at
    /// what the writer had written then, and what it appends afterwards is read (the next
    /// segment, where reading used to go on, would not begin until this one filled).
    #[tokio::test]
    async fn a_corrupt_frame_in_the_segment_being_written_skips_only_what_was_written() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let limits = Limits {
            max_bytes: 1 << 20,
            segment_bytes: 64 * 1024,
        };
        let (buffer, start) = Buffer::open(dir.path(), limits).expect("opens");
        let first = buffer.append(b"first".to_vec()).await.expect("appends");
        let second = buffer.append(b"second".to_vec()).await.expect("appends");
        assert_eq!(first.segment, second.segment);
        // The disk corrupts the second batch's bytes.
        let path = segment_path(dir.path(), second.segment);
        let mut bytes = fs::read(&path).expect("reads");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("writes");

        let mut reader = buffer.reader(start);
        assert_eq!(reader.try_next().expect("reads").expect("one").0, b"first");
        let error = reader.try_next().expect_err("corrupt");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let (from, to) = reader.skip_segment();
        assert_eq!(from, second);
        assert_eq!(to, buffer.end());
        buffer.append(b"third".to_vec()).await.expect("appends");
        assert_eq!(reader.try_next().expect("reads").expect("one").0, b"third");
    }

    /// A write that fails breaks the buffer (every append refused until a restart) and
    /// says so, for the process to stop.
    #[tokio::test]
    async fn a_failed_write_is_reported_and_every_later_append_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("opens");
        // The next segment cannot be created: a directory stands where it goes.
        fs::create_dir(segment_path(dir.path(), buffer.end().segment + 1)).expect("mkdir");
        let mut failed = std::pin::pin!(buffer.failed());
        assert!(futures::poll!(failed.as_mut()).is_pending());
        let mut refused = None;
        for i in 0..100 {
            if let Err(error) = buffer.append(batch(i)).await {
                refused = Some(error);
                break;
            }
        }
        assert!(matches!(refused, Some(BufferError::Io(_))), "{refused:?}");
        tokio::time::timeout(std::time::Duration::from_secs(5), failed)
            .await
            .expect("reported");
        assert!(matches!(
            buffer.append(b"small".to_vec()).await,
            Err(BufferError::Io(_))
        ));
    }

    /// Acknowledgements that cannot be recorded (the disk refuses the checkpoint) report the
    /// buffer failed after a few in a row, so the process restarts instead of filling up.
    #[tokio::test]
    async fn acknowledgements_that_cannot_be_recorded_are_reported() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, _) = Buffer::open(dir.path(), LIMITS).expect("opens");
        let at = buffer.append(batch(1)).await.expect("appends");
        // The checkpoint's temporary file cannot be created: a directory stands there.
        fs::create_dir(dir.path().join(format!("{CHECKPOINT}.tmp"))).expect("mkdir");
        let mut failed = std::pin::pin!(buffer.failed());
        for _ in 1..ACK_FAILURES {
            assert!(buffer.acknowledge(at).is_err());
            assert!(futures::poll!(failed.as_mut()).is_pending(), "not yet");
        }
        assert!(buffer.acknowledge(at).is_err());
        tokio::time::timeout(std::time::Duration::from_secs(5), failed)
            .await
            .expect("reported");
    }

    #[tokio::test]
    async fn the_newest_batches_start_at_a_segment_within_the_bytes_asked() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        for i in 0..100 {
            buffer.append(batch(i)).await.expect("appends");
        }
        let end = buffer.end();
        assert!(end.segment >= start.segment + 5, "several segments");
        let sizes = lock(&buffer.shared.books).sizes.clone();
        // The last segment alone, however few bytes are asked.
        let last = Position {
            segment: end.segment,
            offset: 0,
        };
        assert_eq!(buffer.newest_from(start, 0), last);
        // The last three whole segments.
        let three: u64 = sizes.values().rev().take(3).sum();
        let from = buffer.newest_from(start, three);
        assert_eq!(from.segment, end.segment - 2);
        assert_eq!(
            buffer.newest_from(start, three - 1).segment,
            end.segment - 1
        );
        // Never before `from`, and everything when everything fits.
        assert_eq!(buffer.newest_from(start, u64::MAX), start);
        let later = read_all(&buffer, start).await[10].1;
        assert_eq!(buffer.newest_from(later, u64::MAX), later);
        // What is read from there is the newest batches, in order, to the end.
        let newest = read_all(&buffer, from).await;
        assert_eq!(newest.last().expect("some").0, batch(99));
    }

    #[test]
    fn a_vectored_write_of_more_slices_than_one_call_takes_writes_them_all_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut file = File::create(&path).expect("create");
        // Linux takes 1,024 slices per call: three calls and a bit.
        let parts: Vec<Vec<u8>> = (0..3_500_u32).map(|i| i.to_le_bytes().repeat(3)).collect();
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        write_all_vectored(&mut file, &mut slices).expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), parts.concat());
    }

    #[tokio::test]
    async fn concurrent_appends_each_land_once() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400 {
            let buffer = buffer.clone();
            tasks.spawn(async move { buffer.append(batch(i)).await.map(|_| ()) });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("joins").expect("appends");
        }
        let mut read: Vec<Vec<u8>> = read_all(&buffer, start)
            .await
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        read.sort();
        let mut want: Vec<Vec<u8>> = (0..400).map(batch).collect();
        want.sort();
        assert_eq!(read, want);
    }

    #[tokio::test]
    async fn a_full_buffer_refuses_until_the_output_acknowledges() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let limits = Limits {
            max_bytes: 2_000,
            segment_bytes: 1_000,
        };
        let (buffer, start) = Buffer::open(dir.path(), limits).expect("opens");
        let mut accepted = 0;
        loop {
            match buffer.append(vec![7; 192]).await {
                Ok(_) => accepted += 1,
                Err(BufferError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(accepted, 10, "2,000 bytes hold ten frames of 200");
        assert!(buffer.used_bytes() <= 2_000);
        let read = read_all(&buffer, start).await;
        assert_eq!(read.len(), accepted);
        // After the sixth batch: the first segment (five frames) is wholly before it.
        buffer.acknowledge(read[5].1).expect("acknowledges");
        buffer.append(vec![7; 192]).await.expect("room again");
        assert!(matches!(
            buffer.append(vec![0; 1_000]).await,
            Err(BufferError::TooLarge(1_000))
        ));
        // Segments wholly before the acknowledgement are gone.
        assert!(!segment_path(dir.path(), start.segment).exists());
    }

    #[tokio::test]
    async fn a_torn_last_write_is_cut_and_everything_appended_before_it_survives() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        for i in 0..10 {
            buffer.append(batch(i)).await.expect("appends");
        }
        let end = *buffer.shared.end.borrow();
        drop(buffer);
        // A crash in the middle of the next write: a header and half a payload.
        let mut file = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), end.segment))
            .expect("opens the segment");
        file.write_all(&100_u32.to_le_bytes()).expect("writes");
        file.write_all(&[1, 2, 3, 4, 5, 6]).expect("writes");
        drop(file);
        let (buffer, again) = Buffer::open(dir.path(), LIMITS).expect("reopens");
        assert_eq!(again, start);
        assert_eq!(*buffer.shared.end.borrow(), end);
        let read = read_all(&buffer, again).await;
        assert_eq!(read.len(), 10);
        buffer
            .append(batch(10))
            .await
            .expect("appends after the cut");
        assert_eq!(read_all(&buffer, again).await.len(), 11);
    }

    /// The last segment is checked at start frame by frame, through a small buffer: frames
    /// larger than it are checked whole, and the first that fails its checksum (a torn page
    /// that reached the disk as zeros), or runs past the file's end, ends what is valid.
    #[test]
    fn valid_length_checks_every_frame_through_a_small_buffer() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("segment");
        let frame = |payload: &[u8], crc: u32| {
            let mut out = u32::try_from(payload.len())
                .expect("fits")
                .to_le_bytes()
                .to_vec();
            out.extend(crc.to_le_bytes());
            out.extend(payload);
            out
        };
        let large: Vec<u8> = (0..200_000_u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = frame(b"first", crc32fast::hash(b"first"));
        bytes.extend(frame(&large, crc32fast::hash(&large)));
        let valid = bytes.len() as u64;
        std::fs::write(&path, &bytes).expect("writes");
        assert_eq!(valid_length(&path).expect("reads"), valid);
        // A frame whose payload did not all reach the disk, then another.
        let mut torn = large.clone();
        torn[150_000..].fill(0);
        bytes.extend(frame(&torn, crc32fast::hash(&large)));
        bytes.extend(frame(b"after", crc32fast::hash(b"after")));
        std::fs::write(&path, &bytes).expect("writes");
        assert_eq!(valid_length(&path).expect("reads"), valid);
        // A header alone, and a length running past the end.
        for tail in [&0_u32.to_le_bytes()[..], &frame(b"cut", 0)[..9]] {
            let mut bytes = bytes[..valid as usize].to_vec();
            bytes.extend(tail);
            std::fs::write(&path, &bytes).expect("writes");
            assert_eq!(valid_length(&path).expect("reads"), valid);
        }
        assert_eq!(valid_length(&dir.path().join("none")).expect("reads"), 0);
    }

    /// An empty batch would be a frame of length 0, which reads as a torn write.
    #[tokio::test]
    async fn an_empty_batch_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        assert!(matches!(
            buffer.append(Vec::new()).await,
            Err(BufferError::Io(e)) if e.kind() == io::ErrorKind::InvalidInput
        ));
        buffer.append(batch(0)).await.expect("appends");
        assert_eq!(read_all(&buffer, start).await.len(), 1);
    }

    #[tokio::test]
    async fn a_reader_waits_for_what_is_appended_later() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (buffer, start) = Buffer::open(dir.path(), LIMITS).expect("opens");
        let mut reader = buffer.reader(start);
        let waiting = tokio::spawn(async move { reader.next().await.map(|(b, _)| b) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        buffer.append(b"late".to_vec()).await.expect("appends");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("in time")
            .expect("joins")
            .expect("reads");
        assert_eq!(got, b"late");
    }
}
