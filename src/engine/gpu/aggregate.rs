//! One aggregation step on the GPU (`shaders/aggregate.wgsl`): the weighted sparse sum of a
//! batch and the dense apply, one pass per model chunk.
//!
//! Update payloads are copied as received (indices, then packed f16 values, no per-element
//! work) into a pooled staging buffer ([`UploadRing`]) together with the units table and the
//! kernels' parameters; one command buffer copies them to the device and runs, per chunk, the
//! bounds pass and the block pass. An update larger than one storage binding is split into
//! units on even entry boundaries; a batch larger than one binding (or than 256 units) runs as
//! sub-batches that carry the partial sums in `acc`.

use bytemuck::{Pod, Zeroable};

use super::device;
use super::shaders::AGGREGATE;
use super::util::{self, Ctx, Readback, Timer, UniformSlots, UploadRing};
use crate::engine::{EngineError, UpdateRef};
use crate::protocol::numerics::split_weight;

/// Keep in sync: `Params` in shaders/aggregate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct Params {
    units: u32,
    blocks: u32,
    chunk_len: u32,
    chunk_base: u32,
    bounds_base: u32,
    flags: u32,
    mu: f32,
    eta: f32,
}

const FLAG_CARRY: u32 = 1;
const FLAG_APPLY: u32 = 2;
const FLAG_MOMENTUM: u32 = 4;
const FLAG_ETA: u32 = 8;

/// Units per sub-batch (`MAX_UNITS` in aggregate.wgsl).
pub const MAX_UNITS: usize = 256;
/// Workgroup memory the 4096-parameter blocks need (sums, a stage of entries, the unit
/// tables and a scan buffer).
const BIG_BLOCK_BYTES: u32 = 4096 * 4 + 4096 * 4 + 256 * (4 + 4 + 16 + 4);

/// A piece of an update uploaded as one unit: entries [lo, hi) of its arrays.
struct Unit<'a> {
    weight: f32,
    indices: &'a [u8],
    /// The unit's values, padded to a multiple of 4 bytes (taken from the frame).
    values: &'a [u8],
    nnz: usize,
}

impl Unit<'_> {
    fn bytes(&self) -> u64 {
        (self.indices.len() + self.values.len()) as u64
    }
    #[cfg(test)]
    fn index(&self, e: usize) -> u32 {
        let b = &self.indices[4 * e..4 * e + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Splits updates into units of at most `cap` bytes (an update fits whole unless it alone is
/// larger than one binding).
fn units<'a>(batch: &[UpdateRef<'a>], cap: u64) -> Vec<Unit<'a>> {
    let max_entries = ((cap / 6) as usize & !1).max(2);
    let mut out = Vec::new();
    for u in batch {
        let nnz = u.nnz();
        let mut lo = 0;
        while lo < nnz {
            let hi = (lo + max_entries).min(nnz);
            // Values of [lo, hi): lo is even, so they start on a 4-byte boundary of the values
            // array; an odd count takes the 2 bytes after them (the next value, or padding).
            let vstart = 4 * nnz + 2 * lo;
            let vlen = (2 * (hi - lo)).next_multiple_of(4);
            out.push(Unit {
                weight: u.weight,
                indices: &u.indices[4 * lo..4 * hi],
                values: &u.payload[vstart..vstart + vlen],
                nnz: hi - lo,
            });
            lo = hi;
        }
    }
    out
}

/// One model chunk as the aggregation sees it.
pub struct StepChunk<'a> {
    pub base: u64,
    pub len: u64,
    pub acc: &'a wgpu::Buffer,
    pub x: &'a wgpu::Buffer,
    pub xhat: &'a wgpu::Buffer,
    pub d: &'a wgpu::Buffer,
    /// The momentum buffer (a placeholder when momentum is off).
    pub m: &'a wgpu::Buffer,
}

/// What the aggregation steps cost, for tests, benchmarks and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepCounters {
    pub steps: u64,
    pub dispatches: u64,
    pub submits: u64,
    /// Staging buffers created for uploads (steady state: none).
    pub staging_allocations: u64,
    pub uploaded_bytes: u64,
}

/// Which of the last step's kernels a benchmark replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    All,
    /// The bounds passes only.
    Bounds,
    /// The block passes only.
    Main,
}

/// How the step adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Batch order, bit-identical to the CPU engine.
    Deterministic,
    /// Unordered compare-exchange adds in workgroup memory.
    Fast,
}

