//! etcd's Watch service: one bidirectional stream carries many watches.
//!
//! A stream is served from this node's own apply feed (the KV service's
//! watch events, published after each applied batch), never from the
//! leader, so leadership changes do not disturb it. Each watch keeps the
//! next revision it has to deliver (`next_rev`): events below it are
//! skipped, which makes delivery exactly once and in revision order. A
//! watch that starts in the past first catches up from the service's
//! retained history (`Query::Events`, read from this node's state), then
//! follows the feed. If the feed skips revisions or says the state was
//! replaced (this node installed a snapshot), or the stream fell behind and
//! the broadcast dropped notifications, every watch catches up from history
//! the same way. A watch
//! whose start is compacted away gets etcd's answer: a response with the
//! compaction revision, canceled.

use crate::convert::event_out;
use crate::Api;
use bytes::Bytes;
use keel_etcd_proto::etcdserverpb::watch_request::RequestUnion;
use keel_etcd_proto::etcdserverpb::watch_server::Watch;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::{EventType, Query, Response as KvResponse, WatchEvent};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

pub struct WatchApi(pub Arc<Api>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// Most events in one response (and asked of the history per query).
const EVENTS_PER_RESPONSE: usize = 1000;

/// etcd's watch id for a progress response that concerns every watch.
const ALL_WATCHES: i64 = -1;

#[derive(Clone, Debug)]
struct Watcher {
    key: Bytes,
    /// Empty: the single key; `[0]`: every key >= `key`; else `[key, range_end)`.
    range_end: Bytes,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// The next revision this watch has to deliver.
    next_rev: u64,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match &self.range_end[..] {
            [] => key == &self.key[..],
            [0] => key >= &self.key[..],
            end => key >= &self.key[..] && key < end,
        }
    }

    fn wants(&self, e: &WatchEvent) -> bool {
        let filtered = match e.kind {
            EventType::Put => self.no_put,
            EventType::Delete => self.no_delete,
        };
        !filtered && e.revision() >= self.next_rev && self.matches(&e.kv.key)
    }
}

/// Why a stream ended.
enum End {
    /// The client went away or closed its side.
    Client,
    /// The stream cannot go on (the node stopped, or a query failed).
    Error(Status),
}

/// The watch streams open on this member and their watches, for
/// `/metrics` (etcd's `etcd_debugging_mvcc_watch_stream_total` and
/// `etcd_debugging_mvcc_watcher_total`).
#[derive(Debug, Default)]
pub struct WatchGauges {
    /// Watch calls open (gRPC streams and gateway `/v3/watch` bodies).
    pub streams: AtomicI64,
    /// Watches created on those calls and not yet canceled or ended.
    pub watchers: AtomicI64,
}

struct Session {
    api: Arc<Api>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    /// How many of `watchers` the gauges count (`recount`).
    counted: i64,
    /// The next automatically chosen watch id (etcd starts at 0).
    next_id: i64,
    /// Every revision up to this one has been handed to every watch that
    /// wants it.
    feed_rev: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        let gauges = &self.api.watch_gauges;
        gauges.watchers.fetch_sub(self.counted, Ordering::Relaxed);
        gauges.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// Brings the watcher gauge up to date with `watchers`.
    fn recount(&mut self) {
        let now = self.watchers.len() as i64;
        let gauge = &self.api.watch_gauges.watchers;
        gauge.fetch_add(now - self.counted, Ordering::Relaxed);
        self.counted = now;
    }

    async fn send(&self, r: WatchResponse) -> Result<(), End> {
        self.out.send(Ok(r)).await.map_err(|_| End::Client)
    }

    fn header(&self, rev: u64) -> Option<ResponseHeader> {
        self.api.header(rev as i64)
    }

