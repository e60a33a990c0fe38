//! Synchronization policies (docs/algorithms.md §5): *when* updates form a batch, *whether* a client
//! may go on, and *what* each client is told.
//!
//! A policy is pure logic over a clock: the coordinator calls it with the time since the server
//! started and executes the [`Action`]s it returns. No sockets, no GPU, no runtime; tests drive
//! time by passing it.

pub(crate) mod adsp;
pub(crate) mod asp;
pub(crate) mod bsp;
pub(crate) mod fedbuff;
pub(crate) mod hermes;
pub(crate) mod ssp;
pub mod staleness;

use std::time::Duration;

use crate::protocol::message::{Directive, RoundTime, SkipReport};
use staleness::Normalization;

/// A session, as numbered by the coordinator.
pub type SessionId = u64;
/// An accepted Push waiting in the coordinator, as numbered by the coordinator.
pub type PushId = u64;

/// Where a loss sample came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossSource {
    /// The training loss a client sent with a Push.
    Push(SessionId),
    /// An evaluator's score of the public replica (held-out data).
    Evaluator,
}

/// What a policy knows of an accepted Push.
#[derive(Clone, Debug, PartialEq)]
pub struct PushMeta {
    pub id: PushId,
    pub session: SessionId,
    pub seq: u64,
    pub base_version: u64,
    /// Staleness at acceptance.
    pub staleness: u64,
    pub samples: u32,
    pub local_steps: u32,
    pub loss: f32,
}

#[cfg(test)]
impl PushMeta {
    /// A push for policy tests: seq = id, built on version 0, fresh, one sample, loss 1.
    pub(crate) fn for_test(id: PushId, session: SessionId) -> Self {
        PushMeta {
            id,
            session,
            seq: id,
            base_version: 0,
            staleness: 0,
            samples: 1,
            local_steps: 1,
            loss: 1.0,
        }
    }
}

/// What the coordinator must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Aggregate these accepted pushes as one batch, in this order, then broadcast.
    Aggregate {
        pushes: Vec<PushId>,
        normalization: Normalization,
    },
    /// Let the client go on: send the Ack of this push.
    Ack(PushId),
    /// Tell a client it was dropped from a synchronous round.
    RoundDropped {
        session: SessionId,
        round: u64,
        reason: String,
    },
    Directive {
        session: SessionId,
        directive: Directive,
    },
}

/// A synchronization policy. Only trainers are reported to it (evaluators never push).
pub trait SyncPolicy: Send + Sync {
    fn name(&self) -> &'static str;
    fn on_join(&mut self, now: Duration, client: SessionId) -> Vec<Action>;
    fn on_leave(&mut self, now: Duration, client: SessionId) -> Vec<Action>;
    fn on_push(&mut self, now: Duration, push: &PushMeta) -> Vec<Action>;
    /// A batch was aggregated and broadcast as `version`.
    fn on_aggregated(&mut self, _now: Duration, _version: u64, _pushes: &[PushId]) -> Vec<Action> {
        Vec::new()
    }
    /// Hermes: a client finished a round without a significant improvement.
    fn on_skip(&mut self, _now: Duration, _client: SessionId, _report: &SkipReport) -> Vec<Action> {
        Vec::new()
    }
    /// A client reports how long its last local round took.
    fn on_round_time(&mut self, _now: Duration, _client: SessionId, _report: &RoundTime) -> Vec<Action> {
        Vec::new()
    }
    /// A sample of the global loss.
    fn on_loss(&mut self, _now: Duration, _source: LossSource, _loss: f64) {}
    /// Timers: called after every event and at [`SyncPolicy::next_wakeup`].
    fn poll(&mut self, now: Duration) -> Vec<Action>;
    /// When `poll` next needs to run, if a timer is pending.
    fn next_wakeup(&self) -> Option<Duration> {
        None
    }
    /// Shutdown: aggregate every accepted push still held.
    fn drain(&mut self) -> Vec<Action>;
    /// The policy's own state, for `/api/status`.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Splits `pushes` into `Aggregate` actions of at most `max_batch` each.
pub fn batches(pushes: Vec<PushId>, max_batch: usize, normalization: Normalization) -> Vec<Action> {
    pushes.chunks(max_batch.max(1)).map(|c| Action::Aggregate { pushes: c.to_vec(), normalization }).collect()
}

/// Accepted pushes waiting to be aggregated as soon as possible, in acceptance order: every
/// `poll` takes at most `max_batch` of them as one batch, so what queued while the engine was
/// busy forms the next batch. ASP, SSP, ADSP and Hermes aggregate this way.
#[derive(Clone, Debug)]
pub struct Ready {
    pushes: Vec<PushId>,
    max_batch: usize,
}

impl Ready {
    pub fn new(max_batch: usize) -> Self {
        Self { pushes: Vec::new(), max_batch: max_batch.max(1) }
    }

    pub fn push(&mut self, id: PushId) {
        self.pushes.push(id);
    }

    pub fn len(&self) -> usize {
        self.pushes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pushes.is_empty()
    }

    /// The oldest `max_batch` pushes as one batch, if any wait.
    pub fn next_batch(&mut self, normalization: Normalization) -> Option<Action> {
        if self.pushes.is_empty() {
            return None;
        }
        let take = self.pushes.len().min(self.max_batch);
        Some(Action::Aggregate { pushes: self.pushes.drain(..take).collect(), normalization })
    }

    /// Every waiting push, in batches of at most `max_batch` (shutdown).
    pub fn drain(&mut self, normalization: Normalization) -> Vec<Action> {
        batches(std::mem::take(&mut self.pushes), self.max_batch, normalization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_queue_batches_in_acceptance_order() {
        let mut r = Ready::new(2);
        for id in [5, 3, 9] {
            r.push(id);
        }
        let agg = |v: Vec<PushId>| Action::Aggregate { pushes: v, normalization: Normalization::Batch };
        assert_eq!(r.next_batch(Normalization::Batch), Some(agg(vec![5, 3])));
        r.push(1);
        assert_eq!(r.drain(Normalization::Batch), vec![agg(vec![9, 1])]);
        assert!(r.is_empty() && r.next_batch(Normalization::Batch).is_none());
    }
}
