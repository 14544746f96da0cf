//! Reading a list of message rows when the answer as a whole is not valid JSON.
//!
//! One broken or hostile row makes `serde_json` refuse the whole answer, and with it every
//! good row beside it, poll after poll (the row stays pending on the server): a lone
//! surrogate escape such as `"\ud83d"` (what a JavaScript server sends for a string cut in
//! the middle of an emoji), bytes that are not UTF-8, or nesting deeper than the parser's
//! recursion limit. [`salvage_rows`] finds the message array with a byte scan that needs no
//! recursion and takes each row on its own: parsed as it is; else repaired (U+FFFD for what
//! is not UTF-8 and for lone surrogates) and parsed; else replaced by a placeholder that keeps
//! the row's id, so the poller can skip it, count it once and ack it.
//!
//! The scan checks structure only (strings, brackets, commas), and only as far as it needs
//! to: an answer cut short, or with no message array, is not salvaged.

use serde_json::{Map, Value};

/// The key of a placeholder row; its value says why the row could not be parsed.
pub const UNPARSEABLE: &str = "\u{1}unparseable";

/// The rows of `{ "success", "data": { "messages": [...] } }`, `{ "messages": [...] }`, or a
/// bare array, one by one. None when there is no such array or the answer is incomplete.
pub fn salvage_rows(bytes: &[u8]) -> Option<Vec<Value>> {
    let list = find_list(bytes)?;
    Some(
        elements(bytes, list)?
            .into_iter()
            .map(|(start, end)| row(&bytes[start..end]))
            .collect(),
    )
}

/// One row: as it is, else repaired, else a placeholder with its id when it has one.
fn row(raw: &[u8]) -> Value {
    if let Ok(value) = serde_json::from_slice::<Value>(raw) {
        return value;
    }
    match serde_json::from_str::<Value>(&repair(raw)) {
        Ok(value) => value,
        Err(e) => placeholder(raw, &e.to_string()),
    }
}

fn placeholder(raw: &[u8], why: &str) -> Value {
    let mut row = Map::new();
    let id = (raw.first() == Some(&b'{'))
        .then(|| members(raw, 0))
        .flatten()
        .and_then(|members| {
            members
                .into_iter()
                .find(|(key, ..)| *key == b"id")
                .and_then(|(_, start, end)| serde_json::from_slice::<Value>(&raw[start..end]).ok())
        })
        .filter(|id| id.is_string() || id.is_number());
    if let Some(id) = id {
        row.insert("id".into(), id);
    }
    row.insert(UNPARSEABLE.into(), Value::String(why.to_owned()));
    Value::Object(row)
}

/// `raw` as UTF-8 (U+FFFD for what is not), with every lone surrogate escape (`\uD800` to
/// `\uDFFF` not part of a high-low pair) replaced by `\uFFFD`: JSON that `serde_json` can
/// take, when that was all that was wrong with it.
pub fn repair(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(unit) = escape_unit(b, i) else {
            // Any other escape, `\\` included, is two bytes that stay as they are.
            i += 2;
            continue;
        };
        if (0xD800..0xDC00).contains(&unit)
            && escape_unit(b, i + 6).is_some_and(|low| (0xDC00..0xE000).contains(&low))
        {
            i += 12;
            continue;
        }
        if (0xD800..0xE000).contains(&unit) {
            out.push_str(&text[copied..i]);
            out.push_str("\\uFFFD");
            copied = i + 6;
        }
        i += 6;
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

/// The code unit of a `\uXXXX` escape starting at `i`.
fn escape_unit(b: &[u8], i: usize) -> Option<u32> {
    if b.get(i) != Some(&b'\\') || b.get(i + 1) != Some(&b'u') {
        return None;
    }
    let hex = std::str::from_utf8(b.get(i + 2..i + 6)?).ok()?;
    u32::from_str_radix(hex, 16).ok()
}

// ----- the scan

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end (exclusive) of the string that starts at `i` (a `"`).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end (exclusive) of the value that starts at `i`. Nesting is counted, not recursed.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        b',' | b':' | b'}' | b']' => None,
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

type Member<'a> = (&'a [u8], usize, usize);

/// The members of the object at `i` (a `{`): raw key (without quotes), value start and end.
fn members(b: &[u8], i: usize) -> Option<Vec<Member<'_>>> {
    let mut out = Vec::new();
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(j) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, j)?;
        let key = &b[j + 1..key_end - 1];
        j = skip_ws(b, key_end);
        if b.get(j) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, j + 1);
        let end = value_end(b, start)?;
        out.push((key, start, end));
        j = skip_ws(b, end);
        match b.get(j)? {
            b',' => j = skip_ws(b, j + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

/// The elements of the array at `i` (a `[`): start and end of each.
fn elements(b: &[u8], i: usize) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = value_end(b, j)?;
        out.push((j, end));
        j = skip_ws(b, end);
        match b.get(j)? {
            b',' => j = skip_ws(b, j + 1),
            b']' => return Some(out),
            _ => return None,
        }
    }
}

