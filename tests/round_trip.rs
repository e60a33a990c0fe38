//! One full round trip on real sockets: two protocol-level clients push sparse updates in any
//! interleaving, both receive Deltas, and afterwards each replica equals the server's x̂ bit
//! for bit.

mod common;

use std::time::Duration;

use common::gpu;
use common::*;
use proptest::prelude::*;
use sparsync::config::ServerConfig;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::gpu::{GpuAggregator, GpuOptions};
use sparsync::engine::{Aggregator, OptimizerSettings};
use sparsync::protocol::model::SplitMix64;

/// One step of a scripted interleaving.
#[derive(Clone, Debug)]
enum Op {
    /// Client c pushes a random update computed from its current replica.
    Push { c: usize, nnz: usize },
    /// Client c handles the messages that arrive within a few milliseconds.
    Recv { c: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize, 1..200usize).prop_map(|(c, nnz)| Op::Push { c, nnz }),
        (0..2usize).prop_map(|c| Op::Recv { c }),
    ]
}

type EngineFactory = fn(Vec<f32>, OptimizerSettings) -> Box<dyn Aggregator>;

fn cpu(values: Vec<f32>, opt: OptimizerSettings) -> Box<dyn Aggregator> {
    Box::new(CpuAggregator::new(values, opt))
}

/// The GPU engine in deterministic mode on the shared device, in chunks of 1000 so that
/// updates and Deltas cross chunk boundaries.
fn gpu_engine(values: Vec<f32>, opt: OptimizerSettings) -> Box<dyn Aggregator> {
    let ctx = gpu::shared().expect("checked by the caller");
    let opts = GpuOptions { chunk_elems: Some(1000), ..Default::default() };
    Box::new(GpuAggregator::with_context(ctx, &values, opt, &opts).expect("GPU engine"))
}

/// Runs a script against a fresh server and checks both replicas against x̂.
async fn run_script(ops: Vec<Op>, n: usize, seed: u64, momentum: f32, factory: EngineFactory) {
    let cfg = ServerConfig { rho_down: 0.02, momentum, server_lr: 0.75, ..Default::default() };
    let opt = OptimizerSettings { momentum, server_lr: 0.75 };
    let h = start(cfg, n, factory(init(n, seed), opt)).await;
    let mut clients = [connect(&h, "a").await, connect(&h, "b").await];
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    let mut seqs = [0u64; 2];
    let mut outstanding = [Vec::new(), Vec::new()];
    for op in ops {
        match op {
            Op::Push { c, nnz } => {
                let (idx, vals) = random_update(&mut rng, n, nnz, 0.5);
                seqs[c] += 1;
                let base = clients[c].version();
                clients[c].push(&header(base, seqs[c], idx.len()), &idx, &vals).await.unwrap();
                outstanding[c].push(seqs[c]);
            }
            Op::Recv { c } => {
                while let Some(e) = clients[c].next_event_within(Duration::from_millis(3)).await.unwrap() {
                    if let sparsync::client::Event::Ack(a) = &e {
                        outstanding[c].retain(|&s| s != a.seq);
                    }
                    assert!(!matches!(e, sparsync::client::Event::Reject(_)), "unexpected {e:?}");
                }
            }
        }
    }
    for c in 0..2 {
        for seq in std::mem::take(&mut outstanding[c]) {
            wait_ack(&mut clients[c], seq).await;
        }
    }
    // Every push is acknowledged; wait until the coordinator has applied them all.
    let total: u64 = seqs.iter().sum();
    let state = loop {
        let s = h.state().await.unwrap();
        let st = h.status();
        if st.aggregated == total && s.replica_version == s.version {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for c in clients.iter_mut() {
        catch_up(c, state.replica_version).await;
        assert_eq!(bits(c.replica.values()), bits(&state.replica), "replica differs from x̂");
    }
    h.shutdown("test done").await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replicas_equal_server_replica_after_any_interleaving(
        ops in prop::collection::vec(op(), 1..40),
        seed in any::<u64>(),
        momentum in prop_oneof![Just(0.0f32), Just(0.9f32)],
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_script(ops, 3000, seed, momentum, cpu));
    }

    #[test]
    fn replicas_equal_server_replica_on_the_gpu_engine(
        ops in prop::collection::vec(op(), 1..30),
        seed in any::<u64>(),
        momentum in prop_oneof![Just(0.0f32), Just(0.9f32)],
    ) {
        if gpu::shared().is_some() {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(run_script(ops, 3000, seed, momentum, gpu_engine));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_runs_on_the_gpu_engine_end_to_end() {
    let Some(ctx) = gpu::shared() else { return };
    let cfg = ServerConfig {
        model: "logreg".into(),
        engine: sparsync::config::EngineChoice::Gpu,
        // Named, so that a software adapter (lavapipe in CI) is used too.
        adapter: Some(ctx.info.name.clone()),
        chunk_elems: Some(3000),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(cfg, listener).await.unwrap();
    assert_eq!(h.status().engine.kind, "gpu");
    let opts = |id: &str| {
        let mut o = sparsync::client::ClientOptions::new(format!("ws://{}/ws", h.addr), id, "logreg");
        o.timeout = Duration::from_secs(30);
        o
    };
    let mut a = sparsync::client::Connection::connect(&opts("a")).await.unwrap();
    let mut b = sparsync::client::Connection::connect(&opts("b")).await.unwrap();
    let mut rng = SplitMix64::new(4);
    for seq in 1..=5u64 {
        for c in [&mut a, &mut b] {
            let (idx, vals) = random_update(&mut rng, 7850, 80, 0.2);
            let base = c.version();
            c.push(&header(base, seq, idx.len()), &idx, &vals).await.unwrap();
            wait_ack(c, seq).await;
        }
    }
    let state = loop {
        let s = h.state().await.unwrap();
        if h.status().aggregated == 10 && s.replica_version == s.version {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for c in [&mut a, &mut b] {
        catch_up(c, state.replica_version).await;
        assert_eq!(bits(c.replica.values()), bits(&state.replica));
    }
    h.shutdown("done").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_receive_deltas_of_each_others_updates() {
    let n = 1000;
    let h = start(ServerConfig::default(), n, cpu(init(n, 1), OptimizerSettings::default())).await;
    let mut a = connect(&h, "a").await;
    let mut b = connect(&h, "b").await;
    let (idx, vals) = (vec![3u32, 700], vec![half::f16::from_f32(0.5), half::f16::from_f32(-0.25)]);
    a.push(&header(0, 1, 2), &idx, &vals).await.unwrap();
    let ack = wait_ack(&mut a, 1).await;
    assert_eq!(ack.staleness, 0);
    // b never pushed, but receives the Delta that carries a's update.
    catch_up(&mut b, 1).await;
    let before = init(n, 1);
    assert!((b.replica.values()[3] - before[3] - 0.5).abs() < 1e-3);
    assert!((b.replica.values()[700] - before[700] + 0.25).abs() < 1e-3);
    assert_eq!(b.replica.values()[4], before[4]);
    h.shutdown("done").await.unwrap();
}
