//! BSP: bulk synchronous rounds. A batch is one update from every member of the round; a client
//! that pushed waits (its Ack is held) until the round is aggregated and broadcast. A member
//! that misses the round's deadline is dropped from the round and told; its late update counts
//! toward the next round. The round never waits past its deadline.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, Policy, PushId, PushMeta, SessionId, SyncPolicy};
use crate::settings::Invalid;

crate::settings::settings! {
    /// BSP's settings.
    pub struct BspSettings;
    pub struct BspFlags;
    ["Policy"]
    bsp_deadline_s: val f64 = "30", "BSP: round deadline in seconds; late clients are dropped from the round";
}

impl Policy for Bsp {
    type Settings = BspSettings;
    fn build(settings: &BspSettings, _common: &Common) -> Self {
        Self::new(Duration::from_secs_f64(settings.bsp_deadline_s))
    }
    fn validate(settings: &BspSettings) -> Result<(), Invalid> {
        if settings.bsp_deadline_s.is_nan() || settings.bsp_deadline_s <= 0.0 {
            return Err(Invalid { field: "bsp_deadline_s", reason: "must be positive" });
        }
        Ok(())
    }
}

/// Bulk synchronous parallel with a round deadline.
pub struct Bsp {
    deadline: Duration,
    round: u64,
    /// Members of the current round.
    members: BTreeSet<SessionId>,
    /// Pushes of the current round, by client.
    pushed: BTreeMap<SessionId, PushId>,
    /// Pushes that belong to later rounds (late or early ones), in arrival order.
    next: VecDeque<(SessionId, PushId)>,
    /// Every connected trainer.
    active: BTreeSet<SessionId>,
    /// When the current round must close.
    round_deadline: Option<Duration>,
    /// The round being aggregated, awaiting its broadcast: its pushes get their Acks then.
    closing: Option<Vec<PushId>>,
}

impl Bsp {
    pub fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            round: 1,
            members: BTreeSet::new(),
            pushed: BTreeMap::new(),
            next: VecDeque::new(),
            active: BTreeSet::new(),
            round_deadline: None,
            closing: None,
        }
    }

    /// Starts a new round with every active client, taking queued pushes first.
    fn start_round(&mut self, now: Duration) -> Vec<Action> {
        self.round += 1;
        self.members = self.active.clone();
        self.pushed.clear();
        let mut later = VecDeque::new();
        while let Some((c, id)) = self.next.pop_front() {
            if self.members.contains(&c) && !self.pushed.contains_key(&c) {
                self.pushed.insert(c, id);
            } else {
                later.push_back((c, id));
            }
        }
        self.next = later;
        self.round_deadline = (!self.members.is_empty()).then_some(now + self.deadline);
        self.try_close()
    }

    /// Closes the round when every member has pushed.
    fn try_close(&mut self) -> Vec<Action> {
        if self.closing.is_some() || self.members.is_empty() {
            return Vec::new();
        }
        if self.members.iter().all(|m| self.pushed.contains_key(m)) {
            return self.close();
        }
        Vec::new()
    }

    fn close(&mut self) -> Vec<Action> {
        let pushes: Vec<PushId> = self.pushed.values().copied().collect();
        self.round_deadline = None;
        if pushes.is_empty() {
            return Vec::new();
        }
        self.closing = Some(pushes.clone());
        vec![Action::Aggregate { pushes, normalization: Normalization::Batch }]
    }
}

