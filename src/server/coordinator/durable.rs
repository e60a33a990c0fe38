//! Durability in the shell: the log the core's [`Effect::Append`]s go to ([`RecordLog`]), and
//! checkpoints.
//!
//! [`RecordLog`]: crate::server::log::RecordLog

use std::time::Duration;

use tokio::time::Instant;

use super::Coordinator;
use crate::config::WalTarget;
use crate::core::{Effect, Input};
use crate::protocol::message::ServerMessage;
use crate::server::durability::{Checkpoint, WalOp};
use crate::server::log::LogDone;
use crate::server::nats::{Follower, NatsLog, StartError};
use crate::server::outbox::Outbound;

/// Seconds between checkpoints with a JetStream log when neither cadence is set.
const NATS_CHECKPOINT_S: f64 = 10.0;

/// When the last checkpoint was written (with a log that keeps checkpoints).
pub(super) struct Durable {
    pub(super) last_at: Instant,
    pub(super) last_version: u64,
}

/// What a resuming server replays before it serves: each client id's last accepted seq (from
/// the checkpoint), then the checkpoint's pending pushes and the log's records, in order.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    pub last_seqs: std::collections::BTreeMap<String, u64>,
    pub ops: Vec<WalOp>,
    /// A standby's start: the pushes no logged step applied stay pending (the leader decides).
    pub following: bool,
}

impl Resume {
    /// What `c` and the records after it (`log`) hold.
    pub fn from_checkpoint(c: Option<&Checkpoint>, log: Vec<WalOp>) -> Self {
        let mut ops: Vec<WalOp> =
            c.map(|c| c.pending.iter().cloned().map(WalOp::Push).collect()).unwrap_or_default();
        ops.extend(log);
        Self { last_seqs: c.map(|c| c.registry.clone()).unwrap_or_default(), ops, following: false }
    }
}

impl Coordinator {
    /// Hands a record the core asked for to the log, and tells the core when it is held (at
    /// once for a local file; a log that settles later reports through [`Coordinator::log_done`]).
    pub(super) fn append(&mut self, seq: u64, op: &WalOp) -> Vec<Effect> {
        let t0 = std::time::Instant::now();
        let written = self.log.append(seq, op);
        self.metrics.stage("wal", t0.elapsed());
        match written {
            None => Vec::new(),
            Some(Ok(())) => {
                // Admitting the push (the policy, its Ack) is the policy stage's time.
                let t0 = std::time::Instant::now();
                let effects = self.core(Input::Appended { upto: seq });
                self.metrics.stage("policy", t0.elapsed());
                effects
            }
            Some(Err(e)) => {
                if matches!(op, WalOp::Step(_)) {
                    tracing::error!(error = %e, "write-ahead log failed: a crash now would replay this step differently");
                } else {
                    tracing::error!(error = %e, "write-ahead log failed");
                }
                self.core(Input::AppendFailed { seq, reason: e })
            }
        }
    }

    /// A log that settles records later reported: the core learns what is held. Returns true
    /// when this server must stop (deposed: another server leads the log).
    pub(super) async fn log_done(&mut self, d: LogDone) -> bool {
        match d {
            LogDone::Held { upto } => {
                let effects = self.core(Input::Appended { upto });
                self.apply(effects).await;
                false
            }
            LogDone::Stalled { reason } => {
                let effects = self.core(Input::LogStalled { reason });
                self.apply(effects).await;
                false
            }
            LogDone::Deposed { reason } => {
                tracing::error!(%reason, "this server no longer leads the log: it stops serving, acknowledging nothing more");
                self.deposed = true;
                for (_, o) in self.outboxes.drain() {
                    o.push(Outbound::Text(
                        ServerMessage::error(
                            "server",
                            format!("this server stopped leading: {reason}; reconnect to another"),
                            true,
                        )
                        .to_json(),
                    ));
                    o.close_with(1012, "another server leads");
                }
                self.rx.close();
                true
            }
        }
    }

    /// Ends this round's group of records and waits until the log holds every record handed to
    /// it. Returns false when the server was deposed meanwhile, or (unless `patient`) as soon
    /// as the log is stalled.
    pub(super) async fn drain_log(&mut self, patient: bool) -> bool {
        if self.deposed {
            return false;
        }
        self.log.commit();
        while self.log.backlog() > 0 && !self.deposed {
            if self.log_stalled() && !patient {
                return false;
            }
            let d = self.log.done().await;
            if self.log_done(d).await {
                return false;
            }
            self.log.commit();
        }
        !self.deposed
    }

