//! Any text as the first WebSocket message of a session (the Hello), and as a later control
//! message: parsing never panics, a refusal names its field, an accepted Hello satisfies what
//! the server relies on (protocol version, client id alphabet and length, the served model, the
//! length limits of device, token and resume secret) and survives a round trip through its
//! JSON; an error's message is clipped, whatever it quotes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparsync::protocol::PROTOCOL_VERSION;
use sparsync::protocol::message::{
    ClientMessage, MAX_CLIENT_ID_LEN, MAX_DEVICE_LEN, MAX_ECHO_LEN, MAX_TOKEN_LEN, ServerMessage, parse_hello,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_hello(text, "mlp") {
        Ok(h) => {
            assert_eq!(h.protocol, PROTOCOL_VERSION as u32);
            assert_eq!(h.model, "mlp");
            assert!(!h.client_id.is_empty() && h.client_id.len() <= MAX_CLIENT_ID_LEN);
            assert!(h.client_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            assert!(h.device.as_ref().is_none_or(|d| d.len() <= MAX_DEVICE_LEN));
            assert!(h.token.as_ref().is_none_or(|t| t.len() <= MAX_TOKEN_LEN));
            assert!(h.resume_secret.as_ref().is_none_or(|s| s.len() <= 128));
            let json = serde_json::to_string(&ClientMessage::Hello(h.clone())).expect("a Hello serializes");
            assert_eq!(parse_hello(&json, "mlp").expect("a re-encoded Hello parses"), h);
        }
        Err(e) => {
            assert!(!e.field().is_empty() && !e.to_string().is_empty());
            // What the server sends back quotes at most a clipped part of the input.
            if let ServerMessage::Error(m) = ServerMessage::error(e.field(), e.to_string(), true) {
                assert!(m.message.len() <= MAX_ECHO_LEN + 32, "{} bytes", m.message.len());
            }
        }
    }
    // After the handshake the same bytes may arrive as any control message.
    if let Ok(m) = serde_json::from_str::<ClientMessage>(text) {
        let json = serde_json::to_string(&m).expect("a message serializes");
        let back: ClientMessage = serde_json::from_str(&json).expect("a re-encoded message parses");
        // Floats that are not finite do not survive JSON; everything else does.
        if !json.contains("null") {
            assert_eq!(back, m);
        }
    }
});
