//! The log behind the core: where the records of [`Effect::Append`](crate::core::Effect) go
//! and where checkpoints are kept. Three implementations of one trait:
//! - [`NoLog`]: nothing is kept (no `--checkpoint-dir`);
//! - [`FileLog`]: checkpoints in `--checkpoint-dir`, and with `--wal` the local file WAL
//!   (each record written before the call returns);
//! - [`NatsLog`](super::nats::NatsLog): a JetStream stream (`--wal nats://…`), written in
//!   groups (one publish per group of records, several groups in flight) and settled later.
//!
//! The coordinator hands every record to [`RecordLog::append`], ends each round of work with
//! [`RecordLog::commit`], and tells the core what [`RecordLog::done`] reports.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use super::durability::{Checkpoint, Wal, WalOp};

/// A boxed future of a log (the trait is used as `dyn`).
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What became of records handed to a log that settles them later.
#[derive(Clone, Debug, PartialEq)]
pub enum LogDone {
    /// Every record up to this seq (the core's numbering) is durable.
    Held { upto: u64 },
    /// Another server writes the log now (or this one lost its lease): nothing more from this
    /// server may be appended or acknowledged. It stops serving.
    Deposed { reason: String },
    /// No write was confirmed for a while (`Some`: why; its cluster is unreachable, say), or
    /// writes are confirmed again (`None`). Records stay queued and are written when it
    /// returns; meanwhile the server refuses new pushes as busy.
    Stalled { reason: Option<String> },
}

/// Where the core's records and the checkpoints go.
pub trait RecordLog: Send {
    /// Takes record `seq` (the core numbers records from 1 in the order it emits them).
    /// `Some` when it is settled already (a local file), `None` when [`RecordLog::done`] will
    /// report it.
    fn append(&mut self, seq: u64, op: &WalOp) -> Option<Result<(), String>>;

    /// Ends a group: what was appended since the last call is written as one.
    fn commit(&mut self) {}

    /// Groups committed and not yet settled.
    fn backlog(&self) -> usize {
        0
    }

    /// Bytes of records written (or handed to the writer) so far.
    fn bytes(&self) -> u64 {
        0
    }

    /// The next report of a log that settles records later. Cancel-safe; never ready for a
    /// log that settles every record in [`RecordLog::append`].
    fn done(&mut self) -> LogFuture<'_, LogDone> {
        Box::pin(std::future::pending())
    }

    /// Whether [`RecordLog::checkpoint`] keeps anything.
    fn keeps_checkpoints(&self) -> bool;

    /// Keeps a checkpoint of everything appended so far (the caller waited until nothing was
    /// outstanding), after which the log may drop the records it holds. `wal_seq` is the
    /// log's to fill. Returns where it went.
    fn checkpoint(&mut self, c: Checkpoint) -> LogFuture<'_, Result<String, String>>;
}

/// No log and no checkpoints.
pub struct NoLog;

impl RecordLog for NoLog {
    fn append(&mut self, _seq: u64, _op: &WalOp) -> Option<Result<(), String>> {
        Some(Ok(()))
    }

    fn keeps_checkpoints(&self) -> bool {
        false
    }

    fn checkpoint(&mut self, _c: Checkpoint) -> LogFuture<'_, Result<String, String>> {
        Box::pin(async { Err("no checkpoint directory".to_string()) })
    }
}

/// Checkpoints in a directory and, with `--wal`, the file WAL beside them.
pub struct FileLog {
    dir: PathBuf,
    wal_on: bool,
    wal: Option<Wal>,
    /// The WAL file the next checkpoint names (records after it go there).
    wal_seq: u64,
    /// Bytes of records written.
    bytes: u64,
}

impl FileLog {
    pub fn new(dir: PathBuf, wal: bool) -> Self {
        Self { wal_seq: Wal::next_seq(&dir), dir, wal_on: wal, wal: None, bytes: 0 }
    }
}

impl RecordLog for FileLog {
    fn append(&mut self, _seq: u64, op: &WalOp) -> Option<Result<(), String>> {
        Some(match &mut self.wal {
            Some(w) => w.append_op(op).map(|n| self.bytes += n as u64).map_err(|e| e.to_string()),
            None => Ok(()),
        })
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn keeps_checkpoints(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, mut c: Checkpoint) -> LogFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let (dir, wal_seq) = (self.dir.clone(), self.wal_seq);
            c.wal_seq = wal_seq;
            let written = tokio::task::spawn_blocking(move || c.write(&dir, 3))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if self.wal_on {
                // The checkpoint naming this WAL file is durable: records before it can go.
                match &mut self.wal {
                    Some(w) => w.rotate(wal_seq).map_err(|e| e.to_string())?,
                    None => self.wal = Some(Wal::start(&self.dir, wal_seq).map_err(|e| e.to_string())?),
                }
            }
            self.wal_seq = wal_seq + 1;
            Ok(written.display().to_string())
        })
    }
}
