//! `ConduitMessage`, the one shape handlers see, and the mapping from every shape the wire
//! carries: SignalDock REST rows, SSE deliveries (snake_case and camelCase), and the
//! objects a JavaScript transport's `poll()` returns.
//!
//! Mapping is lenient where the contract gives defaults (`from` → `"unknown"`, `content` →
//! `""`, `timestamp` → now) and strict where a message would be meaningless: no usable id,
//! a field of the wrong type, or content over [`MAX_CONTENT_BYTES`] is a [`MapError`], so
//! the caller skips the row and counts it instead of handing garbage to a handler.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::clock;
use super::rows::UNPARSEABLE;

/// The largest `content` the runtime hands to a handler. A hostile or broken server could
/// otherwise make every handler call allocate without bound.
pub const MAX_CONTENT_BYTES: usize = 1024 * 1024;

/// A message as handlers receive it (the `ConduitMessage` of `@cleocode/contracts`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConduitMessage {
    pub id: String,
    pub from: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

#[cfg(test)]
impl ConduitMessage {
    /// A direct message from bob with id `id`, for tests that only care about ids and order.
    pub fn with_id(id: &str) -> Self {
        Self {
            id: id.into(),
            from: "bob".into(),
            content: format!("content {id}"),
            tags: None,
            thread_id: None,
            group_id: None,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            metadata: None,
        }
    }
}

/// Why a row could not become a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapError {
    NotAnObject,
    MissingId,
    WrongType(&'static str),
    ContentTooLarge(usize),
    /// The row was not valid JSON (see [`super::rows`]); the text says why.
    Unparseable(String),
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::NotAnObject => f.write_str("message is not an object"),
            MapError::MissingId => f.write_str("message has no usable id"),
            MapError::WrongType(field) => write!(f, "message field `{field}` has the wrong type"),
            MapError::ContentTooLarge(len) => {
                write!(
                    f,
                    "message content is {len} bytes, over the {MAX_CONTENT_BYTES}-byte cap"
                )
            }
            MapError::Unparseable(why) => write!(f, "message is not valid JSON: {why}"),
        }
    }
}

/// A REST row (`GET /messages/peek`, `GET /conversations/{id}/messages`).
/// `group` is the conversation the row came from, for group rows: it becomes the default
/// `threadId`. `groupId` is the row's own: every fan-out copy of one group message carries
/// the same one, which is what makes the copies one message (see [`ConduitMessage::dedup_key`]).
pub fn from_rest_row(row: &Value, group: Option<&str>) -> Result<ConduitMessage, MapError> {
    let row = row.as_object().ok_or(MapError::NotAnObject)?;
    if let Some(why) = row.get(UNPARSEABLE) {
        return Err(MapError::Unparseable(
            why.as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(ConduitMessage {
        id: id_of(row.get("id"))?,
        from: text_or(row, &["fromAgentId"], "unknown")?,
        content: content_of(row, &["content"])?,
        tags: None,
        thread_id: opt_text(row, &["conversationId"])?.or_else(|| group.map(str::to_owned)),
        group_id: opt_text(row, &["groupId"])?,
        timestamp: timestamp_of(row, &["createdAt"])?,
        metadata: metadata_of(row)?,
    })
}

/// An SSE delivery, in every shape servers send (WIRE.md): the real server's camelCase
/// `{messageId, conversationId, from, createdAt, …}`, the snake_case of other servers, and
/// the `{id, from, threadId, timestamp}` of older ones. `event_id` is the frame's `id:`
/// line, which the real server sets to the message id: the id of last resort.
pub fn from_sse_payload(
    payload: &Value,
    event_id: Option<&str>,
) -> Result<ConduitMessage, MapError> {
    let obj = payload.as_object().ok_or(MapError::NotAnObject)?;
    let id = match (first(obj, &["messageId", "message_id", "id"]), event_id) {
        (Some((_, id)), _) => id_of(Some(id))?,
        (None, Some(event_id)) => id_of(Some(&Value::String(event_id.to_owned())))?,
        (None, None) => return Err(MapError::MissingId),
    };
    Ok(ConduitMessage {
        id,
        from: text_or(obj, &["from", "from_agent_id", "fromAgentId"], "unknown")?,
        content: content_of(obj, &["content"])?,
        tags: None,
        thread_id: opt_text(obj, &["conversationId", "conversation_id", "threadId"])?,
        group_id: opt_text(obj, &["groupId", "group_id"])?,
        timestamp: timestamp_of(obj, &["createdAt", "created_at", "timestamp"])?,
        metadata: metadata_of(obj)?,
    })
}

impl ConduitMessage {
    /// What makes two deliveries one message: a group message reaches a member as its own
    /// fan-out copy (own id, shared `groupId`) by peek or stream, and as the listing's row
    /// (the smallest copy id, same `groupId`). WIRE.md: deduplicate by `groupId ?? id`.
    pub fn dedup_key(&self) -> &str {
        self.group_id.as_deref().unwrap_or(&self.id)
    }
}

/// A message object returned by a JavaScript transport's `poll()`: already a
/// `ConduitMessage`, checked rather than trusted.
pub fn from_transport_object(value: &Value) -> Result<ConduitMessage, MapError> {
    let obj = value.as_object().ok_or(MapError::NotAnObject)?;
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(MapError::WrongType("tags"))?,
        ),
        Some(_) => return Err(MapError::WrongType("tags")),
    };
    Ok(ConduitMessage {
        id: id_of(obj.get("id"))?,
        from: text_or(obj, &["from"], "unknown")?,
        content: content_of(obj, &["content"])?,
        tags,
        thread_id: opt_text(obj, &["threadId"])?,
        group_id: opt_text(obj, &["groupId"])?,
        timestamp: timestamp_of(obj, &["timestamp"])?,
        metadata: metadata_of(obj)?,
    })
}

/// The id of a row or object that may not map as a whole: what a skipped message is acked
/// and remembered by.
pub fn usable_id(value: &Value) -> Option<String> {
    id_of(value.get("id")).ok()
}

fn id_of(value: Option<&Value>) -> Result<String, MapError> {
    match value {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(MapError::MissingId),
    }
}

fn first<'a>(
    obj: &'a Map<String, Value>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    keys.iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
}