    async fn local_status(&self) -> Result<(u64, i64), End> {
        let (rev, compact, _) = self.api.local_revision().await.map_err(End::Error)?;
        Ok((rev, compact))
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), End> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    self.send(WatchResponse {
                        header: self.header(self.feed_rev),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.send(WatchResponse {
                    header: self.header(self.feed_rev),
                    watch_id: ALL_WATCHES,
                    ..Default::default()
                })
                .await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), End> {
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .send(WatchResponse {
                        header: self.header(self.feed_rev),
                        watch_id: c.watch_id,
                        created: true,
                        canceled: true,
                        cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream"
                            .into(),
                        ..Default::default()
                    })
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let (local_rev, _) = self.local_status().await?;
        let start = u64::try_from(c.start_revision).unwrap_or(0);
        let w = Watcher {
            key: c.key,
            range_end: c.range_end,
            prev_kv: c.prev_kv,
            no_put: c
                .filters
                .contains(&(watch_create_request::FilterType::Noput as i32)),
            no_delete: c
                .filters
                .contains(&(watch_create_request::FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
            next_rev: if start == 0 { local_rev + 1 } else { start },
        };
        let past = w.next_rev <= local_rev;
        self.watchers.insert(id, w);
        self.send(WatchResponse {
            header: self.header(local_rev),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        if past {
            self.catch_up(id).await?;
        }
        Ok(())
    }

    /// Delivers watch `id`'s events from its `next_rev` to this node's
    /// current revision, from the retained history.
    async fn catch_up(&mut self, id: i64) -> Result<(), End> {
        loop {
            let Some(w) = self.watchers.get(&id).cloned() else {
                return Ok(());
            };
            let q = Query::Events {
                start: w.key.clone(),
                end: w.range_end.clone(),
                from_revision: w.next_rev,
                limit: EVENTS_PER_RESPONSE as u64,
            };
            let (revision, compact, events, more) = match self.api.read(&q, true).await {
                Ok(KvResponse::Events {
                    revision,
                    compact_revision,
                    events,
                    more,
                }) => (revision, compact_revision, events, more),
                Ok(other) => return Err(End::Error(crate::unexpected(&other))),
                Err(s) if s.code() == Code::OutOfRange => {
                    // Compacted: etcd tells the watch where history now
                    // starts and cancels it (with no cancel reason: clients
                    // see ErrCompacted from the compact revision).
                    let (rev, compact) = self.local_status().await?;
                    self.watchers.remove(&id);
                    return self
                        .send(WatchResponse {
                            header: self.header(rev),
                            watch_id: id,
                            canceled: true,
                            compact_revision: compact.max(1),
                            ..Default::default()
                        })
                        .await;
                }
                Err(s) => return Err(End::Error(s)),
            };
            let last = events.last().map(WatchEvent::revision);
            // etcd reads an event's prev_kv at the revision before it: at
            // or below the compaction point that read fails, and the event
            // goes without ("if the previous KV is already compacted,
            // nothing will be returned").
            let wanted: Vec<_> = events
                .iter()
                .filter(|e| w.wants(e))
                .map(|e| event_out(e, w.prev_kv && e.revision() as i64 > compact))
                .collect();
            let header_rev = revision.max(last.unwrap_or(0));
            if !wanted.is_empty() {
                self.send(WatchResponse {
                    header: self.header(header_rev),
                    watch_id: id,
                    events: wanted,
                    ..Default::default()
                })
                .await?;
            }
            let Some(w) = self.watchers.get_mut(&id) else {
                return Ok(());
            };
            match (more, last) {
                (true, Some(last)) => w.next_rev = w.next_rev.max(last + 1),
                _ => {
                    w.next_rev = w.next_rev.max(revision + 1);
                    return Ok(());
                }
            }
        }
    }

    /// Catches every watch up to (at least) this node's current revision,
    /// which then becomes the feed position.
    async fn catch_up_all(&mut self) -> Result<(), End> {
        let (rev, _) = self.local_status().await?;
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.catch_up(id).await?;
        }
        self.feed_rev = self.feed_rev.max(rev);
        Ok(())
    }

    /// Hands one feed notification to the watches.
    async fn on_feed(&mut self, items: &[Bytes]) -> Result<(), End> {
        let mut events = Vec::with_capacity(items.len());
        for item in items {
            match WatchEvent::decode(item) {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::error!("undecodable watch event from the KV service: {e}");
                    return self.catch_up_all().await;
                }
            }
        }
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let (first, last) = (first.revision(), last.revision());
        if last <= self.feed_rev {
            return Ok(());
        }
        if first > self.feed_rev + 1 {
            // Revisions went missing on the way (snapshot installed here).
            return self.catch_up_all().await;
        }
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let wanted: Vec<_> = events
                .iter()
                .filter(|e| w.wants(e))
                .map(|e| event_out(e, w.prev_kv))
                .collect();
            w.next_rev = w.next_rev.max(last + 1);
            for chunk in wanted.chunks(EVENTS_PER_RESPONSE) {
                self.send(WatchResponse {
                    header: self.header(last),
                    watch_id: id,
                    events: chunk.to_vec(),
                    ..Default::default()
                })
                .await?;
            }
        }
        self.feed_rev = last;
        Ok(())
    }

    /// The periodic empty response of watches created with `progress_notify`.
    async fn progress(&self) -> Result<(), End> {
        for (id, w) in &self.watchers {
            if w.progress_notify {
                self.send(WatchResponse {
                    header: self.header(self.feed_rev),
                    watch_id: *id,
                    ..Default::default()
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// A watch stream's requests: a gRPC stream, or the gateway's parsed body.
pub(crate) type WatchRequests = Pin<Box<dyn Stream<Item = Result<WatchRequest, Status>> + Send>>;

/// Serves one watch stream: its responses, until the client goes (its
/// request stream fails or it stops reading; the end of its requests alone
/// does not end the stream).
pub(crate) fn serve(api: Arc<Api>, requests: WatchRequests) -> WatchStream {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(api, requests, tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn run(
    api: Arc<Api>,
    mut requests: WatchRequests,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    // Subscribe before anything is read, so nothing applied after the first
    // query is missed.
    let mut feed = api.node.subscribe();
    let every = api.config.watch_progress_interval;
    let mut s = Session {
        api,
        out,
        watchers: BTreeMap::new(),
        counted: 0,
        next_id: 0,
        feed_rev: 0,
    };
    s.api.watch_gauges.streams.fetch_add(1, Ordering::Relaxed);
    let result: Result<(), End> = async {
        s.feed_rev = s.local_status().await?.0;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A client that closed its side of the stream (sent all its
        // requests) still gets its watches' events, as from etcd, until it
        // goes away.
        let mut requests_done = false;
        loop {
            s.recount();
            tokio::select! {
                req = requests.next(), if !requests_done => match req {
                    Some(Ok(req)) => s.handle(req).await?,
                    Some(Err(e)) => {
                        tracing::debug!("watch stream closed by the client: {e}");
                        return Err(End::Client);
                    }
                    None => requests_done = true,
                },
                n = feed.recv() => match n {
                    Ok(n) if n.reset => s.catch_up_all().await?,
                    Ok(n) => s.on_feed(&n.items).await?,
                    Err(RecvError::Lagged(_)) => s.catch_up_all().await?,
                    Err(RecvError::Closed) => {
                        return Err(End::Error(Status::unavailable("etcdserver: server stopped")))
                    }
                },
                _ = tick.tick() => s.progress().await?,
                // A client that stopped reading ends the stream at once,
                // not at the next event it would have been sent.
                () = s.out.closed() => return Err(End::Client),
            }
        }
    }
    .await;
    if let Err(End::Error(status)) = result {
        let _ = s.out.send(Err(status)).await;
    }
}

#[tonic::async_trait]
impl Watch for WatchApi {
    async fn watch(
        &self,
        r: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        Ok(Response::new(serve(
            self.0.clone(),
            Box::pin(r.into_inner()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_events::event;

    fn watcher(key: &str, end: &[u8]) -> Watcher {
        Watcher {
            key: Bytes::copy_from_slice(key.as_bytes()),
            range_end: Bytes::copy_from_slice(end),
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            next_rev: 5,
        }
    }

    #[test]
    fn ranges_follow_etcds_bounds() {
        let single = watcher("a", b"");
        assert!(single.matches(b"a") && !single.matches(b"ab"));
        let from = watcher("b", &[0]);
        assert!(from.matches(b"b") && from.matches(b"zzz") && !from.matches(b"a"));
        let prefix = watcher("a/", b"a0");
        assert!(prefix.matches(b"a/x") && !prefix.matches(b"a0") && !prefix.matches(b"a"));
    }

    #[test]
    fn delivery_skips_old_revisions_and_filtered_kinds() {
        let mut w = watcher("k", b"");
        assert!(!w.wants(&event(EventType::Put, "k", 4)));
        assert!(w.wants(&event(EventType::Put, "k", 5)));
        w.no_put = true;
        assert!(!w.wants(&event(EventType::Put, "k", 6)));
        assert!(w.wants(&event(EventType::Delete, "k", 6)));
        w.no_delete = true;
        assert!(!w.wants(&event(EventType::Delete, "k", 6)));
    }
}
