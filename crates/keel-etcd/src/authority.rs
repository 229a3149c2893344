//! Makes the etcd API port take HTTP/2 requests whose `:authority` is not
//! an authority, as etcd's Go server does.
//!
//! Go etcd clients send such requests: etcd 3.4's maintenance calls to one
//! endpoint (`etcdctl endpoint status`, `hashkv`, `defrag`, `move-leader`,
//! and every `--cluster` command) send the endpoint URL itself,
//! `http://127.0.0.1:2379`; clients of etcd 3.5.0 up to its fix send
//! `#initially=[…]`. The `h2` crate under tonic refuses a request whose
//! `:authority` does not parse (it resets the stream with PROTOCOL_ERROR,
//! and has no setting to allow it), so those calls failed.
//!
//! `FixAuthority` sits between the connection and the HTTP server. It reads
//! the client's HTTP/2 frames (any other protocol passes untouched) and, in
//! each request's header block, replaces an `:authority` value that is not
//! an authority by one that is and has the same length: every byte outside
//! the characters a host name may hold becomes `-`. The length matters:
//! HPACK's dynamic table counts entry sizes on both sides, so the server's
//! table stays in step with the client's. Nothing in Keel reads the value.
//! Only header blocks are parsed (no table is kept: the name `:authority`
//! is recognized by its static index or as a literal); everything else is
//! forwarded as it comes. Bytes that do not parse are forwarded as they
//! are, for the HTTP server to judge.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface of HTTP/2.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a server always takes (SETTINGS_MAX_FRAME_SIZE's
/// initial value).
const MAX_FRAME: usize = 16_384;
/// A header block is held until it is whole; one larger than this is
/// passed on unexamined.
const MAX_BLOCK: usize = 1 << 20;

#[derive(Debug)]
enum State {
    /// Before the connection preface (or the first bytes of HTTP/1.1).
    Start,
    /// Between frames.
    Frames,
    /// In the payload of a frame that passes as it is: bytes left.
    Forward(usize),
    /// Not HTTP/2, or something did not parse: everything passes.
    Through,
}

/// A connection whose HTTP/2 requests get a valid `:authority` (see the
/// module docs). Writes go straight through.
pub struct FixAuthority<S> {
    inner: S,
    state: State,
    /// Read from `inner`, not yet examined.
    input: BytesMut,
    /// Ready for the reader.
    output: BytesMut,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            state: State::Start,
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
        }
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) {
        loop {
            match self.state {
                State::Through => {
                    let all = self.input.split();
                    self.output.unsplit(all);
                    return;
                }
                State::Start => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.state = State::Through;
                    } else if n == PREFACE.len() {
                        let preface = self.input.split_to(n);
                        self.output.unsplit(preface);
                        self.state = State::Frames;
                    } else if self.eof {
                        self.state = State::Through;
                    } else {
                        return;
                    }
                }
                State::Forward(left) => {
                    let n = left.min(self.input.len());
                    let part = self.input.split_to(n);
                    self.output.unsplit(part);
                    if n < left {
                        self.state = State::Forward(left - n);
                        return;
                    }
                    self.state = State::Frames;
                }
                State::Frames => {
                    let Some((len, kind, _)) = frame_header(&self.input) else {
                        if self.eof {
                            self.state = State::Through;
                            continue;
                        }
                        return;
                    };
                    if kind != HEADERS {
                        let header = self.input.split_to(FRAME_HEADER);
                        self.output.unsplit(header);
                        self.state = State::Forward(len);
                        continue;
                    }
                    match headers_extent(&self.input) {
                        Extent::Whole(end) => {
                            let frames = self.input.split_to(end);
                            match repair_frames(&frames) {
                                Some(fixed) => self.output.extend_from_slice(&fixed),
                                None => self.output.unsplit(frames),
                            }
                        }
                        Extent::Partial if !self.eof && self.input.len() <= MAX_BLOCK => return,
                        _ => self.state = State::Through,
                    }
                }
            }
        }
    }
}

/// A frame header at the start of `buf`: (payload length, type, flags).
fn frame_header(buf: &[u8]) -> Option<(usize, u8, u8)> {
    let h = buf.get(..FRAME_HEADER)?;
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    Some((len, h[3], h[4]))
}

enum Extent {
    /// The HEADERS frame and its CONTINUATIONs end at this offset.
    Whole(usize),
    /// More bytes are needed.
    Partial,
    /// Not a well-formed sequence.
    Bad,
}

/// Where the header block that starts `buf` (a HEADERS frame) ends.
fn headers_extent(buf: &[u8]) -> Extent {
    let mut at = 0;
    loop {
        let Some((len, kind, flags)) = frame_header(&buf[at..]) else {
            return Extent::Partial;
        };
        if at > 0 && kind != CONTINUATION {
            return Extent::Bad;
        }
        at += FRAME_HEADER + len;
        if buf.len() < at {
            return Extent::Partial;
        }
        if flags & END_HEADERS != 0 {
            return Extent::Whole(at);
        }
    }
}

