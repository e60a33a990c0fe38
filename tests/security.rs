//! Security and limits: tokens on the HTTP endpoints, TLS with a private CA (and a wrong one),
//! clients that open connections in a loop, slowloris requests, push rate and idle limits, and
//! a reader too slow for its Deltas. Each bad actor is refused with a clear reason while a good
//! client keeps training.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use sparsync::client::{ClientError, Connection, Event};
use sparsync::config::{ServerConfig, Tokens};
use sparsync::engine::OptimizerSettings;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::protocol::frame::{FrameKind, check_prefix, encode_push};
use sparsync::protocol::model::SplitMix64;
use sparsync::server::ServerHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const N: usize = 1000;

async fn server(cfg: ServerConfig, n: usize) -> ServerHandle {
    start(cfg, n, Box::new(CpuAggregator::new(init(n, 3), OptimizerSettings::default()))).await
}

/// One push from the good client, acknowledged: the server still serves it.
async fn good_client_trains(g: &mut Connection, seq: &mut u64) {
    *seq += 1;
    let mut rng = SplitMix64::new(*seq);
    let (idx, vals) = random_update(&mut rng, g.replica.values().len(), 10, 0.01);
    let base = g.version();
    g.push(&header(base, *seq, idx.len()), &idx, &vals).await.expect("good push sent");
    wait_ack(g, *seq).await;
}

