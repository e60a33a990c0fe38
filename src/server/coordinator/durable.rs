//! Durability in the shell: the write-ahead log the core's [`Effect::Append`]s go to, and
//! checkpoints (with `--checkpoint-dir`).

use std::time::Duration;

use tokio::time::Instant;

use super::Coordinator;
use crate::core::{Effect, Input};
use crate::server::durability::{Checkpoint, Wal, WalOp};

/// Checkpoint and WAL state (with `--checkpoint-dir`).
pub(super) struct Durable {
    pub(super) dir: std::path::PathBuf,
    pub(super) wal: Option<Wal>,
    pub(super) wal_seq: u64,
    pub(super) last_at: Instant,
    pub(super) last_version: u64,
}

impl Coordinator {
    /// Keeps a record the core asked for in the write-ahead log (when one is open), then tells
    /// the core it is held (or that it is not).
    pub(super) fn append(&mut self, seq: u64, op: &WalOp) -> Vec<Effect> {
        let written = match self.durable.as_mut().and_then(|d| d.wal.as_mut()) {
            Some(wal) => {
                let t0 = std::time::Instant::now();
                let r = wal.append_op(op);
                self.metrics.stage("wal", t0.elapsed());
                r
            }
            None => Ok(()),
        };
        match written {
            Ok(()) => {
                // Admitting the push (the policy, its Ack) is the policy stage's time.
                let t0 = std::time::Instant::now();
                let effects = self.core(Input::Appended { upto: seq });
                self.metrics.stage("policy", t0.elapsed());
                effects
            }
            Err(e) => {
                let step = matches!(op, WalOp::Step(_));
                if step {
                    tracing::error!(error = %e, "write-ahead log failed: a crash now would replay this step differently");
                } else {
                    tracing::error!(error = %e, "write-ahead log failed");
                }
                self.core(Input::AppendFailed { seq, reason: e.to_string() })
            }
        }
    }

    /// Applies what a checkpoint and its WAL hold (see [`Machine::recover`]), writes a fresh
    /// checkpoint and opens a WAL, before any client is served.
    pub(super) async fn start_durability(&mut self) -> Result<(), String> {
        if let Some(c) = self.resume.take() {
            let mut ops: Vec<WalOp> = c.pending.into_iter().map(WalOp::Push).collect();
            ops.extend(c.wal);
            let mut effects = self.core(Input::Recover { last_seqs: c.registry, ops });
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
                    "replayed the checkpoint and WAL"
                );
            }
        }
        if self.durable.is_some() {
            self.checkpoint().await?;
        }
        Ok(())
    }

    pub(super) async fn maybe_checkpoint(&mut self) {
        let Some(d) = &self.durable else { return };
        let version = self.machine.version();
        let by_time = self.cfg.checkpoint_every_s > 0.0
            && d.last_at.elapsed() >= Duration::from_secs_f64(self.cfg.checkpoint_every_s);
        let by_versions = self.cfg.checkpoint_every_versions > 0
            && version >= d.last_version + self.cfg.checkpoint_every_versions;
        if (by_time || by_versions)
            && version != d.last_version
            && let Err(e) = self.checkpoint().await
        {
            tracing::error!(error = %e, "checkpoint failed");
        }
    }

    /// Writes a checkpoint of everything accepted so far, then starts a new WAL file.
    pub(super) async fn checkpoint(&mut self) -> Result<std::path::PathBuf, String> {
        // The state must hold exactly the steps the log holds: no step may be in flight.
        self.settle().await;
        let Some(d) = &self.durable else { return Err("no checkpoint directory".into()) };
        let (dir, wal_seq) = (d.dir.clone(), d.wal_seq);
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
            wal_seq,
            state,
            wal: Vec::new(),
        };
        let version = ckpt.state.version;
        let written = tokio::task::spawn_blocking(move || ckpt.write(&dir, 3))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(d) = self.durable.as_mut() else { return Err("no checkpoint directory".into()) };
        if self.cfg.wal {
            // The checkpoint naming this WAL file is durable: records before it can go.
            match &mut d.wal {
                Some(w) => w.rotate(wal_seq).map_err(|e| e.to_string())?,
                None => d.wal = Some(Wal::start(&d.dir, wal_seq).map_err(|e| e.to_string())?),
            }
        }
        d.wal_seq = wal_seq + 1;
        d.last_at = Instant::now();
        d.last_version = version;
        tracing::info!(version, path = %written.display(), "checkpoint written");
        Ok(written)
    }
}