/// The step's pipelines, device buffers and upload pool.
pub struct Step {
    ctx: Ctx,
    layout: wgpu::BindGroupLayout,
    main: wgpu::ComputePipeline,
    bounds: wgpu::ComputePipeline,
    order: Order,
    f16: bool,
    /// Parameters per block (`BLOCK` in aggregate.wgsl).
    block: u64,
    input: wgpu::Buffer,
    input_cap: u64,
    meta: wgpu::Buffer,
    meta_cap: u64,
    slots: UniformSlots,
    ring: UploadRing,
    groups: Vec<wgpu::BindGroup>,
    groups_key: (u64, u64, u64, usize),
    buffers_generation: u64,
    /// Largest input buffer (one binding).
    max_input: u64,
    counters: StepCounters,
    /// Device time of each step's kernels, once a benchmark asks for it ([`Step::time_kernels`]).
    timer: Option<Timer>,
    /// The dispatches of the last step, when it was one sub-batch (for [`Step::replay`]).
    last: Option<Vec<(usize, u32, u64, u64)>>,
    /// Time spent writing update payloads into staging since the engine last asked.
    pub upload_time: std::time::Duration,
}

/// One sub-batch's share of the staging buffer and of the uniform slots.
struct SubBatch {
    /// Staging offset and bytes of its payloads, and of its meta words (units table).
    input: (u64, u64),
    meta: (u64, u64),
    /// (chunk, uniform slot, bounds invocations, blocks) per chunk.
    dispatches: Vec<(usize, u32, u64, u64)>,
}