    /// Applies what a checkpoint and its log hold (see [`Machine::recover`]), writes a fresh
    /// checkpoint, before any client is served.
    pub(super) async fn start_durability(&mut self) -> Result<(), String> {
        if let Some(r) = self.resume.take() {
            // Replayed steps are in the log already; the steps formed for pushes no logged
            // step applied are appended like any other (a local file WAL opens only with the
            // checkpoint below, which holds them).
            let input = if r.following {
                Input::Follow { last_seqs: r.last_seqs, ops: r.ops }
            } else {
                Input::Recover { last_seqs: r.last_seqs, ops: r.ops }
            };
            let mut effects = self.core(input);
            let found = match effects.first() {
                Some(Effect::Recovered(found)) => *found,
                _ => Default::default(),
            };
            effects.retain(|e| !matches!(e, Effect::Recovered(_)));
            self.apply(effects).await;
            self.settle().await;
            if found.pushes + found.steps > 0 {
                tracing::info!(
                    pushes = found.pushes,
                    steps = found.steps,
                    not_yet_aggregated = found.not_yet_aggregated,
                    version = self.machine.version(),
                    "replayed the checkpoint and its log"
                );
            }
        }
        if self.engine_failed.load(std::sync::atomic::Ordering::Acquire) {
            // Logged steps it could not replay: a checkpoint now would drop them from the log.
            return Err("the engine failed while replaying the log".into());
        }
        if let Some(f) = self.follower.take() {
            self.follow_then_lead(f).await?;
        }
        if self.durable.is_some() {
            self.checkpoint(true).await?;
        }
        Ok(())
    }

    /// A standby: replays what the leader appends as it comes, so that the engine is current;
    /// once the leader's lease lapses, takes it, reads the last records, fences the stream,
    /// aggregates the pushes no logged step applied (logged, like any step) and returns, to
    /// serve.
    async fn follow_then_lead(&mut self, mut f: Follower) -> Result<(), String> {
        tracing::info!(version = self.machine.version(), "standing by: following the leader's log");
        let holder = format!("sparsync (pid {}) at {}", std::process::id(), self.cfg.listen);
        loop {
            if f.lease_free().await {
                match f.take_over(&holder).await {
                    Ok((start, rest)) => {
                        let (log, _, _) = NatsLog::open(start, self.cfg.keep_log).await?;
                        self.log = Box::new(log);
                        self.durable =
                            Some(Durable { last_at: Instant::now(), last_version: self.machine.version() });
                        let records = rest.len();
                        self.replay(Input::Recover { last_seqs: Default::default(), ops: rest }).await;
                        tracing::info!(records, version = self.machine.version(), "took over the log");
                        return Ok(());
                    }
                    Err(StartError::LeaseHeld(m)) => {
                        tracing::info!(%m, "another standby leads now; following it")
                    }
                    Err(StartError::Other(m) | StartError::Setup(m)) => return Err(m),
                }
            }
            let ops = f.next(f.lease_period()).await?;
            if !ops.is_empty() {
                self.replay(Input::Follow { last_seqs: Default::default(), ops }).await;
            }
            if self.engine_failed.load(std::sync::atomic::Ordering::Acquire) {
                // Its model no longer holds what the log says: it must not take over.
                return Err("the engine failed while following the log".into());
            }
        }
    }

    /// Hands a recovery's or a standby's records to the core and waits for the engine.
    async fn replay(&mut self, input: Input) {
        let mut effects = self.core(input);
        effects.retain(|e| !matches!(e, Effect::Recovered(_)));
        self.apply(effects).await;
        self.settle().await;
    }

    pub(super) async fn maybe_checkpoint(&mut self) {
        let Some(d) = &self.durable else { return };
        if self.log_stalled() {
            // It would wait for the log; it is written once the log confirms writes again.
            return;
        }
        let version = self.machine.version();
        let mut every_s = self.cfg.checkpoint_every_s;
        if every_s == 0.0
            && self.cfg.checkpoint_every_versions == 0
            && matches!(self.cfg.wal, WalTarget::Nats(_))
        {
            // A JetStream log with no cadence set: a new leader's replay stays short.
            every_s = NATS_CHECKPOINT_S;
        }
        let by_time = every_s > 0.0 && d.last_at.elapsed() >= Duration::from_secs_f64(every_s);
        let by_versions = self.cfg.checkpoint_every_versions > 0
            && version >= d.last_version + self.cfg.checkpoint_every_versions;
        if (by_time || by_versions)
            && version != d.last_version
            && let Err(e) = self.checkpoint(false).await
        {
            tracing::error!(error = %e, "checkpoint failed");
        }
    }

    /// Writes a checkpoint of everything accepted so far; the log may then drop older records.
    /// Unless `patient`, gives up when the log stalls meanwhile.
    pub(super) async fn checkpoint(&mut self, patient: bool) -> Result<String, String> {
        // The state must hold exactly the steps the log holds: no step may be in flight, and
        // the log must hold every record handed to it.
        if !self.settle_within(patient).await {
            return Err(if self.deposed {
                "deposed: another server leads the log".into()
            } else {
                "the log stalled: the checkpoint waits until it confirms writes again".into()
            });
        }

        if self.durable.is_none() {
            return Err("no checkpoint directory".into());
        }
        let state = self.engine.call(|e| e.read_state()).await.map_err(|e| e.to_string())?;
        let parts = self.machine.checkpoint_parts();
        let layout = self.machine.layout();
        let ckpt = Checkpoint {
            model: layout.name.clone(),
            layout: layout.tensors.clone(),
            registry: parts.last_seqs,
            pending: parts.pending,
            policy: parts.policy,
            policy_state: parts.policy_state,
            wal_seq: 0,
            state,
            wal: Vec::new(),
        };
        let version = ckpt.state.version;
        let written = self.log.checkpoint(ckpt).await?;
        if let Some(d) = self.durable.as_mut() {
            d.last_at = Instant::now();
            d.last_version = version;
        }
        tracing::info!(version, at = %written, "checkpoint written");
        Ok(written)
    }
}
