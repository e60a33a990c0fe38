//! Hostile clients (issue "Hostile clients and crashes"): each test is one attack that
//! succeeded against an earlier server, with an honest client served alongside.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use sparsync::client::{Connection, Event};
use sparsync::config::ServerConfig;
use sparsync::engine::OptimizerSettings;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::protocol::message::{ClientKind, ClientMessage, EvalReport, Hello, Role, ServerMessage};
use sparsync::protocol::model::SplitMix64;
use sparsync::server::ServerHandle;
use tokio_tungstenite::tungstenite::Message;

const N: usize = 1000;

async fn server(cfg: ServerConfig) -> ServerHandle {
    start(cfg, N, Box::new(CpuAggregator::new(init(N, 3), OptimizerSettings::default()))).await
}

/// One push from the honest client, acknowledged: the server still serves it.
async fn honest_push(g: &mut Connection, seq: &mut u64) {
    *seq += 1;
    let (idx, vals) = random_update(&mut SplitMix64::new(*seq), N, 10, 0.01);
    let base = g.version();
    g.push(&header(base, *seq, idx.len()), &idx, &vals).await.expect("honest push sent");
    wait_ack(g, *seq).await;
}

fn hello(id: &str, role: Role, device: Option<String>) -> String {
    serde_json::to_string(&ClientMessage::Hello(Hello {
        protocol: sparsync::protocol::PROTOCOL_VERSION as u32,
        client_id: id.into(),
        token: None,
        kind: ClientKind::Native,
        model: "test".into(),
        role,
        device,
        resume_secret: None,
    }))
    .unwrap()
}

