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
//!
//! [`FieldFilter`] removes the lines whose field the SSE standard does not define before the
//! parser sees them. The standard says to ignore such a field; the parser instead starts an
//! event for it, and an event with nothing in it is an error that costs the connection (and
//! the next event on it): a server's or proxy's own `x-custom: 1` line must not do that.

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

/// The fields of the SSE standard; a line with any other is ignored.
const KNOWN_FIELDS: [&[u8]; 4] = [b"data", b"event", b"id", b"retry"];
/// The longest known field name: a line whose name is longer is unknown.
const LONGEST_FIELD: usize = 5;
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// The field name is not complete yet: the line's bytes so far are held back.
    Undecided,
    Keep,
    Drop,
}

/// Drops lines with a field the SSE standard does not define (see the module doc), byte by
/// byte, whatever the chunking: a line is held back only until its field name is known (at
/// most six bytes, plus a leading byte-order mark).
#[derive(Debug)]
pub struct FieldFilter {
    line: Line,
    /// The held-back start of an undecided line.
    head: Vec<u8>,
    /// The line being read is the stream's first (it may start with a byte-order mark).
    first_line: bool,
    /// The previous byte was `\r`, ending a line that was dropped or kept.
    after_cr: Option<Line>,
}

impl Default for FieldFilter {
    fn default() -> Self {
        Self {
            line: Line::Undecided,
            head: Vec::with_capacity(LONGEST_FIELD + 1 + BOM.len()),
            first_line: true,
            after_cr: None,
        }
    }
}

impl FieldFilter {
    /// Appends to `out` what of `chunk` the parser should see.
    pub fn filter(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for &byte in chunk {
            if let Some(ended) = self.after_cr.take()
                && byte == b'\n'
            {
                // The `\n` of a `\r\n`: it goes where its `\r` went.
                if ended == Line::Keep {
                    out.push(byte);
                }
                continue;
            }
            match byte {
                b'\n' | b'\r' => {
                    let ended = match self.line {
                        Line::Undecided => {
                            // A line without a colon: its whole text is the field name.
                            let keep = self.head.is_empty() || self.known(&self.head);
                            if keep {
                                out.extend_from_slice(&self.head);
                            }
                            if keep { Line::Keep } else { Line::Drop }
                        }
                        decided => decided,
                    };
                    if ended == Line::Keep {
                        out.push(byte);
                    }
                    if byte == b'\r' {
                        self.after_cr = Some(ended);
                    }
                    self.head.clear();
                    self.line = Line::Undecided;
                    self.first_line = false;
                }
                _ => match self.line {
                    Line::Keep => out.push(byte),
                    Line::Drop => {}
                    Line::Undecided => {
                        self.head.push(byte);
                        let name_len = self.name(&self.head).len();
                        if byte == b':' {
                            let name = &self.head[..self.head.len() - 1];
                            // An empty name is a comment line: the parser's to see.
                            self.line = if self.name(name).is_empty() || self.known(name) {
                                out.extend_from_slice(&self.head);
                                Line::Keep
                            } else {
                                Line::Drop
                            };
                            self.head.clear();
                        } else if name_len > LONGEST_FIELD && !self.may_be_bom() {
                            self.line = Line::Drop;
                            self.head.clear();
                        }
                    }
                },
            }
        }
    }

    /// `head` without the byte-order mark a stream may start with.
    fn name<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        match self.first_line {
            true => head.strip_prefix(BOM).unwrap_or(head),
            false => head,
        }
    }

    /// The held bytes may still be (the start of) a byte-order mark.
    fn may_be_bom(&self) -> bool {
        self.first_line && self.head.len() <= BOM.len() && BOM.starts_with(&self.head)
    }

    fn known(&self, name: &[u8]) -> bool {
        KNOWN_FIELDS.contains(&self.name(name))
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

    /// Feeds `chunks` through a [`FieldFilter`] and returns what the parser would see.
    fn filtered(chunks: &[&[u8]]) -> String {
        let mut filter = FieldFilter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            filter.filter(chunk, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn unknown_fields_are_dropped_known_ones_and_comments_kept() {
        let stream = "x-custom: 1\n\ndata: a\nx-trace: t\nid: 7\n\n: ping\nevent: m\nretry: 5\ndata\nfoo\nidx: 1\n\n";
        let want = "\ndata: a\nid: 7\n\n: ping\nevent: m\nretry: 5\ndata\n\n";
        assert_eq!(filtered(&[stream.as_bytes()]), want);
        // Whatever the chunking, byte by byte included.
        let bytes: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
        assert_eq!(filtered(&bytes), want);
        for split in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(split);
            assert_eq!(filtered(&[a, b]), want, "split at {split}");
        }
    }

    #[test]
    fn every_line_ending_and_a_byte_order_mark() {
        assert_eq!(filtered(&[b"x: 1\r\ndata: a\r\n\r\n"]), "data: a\r\n\r\n");
        assert_eq!(filtered(&[b"x: 1\rdata: a\r\r"]), "data: a\r\r");
        assert_eq!(
            filtered(&[b"x: 1\r", b"\ndata: a\r", b"\n\r\n"]),
            "data: a\r\n\r\n"
        );
        assert_eq!(
            filtered(&[b"\xEF\xBB", b"\xBFdata: a\n\n"]),
            "\u{FEFF}data: a\n\n"
        );
        assert_eq!(
            filtered(&[b"\xEF\xBB\xBFx-a: 1\ndata: b\n\n"]),
            "data: b\n\n"
        );
        // A long unknown name, and one that only starts like a known one.
        assert_eq!(
            filtered(&[b"something-long: 1\ndatax: 2\nretryy: 3\ndata: ok\n\n"]),
            "data: ok\n\n"
        );
        // Values are never looked at.
        assert_eq!(
            filtered(&[b"data: x-custom: 1\ndata:\n\n"]),
            "data: x-custom: 1\ndata:\n\n"
        );
    }

    #[test]
    fn exactly_at_the_limit_is_fine() {
        let mut guard = FrameGuard::new(8);
        assert_eq!(guard.feed(b"data: ab\n"), Ok(()));
        assert_eq!(guard.feed(b"\n"), Ok(()));
        assert_eq!(guard.feed(b"data: abc"), Err(Overflow { limit: 8 }));
    }
}
