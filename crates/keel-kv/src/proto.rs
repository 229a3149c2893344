//! The KV service's native wire protocol: commands (writes through the log),
//! queries (reads), responses, and their binary encoding and validation.
//!
//! # Encoding
//!
//! Every message is one tag byte followed by its fields in order, all
//! little-endian: `u64` is 8 bytes, `bool` one byte (0 or 1), a byte string
//! is a `u32` length then the bytes, an `Option<T>` is a bool then `T` if
//! present, a list is a `u32` count then the elements. No trailing bytes.
//!
//! ```text
//! Command
//!   1 Put          key, value
//!   2 Delete       key
//!   3 DeleteRange  start, end            (end as in Range)
//!   4 Cas          key, compare, value
//! Compare
//!   1 ValueEquals        value
//!   2 VersionEquals      u64             (0 = key absent)
//!   3 ModRevisionEquals  u64             (0 = key absent)
//! Query
//!   1 Get          key
//!   2 Range        start, end, limit:u64 (limit 0 = unlimited)
//!   3 Status
//! Response
//!   1 Put          revision, prev:Option<KeyValue>
//!   2 Delete       revision, deleted:u64, prev:Option<KeyValue>
//!   3 DeleteRange  revision, deleted:u64, prev:List<KeyValue>
//!   4 Cas          succeeded:bool, revision, current:Option<KeyValue>
//!   5 Get          revision, kv:Option<KeyValue>
//!   6 Range        revision, kvs:List<KeyValue>, more:bool, count:u64
//!   7 Status       revision, keys:u64, applied:u64
//!   255 Error      code:u8, message (UTF-8)
//! KeyValue         key, value, create_revision, mod_revision, version
//! ```
//!
//! Range bounds follow etcd: an empty `end` means the single key `start`;
//! `end == [0]` means every key `>= start`; otherwise `[start, end)`.
//! `prefix_end` computes the `end` that selects every key with a prefix.

use crate::codec::{Reader, Writer};
use crate::error::{ErrorCode, KvError};
use bytes::Bytes;

/// Largest key (and range bound) accepted, in bytes.
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Largest value accepted, in bytes (etcd's default request limit).
pub const MAX_VALUE_LEN: usize = 1536 * 1024;

/// A key with its value and MVCC metadata, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// Store revision of the put that created the key (since its last delete).
    pub create_revision: u64,
    /// Store revision of the last put to the key.
    pub mod_revision: u64,
    /// Puts since creation: 1 on create.
    pub version: u64,
}

/// Condition of a compare-and-swap, checked against the key's current state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Compare {
    /// The key exists and its value equals this.
    ValueEquals(Bytes),
    /// The key's version equals this; 0 means the key is absent.
    VersionEquals(u64),
    /// The key's mod revision equals this; 0 means the key is absent.
    ModRevisionEquals(u64),
}

impl Compare {
    /// Does the key's current state (None = absent) satisfy the condition?
    pub fn matches(&self, current: Option<&KeyValue>) -> bool {
        match (self, current) {
            (Compare::ValueEquals(v), Some(kv)) => kv.value == *v,
            (Compare::ValueEquals(_), None) => false,
            (Compare::VersionEquals(v), kv) => kv.map_or(0, |kv| kv.version) == *v,
            (Compare::ModRevisionEquals(r), kv) => kv.map_or(0, |kv| kv.mod_revision) == *r,
        }
    }
}

/// A write, applied through the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Delete every key in a range (bounds as in `Query::Range`).
    DeleteRange {
        start: Bytes,
        end: Bytes,
    },
    /// Put `value` at `key` if `expected` holds, atomically.
    Cas {
        key: Bytes,
        expected: Compare,
        value: Bytes,
    },
}

