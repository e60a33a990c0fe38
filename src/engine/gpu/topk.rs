//! Broadcast selection on the GPU (`shaders/topk.wgsl`): exact Top-k, from the candidates
//! above the previous selection's threshold when they bracket k (one pass over d) or by a
//! radix select over d; or GaussianK. The model may be stored in chunks; the output is laid
//! out as a Delta body.

use bytemuck::{Pod, Zeroable};

use super::shaders::TOPK;
use super::util::{self, Ctx, Readback, Timer, UniformSlots};
use crate::engine::{EngineError, Selection};
use crate::protocol::frame::sparse_payload_len;
use crate::protocol::select::normal_quantile;

/// Keep in sync: `ChunkParams` in shaders/topk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
struct ChunkParams {
    n: u32,
    base: u32,
    tile_base: u32,
    flags: u32,
    digit: u32,
    total_tiles: u32,
    z: f32,
    k: u32,
    cap: u32,
    k_next: u32,
    _p: [u32; 2],
}

const FLAG_EXACT: u32 = 2;
const FLAG_STEADY: u32 = 4;
const FLAG_ALL: u32 = 8;
const FLAG_DENSE: u32 = 16;
const FLAG_HIST: u32 = 32;
const FLAG_RECOLLECT: u32 = 64;
const FLAG_NEXT: u32 = 128;
const FLAG_COLD: u32 = 256;
const FLAG_CAND: u32 = 512;

const MODE_MISS: u32 = 0;
const MODE_CAND: u32 = 1;
const MODE_DENSE: u32 = 2;

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
    mode: u32,
    next_t0: u32,
    t0: u32,
    cand_count: u32,
    recollect: u32,
    _p: u32,
}

const STATE_BYTES: u64 = std::mem::size_of::<State>() as u64;
/// Elements per tile of the count and write passes (`TILE` in topk.wgsl).
const TILE: u64 = 4096;
/// Elements per workgroup of the histogram and statistics passes (`HIST_ROWS * WG`).
const HIST_SPAN: u64 = 32 * 256;
/// Words of `hist`: the buckets and the candidate counter.
const HIST_WORDS: u64 = 2048 + 16;
/// Candidate capacity, in multiples of k, and the rank (in multiples of k) whose bucket starts
/// the next selection: after a broadcast the top k are gone, so about 2k of the 3k remain
/// above the next t0 before the batch adds more; the capacity leaves room for a batch that
/// lifts as many again.
const CAP_K: u64 = 6;
const NEXT_K: u64 = 3;

/// Which exact selection to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// From the candidates above the previous selection's next threshold.
    Steady,
    /// From the candidates in and above the k-th key's bucket (no threshold yet).
    Cold,
    /// The radix select over d.
    Full,
}

/// One chunk of the vector to select from.
pub struct TopkChunk<'a> {
    pub d: &'a wgpu::Buffer,
    /// (x̂, x) of this chunk, when the selection applies the sent values to x̂ (and sets d to
    /// x − x̂ there).
    pub replica: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
    pub len: usize,
}

/// What a selection produced: nnz and the Delta body (indices, values, padding).
pub struct Selected {
    pub nnz: u32,
    pub body: Vec<u8>,
}

/// What the selections cost, for tests, benchmarks and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TopkCounters {
    /// Selections run.
    pub selections: u64,
    /// Full passes over the input (d): 1 for a selection from the candidates above the
    /// previous threshold, 2 when a second collection was needed (or there was no threshold
    /// yet), +4 for a full radix select (+2 more when ties overflowed the candidate space),
    /// GaussianK 4.
    pub input_passes: u64,
    /// Selections whose first collection missed [k, cap] (a second one followed).
    pub recollections: u64,
    /// Selections where both collections missed and a full radix select ran.
    pub misses: u64,
    /// Dispatches recorded.
    pub dispatches: u64,
    /// Submissions that were waited on (each a round trip to the device).
    pub waits: u64,
}

struct Pipelines {
    init: wgpu::ComputePipeline,
    hist: wgpu::ComputePipeline,
    select: wgpu::ComputePipeline,
    cand_collect: wgpu::ComputePipeline,
    cand_check: wgpu::ComputePipeline,
    cand_count: wgpu::ComputePipeline,
    count: wgpu::ComputePipeline,
    scan: wgpu::ComputePipeline,
    cand_write: wgpu::ComputePipeline,
    write: wgpu::ComputePipeline,
    stats: wgpu::ComputePipeline,
    gauss_resolve: wgpu::ComputePipeline,
    gauss_count: wgpu::ComputePipeline,
    gauss_final: wgpu::ComputePipeline,
    replica: wgpu::ComputePipeline,
}

