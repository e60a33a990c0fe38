//! The policy's decisions carried out: steps handed to the engine and their results, Acks,
//! directives, and shutdown.

use std::time::Duration;

use bytes::Bytes;

use super::event::{AggregatedPush, Event};
use super::log::{LoggedStep, WalOp};
use super::{Applied, Effect, InFlight, Machine, StepJob, StepOutcome, Weights, Work};
use crate::config::BroadcastInterval;
use crate::policy::staleness::{Normalization, WeightInput, batch_weights};
use crate::policy::{Action, PushId, SessionId};
use crate::protocol::message::{Ack, ServerMessage};

impl Machine {
    /// Time passed: runs what the policy decides now. `None` when it decided nothing, or when
    /// no step could start now ([`Machine::can_step`]).
    pub fn poll(&mut self, now: Duration) -> Option<Vec<Effect>> {
        if !self.can_step() {
            return None;
        }
        let actions = self.policy.poll(now);
        if actions.is_empty() {
            return None;
        }
        self.queue_actions(actions);
        Some(self.finish(now))
    }

    /// Carries out queued work until it is done or `steps_in_flight` steps are with the engine
    /// (or wait for their log records).
    pub(super) fn run(&mut self, now: Duration) {
        while self.in_flight.len() < self.steps_in_flight && !self.failed {
            let Some(w) = self.work.pop_front() else { break };
            match w {
                Work::Action(a) => self.action(now, a),
                Work::Step { ids, weights, broadcast, follow_up } => {
                    self.start_step(now, ids, weights, broadcast, follow_up)
                }
                Work::Flush => {
                    let ids: Vec<PushId> =
                        self.pending.keys().take(self.cfg.max_batch.max(1)).copied().collect();
                    if !ids.is_empty() {
                        self.work.push_front(Work::Flush);
                        self.start_step(now, ids, Weights::Computed(Normalization::Batch), None, false);
                    }
                }
                Work::Joined(session) => {
                    let actions = self.policy.on_join(now, session);
                    for (i, a) in actions.into_iter().enumerate() {
                        self.work.insert(i, Work::Action(a));
                    }
                }
                // Every step the flush formed must be applied (and logged) first, so that each
                // Ack names the version and staleness of its push's step.
                Work::AckAll if !self.in_flight.is_empty() => {
                    self.work.push_front(Work::AckAll);
                    break;
                }
                Work::AckAll => {
                    let mut ids: Vec<PushId> = self.unacked.keys().copied().collect();
                    ids.sort_unstable();
                    for id in ids {
                        self.ack(now, id);
                    }
                }
            }
        }
    }

    fn action(&mut self, now: Duration, a: Action) {
        match a {
            Action::Ack(id) => self.ack(now, id),
            Action::RoundDropped { session: client, round, reason } => {
                self.emit(Effect::Record(Event::RoundDropped {
                    t: now.as_secs_f64(),
                    session: client,
                    round,
                    reason: reason.clone(),
                }));
                if self.sessions.contains_key(&client) {
                    self.send(client, ServerMessage::RoundDropped { round, reason });
                }
            }
            Action::Directive { session: client, directive } => {
                if let Some(s) = self.sessions.get_mut(&client) {
                    s.directive.merge(&directive);
                    self.send(client, ServerMessage::Directive(directive.clone()));
                    self.emit(Effect::Record(Event::Directive {
                        t: now.as_secs_f64(),
                        session: client,
                        directive,
                    }));
                }
            }
            Action::Aggregate { pushes, normalization } => {
                self.start_step(now, pushes, Weights::Computed(normalization), None, true)
            }
        }
    }

    /// Releases a push's Ack with the model version now and the push's staleness: the one
    /// its aggregation used when it was already aggregated (BSP acknowledges after the round's
    /// step: a push built on the version the step started from has staleness 0, as in its
    /// weight and in `/api/status`), else the staleness now.
    fn ack(&mut self, now: Duration, id: PushId) {
        let Some(u) = self.unacked.remove(&id) else { return };
        let staleness = u.applied_staleness.unwrap_or_else(|| self.version.saturating_sub(u.base_version));
        if self.sessions.contains_key(&u.session) {
            self.send(u.session, ServerMessage::Ack(Ack { seq: u.seq, version: self.version, staleness }));
        }
        self.emit(Effect::Record(Event::Ack {
            t: now.as_secs_f64(),
            session: u.session,
            push: id,
            seq: u.seq,
        }));
    }

