//! Local training with burn: mini-batch SGD on a shard, evaluation on a test set.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use sparsync::data::Dataset;
use sparsync::protocol::model::SplitMix64;

use crate::model::{ModelError, Net};

/// What one local round of training did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundStats {
    pub steps: u64,
    pub samples: u64,
    /// Mean training loss over the round's mini-batches.
    pub loss: f32,
    /// Seconds of compute (without emulated slowdown).
    pub compute_s: f64,
    /// Seconds the steps took, emulated slowdown included (what Hermes' allocation equalises).
    pub train_s: f64,
}

/// Accuracy and mean loss on a test set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Score {
    pub accuracy: f64,
    pub loss: f64,
    pub samples: u64,
}

/// A model being trained, its optimiser and its data.
pub struct Trainer {
    model: Option<Net>,
    optim: burn::optim::ModuleOptimizer,
    device: Device,
    rng: SplitMix64,
    /// Order in which the shard is visited; refilled each epoch.
    order: Vec<usize>,
    cursor: usize,
}

/// Images [batch, 784] scaled to [0, 1] and labels [batch].
pub fn batch_tensors(data: &Dataset, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let p = data.pixels();
    let mut x = Vec::with_capacity(indices.len() * p);
    for &i in indices {
        x.extend(data.image(i).iter().map(|&b| b as f32 / 255.0));
    }
    let y: Vec<i64> = indices.iter().map(|&i| data.labels[i] as i64).collect();
    (
        Tensor::from_data(TensorData::new(x, [indices.len(), p]), device),
        Tensor::from_data(TensorData::new(y, [indices.len()]), device),
    )
}

impl Trainer {
    /// A trainer for model family `name` (values are set from the server with `set_params`).
    pub fn new(name: &str, seed: u64) -> Result<Self, ModelError> {
        let device = Device::default().autodiff();
        let model = Net::new(name, &device)?;
        Ok(Self {
            model: Some(model),
            optim: SgdConfig::new().init(),
            device,
            rng: SplitMix64::new(seed),
            order: Vec::new(),
            cursor: 0,
        })
    }

    fn model(&self) -> &Net {
        self.model.as_ref().expect("the model is only taken during a step")
    }

    pub fn net(&self) -> &Net {
        self.model()
    }

    /// The flat parameter vector.
    pub fn params(&self) -> Vec<f32> {
        self.model().flatten()
    }

    /// Replaces the parameters.
    pub fn set_params(&mut self, values: &[f32]) -> Result<(), ModelError> {
        let expected: usize = self.model().layout().iter().map(|t| t.numel()).sum();
        if values.len() != expected {
            return Err(ModelError::Size { expected, got: values.len() });
        }
        let m = self.model.take().expect("present");
        self.model = Some(m.unflatten(values)?);
        Ok(())
    }

    /// Next mini-batch of the shard: shuffled epochs, seeded.
    fn next_batch(&mut self, shard: &[usize], batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch.min(shard.len()) {
            if self.cursor >= self.order.len() {
                self.order = shard.to_vec();
                // Fisher–Yates with the trainer's own seeded stream.
                for i in (1..self.order.len()).rev() {
                    let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
                    self.order.swap(i, j);
                }
                self.cursor = 0;
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }

    /// One SGD step on a mini-batch; returns its loss.
    pub fn step(&mut self, data: &Dataset, shard: &[usize], batch: usize, lr: f64) -> f32 {
        let idx = self.next_batch(shard, batch);
        let (x, y) = batch_tensors(data, &idx, &self.device);
        let model = self.model.take().expect("present");
        let logits = model.forward(x);
        let loss = CrossEntropyLossConfig::new().init(&self.device).forward(logits, y);
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.optim.step(lr, model, grads));
        value
    }

    /// `steps` SGD steps; `after_step` runs after each with the step's compute time (used to
    /// emulate slow devices). Returns the round's statistics.
    pub fn train(
        &mut self,
        data: &Dataset,
        shard: &[usize],
        steps: u64,
        batch: usize,
        lr: f64,
        mut after_step: impl FnMut(f64),
    ) -> RoundStats {
        let mut s = RoundStats::default();
        let mut total = 0.0f64;
        let started = std::time::Instant::now();
        for _ in 0..steps {
            let t = std::time::Instant::now();
            let loss = self.step(data, shard, batch, lr);
            let dt = t.elapsed().as_secs_f64();
            s.compute_s += dt;
            after_step(dt);
            total += loss as f64;
            s.steps += 1;
            s.samples += batch.min(shard.len()) as u64;
        }
        s.loss = if s.steps > 0 { (total / s.steps as f64) as f32 } else { 0.0 };
        s.train_s = started.elapsed().as_secs_f64();
        s
    }

    /// Accuracy and loss of the current parameters on `indices` of `data` (all if None).
    pub fn evaluate(&self, data: &Dataset, indices: Option<&[usize]>) -> Score {
        evaluate(self.model(), data, indices)
    }
}

/// Scores a model (on the base device, without autodiff) in batches of 500.
pub fn evaluate(model: &Net, data: &Dataset, indices: Option<&[usize]>) -> Score {
    let model = model.valid();
    let all: Vec<usize>;
    let idx = match indices {
        Some(i) => i,
        None => {
            all = (0..data.len()).collect();
            &all
        }
    };
    if idx.is_empty() {
        return Score::default();
    }
    let device = Device::default();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let (mut correct, mut loss_sum) = (0u64, 0.0f64);
    for chunk in idx.chunks(500) {
        let (x, y) = batch_tensors(data, chunk, &device);
        let logits = model.forward(x);
        let loss = ce.forward(logits.clone(), y.clone()).into_scalar::<f32>();
        loss_sum += loss as f64 * chunk.len() as f64;
        let pred = logits.argmax(1).reshape([chunk.len()]);
        correct += pred.equal(y).int().sum().into_scalar::<i64>() as u64;
    }
    Score {
        accuracy: correct as f64 / idx.len() as f64,
        loss: loss_sum / idx.len() as f64,
        samples: idx.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_learns_on_the_embedded_subset() {
        let data = sparsync::data::embedded();
        let mut t = Trainer::new("mlp", 1).unwrap();
        let layout = sparsync::protocol::model::ModelLayout::builtin("mlp").unwrap();
        t.set_params(&layout.init(0)).unwrap();
        let shard: Vec<usize> = (0..data.train.len()).collect();
        let before = t.evaluate(&data.test, None);
        let stats = t.train(&data.train, &shard, 150, 32, 0.1, |_| {});
        let after = t.evaluate(&data.test, None);
        assert_eq!(stats.steps, 150);
        assert!(after.accuracy > 0.6 && after.accuracy > before.accuracy + 0.3, "{before:?} → {after:?}");
        assert!(after.loss < before.loss);
    }

    /// H3: a round's training time includes the emulated slowdown (the per-step wait).
    #[test]
    fn training_time_includes_the_emulated_wait() {
        let data = sparsync::data::embedded();
        let mut t = Trainer::new("mlp", 1).unwrap();
        let shard: Vec<usize> = (0..64).collect();
        let stats = t.train(&data.train, &shard, 3, 8, 0.1, |_| {
            std::thread::sleep(std::time::Duration::from_millis(20))
        });
        assert!(stats.train_s >= 0.06 && stats.train_s > stats.compute_s, "{stats:?}");
    }
}
