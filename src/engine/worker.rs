//! The engine on a thread of its own.
//!
//! The coordinator hands the engine work without waiting for it: an aggregation step, a read of
//! x̂ or of the state. Jobs run one at a time, in the order they were queued, so a read queued
//! after a step sees that step applied, and steps are applied in the order the core formed
//! them. Each job's result comes back on its own channel. While the engine runs step n, the
//! coordinator keeps decoding, ordering and logging what arrives and forms step n + 1.
//!
//! A job that panics does not take the thread down: its caller gets
//! [`EngineError::Stopped`], and the next job runs (a caller whose later jobs must not run
//! after a failure says so itself, as the coordinator's steps do).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Aggregator, EngineError};

type Job = Box<dyn FnOnce(&mut dyn Aggregator) + Send>;

/// An [`Aggregator`] owned by a thread that runs the jobs queued to it in order.
pub struct EngineWorker {
    tx: mpsc::Sender<Job>,
    /// Nanoseconds the thread spent running jobs.
    busy_ns: Arc<AtomicU64>,
}

impl EngineWorker {
    /// Moves `engine` to a new thread named `sparsync-engine`.
    pub fn spawn(mut engine: Box<dyn Aggregator>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let busy_ns = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new().name("sparsync-engine".into()).spawn(move || {
            // Ends when every sender is gone (the coordinator stopped).
            while let Ok(job) = rx.recv() {
                if catch_unwind(AssertUnwindSafe(|| job(engine.as_mut()))).is_err() {
                    tracing::error!("an engine job panicked; its caller gets an error");
                }
            }
        })?;
        Ok(Self { tx, busy_ns })
    }

    /// Queues `f` behind every job queued before it; the receiver yields its result (or
    /// [`EngineError::Stopped`] if the job panicked or the thread is gone).
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Aggregator) -> Result<T, EngineError> + Send + 'static,
    ) -> Pending<T> {
        let (reply, rx) = oneshot::channel();
        let busy = self.busy_ns.clone();
        let job: Job = Box::new(move |e| {
            let t0 = Instant::now();
            let r = f(e);
            // Counted before the reply, so that a caller reading `busy` after it sees this job.
            busy.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let _ = reply.send(r);
        });
        // A send error means the thread is gone: the dropped reply tells the caller.
        let _ = self.tx.send(job);
        Pending(rx)
    }

    /// Runs `f` after every job queued before it and waits for its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Aggregator) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        self.submit(f).wait().await
    }

    /// Time the thread has spent running jobs since it started.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }
}

/// The result of a job still queued or running.
pub struct Pending<T>(oneshot::Receiver<Result<T, EngineError>>);

impl<T> Pending<T> {
    /// Waits for the job.
    pub async fn wait(self) -> Result<T, EngineError> {
        let mut this = self;
        this.wait_mut().await
    }

    /// Waits for the job without consuming the handle (cancel-safe: a `select!` that drops
    /// this future loses nothing).
    pub async fn wait_mut(&mut self) -> Result<T, EngineError> {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Stopped("the engine job panicked or its thread is gone".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuAggregator;
    use crate::engine::{Selection, UpdateRef};

    fn engine(n: usize) -> Box<dyn Aggregator> {
        Box::new(CpuAggregator::new(vec![0.0; n], Default::default()))
    }

    #[tokio::test]
    async fn jobs_run_in_the_order_queued_and_a_read_sees_the_steps_before_it() {
        let w = EngineWorker::spawn(engine(8)).unwrap();
        let mut steps = Vec::new();
        for i in 0..5u32 {
            steps.push(w.submit(move |e| {
                let idx = i.to_le_bytes();
                let val = half::f16::from_f32(1.0).to_le_bytes();
                let payload = [idx.as_slice(), val.as_slice()].concat();
                e.aggregate(&[UpdateRef { weight: 1.0, indices: &idx, values: &val, payload: &payload }])?;
                Ok(e.version())
            }));
        }
        let read = w.submit(|e| e.read_state());
        for (i, s) in steps.into_iter().enumerate() {
            assert_eq!(s.wait().await.unwrap(), i as u64 + 1);
        }
        let state = read.wait().await.unwrap();
        assert_eq!(state.version, 5);
        assert!(w.busy() > Duration::ZERO);
    }

    #[tokio::test]
    async fn a_panicking_job_gives_its_caller_an_error_and_the_engine_goes_on() {
        let w = EngineWorker::spawn(engine(4)).unwrap();
        let bad = w.call(|_| -> Result<(), EngineError> { panic!("boom") }).await;
        assert!(matches!(bad, Err(EngineError::Stopped(_))), "{bad:?}");
        let bc = w.call(|e| e.broadcast(Selection::Exact { k: 1 })).await;
        assert!(bc.is_ok(), "{bc:?}");
    }
}