/// A read-only request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    Get {
        key: Bytes,
    },
    /// Keys in `[start, end)` in key order (see the module docs for the
    /// meaning of an empty `end` and of `end == [0]`), at most `limit` of
    /// them (0 = no limit).
    Range {
        start: Bytes,
        end: Bytes,
        limit: u64,
    },
    /// The store revision, number of keys and of applied commands.
    Status,
}

impl Query {
    /// A range over every key starting with `prefix` (every key if empty).
    pub fn prefix(prefix: impl Into<Bytes>, limit: u64) -> Query {
        let start: Bytes = prefix.into();
        let end = prefix_end(&start);
        Query::Range { start, end, limit }
    }
}

/// The service's answer to a command or a query.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    Put {
        revision: u64,
        prev: Option<KeyValue>,
    },
    Delete {
        revision: u64,
        deleted: u64,
        prev: Option<KeyValue>,
    },
    DeleteRange {
        revision: u64,
        deleted: u64,
        prev: Vec<KeyValue>,
    },
    /// `current`: on success the key as written, on failure the key as it
    /// is (None if absent). `revision` is the store revision afterwards.
    Cas {
        succeeded: bool,
        revision: u64,
        current: Option<KeyValue>,
    },
    Get {
        revision: u64,
        kv: Option<KeyValue>,
    },
    /// `count`: keys in the range regardless of `limit`; `more`: some were
    /// left out because of the limit.
    Range {
        revision: u64,
        kvs: Vec<KeyValue>,
        more: bool,
        count: u64,
    },
    Status {
        revision: u64,
        keys: u64,
        applied: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// The `end` of the range holding every key that starts with `prefix`: the
/// prefix with trailing 0xff bytes dropped and its last byte incremented.
/// When there is no such key (empty prefix or all 0xff) it returns `[0]`,
/// which as a range end means "to the end of the key space".
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            Bytes::from(end)
        }
        None => Bytes::from_static(&[0]),
    }
}

/// Checks a key that must name one key.
pub fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey { max: MAX_KEY_LEN });
    }
    check_bound(key)
}