/// `sparsync_updates_rejected_total{reason="…"}` (0 when absent).
async fn rejected(h: &ServerHandle, reason: &str) -> u64 {
    let (_, text) = http_get(h.addr, "/metrics").await;
    let key = format!("sparsync_updates_rejected_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Waits for an Error about an evaluation.
async fn eval_refused(c: &mut Connection) -> sparsync::protocol::message::ErrorMessage {
    let fut = wait_for(c, |e| match e {
        Event::Error(e) if e.field == "eval" => Some(e.clone()),
        _ => None,
    });
    tokio::time::timeout(Duration::from_secs(10), fut).await.expect("an eval error")
}

async fn status(h: &ServerHandle) -> serde_json::Value {
    serde_json::from_str(&http_get(h.addr, "/api/status").await.1).unwrap()
}

/// A joined client that sends tiny bad frames and never reads the Errors they earn: its
/// replies stay within the session's byte budget, then the session is closed. (It grew to
/// 845 MB queued for one session before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_a_client_never_reads_stay_bounded_and_end_its_session() {
    let budget = 64 * 1024;
    let h = server(ServerConfig { max_pending_bytes: budget, ..Default::default() }).await;
    let mut good = connect(&h, "honest").await;
    let mut seq = 0;
    honest_push(&mut good, &mut seq).await;

    // A small receive buffer, so that the server's socket fills early.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(h.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url(&h), stream).await.unwrap();
    ws.send(Message::text(hello("flood", Role::Trainer, None))).await.unwrap();
    while !status(&h).await["clients"].as_array().unwrap().iter().any(|c| c["client_id"] == "flood") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    let mut max_queued = 0u64;
    let ended = loop {
        let r = tokio::time::timeout(Duration::from_secs(2), ws.send(Message::text("x"))).await;
        if !matches!(r, Ok(Ok(()))) {
            break true; // The server closed the connection (or stopped reading it).
        }
        sent += 1;
        if sent.is_multiple_of(1000) {
            let s = status(&h).await;
            let flood = s["clients"].as_array().unwrap().iter().find(|c| c["client_id"] == "flood").cloned();
            match flood {
                Some(c) => max_queued = max_queued.max(c["queued_bytes"].as_u64().unwrap()),
                None => break true,
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    eprintln!("flood: {sent} frames, max queued {max_queued} bytes");
    assert!(ended, "the flooding session was still open after {sent} frames in 30 s");
    assert!(
        max_queued <= budget as u64 + 4096,
        "queued {max_queued} bytes for one session (budget {budget})"
    );
    // The session is gone, counted, and the honest client is still served.
    for _ in 0..100 {
        if !status(&h).await["clients"].as_array().unwrap().iter().any(|c| c["client_id"] == "flood") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!status(&h).await["clients"].as_array().unwrap().iter().any(|c| c["client_id"] == "flood"));
    assert_eq!(rejected(&h, "unread_replies").await, 1);
    honest_push(&mut good, &mut seq).await;
    h.shutdown("done").await.unwrap();
}

/// What a client sends back to itself is clipped: a 1 MB unknown message type is not echoed
/// in full, a 64 MiB device description is refused by name, a 10 MB bye reason is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_strings_are_bounded() {
    let h = server(ServerConfig::default()).await;
    let mut good = connect(&h, "honest").await;
    let mut seq = 0;

    // A long unknown type: the Error quotes at most a few hundred bytes of it.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&h)).await.unwrap();
    ws.send(Message::text(hello("echo", Role::Trainer, None))).await.unwrap();
    let big = format!(r#"{{"type":"{}"}}"#, "y".repeat(60_000));
    ws.send(Message::text(big)).await.unwrap();
    let err = loop {
        match ws.next().await.expect("a message").expect("no error") {
            Message::Text(t) => {
                if let Ok(ServerMessage::Error(e)) = serde_json::from_str::<ServerMessage>(t.as_str()) {
                    break e;
                }
            }
            _ => continue,
        }
    };
    assert_eq!(err.field, "json");
    assert!(err.message.len() <= 300, "echoed {} bytes", err.message.len());
    // Longer than any control message may be: refused by size, not parsed.
    ws.send(Message::text(format!(r#"{{"type":"bye","reason":"{}"}}"#, "z".repeat(70_000)))).await.unwrap();
    // A long bye reason (within the control limit) ends the session; the server keeps a
    // clipped reason.
    ws.send(Message::text(format!(r#"{{"type":"bye","reason":"{}"}}"#, "z".repeat(60_000)))).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while ws.next().await.is_some() {} }).await;

    // A Hello of 1 MB is refused by its size (the frame limit follows the model): an Error
    // naming the frame when it arrives before the server drops the connection, and never a
    // session.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&h)).await.unwrap();
    let _ = ws.send(Message::text(hello("big-device", Role::Trainer, Some("d".repeat(1 << 20))))).await;
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        match serde_json::from_str::<ServerMessage>(t.as_str()).unwrap() {
            ServerMessage::Error(e) => assert_eq!((e.field.as_str(), e.fatal), ("frame", true), "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(!status(&h).await["clients"].as_array().unwrap().iter().any(|c| c["client_id"] == "big-device"));
    // A device description longer than 256 bytes is refused, naming the field.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&h)).await.unwrap();
    ws.send(Message::text(hello("long-device", Role::Trainer, Some("d".repeat(300))))).await.unwrap();
    let refusal = loop {
        match ws.next().await.expect("a message").expect("no error") {
            Message::Text(t) => match serde_json::from_str::<ServerMessage>(t.as_str()).unwrap() {
                ServerMessage::Error(e) => break e,
                other => panic!("expected a refusal, got {other:?}"),
            },
            _ => continue,
        }
    };
    assert_eq!((refusal.field.as_str(), refusal.fatal), ("device", true), "{refusal:?}");
    assert!(refusal.message.contains("at most 256"), "{refusal:?}");

    // The record keeps the clipped bye reason.
    let (_, record) = http_get(h.addr, "/api/record").await;
    let longest = record.split('"').map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "the record holds a string of {longest} bytes");
    honest_push(&mut good, &mut seq).await;
    h.shutdown("done").await.unwrap();
}

/// Only evaluators report evaluations, and only with an accuracy in [0, 1] and a finite,
/// non-negative loss. (A trainer's accuracy 1e308 and loss −5 were shown in /api/status.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_come_from_evaluators_within_range() {
    let h = server(ServerConfig::default()).await;
    let mut trainer = connect(&h, "trainer").await;
    let mut eo = options(&h, "evaluator");
    eo.role = Role::Evaluator;
    let mut evaluator = Connection::connect(&eo).await.unwrap();
    let report = |accuracy: f64, loss: f64| {
        ClientMessage::Eval(EvalReport { version: 0, accuracy, loss, samples: 10 })
    };
    trainer.send(&report(1e308, -5.0)).await.unwrap();
    let e = eval_refused(&mut trainer).await;
    assert!(e.message.contains("evaluator") && !e.fatal, "{e:?}");
    evaluator.send(&report(1.5, 0.3)).await.unwrap();
    assert!(eval_refused(&mut evaluator).await.message.contains("[0, 1]"));
    evaluator.send(&report(0.5, -1.0)).await.unwrap();
    assert!(eval_refused(&mut evaluator).await.message.contains("loss"));
    evaluator.send(&report(0.75, 0.5)).await.unwrap();
    let mut shown = serde_json::Value::Null;
    for _ in 0..100 {
        shown = status(&h).await["evals"].clone();
        if shown.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let evals = shown.as_array().expect("evals");
    assert_eq!(evals.len(), 1, "only the valid report is kept: {evals:?}");
    assert_eq!(evals[0]["accuracy"], 0.75);
    assert_eq!(rejected(&h, "eval").await, 3);
    h.shutdown("done").await.unwrap();
}

/// A client id belongs to whoever holds it: with a shared token (or none) a second Hello with a
/// live id is refused and the first session keeps working; the same client reconnecting with
/// its Welcome's resume secret replaces its own session; with per-client tokens the id's own
/// token proves it and a join token does not open it. A seq far beyond the last one is
/// refused, so nobody can lock a client out with seq = u64::MAX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_client_id_cannot_be_taken_over() {
    let h = server(ServerConfig::default()).await;
    let mut victim = connect(&h, "victim").await;
    let mut seq = 0;
    honest_push(&mut victim, &mut seq).await;
    let err = Connection::connect(&options(&h, "victim")).await.err().expect("takeover refused");
    assert!(
        matches!(&err, sparsync::client::ClientError::Refused { field, .. } if field == "client_id"),
        "{err}"
    );
    honest_push(&mut victim, &mut seq).await;

    // A seq that jumps far ahead is refused; the victim's next seq still works.
    let (idx, vals) = random_update(&mut SplitMix64::new(7), N, 10, 0.01);
    let base = victim.version();
    victim.push(&header(base, u64::MAX, idx.len()), &idx, &vals).await.unwrap();
    let r = wait_for(&mut victim, |e| match e {
        Event::Reject(r) if r.seq == u64::MAX => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(r.field, "seq_gap", "{r:?}");
    honest_push(&mut victim, &mut seq).await;

    // The same client, reconnecting with its secret, replaces its own session.
    let mut again = options(&h, "victim");
    again.resume_secret = Some(victim.welcome.resume_secret.clone());
    assert_eq!(victim.welcome.resume_secret.len(), 32);
    let mut victim2 = Connection::connect(&again).await.expect("resumed with the secret");
    assert_eq!(victim2.welcome.resume_secret, victim.welcome.resume_secret);
    honest_push(&mut victim2, &mut seq).await;
    h.shutdown("done").await.unwrap();

    // Per-client tokens: only the id's own token opens it, and it may replace a live session.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "shared-join\nalice alice-own\n").unwrap();
    let h = server(ServerConfig { token_file: Some(file), ..Default::default() }).await;
    let mut o = options(&h, "alice");
    o.token = Some("shared-join".into());
    let err = Connection::connect(&o).await.err().expect("a join token does not open a bound id");
    assert!(
        matches!(&err, sparsync::client::ClientError::Refused { field, .. } if field == "token"),
        "{err}"
    );
    o.token = Some("alice-own".into());
    let _alice = Connection::connect(&o).await.expect("alice's own token");
    let mut alice2 = Connection::connect(&o).await.expect("alice's own token proves the id");
    let mut s2 = 100;
    honest_push(&mut alice2, &mut s2).await;
    h.shutdown("done").await.unwrap();
}

/// A push claiming u32::MAX samples is clipped to max_samples (default 65,536), so under
/// FedBuff it cannot take nearly all the weight of its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_claims_are_clipped() {
    let cfg = ServerConfig { max_samples: 1000, ..Default::default() };
    let h = server(cfg).await;
    let mut c = connect(&h, "greedy").await;
    let (idx, vals) = random_update(&mut SplitMix64::new(1), N, 10, 0.01);
    let mut hd = header(c.version(), 1, idx.len());
    hd.samples = u32::MAX;
    c.push(&hd, &idx, &vals).await.unwrap();
    wait_ack(&mut c, 1).await;
    let (_, record) = http_get(h.addr, "/api/record").await;
    let v: serde_json::Value = serde_json::from_str(&record).unwrap();
    let accept = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "accept")
        .cloned()
        .expect("an accept event");
    assert_eq!(accept["samples"], 1000, "{accept}");
    assert_eq!(rejected(&h, "samples_clipped").await, 1);
    h.shutdown("done").await.unwrap();
}

/// Wrong tokens are throttled per address with growing waits, over WebSocket and HTTP; while an
/// address waits even a right token from it is not checked; other addresses are unaffected;
/// the refusals are counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tokens_are_throttled_per_address() {
    let h =
        server(ServerConfig { token: sparsync::config::Tokens(vec!["s3cret".into()]), ..Default::default() })
            .await;
    let mut o = options(&h, "guesser");
    let mut fields = Vec::new();
    for i in 0..6 {
        o.token = Some(format!("guess-{i}"));
        match Connection::connect(&o).await {
            Err(sparsync::client::ClientError::Refused { message, .. }) => fields.push(message),
            other => panic!("guess {i}: {:?}", other.map(|_| ())),
        }
    }
    assert!(fields[..4].iter().all(|m| m.contains("invalid token")), "{fields:?}");
    assert!(fields[4..].iter().all(|m| m.contains("too many failed tokens")), "{fields:?}");
    o.token = Some("s3cret".into());
    let e = Connection::connect(&o).await.err().expect("a waiting address is not checked");
    assert!(e.to_string().contains("too many failed tokens"), "{e}");
    let (_, metrics) = http_get(h.addr, "/metrics").await;
    assert!(metrics.contains(r#"sparsync_handshakes_refused_total{reason="auth_throttled"} 3"#), "{metrics}");

    // HTTP from another address: its own count; a lowercase scheme is accepted.
    let ask = |auth: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = sock.connect(h.addr).await.unwrap();
        let req = format!(
            "GET /api/model.safetensors HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
    };
    assert_eq!(ask("bearer s3cret").await, 200, "a lowercase scheme works");
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(ask("Bearer wrong").await);
    }
    assert_eq!(codes, [401, 401, 401, 401, 429], "three free failures, then a wait after the fourth");
    assert_eq!(ask("Bearer s3cret").await, 429, "the address waits, whatever it sends");
    h.shutdown("done").await.unwrap();
}

/// By default one address cannot take every slot: its 65th connection is refused (503 naming
/// max_connections_per_ip) while clients from other addresses join and /api/status answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_slot_by_default() {
    let h = server(ServerConfig::default()).await;
    let from = |i: usize| {
        let h = h.addr;
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
            let stream = sock.connect(h).await.unwrap();
            let r = tokio_tungstenite::client_async(format!("ws://{h}/ws"), stream).await;
            r.map(|(mut ws, _)| {
                let id = format!("silent-{i}");
                async move {
                    ws.send(Message::text(hello(&id, Role::Trainer, None))).await.unwrap();
                    ws
                }
            })
        }
    };
    let mut held = Vec::new();
    for i in 0..64 {
        let ws = from(i).await.unwrap_or_else(|e| panic!("connection {i} refused: {e}")).await;
        held.push(ws);
    }
    let refused = from(64).await.err().expect("the 65th connection from one address is refused");
    let text = match refused {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            assert_eq!(r.status(), 503);
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).to_string()
        }
        e => panic!("expected a 503, got {e}"),
    };
    assert!(text.contains("max_connections_per_ip 64"), "{text}");
    let mut honest = connect(&h, "honest").await;
    let mut seq = 0;
    honest_push(&mut honest, &mut seq).await;
    let (code, _) = http_get(h.addr, "/api/status").await;
    assert_eq!(code, 200);
    drop(held);
    h.shutdown("done").await.unwrap();
}

/// An upgrade request whose Sec-WebSocket-Key is not 16 bytes in base64 (here: empty) gets 400,
/// not 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_websocket_key_is_refused() {
    let h = server(ServerConfig::default()).await;
    for key in ["", "c2hvcnQ="] {
        let extra = format!(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        );
        let (code, body) = http_get_with(h.addr, "/ws", &extra).await;
        assert_eq!(code, 400, "key {key:?}: {body}");
    }
    h.shutdown("done").await.unwrap();
}

/// A self-signed certificate made the usual way (`openssl req -x509`, which marks it as a CA)
/// served as the server's own: the client fails at once with a certificate error that says
/// what to do, instead of retrying as though the server were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_served_as_the_servers_own_fails_at_once_with_advice() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let h = server(ServerConfig {
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path),
        ..Default::default()
    })
    .await;
    let mut o = options(&h, "tls");
    o.url = format!("wss://localhost:{}/ws", h.addr.port());
    o.ca = Some(cert_path);
    match Connection::connect(&o).await {
        Err(e @ sparsync::client::ClientError::Certificate { .. }) => {
            let text = e.to_string();
            assert!(text.contains("CaUsedAsEndEntity") && text.contains("openssl req -x509"), "{text}");
        }
        Err(e) => panic!("expected a certificate error, got {e}"),
        Ok(_) => panic!("connected"),
    }
    h.shutdown("done").await.unwrap();
}

/// The frame limit follows the model (a full-density Push plus 64 KiB, not 64 MiB), a frame
/// declared larger is refused at once, and a message begun but not completed is cut off after
/// frame_timeout_s although the idle timeout is much longer. (Twelve sessions holding 60 MiB
/// half-frames kept 720 MB until the 300 s idle timeout before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_oversized_frames_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let h = server(ServerConfig { frame_timeout_s: 1.0, ..Default::default() }).await;
    let limit = 40 + 6 * N + 64 * 1024;
    assert_eq!(status(&h).await["settings"]["max_frame_bytes"], limit as u64);
    let mut good = connect(&h, "honest").await;
    let mut seq = 0;

    // A masked binary frame header declaring `len` bytes, then `send` of them.
    let frame_head = |len: u64| {
        let mut v = vec![0x82u8];
        if len < 65_536 {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&len.to_be_bytes());
        }
        v.extend_from_slice(&[1, 2, 3, 4]);
        v
    };
    let joined = |id: &'static str| {
        let h = &h;
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url(h)).await.unwrap();
            ws.send(Message::text(hello(id, Role::Trainer, None))).await.unwrap();
            // Welcome, snapshot, directive.
            for _ in 0..3 {
                ws.next().await.unwrap().unwrap();
            }
            ws
        }
    };
    // The Error the server sends, and the close code that follows it.
    let error_of = |mut ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >| async move {
        let mut error = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an answer within 10 s")
            {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ServerMessage::Error(e)) = serde_json::from_str::<ServerMessage>(t.as_str()) {
                        error = Some(e);
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    return (error.expect("an error before the close"), f.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                other => panic!("closed without a close frame: {other:?} (error {error:?})"),
            }
        }
    };

    // Declared larger than the limit: refused at once.
    let mut ws = joined("too-big").await;
    let raw = ws.get_mut();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = raw else { panic!("plain TCP") };
    tcp.write_all(&frame_head(60 << 20)).await.unwrap();
    let (e, code) = error_of(ws).await;
    assert_eq!((e.field.as_str(), e.fatal), ("frame", true), "{e:?}");
    assert!(e.message.contains(&format!("exceeds max_frame_bytes {limit}")), "{e:?}");
    assert_eq!(code, Some(1009), "closed as too big");

    // Within the limit, but half sent and then silent: cut off after about a second.
    let mut ws = joined("half").await;
    let raw = ws.get_mut();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = raw else { panic!("plain TCP") };
    tcp.write_all(&frame_head(5000)).await.unwrap();
    tcp.write_all(&[0u8; 2500]).await.unwrap();
    let t0 = std::time::Instant::now();
    let (e, code) = error_of(ws).await;
    assert_eq!((e.field.as_str(), e.fatal), ("frame", true), "{e:?}");
    assert!(e.message.contains("not completed"), "{e:?}");
    assert_eq!(code, Some(1008), "closed as a policy violation");
    assert!(t0.elapsed() < Duration::from_secs(5), "cut off after {:?}", t0.elapsed());
    assert_eq!(rejected(&h, "frame_timeout").await, 1);

    // A fragmented message whose first fragment arrived, with Pings every 300 ms after it: the
    // Pings neither complete the message nor keep it alive.
    let mut ws = joined("pinger").await;
    let raw = ws.get_mut();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = raw else { panic!("plain TCP") };
    let mut first = frame_head(100);
    first[0] = 0x02; // binary, FIN not set
    first.extend_from_slice(&[0u8; 100]);
    tcp.write_all(&first).await.unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A masked Ping without payload.
        if tcp.write_all(&[0x89, 0x80, 1, 2, 3, 4]).await.is_err() {
            break;
        }
    }
    let (e, code) = error_of(ws).await;
    assert!(e.message.contains("not completed") && code == Some(1008), "{e:?} {code:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "cut off after {:?}", t0.elapsed());
    assert_eq!(rejected(&h, "frame_timeout").await, 2);
    honest_push(&mut good, &mut seq).await;
    h.shutdown("done").await.unwrap();
}