impl Step {
    pub fn new(ctx: Ctx, order: Order) -> Self {
        // The f16 view of the input is a ninth storage binding.
        let f16 = ctx.f16 && order == Order::Fast && ctx.limits.max_storage_buffers_per_shader_stage >= 9;
        let mut entries = vec![
            util::uniform_entry(0),
            util::read_entry(1),
            util::rw_entry(2),
            util::rw_entry(3),
            util::rw_entry(4),
            util::read_entry(5),
            util::rw_entry(6),
            util::rw_entry(7),
        ];
        if f16 {
            entries.push(util::read_entry(8));
        }
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("aggregate"),
            entries: &entries,
        });
        let big = ctx.limits.max_compute_workgroup_storage_size >= BIG_BLOCK_BYTES;
        let mut defines = Vec::new();
        if order == Order::Fast {
            defines.push("FAST");
        }
        if f16 {
            defines.push("F16");
        }
        if big {
            defines.push("BIG_BLOCK");
        }
        let module = util::module(&ctx, &AGGREGATE, &defines);
        let main = util::pipeline_from(&ctx, &layout, &module, "aggregate.wgsl", "main");
        let bounds = util::pipeline_from(&ctx, &layout, &module, "aggregate.wgsl", "bounds_main");
        let max_input = ctx.max_binding();
        Self {
            input: util::storage(&ctx, "aggregate.input", 1 << 16, wgpu::BufferUsages::empty()),
            input_cap: 1 << 16,
            meta: util::storage(&ctx, "aggregate.meta", 1 << 16, wgpu::BufferUsages::empty()),
            meta_cap: 1 << 16,
            slots: UniformSlots::new(&ctx, "aggregate.params", 16),
            ring: UploadRing::new(),
            groups: Vec::new(),
            groups_key: (u64::MAX, 0, 0, 0),
            buffers_generation: 0,
            block: if big { 4096 } else { 1024 },
            counters: StepCounters::default(),
            last: None,
            timer: None,
            upload_time: std::time::Duration::ZERO,
            layout,
            main,
            bounds,
            order,
            f16,
            max_input,
            ctx,
        }
    }

    /// How this step adds, for logs and benchmarks.
    pub fn kind(&self) -> String {
        match self.order {
            Order::Deterministic => "batch order".into(),
            Order::Fast => format!(
                "workgroup compare-exchange, {}",
                if self.f16 { "f16 loads" } else { "integer f16 decode" }
            ),
        }
    }

    pub fn counters(&self) -> StepCounters {
        StepCounters {
            staging_allocations: self.ring.allocations,
            uploaded_bytes: self.ring.bytes,
            ..self.counters
        }
    }

    fn ensure(&mut self, input_bytes: u64, meta_bytes: u64) {
        if input_bytes > self.input_cap {
            self.input_cap = input_bytes.next_power_of_two().min(self.max_input);
            self.input =
                util::storage(&self.ctx, "aggregate.input", self.input_cap, wgpu::BufferUsages::empty());
            self.buffers_generation += 1;
        }
        if meta_bytes > self.meta_cap {
            self.meta_cap = meta_bytes.next_power_of_two().min(self.max_input);
            self.meta =
                util::storage(&self.ctx, "aggregate.meta", self.meta_cap, wgpu::BufferUsages::empty());
            self.buffers_generation += 1;
        }
    }

    fn rebuild_groups(&mut self, chunks: &[StepChunk<'_>], chunks_id: u64) {
        let key = (chunks_id, self.buffers_generation, self.slots.generation, chunks.len());
        if key == self.groups_key {
            return;
        }
        self.groups_key = key;
        self.groups = chunks
            .iter()
            .map(|c| {
                let mut entries = vec![
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: self.slots.binding(std::mem::size_of::<Params>() as u64),
                    },
                    util::buf(1, &self.input),
                    util::buf(2, &self.meta),
                    util::buf(3, c.acc),
                    util::buf(4, c.x),
                    util::buf(5, c.xhat),
                    util::buf(6, c.d),
                    util::buf(7, c.m),
                ];
                if self.f16 {
                    entries.push(util::buf(8, &self.input));
                }
                self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("aggregate"),
                    layout: &self.layout,
                    entries: &entries,
                })
            })
            .collect();
    }

    /// Meta words per unit: its table entry and one bound per block edge of every chunk.
    fn meta_words_per_unit(&self, chunks: &[StepChunk<'_>]) -> u64 {
        4 + chunks.iter().map(|c| c.len.div_ceil(self.block) + 1).sum::<u64>()
    }

    /// Runs the whole step (`batch` into the chunks, then the apply with `mu`, `eta`):
    /// normally one command buffer; a batch too large for one staging buffer is submitted in
    /// parts, and only the last part changes x (the others leave partial sums in `acc`), so
    /// an error in any part leaves the model as it was. `chunks_id` identifies the chunk
    /// buffers (bind groups are kept while it does not change). Does not wait.
    pub fn run(
        &mut self,
        batch: &[UpdateRef<'_>],
        chunks: &[StepChunk<'_>],
        chunks_id: u64,
        momentum: Option<f32>,
        eta: f32,
    ) -> Result<(), EngineError> {
        // One staging buffer holds a part: its payloads, units tables and parameters.
        let staging_limit = self.ctx.limits.max_buffer_size.min(device::MAX_BINDING_BYTES);
        let params_bytes = (util::SLOT * chunks.len()) as u64;
        let max_payload =
            self.max_input.min(staging_limit.saturating_sub(16 * MAX_UNITS as u64 + params_bytes)).max(6);
        // Updates larger than that are cut into units that fit.
        let all = units(batch, max_payload);
        let per_unit_meta = 4 * self.meta_words_per_unit(chunks);
        let max_units = ((self.max_input / per_unit_meta) as usize).clamp(1, MAX_UNITS);
        // Sub-batches, in order: at most one input binding of payload and max_units units.
        let mut cuts = Vec::new();
        let mut start = 0;
        while start < all.len() {
            let (mut end, mut bytes) = (start, 0);
            while end < all.len() && end - start < max_units && bytes + all[end].bytes() <= max_payload {
                bytes += all[end].bytes();
                end += 1;
            }
            if end == start {
                return Err(EngineError::Gpu(format!(
                    "an update unit of {} bytes does not fit a staging buffer of {staging_limit} bytes",
                    all[start].bytes()
                )));
            }
            cuts.push((start, end, bytes));
            start = end;
        }
        if cuts.is_empty() {
            // An empty batch still takes the step (x is unchanged; momentum decays).
            cuts.push((0, 0, 0));
        }
        // Parts: consecutive sub-batches that share one staging buffer.
        let cost = |c: &(usize, usize, u64)| c.2 + 16 * (c.1 - c.0) as u64 + params_bytes;
        let mut parts = Vec::new();
        let (mut first, mut used) = (0, 0);
        for (i, c) in cuts.iter().enumerate() {
            if i > first && used + cost(c) > staging_limit {
                parts.push(first..i);
                first = i;
                used = 0;
            }
            used += cost(c);
        }
        parts.push(first..cuts.len());
        let max_bytes = cuts.iter().map(|c| c.2).max().unwrap_or(0);
        let max_meta = cuts.iter().map(|c| (c.1 - c.0) as u64 * per_unit_meta).max().unwrap_or(0);
        self.ensure(max_bytes.max(4), max_meta.max(4));
        let mut flags = if momentum.is_some() { FLAG_MOMENTUM } else { 0 };
        if eta != 1.0 {
            flags |= FLAG_ETA;
        }
        let total = cuts.len();
        let last = parts.len() - 1;
        for (p, range) in parts.into_iter().enumerate() {
            let submit = |this: &mut Self| -> Result<(), EngineError> {
                let (enc, staging) = this.record(
                    &all,
                    &cuts[range.clone()],
                    range.start,
                    total,
                    chunks,
                    chunks_id,
                    flags,
                    momentum,
                    eta,
                )?;
                this.ctx.queue.submit([enc.finish()]);
                // Mapped again once the device is done with the copies.
                this.ring.release(staging);
                this.counters.submits += 1;
                Ok(())
            };
            if p == last {
                submit(self)?;
            } else {
                // A part that fails must stop the step before the last part, the only one that
                // changes x, runs on partial sums.
                let ctx = self.ctx.clone();
                ctx.scoped("aggregation step (a part)", || submit(self))?;
            }
        }
        self.counters.steps += 1;
        Ok(())
    }

    /// Records sub-batches `cuts` (numbered from `first` of `total`) into one command buffer
    /// copying from one staging buffer; returns both.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        all: &[Unit<'_>],
        cuts: &[(usize, usize, u64)],
        first: usize,
        total: usize,
        chunks: &[StepChunk<'_>],
        chunks_id: u64,
        flags: u32,
        momentum: Option<f32>,
        eta: f32,
    ) -> Result<(wgpu::CommandEncoder, wgpu::Buffer), EngineError> {
        self.slots.clear();
        let mut subs = Vec::with_capacity(cuts.len());
        let mut staged = 0u64;
        for (i, &(lo, hi, bytes)) in cuts.iter().enumerate() {
            let si = first + i;
            let n_units = (hi - lo) as u64;
            let mut sub_flags = flags;
            if si > 0 {
                sub_flags |= FLAG_CARRY;
            }
            if si + 1 == total {
                sub_flags |= FLAG_APPLY;
            }
            let mut bounds_base = 4 * n_units;
            let mut dispatches = Vec::with_capacity(chunks.len());
            for (ci, c) in chunks.iter().enumerate() {
                let blocks = c.len.div_ceil(self.block);
                let slot = self.slots.push(&Params {
                    units: n_units as u32,
                    blocks: blocks as u32,
                    chunk_len: c.len as u32,
                    chunk_base: c.base as u32,
                    bounds_base: bounds_base as u32,
                    flags: sub_flags,
                    mu: momentum.unwrap_or(0.0),
                    eta,
                });
                dispatches.push((ci, slot, n_units * (blocks + 1), blocks));
                bounds_base += n_units * (blocks + 1);
            }
            let input = (staged, bytes);
            staged += bytes;
            let meta = (staged, 16 * n_units);
            staged += 16 * n_units;
            subs.push(SubBatch { input, meta, dispatches });
        }
        if self.slots.reserve(&self.ctx) {
            self.buffers_generation += 1;
        }
        let slots_at = staged;
        let slot_bytes = self.slots.staged().len() as u64;
        staged += slot_bytes;

        // Fill the staging buffer: payloads as received, the units tables, the parameters.
        let t0 = std::time::Instant::now();
        let staging = self.ring.acquire(&self.ctx, staged.max(4));
        {
            let mut view = staging
                .slice(..staged.max(4))
                .get_mapped_range_mut()
                .map_err(|e| EngineError::Map(format!("{e:?}")))?;
            for (sub, &(lo, hi, _)) in subs.iter().zip(cuts) {
                let mut at = sub.input.0 as usize;
                let mut word = 0u32;
                let mut table = Vec::with_capacity(4 * (hi - lo));
                for u in &all[lo..hi] {
                    view.slice(at..at + u.indices.len()).copy_from_slice(u.indices);
                    at += u.indices.len();
                    view.slice(at..at + u.values.len()).copy_from_slice(u.values);
                    at += u.values.len();
                    let (w_hi, w_lo) = match self.order {
                        Order::Deterministic => split_weight(u.weight),
                        Order::Fast => (u.weight, 0.0),
                    };
                    table.extend([word, u.nnz as u32, w_hi.to_bits(), w_lo.to_bits()]);
                    word += (u.bytes() / 4) as u32;
                }
                let m = sub.meta.0 as usize;
                view.slice(m..m + 4 * table.len()).copy_from_slice(bytemuck::cast_slice(&table));
            }
            view.slice(slots_at as usize..(slots_at + slot_bytes) as usize)
                .copy_from_slice(self.slots.staged());
        }
        staging.unmap();
        self.ring.bytes += staged;
        self.upload_time += t0.elapsed();
        self.rebuild_groups(chunks, chunks_id);

        let mut enc = util::encoder(&self.ctx, "aggregate");
        if slot_bytes > 0 {
            enc.copy_buffer_to_buffer(&staging, slots_at, &self.slots.buffer, 0, slot_bytes);
        }
        let last_sub = subs.len() - 1;
        for (si, sub) in subs.iter().enumerate() {
            if sub.input.1 > 0 {
                enc.copy_buffer_to_buffer(&staging, sub.input.0, &self.input, 0, sub.input.1);
            }
            if sub.meta.1 > 0 {
                enc.copy_buffer_to_buffer(&staging, sub.meta.0, &self.meta, 0, sub.meta.1);
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("aggregate"),
                timestamp_writes: self.timer.as_ref().and_then(|t| t.writes(si == 0, si == last_sub)),
            });
            self.counters.dispatches += self.dispatch(&mut pass, &sub.dispatches, Replay::All);
        }
        if let Some(t) = &self.timer {
            t.resolve(&mut enc);
        }
        self.last = (total == 1).then(|| subs.swap_remove(0).dispatches);
        Ok((enc, staging))
    }

    /// Benchmarks: time the kernels of every step from now on (timestamp queries, where the
    /// device has them; servers do not pay for them).
    pub fn time_kernels(&mut self) {
        if self.timer.is_none() {
            self.timer = Timer::new(&self.ctx);
        }
    }

    /// Device seconds of the last submitted step's (or replay's) kernels; waits. None
    /// without timestamp queries or before [`Step::time_kernels`].
    pub fn device_time(&self, readback: &mut Readback) -> Result<Option<f64>, EngineError> {
        match &self.timer {
            Some(t) => t.read(&self.ctx, readback),
            None => Ok(None),
        }
    }

    /// Records `dispatches` ((chunk, uniform slot, bounds invocations, blocks) each) into
    /// `pass`: the bounds pass and the block pass per chunk, or only one of them. Returns the
    /// number of dispatches.
    fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        dispatches: &[(usize, u32, u64, u64)],
        which: Replay,
    ) -> u64 {
        let mut count = 0;
        for &(ci, slot, bound_items, blocks) in dispatches {
            pass.set_bind_group(0, &self.groups[ci], &[slot]);
            if bound_items > 0 && which != Replay::Main {
                pass.set_pipeline(&self.bounds);
                let (x, y) = util::grid(bound_items);
                pass.dispatch_workgroups(x, y, 1);
                count += 1;
            }
            if which != Replay::Bounds {
                pass.set_pipeline(&self.main);
                let (x, y) = util::grid_groups(blocks);
                pass.dispatch_workgroups(x, y, 1);
                count += 1;
            }
        }
        count
    }

    /// Benchmarks: records the last step's kernels again (its data is still on the device;
    /// the batch is applied once more), all of them or only the bounds or only the block
    /// passes. None when the last step had several sub-batches.
    pub fn replay(&mut self, which: Replay) -> Option<wgpu::CommandEncoder> {
        let last = self.last.as_ref()?;
        let mut enc = util::encoder(&self.ctx, "aggregate.replay");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("aggregate.replay"),
                timestamp_writes: self.timer.as_ref().and_then(|t| t.writes(true, true)),
            });
            self.dispatch(&mut pass, last, which);
        }
        if let Some(t) = &self.timer {
            t.resolve(&mut enc);
        }
        Some(enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{PushHeader, PushLimits, PushView, encode_push};
    use half::f16;

    #[test]
    fn units_split_large_updates_on_even_boundaries() {
        let idx: Vec<u32> = (0..11).map(|i| i * 3).collect();
        let vals: Vec<f16> = (0..11).map(|i| f16::from_f32(i as f32)).collect();
        let h = PushHeader { base_version: 0, seq: 1, samples: 1, local_steps: 1, loss: 0.0, nnz: 11 };
        let frame = encode_push(&h, &idx, &vals);
        let v = PushView::decode(&frame, &PushLimits { num_params: 100, max_nnz: 100 }).unwrap();
        let u = UpdateRef::from_push(&v, 1.0);
        // 24 bytes per unit: 4 entries each (24 / 6 = 4).
        let parts = units(&[u], 24);
        assert_eq!(parts.iter().map(|p| p.nnz).collect::<Vec<_>>(), vec![4, 4, 3]);
        for (p, first) in parts.iter().zip([0u32, 4, 8]) {
            assert_eq!(p.index(0), first * 3);
            assert_eq!(p.values.len() % 4, 0);
            let v0 = f16::from_le_bytes([p.values[0], p.values[1]]);
            assert_eq!(v0.to_f32(), first as f32);
        }
    }
}