/// The frames of one header block (HEADERS and its CONTINUATIONs), with
/// an `:authority` repaired; `None` when nothing needs repair or the block
/// does not parse.
fn repair_frames(frames: &[u8]) -> Option<Vec<u8>> {
    let (len, _, flags) = frame_header(frames)?;
    let stream = frames.get(5..FRAME_HEADER)?;
    let mut payload = frames.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*payload.first()?);
        payload = &payload[1..];
    }
    let priority = if flags & PRIORITY != 0 {
        let p = payload.get(..5)?;
        payload = &payload[5..];
        Some(p)
    } else {
        None
    };
    let mut block = payload.get(..payload.len().checked_sub(pad)?)?.to_vec();
    let mut at = FRAME_HEADER + len;
    while at < frames.len() {
        let (len, _, _) = frame_header(&frames[at..])?;
        block.extend_from_slice(frames.get(at + FRAME_HEADER..at + FRAME_HEADER + len)?);
        at += FRAME_HEADER + len;
    }
    let block = repair_block(&block)?;

    // One HEADERS frame (no padding), then CONTINUATIONs if it is long.
    let mut out = Vec::with_capacity(block.len() + 32);
    let first_room = MAX_FRAME - priority.map_or(0, <[u8]>::len);
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let keep = flags & !(PADDED | END_HEADERS);
    let end = if rest.is_empty() { END_HEADERS } else { 0 };
    let first_len = first.len() + priority.map_or(0, <[u8]>::len);
    put_frame_header(&mut out, first_len, HEADERS, keep | end, stream);
    out.extend_from_slice(priority.unwrap_or(&[]));
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (part, next) = rest.split_at(rest.len().min(MAX_FRAME));
        let end = if next.is_empty() { END_HEADERS } else { 0 };
        put_frame_header(&mut out, part.len(), CONTINUATION, end, stream);
        out.extend_from_slice(part);
        rest = next;
    }
    Some(out)
}

fn put_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: &[u8]) {
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(stream);
}

/// An HPACK integer with an `n`-bit prefix at `buf[at..]`: (value, bytes).
fn integer(buf: &[u8], at: usize, n: u8) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*buf.get(at)?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    let mut i = at + 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        value = value.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, i - at));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// An HPACK string at `buf[at..]`: (its octets as sent, Huffman-coded?,
/// bytes taken).
fn string(buf: &[u8], at: usize) -> Option<(&[u8], bool, usize)> {
    let huffman = *buf.get(at)? & 0x80 != 0;
    let (len, n) = integer(buf, at, 7)?;
    let start = at + n;
    let octets = buf.get(start..start.checked_add(len)?)?;
    Some((octets, huffman, n + len))
}

fn decoded(octets: &[u8], huffman: bool) -> Option<Vec<u8>> {
    if huffman {
        loona_hpack::huffman::HuffmanDecoder::new()
            .decode(octets)
            .ok()
    } else {
        Some(octets.to_vec())
    }
}

/// A header block with every `:authority` value that is not an authority
/// replaced (see `repaired`); `None` if there is none or the block does
/// not parse.
fn repair_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut copied = 0;
    let mut at = 0;
    while at < block.len() {
        let b = block[at];
        let prefix = if b & 0x80 != 0 {
            // Indexed field: refers to a table entry as it is.
            at += integer(block, at, 7)?.1;
            continue;
        } else if b & 0xc0 == 0x40 {
            6 // literal, added to the table
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            at += integer(block, at, 5)?.1;
            continue;
        } else {
            4 // literal, not added (or never added)
        };
        let (name_index, n) = integer(block, at, prefix)?;
        at += n;
        let authority = if name_index == 0 {
            let (name, huffman, n) = string(block, at)?;
            at += n;
            decoded(name, huffman)?.as_slice() == b":authority"
        } else {
            name_index == 1 // the static table's `:authority`
        };
        let value_at = at;
        let (value, huffman, n) = string(block, at)?;
        at += n;
        if !authority {
            continue;
        }
        if let Some(fixed) = repaired(&decoded(value, huffman)?) {
            out.extend_from_slice(&block[copied..value_at]);
            put_string(&mut out, &fixed);
            copied = at;
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&block[copied..]);
    Some(out)
}

