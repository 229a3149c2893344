//! Little-endian, length-prefixed primitives shared by every encoding of
//! the crate: a growable writer and a bounds-checked reader that never
//! panics on malformed input.

use crate::error::KvError;
use bytes::{BufMut, Bytes};

/// Appends fields to a buffer. Lengths are `u32` little-endian prefixes.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(tag: u8) -> Writer {
        let mut buf = Vec::with_capacity(64);
        buf.put_u8(tag);
        Writer { buf }
    }
    pub(crate) fn raw() -> Writer {
        Writer {
            buf: Vec::with_capacity(64),
        }
    }
    /// Appends to `buf`, which keeps what it holds.
    pub(crate) fn onto(buf: Vec<u8>) -> Writer {
        Writer { buf }
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }
    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.put_u32_le(v);
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.put_u64_le(v);
        self
    }
    pub(crate) fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.put_i64_le(v);
        self
    }
    /// A length-prefixed byte string. Lengths beyond `u32::MAX` are clamped
    /// (never produced: keys and values are far smaller).
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
    /// A count prefix for a list that follows.
    pub(crate) fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }
    pub(crate) fn finish(self) -> Bytes {
        Bytes::from(self.buf)
    }
    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf
    }
    /// Bytes written so far (since the last `clear`).
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf
    }
    /// Forgets what was written, keeping the buffer for more.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }
}

/// Reads fields back; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { data, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], KvError> {
        if n > self.data.len() {
            return Err(KvError::Truncated {
                what: self.what,
                needed: n,
                available: self.data.len(),
            });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], KvError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, KvError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn bool(&mut self) -> Result<bool, KvError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(KvError::InvalidBool(b)),
        }
    }
    pub(crate) fn u32(&mut self) -> Result<u32, KvError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, KvError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, KvError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bytes(&mut self) -> Result<Bytes, KvError> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }
    /// A length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, KvError> {
        let len = self.u32()? as usize;
        let b = self.take(len)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| KvError::InvalidUtf8(what))
    }
    /// A list count, checked against the bytes left so a hostile count
    /// cannot make the caller reserve huge memory: each element needs at
    /// least `min_elem` bytes.
    pub(crate) fn count(&mut self, min_elem: usize) -> Result<usize, KvError> {
        let n = self.u32()? as usize;
        let needed = n.saturating_mul(min_elem.max(1));
        if needed > self.data.len() {
            return Err(KvError::Truncated {
                what: self.what,
                needed,
                available: self.data.len(),
            });
        }
        Ok(n)
    }
    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), KvError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(KvError::Trailing {
                what: self.what,
                extra: self.data.len(),
            })
        }
    }
}
