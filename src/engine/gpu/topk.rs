//! Broadcast selection on the GPU (`shaders/topk.wgsl`): exact Top-k by radix select, or
//! GaussianK, over a model stored in chunks; output laid out as a Delta body.

use bytemuck::{Pod, Zeroable};

use super::shaders::TOPK;
use super::util::{self, Ctx, Readback, UniformSlots};
use crate::engine::select::normal_quantile;
use crate::engine::{EngineError, Selection};
use crate::protocol::frame::sparse_payload_len;

/// Keep in sync: `ChunkParams` in shaders/topk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct ChunkParams {
    n: u32,
    base: u32,
    tile_base: u32,
    flags: u32,
    digit: u32,
    total_tiles: u32,
    z: f32,
    k: u32,
}

/// Keep in sync: `State` in shaders/topk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
struct State {
    prefix: u32,
    mask: u32,
    k_rem: u32,
    threshold: u32,
    take_eq: u32,
    done: u32,
    selected: u32,
    partials: u32,
    mean: f32,
    stdev: f32,
    _p0: u32,
    _p1: u32,
}

/// Elements per tile of the count and write passes (`TILE` in topk.wgsl).
const TILE: u64 = 4096;
/// Elements per workgroup of the histogram and statistics passes (`HIST_ROWS * WG`).
const HIST_SPAN: u64 = 32 * 256;

/// One chunk of the vector to select from.
pub struct TopkChunk<'a> {
    pub d: &'a wgpu::Buffer,
    /// The replica to update with the sent values (a placeholder when `update_replica` is off).
    pub xhat: &'a wgpu::Buffer,
    pub len: usize,
}

/// What a selection produced: nnz and the Delta body (indices, values, padding).
pub struct Selected {
    pub nnz: u32,
    pub body: Vec<u8>,
}

struct Pipelines {
    hist: wgpu::ComputePipeline,
    select: wgpu::ComputePipeline,
    count: wgpu::ComputePipeline,
    scan: wgpu::ComputePipeline,
    write: wgpu::ComputePipeline,
    stats: wgpu::ComputePipeline,
    gauss_resolve: wgpu::ComputePipeline,
    gauss_count: wgpu::ComputePipeline,
    gauss_final: wgpu::ComputePipeline,
}

/// The selection kernels and their buffers (grown as needed, reused between calls).
pub struct GpuTopk {
    ctx: Ctx,
    layout: wgpu::BindGroupLayout,
    p: Pipelines,
    hist: wgpu::Buffer,
    state: wgpu::Buffer,
    tiles: wgpu::Buffer,
    tiles_words: u64,
    out: wgpu::Buffer,
    out_words: u64,
    slots: UniformSlots,
    readback: Readback,
}

