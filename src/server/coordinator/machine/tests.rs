//! The coordinator's rules, driven directly: no sockets, no runtime, no engine.

use std::collections::BTreeMap;

use half::f16;

use super::*;
use crate::config::PolicyKind;
use crate::engine::Broadcast;
use crate::protocol::frame::{DeltaHeader, PushHeader, encode_push};
use crate::server::durability::LoggedStep;

const MODEL: &str = "flat-64";

fn config(policy: PolicyKind, edit: impl FnOnce(&mut ServerConfig)) -> Arc<ServerConfig> {
    let mut c = ServerConfig { policy, model: MODEL.into(), ..Default::default() };
    edit(&mut c);
    Arc::new(c)
}

fn machine(cfg: &Arc<ServerConfig>) -> Machine {
    let layout = ModelLayout::builtin(MODEL).unwrap();
    Machine::new(cfg.clone(), layout, crate::server::build_policy(cfg), 0, 0, Arc::new(Metrics::new()))
}

fn hello(client_id: &str, role: Role) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION as u32,
        client_id: client_id.into(),
        token: None,
        kind: ClientKind::Synthetic,
        model: MODEL.into(),
        role,
        device: None,
        resume_secret: None,
    }
}

fn push_with(seq: u64, base_version: u64, samples: u32) -> ValidatedPush {
    let header = PushHeader { base_version, seq, samples, local_steps: 1, loss: 0.5, nnz: 2 };
    let frame = encode_push(&header, &[3, 7], &[f16::from_f32(0.25), f16::from_f32(-1.0)]);
    ValidatedPush::decode(frame.into(), &PushLimits { num_params: 64, max_nnz: 64 }).unwrap()
}

fn push(seq: u64, base_version: u64) -> ValidatedPush {
    push_with(seq, base_version, 1)
}

fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn join(m: &mut Machine, client_id: &str) -> SessionId {
    m.join(t(0), hello(client_id, Role::Trainer), false).unwrap().0
}

/// (client id, seq, weight) of each push of a logged step, and its broadcast flag.
type LoggedItems = (Vec<(String, u64, f32)>, bool);

/// The machine's `/api/status`, with an idle CPU engine and empty outboxes.
fn status(m: &Machine) -> Status {
    let engine = crate::engine::cpu::CpuAggregator::new(vec![0.0; 4], Default::default());
    let inputs = StatusInputs {
        engine: crate::engine::Aggregator::info(&engine),
        stages: vec![],
        staleness_histogram: vec![],
    };
    m.status(t(2), inputs, |_| (false, 0))
}

/// A log that records what it was given, and can be made to fail.
#[derive(Default)]
struct MemLog {
    pushes: Vec<(String, usize)>,
    steps: Vec<LoggedItems>,
    fail: bool,
}

impl Log for MemLog {
    fn push(&mut self, client_id: &str, frame: &[u8]) -> Result<(), String> {
        if self.fail {
            return Err("disk full".into());
        }
        self.pushes.push((client_id.into(), frame.len()));
        Ok(())
    }
    fn step(&mut self, items: &[(&str, u64, f32)], broadcast: bool) -> Result<(), String> {
        self.steps.push((items.iter().map(|(c, s, w)| (c.to_string(), *s, *w)).collect(), broadcast));
        Ok(())
    }
}

/// What the engine would answer to a step: the next Delta when the step broadcasts.
fn done(m: &mut Machine, job: &StepJob, log: &mut dyn Log) -> Vec<Effect> {
    let v = m.version();
    let broadcast = job.broadcast.map(|_| Broadcast {
        header: DeltaHeader { base_version: m.replica_version(), version: v + 1, nnz: 0 },
        frame: vec![0; 24],
        exact: true,
    });
    m.step_done(t(1), Ok(StepOutcome { broadcast, agg_seconds: 0.0, topk_seconds: 0.0 }), log)
}

