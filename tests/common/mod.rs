//! Helpers shared by the integration tests: in-process servers on 127.0.0.1:0, protocol-level
//! clients, random sparse updates.
#![allow(dead_code)]

pub mod gpu;
pub mod scripted;

use std::time::Duration;

use half::f16;
use sparsync::client::{ClientOptions, Connection, Event};
use sparsync::config::ServerConfig;
use sparsync::engine::Aggregator;
use sparsync::protocol::frame::PushHeader;
use sparsync::protocol::message::Ack;
use sparsync::protocol::model::{ModelLayout, SplitMix64, TensorSpec};
use sparsync::server::ServerHandle;

/// A one-tensor layout of `n` parameters.
pub fn layout(n: usize) -> ModelLayout {
    ModelLayout { name: "test".into(), tensors: vec![TensorSpec::new("w", &[n])] }
}

/// Random initial values in [-1, 1).
pub fn init(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.next_unit_f32() * 2.0 - 1.0).collect()
}

/// Starts a server on a free loopback port with the given engine.
pub async fn start(cfg: ServerConfig, n: usize, engine: Box<dyn Aggregator>) -> ServerHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    sparsync::server::start_with(cfg, listener, layout(n), engine).await.expect("server starts")
}

pub fn url(h: &ServerHandle) -> String {
    format!("ws://{}/ws", h.addr)
}

pub fn options(h: &ServerHandle, id: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url(h), id, "test");
    o.timeout = Duration::from_secs(20);
    o
}

pub async fn connect(h: &ServerHandle, id: &str) -> Connection {
    Connection::connect(&options(h, id)).await.expect("client connects")
}

/// `nnz` distinct ascending indices below `n` and random f16 values in [-scale, scale).
pub fn random_update(rng: &mut SplitMix64, n: usize, nnz: usize, scale: f32) -> (Vec<u32>, Vec<f16>) {
    let nnz = nnz.min(n);
    // Floyd's algorithm for a uniform subset.
    let mut set = std::collections::BTreeSet::new();
    for j in (n - nnz)..n {
        let t = (rng.next_u64() % (j as u64 + 1)) as usize;
        if !set.insert(t as u32) {
            set.insert(j as u32);
        }
    }
    let idx: Vec<u32> = set.into_iter().collect();
    let vals = idx.iter().map(|_| f16::from_f32((rng.next_unit_f32() * 2.0 - 1.0) * scale)).collect();
    (idx, vals)
}

pub fn header(base_version: u64, seq: u64, nnz: usize) -> PushHeader {
    PushHeader { base_version, seq, samples: 16, local_steps: 1, loss: 1.0, nnz: nnz as u32 }
}

/// Reads events until `pred` returns Some.
pub async fn wait_for<T>(c: &mut Connection, mut pred: impl FnMut(&Event) -> Option<T>) -> T {
    loop {
        let e = c.next_event().await.expect("event");
        if let Some(t) = pred(&e) {
            return t;
        }
    }
}

/// Waits for the Ack (or panics on a Reject) of `seq`.
pub async fn wait_ack(c: &mut Connection, seq: u64) -> Ack {
    wait_for(c, |e| match e {
        Event::Ack(a) if a.seq == seq => Some(a.clone()),
        Event::Reject(r) if r.seq == seq => panic!("push {seq} rejected: {r:?}"),
        _ => None,
    })
    .await
}

/// Reads events until the replica reaches `version`.
pub async fn catch_up(c: &mut Connection, version: u64) {
    while c.replica.version() != Some(version) {
        c.next_event().await.expect("event while catching up");
    }
}

/// Bit patterns of a vector, for exact comparisons with readable failures.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, "").await
}

/// The same GET with extra header lines (each ending in "\r\n").
pub async fn http_get_with(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, dechunk(&body))
}

/// Undoes chunked transfer encoding when present.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return body.to_string() };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_string() };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// A plain HTTP/1.1 GET returning the raw body bytes (the body must have a Content-Length).
pub async fn http_get_bytes(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end") + 4;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, buf[split..].to_vec())
}

/// Starts the `sparsync serve` binary on a free loopback port with `args` (after
/// `serve --listen 127.0.0.1:0`), its log in `dir/server.log`; waits for its ready file and
/// returns the child and its address. Panics with the log when it does not come up in 30 s.
pub fn spawn_serve(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, std::net::SocketAddr) {
    use std::process::{Command, Stdio};
    let ready = dir.join("ready");
    let log = dir.join("server.log");
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("server log file")))
        .spawn()
        .expect("sparsync serve starts");
    for _ in 0..600 {
        if let Some(addr) =
            std::fs::read_to_string(&ready).ok().and_then(|s| s.strip_prefix("http://")?.parse().ok())
        {
            return (child, addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not become ready: {}", std::fs::read_to_string(&log).unwrap_or_default());
}
