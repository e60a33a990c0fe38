//! `sparsync adapters`: what wgpu sees, and the device `--engine gpu` would open.

use std::path::PathBuf;

use anyhow::Context;
use sparsync::engine::gpu::device;

#[derive(clap::Args)]
pub struct AdaptersArgs {
    /// Open the adapter whose name contains this text (as `serve --adapter`).
    #[arg(long)]
    adapter: Option<String>,
    /// Fail (exit 1) when the adapter opened is a software one (a CPU emulating a GPU, such
    /// as lavapipe): a measurement on it says nothing about a GPU.
    #[arg(long)]
    require_hardware: bool,
    /// Write the description as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: AdaptersArgs) -> anyhow::Result<()> {
    let all: Vec<serde_json::Value> = device::list_adapters()
        .iter()
        .map(|a| {
            println!(
                "adapter: {} | {:?} | {:?} | driver {} {}",
                a.name, a.backend, a.device_type, a.driver, a.driver_info
            );
            serde_json::json!({
                "name": a.name, "backend": format!("{:?}", a.backend),
                "device_type": format!("{:?}", a.device_type), "driver": a.driver,
                "driver_info": a.driver_info, "vendor": a.vendor, "device": a.device,
            })
        })
        .collect();
    let opened = device::open(&device::DeviceOptions { adapter: args.adapter.clone(), ..Default::default() });
    let report = match &opened {
        Ok(ctx) => {
            let i = &ctx.info;
            println!(
                "opened: {} | {:?} | {:?} | driver {} {} | f16 {} | timestamps {}",
                i.name, i.backend, i.device_type, i.driver, i.driver_info, ctx.f16, ctx.timestamps
            );
            println!(
                "limits: max_buffer_size {} | max_storage_buffer_binding_size {} | max_compute_workgroups_per_dimension {} | max_compute_workgroup_storage_size {}",
                ctx.limits.max_buffer_size,
                ctx.limits.max_storage_buffer_binding_size,
                ctx.limits.max_compute_workgroups_per_dimension,
                ctx.limits.max_compute_workgroup_storage_size
            );
            serde_json::json!({
                "adapters": all,
                "opened": {
                    "name": i.name, "backend": format!("{:?}", i.backend),
                    "device_type": format!("{:?}", i.device_type), "driver": i.driver,
                    "driver_info": i.driver_info, "shader_f16": ctx.f16, "timestamps": ctx.timestamps,
                    "features": format!("{:?}", ctx.device.features()),
                    "limits": format!("{:?}", ctx.limits),
                },
            })
        }
        Err(e) => {
            println!("opened: none ({e})");
            serde_json::json!({ "adapters": all, "opened": null, "error": e.to_string() })
        }
    };
    if let Some(path) = &args.json {
        super::write_json(path, &report)?;
    }
    let ctx = opened.context("no GPU adapter could be opened")?;
    if args.require_hardware && ctx.info.device_type == wgpu::DeviceType::Cpu {
        anyhow::bail!(
            "--require-hardware: the adapter opened, {} ({:?}), is a software adapter on the CPU",
            ctx.info.name,
            ctx.info.backend
        );
    }
    Ok(())
}
