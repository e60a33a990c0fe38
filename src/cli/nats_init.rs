//! `sparsync nats-init`: makes the JetStream stream, object store and lease bucket that
//! `serve --wal nats://…` writes to.

use std::time::Duration;

use sparsync::config::NatsTarget;

#[derive(clap::Args)]
pub struct NatsInitArgs {
    /// The log: nats://HOST:PORT[,HOST:PORT…]/STREAM
    target: NatsTarget,
    /// Copies of each record kept by the cluster (3 survives the loss of one NATS node).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// The leader's lease: a standby takes over this long after the leader's last renewal
    /// (renewed every third of it).
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
}

pub async fn run(args: NatsInitArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=5).contains(&args.replicas), "--replicas must be 1 to 5 (JetStream's range)");
    anyhow::ensure!(args.lease_ms >= 300, "--lease-ms must be at least 300");
    let nats = sparsync::server::nats::Nats::connect(&args.target, Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let made =
        nats.init(args.replicas, Duration::from_millis(args.lease_ms)).await.map_err(anyhow::Error::msg)?;
    println!("ready: {made}");
    Ok(())
}