fn check_bound(key: &[u8]) -> Result<(), KvError> {
    if key.len() > MAX_KEY_LEN {
        return Err(KvError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Checks a value.
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(KvError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks range bounds: `start` may be empty only if `end` is not.
fn check_range(start: &[u8], end: &[u8]) -> Result<(), KvError> {
    if end.is_empty() {
        check_key(start)
    } else {
        check_bound(start)?;
        check_bound(end)
    }
}

impl Compare {
    fn encode_into(&self, w: &mut Writer) {
        match self {
            Compare::ValueEquals(v) => w.u8(1).bytes(v),
            Compare::VersionEquals(v) => w.u8(2).u64(*v),
            Compare::ModRevisionEquals(r) => w.u8(3).u64(*r),
        };
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Compare, KvError> {
        Ok(match r.u8()? {
            1 => Compare::ValueEquals(r.bytes()?),
            2 => Compare::VersionEquals(r.u64()?),
            3 => Compare::ModRevisionEquals(r.u64()?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "compare",
                    found,
                    expected: "1..=3",
                })
            }
        })
    }
}

impl Command {
    pub fn encode(&self) -> Bytes {
        match self {
            Command::Put { key, value } => {
                let mut w = Writer::new(1);
                w.bytes(key).bytes(value);
                w.finish()
            }
            Command::Delete { key } => {
                let mut w = Writer::new(2);
                w.bytes(key);
                w.finish()
            }
            Command::DeleteRange { start, end } => {
                let mut w = Writer::new(3);
                w.bytes(start).bytes(end);
                w.finish()
            }
            Command::Cas {
                key,
                expected,
                value,
            } => {
                let mut w = Writer::new(4);
                w.bytes(key);
                expected.encode_into(&mut w);
                w.bytes(value);
                w.finish()
            }
        }
    }

    /// Decodes a command; does not check limits (see `validate`).
    pub fn decode(data: &[u8]) -> Result<Command, KvError> {
        let mut r = Reader::new(data, "command");
        let cmd = match r.u8().map_err(|_| KvError::Empty)? {
            1 => Command::Put {
                key: r.bytes()?,
                value: r.bytes()?,
            },
            2 => Command::Delete { key: r.bytes()? },
            3 => Command::DeleteRange {
                start: r.bytes()?,
                end: r.bytes()?,
            },
            4 => Command::Cas {
                key: r.bytes()?,
                expected: Compare::decode_from(&mut r)?,
                value: r.bytes()?,
            },
            found => {
                return Err(KvError::UnknownTag {
                    what: "command",
                    found,
                    expected: "1..=4",
                })
            }
        };
        r.finish()?;
        Ok(cmd)
    }

    /// Checks key and value limits.
    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            Command::Put { key, value } => {
                check_key(key)?;
                check_value(value)
            }
            Command::Delete { key } => check_key(key),
            Command::DeleteRange { start, end } => check_range(start, end),
            Command::Cas {
                key,
                expected,
                value,
            } => {
                check_key(key)?;
                if let Compare::ValueEquals(v) = expected {
                    check_value(v)?;
                }
                check_value(value)
            }
        }
    }
}

impl Query {
    pub fn encode(&self) -> Bytes {
        match self {
            Query::Get { key } => {
                let mut w = Writer::new(1);
                w.bytes(key);
                w.finish()
            }
            Query::Range { start, end, limit } => {
                let mut w = Writer::new(2);
                w.bytes(start).bytes(end).u64(*limit);
                w.finish()
            }
            Query::Status => Writer::new(3).finish(),
        }
    }

    /// Decodes a query; does not check limits (see `validate`).
    pub fn decode(data: &[u8]) -> Result<Query, KvError> {
        let mut r = Reader::new(data, "query");
        let q = match r.u8().map_err(|_| KvError::Empty)? {
            1 => Query::Get { key: r.bytes()? },
            2 => Query::Range {
                start: r.bytes()?,
                end: r.bytes()?,
                limit: r.u64()?,
            },
            3 => Query::Status,
            found => {
                return Err(KvError::UnknownTag {
                    what: "query",
                    found,
                    expected: "1..=3",
                })
            }
        };
        r.finish()?;
        Ok(q)
    }

    /// Checks key limits.
    pub fn validate(&self) -> Result<(), KvError> {
        match self {
            Query::Get { key } => check_key(key),
            Query::Range { start, end, .. } => check_range(start, end),
            Query::Status => Ok(()),
        }
    }
}

/// Smallest encoding of a `KeyValue`: two empty strings and three u64s.
const MIN_KV_LEN: usize = 4 + 4 + 3 * 8;

impl KeyValue {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.value)
            .u64(self.create_revision)
            .u64(self.mod_revision)
            .u64(self.version);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<KeyValue, KvError> {
        Ok(KeyValue {
            key: r.bytes()?,
            value: r.bytes()?,
            create_revision: r.u64()?,
            mod_revision: r.u64()?,
            version: r.u64()?,
        })
    }
}

fn encode_opt(w: &mut Writer, kv: &Option<KeyValue>) {
    match kv {
        Some(kv) => {
            w.bool(true);
            kv.encode_into(w);
        }
        None => {
            w.bool(false);
        }
    }
}

fn decode_opt(r: &mut Reader<'_>) -> Result<Option<KeyValue>, KvError> {
    if r.bool()? {
        Ok(Some(KeyValue::decode_from(r)?))
    } else {
        Ok(None)
    }
}

fn encode_list(w: &mut Writer, kvs: &[KeyValue]) {
    w.count(kvs.len());
    for kv in kvs {
        kv.encode_into(w);
    }
}

