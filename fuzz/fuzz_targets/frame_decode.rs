//! Any bytes, decoded as each binary frame kind against a model size picked by the first byte:
//! the decoders never panic, name the field at fault when they refuse, and whatever they accept
//! satisfies the invariants the engines rely on and re-encodes to an equal frame.
#![no_main]

use half::f16;
use libfuzzer_sys::fuzz_target;
use sparsync::protocol::frame::{
    DeltaView, PushLimits, PushView, SnapshotView, check_prefix, encode_delta, encode_push, encode_snapshot,
};

const SIZES: [u64; 6] = [0, 1, 7, 1000, 1 << 20, 1 << 32];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else { return };
    let n = SIZES[sel as usize % SIZES.len()];
    let max_nnz = if sel & 0x80 != 0 { n / 2 } else { n };
    if let Err(e) = check_prefix(frame) {
        assert!(!e.field().is_empty() && !e.to_string().is_empty());
    }

    match PushView::decode(frame, &PushLimits { num_params: n, max_nnz }) {
        Ok(v) => {
            let (idx, vals): (Vec<u32>, Vec<f16>) = v.entries().unzip();
            assert_eq!(idx.len() as u64, v.header.nnz as u64);
            assert!(idx.len() as u64 <= max_nnz);
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "indices not ascending");
            assert!(idx.iter().all(|&i| (i as u64) < n), "index out of range");
            assert!(vals.iter().all(|v| v.is_finite()), "non-finite value");
            assert!(v.header.samples > 0 && v.header.loss.is_finite() && v.header.loss >= 0.0);
            // The Push format has no free bits: an accepted frame is exactly its encoding.
            assert_eq!(encode_push(&v.header, &idx, &vals), frame);
        }
        Err(e) => assert!(!e.field().is_empty() && !e.to_string().is_empty()),
    }

    match DeltaView::decode(frame, n) {
        Ok(d) => {
            let (idx, vals): (Vec<u32>, Vec<f16>) = d.entries().unzip();
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
            assert!(idx.iter().all(|&i| (i as u64) < n));
            assert!(vals.iter().all(|v| v.is_finite()));
            let again = encode_delta(&d.header, &idx, &vals);
            let d2 = DeltaView::decode(&again, n).expect("a re-encoded Delta decodes");
            assert_eq!(d2.header, d.header);
            assert!(d2.entries().eq(d.entries()));
        }
        Err(e) => assert!(!e.field().is_empty()),
    }

    match SnapshotView::decode(frame, n) {
        Ok(s) => {
            // Accepted only when the frame holds n values, so this allocation is bounded.
            let mut out = vec![0f32; n as usize];
            s.read_into(&mut out);
            let again = encode_snapshot(s.version, &out);
            let s2 = SnapshotView::decode(&again, n).expect("a re-encoded Snapshot decodes");
            let mut out2 = vec![0f32; n as usize];
            s2.read_into(&mut out2);
            assert_eq!(s2.version, s.version);
            assert!(out.iter().zip(&out2).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        Err(e) => assert!(!e.field().is_empty()),
    }
});
