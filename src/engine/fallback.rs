//! The engine under `--engine auto`: the GPU engine, and the CPU engine after the GPU fails.

use super::cpu::CpuAggregator;
use super::{Aggregator, EngineError, ModelState, OptimizerSettings};

/// The engine under `--engine auto`: the GPU engine until a call to it fails, then the CPU
/// engine with the state read back from the GPU (the failed call is repeated on it). A GPU call
/// that fails leaves the model as it was: the part of a step that changes x is one command
/// buffer, submitted only after any earlier parts succeeded (an invalid one runs nothing), and
/// a broadcast changes x̂ only after its selection was read back and checked. So nothing
/// acknowledged is lost or applied twice. When the state cannot be read back (the device is
/// lost), the error stands.
pub struct FallbackEngine {
    inner: Box<dyn Aggregator>,
    on_gpu: bool,
    opt: OptimizerSettings,
    threads: usize,
}

impl FallbackEngine {
    /// `inner` (a GPU engine) until it fails, then a CPU engine of `threads` threads.
    pub fn new(inner: Box<dyn Aggregator>, opt: OptimizerSettings, threads: usize) -> Self {
        Self { inner, on_gpu: true, opt, threads }
    }

    /// Moves to the CPU engine after `e`, or returns `e` when that is not possible.
    fn fall_back(&mut self, e: EngineError, state: Option<&ModelState>) -> Result<(), EngineError> {
        if !self.on_gpu {
            return Err(e);
        }
        let state = match state {
            Some(s) => s.clone(),
            None => match self.inner.read_state() {
                Ok(s) => s,
                Err(read) => {
                    tracing::error!(error = %e, read_back = %read, "GPU engine failed and its state cannot be read");
                    return Err(e);
                }
            },
        };
        let mut cpu = CpuAggregator::with_threads(state.x.clone(), self.opt, self.threads);
        cpu.load_state(&state)?;
        tracing::warn!(error = %e, version = state.version, "GPU engine failed: continuing on the CPU engine");
        self.inner = Box::new(cpu);
        self.on_gpu = false;
        Ok(())
    }
}

impl Aggregator for FallbackEngine {
    fn info(&self) -> super::EngineInfo {
        self.inner.info()
    }
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }
    fn version(&self) -> u64 {
        self.inner.version()
    }
    fn replica_version(&self) -> u64 {
        self.inner.replica_version()
    }
    fn aggregate(&mut self, batch: &[super::UpdateRef<'_>]) -> Result<(), EngineError> {
        match self.inner.aggregate(batch) {
            Err(e) => {
                self.fall_back(e, None)?;
                self.inner.aggregate(batch)
            }
            ok => ok,
        }
    }
    fn broadcast(&mut self, selection: super::Selection) -> Result<super::Broadcast, EngineError> {
        match self.inner.broadcast(selection) {
            Err(e) => {
                self.fall_back(e, None)?;
                self.inner.broadcast(selection)
            }
            ok => ok,
        }
    }
    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError> {
        match self.inner.read_replica() {
            Err(e) => {
                self.fall_back(e, None)?;
                self.inner.read_replica()
            }
            ok => ok,
        }
    }
    fn read_state(&mut self) -> Result<super::ModelState, EngineError> {
        // Reading the state is what falling back needs: no retry through it.
        self.inner.read_state()
    }
    fn load_state(&mut self, state: &super::ModelState) -> Result<(), EngineError> {
        match self.inner.load_state(state) {
            Err(e) => self.fall_back(e, Some(state)),
            ok => ok,
        }
    }
    fn take_stage_times(&mut self) -> super::StageTimes {
        self.inner.take_stage_times()
    }
    fn counters(&self) -> super::EngineCounters {
        self.inner.counters()
    }
}