fn acks(effects: &[Effect]) -> Vec<(SessionId, u64, u64, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { session, msg: ServerMessage::Ack(a) } => {
                Some((*session, a.seq, a.version, a.staleness))
            }
            _ => None,
        })
        .collect()
}

fn rejects(effects: &[Effect]) -> Vec<(u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { msg: ServerMessage::Reject(r), .. } => Some((r.seq, r.field.clone())),
            _ => None,
        })
        .collect()
}

/// A push under a policy that aggregates when polled (ASP): push, poll, finish the step.
/// Returns every effect on the way.
fn cycle(m: &mut Machine, session: SessionId, p: ValidatedPush, log: &mut dyn Log) -> Vec<Effect> {
    let mut fx = m.push(t(1), session, p, log);
    if let Some(more) = m.poll(t(1)) {
        fx.extend(more);
    }
    if let Some(Effect::Step(job)) = fx.last() {
        let more = done(m, job, log);
        fx.extend(more);
    }
    fx
}

fn step_of(effects: &[Effect]) -> Option<&StepJob> {
    let steps: Vec<&StepJob> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Step(j) => Some(j),
            _ => None,
        })
        .collect();
    assert!(steps.len() <= 1, "at most one step per batch of effects");
    if steps.len() == 1 {
        assert!(matches!(effects.last(), Some(Effect::Step(_))), "a step is the last effect of its batch");
    }
    steps.first().copied()
}

#[test]
fn a_join_gets_welcome_snapshot_and_directive_in_that_order() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let (s, fx) = m.join(t(0), hello("a", Role::Trainer), false).unwrap();
    let sends: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Send { session, msg: ServerMessage::Welcome(w) } if *session == s => {
                assert_eq!((w.session, w.version, w.params), (s, 0, 64));
                Some("welcome")
            }
            Effect::Snapshot { session } if *session == s => Some("snapshot"),
            Effect::Send { session, msg: ServerMessage::Directive(_) } if *session == s => Some("directive"),
            _ => None,
        })
        .collect();
    assert_eq!(sends, ["welcome", "snapshot", "directive"]);
}

#[test]
fn a_live_client_id_is_not_taken_over_without_its_secret() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let (first, fx) = m.join(t(0), hello("a", Role::Trainer), false).unwrap();
    let secret = fx
        .iter()
        .find_map(|e| match e {
            Effect::Send { msg: ServerMessage::Welcome(w), .. } => Some(w.resume_secret.clone()),
            _ => None,
        })
        .unwrap();
    let (field, _) = m.join(t(1), hello("a", Role::Trainer), false).unwrap_err();
    assert_eq!(field, "client_id");
    let mut wrong = hello("a", Role::Trainer);
    wrong.resume_secret = Some("0".repeat(32));
    assert_eq!(m.join(t(1), wrong, false).unwrap_err().0, "client_id");
    // The first session still pushes.
    assert_eq!(acks(&cycle(&mut m, first, push(1, 0), &mut NoLog)), [(first, 1, 0, 0)]);
    // With the secret, the newcomer replaces it: the old session is told and closed.
    let mut same = hello("a", Role::Trainer);
    same.resume_secret = Some(secret);
    let (second, fx) = m.join(t(3), same, false).unwrap();
    assert_ne!(second, first);
    assert!(
        fx.iter().any(
            |e| matches!(e, Effect::Send { session, msg: ServerMessage::Bye { .. } } if *session == first)
        )
    );
    assert!(fx.iter().any(|e| matches!(e, Effect::Close { session, code: 1000, .. } if *session == first)));
    // A per-client token proves the id as well.
    assert!(m.join(t(4), hello("a", Role::Trainer), true).is_ok());
}

