//! A client round costs the same whatever the dataset's size: the training set is shared with
//! the training jobs, never copied per round. Measured in bytes allocated (deterministic, not
//! in time): 20 rounds with a 15× larger training set (60,000 images, 47 MB) allocate about as
//! much as with the 4,000-image subset. The round used to clone the whole set (47 MB each).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::data::{Dataset, FashionMnist};
use sparsync_client::emulate::Emulation;
use sparsync_client::run::{self, Config};

struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUNDS: u64 = 20;

/// Bytes allocated per round by a server and one trainer running `ROUNDS` rounds on `data`.
async fn per_round(data: FashionMnist) -> f64 {
    let cfg = ServerConfig { model: "mlp".into(), engine: EngineChoice::Cpu, ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(cfg, listener).await.unwrap();
    let c = Config {
        max_rounds: Some(ROUNDS),
        reconnect: false,
        seed: 3,
        ..Config::new(&format!("ws://{}/ws", h.addr), "trainer", "mlp")
    };
    let before = ALLOCATED.load(Ordering::Relaxed);
    let s = run::run(c, data, Emulation::none()).await.expect("the trainer runs");
    let after = ALLOCATED.load(Ordering::Relaxed);
    assert_eq!(s.rounds, ROUNDS);
    h.shutdown("done").await.unwrap();
    (after - before) as f64 / ROUNDS as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_costs_the_same_whatever_the_dataset_size() {
    let small = sparsync::data::embedded();
    let t = &small.train;
    let times = 15;
    let big_train = Dataset {
        images: t.images.repeat(times),
        labels: t.labels.repeat(times),
        rows: t.rows,
        cols: t.cols,
    };
    let big =
        FashionMnist { train: Arc::new(big_train), test: small.test.clone(), source: small.source.clone() };
    let big_bytes = big.train.images.len() as f64;
    let a = per_round(small).await;
    let b = per_round(big).await;
    eprintln!(
        "allocated per round: {:.1} MB with 4,000 images, {:.1} MB with 60,000 ({:.1} MB of images)",
        a / 1e6,
        b / 1e6,
        big_bytes / 1e6
    );
    assert!(
        b - a < 0.1 * big_bytes,
        "a round allocates {:.1} MB more with a 15× larger set ({:.1} MB)",
        (b - a) / 1e6,
        big_bytes / 1e6
    );
}
