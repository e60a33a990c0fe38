//! The core's rules for the checks of a Push and its durability, driven directly: no sockets, no runtime, no engine.

use crate::config::PolicyKind;
use crate::core::testkit::*;
use crate::core::*;

#[test]
fn seq_must_rise_and_a_rejected_seq_is_not_used_up() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    // Base version in the future: rejected, and seq 5 stays free.
    let fx = m.push_logged(t(1), s, push(5, 3), &mut NoLog);
    assert_eq!(rejects(&fx), [(5, "base_version".to_string())]);
    assert!(step_of(&fx).is_none());
    assert_eq!(acks(&cycle(&mut m, s, push(5, 0), &mut NoLog)), [(s, 5, 0, 0)]);
    assert_eq!(m.version(), 1);
    // Duplicates and replays are rejected, by client id (a new session of "a" too).
    assert_eq!(rejects(&m.push_logged(t(3), s, push(5, 1), &mut NoLog)), [(5, "seq".to_string())]);
    assert_eq!(rejects(&m.push_logged(t(3), s, push(4, 1), &mut NoLog)), [(4, "seq".to_string())]);
    // Seq may not jump arbitrarily.
    let far = 5 + MAX_SEQ_GAP + 1;
    assert_eq!(rejects(&m.push_logged(t(4), s, push(far, 1), &mut NoLog)), [(far, "seq_gap".to_string())]);
    let fx = m.push_logged(t(5), s, push(5 + MAX_SEQ_GAP, 1), &mut NoLog);
    assert!(rejects(&fx).is_empty() && acks(&fx).len() == 1);
    // A first push may not start above MAX_SEQ_GAP either.
    let b = join(&mut m, "b");
    assert_eq!(
        rejects(&m.push_logged(t(6), b, push(MAX_SEQ_GAP + 1, 0), &mut NoLog)),
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
    assert_eq!(rejects(&m.push_logged(t(11), s, push(5, 1), &mut NoLog)), [(5, "base_version".to_string())]);
}

#[test]
fn a_push_the_log_cannot_keep_is_rejected_and_its_seq_stays_free() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    let mut log = MemLog { fail: true, ..Default::default() };
    let fx = m.push_logged(t(1), s, push(1, 0), &mut log);
    assert_eq!(rejects(&fx), [(1, "server".to_string())]);
    assert!(step_of(&fx).is_none());
    assert_eq!(m.pending_len(), 0);
    log.fail = false;
    assert_eq!(acks(&cycle(&mut m, s, push(1, 0), &mut log)), [(s, 1, 0, 0)]);
}

#[test]
fn while_the_log_is_stalled_pushes_are_refused_as_busy_and_keep_their_seq() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    assert_eq!(acks(&cycle(&mut m, s, push(1, 0), &mut NoLog)), [(s, 1, 0, 0)]);
    assert!(m.handle(t(2), Input::LogStalled { reason: Some("NATS does not answer".into()) }).is_empty());
    let fx = m.push_logged(t(3), s, push(2, 1), &mut NoLog);
    let refusal = fx.iter().find_map(|e| match e {
        Effect::Send { msg: ServerMessage::Reject(r), .. } => Some(r.clone()),
        _ => None,
    });
    let r = refusal.expect("a busy reject");
    assert_eq!((r.seq, r.field.as_str(), r.retry_after_ms), (2, "busy", Some(BUSY_RETRY_MS)));
    assert!(r.reason.contains("NATS does not answer"), "{}", r.reason);
    // Nothing of it was kept: no record, nothing pending.
    assert!(!fx.iter().any(|e| matches!(e, Effect::Append { .. })));
    assert_eq!(m.pending_len(), 0);
    // Still checked first: a duplicate is named as such, not as busy.
    assert_eq!(rejects(&m.push_logged(t(4), s, push(1, 1), &mut NoLog)), [(1, "seq".to_string())]);
    // Once the log confirms writes again, the same seq is taken.
    m.handle(t(5), Input::LogStalled { reason: None });
    assert_eq!(acks(&cycle(&mut m, s, push(2, 1), &mut NoLog)), [(s, 2, 1, 0)]);
    assert_eq!(m.version(), 2);
}

