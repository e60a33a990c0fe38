//! `sparsync bench`: kernel benchmarks (aggregation, Top-k), the end-to-end server benchmark
//! (`e2e`, with its load generator in `load`), and `all` (one JSON report, a plot, a summary).

pub mod e2e;
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
                format!("{:.1}", r.dispatches_per_step),
                r.staging_allocations.to_string(),
                r.timing.clone(),
                r.ratio_to_floor.map(|f| format!("{f:.2}×")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "engine",
            "params",
            "batch",
            "kernels ms",
            "step ms",
            "updates/s",
            "GB/s",
            "copy GB/s",
            "of copy",
            "dispatches",
            "new staging",
            "timing",
            "of floor",
        ],
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
                format!("{:.3}", r.wall_s * 1e3),
                format!("{:.1}", r.elements_per_s / 1e6),
                format!("{:.3}", r.copy_s * 1e3),
                format!("{:.2}", r.passes_equivalent),
                format!("{:.2}", r.cold_passes_equivalent),
                format!("{:.2}", r.input_passes),
                r.cold_input_passes.to_string(),
                r.timing.clone(),
            ]
        })
        .collect();
    table(
        &[
            "engine",
            "n",
            "k",
            "k entries",
            "ms",
            "wall ms",
            "M elem/s",
            "copy ms",
            "copy-passes",
            "cold copy-passes",
            "input passes",
            "cold input passes",
            "timing",
        ],
        &body,
    )
}

/// The one-screen text summary of `sparsync bench all`, to paste into an issue.
pub fn summary(
    env: &Environment,
    command: &str,
    aggregate: &[kernels::AggregateRow],
    topk: &[kernels::TopkRow],
    e2e: &e2e::E2eReport,
) -> String {
    let s = &e2e.spec;
    let mut out = String::new();
    out.push_str(&format!("$ {command}\n{}\nOS: {}\n", env.summary(), env.os));
    if let Some(d) = &env.driver {
        out.push_str(&format!("driver: {d}\n"));
    }
    // Kernels: the largest batch of each engine and size; Top-k at each density's largest k.
    let top_batch = aggregate.iter().map(|r| r.batch).max().unwrap_or(0);
    let agg: Vec<_> = aggregate.iter().filter(|r| r.batch == top_batch).cloned().collect();
    out.push_str(&format!("\naggregation kernels (batch {top_batch}, 1% updates, median):\n"));
    out.push_str(&aggregate_table(&agg));
    out.push_str("\nTop-k (median):\n");
    out.push_str(&topk_table(topk));
    out.push_str(&format!(
        "\nend to end: servers with --engine {}, pushes of {:.2}% of the model, {}, {} s per row\n",
        s.engine,
        100.0 * s.density,
        if s.rate > 0.0 {
            format!("{} pushes/s per client", s.rate)
        } else {
            format!("closed loop, {} outstanding per client", s.window)
        },
        s.duration_s
    ));
    out.push_str(&e2e::table(&e2e.rows));
    out
}

/// The e2e plot: throughput against clients and against model size, latency against clients.
pub fn plot_e2e(path: &std::path::Path, rows: &[e2e::E2eRow]) -> anyhow::Result<()> {
    use crate::plot::{Panel, line_panels};
    let pick = |sweep: &str| -> Vec<&e2e::E2eRow> { rows.iter().filter(|r| r.sweep == sweep).collect() };
    let (by_clients, by_size) = (pick("clients"), pick("size"));
    let series = |rs: &[&e2e::E2eRow], x: &dyn Fn(&e2e::E2eRow) -> f64| {
        let mut v = vec![
            ("server MB/s in".to_string(), rs.iter().map(|r| (x(r), r.mb_in_per_s)).collect::<Vec<_>>()),
            ("server MB/s out".to_string(), rs.iter().map(|r| (x(r), r.mb_out_per_s)).collect()),
        ];
        let raw: Vec<_> = rs.iter().filter_map(|r| Some((x(r), r.raw_tcp_mb_per_s?))).collect();
        if !raw.is_empty() {
            v.push(("raw loopback TCP MB/s".to_string(), raw));
        }
        v
    };
    let clients_x = |r: &e2e::E2eRow| (r.clients as f64).log2();
    let size_x = |r: &e2e::E2eRow| (r.params as f64).log2();
    let a = series(&by_clients, &clients_x);
    let b = series(&by_size, &size_x);
    let lat = vec![
        (
            "Push to Delta p50".to_string(),
            by_clients.iter().map(|r| (clients_x(r), r.delta_latency_s.p50 * 1e3)).collect(),
        ),
        (
            "Push to Delta p99".to_string(),
            by_clients.iter().map(|r| (clients_x(r), r.delta_latency_s.p99 * 1e3)).collect(),
        ),
        (
            "Push to Ack p50".to_string(),
            by_clients.iter().map(|r| (clients_x(r), r.ack_latency_s.p50 * 1e3)).collect(),
        ),
    ];
    let params =
        by_clients.first().map(|r| format!("2^{:.0} params", (r.params as f64).log2())).unwrap_or_default();
    let clients = by_size.first().map(|r| format!("{} clients", r.clients)).unwrap_or_default();
    let t1 = format!("throughput vs clients ({params})");
    let t2 = format!("throughput vs model size ({clients})");
    let t3 = format!("latency vs clients ({params})");
    line_panels(
        path,
        "sparsync bench e2e",
        &[
            Panel { title: &t1, x_label: "log2 clients", y_label: "MB/s", series: &a },
            Panel { title: &t2, x_label: "log2 parameters", y_label: "MB/s", series: &b },
            Panel { title: &t3, x_label: "log2 clients", y_label: "ms", series: &lat },
        ],
    )?;
    Ok(())
}