#[test]
fn seq_must_rise_and_a_rejected_seq_is_not_used_up() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    // Base version in the future: rejected, and seq 5 stays free.
    let fx = m.push(t(1), s, push(5, 3), &mut NoLog);
    assert_eq!(rejects(&fx), [(5, "base_version".to_string())]);
    assert!(step_of(&fx).is_none());
    assert_eq!(acks(&cycle(&mut m, s, push(5, 0), &mut NoLog)), [(s, 5, 0, 0)]);
    assert_eq!(m.version(), 1);
    // Duplicates and replays are rejected, by client id (a new session of "a" too).
    assert_eq!(rejects(&m.push(t(3), s, push(5, 1), &mut NoLog)), [(5, "seq".to_string())]);
    assert_eq!(rejects(&m.push(t(3), s, push(4, 1), &mut NoLog)), [(4, "seq".to_string())]);
    // Seq may not jump arbitrarily.
    let far = 5 + MAX_SEQ_GAP + 1;
    assert_eq!(rejects(&m.push(t(4), s, push(far, 1), &mut NoLog)), [(far, "seq_gap".to_string())]);
    let fx = m.push(t(5), s, push(5 + MAX_SEQ_GAP, 1), &mut NoLog);
    assert!(rejects(&fx).is_empty() && acks(&fx).len() == 1);
    // A first push may not start above MAX_SEQ_GAP either.
    let b = join(&mut m, "b");
    assert_eq!(
        rejects(&m.push(t(6), b, push(MAX_SEQ_GAP + 1, 0), &mut NoLog)),
        [(MAX_SEQ_GAP + 1, "seq_gap".to_string())]
    );
}

#[test]
fn staleness_is_measured_against_the_model_version_and_bounded() {
    let cfg = config(PolicyKind::Asp, |c| c.max_staleness = 2);
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    for seq in 1..=3 {
        cycle(&mut m, s, push(seq, seq - 1), &mut NoLog);
    }
    assert_eq!(m.version(), 3);
    // Built on version 1 at version 3: staleness 2, accepted and acknowledged with it (ASP
    // acknowledges on receipt).
    assert_eq!(acks(&cycle(&mut m, s, push(4, 1), &mut NoLog)), [(s, 4, 3, 2)]);
    // Built on version 1 at version 4: staleness 3 > 2.
    assert_eq!(rejects(&m.push(t(11), s, push(5, 1), &mut NoLog)), [(5, "base_version".to_string())]);
}

#[test]
fn bsp_acks_every_push_of_a_round_after_it_is_aggregated() {
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b) = (join(&mut m, "a"), join(&mut m, "b"));
    let fx = m.push(t(1), a, push(1, 0), &mut NoLog);
    assert!(step_of(&fx).is_none() && acks(&fx).is_empty(), "the round waits for b");
    let fx = m.push(t(2), b, push(1, 0), &mut NoLog);
    let job = step_of(&fx).expect("b completes the round");
    assert_eq!(job.updates.len(), 2);
    let fx = done(&mut m, job, &mut NoLog);
    let mut got = acks(&fx);
    got.sort();
    // Built on version 0, aggregated in the step from 0: staleness 0, as its weight used.
    assert_eq!(got, [(a, 1, 1, 0), (b, 1, 1, 0)]);
    // The Delta goes out before the Acks.
    let bc = fx.iter().position(|e| matches!(e, Effect::Broadcast { .. })).unwrap();
    let ack = fx.iter().position(|e| matches!(e, Effect::Send { msg: ServerMessage::Ack(_), .. })).unwrap();
    assert!(bc < ack);
}

#[test]
fn a_step_is_logged_before_its_delta_and_acks() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    let mut log = MemLog::default();
    let fx = m.push(t(1), s, push(1, 0), &mut log);
    assert_eq!(log.pushes, [("a".to_string(), 40 + 12)]);
    assert!(log.steps.is_empty());
    let fx2 = m.poll(t(1)).unwrap();
    let job = step_of(&fx2).unwrap();
    assert_eq!(job.updates.len(), 1);
    done(&mut m, job, &mut log);
    assert_eq!(log.steps, [(vec![("a".to_string(), 1, 1.0)], true)]);
    assert_eq!(acks(&fx).len(), 1);
}

