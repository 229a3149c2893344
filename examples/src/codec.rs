//! Little-endian, length-prefixed primitives shared by the example
//! services' encodings, and their decode error. The reader is
//! bounds-checked: decoding never panics on malformed input.

use bytes::{BufMut, Bytes};
use std::fmt;

/// Why a message or snapshot could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended early.
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    /// A tag byte with no meaning here.
    UnknownTag {
        what: &'static str,
        found: u8,
        expected: &'static str,
    },
    /// Bytes left over after the last field.
    Trailing { what: &'static str, extra: usize },
    /// A field that decoded but is not acceptable.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated {
                what,
                needed,
                available,
            } => write!(
                f,
                "truncated {what}: needed {needed} bytes, found {available}"
            ),
            DecodeError::UnknownTag {
                what,
                found,
                expected,
            } => write!(f, "unknown {what} tag {found}, expected {expected}"),
            DecodeError::Trailing { what, extra } => {
                write!(f, "{what} has {extra} trailing bytes after its last field")
            }
            DecodeError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends fields; byte strings are a `u32` length then the bytes.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(tag: u8) -> Writer {
        let mut w = Writer::raw();
        w.u8(tag);
        w
    }
    pub(crate) fn raw() -> Writer {
        Writer {
            buf: Vec::with_capacity(32),
        }
    }
    /// Appends to `buf`, which keeps what it holds (a snapshot's buffer:
    /// `Service::snapshot` appends to the one the runtime hands it).
    pub(crate) fn onto(buf: Vec<u8>) -> Writer {
        Writer { buf }
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.put_u32_le(v);
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.put_u64_le(v);
        self
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.put_slice(&b[..len as usize]);
        self
    }
    pub(crate) fn raw_bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.put_slice(b);
        self
    }
    pub(crate) fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }
    pub(crate) fn finish(self) -> Bytes {
        Bytes::from(self.buf)
    }
    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields back, checking every bound.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { data, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.data.len() {
            return Err(DecodeError::Truncated {
                what: self.what,
                needed: n,
                available: self.data.len(),
            });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }
    /// The tag byte that starts a message.
    pub(crate) fn tag(&mut self) -> Result<u8, DecodeError> {
        self.u8().map_err(|_| {
            DecodeError::Invalid(format!("empty {}, expected at least a tag byte", self.what))
        })
    }
    /// A list count; each element needs at least `min_elem` bytes, so a
    /// hostile count cannot make the caller reserve huge memory.
    pub(crate) fn count(&mut self, min_elem: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        let needed = n.saturating_mul(min_elem.max(1));
        if needed > self.data.len() {
            return Err(DecodeError::Truncated {
                what: self.what,
                needed,
                available: self.data.len(),
            });
        }
        Ok(n)
    }
    /// Checks a 4-byte magic.
    pub(crate) fn magic(&mut self, expected: &[u8; 4]) -> Result<(), DecodeError> {
        let found: [u8; 4] = self.array()?;
        if &found != expected {
            return Err(DecodeError::Invalid(format!(
                "{} has magic {}, expected {}",
                self.what,
                keel_core::MagicText(&found),
                keel_core::MagicText(expected)
            )));
        }
        Ok(())
    }
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                what: self.what,
                extra: self.data.len(),
            })
        }
    }
}
