//! `sparsync serve`: the parameter server until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use sparsync::config::{ServeFlags, ServerConfig, WalTarget};
use sparsync::server::ServerError;

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
    cfg.validate()?;
    if cfg.standby {
        return standby(cfg, args.ready_file).await;
    }
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    serve(cfg, listener, args.ready_file).await
}

/// `--standby`: waits until the leader's lease lapses, then binds the listener and serves (from
/// what the stream holds). When another standby took the lease first, waits again.
async fn standby(cfg: ServerConfig, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let WalTarget::Nats(target) = &cfg.wal else { anyhow::bail!("--standby needs --wal nats://…") };
    loop {
        sparsync::server::nats::stand_by(target).await.map_err(anyhow::Error::msg)?;
        tracing::info!(%target, "the leader's lease lapsed: taking over");
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        match serve(cfg.clone(), listener, ready_file.clone()).await {
            Err(e) if matches!(e.downcast_ref(), Some(ServerError::LeaseHeld(_))) => {
                tracing::info!(error = %e, "another server took the lease first; standing by again");
            }
            // Taking over failed (NATS went away while reading, another server wrote first):
            // stand by again; the lease this server may hold lapses unrenewed.
            Err(e) if matches!(e.downcast_ref(), Some(ServerError::Log(_))) => {
                tracing::warn!(error = %e, "taking over failed; standing by again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

async fn serve(
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().with_context(|| format!("binding {}", cfg.listen))?;
    let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
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
