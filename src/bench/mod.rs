//! `sparsync bench`: kernel benchmarks (aggregation, Top-k) and, later, the end-to-end server
//! benchmark. Prints tables, writes JSON.

pub mod kernels;
pub mod load;

use serde::{Deserialize, Serialize};

/// What machine and build produced a report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    pub sparsync: String,
    pub adapter: Option<String>,
    pub backend: Option<String>,
    pub device_type: Option<String>,
    pub driver: Option<String>,
    pub cpu: String,
    pub cores: usize,
    pub os: String,
}

impl Environment {
    pub fn detect(ctx: Option<&crate::engine::gpu::device::GpuContext>) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        Self {
            sparsync: env!("CARGO_PKG_VERSION").into(),
            adapter: ctx.map(|c| c.info.name.clone()),
            backend: ctx.map(|c| format!("{:?}", c.info.backend)),
            device_type: ctx.map(|c| format!("{:?}", c.info.device_type)),
            driver: ctx.map(|c| format!("{} {}", c.info.driver, c.info.driver_info).trim().to_string()),
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            os: std::env::consts::OS.into(),
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "sparsync {} | adapter: {} ({}, {}) | CPU: {} × {} cores",
            self.sparsync,
            self.adapter.as_deref().unwrap_or("none"),
            self.backend.as_deref().unwrap_or("-"),
            self.device_type.as_deref().unwrap_or("-"),
            self.cpu,
            self.cores
        )
    }
}

/// A plain text table: header, then rows, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().zip(&width).map(|(c, w)| format!("{c:>w$}", w = w)).collect::<Vec<_>>().join("  ")
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

pub fn aggregate_table(rows: &[kernels::AggregateRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.engine.clone(),
                format!("2^{}", r.params.ilog2()),
                r.batch.to_string(),
                format!("{:.3}", r.scatter_s * 1e3),
                format!("{:.3}", r.step_s * 1e3),
                format!("{:.0}", r.updates_per_s),
                format!("{:.2}", r.effective_gbps),
                format!("{:.2}", r.copy_gbps),
                format!("{:.0}%", 100.0 * r.ratio_to_copy),
            ]
        })
        .collect();
    table(
        &["engine", "params", "batch", "scatter ms", "step ms", "updates/s", "GB/s", "copy GB/s", "of copy"],
        &body,
    )
}

pub fn topk_table(rows: &[kernels::TopkRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.engine.clone(),
                format!("2^{}", r.n.ilog2()),
                format!("{}%", r.density * 100.0),
                r.k.to_string(),
                format!("{:.3}", r.time_s * 1e3),
                format!("{:.1}", r.elements_per_s / 1e6),
                format!("{:.3}", r.copy_s * 1e3),
                format!("{:.2}", r.passes_equivalent),
            ]
        })
        .collect();
    table(&["engine", "n", "k", "k entries", "ms", "M elem/s", "copy ms", "copy-passes"], &body)
}