/// The uniform slots of one layout (chunk sizes, k, selection kind), uploaded once.
#[derive(Default)]
struct Slots {
    key: Vec<u64>,
    /// [digit][chunk]: radix, count and write passes.
    radix: [Vec<u32>; 3],
    /// [digit]: the radix histogram of the candidates.
    cand_radix: [u32; 3],
    /// Digit 0 of the full radix select, which also sets the next t0.
    select_next: u32,
    collect_first: Vec<u32>,
    collect_again: Vec<u32>,
    collect_exact: Vec<u32>,
    stats: Vec<u32>,
    init_steady: u32,
    init_cold: u32,
    init_full: u32,
    check_first: u32,
    check_again: u32,
    check_exact: u32,
    /// Whole-model passes (scan, cand_count; GaussianK resolve/final).
    whole: u32,
    tiles_per: Vec<u64>,
    stats_per: Vec<u64>,
    total_tiles: u64,
    cap: u64,
    use_cand: bool,
}

/// The selection kernels and their buffers (grown as needed, reused between calls).
pub struct GpuTopk {
    ctx: Ctx,
    layout: wgpu::BindGroupLayout,
    p: Pipelines,
    hist: wgpu::Buffer,
    work: wgpu::Buffer,
    work_bytes: u64,
    out: wgpu::Buffer,
    out_words: u64,
    cand: wgpu::Buffer,
    cand_words: u64,
    /// Stand-ins for x̂ and x when the selection does not touch the replica.
    placeholders: (wgpu::Buffer, wgpu::Buffer),
    uniforms: UniformSlots,
    slots: Slots,
    readback: Readback,
    /// The GPU's state holds a next threshold for selections of this layout key.
    warm: Option<Vec<u64>>,
    counters: TopkCounters,
    timer: Option<Timer>,
    /// Device seconds of the last exact selection's passes (where timestamps exist).
    last_device_s: Option<f64>,
}

