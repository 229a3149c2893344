//! etcd's lessor `Promote(extend)`: a member that becomes leader gives
//! every lease its whole TTL again *plus an election timeout*, counted from
//! when it took over, so a lease whose holder was cut off by the failover
//! has the time to find the new leader and renew. Keel's KV service does
//! the first part itself, deterministically: the new leader's term-start
//! entry gives every lease its TTL from that entry's log time (see
//! `keel_kv`, `refresh_leases`). The extension is added here, by the new
//! leader's etcd API: an election timeout after it took over, it renews
//! every lease (a `LeaseKeepAlive` command each, through the log), so each
//! then expires a TTL after a time at least an election timeout past the
//! term start, as in etcd (which uses its own election timeout).
//!
//! Done with commands every replica already knows, rather than by changing
//! what the term-start entry does, so logs written before replay as they
//! were first applied, and nodes of the previous version apply the same
//! entries during a rolling upgrade. The cost is one log entry per lease
//! per leader change (etcd refreshes its leases in memory). A leader whose
//! node serves no etcd API adds no extension.

use crate::Api;
use keel_kv::{Command, Query, Response};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// How often the loop looks whether this member became leader.
const POLL: Duration = Duration::from_millis(50);

/// Renewals in flight at once.
const IN_FLIGHT: usize = 32;

/// The leader-side loop: runs on the API's runtime until the node stops.
pub(crate) async fn run(api: Arc<Api>) {
    let extend = api.config.election_timeout;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last term this member led and extended the leases in.
    let mut extended: Option<u64> = None;
    loop {
        tick.tick().await;
        if api.node.is_stopped() {
            return;
        }
        let st = api.node.status();
        if st.role != "leader" || extended == Some(st.term) {
            continue;
        }
        extended = Some(st.term);
        // The term-start entry was stamped when this member took over,
        // before it reported itself leader: an election timeout from now
        // is at least that long after it.
        tokio::time::sleep(extend).await;
        let st = api.node.status();
        if st.role != "leader" || st.term != extended.unwrap_or_default() {
            continue;
        }
        match extend_leases(&api).await {
            Ok(n) => tracing::debug!(
                "term {}: {n} leases renewed an election timeout ({extend:?}) after it started, \
                 as etcd's new leader extends them",
                st.term
            ),
            Err(e) => tracing::debug!("term {}: extending the leases stopped: {e}", st.term),
        }
    }
}

/// Renews every lease once; how many were renewed. Stops at the first
/// failure that is not the lease's own (gone or expired meanwhile): this
/// member no longer leads, or stops.
async fn extend_leases(api: &Arc<Api>) -> Result<usize, tonic::Status> {
    let ids = match api.read(&Query::Leases, true).await? {
        Response::Leases { ids, .. } => ids,
        other => return Err(crate::unexpected(&other)),
    };
    let mut renewed = 0;
    let mut pending = ids.into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < IN_FLIGHT {
            let Some(id) = pending.next() else { break };
            let api = api.clone();
            running.spawn(async move { api.write(&Command::LeaseKeepAlive { id }).await });
        }
        let Some(done) = running.join_next().await else {
            return Ok(renewed);
        };
        match done {
            Ok(Ok(_)) => renewed += 1,
            Ok(Err(s)) if s.code() == Code::NotFound => {}
            Ok(Err(s)) => return Err(s),
            Err(e) => return Err(tonic::Status::internal(format!("lease renewal task: {e}"))),
        }
    }
}
