//! The core's rules for steps, Acks, shutdown, engine failure, driven directly: no sockets, no runtime, no engine.

use crate::config::PolicyKind;
use crate::core::testkit::*;
use crate::core::*;
use crate::engine::Broadcast;
use crate::policy::SessionId;
use crate::protocol::frame::DeltaHeader;
use crate::protocol::message::*;

#[test]
fn bsp_acks_every_push_of_a_round_after_it_is_aggregated() {
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b) = (join(&mut m, "a"), join(&mut m, "b"));
    let fx = m.push_logged(t(1), a, push(1, 0), &mut NoLog);
    assert!(step_of(&fx).is_none() && acks(&fx).is_empty(), "the round waits for b");
    let fx = m.push_logged(t(2), b, push(1, 0), &mut NoLog);
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
    let fx = m.push_logged(t(1), s, push(1, 0), &mut log);
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
fn shutdown_applies_every_accepted_push_then_acks_then_says_bye() {
    // BSP holds a round open until every trainer pushed: c never does.
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b, c) = (join(&mut m, "a"), join(&mut m, "b"), join(&mut m, "c"));
    for s in [a, b] {
        let fx = m.push_logged(t(1), s, push(1, 0), &mut NoLog);
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
fn an_engine_failure_closes_every_session_and_stops() {
    // BSP with one trainer: each push completes a round, acknowledged once applied.
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let a = join(&mut m, "a");
    let b = m.join_as(t(0), hello("e", Role::Evaluator), false).unwrap().0;
    let fx = m.push_logged(t(1), a, push(1, 0), &mut NoLog);
    assert!(step_of(&fx).is_some());
    let fx = m.step_done_logged(t(2), Err("device lost".into()), &mut NoLog);
    for s in [a, b] {
        assert!(fx.iter().any(|e| matches!(e, Effect::Close { session, code: 1011, .. } if *session == s)));
    }
    assert!(matches!(fx.last(), Some(Effect::Stop)));
    assert!(acks(&fx).is_empty(), "nothing unapplied is acknowledged");
    assert_eq!(m.version(), 0);
    assert_eq!(m.checkpoint_parts().pending.len(), 1, "the unapplied push stays for the final checkpoint");
    let fx = m.push_logged(t(3), a, push(2, 0), &mut NoLog);
    assert!(step_of(&fx).is_none(), "no step after a failure");
    assert_eq!(rejects(&fx), [(2, "server".to_string())]);
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
    assert_eq!(rejects(&m.push_logged(t(9), s, push(8, 7), &mut NoLog)), [(8, "base_version".to_string())]);
    // Two Deltas are kept (2→4, 4→6), each spanning two versions: a client at 2 gets both.
    match m.resync(s, Some(2)).as_slice() {
        [Effect::Deltas { from: 2, chain, .. }] => assert_eq!(chain.len(), 2),
        other => panic!("expected the chain from 2, got {other:?}"),
    }
    assert!(matches!(m.resync(s, Some(0)).as_slice(), [Effect::Snapshot { .. }]));
}

#[test]
fn a_steps_delta_and_acks_wait_until_the_log_holds_its_record() {
    // BSP with one trainer: the push completes a round, acknowledged after its step.
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let a = join(&mut m, "a");
    let fx = m.push_logged(t(1), a, push(1, 0), &mut NoLog);
    let job = step_of(&fx).expect("a one-trainer round");
    let r = outcome(&m, job);
    let fx = m.step_done(t(2), Ok(r));
    let seq = match fx.iter().find_map(|e| match e {
        Effect::Append { seq, op: log::WalOp::Step(s) } => Some((*seq, s.items.clone())),
        _ => None,
    }) {
        Some((seq, items)) => {
            assert_eq!(items, [("a".to_string(), 1, 1.0)]);
            seq
        }
        None => panic!("the step's record is appended: {fx:?}"),
    };
    assert!(!fx.iter().any(|e| matches!(e, Effect::Broadcast { .. })) && acks(&fx).is_empty());
    assert_eq!(m.version(), 1, "applied");
    assert_eq!(m.replica_version(), 0, "not yet broadcast");
    // Nothing else starts while the record is on its way.
    assert!(m.poll(t(2)).is_none_or(|fx| step_of(&fx).is_none()));
    let fx = m.appended(t(3), seq);
    let bc = fx.iter().position(|e| matches!(e, Effect::Broadcast { version: 1, .. })).expect("the Delta");
    let ack = fx.iter().position(|e| matches!(e, Effect::Send { msg: ServerMessage::Ack(_), .. })).unwrap();
    assert!(bc < ack);
    assert_eq!(m.replica_version(), 1);
}

/// What the engine is asked to do in a step: the pushes (by seq), the weights' bits, and
/// whether it broadcasts.
type JobSummary = (Vec<u64>, Vec<u32>, bool);

fn summary(job: &StepJob) -> JobSummary {
    (
        job.updates.iter().map(|(p, _)| p.header().seq).collect(),
        job.updates.iter().map(|(_, w)| w.to_bits()).collect(),
        job.broadcast.is_some(),
    )
}

fn steps(fx: &[Effect]) -> Vec<&StepJob> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Step(j) => Some(j),
            _ => None,
        })
        .collect()
}