/// An HPACK string, not Huffman-coded.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// The value to put in place of `value` if it is not an authority the
/// HTTP server takes: the same length, every byte outside a host name's
/// characters turned into `-`. `None` if it is one already (or empty,
/// which cannot be given the same length).
fn repaired(value: &[u8]) -> Option<Vec<u8>> {
    if value.is_empty() || axum::http::uri::Authority::try_from(value).is_ok() {
        return None;
    }
    Some(
        value
            .iter()
            .map(|&c| match c {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => c,
                _ => b'-',
            })
            .collect(),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Everything passes as it is: read straight into the caller's
            // buffer.
            if matches!(this.state, State::Through) && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.input.reserve(16 * 1024);
            let spare = this.input.spare_capacity_mut();
            let mut read = ReadBuf::uninit(spare);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        this.eof = true;
                    }
                    // SAFETY: `read` filled these `n` bytes of the spare
                    // capacity.
                    unsafe { this.input.set_len(this.input.len() + n) };
                    this.process();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A header block: `:method: POST` (static 3), `:authority` as a
    /// literal added to the table (name: static 1) with `value`, then
    /// `:path` as a literal not added, raw.
    fn block(value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x41];
        put_string(&mut b, value);
        b.extend_from_slice(&[0x04]);
        put_string(&mut b, b"/etcdserverpb.Maintenance/Status");
        b
    }

    fn headers_frame(block: &[u8], flags: u8, stream: u32) -> Vec<u8> {
        let mut f = Vec::new();
        put_frame_header(&mut f, block.len(), HEADERS, flags, &stream.to_be_bytes());
        f.extend_from_slice(block);
        f
    }

    /// Runs bytes through `FixAuthority` in chunks of `chunk`.
    fn through(input: &[u8], chunk: usize) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let data = input.to_vec();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                for part in data.chunks(chunk.max(1)) {
                    client.write_all(part).await.expect("write");
                }
                drop(client);
            });
            let mut fixed = FixAuthority::new(server);
            let mut out = Vec::new();
            fixed.read_to_end(&mut out).await.expect("read");
            writer.await.expect("writer");
            out
        })
    }

    fn decode_all(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("a valid header block")
    }

    #[test]
    fn a_url_authority_becomes_a_host_name_of_the_same_length() {
        let bad = b"http://127.0.0.1:2379";
        let fixed = repair_block(&block(bad)).expect("repaired");
        let fields = decode_all(&fixed);
        assert_eq!(fields[1].0, b":authority");
        assert_eq!(fields[1].1, b"http---127.0.0.1-2379");
        assert_eq!(fields[1].1.len(), bad.len());
        assert_eq!(fields[2].1, b"/etcdserverpb.Maintenance/Status");
        assert!(repaired(b"#initially=[http://a:2379;http://b:2379]").is_some());
        // Valid ones stay as they are.
        assert_eq!(repair_block(&block(b"127.0.0.1:2379")), None);
        assert_eq!(repair_block(&block(b"example.com")), None);
    }

    #[test]
    fn the_stream_is_rewritten_only_where_needed() {
        let mut input = PREFACE.to_vec();
        // SETTINGS (type 4), empty.
        input.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        input.extend(headers_frame(&block(b"http://h:1"), END_HEADERS, 1));
        // DATA (type 0) on stream 1 with bytes that look like a header.
        let data = headers_frame(b"\x41\x0ahttp://h:1", 0, 9);
        input.extend_from_slice(&[0, 0, data.len() as u8, 0, 1, 0, 0, 0, 1]);
        input.extend_from_slice(&data);
        input.extend(headers_frame(&block(b"fine:2"), END_HEADERS, 3));
        for chunk in [1, 7, 4096] {
            let out = through(&input, chunk);
            assert_eq!(out.len(), input.len(), "chunk {chunk}");
            let diff: Vec<usize> = (0..out.len()).filter(|&i| out[i] != input[i]).collect();
            // Only the first request's authority changed: "://" and ":".
            assert_eq!(diff.len(), 4, "chunk {chunk}: {diff:?}");
        }
    }

    #[test]
    fn split_and_padded_header_blocks_come_out_whole() {
        let b = block(b"http://h:1");
        let (one, two) = b.split_at(5);
        let mut input = PREFACE.to_vec();
        // HEADERS, padded (pad length 3), without END_HEADERS.
        let mut first = vec![3];
        first.extend_from_slice(one);
        first.extend_from_slice(&[0, 0, 0]);
        input.extend(headers_frame(&first, PADDED | 0x1, 1));
        let mut cont = Vec::new();
        put_frame_header(
            &mut cont,
            two.len(),
            CONTINUATION,
            END_HEADERS,
            &1u32.to_be_bytes(),
        );
        cont.extend_from_slice(two);
        input.extend(cont);
        let out = through(&input, 3);
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let (len, kind, flags) = frame_header(&out[PREFACE.len()..]).expect("frame");
        assert_eq!((kind, flags), (HEADERS, END_HEADERS | 0x1));
        let start = PREFACE.len() + FRAME_HEADER;
        let fields = decode_all(&out[start..start + len]);
        assert_eq!(fields[1].1, b"http---h-1");
        assert_eq!(out.len(), start + len);
    }

    #[test]
    fn other_protocols_pass_untouched() {
        let req = b"GET /health HTTP/1.1\r\nhost: http://x\r\n\r\n".to_vec();
        assert_eq!(through(&req, 5), req);
        assert_eq!(through(b"PRI * HTTP/2", 3), b"PRI * HTTP/2");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_pass_without_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            chunk in 1usize..50,
        ) {
            let _ = repair_block(&body);
            let _ = repair_frames(&body);
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&body);
            let out = through(&input, chunk);
            proptest::prop_assert!(out.starts_with(PREFACE));
        }
    }
}
