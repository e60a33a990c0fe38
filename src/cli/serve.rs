//! `sparsync serve`: the parameter server until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use sparsync::config::{ServeFlags, ServerConfig};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML file of settings (keys are the flag names with underscores); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Once serving, write the address (http://HOST:PORT) to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(flatten)]
    flags: ServeFlags,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    cfg.apply(args.flags);
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr().with_context(|| format!("binding {}", cfg.listen))?;
    let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
    let ready_file = args.ready_file;
    let signal = super::shutdown_signal();
    // `server::run` polls this once the server serves: the ready file is written then.
    let until = async move {
        if let Some(path) = &ready_file {
            std::fs::write(path, format!("{scheme}://{addr}"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        signal.await;
        anyhow::Ok(())
    };
    sparsync::server::run(cfg, listener, until).await?;
    Ok(())
}