/// The value of `sparsync_handshakes_refused_total{reason="…"}` (0 when absent).
async fn refused(addr: SocketAddr, reason: &str) -> u64 {
    let (_, text) = http_get(addr, "/metrics").await;
    let key = format!("sparsync_handshakes_refused_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_data_endpoints_need_a_token() {
    let cfg = ServerConfig { token: Tokens(vec!["s3cret".into()]), ..Default::default() };
    let h = server(cfg, N).await;
    for path in ["/api/model.safetensors", "/api/replica", "/api/record", "/api/data/test"] {
        let (code, body) = http_get_with(h.addr, path, "").await;
        assert_eq!(code, 401, "{path} without a token");
        assert!(body.contains("token missing"), "{path}: {body}");
        let (code, body) = http_get_with(h.addr, path, "Authorization: Bearer guess\r\n").await;
        assert_eq!(code, 401, "{path} with a wrong token");
        assert!(body.contains("token invalid"), "{path}: {body}");
        let (code, _) = http_get_with(h.addr, &format!("{path}?token=guess"), "").await;
        assert_eq!(code, 401, "{path} with a wrong query token");
        // The right token clears the address's failures (more would be throttled: hostile.rs).
        let (code, _) = http_get_with(h.addr, &format!("{path}?token=s3cret"), "").await;
        assert_eq!(code, 200, "{path} with the token");
    }
    let (code, _) = http_get_with(h.addr, "/api/model.safetensors", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(code, 200);
    let (code, body) = http_get_with(h.addr, "/api/record?since=0&token=s3cret", "").await;
    assert_eq!(code, 200, "{body}");
    // What carries no model stays open: the dashboard, status and metrics.
    for path in ["/", "/api/status", "/metrics"] {
        assert_eq!(http_get_with(h.addr, path, "").await.0, 200, "{path}");
    }
    assert_eq!(refused(h.addr, "http_token_missing").await, 4);
    assert_eq!(refused(h.addr, "http_token_invalid").await, 8);
    h.shutdown("done").await.unwrap();
}

/// A CA and a certificate for `localhost` and 127.0.0.1 signed by it, as PEM files in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_refusals_of_wrong_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_ca(dir.path(), "ours");
    let (other_ca, _, _) = make_ca(dir.path(), "theirs");
    let cfg = ServerConfig { tls_cert: Some(cert), tls_key: Some(key), ..Default::default() };
    let h = server(cfg, N).await;
    let wss = format!("wss://localhost:{}/ws", h.addr.port());

    // The right CA: the client verifies the server and trains over wss.
    let mut opts = options(&h, "good");
    opts.url = wss.clone();
    opts.ca = Some(ca.clone());
    let mut g = Connection::connect(&opts).await.expect("client with the right CA connects");
    let mut gseq = 0;
    good_client_trains(&mut g, &mut gseq).await;

    // A CA that did not sign the server's certificate, and the public roots: refused by the
    // client, naming the certificate.
    for (who, ca) in [("another CA", Some(other_ca.clone())), ("public roots", None)] {
        let mut opts = options(&h, "doubter");
        opts.url = wss.clone();
        opts.ca = ca;
        match Connection::connect(&opts).await {
            Err(e @ ClientError::Certificate { .. }) => {
                let text = e.to_string();
                assert!(text.contains("certificate") && text.contains("UnknownIssuer"), "{who}: {text}");
                assert!(text.contains("--ca"), "{who}: says what to do: {text}");
            }
            Err(e) => panic!("{who}: expected a certificate error, got {e}"),
            Ok(_) => panic!("{who}: connected to a server its roots do not vouch for"),
        }
        good_client_trains(&mut g, &mut gseq).await;
    }

    // A plain-text client on the TLS port gets no session, and the server counts the failed
    // handshake.
    let mut opts = options(&h, "plain");
    opts.url = format!("ws://127.0.0.1:{}/ws", h.addr.port());
    opts.timeout = Duration::from_secs(5);
    assert!(Connection::connect(&opts).await.is_err(), "plain ws on a TLS port connected");
    good_client_trains(&mut g, &mut gseq).await;

    // HTTPS serves the same routes.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(&ca).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.expect("https handshake");
    s.write_all(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"model\""), "{text}");

    // Failed handshakes are counted (the doubting clients abort theirs; the plain one sends
    // no ClientHello at all).
    let mut tries = 0;
    let failed = loop {
        let mut s = connector
            .connect(
                tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                TcpStream::connect(h.addr).await.unwrap(),
            )
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("sparsync_handshakes_refused_total{reason=\"tls\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        tries += 1;
        if n >= 3 || tries > 50 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(failed >= 3, "TLS handshake failures counted: {failed}");
    good_client_trains(&mut g, &mut gseq).await;
    h.shutdown("done").await.unwrap();
}

/// A TCP connection from `source` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{source}:0").parse().unwrap())?;
    s.connect(to).await
}

/// Sends a status request on `s` and reads one response head: (status code, text).
async fn ask(s: &mut TcpStream, close: bool) -> (u16, String) {
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!("GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: {conn}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        // A refused connection may be answered and closed before the request is written.
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got += n,
        }
        let text = String::from_utf8_lossy(&buf[..got]);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf[..got]).to_string();
    (text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_connections_in_a_loop_is_refused_and_others_unaffected() {
    let cfg = ServerConfig { max_connections_per_ip: 8, max_clients: 64, ..Default::default() };
    let h = server(cfg, N).await;
    let mut g = connect(&h, "good").await; // from 127.0.0.1
    let mut gseq = 0;

    // The attacker, from 127.0.0.2, opens connections and keeps them: past 8 each is answered
    // 503 with the reason and closed.
    let mut held = Vec::new();
    let mut refusals = 0;
    for i in 0..40 {
        let mut s = connect_from("127.0.0.2", h.addr).await.expect("connect");
        let (code, text) = ask(&mut s, false).await;
        if i < 8 {
            assert_eq!(code, 200, "connection {i}: {text}");
            held.push(s);
        } else {
            assert_eq!(code, 503, "connection {i}: {text}");
            assert!(
                text.contains("too many connections from 127.0.0.2 (max_connections_per_ip 8)"),
                "{text}"
            );
            assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
            refusals += 1;
        }
        if i % 10 == 0 {
            good_client_trains(&mut g, &mut gseq).await;
        }
    }
    assert_eq!(refusals, 32);
    // And in a tight loop of connect-and-drop, hundreds of times.
    for _ in 0..300 {
        if let Ok(s) = connect_from("127.0.0.2", h.addr).await {
            drop(s);
        }
    }
    good_client_trains(&mut g, &mut gseq).await;
    // The good client's address was never limited: a second one joins.
    let mut g2 = connect(&h, "good-2").await;
    let mut g2seq = 100;
    good_client_trains(&mut g2, &mut g2seq).await;
    // Once the attacker lets go, its address is admitted again.
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.2", h.addr).await.unwrap();
        if ask(&mut s, true).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the attacker's address stayed blocked after it closed its connections");
    assert!(refused(h.addr, "too_many_from_address").await >= 32);
    h.shutdown("done").await.unwrap();

    // The global limit answers the same way, naming max_clients.
    let h = server(ServerConfig { max_clients: 2, ..Default::default() }, N).await;
    let mut a = TcpStream::connect(h.addr).await.unwrap();
    let mut b = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(ask(&mut a, false).await.0, 200);
    assert_eq!(ask(&mut b, false).await.0, 200);
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    let (code, text) = ask(&mut c, true).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("too many connections (max_clients 2)"), "{text}");
    drop((a, b));
    h.shutdown("done").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_requests_are_cut_off() {
    let cfg = ServerConfig { handshake_timeout_s: 0.5, ..Default::default() };
    let h = server(cfg, N).await;
    let mut g = connect(&h, "good").await;
    let mut gseq = 0;

    // Headers trickled a byte every 100 ms, more slowly than the timeout allows: the server
    // closes the connection long before the request could finish (it would take 10 s).
    let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut slow = Vec::new();
    for _ in 0..5 {
        slow.push(TcpStream::connect(h.addr).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    let mut closed = [false; 5];
    'outer: for &b in req.iter() {
        for (i, s) in slow.iter_mut().enumerate() {
            if !closed[i] && s.write_all(&[b]).await.is_err() {
                closed[i] = true;
            }
        }
        // A 408 or a close shows as readable.
        for (i, s) in slow.iter_mut().enumerate() {
            let mut buf = [0u8; 512];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
                closed[i] = true;
            }
        }
        if closed.iter().all(|c| *c) {
            break 'outer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    assert!(closed.iter().all(|c| *c), "slow requests were still open after {took:?}");
    assert!(took < Duration::from_secs(8), "slow requests were cut off only after {took:?}");
    good_client_trains(&mut g, &mut gseq).await;
    assert!(refused(h.addr, "header_timeout").await >= 5);

    // An upgraded WebSocket that never says Hello: an Error naming the handshake, then closed.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&h)).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer");
    let text = match msg {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t.to_string(),
        other => panic!("expected an error message, got {other:?}"),
    };
    assert!(
        text.contains("\"handshake\"") && text.contains("no hello within the handshake timeout"),
        "{text}"
    );
    good_client_trains(&mut g, &mut gseq).await;
    assert!(refused(h.addr, "handshake_timeout").await >= 1);
    h.shutdown("done").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rate_and_idle_limits() {
    let cfg = ServerConfig { max_push_rate: 5.0, idle_timeout_s: 1.0, ..Default::default() };
    let h = server(cfg, N).await;

    // 20 pushes at once against 5/s: each is acknowledged or rejected for its rate, none lost.
    let mut c = connect(&h, "eager").await;
    let base = c.version();
    for seq in 1..=20u64 {
        let mut rng = SplitMix64::new(seq);
        let (idx, vals) = random_update(&mut rng, N, 10, 0.01);
        c.send_binary(encode_push(&header(base, seq, idx.len()), &idx, &vals)).await.unwrap();
    }
    let (mut acked, mut rejected) = (Vec::new(), Vec::new());
    while acked.len() + rejected.len() < 20 {
        match c.next_event().await.expect("event") {
            Event::Ack(a) => acked.push(a.seq),
            Event::Reject(r) => {
                assert_eq!(r.field, "rate", "{r:?}");
                assert!(r.reason.contains("max_push_rate 5/s"), "{r:?}");
                rejected.push(r.seq);
            }
            _ => {}
        }
    }
    assert!((5..=7).contains(&acked.len()), "acked {acked:?}, rejected {rejected:?}");
    // After a pause the bucket refills.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idx, vals) = random_update(&mut SplitMix64::new(99), N, 10, 0.01);
    let base = c.version();
    c.push(&header(base, 21, idx.len()), &idx, &vals).await.unwrap();
    wait_ack(&mut c, 21).await;

    // A silent session is closed with an Error naming the idle timeout.
    let mut quiet = connect(&h, "quiet").await;
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        wait_for(&mut quiet, |e| match e {
            Event::Error(e) => Some(e.clone()),
            _ => None,
        }),
    )
    .await
    .expect("idle session closed within 10 s");
    assert_eq!((e.field.as_str(), e.fatal), ("idle", true), "{e:?}");
    h.shutdown("done").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_too_slow_for_its_deltas_gets_a_snapshot_later() {
    // Dense Deltas of 20,000 parameters (~120 kB each) against a 64 kB budget per client.
    const M: usize = 20_000;
    let cfg = ServerConfig {
        max_pending_bytes: 64 * 1024,
        max_batch: 1,
        rho_down: 1.0,
        idle_timeout_s: 120.0,
        ..Default::default()
    };
    let h = server(cfg, M).await;
    // The slow client says Hello and then reads nothing, with a small receive buffer.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(h.addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(url(&h), tcp).await.unwrap();
    let hello = r#"{"type":"hello","protocol":1,"client_id":"slow","kind":"native","model":"test"}"#;
    slow.send(tokio_tungstenite::tungstenite::Message::text(hello)).await.unwrap();

    let mut g = connect(&h, "good").await;
    let mut gseq = 0;
    for _ in 0..120 {
        gseq += 1;
        let mut rng = SplitMix64::new(gseq);
        let (idx, vals) = random_update(&mut rng, M, 200, 0.01);
        let base = g.version();
        g.push(&header(base, gseq, idx.len()), &idx, &vals).await.unwrap();
        wait_ack(&mut g, gseq).await;
    }
    catch_up(&mut g, 120).await;
    // 120 versions × ~120 kB is ~14 MB: far over the budget and the socket buffers. The slow
    // client now reads: it gets what was in flight, then a snapshot of a recent version, and
    // ends up exactly at the server's model.
    let mut replica = sparsync::protocol::replica::Replica::new(M);
    let mut snapshots = 0;
    let mut deltas = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while replica.version() != Some(120) {
        let msg = tokio::time::timeout_at(deadline, slow.next()).await.unwrap_or_else(|_| {
            panic!("not caught up: at {:?}, snapshots {snapshots}, deltas {deltas}", replica.version())
        });
        match msg.expect("open").expect("no error") {
            tokio_tungstenite::tungstenite::Message::Binary(b) => match check_prefix(&b) {
                Ok(FrameKind::Snapshot) => {
                    replica.apply_snapshot_frame(&b).unwrap();
                    snapshots += 1;
                }
                Ok(FrameKind::Delta) => {
                    // Every Delta sent follows what the client has: lagging drops, never skips.
                    replica.apply_delta_frame(&b).expect("a Delta that follows the replica");
                    deltas += 1;
                }
                _ => {}
            },
            _ => continue,
        }
    }
    assert!(
        snapshots >= 2,
        "expected a fresh snapshot after lagging (snapshots {snapshots}, deltas {deltas})"
    );
    assert!(deltas < 120, "the slow reader was sent every Delta ({deltas}): its queue was not bounded");
    assert_eq!(bits(replica.values()), bits(g.replica.values()));
    h.shutdown("done").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_the_log() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let (mut child, addr) = spawn_serve(
        dir.path(),
        &["--engine", "cpu", "--model", "logreg", "--log", "trace", "--token", "Tok-Right-4711"],
    );
    let mut opts = sparsync::client::ClientOptions::new(format!("ws://{addr}/ws"), "c", "logreg");
    for token in ["Tok-Wrong-0815", "Tok-Right-4711"] {
        opts.token = Some(token.into());
        let _ = Connection::connect(&opts).await;
        let _ = http_get_with(addr, &format!("/api/model.safetensors?token={token}"), "").await;
        let _ = http_get_with(addr, "/api/replica", &format!("Authorization: Bearer {token}\r\n")).await;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("refused"), "the log shows the refusal:\n{text}");
    assert!(!text.contains("Tok-"), "a token reached the log:\n{text}");
}
