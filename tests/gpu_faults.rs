//! The GPU engine when things go wrong or the device is small: a kernel that does not compile
//! or an allocation that fails is an error (never a panic), `--engine auto` then runs on the
//! CPU engine and the server keeps serving with nothing acknowledged lost; `--engine gpu`
//! does not silently run on a software adapter; and the engine works on a device whose
//! buffers and bindings are far smaller than the model.

mod common;

use common::gpu;
use common::*;
use half::f16;
use sparsync::config::{EngineChoice, GpuMode, ServerConfig};
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::gpu::device::DeviceOptions;
use sparsync::engine::gpu::{Fault, GpuAggregator, GpuOptions};
use sparsync::engine::{Aggregator, OptimizerSettings, Selection, UpdateRef};
use sparsync::protocol::frame::{PushLimits, PushView, encode_push};
use sparsync::protocol::model::SplitMix64;

/// The adapter the shared device opened (so the server under test opens the same one).
fn adapter_name() -> Option<String> {
    gpu::shared().map(|c| c.info.name.clone())
}

fn frames(rng: &mut SplitMix64, n: usize, updates: usize) -> Vec<Vec<u8>> {
    (0..updates)
        .map(|u| {
            let (idx, vals) = random_update(rng, n, n / 50 + 1, 0.5);
            encode_push(&header(0, u as u64, idx.len()), &idx, &vals)
        })
        .collect()
}

fn refs(frames: &[Vec<u8>], n: usize) -> Vec<UpdateRef<'_>> {
    let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
    frames.iter().map(|f| UpdateRef::from_push(&PushView::decode(f, &limits).unwrap(), 0.5)).collect()
}

#[test]
fn setup_failures_are_errors_not_panics() {
    let Some(ctx) = gpu::shared() else { return };
    let values = init(1000, 1);
    for fault in [Fault::Shader, Fault::Allocation] {
        let opts = GpuOptions { fault: Some(fault), ..Default::default() };
        let err = GpuAggregator::with_context(ctx.clone(), &values, OptimizerSettings::default(), &opts)
            .err()
            .unwrap_or_else(|| panic!("{fault:?}: the engine was built"));
        let msg = err.to_string();
        assert!(msg.contains("setting up the GPU engine"), "{fault:?}: {msg}");
    }
    // The device still works afterwards.
    let mut e =
        GpuAggregator::with_context(ctx, &values, OptimizerSettings::default(), &GpuOptions::default())
            .expect("a clean engine on the same device");
    e.broadcast(Selection::Exact { k: 10 }).unwrap();
}

#[test]
fn a_failed_step_changes_nothing() {
    let Some(ctx) = gpu::shared() else { return };
    let n = 5000;
    let x0 = init(n, 2);
    let opts = GpuOptions { fault: Some(Fault::StepAllocation(2)), ..Default::default() };
    let mut e = GpuAggregator::with_context(ctx, &x0, OptimizerSettings::default(), &opts).unwrap();
    let mut rng = SplitMix64::new(3);
    let f1 = frames(&mut rng, n, 3);
    e.aggregate(&refs(&f1, n)).unwrap();
    let before = e.read_state().unwrap();
    let f2 = frames(&mut rng, n, 3);
    let err = e.aggregate(&refs(&f2, n)).unwrap_err().to_string();
    assert!(err.contains("aggregation step"), "{err}");
    let after = e.read_state().unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(bits(&after.x), bits(&before.x));
}

#[test]
fn engine_auto_builds_the_cpu_engine_when_gpu_setup_fails() {
    let Some(name) = adapter_name() else { return };
    let values = init(2000, 4);
    let cfg = ServerConfig {
        engine: EngineChoice::Auto,
        adapter: Some(name.clone()),
        inject_gpu_fault: Some(Fault::Shader),
        ..Default::default()
    };
    let e = sparsync::server::build_engine(&cfg, values.clone()).expect("auto falls back");
    assert_eq!(e.info().kind, "cpu");
    // `--engine gpu` says what went wrong instead.
    let cfg = ServerConfig { engine: EngineChoice::Gpu, ..cfg };
    let err = sparsync::server::build_engine(&cfg, values).err().expect("gpu is required").to_string();
    assert!(err.contains("setting up the GPU engine"), "{err}");
}

#[test]
fn engine_gpu_does_not_pick_a_software_adapter_unless_named() {
    let Some(ctx) = gpu::shared() else { return };
    let values = init(100, 5);
    let cfg = ServerConfig { engine: EngineChoice::Gpu, ..Default::default() };
    let software_only =
        sparsync::engine::gpu::device::list_adapters().iter().all(|a| a.device_type == wgpu::DeviceType::Cpu);
    match sparsync::server::build_engine(&cfg, values.clone()) {
        Ok(e) => {
            assert!(!software_only, "--engine gpu ran on a software adapter: {:?}", e.info());
            assert_ne!(e.info().adapter, "", "a hardware adapter");
        }
        Err(err) => {
            assert!(software_only, "--engine gpu failed with a hardware adapter present: {err}");
            let msg = err.to_string();
            assert!(msg.contains("only software adapters"), "{msg}");
        }
    }
    // Naming it is how to use one.
    let cfg = ServerConfig { adapter: Some(ctx.info.name.clone()), ..cfg };
    let e = sparsync::server::build_engine(&cfg, values).expect("the named adapter opens");
    assert_eq!(e.info().kind, "gpu");
}

