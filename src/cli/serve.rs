//! `sparsync serve`: the parameter server until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use sparsync::config::{ServeFlags, ServerConfig};
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

/// `--standby`: follows the leader's log (its engine kept current) until the leader's lease
/// lapses, then takes over, binds the listener and serves. Following that fails (the leader
/// purged records this standby had not read, NATS went away) starts again from the newest
/// checkpoint. Stops at SIGINT or SIGTERM.
async fn standby(cfg: ServerConfig, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let signal = super::shutdown_signal();
    tokio::pin!(signal);
    let handle = loop {
        tokio::select! {
            r = sparsync::server::start_standby(cfg.clone()) => match r {
                Ok(h) => break h,
                Err(e @ (ServerError::Log(_) | ServerError::Stopped(_) | ServerError::LeaseHeld(_))) => {
                    tracing::warn!(error = %e, "standing by failed; starting again from the newest checkpoint");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            },
            _ = &mut signal => return Ok(()),
        }
    };
    let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
    if let Some(path) = &ready_file {
        std::fs::write(path, format!("{scheme}://{}", handle.addr))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    sparsync::server::serve_until(handle, async move {
        signal.await;
        anyhow::Ok(())
    })
    .await?;
    Ok(())
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
