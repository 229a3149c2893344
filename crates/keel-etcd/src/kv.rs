//! etcd's KV service on keel-kv (being written).

use crate::Api;

/// The store's current revision.
pub async fn current_revision(_api: &Api) -> Option<i64> {
    None
}

/// An estimate of the store's size in bytes.
pub async fn db_size(_api: &Api) -> Option<i64> {
    None
}