fn decode_list(r: &mut Reader<'_>) -> Result<Vec<KeyValue>, KvError> {
    let n = r.count(MIN_KV_LEN)?;
    let mut kvs = Vec::with_capacity(n);
    for _ in 0..n {
        kvs.push(KeyValue::decode_from(r)?);
    }
    Ok(kvs)
}

impl Response {
    /// The error reply for `err`.
    pub fn error(err: &KvError) -> Response {
        Response::Error {
            code: err.code(),
            message: err.to_string(),
        }
    }

    /// The error carried by an error reply, as a `KvError::Remote`.
    pub fn into_result(self) -> Result<Response, KvError> {
        match self {
            Response::Error { code, message } => Err(KvError::Remote { code, message }),
            r => Ok(r),
        }
    }

    pub fn encode(&self) -> Bytes {
        match self {
            Response::Put { revision, prev } => {
                let mut w = Writer::new(1);
                w.u64(*revision);
                encode_opt(&mut w, prev);
                w.finish()
            }
            Response::Delete {
                revision,
                deleted,
                prev,
            } => {
                let mut w = Writer::new(2);
                w.u64(*revision).u64(*deleted);
                encode_opt(&mut w, prev);
                w.finish()
            }
            Response::DeleteRange {
                revision,
                deleted,
                prev,
            } => {
                let mut w = Writer::new(3);
                w.u64(*revision).u64(*deleted);
                encode_list(&mut w, prev);
                w.finish()
            }
            Response::Cas {
                succeeded,
                revision,
                current,
            } => {
                let mut w = Writer::new(4);
                w.bool(*succeeded).u64(*revision);
                encode_opt(&mut w, current);
                w.finish()
            }
            Response::Get { revision, kv } => {
                let mut w = Writer::new(5);
                w.u64(*revision);
                encode_opt(&mut w, kv);
                w.finish()
            }
            Response::Range {
                revision,
                kvs,
                more,
                count,
            } => {
                let mut w = Writer::new(6);
                w.u64(*revision);
                encode_list(&mut w, kvs);
                w.bool(*more).u64(*count);
                w.finish()
            }
            Response::Status {
                revision,
                keys,
                applied,
            } => {
                let mut w = Writer::new(7);
                w.u64(*revision).u64(*keys).u64(*applied);
                w.finish()
            }
            Response::Error { code, message } => {
                let mut w = Writer::new(255);
                w.u8(*code as u8).bytes(message.as_bytes());
                w.finish()
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<Response, KvError> {
        let mut r = Reader::new(data, "response");
        let resp = match r.u8().map_err(|_| KvError::Empty)? {
            1 => Response::Put {
                revision: r.u64()?,
                prev: decode_opt(&mut r)?,
            },
            2 => Response::Delete {
                revision: r.u64()?,
                deleted: r.u64()?,
                prev: decode_opt(&mut r)?,
            },
            3 => Response::DeleteRange {
                revision: r.u64()?,
                deleted: r.u64()?,
                prev: decode_list(&mut r)?,
            },
            4 => Response::Cas {
                succeeded: r.bool()?,
                revision: r.u64()?,
                current: decode_opt(&mut r)?,
            },
            5 => Response::Get {
                revision: r.u64()?,
                kv: decode_opt(&mut r)?,
            },
            6 => Response::Range {
                revision: r.u64()?,
                kvs: decode_list(&mut r)?,
                more: r.bool()?,
                count: r.u64()?,
            },
            7 => Response::Status {
                revision: r.u64()?,
                keys: r.u64()?,
                applied: r.u64()?,
            },
            255 => {
                let code = ErrorCode::from_u8(r.u8()?)?;
                let message = String::from_utf8(r.bytes()?.to_vec())
                    .map_err(|_| KvError::InvalidUtf8("error message"))?;
                Response::Error { code, message }
            }
            found => {
                return Err(KvError::UnknownTag {
                    what: "response",
                    found,
                    expected: "1..=7 or 255",
                })
            }
        };
        r.finish()?;
        Ok(resp)
    }
}
