//! The JetStream log (`--wal nats://HOST:PORT[,…]/STREAM`): the core's records in a replicated
//! NATS JetStream stream, checkpoints in its object store, and a lease in its key-value store
//! that says which server leads.
//!
//! `sparsync nats-init` makes the three (stream `STREAM` on subject `sparsync.STREAM.log`,
//! object store `STREAM-checkpoints`, key-value bucket `STREAM-leader` whose entries live as
//! long as the lease). A server refuses to start on a stream that lacks them.
//!
//! Writes: the records the coordinator appends during one round of work are one *group*,
//! published as one message (or, past the server's `max_payload`, as consecutive chunks with
//! the header `Sparsync-More`). Every message carries `Nats-Expected-Last-Sequence` (so a
//! deposed leader's write is refused by the stream, never appended), a message id (so a
//! retried publish whose first try was stored is not stored twice) and the writer's epoch (the
//! lease revision it holds). A group is acknowledged to the core once the stream acknowledged
//! its last chunk; several groups are in flight. A publish that fails for want of NATS is
//! retried, in order, until it succeeds: nothing is acknowledged meanwhile, and the
//! coordinator stops taking pushes once groups pile up.
//!
//! Reads (a server starting or taking over): the checkpoint, then every message after the
//! position it names. A group whose chunks stop before its last (its writer died mid-group,
//! so none of its records were acknowledged) is dropped.
//!
//! Leadership: the leader creates the lease key and renews it every third of its lifetime. A
//! standby ([`Follower`]) replays the leader's records into its own engine as they come; when
//! the lease lapses it creates it, reads the last records, writes one empty message that
//! fences the stream at the position it read, and serves. A leader that finds another holding
//! its lease, or whose write is refused, stops serving at once.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

pub mod local;

use super::durability::{Checkpoint, Torn, WalOp, decode_records, encode_record};
use super::log::{LogDone, LogFuture, RecordLog};
use crate::config::NatsTarget;

const HEADER_EPOCH: &str = "Sparsync-Epoch";
const HEADER_MORE: &str = "Sparsync-More";
const LEASE_KEY: &str = "leader";
/// Checkpoint objects are named by the stream position they hold (`checkpoint-<position>`):
/// the newest valid one wins, so a stale put by a deposed leader is never the one read.
const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Checkpoint objects kept (older ones are deleted).
const CHECKPOINTS_KEPT: usize = 2;
/// Headroom under `max_payload` for a chunk's headers.
const HEADER_ROOM: usize = 1024;
/// How long a starting server waits for a cluster that does not answer yet.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// Messages a leader may have published and not yet seen acknowledged. Groups that queue
/// behind them are published together (one message of up to `max_payload`), so a busy log
/// writes fewer, larger messages: each is one write and one fsync per node.
const MAX_IN_FLIGHT: usize = 4;
/// A log that confirms no write for this long reports itself stalled: new pushes get busy.
const STALL_AFTER: Duration = Duration::from_secs(2);

/// The names `sparsync nats-init` gives, derived from the stream's.
pub struct Names {
    pub stream: String,
    pub subject: String,
    pub checkpoints: String,
    pub lease: String,
}

impl Names {
    pub fn of(target: &NatsTarget) -> Self {
        Self {
            stream: target.stream.clone(),
            subject: format!("sparsync.{}.log", target.stream),
            checkpoints: format!("{}-checkpoints", target.stream),
            lease: format!("{}-leader", target.stream),
        }
    }
}

