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

use crate::auth::Who;
use crate::convert::event_out;
use crate::Api;
use bytes::Bytes;
use keel_etcd_proto::etcdserverpb::watch_request::RequestUnion;
use keel_etcd_proto::etcdserverpb::watch_server::Watch;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::mvccpb;
use keel_kv::Access;
use keel_kv::{EventType, Query, Response as KvResponse, WatchEvent};
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

/// Why a watch on keys its caller may not read is refused: etcd's
/// `ErrGRPCPermissionDenied` as a Go error's text, which etcd sends.
const WATCH_NOT_PERMITTED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

pub struct WatchApi(pub Arc<Api>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// Most events in one response (and asked of the history per query),
/// unless one revision has more: a revision's events are never split over
/// responses (but by `fragment`), because clients resume a broken stream
/// from the revision after the last event they saw.
const EVENTS_PER_RESPONSE: usize = 1000;

/// etcd's answers to a create request it cannot take (`mvcc`'s errors).
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

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
    /// Split responses larger than the request limit into fragments.
    fragment: bool,
    /// The next revision this watch has to deliver.
    next_rev: u64,
    /// Events went out for this watch since the last periodic progress
    /// tick: it gets no progress response at the next one (as from etcd,
    /// which sends them to idle watches only).
    had_events: bool,
    /// Its caller's permission was checked while auth was on at this
    /// member. A watch made while auth looked off here (a member that was
    /// behind) is checked before it gets anything applied after auth is
    /// on (`Session::recheck`).
    checked: bool,
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
    /// Who the stream runs as: each watch it creates needs read
    /// permission on its range (`auth`).
    who: Who,

    out: mpsc::Sender<Result<WatchResponse, Status>>,
    /// This node's apply feed (subscribed before the first status read).
    feed: tokio::sync::broadcast::Receiver<Arc<keel_node::Notification>>,
    watchers: BTreeMap<i64, Watcher>,
    /// How many of `watchers` the gauges count (`recount`).
    counted: i64,
    /// The next automatically chosen watch id (etcd starts at 0).
    next_id: i64,
    /// Every revision up to this one has been handed to every watch that
    /// wants it.
    feed_rev: u64,
    /// The highest revision an event or a created response of the stream
    /// carried. Clients resume a watch from the revision of a response
    /// without events (clientv3 does): a progress response below an event
    /// already sent would make them receive it again, so none goes out
    /// while `feed_rev` is below this (as etcd sends none while a watch is
    /// not synced). A watch's catch-up from history is followed by the
    /// feed up to where it read (`sync_feed`), so that is seldom.
    sent_rev: u64,
}

/// Whether the feed's queued notifications brought the stream up to a
/// revision (`Session::drain_feed`).
enum Drained {
    Done,
    /// They could not (the stream fell behind the feed, a snapshot was
    /// installed, revisions are missing): every watch catches up from
    /// history instead.
    CatchUp,
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

