//! What one SSE event means to the runtime: a message to deliver, a keep-alive to skip, or
//! malformed data to count. Pure, so every shape servers send is pinned by a table.

use serde_json::Value;

use crate::core::message::{ConduitMessage, from_sse_payload};

/// Why an event is skipped without being an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The `connected` event a server sends when the stream opens.
    Connected,
    /// A keep-alive: an event named `heartbeat`/`ping`, or data typed so.
    Heartbeat,
    /// An event with no data worth parsing (`data:` with nothing after it).
    Empty,
    /// A named event this runtime does not know; deliveries come as `message`.
    OtherEvent,
    /// A message this agent sent itself.
    Own,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Deliver(ConduitMessage),
    Skip(Skip),
    /// Data that is not JSON, or JSON that is not a message; the text says which.
    Malformed(String),
}

/// Classifies an event of type `event_type` carrying `data`, received by `agent_id`.
/// `event_id` is the frame's `id:` line (the real server sets it to the message id).
pub fn classify(event_type: &str, data: &str, event_id: Option<&str>, agent_id: &str) -> Frame {
    match event_type {
        "message" | "" => {}
        "connected" => return Frame::Skip(Skip::Connected),
        "heartbeat" | "ping" => return Frame::Skip(Skip::Heartbeat),
        _ => return Frame::Skip(Skip::OtherEvent),
    }
    if data.trim().is_empty() {
        return Frame::Skip(Skip::Empty);
    }
    // The server marked a pushed message delivered: a frame with a broken character (a lone
    // surrogate escape from a JS server) is repaired like a polled row, not dropped.
    let payload: Value = match serde_json::from_str(data)
        .or_else(|_| serde_json::from_str(&crate::core::rows::repair(data.as_bytes())))
    {
        Ok(payload) => payload,
        Err(e) => return Frame::Malformed(format!("data is not JSON: {e}")),
    };
    match payload.get("type").and_then(Value::as_str) {
        Some("heartbeat" | "ping") => return Frame::Skip(Skip::Heartbeat),
        Some("connected") => return Frame::Skip(Skip::Connected),
        _ => {}
    }
    match from_sse_payload(&payload, event_id) {
        Ok(message) if message.from == agent_id => Frame::Skip(Skip::Own),
        Ok(message) => Frame::Deliver(message),
        Err(why) => Frame::Malformed(why.to_string()),
    }
}

/// Whether a `Content-Type` answer is an event stream. An answer without one is given the
/// benefit of the doubt; anything else (a proxy's HTML page, a JSON error) is not.
pub fn is_event_stream(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|value| {
        let media = value.split(';').next().unwrap_or_default();
        media.trim().eq_ignore_ascii_case("text/event-stream")
    })
}

/// The longest event id kept for `Last-Event-ID`.
pub const MAX_EVENT_ID_BYTES: usize = 1024;

