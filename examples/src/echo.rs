//! `EchoService`: replies to every command with the command's bytes
//! unchanged and counts messages and bytes; used by the latency benchmark.
//!
//! Encoding: a command is any bytes; its reply is the same bytes. A query
//! is any bytes (ignored); its reply is `messages: u64, bytes: u64`
//! little-endian (see `EchoStats::decode`). Snapshot: magic `ECH1`, then
//! `messages: u64, bytes: u64`.

use crate::codec::{DecodeError, Reader, Writer};
use bytes::Bytes;
use keel_core::{ClientId, Context, Service};

const SNAPSHOT_MAGIC: [u8; 4] = *b"ECH1";

/// What the echo service has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// Commands applied.
    pub messages: u64,
    /// Command bytes applied.
    pub bytes: u64,
}

impl EchoStats {
    pub fn encode(&self) -> Bytes {
        let mut w = Writer::raw();
        w.u64(self.messages).u64(self.bytes);
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<EchoStats, DecodeError> {
        let mut r = Reader::new(data, "echo stats");
        let s = EchoStats {
            messages: r.u64()?,
            bytes: r.u64()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// Echoes commands back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoService {
    stats: EchoStats,
}

impl EchoService {
    pub fn new() -> EchoService {
        EchoService::default()
    }

    pub fn stats(&self) -> EchoStats {
        self.stats
    }

    /// Commands applied so far.
    pub fn messages(&self) -> u64 {
        self.stats.messages
    }
}

impl Service for EchoService {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        let Some(data) = snapshot else {
            *self = EchoService::new();
            return Ok(());
        };
        let mut r = Reader::new(data, "echo snapshot");
        r.magic(&SNAPSHOT_MAGIC).map_err(|e| e.to_string())?;
        let stats = EchoStats {
            messages: r.u64().map_err(|e| e.to_string())?,
            bytes: r.u64().map_err(|e| e.to_string())?,
        };
        r.finish().map_err(|e| e.to_string())?;
        self.stats = stats;
        Ok(())
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        let mut w = Writer::onto(std::mem::take(out));
        w.raw_bytes(&SNAPSHOT_MAGIC)
            .u64(self.stats.messages)
            .u64(self.stats.bytes);
        *out = w.into_vec();
    }

    fn on_message(&mut self, _ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        self.stats.messages = self.stats.messages.wrapping_add(1);
        self.stats.bytes = self.stats.bytes.wrapping_add(data.len() as u64);
        Bytes::copy_from_slice(data)
    }

    fn query(&self, _data: &[u8]) -> Bytes {
        self.stats.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;
    use proptest::prelude::*;

    #[test]
    fn echoes_and_counts() {
        let mut h = Harness::new(EchoService::new());
        assert_eq!(h.raw(Bytes::from_static(b"hello")), &b"hello"[..]);
        assert_eq!(h.raw(Bytes::new()), &b""[..]);
        let payload = Bytes::from(vec![7u8; 200]);
        assert_eq!(h.raw(payload.clone()), payload);
        assert_eq!(h.svc().messages(), 3);
        assert_eq!(
            EchoStats::decode(&h.host.query(b"")).unwrap(),
            EchoStats {
                messages: 3,
                bytes: 205
            }
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let mut h = Harness::new(EchoService::new());
        h.raw(Bytes::from_static(b"abc"));
        let snap = h.svc().snapshot_vec();
        let mut b = EchoService::new();
        b.restore(Some(&snap)).unwrap();
        assert_eq!(&b, h.svc());
        assert!(b.restore(Some(&snap[..snap.len() - 1])).is_err());
        // Another service's snapshot is named by its magic, as text.
        assert_eq!(
            b.restore(Some(b"KKV2 and a KV store")).unwrap_err(),
            r#"echo snapshot has magic "KKV2", expected "ECH1""#
        );
        assert!(b.restore(Some(b"XXXX0000000000000000")).is_err());
        let h2 = h.restored(EchoService::new());
        assert_eq!(h2.svc(), h.svc());
        b.restore(None).unwrap();
        assert_eq!(b, EchoService::new());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = EchoStats::decode(&data);
            let mut s = EchoService::new();
            let _ = s.restore(Some(&data));
            let mut m = b"ECH1".to_vec();
            m.extend_from_slice(&data);
            let _ = s.restore(Some(&m));
        }
    }
}
