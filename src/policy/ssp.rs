//! SSP(b) (Ho et al. 2013): updates are aggregated as soon as possible, but a client may start
//! its next round only while it is at most b clocks ahead of the slowest active client. Its
//! clock is its count of pushes; the Ack of a push that puts it more than b ahead is held and
//! released the moment the slowest catches up or leaves.

use std::collections::BTreeMap;
use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, Policy, PushId, PushMeta, Ready, SessionId, SyncPolicy};

crate::settings::settings! {
    /// SSP's settings.
    pub struct SspSettings;
    pub struct SspFlags;
    ["Policy"]
    ssp_bound: val u64 = "4", "SSP: staleness bound b in clocks (pushes)";
}

/// Stale synchronous parallel with bound `b`: ASP's aggregation ([`Ready`]), with held Acks.
pub struct Ssp {
    bound: u64,
    clocks: BTreeMap<SessionId, u64>,
    /// Held Acks: (client, push).
    held: Vec<(SessionId, PushId)>,
    pending: Ready,
}

impl Policy for Ssp {
    type Settings = SspSettings;
    fn build(settings: &SspSettings, common: &Common) -> Self {
        Self::new(settings.ssp_bound, common.max_batch)
    }
}

impl Ssp {
    pub fn new(bound: u64, max_batch: usize) -> Self {
        Self { bound, clocks: BTreeMap::new(), held: Vec::new(), pending: Ready::new(max_batch) }
    }

    fn min_clock(&self) -> u64 {
        self.clocks.values().copied().min().unwrap_or(0)
    }

    fn may_go_on(&self, client: SessionId) -> bool {
        let c = self.clocks.get(&client).copied().unwrap_or(0);
        c <= self.min_clock() + self.bound
    }

    /// Acks every held push whose client may now go on.
    fn release(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        let mut still = Vec::new();
        for (client, id) in std::mem::take(&mut self.held) {
            if !self.clocks.contains_key(&client) || self.may_go_on(client) {
                out.push(Action::Ack(id));
            } else {
                still.push((client, id));
            }
        }
        self.held = still;
        out
    }
}

impl SyncPolicy for Ssp {
    fn name(&self) -> &'static str {
        "ssp"
    }

    fn on_join(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        // A newcomer starts at the slowest clock, so it neither holds back nor races ahead.
        let start = if self.clocks.is_empty() { 0 } else { self.min_clock() };
        self.clocks.insert(client, start);
        Vec::new()
    }

    fn on_leave(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.clocks.remove(&client);
        self.held.retain(|&(c, _)| c != client);
        self.release()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        *self.clocks.entry(push.session).or_insert(0) += 1;
        self.pending.push(push.id);
        self.held.push((push.session, push.id));
        self.release()
    }

    fn poll(&mut self, _now: Duration) -> Vec<Action> {
        self.pending.next_batch(Normalization::Batch).into_iter().collect()
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out: Vec<Action> = self.held.drain(..).map(|(_, id)| Action::Ack(id)).collect();
        out.extend(self.pending.drain(Normalization::Batch));
        out
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "bound": self.bound,
            "clocks": self.clocks.iter().map(|(c, v)| (c.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "held": self.held.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(id: PushId, client: SessionId) -> PushMeta {
        PushMeta::for_test(id, client)
    }

    #[test]
    fn a_client_more_than_b_ahead_is_held_until_the_slowest_catches_up() {
        let t = Duration::ZERO;
        let mut p = Ssp::new(2, 64);
        p.on_join(t, 1);
        p.on_join(t, 2);
        // Client 1 pushes 3 times while client 2 pushes none: clocks 1, 2 are fine, 3 is not.
        assert_eq!(p.on_push(t, &push(1, 1)), vec![Action::Ack(1)]);
        assert_eq!(p.on_push(t, &push(2, 1)), vec![Action::Ack(2)]);
        assert!(p.on_push(t, &push(3, 1)).is_empty(), "clock 3 vs slowest 0 with b = 2: held");
        assert_eq!(p.on_push(t, &push(4, 2)), vec![Action::Ack(3), Action::Ack(4)]);
    }

    #[test]
    fn the_slowest_leaving_releases_the_held() {
        let t = Duration::ZERO;
        let mut p = Ssp::new(0, 64);
        p.on_join(t, 1);
        p.on_join(t, 2);
        assert!(p.on_push(t, &push(1, 1)).is_empty());
        assert_eq!(p.on_leave(t, 2), vec![Action::Ack(1)]);
    }

    #[test]
    fn a_newcomer_starts_at_the_slowest_clock() {
        let t = Duration::ZERO;
        let mut p = Ssp::new(1, 64);
        p.on_join(t, 1);
        for i in 0..5 {
            p.on_push(t, &push(i, 1));
        }
        p.on_join(t, 2);
        assert_eq!(p.clocks[&2], 5);
        assert_eq!(p.on_push(t, &push(9, 1)), vec![Action::Ack(9)]);
    }

    #[test]
    fn aggregates_like_asp() {
        let t = Duration::ZERO;
        let mut p = Ssp::new(4, 2);
        p.on_join(t, 1);
        for i in 0..3 {
            p.on_push(t, &push(i, 1));
        }
        assert_eq!(
            p.poll(t),
            vec![Action::Aggregate { pushes: vec![0, 1], normalization: Normalization::Batch }]
        );
    }
}
