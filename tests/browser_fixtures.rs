//! Frames produced by the Rust protocol module, for the browser codec's tests
//! (clients/browser/test/protocol.test.mjs). This test regenerates them and fails if the
//! committed files differ; `SPARSYNC_WRITE_FIXTURES=1` rewrites them.

use half::f16;
use sparsync::protocol::frame::{DeltaHeader, PushHeader, encode_delta, encode_push, encode_snapshot};
use sparsync::protocol::numerics::{apply_delta_entry, to_f16_sat};
use sparsync::protocol::replica::checksum;

fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    let push_vals = [0.5f32, -1.25, 65504.0, 5.960_464_5e-8, -0.0].map(f16::from_f32);
    let push = encode_push(
        &PushHeader { base_version: 7, seq: 3, samples: 32, local_steps: 10, loss: 0.5, nnz: 5 },
        &[1, 4, 9, 16, 25],
        &push_vals,
    );
    let snap_vals = [1.5f32, -0.25, 0.0, 1e10, -1.0, 2.5, 0.125, 3.0e-5];
    let snapshot = encode_snapshot(7, &snap_vals);
    let delta_vals = [0.1f32, -2.0, 1e-5].map(f16::from_f32);
    let delta = encode_delta(&DeltaHeader { version: 8, base_version: 7, nnz: 3 }, &[0, 2, 5], &delta_vals);
    // The replica after the snapshot and the Delta, and its checksum.
    let mut replica = snap_vals.to_vec();
    for (i, h) in [0usize, 2, 5].iter().zip(delta_vals) {
        replica[*i] = apply_delta_entry(replica[*i], h);
    }
    // f32 → f16 conversions at the edges (bits in, bits out).
    let probes: Vec<u32> = [
        0.0f32,
        -0.0,
        1.0,
        65504.0,
        65519.0,
        65520.0,
        1e9,
        -1e9,
        6.1035156e-5,
        6.0e-5,
        5.9604645e-8,
        2.9802322e-8,
        2.98e-8,
        1.0e-12,
        0.1,
        -3.25,
        // Ties of the f16 rounding: 1 + 2^-11 rounds to even (down), 1 + 3·2^-11 up.
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        2049.0,
        2051.0,
    ]
    .iter()
    .map(|v| v.to_bits())
    .collect();
    let table: Vec<(u32, u16)> =
        probes.iter().map(|&b| (b, to_f16_sat(f32::from_bits(b)).to_bits())).collect();
    let expected = serde_json::json!({
        "push": { "base_version": 7, "seq": 3, "samples": 32, "local_steps": 10, "loss": 0.5,
                  "indices": [1, 4, 9, 16, 25], "values": push_vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>() },
        "snapshot": { "version": 7, "values": snap_vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>() },
        "delta": { "version": 8, "base_version": 7, "indices": [0, 2, 5],
                   "values": delta_vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>() },
        "replica_after_delta": replica.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "checksum": format!("{:016x}", checksum(&replica)),
        "f16": table,
    });
    vec![
        ("push.bin", push),
        ("snapshot.bin", snapshot),
        ("delta.bin", delta),
        ("expected.json", (serde_json::to_string_pretty(&expected).unwrap() + "\n").into_bytes()),
    ]
}

#[test]
fn browser_fixtures_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/browser/test/fixtures");
    let write = std::env::var("SPARSYNC_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    for (name, bytes) in fixtures() {
        let p = dir.join(name);
        if write {
            std::fs::write(&p, &bytes).unwrap();
        }
        let committed = std::fs::read(&p).unwrap_or_default();
        assert!(
            committed == bytes,
            "{name} is stale: run SPARSYNC_WRITE_FIXTURES=1 cargo test --test browser_fixtures"
        );
    }
}
