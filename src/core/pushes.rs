//! The checks of a Push, and the order that makes it durable before anyone acts on it: checked
//! → appended to the log ([`Effect::Append`]) → admitted (pending, the policy, its Ack).

use std::time::Duration;

use super::event::Event;
use super::log::{PendingPush, WalOp};
use super::{Appending, BUSY_RETRY_MS, Effect, MAX_SEQ_GAP, Machine, Pending, Unacked};
use crate::policy::{LossSource, PushMeta, SessionId};
use crate::protocol::frame::ValidatedPush;
use crate::protocol::message::{Reject, Role, ServerMessage};

/// Why a push's seq is refused as already taken.
fn duplicate(seq: u64, last: u64) -> String {
    format!("seq {seq} is not above the last accepted seq {last} (duplicate or replay)")
}

impl Machine {
    fn reject(&mut self, now: Duration, session: SessionId, seq: u64, field: &str, reason: String) {
        self.refuse(now, session, seq, field, reason, None)
    }

    fn refuse(
        &mut self,
        now: Duration,
        session: SessionId,
        seq: u64,
        field: &str,
        reason: String,
        retry_after_ms: Option<u64>,
    ) {
        if let Some(s) = self.sessions.get(&session) {
            if let Some(c) = self.clients.get_mut(&s.client_id) {
                c.rejected += 1;
            }
            let msg = ServerMessage::Reject(Reject {
                seq,
                field: field.into(),
                reason: reason.clone(),
                retry_after_ms,
            });
            self.send(session, msg);
        }
        self.counters.rejected += 1;
        self.counters.refused(field);
        self.emit(Effect::Record(Event::Reject {
            t: now.as_secs_f64(),
            session,
            seq,
            field: field.into(),
            reason,
        }));
    }

    /// A push that passed the stateless checks. It is accepted when its seq is above the
    /// client id's last accepted seq (by at most [`MAX_SEQ_GAP`]), its base version is not in
    /// the future, and its staleness is at most `max_staleness`; its sample count is clipped
    /// to `max_samples`. An accepted push is handed to the log ([`Effect::Append`]); it reaches
    /// the policy, which decides when it is aggregated and acknowledged, once the log holds it
    /// ([`Machine::appended`]). A rejected push does not use up its seq.
    pub fn push(&mut self, now: Duration, session: SessionId, push: ValidatedPush) -> Vec<Effect> {
        self.check(now, session, push);
        self.finish(now)
    }

    fn check(&mut self, now: Duration, session: SessionId, push: ValidatedPush) {
        let Some(s) = self.sessions.get(&session) else { return };
        let mut header = *push.header();
        let seq = header.seq;
        if self.failed {
            return self.reject(
                now,
                session,
                seq,
                "server",
                "the aggregation engine failed; the server is stopping".into(),
            );
        }
        if s.role != Role::Trainer {
            return self.reject(now, session, seq, "role", "evaluators do not push".into());
        }
        let client_id = s.client_id.clone();
        let last_seq = self.clients.get(&client_id).and_then(|c| c.last_seq);
        if let Some(last) = last_seq
            && seq <= last
        {
            // A resend of a push the log has not confirmed yet: "already accepted" would be
            // premature (the log may still lose it, or this server be deposed), so it is
            // answered once the record is held.
            let appending = self
                .appending
                .iter()
                .find(|(_, a)| a.pending.header.seq == seq && a.pending.client_id == client_id);
            if let Some((&record, _)) = appending {
                self.resent.push(super::Resent { record, session, seq });
                return;
            }
            return self.reject(now, session, seq, "seq", duplicate(seq, last));
        }
        // A client can only hold a replica version: anything above it was never sent.
        if header.base_version > self.replica_version {
            let why = format!(
                "base version {} is in the future: the replica is at version {}",
                header.base_version, self.replica_version
            );
            return self.reject(now, session, seq, "base_version", why);
        }
        let staleness = self.version - header.base_version;
        if staleness > self.cfg.max_staleness {
            let why = format!(
                "staleness {staleness} (version {} - base {}) exceeds max_staleness {}",
                self.version, header.base_version, self.cfg.max_staleness
            );
            return self.reject(now, session, seq, "base_version", why);
        }
        let last = last_seq.unwrap_or(0);
        if seq - last > MAX_SEQ_GAP {
            let why = format!(
                "seq {seq} jumps more than {MAX_SEQ_GAP} past the last accepted seq {last} (a first seq is at most {MAX_SEQ_GAP})"
            );
            return self.reject(now, session, seq, "seq_gap", why);
        }
        let cap = self.cfg.max_samples.max(1);
        if header.samples > cap {
            tracing::warn!(client_id = %client_id, claimed = header.samples, cap, "a push's sample count was clipped to max_samples");
            self.counters.refused("samples_clipped");
            header.samples = cap;
        }
        if let Some(why) = &self.log_stalled {
            // Nothing of it is kept and its seq stays free: the client pushes it (or what it
            // holds by then) again later.
            let why = format!("the server cannot make pushes durable now ({why}); push again later");
            return self.refuse(now, session, seq, "busy", why, Some(BUSY_RETRY_MS));
        }
        // The seq is taken now, so the client's next push is checked against it while the log
        // is still appending this one.
        self.clients.entry(client_id.clone()).or_default().last_seq = Some(seq);
        let record = self
            .append(WalOp::Push(PendingPush { client_id: client_id.clone(), frame: push.frame().clone() }));
        let pending = Pending { session, client_id, header, push, accepted_at: now };
        self.appending.insert(record, Appending { session, previous_seq: last_seq, pending });
    }