#[test]
fn a_push_the_log_cannot_keep_is_rejected_and_its_seq_stays_free() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    let mut log = MemLog { fail: true, ..Default::default() };
    let fx = m.push(t(1), s, push(1, 0), &mut log);
    assert_eq!(rejects(&fx), [(1, "server".to_string())]);
    assert!(step_of(&fx).is_none());
    assert_eq!(m.pending_len(), 0);
    log.fail = false;
    assert_eq!(acks(&cycle(&mut m, s, push(1, 0), &mut log)), [(s, 1, 0, 0)]);
}

#[test]
fn claimed_samples_are_clipped_to_max_samples() {
    let cfg = config(PolicyKind::Fedbuff, |c| {
        c.fedbuff_k = 2;
        c.max_samples = 100;
    });
    let mut m = machine(&cfg);
    let (a, b) = (join(&mut m, "a"), join(&mut m, "b"));
    m.push(t(1), a, push_with(1, 0, u32::MAX), &mut NoLog);
    let fx = m.push(t(2), b, push_with(1, 0, 100), &mut NoLog);
    let job = step_of(&fx).unwrap();
    let w: Vec<f32> = job.updates.iter().map(|(_, w)| *w).collect();
    assert_eq!(w[0], w[1], "a claim of u32::MAX samples weighs as much as 100: {w:?}");
}

#[test]
fn only_an_evaluator_reports_evaluations_and_only_sane_ones() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let trainer = join(&mut m, "a");
    let evaluator = m.join(t(0), hello("e", Role::Evaluator), false).unwrap().0;
    let report = |accuracy: f64, loss: f64| EvalReport { version: 0, accuracy, loss, samples: 100 };
    let refused = |fx: &[Effect]| {
        fx.iter()
            .any(|e| matches!(e, Effect::Send { msg: ServerMessage::Error(err), .. } if err.field == "eval"))
    };
    assert!(refused(&m.eval(t(1), trainer, report(0.5, 1.0))));
    assert!(refused(&m.eval(t(1), evaluator, report(1e308, 1.0))));
    assert!(refused(&m.eval(t(1), evaluator, report(0.5, -5.0))));
    assert!(refused(&m.eval(t(1), evaluator, report(f64::NAN, 1.0))));
    let fx = m.eval(t(1), evaluator, report(0.5, 1.0));
    assert!(!refused(&fx));
    assert!(fx.iter().any(|e| matches!(e, Effect::Record(Event::Eval { .. }))));
    let status = status(&m);
    assert_eq!(status.evals.len(), 1);
    // Evaluators do not push.
    assert_eq!(rejects(&m.push(t(3), evaluator, push(1, 0), &mut NoLog)), [(1, "role".to_string())]);
}

