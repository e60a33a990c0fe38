//! The core's rules for admission, client ids, evaluations, resync, driven directly: no sockets, no runtime, no engine.

use crate::config::PolicyKind;
use crate::core::testkit::*;
use crate::core::*;
use crate::protocol::message::*;

#[test]
fn a_join_gets_welcome_snapshot_and_directive_in_that_order() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let (s, fx) = m.join_as(t(0), hello("a", Role::Trainer), false).unwrap();
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
    let (first, fx) = m.join_as(t(0), hello("a", Role::Trainer), false).unwrap();
    let secret = fx
        .iter()
        .find_map(|e| match e {
            Effect::Send { msg: ServerMessage::Welcome(w), .. } => Some(w.resume_secret.clone()),
            _ => None,
        })
        .unwrap();
    let (field, _) = m.join_as(t(1), hello("a", Role::Trainer), false).unwrap_err();
    assert_eq!(field, "client_id");
    let mut wrong = hello("a", Role::Trainer);
    wrong.resume_secret = Some("0".repeat(32));
    assert_eq!(m.join_as(t(1), wrong, false).unwrap_err().0, "client_id");
    // The first session still pushes.
    assert_eq!(acks(&cycle(&mut m, first, push(1, 0), &mut NoLog)), [(first, 1, 0, 0)]);
    // With the secret, the newcomer replaces it: the old session is told and closed.
    let mut same = hello("a", Role::Trainer);
    same.resume_secret = Some(secret);
    let (second, fx) = m.join_as(t(3), same, false).unwrap();
    assert_ne!(second, first);
    assert!(
        fx.iter().any(
            |e| matches!(e, Effect::Send { session, msg: ServerMessage::Bye { .. } } if *session == first)
        )
    );
    assert!(fx.iter().any(|e| matches!(e, Effect::Close { session, code: 1000, .. } if *session == first)));
    // A per-client token proves the id as well.
    assert!(m.join_as(t(4), hello("a", Role::Trainer), true).is_ok());
}

#[test]
fn only_an_evaluator_reports_evaluations_and_only_sane_ones() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let trainer = join(&mut m, "a");
    let evaluator = m.join_as(t(0), hello("e", Role::Evaluator), false).unwrap().0;
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
    assert_eq!(rejects(&m.push_logged(t(3), evaluator, push(1, 0), &mut NoLog)), [(1, "role".to_string())]);
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
fn a_refused_hello_leaves_nothing_behind() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let first = join(&mut m, "a");
    for _ in 0..3 {
        assert!(m.join_as(t(1), hello("a", Role::Trainer), false).is_err());
    }
    let status = status(&m);
    assert_eq!(status.clients.len(), 1);
    assert_eq!(status.clients[0].session, first);
    assert_eq!(m.clients.len(), 1, "one entry per admitted client id");
}

#[test]
fn a_session_that_left_keeps_its_pushes_but_gets_no_acks() {
    let cfg = config(PolicyKind::Bsp, |_| {});
    let mut m = machine(&cfg);
    let (a, b, _c) = (join(&mut m, "a"), join(&mut m, "b"), join(&mut m, "c"));
    m.push_logged(t(1), a, push(1, 0), &mut NoLog);
    m.push_logged(t(1), b, push(1, 0), &mut NoLog);
    m.leave(t(2), a, "gone");
    let fx = m.shutdown(t(3));
    assert_eq!(step_of(&fx).unwrap().updates.len(), 2, "a's push is still applied");
    let mut got: Vec<(SessionId, u64)> = acks(&fx).iter().map(|a| (a.0, a.1)).collect();
    got.extend(acks(&done(&mut m, step_of(&fx).unwrap(), &mut NoLog)).iter().map(|a| (a.0, a.1)));
    assert_eq!(got, [(b, 1)]);
}

#[test]
fn the_resume_secret_is_the_one_the_shell_drew_for_the_first_session() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let welcome = |fx: &[Effect]| {
        fx.iter()
            .find_map(|e| match e {
                Effect::Send { msg: ServerMessage::Welcome(w), .. } => Some(w.resume_secret.clone()),
                _ => None,
            })
            .unwrap()
    };
    let (_, fx) = m.join(t(0), hello("a", Role::Trainer), false, "first-secret".into()).unwrap();
    assert_eq!(welcome(&fx), "first-secret");
    // Every later session of the id is told the same secret, whatever the shell drew for it.
    let mut again = hello("a", Role::Trainer);
    again.resume_secret = Some("first-secret".into());
    let (_, fx) = m.join(t(1), again, false, "second-secret".into()).unwrap();
    assert_eq!(welcome(&fx), "first-secret");
    // Through the one entry the shell uses: Joined first, or Refused alone.
    let fx =
        m.handle(t(2), Input::Join { hello: hello("a", Role::Trainer), proven: false, secret: "x".into() });
    assert!(matches!(fx.as_slice(), [Effect::Refused { field: "client_id", .. }]));
    let fx =
        m.handle(t(2), Input::Join { hello: hello("b", Role::Trainer), proven: false, secret: "y".into() });
    assert!(matches!(fx.first(), Some(Effect::Joined { .. })));
    assert_eq!(welcome(&fx), "y");
}