/// `/api/record` comes in pages (default 10,000 events, `limit` up to 100,000) read from the
/// shared record, not through the coordinator: following `next` until it equals `end` gives
/// every event once, in order, and the coordinator keeps serving meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_read_in_pages() {
    let h = server(ServerConfig::default()).await;
    let mut c = connect(&h, "pusher").await;
    let mut seq = 0;
    for _ in 0..10 {
        honest_push(&mut c, &mut seq).await;
    }
    let (_, all) = h.record(0).await.unwrap();
    assert!(all.len() >= 20, "{} events", all.len());
    let mut got = Vec::new();
    let mut since = 0;
    let mut pages = 0;
    loop {
        let (code, body) = http_get(h.addr, &format!("/api/record?since={since}&limit=3")).await;
        assert_eq!(code, 200);
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 3);
        got.extend(events.iter().map(|e| e["event"].as_str().unwrap().to_string()));
        since = page["next"].as_u64().unwrap() as usize;
        pages += 1;
        // A page read in the middle of the pushes: the coordinator still answers.
        if pages == 2 {
            honest_push(&mut c, &mut seq).await;
        }
        if page["next"] == page["end"] {
            break;
        }
    }
    let (_, all) = h.record(0).await.unwrap();
    let names: Vec<String> =
        all.iter().map(|e| serde_json::to_value(e).unwrap()["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, names, "every event once, in order");
    assert!(pages >= all.len() / 3);
    let (_, body) = http_get(h.addr, "/api/record?since=0&limit=0").await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "a limit of 0 still makes progress");
    h.shutdown("done").await.unwrap();
}
