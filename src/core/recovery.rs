//! Recovery (a checkpoint and its log replayed into the machine) and what a checkpoint needs
//! from the machine.

use std::collections::BTreeMap;
use std::time::Duration;

use super::log::{PendingPush, WalOp};
use super::{ClientStats, Effect, Machine, Pending, Weights, Work};
use crate::protocol::frame::{PushLimits, ValidatedPush};

/// What a recovery found in the checkpoint and its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub pushes: usize,
    pub steps: usize,
    /// Logged pushes that no logged step applied (they are applied after the steps).
    pub not_yet_aggregated: usize,
}

/// What a checkpoint needs from the machine.
pub struct CheckpointParts {
    pub pending: Vec<PendingPush>,
    /// Client id → last accepted seq.
    pub last_seqs: BTreeMap<String, u64>,
    pub policy: String,
    pub policy_state: serde_json::Value,
}

impl Machine {
    /// Re-applies what a checkpoint and its log hold: `last_seqs` from the checkpoint, then its
    /// pending pushes and the log's records in order. Logged steps are replayed exactly (the
    /// same pushes, weights and broadcasts), so the model, x̂ and the version are those the
    /// crashed server had reached. Pushes that no logged step applied are then aggregated in
    /// steps of up to `max_batch`, in the order they were accepted. Nobody is acknowledged: the
    /// clients that pushed them are gone.
    pub fn recover(
        &mut self,
        now: Duration,
        last_seqs: BTreeMap<String, u64>,
        ops: Vec<WalOp>,
    ) -> (Recovered, Vec<Effect>) {
        let found = self.replay(now, last_seqs, ops);
        self.replayed_pushes.clear();
        self.work.push_back(Work::Flush);
        (found, self.finish(now))
    }

    /// A standby's share of a recovery, as the leader appends: logged pushes become pending and
    /// logged steps are replayed exactly, but pushes no logged step applied yet stay pending
    /// (the leader's later records say what becomes of them). [`Machine::recover`] at takeover
    /// finishes the job.
    pub fn follow(
        &mut self,
        now: Duration,
        last_seqs: BTreeMap<String, u64>,
        ops: Vec<WalOp>,
    ) -> (Recovered, Vec<Effect>) {
        let found = self.replay(now, last_seqs, ops);
        (found, self.finish(now))
    }

    /// Queues what `ops` hold: pushes pending (by client id and seq in `replayed_pushes`), and
    /// logged steps as steps with their logged weights. `not_yet_aggregated` counts the pushes
    /// read so far that no logged step applied.
    fn replay(&mut self, now: Duration, last_seqs: BTreeMap<String, u64>, ops: Vec<WalOp>) -> Recovered {
        for (id, seq) in last_seqs {
            self.clients.insert(id, ClientStats { last_seq: Some(seq), ..Default::default() });
        }
        let n = self.layout.num_params() as u64;
        let limits = PushLimits { num_params: n, max_nnz: n };
        let mut by_seq = std::mem::take(&mut self.replayed_pushes);
        let mut found = Recovered::default();
        for op in ops {
            match op {
                WalOp::Push(p) => {
                    let push = match ValidatedPush::decode(p.frame, &limits) {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(error = %e, client = %p.client_id, "a recovered push does not decode; skipped");
                            continue;
                        }
                    };
                    let mut header = *push.header();
                    header.samples = header.samples.min(self.cfg.max_samples.max(1));
                    let stats = self.clients.entry(p.client_id.clone()).or_default();
                    stats.last_seq = Some(stats.last_seq.map_or(header.seq, |s| s.max(header.seq)));
                    let id = self.next_push;
                    self.next_push += 1;
                    by_seq.insert((p.client_id.clone(), header.seq), id);
                    let pending =
                        Pending { session: 0, client_id: p.client_id, header, push, accepted_at: now };
                    self.pending.insert(id, pending);
                    found.pushes += 1;
                }
                WalOp::Step(s) => {
                    let mut ids = Vec::with_capacity(s.items.len());
                    let mut weights = Vec::with_capacity(s.items.len());
                    for (name, seq, w) in s.items {
                        match by_seq.remove(&(name.clone(), seq)) {
                            Some(id) => {
                                ids.push(id);
                                weights.push(w);
                            }
                            None => tracing::error!(
                                client = %name,
                                seq,
                                "a logged step names a push the log lacks: the resumed model differs from the crashed server's"
                            ),
                        }
                    }
                    self.work.push_back(Work::Step {
                        ids,
                        weights: Weights::Logged(weights),
                        broadcast: Some(s.broadcast),
                        follow_up: false,
                    });
                    found.steps += 1;
                }
            }
        }
        found.not_yet_aggregated = by_seq.len();
        self.replayed_pushes = by_seq;
        found
    }

    /// What a checkpoint holds besides the engine's state: the accepted pushes not aggregated
    /// yet (those the log is still appending included), each client id's last seq, the policy.
    pub fn checkpoint_parts(&self) -> CheckpointParts {
        CheckpointParts {
            pending: self
                .pending
                .values()
                .chain(self.appending.values().map(|a| &a.pending))
                .map(|p| PendingPush { client_id: p.client_id.clone(), frame: p.push.frame().clone() })
                .collect(),
            last_seqs: self.clients.iter().filter_map(|(k, c)| c.last_seq.map(|s| (k.clone(), s))).collect(),
            policy: self.policy.name().into(),
            policy_state: self.policy.state(),
        }
    }
}

#[cfg(test)]
mod tests;
