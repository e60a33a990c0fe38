//! The core's rules for replaying a checkpoint and its log, driven directly: no sockets, no runtime, no engine.

use crate::config::PolicyKind;
use crate::core::log::{LoggedStep, PendingPush, WalOp};
use crate::core::testkit::*;
use crate::core::*;
use std::collections::BTreeMap;

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
    assert_eq!(rejects(&m.push_logged(t(1), s, push(8, 3), &mut NoLog)), [(8, "seq".to_string())]);
}

#[test]
fn a_replayed_step_appends_no_record_and_a_step_for_unapplied_pushes_does() {
    let cfg = config(PolicyKind::Asp, |c| c.max_batch = 2);
    let mut m = machine(&cfg);
    let frame = |seq| PendingPush { client_id: "a".into(), frame: push(seq, 0).frame().clone() };
    let ops = vec![
        WalOp::Push(frame(4)),
        WalOp::Push(frame(5)),
        WalOp::Step(LoggedStep { items: vec![("a".into(), 5, 0.5), ("a".into(), 4, 0.5)], broadcast: true }),
        WalOp::Push(frame(6)),
    ];
    let (_, fx) = m.recover(t(0), BTreeMap::new(), ops);
    let appends = |fx: &[Effect]| {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Append { op: WalOp::Step(s), .. } => Some(s.items.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let job = step_of(&fx).unwrap();
    let fx = m.step_done(t(0), Ok(outcome(&m, job)));
    assert!(appends(&fx).is_empty(), "the log holds the replayed step already: {fx:?}");
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Broadcast { .. })),
        "its Delta goes out without waiting for a record"
    );
    // Recovery goes on at once: the push no logged step applied gets a step of its own, and
    // that step is new to the log.
    let job = step_of(&fx).unwrap();
    let fx = m.step_done(t(0), Ok(outcome(&m, job)));
    assert_eq!(appends(&fx).len(), 1);
    assert_eq!(appends(&fx)[0].iter().map(|i| (i.0.as_str(), i.1)).collect::<Vec<_>>(), [("a", 6)]);
    assert_eq!(m.version(), 2);
}

#[test]
fn a_standby_follows_the_log_and_aggregates_the_rest_only_when_it_takes_over() {
    let cfg = config(PolicyKind::Asp, |c| c.max_batch = 2);
    let mut m = machine(&cfg);
    let frame = |seq| PendingPush { client_id: "a".into(), frame: push(seq, 0).frame().clone() };
    // The leader's records arrive in pieces: pushes first, the step that applied them later.
    let (found, fx) = m.follow(t(0), BTreeMap::new(), vec![WalOp::Push(frame(4)), WalOp::Push(frame(5))]);
    assert_eq!(found.not_yet_aggregated, 2);
    assert!(step_of(&fx).is_none(), "a standby does not aggregate what the leader has not");
    let step = LoggedStep { items: vec![("a".into(), 5, 0.5), ("a".into(), 4, 0.5)], broadcast: false };
    let (_, fx) = m.follow(t(1), BTreeMap::new(), vec![WalOp::Step(step), WalOp::Push(frame(6))]);
    let job = step_of(&fx).expect("the logged step, replayed");
    assert_eq!(
        job.updates.iter().map(|(p, w)| (p.header().seq, *w)).collect::<Vec<_>>(),
        [(5, 0.5), (4, 0.5)]
    );
    let fx = m.step_done(t(1), Ok(outcome(&m, job)));
    assert!(step_of(&fx).is_none(), "push 6 waits for the leader");
    assert_eq!(m.version(), 1);
    // Taking over: the rest is aggregated (and logged, as a new step).
    let (found, fx) = m.recover(t(2), BTreeMap::new(), Vec::new());
    assert_eq!(found.not_yet_aggregated, 1);
    let job = step_of(&fx).expect("push 6 aggregated at takeover");
    assert_eq!(job.updates.iter().map(|(p, _)| p.header().seq).collect::<Vec<_>>(), [6]);
    // The seqs the standby read hold: a replay of seq 6 by a new session of "a" is refused.
    let fx = m.step_done(t(2), Ok(outcome(&m, job)));
    let _ = fx;
    let s = join(&mut m, "a");
    assert_eq!(rejects(&m.push_logged(t(3), s, push(6, 0), &mut NoLog)), [(6, "seq".to_string())]);
}
