//! [`KernelProbe`] for the GPU engine: what the kernel benchmarks may ask of it.

use super::{GpuAggregator, aggregate};
use crate::engine::{EngineError, KernelProbe};

impl KernelProbe for GpuAggregator {
    fn replay(&mut self, which: aggregate::Replay) -> Result<bool, EngineError> {
        let ctx = self.ctx.clone();
        ctx.scoped("benchmark replay", || {
            let Some(enc) = self.step.replay(which) else { return Ok(false) };
            ctx.queue.submit([enc.finish()]);
            ctx.wait()?;
            Ok(true)
        })
    }

    fn time_kernels(&mut self) {
        self.step.time_kernels();
    }

    fn device_time(&mut self) -> Result<Option<f64>, EngineError> {
        self.step.device_time(&mut self.readback)
    }
}