impl GpuTopk {
    pub fn new(ctx: Ctx) -> Self {
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("topk"),
            entries: &[
                util::uniform_entry(0),
                util::read_entry(1),
                util::rw_entry(2),
                util::rw_entry(3),
                util::rw_entry(4),
                util::rw_entry(5),
                util::rw_entry(6),
            ],
        });
        let module = util::module(&ctx, &TOPK, &[]);
        let mk = |e: &str| util::pipeline_from(&ctx, &layout, &module, "topk.wgsl", e);
        let p = Pipelines {
            hist: mk("hist_pass"),
            select: mk("select_pass"),
            count: mk("count_pass"),
            scan: mk("scan_pass"),
            write: mk("write_pass"),
            stats: mk("stats_pass"),
            gauss_resolve: mk("gauss_resolve"),
            gauss_count: mk("gauss_count"),
            gauss_final: mk("gauss_final"),
        };
        Self {
            hist: util::storage(&ctx, "topk.hist", 2048 * 4, wgpu::BufferUsages::empty()),
            state: util::storage(
                &ctx,
                "topk.state",
                std::mem::size_of::<State>() as u64,
                wgpu::BufferUsages::empty(),
            ),
            tiles: util::storage(&ctx, "topk.tiles", 1024, wgpu::BufferUsages::empty()),
            tiles_words: 256,
            out: util::storage(&ctx, "topk.out", 1024, wgpu::BufferUsages::empty()),
            out_words: 256,
            slots: UniformSlots::new(&ctx, "topk.params", 64),
            readback: Readback::new(),
            layout,
            p,
            ctx,
        }
    }

    /// Largest number of entries one selection can emit (the output must fit one binding).
    pub fn max_entries(&self) -> u64 {
        // indices (4 bytes) + values (2 bytes) per entry.
        self.ctx.max_binding() / 6
    }

    fn ensure(&mut self, tiles_words: u64, out_words: u64) {
        if tiles_words > self.tiles_words {
            self.tiles_words = tiles_words.next_power_of_two();
            self.tiles =
                util::storage(&self.ctx, "topk.tiles", self.tiles_words * 4, wgpu::BufferUsages::empty());
        }
        if out_words > self.out_words {
            self.out_words = out_words.next_power_of_two().min(self.ctx.max_binding() / 4);
            self.out = util::storage(&self.ctx, "topk.out", self.out_words * 4, wgpu::BufferUsages::empty());
        }
    }

    fn bind_group(&self, c: &TopkChunk<'_>) -> wgpu::BindGroup {
        self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("topk"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: self.slots.binding(std::mem::size_of::<ChunkParams>() as u64),
                },
                util::buf(1, c.d),
                util::buf(2, c.xhat),
                util::buf(3, &self.hist),
                util::buf(4, &self.state),
                util::buf(5, &self.tiles),
                util::buf(6, &self.out),
            ],
        })
    }

    /// Selects from the concatenation of `chunks`; with `update_replica`, adds the sent values
    /// to each chunk's x̂. Blocks until the result is read back.
    pub fn select(
        &mut self,
        chunks: &[TopkChunk<'_>],
        selection: Selection,
        update_replica: bool,
    ) -> Result<Selected, EngineError> {
        let n: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let k = (selection.k() as u64).min(n);
        if k == 0 || n == 0 {
            return Ok(Selected { nnz: 0, body: Vec::new() });
        }
        let gaussian = matches!(selection, Selection::GaussianK { .. });
        // GaussianK may select more than k: room for every element.
        let cap = if gaussian { n } else { k };
        if cap > self.max_entries() {
            return Err(EngineError::Gpu(format!(
                "a Delta of {cap} entries does not fit one storage binding ({} bytes); lower rho_down",
                self.ctx.max_binding()
            )));
        }
        let tiles_per: Vec<u64> = chunks.iter().map(|c| (c.len as u64).div_ceil(TILE)).collect();
        let stats_per: Vec<u64> = chunks.iter().map(|c| (c.len as u64).div_ceil(HIST_SPAN)).collect();
        let total_tiles: u64 = tiles_per.iter().sum();
        let partials: u64 = stats_per.iter().sum();
        self.ensure(2 * total_tiles.max(partials) + 2, cap + cap.div_ceil(2));

        let z = if gaussian {
            let rho = (k as f64 / n as f64).clamp(f64::MIN_POSITIVE, 1.0);
            normal_quantile(1.0 - rho / 2.0) as f32
        } else {
            0.0
        };
        // Uniform slots: [digit][chunk] for the radix and compaction passes, then the
        // statistics slots per chunk, then one whole-model slot for gauss_resolve/final.
        self.slots.clear();
        let mut radix = vec![Vec::new(); 3];
        let mut stat_slots = Vec::new();
        let (mut base, mut tile_base, mut stat_base) = (0u64, 0u64, 0u64);
        for (i, c) in chunks.iter().enumerate() {
            let mut params = ChunkParams {
                n: c.len as u32,
                base: base as u32,
                tile_base: tile_base as u32,
                flags: update_replica as u32,
                digit: 0,
                total_tiles: total_tiles as u32,
                z,
                k: k as u32,
            };
            for (digit, slots) in radix.iter_mut().enumerate() {
                params.digit = digit as u32;
                slots.push(self.slots.push(&params));
            }
            params.tile_base = stat_base as u32;
            stat_slots.push(self.slots.push(&params));
            base += c.len as u64;
            tile_base += tiles_per[i];
            stat_base += stats_per[i];
        }
        let whole = self.slots.push(&ChunkParams {
            n: n as u32,
            base: 0,
            tile_base: 0,
            flags: 0,
            digit: 0,
            total_tiles: partials as u32,
            z,
            k: k as u32,
        });
        self.slots.upload(&self.ctx);

        let mut state = State { k_rem: k as u32, ..Default::default() };
        if k == n && !gaussian {
            // Everything is sent.
            state.threshold = 0;
            state.take_eq = u32::MAX;
            state.done = 1;
        }
        let q = &self.ctx.queue;
        q.write_buffer(&self.state, 0, bytemuck::bytes_of(&state));
        let mut enc = util::encoder(&self.ctx, "topk");
        enc.clear_buffer(&self.hist, 0, None);
        let groups: Vec<wgpu::BindGroup> = chunks.iter().map(|c| self.bind_group(c)).collect();
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk"),
                timestamp_writes: None,
            });
            let one = |pass: &mut wgpu::ComputePass<'_>,
                       pipe: &wgpu::ComputePipeline,
                       bg: &wgpu::BindGroup,
                       slot: u32| {
                pass.set_pipeline(pipe);
                pass.set_bind_group(0, bg, &[slot]);
                pass.dispatch_workgroups(1, 1, 1);
            };
            if gaussian {
                for (i, g) in groups.iter().enumerate() {
                    pass.set_pipeline(&self.p.stats);
                    pass.set_bind_group(0, g, &[stat_slots[i]]);
                    let (x, y) = util::grid_groups(stats_per[i]);
                    pass.dispatch_workgroups(x, y, 1);
                }
                one(&mut pass, &self.p.gauss_resolve, &groups[0], whole);
                for (i, g) in groups.iter().enumerate() {
                    pass.set_pipeline(&self.p.gauss_count);
                    pass.set_bind_group(0, g, &[radix[0][i]]);
                    let (x, y) = util::grid_groups(stats_per[i]);
                    pass.dispatch_workgroups(x, y, 1);
                }
                one(&mut pass, &self.p.gauss_final, &groups[0], whole);
            } else {
                for (digit, slots) in radix.iter().enumerate() {
                    for (i, g) in groups.iter().enumerate() {
                        pass.set_pipeline(&self.p.hist);
                        pass.set_bind_group(0, g, &[slots[i]]);
                        let (x, y) = util::grid_groups((chunks[i].len as u64).div_ceil(HIST_SPAN));
                        pass.dispatch_workgroups(x, y, 1);
                    }
                    one(&mut pass, &self.p.select, &groups[0], radix[digit][0]);
                }
            }
            for (i, g) in groups.iter().enumerate() {
                pass.set_pipeline(&self.p.count);
                pass.set_bind_group(0, g, &[radix[0][i]]);
                let (x, y) = util::grid_groups(tiles_per[i]);
                pass.dispatch_workgroups(x, y, 1);
            }
            one(&mut pass, &self.p.scan, &groups[0], radix[0][0]);
        }
        // The number selected decides where the values start: known up front for exact Top-k,
        // read back first for GaussianK.
        let nnz = if gaussian {
            let st = self.readback.read(
                &self.ctx,
                enc,
                &[(&self.state, 0, std::mem::size_of::<State>() as u64)],
            )?;
            let st: State = bytemuck::pod_read_unaligned(&st);
            enc = util::encoder(&self.ctx, "topk.write");
            st.selected as u64
        } else {
            k
        };
        let words = nnz + nnz.div_ceil(2);
        enc.clear_buffer(&self.out, 4 * nnz, Some(4 * nnz.div_ceil(2)));
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk.write"),
                timestamp_writes: None,
            });
            for (i, g) in groups.iter().enumerate() {
                pass.set_pipeline(&self.p.write);
                pass.set_bind_group(0, g, &[radix[0][i]]);
                let (x, y) = util::grid_groups(tiles_per[i]);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        let body = self.readback.read(&self.ctx, enc, &[(&self.out, 0, 4 * words)])?;
        debug_assert_eq!(body.len(), sparse_payload_len(nnz as usize));
        Ok(Selected { nnz: nnz as u32, body })
    }
}