    /// The log holds every record up to `upto`: the pushes among them are accepted, in the
    /// order they were checked, and a step waiting for its record goes on.
    pub fn appended(&mut self, now: Duration, upto: u64) -> Vec<Effect> {
        while let Some(entry) = self.appending.first_entry() {
            if *entry.key() > upto {
                break;
            }
            let a = entry.remove();
            self.admit(now, a.pending);
        }
        let held: Vec<_> = self.resent.extract_if(.., |r| r.record <= upto).collect();
        for r in held {
            let last = self.sessions.get(&r.session).and_then(|s| self.clients.get(&s.client_id)?.last_seq);
            let why = duplicate(r.seq, last.unwrap_or(r.seq));
            self.reject(now, r.session, r.seq, "seq", why);
        }
        self.step_logged(now, upto);
        self.finish(now)
    }

    /// The log could not keep record `seq`: a push is rejected (its seq stays free unless the
    /// client id used a later one meanwhile); a step goes on (its record is missing: a crash
    /// now would replay it differently, which the shell reports).
    pub fn append_failed(&mut self, now: Duration, record: u64, reason: &str) -> Vec<Effect> {
        if let Some(a) = self.appending.remove(&record) {
            let p = &a.pending;
            if let Some(c) = self.clients.get_mut(&p.client_id)
                && c.last_seq == Some(p.header.seq)
            {
                c.last_seq = a.previous_seq;
            }
            let seq = p.header.seq;
            self.reject(now, a.session, seq, "server", format!("write-ahead log failed: {reason}"));
            // Its resends are refused too: nothing of the push was kept.
            let lost: Vec<_> = self.resent.extract_if(.., |r| r.record == record).collect();
            for r in lost {
                self.reject(now, r.session, r.seq, "server", format!("write-ahead log failed: {reason}"));
            }
        } else {
            self.step_logged(now, record);
        }
        self.finish(now)
    }

    /// A push the log holds: pending, counted, recorded, and handed to the policy.
    fn admit(&mut self, now: Duration, p: Pending) {
        let id = self.next_push;
        self.next_push += 1;
        let (session, header) = (p.session, p.header);
        let seq = header.seq;
        let staleness = self.version.saturating_sub(header.base_version);
        let bytes = p.push.frame().len() as u64;
        let c = self.clients.entry(p.client_id.clone()).or_default();
        c.accepted += 1;
        c.bytes_in += bytes;
        c.last_staleness = staleness;
        c.last_loss = header.loss;
        self.counters.accepted += 1;
        self.counters.bytes_in += bytes;
        self.emit(Effect::Record(Event::Accept {
            t: now.as_secs_f64(),
            session,
            push: id,
            seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
            nnz: header.nnz,
            bytes,
        }));
        self.pending.insert(id, p);
        self.unacked
            .insert(id, Unacked { session, seq, base_version: header.base_version, applied_staleness: None });
        self.policy.on_loss(now, LossSource::Push(session), header.loss as f64);
        let meta = PushMeta {
            id,
            session,
            seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
        };
        let actions = self.policy.on_push(now, &meta);
        self.queue_actions(actions);
    }
}

#[cfg(test)]
mod tests;
