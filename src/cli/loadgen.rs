//! `sparsync bench loadgen` (internal): the load generator process of `bench e2e`. Prints
//! `pushing S` and `draining` lines while it runs, then writes its report.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use sparsync::bench::load;

#[derive(clap::Args, Clone)]
pub struct LoadgenArgs {
    #[command(flatten)]
    spec: load::LoadSpec,
    /// Write the report here (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Raw TCP baseline: blast --frame-bytes writes at this address instead.
    #[arg(long)]
    raw: Option<String>,
    #[arg(long, default_value_t = 65536)]
    frame_bytes: usize,
}

pub async fn run(a: LoadgenArgs) -> anyhow::Result<()> {
    sparsync::server::raise_file_limit(a.spec.clients);
    if let Some(addr) = &a.raw {
        let bytes = load::raw_blast(addr, a.spec.clients, a.frame_bytes, a.spec.duration_s)
            .await
            .map_err(anyhow::Error::msg)?;
        println!("{bytes}");
        return Ok(());
    }
    let report = load::run(&a.spec, |p| {
        let mut out = std::io::stdout().lock();
        let _ = match p {
            load::Phase::Pushing(s) => writeln!(out, "pushing {s}"),
            load::Phase::Draining => writeln!(out, "draining"),
        };
        let _ = out.flush();
    })
    .await;
    let json = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}