#[test]
fn a_resend_of_a_push_the_log_then_loses_is_refused_with_it_and_its_seq_stays_free() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    let record = match m.push(t(1), s, push(1, 0)).as_slice() {
        [Effect::Append { seq, .. }] => *seq,
        other => panic!("{other:?}"),
    };
    assert!(m.push(t(1), s, push(1, 0)).is_empty());
    let fx = m.append_failed(t(2), record, "disk full");
    assert_eq!(rejects(&fx), [(1, "server".to_string()), (1, "server".to_string())]);
    // Nothing of it was kept: the seq is taken again.
    assert_eq!(acks(&cycle(&mut m, s, push(1, 0), &mut NoLog)), [(s, 1, 0, 0)]);
}

#[test]
fn claimed_samples_are_clipped_to_max_samples() {
    let cfg = config(PolicyKind::Fedbuff, |c| {
        c.policies.fedbuff.fedbuff_k = 2;
        c.max_samples = 100;
    });
    let mut m = machine(&cfg);
    let (a, b) = (join(&mut m, "a"), join(&mut m, "b"));
    m.push_logged(t(1), a, push_with(1, 0, u32::MAX), &mut NoLog);
    let fx = m.push_logged(t(2), b, push_with(1, 0, 100), &mut NoLog);
    let job = step_of(&fx).unwrap();
    let w: Vec<f32> = job.updates.iter().map(|(_, w)| *w).collect();
    assert_eq!(w[0], w[1], "a claim of u32::MAX samples weighs as much as 100: {w:?}");
}

#[test]
fn a_push_reaches_the_policy_and_its_ack_only_once_the_log_holds_it() {
    let cfg = config(PolicyKind::Asp, |_| {});
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    let fx = m.push(t(1), s, push(1, 0));
    let seq = match fx.as_slice() {
        [Effect::Append { seq, op: log::WalOp::Push(p) }] => {
            assert_eq!(p.client_id, "a");
            *seq
        }
        other => panic!("a checked push is only appended, got {other:?}"),
    };
    assert_eq!(m.counters().accepted, 0, "not accepted before the log holds it");
    // The seq is taken while the log appends. A resend of it (a client that reconnected) is
    // answered "already taken" only once the log holds the push: before, the log could still
    // lose it.
    assert!(m.push(t(1), s, push(1, 0)).is_empty(), "answered before the log holds the push");
    let fx = m.appended(t(2), seq);
    assert_eq!(acks(&fx), [(s, 1, 0, 0)]);
    assert_eq!(rejects(&fx), [(1, "seq".to_string())]);
    assert!(fx.iter().any(|e| matches!(e, Effect::Record(event::Event::Accept { seq: 1, .. }))));
    assert_eq!(m.counters().accepted, 1);
    // Reported twice: nothing more.
    assert!(acks(&m.appended(t(2), seq)).is_empty());
}

#[test]
fn each_acceptance_and_refusal_is_counted_once() {
    let cfg = config(PolicyKind::Asp, |c| c.max_samples = 10);
    let mut m = machine(&cfg);
    let s = join(&mut m, "a");
    cycle(&mut m, s, push_with(1, 0, 50), &mut NoLog);
    m.push_logged(t(2), s, push(1, 0), &mut NoLog);
    m.push_logged(t(2), s, push(9, 7), &mut NoLog);
    let c = m.counters();
    assert_eq!((c.accepted, c.rejected, c.steps, c.aggregated), (1, 2, 1, 1));
    let refusals: Vec<(&str, u64)> = c.refusals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(refusals, [("base_version", 1), ("samples_clipped", 1), ("seq", 1)]);
    assert_eq!(c.bytes_in, 52);
}