#[test]
fn a_lagging_session_gets_the_chain_it_missed_or_a_snapshot() {
    let cfg = config(PolicyKind::Asp, |c| c.max_delta_chain = 3);
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    for seq in 1..=5 {
        cycle(&mut m, s, push(seq, seq - 1), &mut NoLog);
    }
    assert_eq!(m.replica_version(), 5);
    let chain = |fx: Vec<Effect>| match fx.as_slice() {
        [Effect::Deltas { from, chain, .. }] => {
            Some((*from, chain.iter().map(|(b, v, _)| (*b, *v)).collect::<Vec<_>>()))
        }
        [Effect::Snapshot { .. }] => None,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(chain(m.resync(s, Some(3))), Some((3, vec![(3, 4), (4, 5)])));
    assert_eq!(chain(m.resync(s, Some(2))), Some((2, vec![(2, 3), (3, 4), (4, 5)])));
    assert_eq!(chain(m.resync(s, Some(5))), Some((5, vec![])));
    // Further behind than the max_delta_chain Deltas kept, unknown, or a version never sent.
    assert_eq!(chain(m.resync(s, Some(1))), None);
    assert_eq!(chain(m.resync(s, None)), None);
    assert_eq!(chain(m.resync(s, Some(9))), None);
    // A snapshot_request is always answered with a Snapshot.
    assert!(matches!(m.snapshot_request(s).as_slice(), [Effect::Snapshot { session }] if *session == s));
}

#[test]
fn shutdown_applies_every_accepted_push_then_acks_then_says_bye() {
    // BSP holds a round open until every trainer pushed: c never does.
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b, c) = (join(&mut m, "a"), join(&mut m, "b"), join(&mut m, "c"));
    for s in [a, b] {
        let fx = m.push(t(1), s, push(1, 0), &mut NoLog);
        assert!(step_of(&fx).is_none() && acks(&fx).is_empty());
    }
    let fx = m.shutdown(t(5));
    let job = step_of(&fx).expect("the open round is aggregated");
    assert_eq!(job.updates.len(), 2);
    let mut got: Vec<(SessionId, u64)> = acks(&fx).iter().map(|a| (a.0, a.1)).collect();
    got.extend(acks(&done(&mut m, job, &mut NoLog)).iter().map(|a| (a.0, a.1)));
    got.sort();
    assert_eq!(got, [(a, 1), (b, 1)], "every accepted push is acknowledged once");
    assert_eq!(m.pending_len(), 0);
    let fx = m.farewell("server shutting down");
    for s in [a, b, c] {
        assert!(
            fx.iter().any(
                |e| matches!(e, Effect::Send { session, msg: ServerMessage::Bye { .. } } if *session == s)
            )
        );
        assert!(fx.iter().any(|e| matches!(e, Effect::Close { session, code: 1000, .. } if *session == s)));
    }
}

#[test]
fn a_session_that_left_keeps_its_pushes_but_gets_no_acks() {
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b, _c) = (join(&mut m, "a"), join(&mut m, "b"), join(&mut m, "c"));
    m.push(t(1), a, push(1, 0), &mut NoLog);
    m.push(t(1), b, push(1, 0), &mut NoLog);
    m.leave(t(2), a, "gone");
    let fx = m.shutdown(t(3));
    assert_eq!(step_of(&fx).unwrap().updates.len(), 2, "a's push is still applied");
    let mut got: Vec<(SessionId, u64)> = acks(&fx).iter().map(|a| (a.0, a.1)).collect();
    got.extend(acks(&done(&mut m, step_of(&fx).unwrap(), &mut NoLog)).iter().map(|a| (a.0, a.1)));
    assert_eq!(got, [(b, 1)]);
}

#[test]
fn an_engine_failure_closes_every_session_and_stops() {
    // BSP with one trainer: each push completes a round, acknowledged once applied.
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let a = join(&mut m, "a");
    let b = m.join(t(0), hello("e", Role::Evaluator), false).unwrap().0;
    let fx = m.push(t(1), a, push(1, 0), &mut NoLog);
    assert!(step_of(&fx).is_some());
    let fx = m.step_done(t(2), Err("device lost".into()), &mut NoLog);
    for s in [a, b] {
        assert!(fx.iter().any(|e| matches!(e, Effect::Close { session, code: 1011, .. } if *session == s)));
    }
    assert!(matches!(fx.last(), Some(Effect::Stop)));
    assert!(acks(&fx).is_empty(), "nothing unapplied is acknowledged");
    assert_eq!(m.version(), 0);
    assert_eq!(m.checkpoint_parts().pending.len(), 1, "the unapplied push stays for the final checkpoint");
    let fx = m.push(t(3), a, push(2, 0), &mut NoLog);
    assert!(step_of(&fx).is_none(), "no step after a failure");
    assert_eq!(rejects(&fx), [(2, "server".to_string())]);
}

