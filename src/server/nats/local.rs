//! A NATS JetStream cluster of local processes on 127.0.0.1 ports of its own (for the tests
//! and `bench e2e --wal nats`): three `nats-server`s with fsync on every write, routed to each
//! other, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Nats;
use crate::config::NatsTarget;

/// The `nats-server` binary: `$SPARSYNC_NATS_SERVER`, else the first on `PATH`.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPARSYNC_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("nats-server")).find(|p| p.is_file()))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three local `nats-server` processes forming one JetStream cluster.
pub struct LocalCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl LocalCluster {
    /// Starts the cluster with its stores and logs (`n<i>.log`) in `dir`.
    pub fn start(bin: &Path, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ports = (0..3).map(|_| free_port()).collect::<std::io::Result<Vec<u16>>>()?;
        let routes = (0..3).map(|_| free_port()).collect::<std::io::Result<Vec<u16>>>()?;
        let route_list =
            routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
        let mut cluster = Self { nodes: Vec::new(), ports: ports.clone(), dir: dir.to_path_buf() };
        for i in 0..3 {
            let store = dir.join(format!("store{i}"));
            let conf = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {:?}, sync_interval: always }}\n\
                     cluster {{ name: sparsync-local, listen: 127.0.0.1:{}, routes: [{route_list}] }}\n",
                    ports[i],
                    store.display().to_string(),
                    routes[i]
                ),
            )?;
            let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()?;
            cluster.nodes.push(Some(child));
        }
        Ok(cluster)
    }

    /// `nats://` + every node + `/stream`.
    pub fn target(&self, stream: &str) -> NatsTarget {
        NatsTarget {
            servers: self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            stream: stream.to_string(),
        }
    }

    /// Kills node `i` (kill -9).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends node `i` a signal as `kill` names it (`-STOP` pauses it, `-CONT` resumes it);
    /// false when the node is gone or `kill` failed.
    pub fn signal(&self, i: usize, sig: &str) -> bool {
        let Some(Some(c)) = self.nodes.get(i) else { return false };
        Command::new("kill").args([sig, &c.id().to_string()]).status().is_ok_and(|s| s.success())
    }

    /// Makes a sparsync log named `stream` (R = 3), retrying while the cluster elects its
    /// JetStream leader (a few seconds after start).
    pub async fn init(&self, stream: &str, lease: Duration) -> Result<NatsTarget, String> {
        let target = self.target(stream);
        // (Generous: tests start several clusters at once on a 2-core machine.)
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tried = match Nats::connect(&target, Duration::from_secs(5)).await {
                // Made, and answering: the stream, the object store and the lease bucket each
                // have their own leader to elect.
                Ok(n) => match n.init(3, lease).await {
                    Ok(_) => n.check().await.map(|_| ()),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match tried {
                Ok(()) => return Ok(target),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "the local NATS cluster in {} did not take the log: {e}",
                        self.dir.display()
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
