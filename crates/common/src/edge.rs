//! The HTTP/1 connection as the platform accepts it: actix-http refuses a request head it
//! cannot parse (a URI over 65,534 bytes, a head over 128 KiB, a malformed request line or
//! header) in its codec, before any application code runs, with a bodiless 400 or 431. No
//! option changes those answers, so [`EdgeIo`] sits between the socket and actix-http and
//! puts the JSON envelope in their place: 414 `uri_too_long` when the request line was the
//! over-long line, 431 `headers_too_large`, 400 `malformed_request`. Everything else passes
//! through untouched.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest URI actix-http (the `http` crate) takes: a request line longer than this
/// with its method and version cannot be parsed.
const MAX_URI_BYTES: usize = u16::MAX as usize - 1;
/// The most bytes of a bare codec error response searched for at the end of a write.
const BARE_HEAD_MAX: usize = 512;

/// A socket whose bare codec errors are answered in the envelope.
pub struct EdgeIo<T> {
    io: T,
    /// Bytes the client sent since its last LF.
    line: usize,
    /// Lines the client sent since its last empty line: 0 while on a request line.
    line_index: usize,
    /// Since the last response went out, the client sent a request line (or a header line)
    /// longer than any URI can be.
    long_request_line: bool,
    long_header_line: bool,
    /// The envelope response written in place of a bare error, what of it is left to write.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<T> EdgeIo<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            line: 0,
            line_index: 0,
            long_request_line: false,
            long_header_line: false,
            replacement: None,
        }
    }

    /// Follows the lines of what the client sent. Bodies are followed too (the connection's
    /// framing is actix-http's business); that only matters when actix-http answers a bare
    /// error right after, and then the worst case is a 414 where a 400 was due.
    fn observe(&mut self, received: &[u8]) {
        let mut from = 0;
        // Each LF found by memchr (every read of every request passes here).
        for end in memchr::memchr_iter(b'\n', received).chain([received.len()]) {
            if from > 0 {
                // A line ended: an empty one ("\r" or nothing) ends a head.
                if self.line <= 1 {
                    self.line_index = 0;
                } else {
                    self.line_index += 1;
                }
                self.line = 0;
            }
            self.line = self.line.saturating_add(end - from);
            if self.line > MAX_URI_BYTES {
                if self.line_index == 0 {
                    self.long_request_line = true;
                } else {
                    self.long_header_line = true;
                }
            }
            from = end + 1;
        }
    }

    /// The envelope response for a bare codec error with `status` (400 or 431).
    fn envelope(&self, version: &[u8], status: u16) -> Vec<u8> {
        let (status, phrase, reason, message) = if self.long_request_line {
            (
                414,
                "URI Too Long",
                "uri_too_long",
                format!("the request URI is longer than {MAX_URI_BYTES} bytes"),
            )
        } else if status == 431 || self.long_header_line {
            (
                431,
                "Request Header Fields Too Large",
                "headers_too_large",
                "the request head is larger than 128 KiB, or a header line longer than 64 KiB"
                    .to_owned(),
            )
        } else {
            (
                400,
                "Bad Request",
                "malformed_request",
                "the request line or a header is malformed (an HTTP/1.1 request needs a Host header)"
                    .to_owned(),
            )
        };
        let body = serde_json::json!({
            "status": "error",
            "error": {"code": status, "reason": reason, "message": message},
        })
        .to_string();
        let mut response = Vec::with_capacity(body.len() + 128);
        response.extend_from_slice(version);
        response.extend_from_slice(
            format!(
                " {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        response.extend_from_slice(body.as_bytes());
        response
    }
}

/// Where a bare error response of actix-http's codec (status 400 or 431, no body) starts at
/// the end of `buf`, with its HTTP version and status. It is always the last thing written
/// on a connection: actix-http closes it after.
fn bare_codec_error(buf: &[u8]) -> Option<(usize, &[u8], u16)> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    // Such a head is under 200 bytes: a long body that happens to end with a blank line is
    // not searched through.
    let tail = buf.len().saturating_sub(BARE_HEAD_MAX);
    let start = tail
        + buf[tail..]
            .windows(7)
            .rposition(|window| window == b"HTTP/1.")?;
    let head = &buf[start..];
    // One head only: no blank line before the end.
    if head[..head.len() - 4].windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    let status = match head.get(8..13)? {
        b" 400 " => 400,
        b" 431 " => 431,
        _ => return None,
    };
    let bodiless = head
        .windows(21)
        .any(|window| window.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    bodiless.then(|| (start, &head[..8], status))
}

impl<T: AsyncWrite + Unpin> EdgeIo<T> {
    /// Writes what is left of the replacement response.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for EdgeIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.observe(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EdgeIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        if let Some((start, version, status)) = bare_codec_error(buf) {
            if start > 0 {
                // What precedes it first (a pipelined response).
                return Pin::new(&mut this.io).poll_write(cx, &buf[..start]);
            }
            let response = this.envelope(version, status);
            this.replacement = Some((response, 0));
            if let Poll::Ready(Err(error)) = this.poll_replacement(cx) {
                return Poll::Ready(Err(error));
            }
            // The bare response counts as written; the rest of ours goes out on flush.
            return Poll::Ready(Ok(buf.len()));
        }
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if written > 0 {
            // A response is going out: what the client sends next is a new request.
            this.long_request_line = false;
            this.long_header_line = false;
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bare_400_or_431_at_the_end_is_a_codec_error() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: Fri, 04 Dec 2026 23:59:59 GMT\r\n\r\n";
        assert_eq!(bare_codec_error(bare), Some((0, &b"HTTP/1.1"[..], 400)));
        let mut pipelined = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        pipelined.extend_from_slice(bare);
        assert_eq!(
            bare_codec_error(&pipelined).map(|(start, _, _)| start),
            Some(pipelined.len() - bare.len())
        );
        let too_large =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            bare_codec_error(too_large).map(|(_, _, status)| status),
            Some(431)
        );
        for not_bare in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 88\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"status\":\"error\"}",
            b"{}",
        ] {
            assert_eq!(bare_codec_error(not_bare), None);
        }
    }

    #[test]
    fn a_long_request_line_is_told_from_a_long_header_line() {
        let mut io = EdgeIo::new(());
        io.observe(b"GET /");
        io.observe(&vec![b'a'; MAX_URI_BYTES]);
        assert!(io.long_request_line && !io.long_header_line);

        let mut io = EdgeIo::new(());
        io.observe(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ");
        io.observe(&vec![b'a'; MAX_URI_BYTES + 1]);
        assert!(!io.long_request_line && io.long_header_line);

        // The next request on the connection starts after the blank line.
        let mut io = EdgeIo::new(());
        io.observe(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /");
        io.observe(&vec![b'a'; MAX_URI_BYTES]);
        assert!(io.long_request_line);
    }
}
