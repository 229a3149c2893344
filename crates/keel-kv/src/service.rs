//! `KvService`: the KV store as a Keel `Service`. Decodes and validates
//! commands and queries, applies them to the `Store`, encodes replies, and
//! owns the service snapshot format (`KKV1`).
//!
//! Snapshot: magic `KKV1`, applied-commands `u64`, store revision `u64`,
//! key count `u64`, then per key in increasing key order: key, value (each
//! `u32` length + bytes), create revision, mod revision, version (`u64`).

use crate::codec::{Reader, Writer};
use crate::error::KvError;
use crate::proto::{Command, KeyValue, Query, Response};
use crate::store::Store;
use bytes::Bytes;
use keel_core::{ClientId, Context, Service};

const SNAPSHOT_MAGIC: [u8; 4] = *b"KKV1";

/// The replicated key-value service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvService {
    store: Store,
    applied: u64,
}

impl KvService {
    pub fn new() -> KvService {
        KvService::default()
    }

    /// Store revision: the number of writes that changed something.
    pub fn revision(&self) -> u64 {
        self.store.revision()
    }

    /// Commands applied (valid ones, whether or not they changed anything;
    /// malformed or invalid commands are rejected and not counted).
    pub fn applied_commands(&self) -> u64 {
        self.applied
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.store.get(key)
    }

    /// See `Store::range`.
    pub fn range(&self, start: &[u8], end: &[u8], limit: u64) -> (Vec<KeyValue>, bool, u64) {
        self.store.range(start, end, limit)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Validates and applies one command. An invalid command changes
    /// nothing and yields an error reply.
    pub fn apply(&mut self, cmd: Command) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::error(&e);
        }
        self.applied = self.applied.wrapping_add(1);
        let mut w = self.store.write();
        match cmd {
            Command::Put { key, value } => {
                let (prev, _) = w.put(key, value);
                let (revision, _) = w.commit();
                Response::Put { revision, prev }
            }
            Command::Delete { key } => {
                let prev = w.delete(&key);
                let (revision, _) = w.commit();
                Response::Delete {
                    revision,
                    deleted: u64::from(prev.is_some()),
                    prev,
                }
            }
            Command::DeleteRange { start, end } => {
                let prev = w.delete_range(&start, &end);
                let (revision, _) = w.commit();
                Response::DeleteRange {
                    revision,
                    deleted: prev.len() as u64,
                    prev,
                }
            }
            Command::Cas {
                key,
                expected,
                value,
            } => {
                let current = w.get(&key);
                if expected.matches(current.as_ref()) {
                    let (_, kv) = w.put(key, value);
                    let (revision, _) = w.commit();
                    Response::Cas {
                        succeeded: true,
                        revision,
                        current: Some(kv),
                    }
                } else {
                    let (revision, _) = w.commit();
                    Response::Cas {
                        succeeded: false,
                        revision,
                        current,
                    }
                }
            }
        }
    }

    /// Validates and answers one query.
    pub fn read(&self, q: &Query) -> Response {
        if let Err(e) = q.validate() {
            return Response::error(&e);
        }
        let revision = self.store.revision();
        match q {
            Query::Get { key } => Response::Get {
                revision,
                kv: self.store.get(key),
            },
            Query::Range { start, end, limit } => {
                let (kvs, more, count) = self.store.range(start, end, *limit);
                Response::Range {
                    revision,
                    kvs,
                    more,
                    count,
                }
            }
            Query::Status => Response::Status {
                revision,
                keys: self.store.len() as u64,
                applied: self.applied,
            },
        }
    }

    /// Decodes a snapshot made by `Service::snapshot`.
    pub fn decode_snapshot(data: &[u8]) -> Result<KvService, KvError> {
        let mut r = Reader::new(data, "snapshot");
        let magic: [u8; 4] = r.array()?;
        if magic != SNAPSHOT_MAGIC {
            return Err(KvError::BadMagic {
                found: magic,
                expected: SNAPSHOT_MAGIC,
            });
        }
        let applied = r.u64()?;
        let store = Store::decode_from(&mut r)?;
        r.finish()?;
        Ok(KvService { store, applied })
    }
}

impl Service for KvService {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        *self = match snapshot {
            None => KvService::new(),
            Some(data) => KvService::decode_snapshot(data).map_err(|e| e.to_string())?,
        };
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer::raw();
        w.raw_bytes(&SNAPSHOT_MAGIC).u64(self.applied);
        self.store.encode_into(&mut w);
        w.finish().to_vec()
    }

    fn on_message(&mut self, _ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        match Command::decode(data) {
            Ok(cmd) => self.apply(cmd).encode(),
            Err(e) => Response::error(&e).encode(),
        }
    }

    fn query(&self, data: &[u8]) -> Bytes {
        match Query::decode(data) {
            Ok(q) => self.read(&q).encode(),
            Err(e) => Response::error(&e).encode(),
        }
    }
}