/// Groups of pushes (client, seq, base version), each group pushed and then polled (ASP: one
/// step per group), on a machine that lets `in_flight` steps run at once: the engine finishes
/// the oldest step only when no more may start. Returns the jobs in order and the log.
fn run_groups(in_flight: usize, groups: &[&[(&str, u64, u64)]]) -> (Vec<JobSummary>, KeepLog) {
    // max_batch 2: a group of two may start while a step runs, a group of one waits for it.
    let cfg = config(PolicyKind::Asp, |c| {
        c.weighting = crate::policy::staleness::WeightingKind::Polynomial;
        c.broadcast_every = 2;
        c.max_batch = 2;
    });
    let mut m = machine(&cfg).with_steps_in_flight(in_flight);
    let ids: Vec<(String, SessionId)> =
        ["a", "b", "c"].iter().map(|c| (c.to_string(), join(&mut m, c))).collect();
    let session = |c: &str| ids.iter().find(|(n, _)| n == c).map(|(_, s)| *s).unwrap();
    let mut log = KeepLog::default();
    let mut jobs: Vec<JobSummary> = Vec::new();
    let mut running: std::collections::VecDeque<StepOutcome> = Default::default();
    let mut most = 0;
    let finish_oldest =
        |m: &mut Machine, running: &mut std::collections::VecDeque<StepOutcome>, log: &mut KeepLog| {
            let r = running.pop_front().expect("a step is running");
            m.step_done_logged(t(5), Ok(r), log)
        };
    for group in groups {
        for &(c, seq, base) in *group {
            let fx = m.push_logged(t(1), session(c), push(seq, base), &mut log);
            assert!(rejects(&fx).is_empty(), "{fx:?}");
        }
        // As the shell does: poll; when no step may start now, wait for the oldest one.
        let fx = loop {
            if let Some(fx) = m.poll(t(2)) {
                break fx;
            }
            assert!(m.steps_in_flight() > 0, "the policy has the group and nothing runs");
            let fx = finish_oldest(&mut m, &mut running, &mut log);
            assert!(steps(&fx).is_empty(), "nothing new starts before the poll");
        };
        most = most.max(m.steps_in_flight());
        for job in steps(&fx) {
            jobs.push(summary(job));
            // The Delta the engine would send: versions follow the steps in order.
            let v = m.version() + running.len() as u64 + 1;
            let broadcast = job.broadcast.map(|_| Broadcast {
                header: DeltaHeader { base_version: 0, version: v, nnz: 0 },
                frame: vec![0; 24],
                exact: true,
            });
            running.push_back(StepOutcome { broadcast, agg_seconds: 0.0, topk_seconds: 0.0 });
        }
    }
    assert!(in_flight == 1 || most > 1, "{in_flight} in flight: no two steps ever overlapped");
    while !running.is_empty() {
        finish_oldest(&mut m, &mut running, &mut log);
    }
    assert_eq!(m.steps_in_flight(), 0);
    assert_eq!(m.version(), jobs.len() as u64);
    (jobs, log)
}

#[test]
fn steps_in_flight_give_the_batches_weights_and_records_of_the_serial_path() {
    let groups: &[&[(&str, u64, u64)]] = &[
        &[("a", 1, 0), ("b", 1, 0)],
        &[("c", 1, 0)],
        &[("a", 2, 0), ("b", 2, 0)],
        &[("c", 2, 0), ("a", 3, 0)],
        &[("b", 3, 0)],
    ];
    let (serial, serial_log) = run_groups(1, groups);
    // The log's push records and step records, each in their order (a step's record comes
    // later when steps overlap, so the two interleave differently).
    let split = |log: &KeepLog| -> (Vec<log::WalOp>, Vec<log::WalOp>) {
        log.ops.iter().cloned().partition(|op| matches!(op, log::WalOp::Push(_)))
    };
    let mut logs = vec![serial_log.ops.clone()];
    for n in [2, 3] {
        let (pipelined, log) = run_groups(n, groups);
        assert_eq!(pipelined, serial, "{n} in flight: the engine is asked for the same steps");
        assert_eq!(split(&log), split(&serial_log), "{n} in flight: the log holds the same records");
        logs.push(log.ops);
    }
    // Weighted for the version each step is applied to: the second step's push, built on
    // version 0, is 1 stale (α = 2^-0.5), though it was formed before the first step finished.
    assert_eq!(serial[1].1, [std::f32::consts::FRAC_1_SQRT_2.to_bits()]);
    // broadcast_every 2: versions 2 and 4 broadcast.
    assert_eq!(serial.iter().map(|j| j.2).collect::<Vec<_>>(), [false, true, false, true, false]);
    // A server resumed from any of those logs asks the engine for the same steps again.
    for ops in logs {
        let cfg = config(PolicyKind::Asp, |_| {});
        let mut m = machine(&cfg);
        let (_, mut fx) = m.recover(t(0), Default::default(), ops);
        let mut replayed = Vec::new();
        while let Some(job) = step_of(&fx) {
            replayed.push(summary(job));
            fx = done(&mut m, job, &mut NoLog);
        }
        assert_eq!(replayed, serial);
    }
}

