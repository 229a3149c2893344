//! keel-kv: Keel's replicated key-value service on the native protocol.
//! Keys and values are bytes with etcd-style MVCC metadata (store revision;
//! per key create revision, mod revision, version). Commands (put, delete,
//! delete range, compare-and-swap) go through the log; queries (get, range,
//! status) are read-only. Only the latest value per key is kept for now;
//! `store::Write` records events so history can be added on top.

mod codec;
pub mod error;
pub mod proto;
pub mod service;
pub mod store;

pub use error::{ErrorCode, KvError};
pub use proto::{
    check_key, check_value, prefix_end, Command, Compare, KeyValue, Query, Response, MAX_KEY_LEN,
    MAX_VALUE_LEN,
};
pub use service::KvService;
pub use store::{Event, Store, Write};

#[cfg(test)]
mod tests;