    /// Takes the pushes of a step out of `pending`, weighs them and hands the step to the
    /// engine. Weights are computed by the weighting rule, or given (a logged step replayed);
    /// `broadcast` is given when replayed, else [`Machine::broadcast_due`] decides.
    pub(super) fn start_step(
        &mut self,
        now: Duration,
        ids: Vec<PushId>,
        w: Weights,
        broadcast: Option<bool>,
        follow_up: bool,
    ) {
        let mut items = Vec::with_capacity(ids.len());
        let mut taken = Vec::with_capacity(ids.len());
        let mut logged = Vec::new();
        for (j, id) in ids.iter().enumerate() {
            if let Some(p) = self.pending.remove(id) {
                items.push(p);
                taken.push(*id);
                if let Weights::Logged(lw) = &w {
                    logged.push(lw.get(j).copied().unwrap_or(0.0));
                }
            }
        }
        if items.is_empty() {
            return;
        }
        // The version this step will be applied to: after the steps the engine has not
        // finished (those it finished already count in `version`, even while their records
        // wait for the log).
        let t = self.version + self.in_flight.iter().filter(|s| s.applied.is_none()).count() as u64;
        let inputs: Vec<WeightInput> = items
            .iter()
            .map(|p| WeightInput {
                staleness: t.saturating_sub(p.header.base_version),
                samples: p.header.samples,
                loss: p.header.loss,
            })
            .collect();
        let mut weights = Vec::with_capacity(items.len());
        let replayed = matches!(w, Weights::Logged(_));
        match w {
            Weights::Computed(normalization) => {
                batch_weights(&self.weighting, normalization, &inputs, &mut weights)
            }
            Weights::Logged(_) => weights = logged,
        }
        let broadcast = broadcast.unwrap_or_else(|| self.broadcast_due(now, t));
        if broadcast {
            self.last_broadcast = Some((now, self.counters.bytes_in, t + 1));
        }
        let k = crate::protocol::select::k_for_density(self.cfg.rho_down, self.layout.num_params());
        let job = StepJob {
            updates: items.iter().zip(&weights).map(|(p, &w)| (p.push.clone(), w)).collect(),
            broadcast: broadcast.then(|| self.selection.with_k(k)),
        };
        self.in_flight.push_back(InFlight {
            items,
            ids: taken,
            inputs,
            weights,
            broadcast,
            follow_up,
            replayed,
            applied: None,
        });
        self.emit(Effect::Step(job));
    }

    /// Whether the step that yields version `t + 1`, formed now, broadcasts: every
    /// `broadcast_every`-th step, and of those, per `broadcast_interval_ms`, at most one per
    /// interval, or (auto) one whose Delta to every session stays within
    /// `AUTO_DOWNLINK_RATIO` × the bytes received since the last broadcast, or any once
    /// `AUTO_MAX_PERIOD` has passed. The size of a Delta is taken from the last one sent.
    /// Under any rule a step broadcasts once `max_staleness / 2` versions have passed since
    /// the last broadcast, so that pushes built on x̂ are never all refused as too stale.
    fn broadcast_due(&self, now: Duration, t: u64) -> bool {
        if !(t + 1).is_multiple_of(self.cfg.broadcast_every) {
            return false;
        }
        let Some((at, bytes_in, version)) = self.last_broadcast else { return true };
        // Whatever the time rule, x̂ may not fall so far behind that a push built on it is
        // refused as too stale: with no push accepted, no step would form to broadcast.
        if (t + 1).saturating_sub(version) >= (self.cfg.max_staleness / 2).max(1) {
            return true;
        }
        let since = now.saturating_sub(at);
        match self.cfg.broadcast_interval_ms {
            BroadcastInterval::EveryStep => true,
            BroadcastInterval::Millis(ms) => since.as_secs_f64() * 1e3 >= ms,
            BroadcastInterval::Auto => {
                let up = self.counters.bytes_in.saturating_sub(bytes_in);
                let down = self.last_delta_len.saturating_mul(self.sessions.len() as u64);
                since >= BroadcastInterval::AUTO_MAX_PERIOD
                    || up.saturating_mul(BroadcastInterval::AUTO_DOWNLINK_RATIO) >= down
            }
        }
    }

