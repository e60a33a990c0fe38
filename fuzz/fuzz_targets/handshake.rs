//! Any text as the first WebSocket message of a session (the Hello), and as a later control
//! message: parsing never panics, a refusal names its field, an accepted Hello satisfies what
//! the server relies on (protocol version, client id alphabet and length, the served model) and
//! survives a round trip through its JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparsync::protocol::PROTOCOL_VERSION;
use sparsync::protocol::message::{ClientMessage, MAX_CLIENT_ID_LEN, parse_hello};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_hello(text, "mlp") {
        Ok(h) => {
            assert_eq!(h.protocol, PROTOCOL_VERSION as u32);
            assert_eq!(h.model, "mlp");
            assert!(!h.client_id.is_empty() && h.client_id.len() <= MAX_CLIENT_ID_LEN);
            assert!(h.client_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            let json = serde_json::to_string(&ClientMessage::Hello(h.clone())).expect("a Hello serializes");
            assert_eq!(parse_hello(&json, "mlp").expect("a re-encoded Hello parses"), h);
        }
        Err(e) => assert!(!e.field().is_empty() && !e.to_string().is_empty()),
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