/// Whether `id` can go back to the server as `Last-Event-ID`: an id that is no valid header
/// value would make every later request fail to build.
pub fn usable_event_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EVENT_ID_BYTES
        && id.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(frame: Frame) -> ConduitMessage {
        match frame {
            Frame::Deliver(message) => message,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn skips_and_malformed() {
        let skip = |why| Some(Frame::Skip(why));
        for (event, data, want) in [
            ("connected", r#"{"agentId":"alice"}"#, skip(Skip::Connected)),
            ("message", r#"{"type":"connected"}"#, skip(Skip::Connected)),
            ("heartbeat", "", skip(Skip::Heartbeat)),
            ("ping", "{}", skip(Skip::Heartbeat)),
            ("message", r#"{"type":"heartbeat"}"#, skip(Skip::Heartbeat)),
            (
                "message",
                r#"{"type":"ping","ts":1}"#,
                skip(Skip::Heartbeat),
            ),
            ("message", "", skip(Skip::Empty)),
            ("message", " \n ", skip(Skip::Empty)),
            ("typing", r#"{"id":"m1"}"#, skip(Skip::OtherEvent)),
            ("message", r#"{"id":"m1","from":"alice"}"#, skip(Skip::Own)),
            (
                "message",
                r#"{"message_id":"m1","from_agent_id":"alice"}"#,
                skip(Skip::Own),
            ),
            ("message", "not json", None),
            ("message", r#"{"id":"m1""#, None),
            ("message", r#"["id","m1"]"#, None),
            ("message", r#"{"type":"notice"}"#, None),
            ("message", r#"{"id":"m1","content":7}"#, None),
        ] {
            let got = classify(event, data, None, "alice");
            match want {
                Some(want) => assert_eq!(got, want, "{event} {data}"),
                None => assert!(
                    matches!(got, Frame::Malformed(_)),
                    "{event} {data}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn malformed_reasons_are_specific() {
        let Frame::Malformed(why) = classify("message", "nope", None, "a") else {
            panic!("not malformed");
        };
        assert!(why.starts_with("data is not JSON"), "{why}");
        let Frame::Malformed(why) = classify("message", r#"{"content":"x"}"#, None, "a") else {
            panic!("not malformed");
        };
        assert_eq!(why, "message has no usable id");
    }

    #[test]
    fn both_delivery_shapes() {
        let snake = r#"{"message_id":"m1","conversation_id":"c1","from_agent_id":"bob",
            "from_agent_name":"Bob","to_agent_id":"alice","content":"hi","content_type":"text",
            "created_at":"2026-01-01T00:00:00.000Z","attachments":[]}"#;
        let camel = r#"{"id":"m2","from":"bob","content":"yo","threadId":"c2",
            "timestamp":"2026-01-02T00:00:00.000Z"}"#;
        let a = delivered(classify("message", snake, None, "alice"));
        assert_eq!(
            (a.id.as_str(), a.from.as_str(), a.content.as_str()),
            ("m1", "bob", "hi")
        );
        assert_eq!(a.thread_id.as_deref(), Some("c1"));
        assert_eq!(a.timestamp, "2026-01-01T00:00:00.000Z");
        // The default event type is `message`; the crate fills it in, but be safe.
        let b = delivered(classify("", camel, None, "alice"));
        assert_eq!(
            (b.id.as_str(), b.from.as_str(), b.content.as_str()),
            ("m2", "bob", "yo")
        );
        assert_eq!(b.thread_id.as_deref(), Some("c2"));
    }

    #[test]
    fn the_real_servers_frames() {
        // crates/signaldock-transport/src/adapters/sse.rs: `id: <messageId>`,
        // `event: message`, camelCase data; keep-alives are `event: heartbeat`.
        let data = r#"{"messageId":"m1","conversationId":"c1","from":"bob","content":"hi",
            "contentType":"text","createdAt":"2026-04-07T12:00:00+00:00","attachments":[]}"#;
        let m = delivered(classify("message", data, Some("m1"), "alice"));
        assert_eq!(
            (m.id.as_str(), m.from.as_str(), m.content.as_str()),
            ("m1", "bob", "hi")
        );
        assert_eq!(m.thread_id.as_deref(), Some("c1"));
        assert_eq!(
            classify("message", data, Some("m1"), "bob"),
            Frame::Skip(Skip::Own)
        );
        assert_eq!(
            classify(
                "heartbeat",
                r#"{"timestamp":"2026-04-07T12:00:30+00:00"}"#,
                None,
                "alice"
            ),
            Frame::Skip(Skip::Heartbeat)
        );
    }

    #[test]
    fn a_lone_surrogate_is_repaired_not_dropped() {
        let m = delivered(classify(
            "message",
            r#"{"message_id":"m1","from_agent_id":"bob","content":"cut \ud83d!"}"#,
            None,
            "alice",
        ));
        assert_eq!(m.content, "cut \u{fffd}!");
        assert!(matches!(
            classify("message", "{not json", None, "alice"),
            Frame::Malformed(_)
        ));
    }

    #[test]
    fn content_types() {
        for (content_type, want) in [
            (None, true),
            (Some("text/event-stream"), true),
            (Some("Text/Event-Stream; charset=utf-8"), true),
            (Some(" text/event-stream "), true),
            (Some("text/html"), false),
            (Some("application/json"), false),
            (Some(""), false),
        ] {
            assert_eq!(is_event_stream(content_type), want, "{content_type:?}");
        }
    }

    #[test]
    fn event_ids_worth_sending_back() {
        for (id, want) in [
            ("42", true),
            ("a b\tc", true),
            ("zoë", true),
            ("", false),
            ("a\u{1}b", false),
            ("a\u{7f}", false),
            (&"x".repeat(MAX_EVENT_ID_BYTES), true),
            (&"x".repeat(MAX_EVENT_ID_BYTES + 1), false),
        ] {
            assert_eq!(usable_event_id(id), want, "{id:?}");
        }
    }
}
