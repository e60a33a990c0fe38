//! The weighted sparse scatter-add of a batch (`shaders/aggregate.wgsl`,
//! `shaders/aggregate_fast.wgsl`).
//!
//! Update payloads are uploaded as received (indices, then packed f16 values) with
//! `queue.write_buffer`: one copy into wgpu's staging memory, no per-element work. An update is
//! split into chunk segments by binary search on its ascending indices.

use bytemuck::{Pod, Zeroable};

use super::shaders::{AGGREGATE, AGGREGATE_FAST};
use super::util::{self, Ctx, UniformSlots};
use crate::engine::{EngineError, UpdateRef};
use crate::protocol::numerics::split_weight;

/// Keep in sync: `Segment` in shaders/aggregate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct Segment {
    input_word: u32,
    unit_nnz: u32,
    lo: u32,
    count: u32,
    chunk_base: u32,
    w_hi: f32,
    w_lo: f32,
    _pad: u32,
}

/// Keep in sync: `FastParams` in shaders/aggregate_fast.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct FastParams {
    first: u32,
    count: u32,
    total: u32,
    chunk_base: u32,
}

/// Keep in sync: `FastSeg` in shaders/aggregate_fast.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct FastSeg {
    start: u32,
    input_word: u32,
    unit_nnz: u32,
    lo: u32,
    weight: f32,
    _p: [u32; 3],
}

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
    fn index(&self, e: usize) -> u32 {
        let b = &self.indices[4 * e..4 * e + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    /// First entry whose index is at least `bound` (indices ascend).
    fn lower_bound(&self, bound: u64) -> usize {
        let (mut lo, mut hi) = (0, self.nnz);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if (self.index(mid) as u64) < bound {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
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

/// One model chunk as the scatter sees it.
pub struct ScatterChunk<'a> {
    pub acc: &'a wgpu::Buffer,
    pub base: u64,
    pub len: u64,
}

/// Scatter pipelines, the input buffer, and the per-dispatch parameters.
pub struct Scatter {
    ctx: Ctx,
    det_layout: wgpu::BindGroupLayout,
    det: wgpu::ComputePipeline,
    fast_layout: wgpu::BindGroupLayout,
    fast: wgpu::ComputePipeline,
    f16: bool,
    input: wgpu::Buffer,
    input_cap: u64,
    segs: wgpu::Buffer,
    segs_cap: u64,
    slots: UniformSlots,
    /// Bind groups per chunk, rebuilt when a buffer they name is replaced.
    det_groups: Vec<wgpu::BindGroup>,
    fast_groups: Vec<wgpu::BindGroup>,
    groups_key: (u64, u64, u64, usize),
    buffers_generation: u64,
    /// Largest input buffer (one binding).
    max_input: u64,
    /// Time spent handing update payloads to the queue since the engine last asked.
    pub upload_time: std::time::Duration,
}

impl Scatter {
    pub fn new(ctx: Ctx) -> Self {
        let det_layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("aggregate"),
            entries: &[util::uniform_entry(0), util::read_entry(1), util::rw_entry(2)],
        });
        let det = util::pipeline(&ctx, &det_layout, &AGGREGATE, &[], "main");
        let f16 = ctx.f16;
        let mut fast_entries =
            vec![util::uniform_entry(0), util::read_entry(1), util::rw_entry(2), util::read_entry(3)];
        if f16 {
            fast_entries.push(util::read_entry(4));
        }
        let fast_layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("aggregate_fast"),
            entries: &fast_entries,
        });
        let mut defines = Vec::new();
        if f16 {
            defines.push("F16");
        }
        if ctx.float_atomics {
            defines.push("FLOAT_ATOMIC");
        }
        let fast = util::pipeline(&ctx, &fast_layout, &AGGREGATE_FAST, &defines, "main");
        let max_input = ctx.max_binding();
        Self {
            input: util::storage(&ctx, "aggregate.input", 1 << 16, wgpu::BufferUsages::empty()),
            input_cap: 1 << 16,
            segs: util::storage(&ctx, "aggregate.segs", 1 << 12, wgpu::BufferUsages::empty()),
            segs_cap: 1 << 12,
            slots: UniformSlots::new(&ctx, "aggregate.params", 256),
            det_groups: Vec::new(),
            fast_groups: Vec::new(),
            groups_key: (u64::MAX, 0, 0, 0),
            upload_time: std::time::Duration::ZERO,
            buffers_generation: 0,
            det_layout,
            det,
            fast_layout,
            fast,
            f16,
            max_input,
            ctx,
        }
    }

    /// Describes the fast path: "f32 atomics" or "compare-exchange", and the value read path.
    pub fn fast_kind(&self) -> String {
        format!(
            "{}, {}",
            if self.ctx.float_atomics { "native f32 atomicAdd" } else { "compare-exchange loop" },
            if self.f16 { "f16 loads" } else { "unpack2x16float" }
        )
    }

    fn ensure(&mut self, input_bytes: u64, seg_bytes: u64) {
        if input_bytes > self.input_cap {
            self.input_cap = input_bytes.next_power_of_two().min(self.max_input);
            self.input =
                util::storage(&self.ctx, "aggregate.input", self.input_cap, wgpu::BufferUsages::empty());
            self.buffers_generation += 1;
        }
        if seg_bytes > self.segs_cap {
            self.segs_cap = seg_bytes.next_power_of_two();
            self.segs =
                util::storage(&self.ctx, "aggregate.segs", self.segs_cap, wgpu::BufferUsages::empty());
            self.buffers_generation += 1;
        }
    }

    fn rebuild_groups(&mut self, chunks: &[ScatterChunk<'_>], chunks_id: u64) {
        let key = (chunks_id, self.buffers_generation, self.slots.generation, chunks.len());
        if key == self.groups_key {
            return;
        }
        self.groups_key = key;
        self.det_groups = chunks
            .iter()
            .map(|c| {
                self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("aggregate"),
                    layout: &self.det_layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: self.slots.binding(32) },
                        util::buf(1, &self.input),
                        util::buf(2, c.acc),
                    ],
                })
            })
            .collect();
        self.fast_groups = chunks
            .iter()
            .map(|c| {
                let mut entries = vec![
                    wgpu::BindGroupEntry { binding: 0, resource: self.slots.binding(16) },
                    util::buf(1, &self.input),
                    util::buf(2, c.acc),
                    util::buf(3, &self.segs),
                ];
                if self.f16 {
                    entries.push(util::buf(4, &self.input));
                }
                self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("aggregate_fast"),
                    layout: &self.fast_layout,
                    entries: &entries,
                })
            })
            .collect();
    }

    /// Adds the batch into each chunk's accumulator. `chunks_id` identifies the chunk
    /// buffers (bind groups are kept while it does not change). Submits; does not wait.
    pub fn run(
        &mut self,
        batch: &[UpdateRef<'_>],
        chunks: &[ScatterChunk<'_>],
        chunks_id: u64,
        fast: bool,
    ) -> Result<(), EngineError> {
        let all = units(batch, self.max_input);
        // Sub-batches that fit one input buffer; in order, so the deterministic order holds.
        let mut start = 0;
        while start < all.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < all.len() && bytes + all[end].bytes() <= self.max_input {
                bytes += all[end].bytes();
                end += 1;
            }
            self.run_units(&all[start..end], bytes, chunks, chunks_id, fast)?;
            start = end;
        }
        Ok(())
    }

    /// Uploads `batch` and prepares its dispatches without running them (benchmarks time the
    /// kernel apart from the upload). The batch must fit one input buffer.
    pub fn prepare(
        &mut self,
        batch: &[UpdateRef<'_>],
        chunks: &[ScatterChunk<'_>],
        chunks_id: u64,
        fast: bool,
    ) -> Result<Plan, EngineError> {
        let all = units(batch, self.max_input);
        let bytes: u64 = all.iter().map(Unit::bytes).sum();
        if bytes > self.max_input {
            return Err(EngineError::Gpu(format!("batch of {bytes} bytes exceeds one input buffer")));
        }
        Ok(self.plan_units(&all, bytes, chunks, chunks_id, fast))
    }

    fn run_units(
        &mut self,
        units: &[Unit<'_>],
        bytes: u64,
        chunks: &[ScatterChunk<'_>],
        chunks_id: u64,
        fast: bool,
    ) -> Result<(), EngineError> {
        let plan = self.plan_units(units, bytes, chunks, chunks_id, fast);
        self.dispatch(&plan);
        Ok(())
    }

    /// Encodes and submits a prepared scatter.
    pub fn dispatch(&self, plan: &Plan) {
        let mut enc = util::encoder(&self.ctx, "aggregate");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("aggregate"),
                timestamp_writes: None,
            });
            pass.set_pipeline(if plan.fast { &self.fast } else { &self.det });
            let groups = if plan.fast { &self.fast_groups } else { &self.det_groups };
            for &(ci, slot, count) in &plan.dispatches {
                pass.set_bind_group(0, &groups[ci], &[slot]);
                let (x, y) = util::grid(count);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    fn plan_units(
        &mut self,
        units: &[Unit<'_>],
        bytes: u64,
        chunks: &[ScatterChunk<'_>],
        chunks_id: u64,
        fast: bool,
    ) -> Plan {
        // Where each unit's words start, and each unit's range in each chunk.
        let mut words = Vec::with_capacity(units.len());
        let mut at = 0u64;
        for u in units {
            words.push((at / 4) as u32);
            at += u.bytes();
        }
        let ranges: Vec<Vec<(usize, usize)>> = units
            .iter()
            .map(|u| chunks.iter().map(|c| (u.lower_bound(c.base), u.lower_bound(c.base + c.len))).collect())
            .collect();
        let nseg: usize = ranges.iter().flatten().filter(|(lo, hi)| hi > lo).count();
        self.ensure(bytes, (nseg.max(1) * std::mem::size_of::<FastSeg>()) as u64);
        let t0 = std::time::Instant::now();
        for (u, &w) in units.iter().zip(&words) {
            let off = 4 * w as u64;
            self.ctx.queue.write_buffer(&self.input, off, u.indices);
            self.ctx.queue.write_buffer(&self.input, off + u.indices.len() as u64, u.values);
        }
        self.upload_time += t0.elapsed();
        self.slots.clear();
        let mut dispatches = Vec::new();
        if fast {
            let mut table = Vec::with_capacity(nseg);
            for (ci, c) in chunks.iter().enumerate() {
                let first = table.len() as u32;
                let mut total = 0u32;
                for (ui, u) in units.iter().enumerate() {
                    let (lo, hi) = ranges[ui][ci];
                    if hi > lo {
                        table.push(FastSeg {
                            start: total,
                            input_word: words[ui],
                            unit_nnz: u.nnz as u32,
                            lo: lo as u32,
                            weight: u.weight,
                            _p: [0; 3],
                        });
                        total += (hi - lo) as u32;
                    }
                }
                let count = table.len() as u32 - first;
                let slot = self.slots.push(&FastParams { first, count, total, chunk_base: c.base as u32 });
                if total > 0 {
                    dispatches.push((ci, slot, total as u64));
                }
            }
            if !table.is_empty() {
                self.ctx.queue.write_buffer(&self.segs, 0, bytemuck::cast_slice(&table));
            }
        } else {
            for (ui, u) in units.iter().enumerate() {
                let (hi_w, lo_w) = split_weight(u.weight);
                for (ci, c) in chunks.iter().enumerate() {
                    let (lo, hi) = ranges[ui][ci];
                    if hi <= lo {
                        continue;
                    }
                    let slot = self.slots.push(&Segment {
                        input_word: words[ui],
                        unit_nnz: u.nnz as u32,
                        lo: lo as u32,
                        count: (hi - lo) as u32,
                        chunk_base: c.base as u32,
                        w_hi: hi_w,
                        w_lo: lo_w,
                        _pad: 0,
                    });
                    dispatches.push((ci, slot, (hi - lo) as u64));
                }
            }
        }
        self.slots.upload(&self.ctx);
        self.rebuild_groups(chunks, chunks_id);
        Plan { fast, dispatches, entries: units.iter().map(|u| u.nnz as u64).sum(), bytes }
    }
}

/// A scatter ready to dispatch: (chunk, uniform slot, entries) per dispatch.
pub struct Plan {
    fast: bool,
    dispatches: Vec<(usize, u32, u64)>,
    /// Entries over the whole batch.
    pub entries: u64,
    /// Payload bytes uploaded.
    pub bytes: u64,
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
        assert_eq!(parts[2].lower_bound(25), 1); // indices 24, 27, 30
    }
}
