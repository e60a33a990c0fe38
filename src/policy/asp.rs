//! ASP: every update is aggregated as soon as possible; the updates that arrived while the
//! engine was busy form one batch (each keeps its own staleness).

use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, Policy, PushMeta, Ready, SessionId, SyncPolicy};

crate::settings::settings! {
    /// ASP has no settings of its own (it uses `max_batch`).
    pub struct AspSettings;
    pub struct AspFlags;
}

/// Asynchronous parallel: acknowledge at once, aggregate whatever is pending.
pub struct Asp {
    pending: Ready,
}

impl Asp {
    pub fn new(max_batch: usize) -> Self {
        Self { pending: Ready::new(max_batch) }
    }
}

impl Policy for Asp {
    type Settings = AspSettings;
    fn build(_settings: &AspSettings, common: &Common) -> Self {
        Self::new(common.max_batch)
    }
}

impl SyncPolicy for Asp {
    fn name(&self) -> &'static str {
        "asp"
    }

    fn on_join(&mut self, _now: Duration, _client: SessionId) -> Vec<Action> {
        Vec::new()
    }

    fn on_leave(&mut self, _now: Duration, _client: SessionId) -> Vec<Action> {
        // Its accepted pushes were acknowledged: they stay and are aggregated.
        Vec::new()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        self.pending.push(push.id);
        vec![Action::Ack(push.id)]
    }

    fn poll(&mut self, _now: Duration) -> Vec<Action> {
        self.pending.next_batch(Normalization::Batch).into_iter().collect()
    }

    fn drain(&mut self) -> Vec<Action> {
        self.pending.drain(Normalization::Batch)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "pending": self.pending.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PushId;

    fn push(id: PushId) -> PushMeta {
        PushMeta::for_test(id, 1)
    }

    #[test]
    fn acks_at_once_and_batches_what_queued() {
        let mut p = Asp::new(2);
        let t = Duration::ZERO;
        assert_eq!(p.on_push(t, &push(1)), vec![Action::Ack(1)]);
        assert_eq!(p.on_push(t, &push(2)), vec![Action::Ack(2)]);
        assert_eq!(p.on_push(t, &push(3)), vec![Action::Ack(3)]);
        let agg = |v: Vec<PushId>| Action::Aggregate { pushes: v, normalization: Normalization::Batch };
        assert_eq!(p.poll(t), vec![agg(vec![1, 2])]);
        assert_eq!(p.poll(t), vec![agg(vec![3])]);
        assert!(p.poll(t).is_empty());
    }
}
