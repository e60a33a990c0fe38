//! Every kind of bad input gets its own Error or Reject naming the field; the server stays up,
//! the other client keeps training, and the model is unchanged.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use half::f16;
use sparsync::client::{ClientError, Connection, Event};
use sparsync::config::{ServerConfig, Tokens};
use sparsync::engine::OptimizerSettings;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::protocol::frame::{PushHeader, encode_push};
use sparsync::protocol::message::{ErrorMessage, ServerMessage};
use sparsync::protocol::model::SplitMix64;
use sparsync::server::ServerHandle;
use tokio_tungstenite::tungstenite::Message;

const N: usize = 1000;

fn cfg() -> ServerConfig {
    ServerConfig { max_staleness: 2, max_frame_bytes: 64 * 1024, ..Default::default() }
}

async fn server(cfg: ServerConfig) -> ServerHandle {
    start(cfg, N, Box::new(CpuAggregator::new(init(N, 3), OptimizerSettings::default()))).await
}

/// What the victim must get back.
enum Expect {
    Reject { field: &'static str, text: &'static str },
    Error { field: &'static str, text: &'static str },
}

fn good_push(base: u64, seq: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seq);
    let (idx, vals) = random_update(&mut rng, N, 20, 0.1);
    encode_push(&header(base, seq, idx.len()), &idx, &vals)
}

/// The other client pushes and gets its Ack and the Delta that carries it.
async fn other_keeps_training(g: &mut Connection, seq: &mut u64) {
    *seq += 1;
    let base = g.version();
    g.send_binary(good_push(base, *seq)).await.unwrap();
    let ack = wait_ack(g, *seq).await;
    catch_up(g, ack.version + 1).await;
}

/// Sends `frame` from the victim and checks the answer, the model, and the other client.
async fn case(
    h: &ServerHandle,
    v: &mut Connection,
    g: &mut Connection,
    gseq: &mut u64,
    frame: Vec<u8>,
    expect: Expect,
) {
    let before = h.state().await.unwrap();
    v.send_binary(frame).await.unwrap();
    let got = wait_for(v, |e| match e {
        Event::Reject(r) => Some(("reject", r.field.clone(), r.reason.clone())),
        Event::Error(e) => Some(("error", e.field.clone(), e.message.clone())),
        _ => None,
    })
    .await;
    let (kind, field, text) = match expect {
        Expect::Reject { field, text } => ("reject", field, text),
        Expect::Error { field, text } => ("error", field, text),
    };
    assert_eq!((got.0, got.1.as_str()), (kind, field), "answer: {got:?}");
    assert!(got.2.contains(text), "{:?} should mention {text:?}", got.2);
    let after = h.state().await.unwrap();
    assert_eq!(bits(&before.x), bits(&after.x), "model changed after bad input {field}");
    assert_eq!(before.version, after.version);
    other_keeps_training(g, gseq).await;
}

