//! A byte-level watch over an SSE body, before the event parser sees it.
//!
//! eventsource-client's parser buffers a line until its terminator and an event until its
//! blank line, with no limit: a broken or hostile server could grow either without bound.
//! [`FrameGuard`] counts what the parser is holding and fails the stream past
//! [`MAX_EVENT_BYTES`]. Comment lines are dispatched line by line, so they count against the
//! limit only while they last, not towards the event around them.
//!
//! It also reads `retry:` fields itself: the parser drops an event that has no `data`, and
//! with it the `retry:` of the common standalone `retry: 5000` frame.

/// The most bytes one event (or one comment line) may take on the wire. A message's content
/// is capped at [`crate::core::message::MAX_CONTENT_BYTES`]; JSON escaping can grow it
/// several times, and the rest of the payload is small.
pub const MAX_EVENT_BYTES: usize = 8 * crate::core::message::MAX_CONTENT_BYTES;

/// Enough of a line to recognise `retry:` and keep a `u64` of milliseconds behind it.
const HEAD_BYTES: usize = 32;

/// The stream went over its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub limit: usize,
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server sent an event larger than {} bytes",
            self.limit
        )
    }
}

impl std::error::Error for Overflow {}

#[derive(Debug)]
pub struct FrameGuard {
    limit: usize,
    /// Bytes of the non-comment lines since the last blank line.
    event_bytes: usize,
    /// Bytes of the current line (0 at a line start).
    line_bytes: usize,
    /// The previous byte was `\r`, so a `\n` now only completes that terminator.
    after_cr: bool,
    comment: bool,
    head: Vec<u8>,
    retry: Option<u64>,
}

impl FrameGuard {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            event_bytes: 0,
            line_bytes: 0,
            after_cr: false,
            comment: false,
            head: Vec::with_capacity(HEAD_BYTES),
            retry: None,
        }
    }

    /// Accounts for `chunk`. After an overflow the stream is to be dropped; the guard stays
    /// overflowed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Overflow> {
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.end_line();
                    self.after_cr = byte == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    if self.line_bytes == 0 {
                        self.comment = byte == b':';
                        self.head.clear();
                    }
                    self.line_bytes += 1;
                    if !self.comment {
                        self.event_bytes += 1;
                    }
                    if self.head.len() < HEAD_BYTES {
                        self.head.push(byte);
                    }
                }
            }
            if self.event_bytes > self.limit || self.line_bytes > self.limit {
                return Err(Overflow { limit: self.limit });
            }
        }
        Ok(())
    }

    /// The last `retry:` value seen so far, in milliseconds; reading it clears it.
    pub fn take_retry(&mut self) -> Option<u64> {
        self.retry.take()
    }

    fn end_line(&mut self) {
        if self.line_bytes == 0 {
            // A blank line dispatches the event: the parser lets go of it.
            self.event_bytes = 0;
            return;
        }
        if self.line_bytes <= HEAD_BYTES
            && let Some(retry) = retry_field(&self.head)
        {
            self.retry = Some(retry);
        }
        self.line_bytes = 0;
    }
}

/// The value of a `retry:` line, when it is one: ASCII digits only, as the SSE spec says
/// (anything else is ignored, not an error).
fn retry_field(line: &[u8]) -> Option<u64> {
    let value = line.strip_prefix(b"retry:")?;
    let value = value.strip_prefix(b" ").unwrap_or(value);
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` and returns the retry seen, or the overflow.
    fn run(limit: usize, chunks: &[&[u8]]) -> Result<Option<u64>, Overflow> {
        let mut guard = FrameGuard::new(limit);
        for chunk in chunks {
            guard.feed(chunk)?;
        }
        Ok(guard.take_retry())
    }

    #[test]
    fn retry_fields_anywhere_and_split_anyhow() {
        for (chunks, want) in [
            (&[&b"retry: 5000\n\n"[..]][..], Some(5000)),
            (&[b"retry:250\r\n\r\n"], Some(250)),
            (&[b"data: x\nretry: 7\n\n"], Some(7)),
            (&[b"re", b"try: 1", b"2\n"], Some(12)),
            (&[b"retry: 1\n", b"retry: 2\n"], Some(2)),
            (&[b"retry: 3\r"], Some(3)),
            (&[b"retry: 3"], None), // not terminated yet
            (&[b"retry: x\n"], None),
            (&[b"retry: -1\n"], None),
            (&[b"retry: +1\n"], None),
            (&[b"retry:\n"], None),
            (&[b"retry\n"], None),
            (&[b"retry:  5\n"], None), // only one space is stripped
            (&[b"retryx: 5\n"], None),
            (&[b"data: retry: 5\n"], None),
            (&[b": retry: 5\n"], None),
            (&[b"retry: 99999999999999999999999\n"], None), // over u64
        ] {
            assert_eq!(run(1024, chunks), Ok(want), "{chunks:?}");
        }
    }

    #[test]
    fn limits_an_event_and_a_line_but_not_a_stream() {
        let limit = 16;
        let over = Err(Overflow { limit });
        for (chunks, want) in [
            // Many small events: each blank line releases the bytes.
            (vec![&b"data: 0123456\n\n"[..]; 100], Ok(None)),
            (vec![&b"data: 0123456\r\n\r\n"[..]; 100], Ok(None)),
            (vec![&b"data: 0123456\r\r"[..]; 100], Ok(None)),
            // An event of many lines with no blank line between them.
            (vec![&b"data: 0123\n"[..]; 3], over),
            // One endless line, in pieces.
            (vec![&b"data: 01234567"[..], b"89abcdef"], over),
            // Comments never accumulate, but one endless comment line does.
            (vec![&b": keep-alive 0\n"[..]; 100], Ok(None)),
            (vec![&b": 0123456789"[..], b"0123456789"], over),
            // `\r\n` is one terminator: a blank line needs two of them.
            (vec![&b"data: 0123\r\n"[..], b"data: 45678\r\n"], over),
        ] {
            assert_eq!(run(limit, &chunks), want, "{chunks:?}");
        }
    }

    #[test]
    fn exactly_at_the_limit_is_fine() {
        let mut guard = FrameGuard::new(8);
        assert_eq!(guard.feed(b"data: ab\n"), Ok(()));
        assert_eq!(guard.feed(b"\n"), Ok(()));
        assert_eq!(guard.feed(b"data: abc"), Err(Overflow { limit: 8 }));
    }
}