#[test]
fn an_engine_failure_with_steps_in_flight_keeps_every_unapplied_push() {
    let cfg = config(PolicyKind::Asp, |c| c.max_batch = 1);
    let mut m = machine(&cfg).with_steps_in_flight(2);
    let a = join(&mut m, "a");
    m.push_logged(t(1), a, push(1, 0), &mut NoLog);
    assert_eq!(steps(&m.poll(t(1)).unwrap()).len(), 1);
    m.push_logged(t(1), a, push(2, 0), &mut NoLog);
    assert_eq!(steps(&m.poll(t(1)).unwrap()).len(), 1, "a second step while the first runs");
    assert_eq!(m.steps_in_flight(), 2);
    let fx = m.step_done_logged(t(2), Err("device lost".into()), &mut NoLog);
    assert!(matches!(fx.last(), Some(Effect::Stop)));
    assert_eq!((m.version(), m.steps_in_flight()), (0, 0));
    assert_eq!(m.checkpoint_parts().pending.len(), 2, "both steps' pushes stay for the final checkpoint");
}

/// One push and its step at each time (ms), under ASP; whether each step broadcast.
fn broadcasts_at(
    cfg: &std::sync::Arc<crate::config::ServerConfig>,
    sessions: usize,
    times: &[u64],
) -> Vec<bool> {
    let mut m = machine(cfg);
    let ids: Vec<SessionId> = (0..sessions).map(|i| join(&mut m, &format!("c{i}"))).collect();
    let mut out = Vec::new();
    for (seq, &ms) in (1..).zip(times) {
        let mut fx = m.push_logged(t(ms), ids[0], push(seq, m.replica_version()), &mut NoLog);
        assert!(rejects(&fx).is_empty(), "{fx:?}");
        fx.extend(m.poll(t(ms)).unwrap_or_default());
        let job = step_of(&fx).expect("a step");
        out.push(job.broadcast.is_some());
        done(&mut m, job, &mut NoLog);
    }
    out
}

#[test]
fn a_broadcast_interval_lets_at_most_one_step_per_interval_broadcast() {
    use crate::config::BroadcastInterval;
    let cfg = config(PolicyKind::Asp, |c| c.broadcast_interval_ms = BroadcastInterval::Millis(20.0));
    let got = broadcasts_at(&cfg, 1, &[0, 5, 10, 25, 30, 44, 45, 90]);
    assert_eq!(got, [true, false, false, true, false, false, true, true]);
    // broadcast_every still applies: of the steps it allows (every 2nd), one per interval.
    let cfg = config(PolicyKind::Asp, |c| {
        c.broadcast_interval_ms = BroadcastInterval::Millis(20.0);
        c.broadcast_every = 2;
    });
    let got = broadcasts_at(&cfg, 1, &[0, 1, 2, 3, 30, 31, 32, 33]);
    assert_eq!(got, [false, true, false, false, false, true, false, false]);
    // Steps faster than the interval: x̂ may fall at most max_staleness / 2 versions behind,
    // else pushes built on it would be refused as too stale and no step would form again.
    let cfg = config(PolicyKind::Asp, |c| {
        c.broadcast_interval_ms = BroadcastInterval::Millis(1000.0);
        c.max_staleness = 6;
    });
    let got = broadcasts_at(&cfg, 1, &(0..10).collect::<Vec<_>>());
    assert_eq!(got, [true, false, false, true, false, false, true, false, false, true]);
}

#[test]
fn auto_broadcasts_keep_the_downlink_near_twice_the_uplink_and_within_100_ms() {
    use crate::config::BroadcastInterval;
    let cfg = config(PolicyKind::Asp, |c| c.broadcast_interval_ms = BroadcastInterval::Auto);
    // One session: a 24-byte Delta to one session never outweighs twice a push.
    assert!(broadcasts_at(&cfg, 1, &[0, 1, 2, 3, 4]).iter().all(|&b| b));
    // 40 sessions, a step every millisecond: a Delta to all costs 40 × 24 bytes.
    let times: Vec<u64> = (0..60).collect();
    let got = broadcasts_at(&cfg, 40, &times);
    let push_bytes = push(1, 0).frame().len() as u64;
    let (up, down) = (60 * push_bytes, got.iter().filter(|&&b| b).count() as u64 * 40 * 24);
    assert!(got[0], "the first step broadcasts");
    assert!(got.iter().filter(|&&b| b).count() < 60, "not every step: {got:?}");
    // Within twice the uplink, give or take the first broadcast (made before any uplink).
    assert!(down <= 2 * up + 40 * 24, "down {down} B for up {up} B: {got:?}");
    assert!(2 * down >= up, "hardly any broadcast: down {down} B for up {up} B");
    // Sparse steps: the one-second bound makes each one broadcast.
    let got = broadcasts_at(&cfg, 40, &[0, 1_000, 2_000, 2_001]);
    assert_eq!(got[..3], [true, true, true]);
}