impl SyncPolicy for Bsp {
    fn name(&self) -> &'static str {
        "bsp"
    }

    fn on_join(&mut self, now: Duration, client: SessionId) -> Vec<Action> {
        self.active.insert(client);
        // A round nobody has pushed to yet takes the newcomer; otherwise it joins the next.
        if self.closing.is_none() && self.pushed.is_empty() {
            self.members.insert(client);
            if self.round_deadline.is_none() {
                self.round_deadline = Some(now + self.deadline);
            }
        }
        Vec::new()
    }

    fn on_leave(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.active.remove(&client);
        self.members.remove(&client);
        // Its accepted pushes stay in their rounds (they were accepted); nothing waits on it.
        self.try_close()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        let c = push.session;
        if self.closing.is_none() && self.members.contains(&c) && !self.pushed.contains_key(&c) {
            self.pushed.insert(c, push.id);
            return self.try_close();
        }
        // Late for its round (dropped), joined mid-round, or pushed again before its Ack:
        // it counts toward the next round, and its Ack comes when that round closes.
        self.next.push_back((c, push.id));
        Vec::new()
    }

    fn on_aggregated(&mut self, now: Duration, _version: u64, pushes: &[PushId]) -> Vec<Action> {
        let Some(closing) = self.closing.take() else { return Vec::new() };
        let mut out: Vec<Action> =
            closing.iter().filter(|id| pushes.contains(id)).map(|&id| Action::Ack(id)).collect();
        out.extend(self.start_round(now));
        out
    }

    fn poll(&mut self, now: Duration) -> Vec<Action> {
        let Some(deadline) = self.round_deadline else { return Vec::new() };
        if now < deadline || self.closing.is_some() {
            return Vec::new();
        }
        let late: Vec<SessionId> =
            self.members.iter().filter(|m| !self.pushed.contains_key(m)).copied().collect();
        let mut out: Vec<Action> = late
            .iter()
            .map(|&session| Action::RoundDropped {
                session,
                round: self.round,
                reason: format!("missed the round deadline of {:.1} s", self.deadline.as_secs_f64()),
            })
            .collect();
        for c in &late {
            self.members.remove(c);
        }
        if self.pushed.is_empty() {
            // Nobody pushed: start over (everyone active is a member of the new round).
            out.extend(self.start_round(now));
        } else {
            out.extend(self.close());
        }
        out
    }

    fn next_wakeup(&self) -> Option<Duration> {
        if self.closing.is_some() { None } else { self.round_deadline }
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut pushes: Vec<PushId> = self.pushed.values().copied().collect();
        pushes.extend(self.next.drain(..).map(|(_, id)| id));
        self.pushed.clear();
        let mut out: Vec<Action> = pushes.iter().map(|&id| Action::Ack(id)).collect();
        if !pushes.is_empty() {
            out.push(Action::Aggregate { pushes, normalization: Normalization::Batch });
        }
        out
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "round": self.round,
            "members": self.members.len(),
            "pushed": self.pushed.len(),
            "queued_for_next_round": self.next.len(),
            "deadline_s": self.round_deadline.map(|d| d.as_secs_f64()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(id: PushId, client: SessionId) -> PushMeta {
        PushMeta { samples: 10, ..PushMeta::for_test(id, client) }
    }
    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }
    fn agg(p: Vec<PushId>) -> Action {
        Action::Aggregate { pushes: p, normalization: Normalization::Batch }
    }

    #[test]
    fn a_round_is_one_push_from_every_member_and_acks_after_the_broadcast() {
        let mut p = Bsp::new(s(30.0));
        p.on_join(s(0.0), 1);
        p.on_join(s(0.0), 2);
        assert!(p.on_push(s(1.0), &push(10, 1)).is_empty(), "client 1 waits for client 2");
        assert_eq!(p.on_push(s(2.0), &push(11, 2)), vec![agg(vec![10, 11])]);
        // A second push of client 1 before the round's Ack belongs to the next round.
        assert!(p.on_push(s(2.1), &push(12, 1)).is_empty());
        let acts = p.on_aggregated(s(2.5), 1, &[10, 11]);
        assert_eq!(acts, vec![Action::Ack(10), Action::Ack(11)]);
        assert_eq!(p.pushed.get(&1), Some(&12), "queued push moved into round 2");
        assert_eq!(p.round_deadline, Some(s(32.5)));
    }

    #[test]
    fn never_waits_past_the_deadline_and_tells_the_late_client() {
        let mut p = Bsp::new(s(5.0));
        p.on_join(s(0.0), 1);
        p.on_join(s(0.0), 2);
        p.on_join(s(0.0), 3);
        p.on_push(s(1.0), &push(1, 1));
        p.on_push(s(2.0), &push(2, 2));
        assert_eq!(p.next_wakeup(), Some(s(5.0)));
        assert!(p.poll(s(4.9)).is_empty());
        let acts = p.poll(s(5.0));
        assert_eq!(
            acts,
            vec![
                Action::RoundDropped {
                    session: 3,
                    round: 1,
                    reason: "missed the round deadline of 5.0 s".into()
                },
                agg(vec![1, 2]),
            ]
        );
        p.on_aggregated(s(5.1), 1, &[1, 2]);
        // Round 2 includes client 3 again; its late push from round 1 arrives and counts here.
        assert!(p.members.contains(&3));
        assert!(p.on_push(s(6.0), &push(3, 3)).is_empty());
        assert_eq!(p.pushed.get(&3), Some(&3));
    }

    #[test]
    fn a_departure_mid_round_never_blocks_the_others() {
        let mut p = Bsp::new(s(30.0));
        p.on_join(s(0.0), 1);
        p.on_join(s(0.0), 2);
        p.on_push(s(1.0), &push(1, 1));
        assert_eq!(p.on_leave(s(2.0), 2), vec![agg(vec![1])]);
    }

    #[test]
    fn a_newcomer_joins_the_next_round_once_pushes_arrived() {
        let mut p = Bsp::new(s(30.0));
        p.on_join(s(0.0), 1);
        p.on_join(s(0.0), 2);
        p.on_push(s(1.0), &push(1, 1));
        p.on_join(s(1.5), 3);
        assert_eq!(p.on_push(s(2.0), &push(2, 2)), vec![agg(vec![1, 2])], "round 1 does not wait for 3");
        p.on_aggregated(s(2.1), 1, &[1, 2]);
        assert!(p.members.contains(&3));
    }

    #[test]
    fn nobody_pushing_restarts_the_round() {
        let mut p = Bsp::new(s(1.0));
        p.on_join(s(0.0), 1);
        let acts = p.poll(s(1.0));
        assert!(matches!(acts[0], Action::RoundDropped { session: 1, round: 1, .. }));
        assert_eq!(p.round, 2);
        assert!(p.members.contains(&1));
    }
}
