//! Sessions and admission: who joins under which client id, who leaves, what a session is
//! sent when it falls behind, and the messages of a session that are not Pushes.

use std::time::Duration;

use super::event::Event;
use super::status::EvalPoint;
use super::{Effect, Machine, Session, Work};
use crate::policy::{LossSource, SessionId};
use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::message::{
    Directive, EvalReport, Hello, Role, RoundTime, ServerMessage, SkipReport, Welcome,
};

/// Why a join was refused: the Hello field at fault, and the reason.
pub type JoinRefusal = (&'static str, String);

impl Machine {
    /// A session asks to join with `hello`; `proven` says its token is the client id's own;
    /// `secret` is a fresh resume secret the shell drew from the operating system's CSPRNG
    /// (kept as the client id's secret if the id has none yet).
    ///
    /// A client id held by a live session is refused unless the newcomer proves it is the same
    /// client (its own token, or the `resume_secret` of that id's Welcome); then the old
    /// session is told Bye and closed. The new session gets Welcome, a Snapshot and the
    /// initial Directive, in that order.
    pub fn join(
        &mut self,
        now: Duration,
        hello: Hello,
        proven: bool,
        secret: String,
    ) -> Result<(SessionId, Vec<Effect>), JoinRefusal> {
        if self.failed {
            return Err(("server", "the server's engine failed; it is stopping".into()));
        }
        if let Some(&old) = self.by_client_id.get(&hello.client_id) {
            let held = self.clients.get(&hello.client_id).and_then(|c| c.secret.as_deref()).unwrap_or("");
            let same = proven
                || hello.resume_secret.as_deref().is_some_and(|s| {
                    use subtle::ConstantTimeEq;
                    !held.is_empty() && bool::from(s.as_bytes().ct_eq(held.as_bytes()))
                });
            if !same {
                return Err((
                    "client_id",
                    format!(
                        "client_id {:?} is in use by a live session; a client reconnecting to its own \
                         session sends the resume_secret of its Welcome",
                        hello.client_id
                    ),
                ));
            }
            let reason = "replaced by a new session with the same client_id";
            self.send(old, ServerMessage::Bye { reason: reason.into() });
            self.emit(Effect::Close { session: old, code: 1000, reason: "replaced by a new session".into() });
            self.end_session(now, old, "replaced by a new session");
        }
        // Only a session that is admitted creates the client id's entry (and its secret).
        let secret =
            self.clients.entry(hello.client_id.clone()).or_default().secret.get_or_insert(secret).clone();
        let id = self.next_session;
        self.next_session += 1;
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION as u32,
            session: id,
            model: self.layout.name.clone(),
            layout: self.layout.tensors.clone(),
            params: self.layout.num_params() as u64,
            version: self.replica_version,
            settings: self.settings(),
            resume_secret: secret,
        };
        self.send(id, ServerMessage::Welcome(welcome));
        self.emit(Effect::Snapshot { session: id });
        let directive = Directive {
            local_steps: Some(self.cfg.local_steps),
            batch_size: Some(self.cfg.batch_size),
            learning_rate: Some(self.cfg.learning_rate),
            reason: Some("initial settings".into()),
            ..Default::default()
        };
        self.send(id, ServerMessage::Directive(directive.clone()));
        self.emit(Effect::Record(Event::Join {
            t: now.as_secs_f64(),
            session: id,
            client_id: hello.client_id.clone(),
            role: hello.role,
            kind: hello.kind,
        }));
        tracing::info!(session = id, client_id = %hello.client_id, kind = ?hello.kind, role = ?hello.role, "client joined");
        self.by_client_id.insert(hello.client_id.clone(), id);
        let role = hello.role;
        self.sessions.insert(
            id,
            Session {
                client_id: hello.client_id,
                kind: hello.kind,
                role,
                device: hello.device,
                joined: now,
                directive,
            },
        );
        if role == Role::Trainer {
            // After what the replaced session's leave queued (a policy sees the leave first).
            self.work.push_back(Work::Joined(id));
        }
        Ok((id, self.finish(now)))
    }

    /// A session ended. Its accepted pushes stay and are aggregated; Acks it can no longer
    /// receive are dropped.
    pub fn leave(&mut self, now: Duration, session: SessionId, reason: &str) -> Vec<Effect> {
        self.end_session(now, session, reason);
        self.finish(now)
    }

    pub(super) fn end_session(&mut self, now: Duration, session: SessionId, reason: &str) {
        let Some(s) = self.sessions.remove(&session) else { return };
        if self.by_client_id.get(&s.client_id) == Some(&session) {
            self.by_client_id.remove(&s.client_id);
        }
        self.unacked.retain(|_, u| u.session != session);
        self.emit(Effect::Record(Event::Leave { t: now.as_secs_f64(), session, reason: reason.into() }));
        tracing::info!(session, client_id = %s.client_id, reason, "client left");
        if s.role == Role::Trainer {
            let actions = self.policy.on_leave(now, session);
            self.queue_actions(actions);
        }
    }

    /// An evaluation report: only from an evaluator, with accuracy in [0, 1] and a finite,
    /// non-negative loss.
    pub fn eval(&mut self, now: Duration, session: SessionId, report: EvalReport) -> Vec<Effect> {
        let Some(role) = self.sessions.get(&session).map(|s| s.role) else { return Vec::new() };
        let refusal = if role == Role::Trainer {
            Some("only a client that joined with role \"evaluator\" may report evaluations")
        } else if !(0.0..=1.0).contains(&report.accuracy) {
            Some("accuracy must be a number in [0, 1]")
        } else if !(report.loss.is_finite() && report.loss >= 0.0) {
            Some("loss must be a finite number ≥ 0")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.counters.refused("eval");
            self.send(session, ServerMessage::error("eval", why, false));
            return self.finish(now);
        }
        let (bytes_in, bytes_out) = (self.counters.bytes_in, self.counters.bytes_out);
        self.emit(Effect::Record(Event::Eval {
            t: now.as_secs_f64(),
            session,
            version: report.version,
            accuracy: report.accuracy,
            loss: report.loss,
            bytes_in,
            bytes_out,
        }));
        self.evals.push(EvalPoint {
            t: now.as_secs_f64(),
            version: report.version,
            accuracy: report.accuracy,
            loss: report.loss,
            bytes_in,
            bytes_out,
        });
        self.policy.on_loss(now, LossSource::Evaluator, report.loss);
        self.finish(now)
    }

    /// A client skipped a round (Hermes' gate).
    pub fn skip(&mut self, now: Duration, session: SessionId, report: SkipReport) -> Vec<Effect> {
        if self.sessions.contains_key(&session) {
            self.emit(Effect::Record(Event::Skip {
                t: now.as_secs_f64(),
                session,
                round: report.round,
                loss: report.loss,
            }));
            let actions = self.policy.on_skip(now, session, &report);
            self.queue_actions(actions);
        }
        self.finish(now)
    }

    /// A client's measured round time.
    pub fn round_time(&mut self, now: Duration, session: SessionId, report: RoundTime) -> Vec<Effect> {
        if self.sessions.contains_key(&session) && report.is_valid() {
            let actions = self.policy.on_round_time(now, session, &report);
            self.queue_actions(actions);
        }
        self.finish(now)
    }

    /// The client asked for a snapshot (`snapshot_request`): it always gets one.
    pub fn snapshot_request(&mut self, session: SessionId) -> Vec<Effect> {
        if self.sessions.contains_key(&session) {
            self.emit(Effect::Snapshot { session });
        }
        std::mem::take(&mut self.out)
    }

    /// A session's replica fell behind (its outbox dropped Deltas) and it holds x̂ at `have`:
    /// it gets the Deltas it missed when the core still keeps them (the newest
    /// `max_delta_chain`), else a Snapshot.
    pub fn resync(&mut self, session: SessionId, have: Option<u64>) -> Vec<Effect> {
        if !self.sessions.contains_key(&session) {
            return Vec::new();
        }
        // The newest `max_delta_chain` Deltas are kept (counted in Deltas, not in versions:
        // with `broadcast_every` > 1 a Delta spans several versions).
        let chain = have.and_then(|h| {
            if h == self.replica_version {
                return Some((h, Vec::new()));
            }
            let start = self.deltas.iter().position(|(b, _, _)| *b == h)?;
            Some((h, self.deltas.iter().skip(start).cloned().collect()))
        });
        match chain {
            Some((from, chain)) => self.emit(Effect::Deltas { session, from, chain }),
            None => self.emit(Effect::Snapshot { session }),
        }
        std::mem::take(&mut self.out)
    }

    /// The shell sent `bytes` of frames (Deltas, snapshots) to a session.
    pub fn sent(&mut self, session: SessionId, bytes: u64) {
        self.counters.bytes_out += bytes;
        if let Some(s) = self.sessions.get(&session)
            && let Some(c) = self.clients.get_mut(&s.client_id)
        {
            c.bytes_out += bytes;
        }
    }

    /// Says Bye to every session and closes it.
    pub fn farewell(&mut self, reason: &str) -> Vec<Effect> {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        for s in ids {
            self.send(s, ServerMessage::Bye { reason: reason.into() });
            self.emit(Effect::Close { session: s, code: 1000, reason: reason.into() });
        }
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests;
