//! Pipelined steps change nothing a user can see. The same pushes, sent to a server that runs
//! one step at a time (`steps_in_flight` 1) and to one that keeps up to three steps on the
//! engine, give bit-identical models, Delta streams (the frames the engine made, in order)
//! and write-ahead log records, on the CPU engine and on the GPU engine (lavapipe in CI).
//! The pipelined run is checked to have had steps overlapping, else it would prove nothing.
//! The same holds for a model split in key ranges across engines (`--shards`).

mod common;

use common::*;
use sparsync::config::{PolicyKind, ServerConfig};
use sparsync::core::Input;
use sparsync::core::log::WalOp;
use sparsync::engine::Aggregator;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::gpu::{GpuAggregator, GpuOptions};
use sparsync::policy::staleness::WeightingKind;
use sparsync::protocol::model::SplitMix64;
use sparsync::server::Tape;

const N: usize = 1 << 16;
/// FedBuff aggregates every K pushes: the batches depend only on the order pushes arrive in.
const K: usize = 4;
const PUSHES: u64 = 48;

fn cfg(in_flight: usize, dir: &std::path::Path) -> ServerConfig {
    let mut c = ServerConfig {
        policy: PolicyKind::Fedbuff,
        // Weights depend on the version a step is applied to: a pipelined step formed before
        // the one ahead of it finished must still get the serial path's weights.
        weighting: WeightingKind::Polynomial,
        max_staleness: 1_000,
        rho_down: 0.01,
        steps_in_flight: in_flight,
        checkpoint_dir: Some(dir.join("ckpt")),
        wal: sparsync::config::WalTarget::File,
        max_frame_bytes: sparsync::server::derived_frame_limit(N),
        ..Default::default()
    };
    c.policies.fedbuff.fedbuff_k = K;
    c
}

/// What a user of the run can see.
#[derive(Debug, PartialEq)]
struct Seen {
    model: Vec<u32>,
    replica: Vec<u32>,
    /// The Delta frames, in the order the engine made them.
    deltas: Vec<Vec<u8>>,
    /// The log's push records and step records, each in their order (a step's record comes
    /// later when steps overlap, so the two interleave differently).
    pushes: Vec<String>,
    steps: Vec<String>,
}

/// One client sends every push without waiting (base version 0, so each step's weights depend
/// on its version), waits for every Ack, and the server shuts down. Returns what was seen and
/// the most steps the engine held at once.
async fn run(in_flight: usize, engine: Box<dyn Aggregator>) -> (Seen, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tape = Tape::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let h = sparsync::server::start_with_tape(
        cfg(in_flight, dir.path()),
        listener,
        layout(N),
        engine,
        tape.clone(),
    )
    .await
    .expect("server starts");
    let mut c = connect(&h, "trainer").await;
    let mut rng = SplitMix64::new(11);
    for seq in 1..=PUSHES {
        let (idx, vals) = random_update(&mut rng, N, N / 100, 0.5);
        c.push(&header(0, seq, idx.len()), &idx, &vals).await.expect("push");
    }
    for seq in 1..=PUSHES {
        wait_ack(&mut c, seq).await;
    }
    // Every step's Delta arrived, so its record is in the log (read before the final
    // checkpoint, which starts a new log).
    catch_up(&mut c, PUSHES / K as u64).await;
    let ops = sparsync::server::durability::replay(&dir.path().join("ckpt"), 0).expect("the log reads back");
    c.close("done").await;
    let state = h.shutdown("test done").await.expect("shutdown");

    let mut deltas = Vec::new();
    let (mut outstanding, mut most) = (0usize, 0usize);
    for e in tape.entries() {
        if let Input::StepDone { outcome } = &e.input {
            outstanding = outstanding.saturating_sub(1);
            let r = outcome.as_ref().expect("no step failed");
            deltas.extend(r.broadcast.as_ref().map(|b| b.frame.clone()));
        }
        outstanding += e.effects.matches("Step(StepJob").count();
        most = most.max(outstanding);
    }
    let (mut pushes, mut steps) = (Vec::new(), Vec::new());
    for op in &ops {
        match op {
            WalOp::Push(_) => pushes.push(format!("{op:?}")),
            WalOp::Step(_) => steps.push(format!("{op:?}")),
        }
    }
    let seen = Seen { model: bits(&state.x), replica: bits(&state.replica), deltas, pushes, steps };
    (seen, most)
}

async fn serial_and_pipelined(engine: impl Fn() -> Box<dyn Aggregator>) {
    let (serial, most) = run(1, engine()).await;
    assert_eq!(most, 1, "steps_in_flight 1 held {most} steps at once");
    assert_eq!(serial.deltas.len() as u64, PUSHES / K as u64, "one Delta per step");
    assert_eq!(serial.pushes.len() as u64, PUSHES);
    assert_eq!(serial.steps.len() as u64, PUSHES / K as u64);
    assert!(serial.model.iter().any(|&b| f32::from_bits(b) != 0.0), "the model moved");
    let (pipelined, most) = run(3, engine()).await;
    assert!(most >= 2, "the pipelined run never had two steps on the engine: the test proves nothing");
    // Compared piece by piece so that a failure says which.
    assert!(pipelined.model == serial.model, "models differ");
    assert!(pipelined.replica == serial.replica, "replicas (x̂) differ");
    assert!(pipelined.deltas == serial.deltas, "Delta streams differ");
    assert_eq!(pipelined.pushes, serial.pushes, "push records differ");
    assert_eq!(pipelined.steps, serial.steps, "step records differ");
    eprintln!("pipelined run held up to {most} steps at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_steps_give_the_serial_models_deltas_and_log_on_the_cpu_engine() {
    serial_and_pipelined(|| Box::new(CpuAggregator::new(vec![0.0; N], Default::default()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_steps_give_the_serial_models_deltas_and_log_on_the_gpu_engine() {
    let Some(ctx) = common::gpu::shared() else { return };
    serial_and_pipelined(|| {
        Box::new(
            GpuAggregator::with_context(
                ctx.clone(),
                &vec![0.0; N],
                Default::default(),
                &GpuOptions::default(),
            )
            .expect("GPU engine"),
        )
    })
    .await;
}

/// A server whose engine is split in key ranges (`--shards`) sends the serial one-engine
/// server's bits, pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_engine_pipelined_gives_the_serial_single_engines_bits() {
    use sparsync::engine::sharded::ShardedAggregator;
    let (serial, _) = run(1, Box::new(CpuAggregator::new(vec![0.0; N], Default::default()))).await;
    for shards in [2, 3] {
        let (sharded, most) =
            run(3, Box::new(ShardedAggregator::new(vec![0.0; N], Default::default(), shards, 1))).await;
        assert!(most >= 2, "{shards} shards: the run never had two steps on the engine");
        assert!(sharded.model == serial.model, "{shards} shards: models differ");
        assert!(sharded.replica == serial.replica, "{shards} shards: replicas differ");
        assert!(sharded.deltas == serial.deltas, "{shards} shards: Delta streams differ");
        assert_eq!(sharded.steps, serial.steps, "{shards} shards: step records differ");
    }
}