/// A connection to the cluster and the names in it.
#[derive(Clone)]
pub struct Nats {
    pub target: NatsTarget,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

fn init_hint(target: &NatsTarget) -> String {
    format!("make it with: sparsync nats-init {target} --replicas 3")
}

impl Nats {
    /// Connects to the servers `target` names (within `timeout`).
    pub async fn connect(target: &NatsTarget, timeout: Duration) -> Result<Self, String> {
        let addrs: Vec<async_nats::ServerAddr> = target
            .servers
            .iter()
            .map(|h| format!("nats://{h}").parse().map_err(|e| format!("NATS server {h:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .request_timeout(Some(Duration::from_secs(5)))
            .max_reconnects(None)
            .connect(addrs)
            .await
            .map_err(|e| format!("cannot reach NATS at {}: {e}", target.servers.join(",")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Ok(Self { target: target.clone(), client, js })
    }

    fn names(&self) -> Names {
        Names::of(&self.target)
    }

    /// Makes the stream, the object store and the lease bucket (`sparsync nats-init`).
    pub async fn init(&self, replicas: usize, lease: Duration) -> Result<String, String> {
        let n = self.names();
        let stream = jetstream::stream::Config {
            name: n.stream.clone(),
            subjects: vec![n.subject.clone()],
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            retention: jetstream::stream::RetentionPolicy::Limits,
            discard: jetstream::stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            description: Some("sparsync: records of accepted pushes and applied steps".into()),
            ..Default::default()
        };
        self.js.get_or_create_stream(stream).await.map_err(|e| format!("stream {}: {e}", n.stream))?;
        self.js
            .create_object_store(jetstream::object_store::Config {
                bucket: n.checkpoints.clone(),
                description: Some("sparsync: the latest checkpoint".into()),
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("object store {}: {e}", n.checkpoints))?;
        self.js
            .create_key_value(jetstream::kv::Config {
                bucket: n.lease.clone(),
                description: "sparsync: which server leads".into(),
                history: 1,
                max_age: lease,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("key-value bucket {}: {e}", n.lease))?;
        Ok(format!(
            "stream {} (subject {}), object store {}, lease bucket {} ({} ms), {replicas} replica(s)",
            n.stream,
            n.subject,
            n.checkpoints,
            n.lease,
            lease.as_millis()
        ))
    }

    /// The stream, refused with what to run when it, its object store or its lease bucket is
    /// missing or not set up for this.
    pub async fn check(&self) -> Result<(jetstream::stream::Stream, jetstream::kv::Store, Duration), String> {
        let n = self.names();
        let hint = init_hint(&self.target);
        // A cluster that has just started (or is electing leaders) may not answer at once: only
        // a stream that does not exist is refused at once.
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        let mut stream = loop {
            match self.js.get_stream(&n.stream).await {
                Ok(s) => break s,
                Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    return Err(format!("JetStream stream {:?} does not exist; {hint}", n.stream));
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(format!(
                        "NATS did not answer about stream {:?} within {START_PATIENCE:?}: {e}",
                        n.stream
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, stream = %n.stream, "NATS did not answer; asking again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let info = stream.info().await.map_err(|e| format!("stream {:?}: {e}", n.stream))?;
        if !info.config.subjects.iter().any(|s| s == &n.subject) {
            return Err(format!(
                "stream {:?} does not take subject {:?} (it takes {:?}): not a sparsync log; {hint}",
                n.stream, n.subject, info.config.subjects
            ));
        }
        if info.config.storage != jetstream::stream::StorageType::File {
            return Err(format!("stream {:?} keeps its messages in memory, not on disk; {hint}", n.stream));
        }
        if info.config.max_age != Duration::ZERO || info.config.max_messages > 0 || info.config.max_bytes > 0
        {
            return Err(format!(
                "stream {:?} drops messages by age or size (max_age {:?}, max_msgs {}, max_bytes {}): acknowledged pushes could be lost; {hint}",
                n.stream, info.config.max_age, info.config.max_messages, info.config.max_bytes
            ));
        }
        if info.config.num_replicas < 3 {
            tracing::warn!(
                stream = %n.stream,
                replicas = info.config.num_replicas,
                "the stream has fewer than 3 replicas: losing a NATS node can lose acknowledged pushes"
            );
        }
        self.js
            .get_object_store(&n.checkpoints)
            .await
            .map_err(|e| format!("object store {:?}: {e}; {hint}", n.checkpoints))?;
        let kv = self
            .js
            .get_key_value(&n.lease)
            .await
            .map_err(|e| format!("key-value bucket {:?}: {e}; {hint}", n.lease))?;
        let lease = kv.status().await.map_err(|e| format!("key-value bucket {:?}: {e}", n.lease))?.max_age();
        if lease.is_zero() {
            return Err(format!(
                "key-value bucket {:?} keeps entries forever: a lease must lapse; {hint}",
                n.lease
            ));
        }
        Ok((stream, kv, lease))
    }

    /// Checkpoint objects by position, newest first.
    async fn checkpoint_names(
        &self,
        store: &jetstream::object_store::ObjectStore,
    ) -> Result<Vec<(u64, String)>, String> {
        let n = self.names();
        let mut list = store.list().await.map_err(|e| format!("listing {}: {e}", n.checkpoints))?;
        let mut out = Vec::new();
        while let Some(o) = list.next().await {
            let o = o.map_err(|e| format!("listing {}: {e}", n.checkpoints))?;
            if o.deleted {
                continue;
            }
            if let Some(p) = o.name.strip_prefix(CHECKPOINT_PREFIX).and_then(|p| p.parse::<u64>().ok()) {
                out.push((p, o.name.clone()));
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.0));
        Ok(out)
    }

    /// The newest valid checkpoint in the object store, if any (unreadable ones are skipped
    /// with a warning).
    pub async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, String> {
        let n = self.names();
        let store = self.js.get_object_store(&n.checkpoints).await.map_err(|e| e.to_string())?;
        for (_, name) in self.checkpoint_names(&store).await? {
            let at = format!("{}/{name}", n.checkpoints);
            let mut obj = match store.get(&name).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, checkpoint = %at, "skipping an unreadable checkpoint");
                    continue;
                }
            };
            // (Not `read_to_end`: the object's reader may fail after filling part of the buffer,
            // which tokio's `read_to_end` asserts against in debug builds.)
            let mut bytes = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            let read = loop {
                match tokio::io::AsyncReadExt::read(&mut obj, &mut chunk).await {
                    Ok(0) => break Ok(()),
                    Ok(k) => bytes.extend_from_slice(&chunk[..k]),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = read {
                tracing::warn!(error = %e, checkpoint = %at, "skipping an unreadable checkpoint");
                continue;
            }
            match Checkpoint::from_bytes(&bytes, Path::new(&at)) {
                Ok(c) => return Ok(Some(c)),
                Err(e) => tracing::warn!(error = %e, "skipping an unusable checkpoint"),
            }
        }
        Ok(None)
    }

    /// The stream's last sequence.
    async fn last_sequence(&self) -> Result<u64, String> {
        let n = self.names();
        let mut stream = self.js.get_stream(&n.stream).await.map_err(|e| e.to_string())?;
        Ok(stream.info().await.map_err(|e| e.to_string())?.state.last_sequence)
    }

    /// The epoch of the writer of the stream's last message (0: none, or written by none).
    async fn last_epoch(&self) -> Result<u64, String> {
        let n = self.names();
        let mut stream = self.js.get_stream(&n.stream).await.map_err(|e| e.to_string())?;
        let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
        if last == 0 {
            return Ok(0);
        }
        let m = stream.get_raw_message(last).await.map_err(|e| e.to_string())?;
        Ok(m.headers.get(HEADER_EPOCH).and_then(|v| v.as_str().parse().ok()).unwrap_or(0))
    }

    /// The records in the stream after position `after`, and the stream's last position.
    pub async fn read_log(&self, after: u64) -> Result<(Vec<WalOp>, u64), String> {
        let n = self.names();
        let mut stream = self.js.get_stream(&n.stream).await.map_err(|e| e.to_string())?;
        let state = stream.info().await.map_err(|e| e.to_string())?.state.clone();
        let last = state.last_sequence;
        if last <= after {
            return Ok((Vec::new(), last));
        }
        if state.first_sequence > after + 1 {
            return Err(format!(
                "stream {:?} starts at {} but the checkpoint needs every record after {after}: records were removed",
                n.stream, state.first_sequence
            ));
        }
        let mut messages = ordered_from(&mut stream, after + 1)
            .await
            .map_err(|e| format!("reading stream {:?}: {e}", n.stream))?;
        let mut groups = Groups::default();
        let mut next = after + 1;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| format!("reading stream {:?}: {e}", n.stream))?;
            let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
            if seq < next {
                // A consumer the client recreated may deliver from further back: read already.
                continue;
            }
            if seq > next {
                return Err(format!(
                    "stream {:?} skipped from {next} to {seq}: records were removed",
                    n.stream
                ));
            }
            next += 1;
            groups.take(seq, m.headers.as_ref(), &m.payload)?;
            if seq >= last {
                break;
            }
        }
        Ok((groups.finish(), last))
    }
}

/// The stream's messages from sequence `start` on, in order (and then as they are appended).
async fn ordered_from(
    stream: &mut jetstream::stream::Stream,
    start: u64,
) -> Result<jetstream::consumer::pull::Ordered, String> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// Reassembles groups from messages in stream order.
#[derive(Default)]
struct Groups {
    ops: Vec<WalOp>,
    open: Option<(u64, BytesMut)>,
}

impl Groups {
    fn take(&mut self, seq: u64, headers: Option<&HeaderMap>, payload: &[u8]) -> Result<(), String> {
        let header = |k: &str| headers.and_then(|h| h.get(k)).map(|v| v.as_str().to_string());
        let epoch: u64 = header(HEADER_EPOCH).and_then(|e| e.parse().ok()).unwrap_or(0);
        let more = header(HEADER_MORE).is_some();
        if let Some((e, _)) = &self.open
            && *e != epoch
        {
            tracing::warn!(
                seq,
                "a group its writer did not finish was dropped (none of it was acknowledged)"
            );
            self.open = None;
        }
        let (_, buf) = self.open.get_or_insert_with(|| (epoch, BytesMut::new()));
        buf.extend_from_slice(payload);
        if !more {
            let (_, buf) = self.open.take().unwrap_or_default();
            let (ops, torn) = decode_records(&buf);
            if let Some(t) = torn {
                let offset = match t {
                    Torn::Torn { offset } | Torn::Corrupt { offset } => offset,
                };
                return Err(format!("the group ending at stream message {seq} is corrupt at byte {offset}"));
            }
            self.ops.extend(ops);
        }
        Ok(())
    }

    /// The records of the groups completed so far.
    fn drain(&mut self) -> Vec<WalOp> {
        std::mem::take(&mut self.ops)
    }

    fn finish(self) -> Vec<WalOp> {
        if self.open.is_some() {
            tracing::warn!(
                "the stream ends in a group its writer did not finish: dropped (none of it was acknowledged)"
            );
        }
        self.ops
    }
}

/// The lease a leader holds.
pub struct Lease {
    kv: jetstream::kv::Store,
    revision: u64,
    lifetime: Duration,
}

impl Lease {
    /// Takes the lease when nobody holds it. `holder` names this server (shown to others).
    pub async fn acquire(
        kv: jetstream::kv::Store,
        lifetime: Duration,
        holder: &str,
    ) -> Result<Self, StartError> {
        let value = Bytes::from(holder.to_string());
        // A cluster that has just started may not answer yet: transient errors are retried (a
        // retried create that was stored the first time is recognised by the holder's nonce).
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        loop {
            match kv.create(LEASE_KEY, value.clone()).await {
                Ok(revision) => return Ok(Self { kv, revision, lifetime }),
                Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                    let entry = kv.entry(LEASE_KEY).await.ok().flatten();
                    if let Some(en) = &entry
                        && en.value == value
                        && en.operation == jetstream::kv::Operation::Put
                    {
                        return Ok(Self { kv, revision: en.revision, lifetime });
                    }
                    let who = entry
                        .map(|en| String::from_utf8_lossy(&en.value).to_string())
                        .unwrap_or_else(|| "another server".into());
                    return Err(StartError::LeaseHeld(format!(
                        "{who} leads this stream (its lease lasts {lifetime:?} after its last renewal); start this server with --standby to take over when it stops"
                    )));
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(StartError::Other(format!("taking the lease: {e}")));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "taking the lease failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The epoch this lease gives its writes.
    pub fn epoch(&self) -> u64 {
        self.revision
    }

    /// Renews the lease every third of its lifetime, from now on. Reports when another server
    /// holds it. A renewal that fails for want of NATS is retried: the stream's fencing, not the
    /// lease, keeps two leaders from both writing, and with no NATS no standby can take over.
    /// Stops when the returned receiver is dropped.
    fn keep(self, nats: Nats, holder: String) -> mpsc::UnboundedReceiver<LogDone> {
        let (lost, rx) = mpsc::unbounded_channel();
        let deposed = |lost: &mpsc::UnboundedSender<LogDone>| {
            let _ = lost.send(LogDone::Deposed { reason: "another server took the lease".into() });
        };
        tokio::spawn(async move {
            let Lease { kv, mut revision, lifetime } = self;
            let epoch = revision;
            let period = lifetime / 3;
            let value = Bytes::from(holder);
            loop {
                tokio::time::sleep(period).await;
                if lost.is_closed() {
                    return;
                }
                match tokio::time::timeout(period, kv.update(LEASE_KEY, value.clone(), revision)).await {
                    Ok(Ok(r)) => revision = r,
                    Ok(Err(e)) if e.kind() == jetstream::kv::UpdateErrorKind::TimedOut => {
                        tracing::warn!("renewing the lease timed out; retrying")
                    }
                    // Refused (the key is at another revision: async-nats says WrongLastRevision,
                    // or Other for the error code newer servers give) or failed: the entry
                    // tells which.
                    Ok(Err(e)) => match kv.entry(LEASE_KEY).await {
                        // A renewal that timed out earlier but was stored: ours.
                        Ok(Some(en))
                            if en.value == value && en.operation == jetstream::kv::Operation::Put =>
                        {
                            revision = en.revision;
                        }
                        Ok(Some(en)) if en.operation == jetstream::kv::Operation::Put => {
                            return deposed(&lost);
                        }
                        // Lapsed while NATS was away and nobody took it: take it again, if
                        // nobody wrote the stream meanwhile either (its last message is this
                        // leader's: another leader's fence would follow it; this leader's own
                        // writes may still be in flight, so its position cannot tell).
                        Ok(_) => match nats.last_epoch().await {
                            Ok(last) if last == epoch => match kv.create(LEASE_KEY, value.clone()).await {
                                Ok(r) => {
                                    tracing::warn!(
                                        "the lease lapsed (NATS was unreachable) and was taken again"
                                    );
                                    revision = r;
                                }
                                // Taken by another, or by this create on an earlier try: the
                                // next renewal tells.
                                Err(c) => {
                                    tracing::warn!(error = %c, "taking the lapsed lease again failed; retrying")
                                }
                            },
                            Ok(_) => return deposed(&lost),
                            Err(r) => {
                                tracing::warn!(error = %r, "reading the stream's last writer failed; retrying")
                            }
                        },
                        Err(r) => {
                            tracing::warn!(renewal = %e, error = %r, "renewing the lease failed, and so did reading it; retrying")
                        }
                    },
                    Err(_) => tracing::warn!("renewing the lease timed out; retrying"),
                }
            }
        });
        rx
    }
}

/// What a starting leader read from the stream.
pub struct Start {
    pub nats: Nats,
    pub checkpoint: Option<Checkpoint>,
    pub ops: Vec<WalOp>,
    pub last: u64,
    /// The position of the newest checkpoint (what a new checkpoint may purge up to).
    checkpointed: u64,
    epoch: u64,
    /// Where the stream stands as far as this leader knows (the lease's renewal reads it).
    position: Arc<AtomicU64>,
    lease_lost: mpsc::UnboundedReceiver<LogDone>,
}

/// Why a leader could not start on the stream.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another server holds the lease.
    #[error("{0}")]
    LeaseHeld(String),
    /// The stream, its object store or its lease bucket is missing or not set up for this.
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Other(String),
}

/// Connects, checks, takes the lease and reads the checkpoint and the stream after it.
pub async fn start(target: &NatsTarget, holder: &str) -> Result<Start, StartError> {
    let nats = Nats::connect(target, Duration::from_secs(5)).await.map_err(StartError::Other)?;
    let (_, kv, lifetime) = nats.check().await.map_err(StartError::Setup)?;
    // The holder names this process uniquely, so a renewal that was stored although it timed
    // out is recognised as its own.
    let holder = format!("{holder} [{:016x}]", rand::random::<u64>());
    let lease = Lease::acquire(kv, lifetime, &holder).await?;
    let epoch = lease.epoch();
    // Renewed from now on: reading a long log must not let the lease lapse.
    let position = Arc::new(AtomicU64::new(0));
    let lease_lost = lease.keep(nats.clone(), holder);
    let checkpoint = nats.load_checkpoint().await.map_err(StartError::Other)?;
    let after = checkpoint.as_ref().map_or(0, |c| c.wal_seq);
    let (ops, last) = nats.read_log(after).await.map_err(StartError::Other)?;
    position.store(last, Ordering::Release);
    Ok(Start { nats, checkpointed: after, checkpoint, ops, last, epoch, position, lease_lost })
}

/// A standby that follows the stream while the leader holds the lease: it read the newest
/// checkpoint and the records after it, and reads what the leader appends as it comes, so that
/// its engine is current when it takes over.
pub struct Follower {
    nats: Nats,
    kv: jetstream::kv::Store,
    lifetime: Duration,
    checkpointed: u64,
    messages: jetstream::consumer::pull::Ordered,
    /// The stream sequence expected next.
    next: u64,
    groups: Groups,
}

impl Follower {
    /// Connects, checks, and reads the newest checkpoint and every record after it (no lease).
    pub async fn start(target: &NatsTarget) -> Result<(Self, Option<Checkpoint>, Vec<WalOp>), StartError> {
        let nats = Nats::connect(target, Duration::from_secs(5)).await.map_err(StartError::Other)?;
        let (stream, kv, lifetime) = nats.check().await.map_err(StartError::Setup)?;
        Self::read(nats, stream, kv, lifetime, target).await.map_err(StartError::Other)
    }

    async fn read(
        nats: Nats,
        mut stream: jetstream::stream::Stream,
        kv: jetstream::kv::Store,
        lifetime: Duration,
        target: &NatsTarget,
    ) -> Result<(Self, Option<Checkpoint>, Vec<WalOp>), String> {
        let checkpoint = nats.load_checkpoint().await?;
        let after = checkpoint.as_ref().map_or(0, |c| c.wal_seq);
        let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
        // One consumer from the checkpoint on: what is there now, then what the leader appends
        // (a group whose chunks straddle "now" is read whole).
        let messages = ordered_from(&mut stream, after + 1)
            .await
            .map_err(|e| format!("following stream {}: {e}", target.stream))?;
        let mut me = Self {
            nats,
            kv,
            lifetime,
            checkpointed: after,
            messages,
            next: after + 1,
            groups: Groups::default(),
        };
        me.read_to(last).await?;
        let ops = me.groups.drain();
        Ok((me, checkpoint, ops))
    }

    /// Reads messages until the stream's message `last` was read.
    async fn read_to(&mut self, last: u64) -> Result<(), String> {
        while self.next <= last {
            let m = tokio::time::timeout(Duration::from_secs(10), self.messages.next())
                .await
                .map_err(|_| "reading the stream timed out".to_string())?;
            let Some(m) = m else { return Err("the stream's consumer ended".into()) };
            self.take(m)?;
        }
        Ok(())
    }

    /// The records the leader appended since the last call: waits up to `wait` for the first
    /// message, then takes what has arrived.
    pub async fn next(&mut self, wait: Duration) -> Result<Vec<WalOp>, String> {
        let mut got = match tokio::time::timeout(wait, self.messages.next()).await {
            Ok(m) => m,
            Err(_) => return Ok(Vec::new()),
        };
        for taken in 1.. {
            let Some(m) = got else { return Err("the stream's consumer ended".into()) };
            self.take(m)?;
            if taken == 4096 {
                break;
            }
            match futures_util::FutureExt::now_or_never(self.messages.next()) {
                Some(m) => got = m,
                None => break,
            }
        }
        Ok(self.groups.drain())
    }

    fn take(
        &mut self,
        m: Result<jetstream::Message, jetstream::consumer::pull::OrderedError>,
    ) -> Result<(), String> {
        let m = m.map_err(|e| format!("following the stream: {e}"))?;
        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
        if seq < self.next {
            // A consumer the client recreated may deliver from further back: read already.
            return Ok(());
        }
        if seq != self.next {
            return Err(format!(
                "the stream skipped from {} to {seq}: the leader purged records this standby had not read yet; restart it",
                self.next
            ));
        }
        self.next += 1;
        self.groups.take(seq, m.headers.as_ref(), &m.payload)
    }

    /// Whether nobody holds the lease.
    pub async fn lease_free(&mut self) -> bool {
        match self.kv.entry(LEASE_KEY).await {
            Ok(None) => true,
            Ok(Some(e)) => e.operation != jetstream::kv::Operation::Put,
            Err(_) => false,
        }
    }

    /// How often to look at the lease.
    pub fn lease_period(&self) -> Duration {
        self.lifetime / 10
    }

    /// Takes the lease and reads the stream to its end: a [`Start`] for [`NatsLog::open`]
    /// (no checkpoint or records in it: the follower applied them) and the records not yet
    /// handed out. On [`StartError::LeaseHeld`] the follower goes on following.
    pub async fn take_over(&mut self, holder: &str) -> Result<(Start, Vec<WalOp>), StartError> {
        let holder = format!("{holder} [{:016x}]", rand::random::<u64>());
        let lease = Lease::acquire(self.kv.clone(), self.lifetime, &holder).await?;
        let epoch = lease.epoch();
        let position = Arc::new(AtomicU64::new(0));
        let lease_lost = lease.keep(self.nats.clone(), holder);
        let last = self.nats.last_sequence().await.map_err(StartError::Other)?;
        self.read_to(last).await.map_err(StartError::Other)?;
        let rest = std::mem::take(&mut self.groups).finish();
        position.store(last, Ordering::Release);
        let start = Start {
            nats: self.nats.clone(),
            checkpoint: None,
            ops: Vec::new(),
            last,
            checkpointed: self.checkpointed,
            epoch,
            position,
            lease_lost,
        };
        Ok((start, rest))
    }
}

/// One message to publish.
struct Chunk {
    payload: Bytes,
    /// The stream's last sequence before it.
    expected: u64,
    more: bool,
    /// The core's last record in it (on a group's last chunk).
    upto: Option<u64>,
}

/// The JetStream log of a leader.
pub struct NatsLog {
    buf: Vec<u8>,
    upto: Option<u64>,
    /// The last record of each group committed and not yet held, oldest first (the writer
    /// may publish several groups as one).
    unsettled: VecDeque<u64>,
    groups: mpsc::UnboundedSender<(Vec<u8>, u64)>,
    done: mpsc::UnboundedReceiver<LogDone>,
    lease_lost: mpsc::UnboundedReceiver<LogDone>,
    /// The stream's last sequence this leader saw acknowledged.
    position: Arc<AtomicU64>,
    /// The position of the checkpoint in the object store.
    checkpointed: u64,
    /// Never purge (`--keep-log`).
    keep: bool,
    nats: Nats,
    /// Bytes of records committed.
    bytes: u64,
}

impl NatsLog {
    /// Fences the stream at `start.last` (one empty message in this leader's epoch) and starts
    /// the writer and the lease's renewal.
    pub async fn open(start: Start, keep: bool) -> Result<(Self, Option<Checkpoint>, Vec<WalOp>), String> {
        let Start { nats, checkpoint, ops, last, checkpointed, epoch, position, lease_lost } = start;
        let names = nats.names();
        // The fence follows whatever is last (another writer's message): no message-id chain.
        let fence = message(Bytes::new(), last, epoch, false, false);
        let ack = nats
            .js
            .send_publish(names.subject.clone(), fence)
            .await
            .map_err(|e| format!("writing to stream {}: {e}", names.stream))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => format!(
                    "stream {} moved on while it was read (another server writes it): not taking over",
                    names.stream
                ),
                _ => format!("writing to stream {}: {e}", names.stream),
            })?;
        position.store(ack.sequence, Ordering::Release);
        let (groups, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        let max = nats.client.server_info().max_payload.saturating_sub(HEADER_ROOM).max(4096);
        let writer = Writer {
            js: nats.js.clone(),
            stream: names.stream.clone(),
            subject: names.subject,
            epoch,
            expected: ack.sequence,
            max_chunk: max,
            position: position.clone(),
            done: done_tx,
            since: tokio::time::Instant::now(),
            stalled: false,
            last_error: None,
        };
        tokio::spawn(writer.run(rx));
        tracing::info!(stream = %names.stream, epoch, position = ack.sequence, "leading the JetStream log");
        let log = Self {
            buf: Vec::new(),
            upto: None,
            unsettled: VecDeque::new(),
            groups,
            done,
            lease_lost,
            position,
            checkpointed,
            keep,
            nats,
            bytes: 0,
        };
        Ok((log, checkpoint, ops))
    }
}

/// A message at stream position `expected + 1`, with id `<epoch>-<position>`. `chained`: it
/// must also follow this writer's own message at `expected` (`Nats-Expected-Last-Msg-Id`):
/// with several publishes in flight, a position check alone would let a later one land after
/// another writer's message if an earlier one was refused.
fn message(payload: Bytes, expected: u64, epoch: u64, more: bool, chained: bool) -> PublishMessage {
    let mut m = PublishMessage::build()
        .payload(payload)
        .expected_last_sequence(expected)
        .message_id(format!("{epoch}-{}", expected + 1))
        .header(HEADER_EPOCH, epoch.to_string().as_str());
    if chained {
        m = m.expected_last_message_id(format!("{epoch}-{expected}"));
    }
    if more {
        m = m.header(HEADER_MORE, "1");
    }
    m
}

impl RecordLog for NatsLog {
    fn append(&mut self, seq: u64, op: &WalOp) -> Option<Result<(), String>> {
        encode_record(op, &mut self.buf);
        self.upto = Some(seq);
        None
    }

    fn commit(&mut self) {
        let Some(upto) = self.upto.take() else { return };
        let buf = std::mem::take(&mut self.buf);
        tracing::debug!(upto, bytes = buf.len(), "log group committed");
        let len = buf.len() as u64;
        if self.groups.send((buf, upto)).is_ok() {
            self.bytes += len;
            self.unsettled.push_back(upto);
        }
    }

    fn backlog(&self) -> usize {
        self.unsettled.len()
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn done(&mut self) -> LogFuture<'_, LogDone> {
        Box::pin(async move {
            let d = tokio::select! {
                d = self.done.recv() => d.unwrap_or(LogDone::Deposed { reason: "the JetStream writer stopped".into() }),
                Some(d) = self.lease_lost.recv() => d,
            };
            if let LogDone::Held { upto } = d {
                while self.unsettled.front().is_some_and(|&u| u <= upto) {
                    self.unsettled.pop_front();
                }
            }
            d
        })
    }

    fn keeps_checkpoints(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, mut c: Checkpoint) -> LogFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let names = self.nats.names();
            let position = self.position.load(Ordering::Acquire);
            c.wal_seq = position;
            let bytes = tokio::task::spawn_blocking(move || c.to_bytes())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            // Only a leader whose last write is still the stream's last keeps a checkpoint: one
            // that was deposed (another server wrote since) must not.
            let last = self.nats.last_sequence().await?;
            if last != position {
                return Err(format!(
                    "stream {} is at {last}, past this server's position {position}: another server leads",
                    names.stream
                ));
            }
            let store = self.nats.js.get_object_store(&names.checkpoints).await.map_err(|e| e.to_string())?;
            let name = format!("{CHECKPOINT_PREFIX}{position:020}");
            store
                .put(name.as_str(), &mut bytes.as_slice())
                .await
                .map_err(|e| format!("putting the checkpoint into {}: {e}", names.checkpoints))?;
            for (_, old) in self.nats.checkpoint_names(&store).await?.into_iter().skip(CHECKPOINTS_KEPT) {
                if let Err(e) = store.delete(&old).await {
                    tracing::warn!(error = %e, checkpoint = %old, "deleting an old checkpoint failed");
                }
            }
            // What the previous checkpoint held is not needed any more (what came after it is
            // kept, for one checkpoint's slack).
            if self.checkpointed > 0 && !self.keep {
                let stream = self.nats.js.get_stream(&names.stream).await.map_err(|e| e.to_string())?;
                if let Err(e) = stream.purge().sequence(self.checkpointed + 1).await {
                    tracing::warn!(error = %e, "purging records before the previous checkpoint failed");
                }
            }
            self.checkpointed = position;
            Ok(format!("{}/{name}", names.checkpoints))
        })
    }
}

/// The task that publishes groups in order and reports them held.
struct Writer {
    js: jetstream::Context,
    stream: String,
    subject: String,
    epoch: u64,
    /// The stream's last sequence after the chunks published so far.
    expected: u64,
    max_chunk: usize,
    position: Arc<AtomicU64>,
    done: mpsc::UnboundedSender<LogDone>,
    /// The last progress: a chunk confirmed, or the first chunk of a batch sent when none was
    /// in flight.
    since: tokio::time::Instant,
    /// Reported stalled (no progress for [`STALL_AFTER`]) and not confirmed since.
    stalled: bool,
    /// The last failure of a write, for the stall's report.
    last_error: Option<String>,
}

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

impl Writer {
    async fn run(mut self, mut groups: mpsc::UnboundedReceiver<(Vec<u8>, u64)>) {
        let mut in_flight: VecDeque<(Chunk, Option<AckFuture>)> = VecDeque::new();
        loop {
            let stall_at = (!self.stalled && !in_flight.is_empty()).then_some(self.since + STALL_AFTER);
            tokio::select! {
                biased;
                r = async { in_flight.front_mut().expect("guarded").1.as_mut().expect("sent").await }, if in_flight.front().is_some_and(|f| f.1.is_some()) => {
                    match r {
                        Ok(ack) => {
                            let (chunk, _) = in_flight.pop_front().expect("front");
                            self.confirmed(&chunk, ack.sequence);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, stream = %self.stream, "a JetStream write failed; retrying in order");
                            self.last_error = Some(e.to_string());
                            if !self.resend(&mut in_flight).await {
                                return;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(stall_at.unwrap_or_else(tokio::time::Instant::now)), if stall_at.is_some() => {
                    self.stall();
                }
                g = groups.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                    let Some((mut buf, mut upto)) = g else { return };
                    // Groups that queued meanwhile go out in the same publish (up to one
                    // chunk): fewer, larger messages, each one write (and fsync) per node.
                    while buf.len() < self.max_chunk {
                        match groups.try_recv() {
                            Ok((more, u)) => {
                                buf.extend_from_slice(&more);
                                upto = u;
                            }
                            Err(_) => break,
                        }
                    }
                    if in_flight.is_empty() {
                        self.since = tokio::time::Instant::now();
                    }
                    for chunk in self.split(buf, upto) {
                        let fut = self.send(&chunk).await;
                        in_flight.push_back((chunk, fut));
                    }
                    if in_flight.iter().any(|f| f.1.is_none()) && !self.resend(&mut in_flight).await {
                        return;
                    }
                }
            }
        }
    }

    fn split(&mut self, buf: Vec<u8>, upto: u64) -> Vec<Chunk> {
        let buf = Bytes::from(buf);
        let n = buf.len().div_ceil(self.max_chunk).max(1);
        (0..n)
            .map(|i| {
                let payload = buf.slice(i * self.max_chunk..((i + 1) * self.max_chunk).min(buf.len()));
                let last = i + 1 == n;
                let chunk =
                    Chunk { payload, expected: self.expected, more: !last, upto: last.then_some(upto) };
                self.expected += 1;
                chunk
            })
            .collect()
    }

    /// Publishes a chunk; `None` when it could not even be sent.
    async fn send(&self, c: &Chunk) -> Option<AckFuture> {
        let m = message(c.payload.clone(), c.expected, self.epoch, c.more, true);
        match self.js.send_publish(self.subject.clone(), m).await {
            Ok(f) => Some(Box::pin(f.into_future())),
            Err(e) => {
                tracing::warn!(error = %e, stream = %self.stream, "a JetStream publish could not be sent");
                None
            }
        }
    }

    /// Reports the log stalled (once until a write is confirmed again).
    fn stall(&mut self) {
        if self.stalled {
            return;
        }
        self.stalled = true;
        let why = match &self.last_error {
            Some(e) => format!("the last failure: {e}"),
            None => "NATS does not answer".into(),
        };
        let reason = format!(
            "JetStream stream {} confirmed no write for {} s; {why}",
            self.stream,
            STALL_AFTER.as_secs_f64()
        );
        tracing::warn!(%reason, "the log stalled: new pushes are refused as busy until it confirms writes again");
        let _ = self.done.send(LogDone::Stalled { reason: Some(reason) });
    }

    /// Waits for a publish's ack, reporting the log stalled if it takes too long.
    async fn ack(
        &mut self,
        mut f: AckFuture,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        if !self.stalled {
            tokio::select! {
                biased;
                r = &mut f => return r,
                _ = tokio::time::sleep_until(self.since + STALL_AFTER) => self.stall(),
            }
        }
        f.await
    }

    fn confirmed(&mut self, c: &Chunk, sequence: u64) {
        tracing::debug!(sequence, upto = ?c.upto, "log chunk held");
        self.position.store(sequence, Ordering::Release);
        self.since = tokio::time::Instant::now();
        self.last_error = None;
        if self.stalled {
            self.stalled = false;
            tracing::info!(stream = %self.stream, "the log confirms writes again: pushes are taken again");
            let _ = self.done.send(LogDone::Stalled { reason: None });
        }
        if let Some(upto) = c.upto {
            let _ = self.done.send(LogDone::Held { upto });
        }
    }

    /// After a failure: publishes the unconfirmed chunks again, one at a time and in order,
    /// until each is stored (a chunk whose first try was stored is recognised by its message
    /// id). Returns false when the stream holds another writer's message where the next chunk
    /// belongs (this server is deposed).
    async fn resend(&mut self, in_flight: &mut VecDeque<(Chunk, Option<AckFuture>)>) -> bool {
        let mut backoff = Duration::from_millis(50);
        while let Some((chunk, _)) = in_flight.front() {
            let sent = self.send(chunk).await;
            let outcome = match sent {
                Some(f) => self.ack(f).await.map_err(|e| (e.kind(), e.to_string())),
                None => Err((PublishErrorKind::Other, "not sent".into())),
            };
            match outcome {
                Ok(ack) => {
                    let (chunk, _) = in_flight.pop_front().expect("front");
                    self.confirmed(&chunk, ack.sequence);
                    backoff = Duration::from_millis(50);
                }
                Err((PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId, _)) => {
                    match self.stored_as_ours(chunk).await {
                        Some(true) => {
                            let (chunk, _) = in_flight.pop_front().expect("front");
                            self.confirmed(&chunk, chunk.expected + 1);
                        }
                        Some(false) => {
                            let _ = self.done.send(LogDone::Deposed {
                                reason: format!(
                                    "stream {} holds another writer's message at {}: another server leads",
                                    self.stream,
                                    chunk.expected + 1
                                ),
                            });
                            return false;
                        }
                        None => {
                            self.wait(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                // (No stream, or no responders, is what a publish gets while JetStream elects a
                // new stream leader: retried like a timeout.)
                Err((kind @ PublishErrorKind::MaxPayloadExceeded, e)) => {
                    let _ = self.done.send(LogDone::Deposed {
                        reason: format!(
                            "stream {} cannot take this server's writes ({kind}: {e})",
                            self.stream
                        ),
                    });
                    return false;
                }
                Err((_, e)) => {
                    tracing::warn!(error = %e, stream = %self.stream, "a JetStream write failed; retrying");
                    self.last_error = Some(e);
                    self.wait(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            if self.done.is_closed() {
                return false;
            }
        }
        true
    }

    /// Sleeps before a retry, reporting the log stalled if no write was confirmed for long.
    async fn wait(&mut self, backoff: Duration) {
        tokio::time::sleep(backoff).await;
        if self.since.elapsed() >= STALL_AFTER {
            self.stall();
        }
    }

    /// Whether the stream's message after `c.expected` is this chunk (`None`: cannot tell now).
    async fn stored_as_ours(&self, c: &Chunk) -> Option<bool> {
        let stream = self.js.get_stream(&self.stream).await.ok()?;
        match stream.get_raw_message(c.expected + 1).await {
            Ok(m) => {
                let id = m.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str().to_string());
                Some(id.as_deref() == Some(format!("{}-{}", self.epoch, c.expected + 1).as_str()))
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                // Nothing there, yet the stream refused the expected sequence: another
                // writer's messages were purged or the stream was reset.
                Some(false)
            }
            Err(_) => None,
        }
    }
}