#[test]
fn recovery_replays_logged_steps_exactly_then_the_rest_in_order() {
    let cfg = config(PolicyKind::Asp, |c| c.max_batch = 2);
    let mut m = machine(&cfg);
    let frame = |seq| PendingPush { client_id: "a".into(), frame: push(seq, 0).frame().clone() };
    let ops = vec![
        WalOp::Push(frame(4)),
        WalOp::Push(frame(5)),
        WalOp::Step(LoggedStep {
            items: vec![("a".into(), 5, 0.25), ("a".into(), 4, 0.75)],
            broadcast: false,
        }),
        WalOp::Push(frame(6)),
        WalOp::Push(frame(7)),
        WalOp::Push(frame(8)),
    ];
    let (found, fx) = m.recover(t(0), BTreeMap::from([("a".to_string(), 3)]), ops);
    assert_eq!(found, Recovered { pushes: 5, steps: 1, not_yet_aggregated: 3 });
    let job = step_of(&fx).unwrap();
    let seqs_weights =
        |job: &StepJob| job.updates.iter().map(|(p, w)| (p.header().seq, *w)).collect::<Vec<_>>();
    assert_eq!(seqs_weights(job), [(5, 0.25), (4, 0.75)], "the logged order and weights");
    assert!(job.broadcast.is_none(), "the logged step did not broadcast");
    let fx = done(&mut m, job, &mut NoLog);
    let job = step_of(&fx).unwrap();
    assert_eq!(seqs_weights(job).iter().map(|s| s.0).collect::<Vec<_>>(), [6, 7], "then max_batch at a time");
    let fx = done(&mut m, job, &mut NoLog);
    let job = step_of(&fx).unwrap();
    assert_eq!(job.updates.len(), 1);
    let fx = done(&mut m, job, &mut NoLog);
    assert!(step_of(&fx).is_none());
    assert_eq!(m.version(), 3);
    // The recovered seqs hold: a replay of seq 8 by a new session of "a" is refused.
    let s = join(&mut m, "a");
    assert_eq!(rejects(&m.push(t(1), s, push(8, 3), &mut NoLog)), [(8, "seq".to_string())]);
}

#[test]
fn with_broadcast_every_2_a_base_version_is_a_replica_version() {
    let cfg = config(PolicyKind::Asp, |c| {
        c.broadcast_every = 2;
        c.max_delta_chain = 2;
    });
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    for seq in 1..=6 {
        let base = m.replica_version();
        cycle(&mut m, s, push(seq, base), &mut NoLog);
    }
    assert_eq!((m.version(), m.replica_version()), (6, 6));
    cycle(&mut m, s, push(7, 6), &mut NoLog);
    assert_eq!((m.version(), m.replica_version()), (7, 6));
    // Version 7 exists only on the server: no client can have built on it.
    assert_eq!(rejects(&m.push(t(9), s, push(8, 7), &mut NoLog)), [(8, "base_version".to_string())]);
    // Two Deltas are kept (2→4, 4→6), each spanning two versions: a client at 2 gets both.
    match m.resync(s, Some(2)).as_slice() {
        [Effect::Deltas { from: 2, chain, .. }] => assert_eq!(chain.len(), 2),
        other => panic!("expected the chain from 2, got {other:?}"),
    }
    assert!(matches!(m.resync(s, Some(0)).as_slice(), [Effect::Snapshot { .. }]));
}

#[test]
fn a_refused_hello_leaves_nothing_behind() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let first = join(&mut m, "a");
    for _ in 0..3 {
        assert!(m.join(t(1), hello("a", Role::Trainer), false).is_err());
    }
    let status = status(&m);
    assert_eq!(status.clients.len(), 1);
    assert_eq!(status.clients[0].session, first);
    assert_eq!(m.clients.len(), 1, "one entry per admitted client id");
}