    /// The engine finished the oldest step it was given and not yet reported (or failed:
    /// then every session is told and closed, and the machine stops). The step's record goes
    /// to the log ([`Effect::Append`]); its Delta is broadcast and its Acks released once the
    /// log holds it: no client sees a step that a resumed server would not replay.
    pub fn step_done(&mut self, now: Duration, outcome: Result<StepOutcome, String>) -> Vec<Effect> {
        let Some(at) = self.in_flight.iter().position(|s| s.applied.is_none()) else { return Vec::new() };
        let Some(mut step) = self.in_flight.remove(at) else { return Vec::new() };
        let r = match outcome {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "aggregation engine failed; stopping");
                self.failed = true;
                // Not applied: they stay pending, so a final checkpoint still holds them (with
                // the steps formed after it, which the engine does not run after a failure).
                let unapplied = std::iter::once(step).chain(self.in_flight.drain(at..)).collect::<Vec<_>>();
                for s in unapplied {
                    for (id, p) in s.ids.into_iter().zip(s.items) {
                        self.pending.insert(id, p);
                    }
                }
                let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
                ids.sort_unstable();
                for s in ids {
                    self.send(s, ServerMessage::error("engine", format!("server engine failed: {e}"), true));
                    self.emit(Effect::Close { session: s, code: 1011, reason: "engine failure".into() });
                }
                self.emit(Effect::Stop);
                return std::mem::take(&mut self.out);
            }
        };
        self.version += 1;
        self.counters.steps += 1;
        self.counters.aggregated += step.items.len() as u64;
        self.counters.agg_seconds += r.agg_seconds;
        self.counters.topk_seconds += r.topk_seconds;
        self.counters.agg_bytes += step.items.iter().map(|p| p.push.frame().len() as u64).sum::<u64>();
        let mut record_items = Vec::with_capacity(step.items.len());
        for ((p, id), (input, w)) in
            step.items.iter().zip(&step.ids).zip(step.inputs.iter().zip(&step.weights))
        {
            if let Some(c) = self.clients.get_mut(&p.client_id) {
                c.commits += 1;
                c.staleness_sum += input.staleness;
            }
            if let Some(u) = self.unacked.get_mut(id) {
                u.applied_staleness = Some(input.staleness);
            }
            record_items.push(AggregatedPush {
                push: *id,
                session: p.session,
                seq: p.header.seq,
                staleness: input.staleness,
                weight: *w,
                waited: (now.saturating_sub(p.accepted_at)).as_secs_f64(),
            });
        }
        self.emit(Effect::Record(Event::Aggregate {
            t: now.as_secs_f64(),
            version: self.version,
            items: record_items,
            agg_seconds: r.agg_seconds,
            topk_seconds: r.topk_seconds,
            delta_nnz: r.broadcast.as_ref().map(|b| b.header.nnz as u64),
        }));
        let logged = LoggedStep {
            items: step
                .items
                .iter()
                .zip(&step.weights)
                .map(|(p, &w)| (p.client_id.clone(), p.header.seq, w))
                .collect(),
            broadcast: step.broadcast,
        };
        let delta = r.broadcast.map(|bc| (bc.header.base_version, bc.header.version, Bytes::from(bc.frame)));
        if step.replayed {
            // Its record is in the log already (record 0: held by every log).
            step.applied = Some(Applied { record: 0, version: self.version, delta });
            self.in_flight.insert(at, step);
            self.step_logged(now, 0);
            return self.finish(now);
        }
        let record = self.append(WalOp::Step(logged));
        step.applied = Some(Applied { record, version: self.version, delta });
        // Until the log holds the record, the step stays in flight.
        self.in_flight.insert(at, step);
        std::mem::take(&mut self.out)
    }

    /// The log holds records up to `upto`: the oldest steps whose records are among them send
    /// their Deltas and let the policy answer, in the order they were formed.
    pub(super) fn step_logged(&mut self, now: Duration, upto: u64) {
        while self.in_flight.front().is_some_and(|s| s.applied.as_ref().is_some_and(|a| a.record <= upto)) {
            let Some(step) = self.in_flight.pop_front() else { return };
            self.release(now, step);
        }
    }

    fn release(&mut self, now: Duration, step: InFlight) {
        let Some(Applied { version, delta, .. }) = step.applied else { return };
        if let Some((base, version, frame)) = delta {
            self.replica_version = version;
            self.last_delta_len = frame.len() as u64;
            self.deltas.push_back((base, version, frame.clone()));
            while self.deltas.len() as u64 > self.cfg.max_delta_chain {
                self.deltas.pop_front();
            }
            self.emit(Effect::Broadcast { base, version, frame });
        }
        if step.follow_up {
            // The policy's answer comes before any work queued after the batch of actions
            // that asked for this step (e.g. a shutdown's flush), as if handled inline.
            let actions = self.policy.on_aggregated(now, version, &step.ids);
            let at = self.work.iter().position(|w| !matches!(w, Work::Action(_))).unwrap_or(self.work.len());
            for (i, a) in actions.into_iter().enumerate() {
                self.work.insert(at + i, Work::Action(a));
            }
        }
    }

    /// Stop: what the policy holds is released, every accepted push is aggregated, and every
    /// Ack still held is sent. Then the shell writes the final checkpoint and calls
    /// [`Machine::farewell`].
    pub fn shutdown(&mut self, now: Duration) -> Vec<Effect> {
        let actions = self.policy.drain();
        self.queue_actions(actions);
        self.work.push_back(Work::Flush);
        self.work.push_back(Work::AckAll);
        self.finish(now)
    }
}

#[cfg(test)]
mod tests;
