//! Property tests of the wire protocol: every frame and control message survives its round
//! trip, and no byte string makes a decoder panic or accept what the engines must never see.
//! (The cargo-fuzz targets in fuzz/ explore the same properties coverage-guided; a crash they
//! find becomes a case in `regressions` below.)

use half::f16;
use proptest::prelude::*;
use sparsync::protocol::frame::{
    DeltaHeader, DeltaView, PushHeader, PushLimits, PushView, SnapshotView, encode_delta, encode_push,
    encode_snapshot,
};
use sparsync::protocol::message::{
    Ack, ClientKind, ClientMessage, Directive, EvalReport, Hello, Reject, Role, ServerMessage, parse_hello,
};

/// Strictly ascending indices below `n`, with finite f16 values.
fn sparse(n: u32, max_nnz: usize) -> impl Strategy<Value = (Vec<u32>, Vec<f16>)> {
    prop::collection::btree_set(0..n, 0..=max_nnz).prop_flat_map(|set| {
        let idx: Vec<u32> = set.into_iter().collect();
        let len = idx.len();
        (Just(idx), prop::collection::vec(finite_f16(), len))
    })
}

fn finite_f16() -> impl Strategy<Value = f16> {
    any::<u16>()
        .prop_map(|b| if b & 0x7C00 == 0x7C00 { f16::from_bits(b & 0x83FF) } else { f16::from_bits(b) })
}

fn push_header() -> impl Strategy<Value = PushHeader> {
    (any::<u64>(), any::<u64>(), 1..u32::MAX, any::<u32>(), 0.0f32..1e30).prop_map(
        |(base_version, seq, samples, local_steps, loss)| PushHeader {
            base_version,
            seq,
            samples,
            local_steps,
            loss,
            nnz: 0,
        },
    )
}