fn push_bytes(base: u64, seq: u64, idx: &[u32], vals: &[f32]) -> Vec<u8> {
    let vals: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    encode_push(
        &PushHeader { base_version: base, seq, samples: 8, local_steps: 1, loss: 0.5, nnz: idx.len() as u32 },
        idx,
        &vals,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_push_is_refused_by_field() {
    let h = server(cfg()).await;
    let mut v = connect(&h, "victim").await;
    let mut g = connect(&h, "good").await;
    let mut gseq = 0;
    // Move the server to version 4 so that a base of 0 is too stale (max_staleness 2).
    for _ in 0..4 {
        other_keeps_training(&mut g, &mut gseq).await;
    }
    catch_up(&mut v, 4).await;
    let good = good_push(4, 1);

    let mut f = good.clone();
    f.truncate(20);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Error { field: "length", text: "shorter" }).await;

    let mut f = good.clone();
    f[0..4].copy_from_slice(b"XXXX");
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Error { field: "magic", text: "magic" }).await;

    let mut f = good.clone();
    f[4..6].copy_from_slice(&7u16.to_le_bytes());
    case(
        &h,
        &mut v,
        &mut g,
        &mut gseq,
        f,
        Expect::Error { field: "protocol_version", text: "frame says 7, this side speaks 1" },
    )
    .await;

    let mut f = good.clone();
    f[36..40].copy_from_slice(&21u32.to_le_bytes()); // nnz 21, arrays of 20
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "nnz", text: "nnz 21" }).await;

    let f = push_bytes(4, 2, &[5, N as u32], &[0.1, 0.1]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "indices", text: "out of range" }).await;

    let f = push_bytes(4, 3, &[5, 9, 9], &[0.1, 0.1, 0.1]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "indices", text: "duplicate" }).await;

    let f = push_bytes(4, 4, &[5, 9], &[0.1, f32::NAN]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "values", text: "not finite" }).await;

    let f = push_bytes(4, 5, &[5, 9], &[f32::INFINITY, 0.1]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "values", text: "not finite" }).await;

    let f = push_bytes(1000, 6, &[5], &[0.1]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "base_version", text: "in the future" })
        .await;

    let f = push_bytes(0, 7, &[5], &[0.1]);
    case(
        &h,
        &mut v,
        &mut g,
        &mut gseq,
        f,
        Expect::Reject { field: "base_version", text: "exceeds max_staleness 2" },
    )
    .await;

    // The victim's own good push is still accepted after all of that.
    let base = v.version();
    v.send_binary(push_bytes(base, 8, &[1, 2], &[0.5, 0.5])).await.unwrap();
    wait_ack(&mut v, 8).await;
    // A replayed sequence number is refused.
    let f = push_bytes(v.version(), 8, &[1], &[0.5]);
    case(&h, &mut v, &mut g, &mut gseq, f, Expect::Reject { field: "seq", text: "duplicate or replay" })
        .await;

    // Oversized frame: refused before it is read, and the session ends.
    let before = h.state().await.unwrap();
    v.send_binary(vec![0u8; 100 * 1024]).await.unwrap();
    let e = wait_for(&mut v, |e| match e {
        Event::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(e.field, "frame");
    assert!(e.message.contains("exceeds max_frame_bytes 65536") && e.fatal, "{e:?}");
    assert_eq!(bits(&before.x), bits(&h.state().await.unwrap().x));
    other_keeps_training(&mut g, &mut gseq).await;

    // Malformed control message: an Error, the session continues.
    let mut v = connect(&h, "victim").await;
    v.send_text("{not json".into()).await.unwrap();
    let e = wait_for(&mut v, |e| match e {
        Event::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!((e.field.as_str(), e.fatal), ("json", false));
    other_keeps_training(&mut g, &mut gseq).await;
    h.shutdown("done").await.unwrap();
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(h: &ServerHandle) -> RawWs {
    tokio_tungstenite::connect_async(url(h)).await.unwrap().0
}

async fn expect_error(ws: &mut RawWs) -> ErrorMessage {
    match ws.next().await.expect("a message").expect("no error") {
        Message::Text(t) => match serde_json::from_str::<ServerMessage>(t.as_str()).unwrap() {
            ServerMessage::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        },
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused_by_field() {
    let mut c = cfg();
    c.token = Tokens(vec!["s3cret".into()]);
    let h = server(c).await;
    let mut opts = options(&h, "good");
    opts.token = Some("s3cret".into());
    let mut g = Connection::connect(&opts).await.unwrap();
    let mut gseq = 0;

    // Binary frame before the handshake.
    let mut ws = raw(&h).await;
    ws.send(Message::binary(good_push(0, 1))).await.unwrap();
    let e = expect_error(&mut ws).await;
    assert_eq!((e.field.as_str(), e.fatal), ("handshake", true));
    assert!(e.message.contains("binary frame before handshake"));
    other_keeps_training(&mut g, &mut gseq).await;

    // Protocol version mismatch names both versions.
    let mut ws = raw(&h).await;
    let hello =
        r#"{"type":"hello","protocol":9,"client_id":"x","token":"s3cret","kind":"native","model":"test"}"#;
    ws.send(Message::text(hello)).await.unwrap();
    let e = expect_error(&mut ws).await;
    assert_eq!(e.field, "protocol");
    assert_eq!(e.message, "protocol version mismatch: client speaks 9, server speaks 1");
    other_keeps_training(&mut g, &mut gseq).await;

    // Wrong and missing tokens.
    for token in [Some("wrong"), None] {
        let mut opts = options(&h, "intruder");
        opts.token = token.map(String::from);
        match Connection::connect(&opts).await {
            Err(ClientError::Refused { field, .. }) => assert_eq!(field, "token"),
            Err(e) => panic!("expected a token refusal, got {e}"),
            Ok(_) => panic!("a client without a valid token joined"),
        }
        other_keeps_training(&mut g, &mut gseq).await;
    }

    // Wrong model name.
    let mut opts = options(&h, "m");
    opts.token = Some("s3cret".into());
    opts.model = "resnet".into();
    match Connection::connect(&opts).await {
        Err(ClientError::Refused { field, message }) => {
            assert_eq!(field, "model");
            assert!(message.contains("\"resnet\""), "{message}");
        }
        other => panic!("expected a model refusal, got {:?}", other.err()),
    }
    other_keeps_training(&mut g, &mut gseq).await;
    h.shutdown("done").await.unwrap();
}