    /// Whether a progress response may go out (`sent_rev`).
    fn synced(&self) -> bool {
        self.feed_rev >= self.sent_rev
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
            Some(RequestUnion::ProgressRequest(_)) if self.synced() => {
                self.send(WatchResponse {
                    header: self.header(self.feed_rev),
                    watch_id: ALL_WATCHES,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => Ok(()),
            None => Ok(()),
        }
    }

    /// etcd's answer to a create request it cannot take: created and
    /// canceled at once, with no watch id (-1) and the `reason`.
    async fn refuse_create(&self, reason: &str) -> Result<(), End> {
        self.send(WatchResponse {
            header: self.header(self.feed_rev),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.into(),
            ..Default::default()
        })
        .await
    }

    async fn create(&mut self, mut c: WatchCreateRequest) -> Result<(), End> {
        // As etcd: no key is the smallest key, "\0"; a range end of "\0"
        // is every key from `key` on; any other end must lie after `key`.
        if c.key.is_empty() {
            c.key = Bytes::from_static(&[0]);
        }
        if !matches!(&c.range_end[..], [] | [0]) && c.key >= c.range_end {
            return self.refuse_create(EMPTY_RANGE).await;
        }
        // As etcd: a watch on keys the caller may not read is refused,
        // with the id asked for and etcd's reason. (The stream's token is
        // checked again if auth came on here since it opened.)
        let auth_on = self.api.config.auth.enabled();
        if auth_on && self.who.user().is_none() {
            self.who = self.api.refreshed(&self.who).unwrap_or_default();
        }
        let (key, end) = (&c.key, &c.range_end);
        if self
            .api
            .check(&self.who, |v, user| {
                v.check_range(user, Access::Read, key, end)
            })
            .is_err()
        {
            return self
                .send(WatchResponse {
                    header: self.header(self.feed_rev),
                    watch_id: c.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: WATCH_NOT_PERMITTED.into(),
                    ..Default::default()
                })
                .await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self.refuse_create(DUPLICATE_ID).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let (local_rev, compact) = self.local_status().await?;
        // The other watches first get what was applied up to the revision
        // this one is created at (it is in the feed already: the service
        // publishes a batch's events before it answers a later read).
        self.sync_feed(local_rev).await?;
        // (Past it if the feed could not be followed and the watches caught
        // up from history instead: this one starts where they are.)
        let local_rev = local_rev.max(self.feed_rev);
        // etcd takes a negative start as a revision below its compaction
        // point (-1 before the first compaction): created, then canceled
        // with that point. (A start of -1 before any compaction is not
        // below it: etcd then watches from now on.)
        let compacted = c.start_revision < 0 && c.start_revision < compact;
        let mut past = false;
        if !compacted {
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
                fragment: c.fragment,
                next_rev: if start == 0 { local_rev + 1 } else { start },
                had_events: false,
                checked: auth_on,
            };
            past = w.next_rev <= local_rev;
            self.watchers.insert(id, w);
            // Auth may have come on here while this waited for the feed.
            self.recheck().await?;
            if !self.watchers.contains_key(&id) {
                return Ok(());
            }
        }
        self.sent_rev = self.sent_rev.max(local_rev);
        self.send(WatchResponse {
            header: self.header(local_rev),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        if compacted {
            return self
                .send(WatchResponse {
                    header: self.header(local_rev),
                    watch_id: id,
                    canceled: true,
                    compact_revision: compact,
                    ..Default::default()
                })
                .await;
        }
        if past {
            let upto = self.catch_up(id).await?;
            self.sync_feed(upto).await?;
        }
        Ok(())
    }

    /// Delivers watch `id`'s events from its `next_rev` to this node's
    /// current revision, from the retained history: the revision it read
    /// up to (0 if the watch is gone), which the feed must then be brought
    /// up to (`sync_feed`).
    async fn catch_up(&mut self, id: i64) -> Result<u64, End> {
        loop {
            let Some(w) = self.watchers.get(&id).cloned() else {
                return Ok(0);
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
                    // (The revision of the cancel: the watch is gone, so
                    // no client resumes it from there.)
                    let (rev, compact) = self.local_status().await?;
                    self.watchers.remove(&id);
                    self.send(WatchResponse {
                        header: self.header(rev),
                        watch_id: id,
                        canceled: true,
                        compact_revision: compact.max(1),
                        ..Default::default()
                    })
                    .await?;
                    return Ok(0);
                }
                Err(s) => return Err(End::Error(s)),
            };
            // (Auth may have come on here before this read was answered.)
            self.recheck().await?;
            if !self.watchers.contains_key(&id) {
                return Ok(0);
            }
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
                self.send_events(id, header_rev, wanted, w.fragment).await?;
            }
            let Some(w) = self.watchers.get_mut(&id) else {
                return Ok(header_rev);
            };
            match more {
                // Stopped at the limit, or at the history one read may
                // examine: go on from there, with the service free to
                // apply in between.
                Some(next) => w.next_rev = w.next_rev.max(next),
                None => {
                    w.next_rev = w.next_rev.max(revision + 1);
                    return Ok(header_rev);
                }
            }
        }
    }

    /// Catches every watch up to (at least) this node's current revision,
    /// which then becomes the feed position; then the feed up to the
    /// latest revision a catch-up read (`sync_feed`), again from history
    /// if it cannot, once. (A stream that still cannot follow goes back to
    /// its requests; the feed's next gap or lag brings it here again.)
    async fn catch_up_all(&mut self) -> Result<(), End> {
        for _ in 0..2 {
            let (rev, _) = self.local_status().await?;
            let mut upto = rev;
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                upto = upto.max(self.catch_up(id).await?);
            }
            self.feed_rev = self.feed_rev.max(rev);
            if let Drained::Done = self.drain_feed(upto).await? {
                break;
            }
        }
        Ok(())
    }

    /// Brings the stream up to revision `upto` from the feed, where the
    /// service has published it already (`drain_feed`), or else from
    /// history.
    async fn sync_feed(&mut self, upto: u64) -> Result<(), End> {
        match self.drain_feed(upto).await? {
            Drained::Done => Ok(()),
            Drained::CatchUp => self.catch_up_all().await,
        }
    }

    /// Hands the feed's queued notifications to the watches until every
    /// revision up to `upto` has been (`feed_rev`). The service publishes
    /// a batch's events before it answers any later query, so the events
    /// of a revision a query returned are in the feed by then: with none
    /// left queued, the revisions up to `upto` had none.
    async fn drain_feed(&mut self, upto: u64) -> Result<Drained, End> {
        while self.feed_rev < upto {
            let n = match self.feed.try_recv() {
                Ok(n) if !n.reset => n,
                Err(TryRecvError::Empty) => {
                    self.feed_rev = upto;
                    break;
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => return Ok(Drained::CatchUp),
                Err(TryRecvError::Closed) => {
                    return Err(End::Error(Status::unavailable(
                        "etcdserver: server stopped",
                    )))
                }
            };
            if let Drained::CatchUp = self.on_feed(&n.items).await? {
                return Ok(Drained::CatchUp);
            }
        }
        Ok(Drained::Done)
    }

    /// Once auth is on at this member: checks the watches made while it
    /// looked off (at a member that was behind), with the stream's token
    /// checked now, and cancels those the caller may not read, with
    /// etcd's reason. Called before anything read from the feed or the
    /// history goes out: the service publishes an auth change when it
    /// applies it, before it answers a later read or feeds a later event.
    async fn recheck(&mut self) -> Result<(), End> {
        if !self.api.config.auth.enabled() || self.watchers.values().all(|w| w.checked) {
            return Ok(());
        }
        self.who = self.api.refreshed(&self.who).unwrap_or_default();
        let mut refused = Vec::new();
        for (id, w) in self.watchers.iter_mut().filter(|(_, w)| !w.checked) {
            let (key, end) = (&w.key, &w.range_end);
            let allowed = self.api.check(&self.who, |v, user| {
                v.check_range(user, Access::Read, key, end)
            });
            match allowed {
                Ok(()) => w.checked = true,
                Err(_) => refused.push(*id),
            }
        }
        for id in refused {
            self.watchers.remove(&id);
            self.send(WatchResponse {
                header: self.header(self.feed_rev),
                watch_id: id,
                canceled: true,
                cancel_reason: WATCH_NOT_PERMITTED.into(),
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Hands one feed notification to the watches, unless they must catch
    /// up from history instead (revisions missing before it, or it could
    /// not be read).
    async fn on_feed(&mut self, items: &[Bytes]) -> Result<Drained, End> {
        self.recheck().await?;
        let mut events = Vec::with_capacity(items.len());
        for item in items {
            match WatchEvent::decode(item) {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::error!("undecodable watch event from the KV service: {e}");
                    return Ok(Drained::CatchUp);
                }
            }
        }
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(Drained::Done);
        };
        let (first, last) = (first.revision(), last.revision());
        if last <= self.feed_rev {
            return Ok(Drained::Done);
        }
        if first > self.feed_rev + 1 {
            // Revisions went missing on the way (snapshot installed here).
            return Ok(Drained::CatchUp);
        }
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let wanted: Vec<_> = events.iter().filter(|e| w.wants(e)).collect();
            w.next_rev = w.next_rev.max(last + 1);
            let (prev_kv, fragment) = (w.prev_kv, w.fragment);
            for batch in by_revisions(&wanted, EVENTS_PER_RESPONSE) {
                let out = batch.iter().map(|e| event_out(e, prev_kv)).collect();
                self.send_events(id, last, out, fragment).await?;
            }
        }
        self.feed_rev = last;
        Ok(Drained::Done)
    }

    /// Sends `events` of watch `id` in one response, or, if the watch asked
    /// for `fragment` and the response would reach the request limit, in
    /// several, each but the last marked `fragment` (the client joins them),
    /// each holding at least one event, as etcd's `sendFragments` does.
    async fn send_events(
        &mut self,
        id: i64,
        header_rev: u64,
        events: Vec<mvccpb::Event>,
        fragment: bool,
    ) -> Result<(), End> {
        self.sent_rev = self.sent_rev.max(header_rev);
        if let Some(w) = self.watchers.get_mut(&id) {
            w.had_events = true;
        }
        let whole = WatchResponse {
            header: self.header(header_rev),
            watch_id: id,
            events,
            ..Default::default()
        };
        let limit = self.api.config.max_message_bytes();
        if !fragment || whole.events.len() < 2 || whole.encoded_len() < limit {
            return self.send(whole).await;
        }
        let mut events = whole.events.into_iter().peekable();
        while events.peek().is_some() {
            let mut part = WatchResponse {
                header: whole.header,
                watch_id: id,
                fragment: true,
                ..Default::default()
            };
            // Every event that keeps the part below the limit, and always
            // the first.
            let mut size = part.encoded_len();
            while let Some(e) = events.peek() {
                let grown =
                    size + prost::length_delimiter_len(e.encoded_len()) + 1 + e.encoded_len();
                if !part.events.is_empty() && grown >= limit {
                    break;
                }
                size = grown;
                part.events.extend(events.next());
            }
            part.fragment = events.peek().is_some();
            self.send(part).await?;
        }
        Ok(())
    }

    /// The periodic empty response of watches created with
    /// `progress_notify` that had no events since the last tick.
    async fn progress(&mut self) -> Result<(), End> {
        let idle: Vec<i64> = self
            .watchers
            .iter_mut()
            .filter_map(|(id, w)| {
                let idle = w.progress_notify && !w.had_events;
                w.had_events = false;
                idle.then_some(*id)
            })
            .collect();
        if !self.synced() {
            return Ok(());
        }
        for id in idle {
            self.send(WatchResponse {
                header: self.header(self.feed_rev),
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// `events` (in revision order) cut into runs of at most `most` events,
/// each cut between two revisions: a revision with more events than `most`
/// is one run of its own.
fn by_revisions<'a>(events: &'a [&'a WatchEvent], most: usize) -> Vec<&'a [&'a WatchEvent]> {
    let mut runs = Vec::new();
    let mut start = 0;
    // The start of the revision being scanned.
    let mut rev_start = 0;
    for i in 1..=events.len() {
        let boundary = i == events.len() || events[i].revision() != events[i - 1].revision();
        if !boundary {
            continue;
        }
        // `events[rev_start..i]` is one revision: end the run before it if
        // it would make the run too long.
        if i - start > most && rev_start > start {
            runs.push(&events[start..rev_start]);
            start = rev_start;
        }
        rev_start = i;
    }
    if start < events.len() {
        runs.push(&events[start..]);
    }
    runs
}

/// A watch stream's requests: a gRPC stream, or the gateway's parsed body.
pub(crate) type WatchRequests = Pin<Box<dyn Stream<Item = Result<WatchRequest, Status>> + Send>>;

/// Serves one watch stream: its responses, until the client goes (its
/// request stream fails or it stops reading; the end of its requests alone
/// does not end the stream).
pub(crate) fn serve(api: Arc<Api>, who: Who, requests: WatchRequests) -> WatchStream {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(api, who, requests, tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn run(
    api: Arc<Api>,
    who: Who,
    mut requests: WatchRequests,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    // Subscribe before anything is read, so nothing applied after the first
    // query is missed.
    let feed = api.node.subscribe();
    let every = api.config.watch_progress_interval;
    let mut s = Session {
        api,
        who,
        out,
        feed,
        watchers: BTreeMap::new(),
        counted: 0,
        next_id: 0,
        feed_rev: 0,
        sent_rev: 0,
    };
    s.api.watch_gauges.streams.fetch_add(1, Ordering::Relaxed);
    let result: Result<(), End> = async {
        s.feed_rev = s.local_status().await?.0;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // Ticks missed while the stream was busy are not made up in a
        // burst: each would find the watches idle.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
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
                n = s.feed.recv() => match n {
                    Ok(n) if n.reset => s.catch_up_all().await?,
                    Ok(n) => {
                        if let Drained::CatchUp = s.on_feed(&n.items).await? {
                            s.catch_up_all().await?;
                        }
                    }
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
        let who = self.0.who(&r).await?;
        Ok(Response::new(serve(
            self.0.clone(),
            who,
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
            fragment: false,
            next_rev: 5,
            had_events: false,
            checked: false,
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
    fn runs_are_cut_only_between_revisions() {
        let revs = [1, 1, 2, 3, 3, 3, 3, 4, 5, 5];
        let events: Vec<WatchEvent> = revs
            .iter()
            .map(|&r| event(EventType::Put, "k", r))
            .collect();
        let refs: Vec<&WatchEvent> = events.iter().collect();
        let lens = |most| -> Vec<Vec<u64>> {
            by_revisions(&refs, most)
                .iter()
                .map(|run| run.iter().map(|e| e.revision()).collect())
                .collect()
        };
        assert_eq!(
            lens(3),
            vec![vec![1, 1, 2], vec![3, 3, 3, 3], vec![4, 5, 5]],
            "a revision longer than the most is a run of its own"
        );
        assert_eq!(lens(1000), vec![revs.to_vec()]);
        assert_eq!(
            lens(1),
            vec![vec![1, 1], vec![2], vec![3, 3, 3, 3], vec![4], vec![5, 5]]
        );
        assert!(by_revisions(&[], 3).is_empty());
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