impl GpuTopk {
    pub fn new(ctx: Ctx) -> Self {
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("topk"),
            entries: &[
                util::uniform_entry(0),
                util::rw_entry(1),
                util::rw_entry(2),
                util::read_entry(3),
                util::rw_entry(4),
                util::rw_entry(5),
                util::rw_entry(6),
                util::rw_entry(7),
            ],
        });
        let module = util::module(&ctx, &TOPK, &[]);
        let mk = |e: &str| util::pipeline_from(&ctx, &layout, &module, "topk.wgsl", e);
        let p = Pipelines {
            init: mk("init_pass"),
            hist: mk("hist_pass"),
            select: mk("select_pass"),
            cand_collect: mk("cand_collect"),
            cand_check: mk("cand_check"),
            cand_count: mk("cand_count"),
            count: mk("count_pass"),
            scan: mk("scan_pass"),
            cand_write: mk("cand_write"),
            write: mk("write_pass"),
            stats: mk("stats_pass"),
            gauss_resolve: mk("gauss_resolve"),
            gauss_count: mk("gauss_count"),
            gauss_final: mk("gauss_final"),
            replica: mk("replica_pass"),
        };
        let buf = |label: &str, bytes: u64| util::storage(&ctx, label, bytes, wgpu::BufferUsages::empty());
        Self {
            hist: buf("topk.hist", HIST_WORDS * 4),
            work: buf("topk.work", 1024),
            work_bytes: 1024,
            out: buf("topk.out", 1024),
            out_words: 256,
            cand: buf("topk.cand", 1024),
            cand_words: 256,
            placeholders: (buf("topk.no_xhat", 4), buf("topk.no_x", 4)),
            uniforms: UniformSlots::new(&ctx, "topk.params", 64),
            slots: Slots::default(),
            readback: Readback::new(),
            warm: None,
            counters: TopkCounters::default(),
            timer: None,
            last_device_s: None,
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

    /// What the selections so far cost.
    pub fn counters(&self) -> TopkCounters {
        self.counters
    }

    /// Benchmarks: time the exact selections' kernels from now on (timestamp queries, where
    /// the device has them; servers do not pay for them).
    pub fn time_kernels(&mut self) {
        if self.timer.is_none() {
            self.timer = Timer::new(&self.ctx);
        }
    }

    /// Device seconds of the last exact selection's kernels (both runs when it missed), without
    /// the readback. None without timestamp queries or before [`GpuTopk::time_kernels`].
    pub fn last_device_time(&self) -> Option<f64> {
        self.last_device_s
    }

    /// Forgets the previous threshold: the next exact selection runs the full radix select
    /// (after the vector was replaced, or to measure a cold selection).
    pub fn forget(&mut self) {
        self.warm = None;
    }

    fn ensure(&mut self, work_bytes: u64, out_words: u64, cand_words: u64) {
        let max = self.ctx.max_binding();
        if work_bytes > self.work_bytes {
            self.work_bytes = work_bytes.next_power_of_two().min(max);
            self.work = util::storage(&self.ctx, "topk.work", self.work_bytes, wgpu::BufferUsages::empty());
            self.warm = None;
        }
        if out_words > self.out_words {
            self.out_words = out_words.next_power_of_two().min(max / 4);
            self.out = util::storage(&self.ctx, "topk.out", self.out_words * 4, wgpu::BufferUsages::empty());
        }
        if cand_words > self.cand_words {
            self.cand_words = cand_words.next_power_of_two().min(max / 4);
            self.cand =
                util::storage(&self.ctx, "topk.cand", self.cand_words * 4, wgpu::BufferUsages::empty());
        }
    }

    fn bind_group(&self, c: &TopkChunk<'_>) -> wgpu::BindGroup {
        let (xhat, x) = c.replica.unwrap_or((&self.placeholders.0, &self.placeholders.1));
        self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("topk"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: self.uniforms.binding(std::mem::size_of::<ChunkParams>() as u64),
                },
                util::buf(1, c.d),
                util::buf(2, xhat),
                util::buf(3, x),
                util::buf(4, &self.hist),
                util::buf(5, &self.work),
                util::buf(6, &self.out),
                util::buf(7, &self.cand),
            ],
        })
    }

    /// Builds (or keeps) the uniform slots of this layout.
    fn prepare_slots(&mut self, chunks: &[TopkChunk<'_>], selection: Selection, update_replica: bool) {
        let n: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let k = (selection.k() as u64).min(n);
        let gaussian = matches!(selection, Selection::GaussianK { .. });
        let mut key: Vec<u64> = chunks.iter().map(|c| c.len as u64).collect();
        key.extend([k, gaussian as u64, update_replica as u64]);
        if key == self.slots.key {
            return;
        }
        let tiles_per: Vec<u64> = chunks.iter().map(|c| (c.len as u64).div_ceil(TILE)).collect();
        let stats_per: Vec<u64> = chunks.iter().map(|c| (c.len as u64).div_ceil(HIST_SPAN)).collect();
        let total_tiles: u64 = tiles_per.iter().sum();
        let partials: u64 = stats_per.iter().sum();
        // Candidates pay off while they are a small part of the vector and fit one binding.
        let cap = (CAP_K * k).min(n).min(self.ctx.max_binding() / 8);
        let use_cand = !gaussian && k < n && CAP_K * k <= n / 2 && cap >= k;
        let z = if gaussian {
            let rho = (k as f64 / n as f64).clamp(f64::MIN_POSITIVE, 1.0);
            normal_quantile(1.0 - rho / 2.0) as f32
        } else {
            0.0
        };
        let everything = if k == n && !gaussian { FLAG_ALL } else { 0 };
        let dense = if use_cand { 0 } else { FLAG_DENSE };
        let base_params = ChunkParams {
            k: k as u32,
            cap: cap as u32,
            k_next: (NEXT_K * k).min(n) as u32,
            total_tiles: total_tiles as u32,
            z,
            ..Default::default()
        };
        let u = &mut self.uniforms;
        u.clear();
        let mut s = Slots { key, tiles_per, stats_per, total_tiles, cap, use_cand, ..Default::default() };
        let (mut base, mut tile_base, mut stat_base) = (0u64, 0u64, 0u64);
        for (i, c) in chunks.iter().enumerate() {
            let params = ChunkParams {
                n: c.len as u32,
                base: base as u32,
                tile_base: tile_base as u32,
                flags: 0,
                ..base_params
            };
            for digit in 0..3 {
                s.radix[digit].push(u.push(&ChunkParams { digit: digit as u32, ..params }));
            }
            if i == 0 {
                s.select_next = u.push(&ChunkParams { flags: FLAG_NEXT, ..params });
                for digit in 0..3 {
                    s.cand_radix[digit] =
                        u.push(&ChunkParams { digit: digit as u32, flags: FLAG_CAND, ..params });
                }
            }
            s.collect_first.push(u.push(&ChunkParams { flags: FLAG_HIST, ..params }));
            s.collect_again.push(u.push(&ChunkParams { flags: FLAG_RECOLLECT, ..params }));
            s.collect_exact.push(u.push(&ChunkParams { flags: FLAG_EXACT, ..params }));
            s.stats.push(u.push(&ChunkParams { tile_base: stat_base as u32, ..params }));
            base += c.len as u64;
            tile_base += s.tiles_per[i];
            stat_base += s.stats_per[i];
        }
        let whole = ChunkParams { n: n as u32, ..base_params };
        s.init_steady = u.push(&ChunkParams { flags: FLAG_STEADY, ..whole });
        s.init_cold = u.push(&ChunkParams { flags: FLAG_COLD, ..whole });
        s.init_full = u.push(&ChunkParams { flags: everything | dense, ..whole });
        s.check_first = u.push(&ChunkParams { flags: FLAG_HIST, ..whole });
        s.check_again = u.push(&ChunkParams { flags: FLAG_RECOLLECT, ..whole });
        s.check_exact = u.push(&ChunkParams { flags: FLAG_EXACT, ..whole });
        s.whole = u.push(&ChunkParams {
            total_tiles: if gaussian { partials } else { total_tiles } as u32,
            ..whole
        });
        u.upload(&self.ctx);
        self.slots = s;
        self.warm = None;
    }

    /// Selects from the concatenation of `chunks`; with `update_replica`, adds the sent values
    /// to each chunk's x̂ and sets its d to x − x̂ there. Blocks until the result is read back.
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
        if update_replica && chunks.iter().any(|c| c.replica.is_none()) {
            return Err(EngineError::Gpu("a replica update needs every chunk's x̂ and x".into()));
        }
        let gaussian = matches!(selection, Selection::GaussianK { .. });
        // GaussianK may select more than k: its output is sized once the count is known
        // (room for 2k to start with).
        let cap_out = if gaussian { (2 * k).min(n) } else { k };
        if !gaussian && cap_out > self.max_entries() {
            return Err(EngineError::Gpu(format!(
                "a Delta of {cap_out} entries does not fit one storage binding ({} bytes); lower rho_down",
                self.ctx.max_binding()
            )));
        }
        self.prepare_slots(chunks, selection, update_replica);
        let work_bytes = STATE_BYTES + 4 * 4 * self.slots.total_tiles.max(1);
        self.ensure(work_bytes, cap_out + cap_out.div_ceil(2), 2 * self.slots.cap.max(1));
        let groups: Vec<wgpu::BindGroup> = chunks.iter().map(|c| self.bind_group(c)).collect();
        self.counters.selections += 1;
        if gaussian {
            return self.gaussian(chunks, &groups, update_replica);
        }
        self.last_device_s = None;
        if self.slots.use_cand {
            let warm = self.warm.as_ref() == Some(&self.slots.key);
            let (st, body) =
                self.exact_run(chunks, &groups, k, if warm { Run::Steady } else { Run::Cold })?;
            self.warm = Some(self.slots.key.clone());
            self.counters.input_passes += 1 + st.recollect as u64;
            self.counters.recollections += st.recollect as u64;
            if st.mode == MODE_CAND {
                if update_replica {
                    self.apply_to_replica(&groups, k);
                }
                return Ok(Selected { nnz: k as u32, body });
            }
            self.counters.misses += 1;
        }
        let (st, body) = self.exact_run(chunks, &groups, k, Run::Full)?;
        let radix = if k == n { 0 } else { 3 };
        self.counters.input_passes +=
            radix + self.slots.use_cand as u64 + if st.mode == MODE_DENSE { 2 } else { 0 };
        if update_replica {
            self.apply_to_replica(&groups, k);
        }
        Ok(Selected { nnz: k as u32, body })
    }

    /// Adds the `nnz` entries the last selection emitted (and the engine read back and
    /// checked) to each chunk's x̂ and sets d = x − x̂ there. Submits; does not wait.
    fn apply_to_replica(&mut self, groups: &[wgpu::BindGroup], nnz: u64) {
        let mut enc = util::encoder(&self.ctx, "topk.replica");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk.replica"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.p.replica);
            for (i, g) in groups.iter().enumerate() {
                pass.set_bind_group(0, g, &[self.slots.radix[0][i]]);
                let (x, y) = util::grid(nnz);
                pass.dispatch_workgroups(x, y, 1);
                self.counters.dispatches += 1;
            }
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    /// One exact selection: from candidates (above the previous threshold, or `Cold`: from
    /// the k-th key's bucket), or the full radix select. Returns the state the GPU ended in
    /// and the Delta body.
    fn exact_run(
        &mut self,
        chunks: &[TopkChunk<'_>],
        groups: &[wgpu::BindGroup],
        k: u64,
        run_kind: Run,
    ) -> Result<(State, Vec<u8>), EngineError> {
        let steady = run_kind != Run::Full;
        let s = &self.slots;
        let p = &self.p;
        let mut dispatches = 0u64;
        let mut enc = util::encoder(&self.ctx, "topk");
        enc.clear_buffer(&self.hist, 0, None);
        enc.clear_buffer(&self.out, 4 * k, Some(4 * k.div_ceil(2)));
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk"),
                timestamp_writes: self.timer.as_ref().and_then(|t| t.writes(true, true)),
            });
            let mut run = |pipe: &wgpu::ComputePipeline, g: &wgpu::BindGroup, slot: u32, groups: u64| {
                pass.set_pipeline(pipe);
                pass.set_bind_group(0, g, &[slot]);
                let (x, y) = util::grid_groups(groups);
                pass.dispatch_workgroups(x, y, 1);
                dispatches += 1;
            };
            let cand_groups = s.cap.div_ceil(HIST_SPAN);
            let all = chunks.iter().map(|c| c.len as u64).sum::<u64>() == k;
            if steady {
                let init = if run_kind == Run::Cold { s.init_cold } else { s.init_steady };
                run(&p.init, &groups[0], init, 1);
                for (i, g) in groups.iter().enumerate() {
                    run(&p.cand_collect, g, s.collect_first[i], s.tiles_per[i]);
                }
                run(&p.cand_check, &groups[0], s.check_first, 1);
                for (i, g) in groups.iter().enumerate() {
                    run(&p.cand_collect, g, s.collect_again[i], s.tiles_per[i]);
                }
                run(&p.cand_check, &groups[0], s.check_again, 1);
                for digit in 0..3 {
                    run(&p.hist, &groups[0], s.cand_radix[digit], cand_groups);
                    run(&p.select, &groups[0], s.radix[digit][0], 1);
                }
            } else {
                run(&p.init, &groups[0], s.init_full, 1);
                if !all {
                    for digit in 0..3 {
                        for (i, g) in groups.iter().enumerate() {
                            run(&p.hist, g, s.radix[digit][i], (chunks[i].len as u64).div_ceil(HIST_SPAN));
                        }
                        let slot = if digit == 0 { s.select_next } else { s.radix[digit][0] };
                        run(&p.select, &groups[0], slot, 1);
                    }
                }
                if s.use_cand {
                    for (i, g) in groups.iter().enumerate() {
                        run(&p.cand_collect, g, s.collect_exact[i], s.tiles_per[i]);
                    }
                    run(&p.cand_check, &groups[0], s.check_exact, 1);
                }
                // Emitting from d itself: only when the candidates did not fit (or are off).
                for (i, g) in groups.iter().enumerate() {
                    run(&p.count, g, s.radix[0][i], s.tiles_per[i]);
                }
            }
            if s.use_cand {
                run(&p.cand_count, &groups[0], s.whole, s.total_tiles);
            }
            run(&p.scan, &groups[0], s.whole, 1);
            if s.use_cand {
                for (i, g) in groups.iter().enumerate() {
                    run(&p.cand_write, g, s.radix[0][i], s.tiles_per[i]);
                }
            }
            if !steady {
                for (i, g) in groups.iter().enumerate() {
                    run(&p.write, g, s.radix[0][i], s.tiles_per[i]);
                }
            }
        }
        self.counters.dispatches += dispatches;
        self.counters.waits += 1;
        let words = k + k.div_ceil(2);
        let mut ranges = vec![(&self.work, 0, STATE_BYTES), (&self.out, 0, 4 * words)];
        if let Some(t) = &self.timer {
            t.resolve(&mut enc);
            ranges.push((&t.resolved, 0, 16));
        }
        let mut bytes = self.readback.read(&self.ctx, enc, &ranges)?;
        if let Some(t) = &self.timer {
            let stamps = bytes.split_off(bytes.len() - 16);
            if let Some(s) = t.seconds(&stamps) {
                self.last_device_s = Some(self.last_device_s.unwrap_or(0.0) + s);
            }
        }
        let st: State = bytemuck::pod_read_unaligned(&bytes[..STATE_BYTES as usize]);
        if st.mode != MODE_MISS && st.selected as u64 != k {
            return Err(EngineError::Gpu(format!("Top-k selected {} entries, expected {k}", st.selected)));
        }
        let body = bytes[STATE_BYTES as usize..].to_vec();
        debug_assert_eq!(body.len(), sparse_payload_len(k as usize));
        Ok((st, body))
    }

    /// GaussianK: statistics, threshold refinement, then the dense count/scan/write passes.
    fn gaussian(
        &mut self,
        chunks: &[TopkChunk<'_>],
        groups: &[wgpu::BindGroup],
        update_replica: bool,
    ) -> Result<Selected, EngineError> {
        let s = &self.slots;
        let p = &self.p;
        let mut dispatches = 0u64;
        let mut enc = util::encoder(&self.ctx, "topk.gaussian");
        enc.clear_buffer(&self.hist, 0, None);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk.gaussian"),
                timestamp_writes: None,
            });
            let mut run = |pipe: &wgpu::ComputePipeline, g: &wgpu::BindGroup, slot: u32, groups: u64| {
                pass.set_pipeline(pipe);
                pass.set_bind_group(0, g, &[slot]);
                let (x, y) = util::grid_groups(groups);
                pass.dispatch_workgroups(x, y, 1);
                dispatches += 1;
            };
            run(&p.init, &groups[0], s.init_full, 1);
            for (i, g) in groups.iter().enumerate() {
                run(&p.stats, g, s.stats[i], s.stats_per[i]);
            }
            run(&p.gauss_resolve, &groups[0], s.whole, 1);
            for (i, g) in groups.iter().enumerate() {
                run(&p.gauss_count, g, s.radix[0][i], s.stats_per[i]);
            }
            run(&p.gauss_final, &groups[0], s.whole, 1);
            for (i, g) in groups.iter().enumerate() {
                run(&p.count, g, s.radix[0][i], s.tiles_per[i]);
            }
            // The scan runs over the tiles (not the GaussianK partials).
            run(&p.scan, &groups[0], s.radix[0][0], 1);
        }
        // The number selected decides where the values start: read it back first.
        let st = self.readback.read(&self.ctx, enc, &[(&self.work, 0, STATE_BYTES)])?;
        let st: State = bytemuck::pod_read_unaligned(&st);
        let nnz = st.selected as u64;
        if nnz > self.max_entries() {
            return Err(EngineError::Gpu(format!(
                "GaussianK selected {nnz} entries: a Delta that large does not fit one storage binding ({} \
                 bytes); lower rho_down",
                self.ctx.max_binding()
            )));
        }
        let mut rebuilt = Vec::new();
        if nnz + nnz.div_ceil(2) > self.out_words {
            self.ensure(0, nnz + nnz.div_ceil(2), 0);
            rebuilt = chunks.iter().map(|c| self.bind_group(c)).collect();
        }
        let groups = if rebuilt.is_empty() { groups } else { &rebuilt[..] };
        let mut enc = util::encoder(&self.ctx, "topk.write");
        enc.clear_buffer(&self.out, 4 * nnz, Some(4 * nnz.div_ceil(2)));
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("topk.write"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.p.write);
            for (i, g) in groups.iter().enumerate() {
                pass.set_bind_group(0, g, &[self.slots.radix[0][i]]);
                let (x, y) = util::grid_groups(self.slots.tiles_per[i]);
                pass.dispatch_workgroups(x, y, 1);
                dispatches += 1;
            }
        }
        let words = nnz + nnz.div_ceil(2);
        let body = self.readback.read(&self.ctx, enc, &[(&self.out, 0, 4 * words)])?;
        if update_replica {
            self.apply_to_replica(groups, nnz);
        }
        self.counters.dispatches += dispatches;
        self.counters.waits += 2;
        // stats, count (the statistics pass and gauss_count are one read each), write.
        self.counters.input_passes += 4;
        debug_assert_eq!(body.len(), sparse_payload_len(nnz as usize));
        Ok(Selected { nnz: nnz as u32, body })
    }
}