fn opt_text(obj: &Map<String, Value>, keys: &[&'static str]) -> Result<Option<String>, MapError> {
    match first(obj, keys) {
        None => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(s.clone())),
        Some((_, Value::Number(n))) => Ok(Some(n.to_string())),
        Some((key, _)) => Err(MapError::WrongType(key)),
    }
}

fn text_or(
    obj: &Map<String, Value>,
    keys: &[&'static str],
    default: &str,
) -> Result<String, MapError> {
    Ok(opt_text(obj, keys)?.unwrap_or_else(|| default.to_owned()))
}

fn content_of(obj: &Map<String, Value>, keys: &[&'static str]) -> Result<String, MapError> {
    match first(obj, keys) {
        None => Ok(String::new()),
        Some((_, Value::String(s))) if s.len() > MAX_CONTENT_BYTES => {
            Err(MapError::ContentTooLarge(s.len()))
        }
        Some((_, Value::String(s))) => Ok(s.clone()),
        Some((key, _)) => Err(MapError::WrongType(key)),
    }
}

fn timestamp_of(obj: &Map<String, Value>, keys: &[&'static str]) -> Result<String, MapError> {
    Ok(opt_text(obj, keys)?.unwrap_or_else(clock::now_iso))
}

fn metadata_of(obj: &Map<String, Value>) -> Result<Option<Map<String, Value>>, MapError> {
    match obj.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        // Some servers send metadata as a JSON string; an opaque string is dropped, not fatal.
        Some(Value::String(s)) => Ok(serde_json::from_str::<Map<String, Value>>(s).ok()),
        Some(_) => Err(MapError::WrongType("metadata")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rest_rows_map_with_documented_defaults() {
        let full = json!({"id": "m1", "fromAgentId": "bob", "toAgentId": "alice", "content": "hi",
            "conversationId": "c1", "createdAt": "2026-01-01T00:00:00.000Z", "metadata": {"k": 1}});
        let m = from_rest_row(&full, None).unwrap();
        assert_eq!(
            (m.id.as_str(), m.from.as_str(), m.content.as_str()),
            ("m1", "bob", "hi")
        );
        assert_eq!(m.thread_id.as_deref(), Some("c1"));
        assert_eq!(m.group_id, None);
        assert_eq!(m.timestamp, "2026-01-01T00:00:00.000Z");
        assert_eq!(m.metadata.unwrap()["k"], 1);

        let bare = from_rest_row(&json!({"id": 42}), Some("g1")).unwrap();
        assert_eq!(bare.id, "42");
        assert_eq!(bare.from, "unknown");
        assert_eq!(bare.content, "");
        assert_eq!(bare.thread_id.as_deref(), Some("g1"));
        // The conversation is not the fan-out group: only the row says which that is.
        assert_eq!(bare.group_id, None);
        assert_eq!(bare.dedup_key(), "42");
        assert!(clock::parse_iso_ms(&bare.timestamp).is_some());
    }

    #[test]
    fn bad_rows_are_errors_not_garbage() {
        let cases = [
            (json!("text"), MapError::NotAnObject),
            (json!({"content": "x"}), MapError::MissingId),
            (json!({"id": ""}), MapError::MissingId),
            (json!({"id": {"x": 1}}), MapError::MissingId),
            (
                json!({"id": "a", "content": 5}),
                MapError::WrongType("content"),
            ),
            (
                json!({"id": "a", "fromAgentId": []}),
                MapError::WrongType("fromAgentId"),
            ),
            (
                json!({"id": "a", "metadata": 3}),
                MapError::WrongType("metadata"),
            ),
            (
                json!({"id": "a", "content": "x".repeat(MAX_CONTENT_BYTES + 1)}),
                MapError::ContentTooLarge(MAX_CONTENT_BYTES + 1),
            ),
        ];
        for (row, err) in cases {
            assert_eq!(from_rest_row(&row, None), Err(err));
        }
    }

    #[test]
    fn fan_out_copies_share_one_dedup_key() {
        // Two copies of one group message, as peek and the listing give them.
        let copy = json!({"id": "m7", "conversationId": "ops", "fromAgentId": "bob",
            "toAgentId": "alice", "groupId": "grp-1", "content": "@alice hi",
            "createdAt": "2026-04-07T12:00:00Z"});
        let listed = json!({"id": "m5", "conversationId": "ops", "fromAgentId": "bob",
            "toAgentId": "carol", "groupId": "grp-1", "content": "@alice hi",
            "createdAt": "2026-04-07T12:00:00Z"});
        let (a, b) = (
            from_rest_row(&copy, None).unwrap(),
            from_rest_row(&listed, Some("ops")).unwrap(),
        );
        assert_ne!(a.id, b.id);
        assert_eq!(a.group_id.as_deref(), Some("grp-1"));
        assert_eq!((a.dedup_key(), b.dedup_key()), ("grp-1", "grp-1"));
    }

    #[test]
    fn the_real_servers_sse_frame_maps() {
        // crates/signaldock-transport/src/adapters/sse.rs, as written on the wire.
        let real = json!({"messageId": "m1", "conversationId": "c1", "from": "bob",
            "content": "hi", "contentType": "text", "createdAt": "2026-04-07T12:00:00+00:00",
            "attachments": []});
        let m = from_sse_payload(&real, Some("m1")).unwrap();
        assert_eq!(
            (m.id.as_str(), m.from.as_str(), m.content.as_str()),
            ("m1", "bob", "hi")
        );
        assert_eq!(m.thread_id.as_deref(), Some("c1"));
        assert_eq!(m.timestamp, "2026-04-07T12:00:00+00:00");
        // No id in the data: the frame's `id:` line, which the real server sets to it.
        let bare = from_sse_payload(&json!({"from": "bob", "content": "x"}), Some("m9")).unwrap();
        assert_eq!(bare.id, "m9");
        // An id of the wrong type is not papered over by the event id.
        assert_eq!(
            from_sse_payload(&json!({"messageId": {"x": 1}}), Some("m9")),
            Err(MapError::MissingId)
        );
    }

    #[test]
    fn sse_payloads_in_both_shapes() {
        let snake = json!({"message_id": "m1", "conversation_id": "c1", "from_agent_id": "bob",
            "from_agent_name": "Bob", "to_agent_id": "alice", "content": "hi", "content_type": "text",
            "created_at": "2026-01-01T00:00:00Z", "attachments": []});
        let camel = json!({"id": "m1", "from": "bob", "content": "hi", "threadId": "c1",
            "timestamp": "2026-01-01T00:00:00Z"});
        let (a, b) = (
            from_sse_payload(&snake, None).unwrap(),
            from_sse_payload(&camel, None).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.thread_id.as_deref(), Some("c1"));
        assert_eq!(
            from_sse_payload(&json!({"type": "x"}), None),
            Err(MapError::MissingId)
        );
    }

    #[test]
    fn transport_objects_are_checked() {
        let ok = json!({"id": "m", "from": "b", "content": "c", "timestamp": "t", "tags": ["x"]});
        assert_eq!(
            from_transport_object(&ok).unwrap().tags,
            Some(vec!["x".into()])
        );
        assert_eq!(
            from_transport_object(&json!({"id": "m", "tags": [1]})),
            Err(MapError::WrongType("tags"))
        );
        assert_eq!(
            from_transport_object(&json!(null)),
            Err(MapError::NotAnObject)
        );
    }

    #[test]
    fn serializes_to_the_contract_field_names() {
        let m = from_rest_row(&json!({"id": "m", "conversationId": "c"}), None).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["threadId"], "c");
        assert!(v.get("groupId").is_none());
    }
}
