//! Property tests: whatever the wire or a JS transport sends, mapping never panics and never
//! yields a message the contract forbids; mention matching agrees with its definition.

use cleo_runtime::core::mention::mentions;
use cleo_runtime::core::message::{self, MAX_CONTENT_BYTES};
use cleo_runtime::core::sse::frame::{Frame, classify};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Arbitrary JSON, nested a few levels, with the field names the mappers look for.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_owned()),
        Just("message_id".to_owned()),
        Just("fromAgentId".to_owned()),
        Just("from_agent_id".to_owned()),
        Just("from".to_owned()),
        Just("content".to_owned()),
        Just("conversationId".to_owned()),
        Just("groupId".to_owned()),
        Just("messageId".to_owned()),
        Just("createdAt".to_owned()),
        Just("timestamp".to_owned()),
        Just("metadata".to_owned()),
        Just("tags".to_owned()),
        Just("type".to_owned()),
        "[a-z]{1,8}",
    ]
}

proptest! {
    #[test]
    fn rest_rows_map_or_fail_cleanly(row in json_value(), group in proptest::option::of("[a-z]{1,6}")) {
        if let Ok(m) = message::from_rest_row(&row, group.as_deref()) {
            prop_assert!(!m.id.is_empty());
            prop_assert!(m.content.len() <= MAX_CONTENT_BYTES);
            prop_assert!(!m.timestamp.is_empty());
            // The row's own groupId, never the conversation it was read from; the
            // conversation is the thread when the row names none.
            let own = match row.get("groupId") {
                Some(serde_json::Value::String(g)) => Some(g.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            prop_assert_eq!(m.group_id, own);
            if let (Some(g), None) = (&group, row.get("conversationId")) {
                prop_assert_eq!(m.thread_id.as_deref(), Some(g.as_str()));
            }
        }
    }

    #[test]
    fn sse_payloads_and_transport_objects_map_or_fail_cleanly(value in json_value()) {
        let mapped = [
            message::from_sse_payload(&value, None),
            message::from_sse_payload(&value, Some("event-7")),
            message::from_transport_object(&value),
        ];
        for m in mapped.into_iter().flatten() {
            prop_assert!(!m.id.is_empty());
            prop_assert!(m.content.len() <= MAX_CONTENT_BYTES);
        }
    }

    #[test]
    fn sse_frames_never_panic(event in ".{0,20}", data in ".{0,200}", id in proptest::option::of(".{0,20}"), agent in "[a-z]{1,8}") {
        let _ = classify(&event, &data, id.as_deref(), &agent);
    }

    #[test]
    fn sse_frames_from_this_agent_are_never_delivered(id in "[a-z0-9]{1,12}", agent in "[a-z]{1,8}", content in ".{0,40}") {
        for data in [
            serde_json::json!({ "message_id": id, "from_agent_id": agent, "content": content }),
            serde_json::json!({ "messageId": id, "from": agent, "content": content }),
        ] {
            let data = data.to_string();
            prop_assert!(!matches!(classify("message", &data, Some(&id), &agent), Frame::Deliver(_)));
        }
    }

    #[test]
    fn a_spaced_mention_always_matches(id in "[^@\\s]{1,16}", before in "[a-z ]{0,10}", after in "[a-z ]{0,10}") {
        let content = format!("{before} @{id} {after}");
        prop_assert!(mentions(&content, &id));
    }

    #[test]
    fn a_longer_name_never_matches(id in "[a-z]{1,10}", extra in "[a-z0-9_-]{1,5}") {
        let content = format!("hello @{id}{extra} there");
        prop_assert!(!mentions(&content, &id) || content.to_lowercase().contains("@all"));
    }

    #[test]
    fn mention_matching_never_panics(content in ".{0,200}", id in ".{0,20}") {
        let _ = mentions(&content, &id);
    }
}

proptest! {
    /// Salvaging rows never panics, whatever the bytes; on a valid list it finds exactly the
    /// rows the parser finds; and corrupting one row's bytes leaves the others as they were.
    #[test]
    fn salvaged_rows_match_the_parser_and_survive_corruption(
        rows in prop::collection::vec(json_value(), 0..6),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        use cleo_runtime::core::rows::salvage_rows;
        let _ = salvage_rows(&noise);
        let body = serde_json::json!({ "success": true, "data": { "messages": rows } }).to_string();
        // What the parser itself reads (floats may not round-trip exactly through text).
        let parsed: Value = serde_json::from_str(&body).unwrap();
        let rows: Vec<Value> = parsed["data"]["messages"].as_array().unwrap().clone();
        prop_assert_eq!(salvage_rows(body.as_bytes()), Some(rows.clone()));
        let _ = salvage_rows(&body.as_bytes()[..cut.index(body.len() + 1)]);
        if rows.len() >= 2 {
            // A byte that is not UTF-8 inside a string of the first row only.
            let first = serde_json::json!({ "id": "first", "content": "X" }).to_string().replace('X', "\u{1}");
            let mut bytes = format!("[{first}").into_bytes();
            let at = bytes.iter().position(|&b| b == 1).unwrap();
            bytes[at] = 0xff;
            for row in &rows {
                bytes.push(b',');
                bytes.extend_from_slice(row.to_string().as_bytes());
            }
            bytes.push(b']');
            let salvaged = salvage_rows(&bytes).unwrap();
            prop_assert_eq!(salvaged[0]["content"].as_str(), Some("\u{FFFD}"));
            let reread: Vec<Value> = rows.iter().map(|r| serde_json::from_str(&r.to_string()).unwrap()).collect();
            prop_assert_eq!(&salvaged[1..], &reread[..]);
        }
    }
}