/// Pushes `count` updates one at a time from one client, each after the previous one's Delta,
/// so every step aggregates exactly one push; returns the server's final state.
async fn serve_pushes(cfg: ServerConfig, n: usize, count: usize) -> (sparsync::engine::ModelState, String) {
    let engine = sparsync::server::build_engine(&cfg, init(n, 6)).expect("engine");
    let h = start(cfg, n, engine).await;
    let mut c = connect(&h, "one").await;
    let mut rng = SplitMix64::new(7);
    for seq in 1..=count as u64 {
        let (idx, vals) = random_update(&mut rng, n, n / 20, 0.25);
        let base = c.version();
        c.push(&header(base, seq, idx.len()), &idx, &vals).await.expect("push sent");
        wait_ack(&mut c, seq).await;
        catch_up(&mut c, base + 1).await;
    }
    // The status is published a moment after the step that changed the engine.
    let mut engine_kind = h.status().engine.kind.clone();
    for _ in 0..200 {
        if engine_kind == "cpu" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        engine_kind = h.status().engine.kind.clone();
    }
    let state = h.shutdown("test over").await.expect("shutdown");
    (state, engine_kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_failure_mid_run_falls_back_to_cpu_and_loses_nothing() {
    let Some(name) = adapter_name() else { return };
    let n = 4000;
    let base = ServerConfig { rho_down: 0.05, ..Default::default() };
    let reference = ServerConfig { engine: EngineChoice::Cpu, ..base.clone() };
    let (want, _) = serve_pushes(reference, n, 8).await;
    for fault in [Fault::StepAllocation(4), Fault::BroadcastAllocation(3)] {
        let faulty = ServerConfig {
            engine: EngineChoice::Auto,
            adapter: Some(name.clone()),
            gpu_mode: GpuMode::Deterministic,
            inject_gpu_fault: Some(fault),
            ..base.clone()
        };
        let (got, kind) = serve_pushes(faulty, n, 8).await;
        assert_eq!(kind, "cpu", "{fault}: the server continued on the CPU engine");
        assert_eq!(got.version, want.version, "{fault}");
        assert_eq!(bits(&got.x), bits(&want.x), "{fault}: every acknowledged push applied exactly once");
        assert_eq!(bits(&got.replica), bits(&want.replica), "{fault}: every Delta sent once");
    }
}

/// WebGPU's default limits with buffers and bindings far smaller than the model: the model
/// spans many chunks, a readback takes several pieces, uploads several parts.
#[test]
fn works_on_a_device_with_small_buffers() {
    if gpu::shared().is_none() {
        return;
    }
    let limits = wgpu::Limits {
        max_buffer_size: 1 << 18,
        max_storage_buffer_binding_size: 1 << 16,
        ..wgpu::Limits::default()
    };
    let Some(ctx) = gpu::open(&DeviceOptions { limits: Some(limits), ..Default::default() }) else { return };
    assert_eq!(ctx.max_binding(), 1 << 16);
    let n = 200_000; // 800 KB per model buffer: 13 chunks of 16,384, readbacks in pieces
    let opt = OptimizerSettings { momentum: 0.5, server_lr: 0.9 };
    let x0 = init(n, 8);
    let mut cpu = CpuAggregator::new(x0.clone(), opt);
    let mut gpu = GpuAggregator::with_context(ctx, &x0, opt, &GpuOptions::default()).unwrap();
    assert_eq!(gpu.num_chunks(), n.div_ceil(1 << 14));
    let mut rng = SplitMix64::new(9);
    for step in 0..4 {
        // 40 updates of 4,001 entries: 960 KB of payload, more than one binding and one buffer.
        let f = frames(&mut rng, n, 40);
        let batch = refs(&f, n);
        cpu.aggregate(&batch).unwrap();
        gpu.aggregate(&batch).unwrap();
        let k = 2000;
        let a = cpu.broadcast(Selection::Exact { k }).unwrap();
        let b = gpu.broadcast(Selection::Exact { k }).unwrap();
        assert!(a.frame == b.frame, "step {step}: Delta frames differ");
    }
    let (s1, s2) = (cpu.read_state().unwrap(), gpu.read_state().unwrap());
    assert_eq!(bits(&s1.x), bits(&s2.x));
    assert_eq!(bits(&s1.replica), bits(&s2.replica));
    assert_eq!(bits(&s1.momentum), bits(&s2.momentum));
    let _ = f16::ZERO;
}
