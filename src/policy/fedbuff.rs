//! FedBuff(K) (Nguyen et al. 2022): updates are acknowledged at once and buffered; every K of
//! them form one batch.

use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, Policy, PushId, PushMeta, SessionId, SyncPolicy};
use crate::settings::Invalid;

crate::settings::settings! {
    /// FedBuff's settings.
    pub struct FedBuffSettings;
    pub struct FedBuffFlags;
    ["Policy"]
    fedbuff_k: val usize = "10", "FedBuff: aggregate every K buffered updates";
}

impl Policy for FedBuff {
    type Settings = FedBuffSettings;
    fn build(settings: &FedBuffSettings, _common: &Common) -> Self {
        Self::new(settings.fedbuff_k)
    }
    fn validate(settings: &FedBuffSettings) -> Result<(), Invalid> {
        if settings.fedbuff_k == 0 {
            return Err(Invalid { field: "fedbuff_k", reason: "must be at least 1" });
        }
        Ok(())
    }
}

/// Buffered asynchronous aggregation.
pub struct FedBuff {
    k: usize,
    buffer: Vec<PushId>,
}

impl FedBuff {
    pub fn new(k: usize) -> Self {
        Self { k: k.max(1), buffer: Vec::new() }
    }
}

impl SyncPolicy for FedBuff {
    fn name(&self) -> &'static str {
        "fedbuff"
    }

    fn on_join(&mut self, _now: Duration, _client: SessionId) -> Vec<Action> {
        Vec::new()
    }

    fn on_leave(&mut self, _now: Duration, _client: SessionId) -> Vec<Action> {
        Vec::new()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        self.buffer.push(push.id);
        let mut out = vec![Action::Ack(push.id)];
        if self.buffer.len() == self.k {
            out.push(Action::Aggregate {
                pushes: std::mem::take(&mut self.buffer),
                normalization: Normalization::Batch,
            });
        }
        out
    }

    fn poll(&mut self, _now: Duration) -> Vec<Action> {
        Vec::new()
    }

    fn drain(&mut self) -> Vec<Action> {
        if self.buffer.is_empty() {
            return Vec::new();
        }
        vec![Action::Aggregate {
            pushes: std::mem::take(&mut self.buffer),
            normalization: Normalization::Batch,
        }]
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "k": self.k, "buffered": self.buffer.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_exactly_every_k() {
        let mut p = FedBuff::new(3);
        let t = Duration::ZERO;
        let mut batches = Vec::new();
        for id in 0..10 {
            let m = PushMeta::for_test(id, id % 2);
            for a in p.on_push(t, &m) {
                match a {
                    Action::Aggregate { pushes, .. } => batches.push(pushes),
                    Action::Ack(x) => assert_eq!(x, id, "acknowledged at once"),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(batches, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
        assert_eq!(
            p.drain(),
            vec![Action::Aggregate { pushes: vec![9], normalization: Normalization::Batch }]
        );
    }
}