/// Where the message array starts, when the answer is complete and has one.
fn find_list(b: &[u8]) -> Option<usize> {
    let start = skip_ws(b, 0);
    let end = value_end(b, start)?;
    if skip_ws(b, end) != b.len() {
        return None;
    }
    let member = |object: usize, key: &[u8]| -> Option<usize> {
        members(b, object)?
            .into_iter()
            .find(|(k, ..)| *k == key)
            .map(|(_, start, _)| start)
    };
    let list = match b[start] {
        b'[' => start,
        b'{' => {
            // As parse_envelope reads it: `data` of a `{ success, data }` envelope, else the body.
            let body = match (member(start, b"success"), member(start, b"data")) {
                (Some(_), Some(data)) => data,
                _ => start,
            };
            match b[body] {
                b'[' => body,
                b'{' => member(body, b"messages")?,
                _ => return None,
            }
        }
        _ => return None,
    };
    (b[list] == b'[').then_some(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(rows: &[Value]) -> Vec<Value> {
        rows.iter()
            .map(|r| r.get("id").cloned().unwrap_or(Value::Null))
            .collect()
    }

    #[test]
    fn finds_the_list_in_every_shape() {
        for body in [
            r#"{"success":true,"data":{"messages":[{"id":"a"},{"id":"b"}]}}"#,
            r#" {"messages": [ {"id":"a"} , {"id":"b"} ] } "#,
            r#"[{"id":"a"},{"id":"b"}]"#,
            r#"{"success":true,"data":[{"id":"a"},{"id":"b"}]}"#,
        ] {
            let rows = salvage_rows(body.as_bytes()).unwrap();
            assert_eq!(ids(&rows), [json!("a"), json!("b")], "{body}");
        }
        assert_eq!(salvage_rows(br#"{"messages":[]}"#), Some(vec![]));
    }

    #[test]
    fn incomplete_or_listless_answers_are_not_salvaged() {
        for body in [
            &br#"{"success":true,"data":{"messages":[{"id":"t1"},{"id":"#[..],
            br#"{"messages":[{"id":"t1"}]"#,
            br#"{"messages":[{"id":"t1"}]} trailing"#,
            br#"{"messages":"nope"}"#,
            br#"{"data":{}}"#,
            b"<html>502</html>",
            b"\xff\xff\xff",
            b"",
            br#"{"messages":[{"id":"a"},]}"#,
        ] {
            assert_eq!(
                salvage_rows(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let body = br#"{"messages":[{"id":"1","content":"cut \ud83d!"},{"id":"2","content":"low \udc00 pair \ud83d\ude00 escaped \\ud800"},{"id":"3","content":"ok"}]}"#;
        let rows = salvage_rows(body).unwrap();
        assert_eq!(rows[0]["content"], "cut \u{FFFD}!");
        assert_eq!(rows[1]["content"], "low \u{FFFD} pair 😀 escaped \\ud800");
        assert_eq!(rows[2]["content"], "ok");
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let mut body = br#"{"messages":[{"id":"1","content":"bad "#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""},{"id":"2"}]}"#);
        let rows = salvage_rows(&body).unwrap();
        assert_eq!(rows[0]["content"], "bad \u{FFFD}\u{FFFD}");
        assert_eq!(rows[1]["id"], "2");
    }

    #[test]
    fn rows_too_deep_to_parse_keep_their_id_and_say_why() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = format!(
            r#"{{"messages":[{{"id":"a"}},{{"id":"deep","metadata":{deep}}},{{"metadata":{deep}}},{{"id":7,"m":{deep}}}]}}"#
        );
        let rows = salvage_rows(body.as_bytes()).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0], json!({"id": "a"}));
        assert_eq!(rows[1]["id"], "deep");
        assert!(rows[1][UNPARSEABLE].as_str().unwrap().contains("recursion"));
        assert!(rows[2].get("id").is_none());
        assert!(rows[2].get(UNPARSEABLE).is_some());
        assert_eq!(rows[3]["id"], 7);
    }

    #[test]
    fn a_row_broken_inside_is_a_placeholder_the_others_stand() {
        let rows = salvage_rows(br#"{"messages":[{"id" "a"},{"id":"b"}]}"#).unwrap();
        assert!(rows[0].get(UNPARSEABLE).is_some());
        assert_eq!(rows[1], json!({"id": "b"}));
    }

    #[test]
    fn strings_may_hold_brackets_quotes_and_backslashes() {
        let body = br#"{"messages":[{"id":"a","content":"] } [ { \" \\"},{"id":"b\"c"}]}"#;
        let rows = salvage_rows(body).unwrap();
        assert_eq!(rows[0]["content"], "] } [ { \" \\");
        assert_eq!(rows[1]["id"], "b\"c");
    }
}
