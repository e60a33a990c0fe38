//! Running a server with many client processes on one machine: `sparsync demo` and
//! `sparsync experiment`.
//!
//! Clients are separate `sparsync-client` processes (as real devices would be), found next to
//! the `sparsync` executable unless a path is given; their logs go to the run's directory.

pub mod demo;
pub mod experiment;
pub mod scenario;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Errors running clients.
#[derive(Debug, thiserror::Error)]
pub enum OrchestrateError {
    #[error(
        "sparsync-client not found at {0}: build both binaries with `cargo build --release --workspace`, \
         or pass --client-bin"
    )]
    NoClient(PathBuf),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error("{0}")]
    Invalid(String),
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OrchestrateError {
    let what = what.into();
    move |source| OrchestrateError::Io { what, source }
}

/// The client binary: `explicit`, else `sparsync-client` next to the running executable.
pub fn find_client(explicit: Option<&Path>) -> Result<PathBuf, OrchestrateError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().map_err(io("locating the sparsync executable"))?;
            exe.with_file_name(format!("sparsync-client{}", std::env::consts::EXE_SUFFIX))
        }
    };
    if path.is_file() { Ok(path) } else { Err(OrchestrateError::NoClient(path)) }
}

/// One client process to start.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub id: String,
    pub evaluator: bool,
    /// `--mode` (None: auto).
    pub mode: Option<String>,
    pub shard: (usize, usize),
    pub partition: String,
    pub seed: u64,
    pub slowdown: f64,
    pub extra: Vec<String>,
}

impl ClientSpec {
    pub fn trainer(id: impl Into<String>, shard: (usize, usize), slowdown: f64, seed: u64) -> Self {
        Self {
            id: id.into(),
            evaluator: false,
            mode: None,
            shard,
            partition: "iid".into(),
            seed,
            slowdown,
            extra: Vec::new(),
        }
    }

    pub fn evaluator(id: impl Into<String>) -> Self {
        Self { evaluator: true, ..Self::trainer(id, (0, 1), 1.0, 0) }
    }
}

/// Starts client processes against one server.
pub struct Launcher {
    pub bin: PathBuf,
    pub url: String,
    pub model: String,
    pub data: Option<PathBuf>,
    pub log_dir: PathBuf,
}

impl Launcher {
    pub fn spawn(&self, spec: &ClientSpec) -> Result<Child, OrchestrateError> {
        let log = self.log_dir.join(format!("{}.log", spec.id));
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating a log file handle"))?;
        let mut c = Command::new(&self.bin);
        c.arg("--server")
            .arg(&self.url)
            .arg("--id")
            .arg(&spec.id)
            .arg("--model")
            .arg(&self.model)
            .arg("--no-reconnect")
            .arg("--seed")
            .arg(spec.seed.to_string());
        if spec.evaluator {
            c.args(["--role", "evaluator"]);
        } else {
            c.arg("--shard")
                .arg(format!("{}/{}", spec.shard.0, spec.shard.1))
                .arg("--partition")
                .arg(&spec.partition)
                .arg("--slowdown")
                .arg(spec.slowdown.to_string());
        }
        if let Some(m) = &spec.mode {
            c.arg("--mode").arg(m);
        }
        if let Some(d) = &self.data {
            c.arg("--data").arg(d);
        }
        c.args(&spec.extra);
        c.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        c.spawn().map_err(io(format!("starting {}", self.bin.display())))
    }
}

/// Waits for processes to exit by themselves for `grace`, then kills the rest.
pub async fn reap(children: &mut [Child], grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    for c in children.iter_mut() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}

/// A directory for a run's files: `base/name-YYYYmmdd-HHMMSS` (UTC).
pub fn run_dir(base: &Path, name: &str) -> Result<PathBuf, OrchestrateError> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let dir =
        base.join(format!("{name}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_413), (2025, 11, 21));
    }
}