fn client_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn push_round_trips(mut h in push_header(), (idx, vals) in sparse(5000, 300)) {
        h.nnz = idx.len() as u32;
        let frame = encode_push(&h, &idx, &vals);
        let limits = PushLimits { num_params: 5000, max_nnz: 5000 };
        let v = PushView::decode(&frame, &limits).unwrap();
        prop_assert_eq!(v.header, h);
        let (i2, v2): (Vec<u32>, Vec<f16>) = v.entries().unzip();
        prop_assert_eq!(&i2, &idx);
        prop_assert!(v2.iter().zip(&vals).all(|(a, b)| a.to_bits() == b.to_bits()));
        // A model one parameter too small, or an nnz limit one too low, refuses it by name.
        if let Some(&last) = idx.last() {
            let small = PushLimits { num_params: last as u64, max_nnz: 5000 };
            prop_assert_eq!(PushView::decode(&frame, &small).unwrap_err().field(), "indices");
            let few = PushLimits { num_params: 5000, max_nnz: idx.len() as u64 - 1 };
            prop_assert_eq!(PushView::decode(&frame, &few).unwrap_err().field(), "nnz");
        }
    }

    #[test]
    fn delta_round_trips(version in any::<u64>(), base in any::<u64>(), (idx, vals) in sparse(5000, 300)) {
        let h = DeltaHeader { version, base_version: base, nnz: idx.len() as u32 };
        let frame = encode_delta(&h, &idx, &vals);
        let d = DeltaView::decode(&frame, 5000).unwrap();
        prop_assert_eq!(d.header, h);
        prop_assert!(d.entries().map(|(i, v)| (i, v.to_bits())).eq(idx.iter().copied().zip(vals.iter().map(|v| v.to_bits()))));
    }

    #[test]
    fn snapshot_round_trips(version in any::<u64>(), values in prop::collection::vec(any::<f32>(), 0..500)) {
        let frame = encode_snapshot(version, &values);
        let s = SnapshotView::decode(&frame, values.len() as u64).unwrap();
        prop_assert_eq!(s.version, version);
        let mut out = vec![0.0; values.len()];
        s.read_into(&mut out);
        prop_assert!(out.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()));
        prop_assert_eq!(SnapshotView::decode(&frame, values.len() as u64 + 1).unwrap_err().field(), "n");
    }

    /// Any change to a valid Push frame's bytes is refused with a named field, or is still a
    /// valid Push (a header field or a value changed): never a panic, never an index out of
    /// range, out of order, or a non-finite value.
    #[test]
    fn corrupted_push_is_refused_or_still_valid(
        mut h in push_header(),
        (idx, vals) in sparse(2000, 100),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        h.nnz = idx.len() as u32;
        let mut frame = encode_push(&h, &idx, &vals);
        for (at, x) in flips {
            let i = at.index(frame.len());
            frame[i] ^= x;
        }
        if let Some(c) = cut {
            frame.truncate(c.index(frame.len() + 1));
        }
        let limits = PushLimits { num_params: 2000, max_nnz: 2000 };
        match PushView::decode(&frame, &limits) {
            Ok(v) => {
                let (i2, v2): (Vec<u32>, Vec<f16>) = v.entries().unzip();
                prop_assert!(i2.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(i2.iter().all(|&i| i < 2000));
                prop_assert!(v2.iter().all(|v| v.is_finite()));
                prop_assert!(v.header.samples > 0 && v.header.loss.is_finite() && v.header.loss >= 0.0);
            }
            Err(e) => prop_assert!(!e.field().is_empty() && !e.to_string().is_empty()),
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), n in 0u64..100) {
        let _ = PushView::decode(&bytes, &PushLimits { num_params: n, max_nnz: n });
        let _ = DeltaView::decode(&bytes, n);
        let _ = SnapshotView::decode(&bytes, n);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = parse_hello(text, "mlp");
        }
    }

    #[test]
    fn hello_round_trips(
        id in client_id(),
        token in prop::option::of("[ -~]{0,80}"),
        kind in prop_oneof![Just(ClientKind::Native), Just(ClientKind::Browser), Just(ClientKind::Synthetic)],
        role in prop_oneof![Just(Role::Trainer), Just(Role::Evaluator)],
        device in prop::option::of("\\PC{0,40}"),
    ) {
        let h = Hello { protocol: 1, client_id: id, token, kind, model: "mlp".into(), role, device, resume_secret: None };
        let json = serde_json::to_string(&ClientMessage::Hello(h.clone())).unwrap();
        prop_assert_eq!(parse_hello(&json, "mlp").unwrap(), h.clone());
        prop_assert_eq!(parse_hello(&json, "cnn").unwrap_err().field(), "model");
    }

    #[test]
    fn control_messages_round_trip(
        seq in any::<u64>(), version in any::<u64>(), staleness in any::<u64>(),
        reason in "\\PC{0,60}", field in "[a-z_]{1,12}",
        accuracy in 0.0f64..1.0, loss in 0.0f64..1e6, samples in any::<u64>(),
        local_steps in prop::option::of(1u64..1000), batch in prop::option::of(1u64..4096),
    ) {
        let server = [
            ServerMessage::Ack(Ack { seq, version, staleness }),
            ServerMessage::Reject(Reject {
                seq,
                field: field.clone(),
                reason: reason.clone(),
                retry_after_ms: (seq % 2 == 0).then_some(seq / 2),
            }),
            ServerMessage::Directive(Directive { local_steps, batch_size: batch, ..Directive::default() }),
            ServerMessage::error(&field, reason.clone(), seq % 2 == 0),
            ServerMessage::Bye { reason: reason.clone() },
        ];
        for m in server {
            let back: ServerMessage = serde_json::from_str(&m.to_json()).unwrap();
            prop_assert_eq!(back, m);
        }
        let client = [
            ClientMessage::Eval(EvalReport { version, accuracy, loss, samples }),
            ClientMessage::Bye { reason },
        ];
        for m in client {
            let back: ClientMessage = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            prop_assert_eq!(back, m);
        }
    }
}

/// Inputs the fuzzers or earlier bugs found; each stays refused with its reason.
mod regressions {
    use super::*;

    #[test]
    fn nnz_near_u32_max_is_refused_before_any_allocation_or_overflow() {
        let mut frame = encode_push(
            &PushHeader { base_version: 0, seq: 1, samples: 1, local_steps: 1, loss: 0.0, nnz: 0 },
            &[],
            &[],
        );
        frame[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        let limits = PushLimits { num_params: u64::MAX, max_nnz: u64::MAX };
        assert_eq!(PushView::decode(&frame, &limits).unwrap_err().field(), "nnz");
    }

    #[test]
    fn snapshot_claiming_four_billion_values_is_refused() {
        let mut frame = encode_snapshot(3, &[]);
        frame[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SnapshotView::decode(&frame, u32::MAX as u64).is_err());
    }
}
