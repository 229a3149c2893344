//! Differential test: the same sequence of etcd v3 operations, sent through
//! raw tonic clients, against a real etcd 3.4 (Debian's `etcd`, one member
//! started here on loopback) and against a 3-node Keel cluster, yields the
//! same normalized results: values, versions, create/mod revisions and header
//! revisions (as offsets from each system's starting revision), count/more,
//! prev_kv, deleted counts, txn outcomes with nested responses, lease TTLs and
//! attached keys, watch events, and errors (gRPC code and message).
//!
//! The sequence is a hand-picked part (every Range option, Put flags and
//! their errors, DeleteRange, Txn compares on every target with every result,
//! nested txns and their limits, Compact, leases, watches from the past,
//! request size limits; then fields at their edges: server-chosen lease
//! ids, TTL 0 and negative, negative ids and revisions, from-key compares,
//! long keys, watch streams with chosen and duplicate watch ids, cancels
//! and progress requests) and a part drawn from a seeded RNG (puts,
//! deletes, txns with compares derived from etcd's current state and
//! ranges with random options inside, ranges with random options, reads at
//! past revisions, lease revocations and grants, watches with filters, a
//! compaction) over a small key space.
//! `KEEL_DIFF_SEED` picks another seed, `KEEL_DIFF_OPS` another length;
//! `KEEL_DIFF_VERBOSE=1` prints every operation with etcd's answer.
//!
//! Operations are run in lockstep: each one against etcd, then against Keel
//! (through the leader or, round-robin, a follower), then compared. Every
//! mismatch is reported with the operation's index, the operation, etcd's
//! and Keel's results.
//!
//! Normalization, i.e. the differences that are inherent and not compared:
//! - Revisions are shifted so that each system starts at revision 1 (both do
//!   today; the shift keeps the test meaningful if that changes). Revision 0
//!   and negative values are kept as they are.
//! - Response headers: `cluster_id`, `member_id` and `raft_term` are
//!   per-system identities (random in etcd, configured in Keel) and are
//!   zeroed; only the header revision is compared. (Headers inside a txn
//!   carry only a revision in both, and are compared whole.)
//! - Lease ids chosen by the server differ: a grant of id 0 records the id
//!   each server chose, and requests and answers name the n-th such lease
//!   `AUTO_LEASE + n`.
//! - A lease's remaining TTL depends on timing: within 3 s of the granted
//!   TTL it is shown as the granted TTL.
//! - etcd lists a lease's keys in Go map order, and its lease list by
//!   expiry, which ties (two grants in the same instant) leave in map order:
//!   both are sorted before comparing.
//! - Watch events are compared as one list per watch: how a server batches
//!   them into responses, and the header revisions of watch responses (the
//!   serving member's progress), are not compared.
//! - Hashes (HashKV), member ids, member lists, status (version, db size,
//!   raft index) describe the implementation, not the data: not compared.
//!
//! Known differences, run through `Harness::known_difference` (shown, not
//! counted; the random part avoids them):
//! - An unknown `sort_order` enum value: etcd ignores it and does not sort;
//!   Keel refuses it with InvalidArgument, as keel-etcd's `convert` does for
//!   every out-of-range enum. Likewise an unknown compare result (etcd:
//!   the compare holds) or compare target (etcd: compares as equal).
//! - A gRPC message over the server's transport limit (request limit +
//!   512 KiB): grpc-go answers ResourceExhausted, tonic OutOfRange, both
//!   before the request is seen.

mod common;

use bytes::Bytes;
use common::{EtcdProc, TestCluster};
use keel_core::rng::Rng;
use keel_etcd_proto::etcdserverpb::compare::TargetUnion;
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
use keel_etcd_proto::etcdserverpb::request_op::Request as Req;
use keel_etcd_proto::etcdserverpb::response_op::Response as Resp;
use keel_etcd_proto::etcdserverpb::watch_client::WatchClient;
use keel_etcd_proto::etcdserverpb::watch_request::RequestUnion;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::mvccpb::{Event, KeyValue};
use std::fmt::Debug;
use std::time::{Duration, Instant};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

// ------------------------------------------------------------ the operations

/// One operation of the sequence. Revisions in requests are written as if
/// the system started at revision 1 (values > 0 are shifted per system).
#[derive(Clone, Debug)]
enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(i64),
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke(i64),
    LeaseTtl {
        id: i64,
        keys: bool,
    },
    Leases,
    /// One keep-alive on a new stream: its first answer.
    KeepAlive(i64),
    /// Opens a watch on a new stream and collects `n` events (or, with
    /// `None`, as many as etcd delivered).
    Watch {
        req: WatchCreateRequest,
        n: Option<usize>,
    },
    /// Sends these requests on one new watch stream (through the leader),
    /// one at a time, collecting each one's answers until the stream is
    /// quiet: creates with chosen or duplicate watch ids, cancels, progress
    /// requests.
    WatchSeq(Vec<RequestUnion>),
}

impl Op {
    /// Must this go to the Keel leader (a serializable read elsewhere could
    /// be stale)? A txn is serializable by etcd's rule (`isTxnSerializable`):
    /// when every operation is a serializable range, so also when it has
    /// none (compares only).
    fn needs_leader(&self) -> bool {
        match self {
            Op::Range(r) => r.serializable,
            Op::WatchSeq(_) => true,
            Op::Txn(t) => t
                .success
                .iter()
                .chain(&t.failure)
                .all(|o| matches!(&o.request, Some(Req::RequestRange(r)) if r.serializable)),
            _ => false,
        }
    }
}

/// A normalized successful answer.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Range(RangeResponse),
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseTtl(LeaseTimeToLiveResponse),
    Leases(LeaseLeasesResponse),
    KeepAlive(LeaseKeepAliveResponse),
    Watch(WatchOutcome),
    WatchSeq(Vec<WatchResponse>),
}

impl Answer {
    fn revision(&self) -> Option<i64> {
        let h = match self {
            Answer::Range(r) => &r.header,
            Answer::Put(r) => &r.header,
            Answer::Delete(r) => &r.header,
            Answer::Txn(r) => &r.header,
            Answer::Compact(r) => &r.header,
            Answer::LeaseGrant(r) => &r.header,
            Answer::LeaseRevoke(r) => &r.header,
            Answer::LeaseTtl(r) => &r.header,
            Answer::Leases(r) => &r.header,
            Answer::KeepAlive(r) => &r.header,
            Answer::Watch(_) | Answer::WatchSeq(_) => return None,
        };
        h.as_ref().map(|h| h.revision)
    }
}

/// Everything one watch produced, merged over its responses.
#[derive(Clone, Debug, Default, PartialEq)]
struct WatchOutcome {
    created: bool,
    watch_id: i64,
    canceled: bool,
    compact_revision: i64,
    cancel_reason: String,
    events: Vec<Event>,
}

/// An error as a client sees it.
#[derive(Clone, Debug, PartialEq)]
struct Failure {
    code: Code,
    message: String,
}

type Outcome = Result<Answer, Failure>;

fn fail(s: tonic::Status) -> Failure {
    Failure {
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Debug output, cut short (a 1.5 MiB value would drown the report).
fn show(x: &impl Debug) -> String {
    let s = format!("{x:?}");
    if s.len() > 1500 {
        let mut end = 1500;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    } else {
        s
    }
}

// --------------------------------------------------------------- the systems

/// Clients of one system and its revision shift.
struct System {
    name: &'static str,
    /// One channel per endpoint; Keel's leader first.
    channels: Vec<Channel>,
    /// Subtracted from revisions in answers, added to revisions in requests.
    shift: i64,
    /// Retry "no leader" / "too many requests" (Keel during an election;
    /// never sent by a healthy single-member etcd). Nothing was proposed.
    retry_unavailable: bool,
    /// Ids the server chose for grants that named no id (id 0), in order:
    /// requests and answers name the n-th as `AUTO_LEASE + n`.
    auto_leases: std::sync::Mutex<Vec<i64>>,
}

/// Names the n-th server-chosen lease id as `AUTO_LEASE + n` (ids chosen
/// by the server differ between systems).
const AUTO_LEASE: i64 = 0x7a00_0000;

impl System {
    fn lease_in(&self, id: i64) -> i64 {
        let auto = self.auto_leases.lock().unwrap();
        match usize::try_from(id - AUTO_LEASE) {
            Ok(n) if n < auto.len() => auto[n],
            _ => id,
        }
    }
    fn lease_out(&self, id: i64) -> i64 {
        let auto = self.auto_leases.lock().unwrap();
        match auto.iter().position(|&a| a == id) {
            Some(n) if id != 0 => AUTO_LEASE + n as i64,
            _ => id,
        }
    }

    fn up(&self, r: i64) -> i64 {
        if r > 0 {
            r + self.shift
        } else {
            r
        }
    }
    fn down(&self, r: i64) -> i64 {
        if r > 0 {
            r - self.shift
        } else {
            r
        }
    }

    // Requests: relative -> absolute revisions.
    fn range_in(&self, r: &mut RangeRequest) {
        r.revision = self.up(r.revision);
        r.min_mod_revision = self.up(r.min_mod_revision);
        r.max_mod_revision = self.up(r.max_mod_revision);
        r.min_create_revision = self.up(r.min_create_revision);
        r.max_create_revision = self.up(r.max_create_revision);
    }
    fn txn_in(&self, t: &mut TxnRequest) {
        for c in &mut t.compare {
            match &mut c.target_union {
                Some(TargetUnion::CreateRevision(r)) | Some(TargetUnion::ModRevision(r)) => {
                    *r = self.up(*r)
                }
                Some(TargetUnion::Lease(id)) => *id = self.lease_in(*id),
                _ => {}
            }
        }
        for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
            match &mut op.request {
                Some(Req::RequestRange(r)) => self.range_in(r),
                Some(Req::RequestTxn(t)) => self.txn_in(t),
                Some(Req::RequestPut(p)) => p.lease = self.lease_in(p.lease),
                _ => {}
            }
        }
    }

    // Answers: absolute -> relative revisions, identities zeroed.
    fn header(&self, h: &mut Option<ResponseHeader>) {
        if let Some(h) = h {
            h.cluster_id = 0;
            h.member_id = 0;
            h.raft_term = 0;
            h.revision = self.down(h.revision);
        }
    }
    fn kv(&self, kv: &mut KeyValue) {
        kv.create_revision = self.down(kv.create_revision);
        kv.mod_revision = self.down(kv.mod_revision);
        kv.lease = self.lease_out(kv.lease);
    }
    fn range_out(&self, r: &mut RangeResponse) {
        self.header(&mut r.header);
        r.kvs.iter_mut().for_each(|kv| self.kv(kv));
    }
    /// A header inside a txn: only its revision is set, by both systems,
    /// so the rest is compared as it is.
    fn inner_header(&self, h: &mut Option<ResponseHeader>) {
        if let Some(h) = h {
            h.revision = self.down(h.revision);
        }
    }
    fn txn_out(&self, t: &mut TxnResponse) {
        self.header(&mut t.header);
        self.txn_ops_out(t);
    }
    fn txn_ops_out(&self, t: &mut TxnResponse) {
        for op in &mut t.responses {
            match &mut op.response {
                Some(Resp::ResponseRange(r)) => {
                    self.inner_header(&mut r.header);
                    r.kvs.iter_mut().for_each(|kv| self.kv(kv));
                }
                Some(Resp::ResponsePut(r)) => {
                    self.inner_header(&mut r.header);
                    if let Some(kv) = &mut r.prev_kv {
                        self.kv(kv);
                    }
                }
                Some(Resp::ResponseDeleteRange(r)) => {
                    self.inner_header(&mut r.header);
                    r.prev_kvs.iter_mut().for_each(|kv| self.kv(kv));
                }
                Some(Resp::ResponseTxn(t)) => {
                    self.inner_header(&mut t.header);
                    self.txn_ops_out(t);
                }
                None => {}
            }
        }
    }
    fn event(&self, e: &mut Event) {
        if let Some(kv) = &mut e.kv {
            self.kv(kv);
        }
        if let Some(kv) = &mut e.prev_kv {
            self.kv(kv);
        }
    }

    async fn exec(&self, op: &Op, via: usize, etcd_events: Option<usize>) -> Outcome {
        let via = if op.needs_leader() {
            0
        } else {
            via % self.channels.len()
        };
        let mut tries = 0;
        loop {
            let r = self.exec_once(op, via, etcd_events).await;
            match &r {
                Err(f)
                    if self.retry_unavailable
                        && f.code == Code::Unavailable
                        && (f.message.contains("no leader")
                            || f.message.contains("too many requests"))
                        && tries < 50 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return r,
            }
        }
    }

    async fn exec_once(&self, op: &Op, via: usize, etcd_events: Option<usize>) -> Outcome {
        let ch = self.channels[via].clone();
        let mut kv = KvClient::new(ch.clone()).max_decoding_message_size(64 << 20);
        let mut lease = LeaseClient::new(ch.clone());
        Ok(match op.clone() {
            Op::Range(mut r) => {
                self.range_in(&mut r);
                let mut a = kv.range(r).await.map_err(fail)?.into_inner();
                self.range_out(&mut a);
                Answer::Range(a)
            }
            Op::Put(mut r) => {
                r.lease = self.lease_in(r.lease);
                let mut a = kv.put(r).await.map_err(fail)?.into_inner();
                self.header(&mut a.header);
                if let Some(kv) = &mut a.prev_kv {
                    self.kv(kv);
                }
                Answer::Put(a)
            }
            Op::Delete(r) => {
                let mut a = kv.delete_range(r).await.map_err(fail)?.into_inner();
                self.header(&mut a.header);
                a.prev_kvs.iter_mut().for_each(|kv| self.kv(kv));
                Answer::Delete(a)
            }
            Op::Txn(mut t) => {
                self.txn_in(&mut t);
                let mut a = kv.txn(t).await.map_err(fail)?.into_inner();
                self.txn_out(&mut a);
                Answer::Txn(a)
            }
            Op::Compact(rev) => {
                let req = CompactionRequest {
                    revision: self.up(rev),
                    physical: false,
                };
                let mut a = kv.compact(req).await.map_err(fail)?.into_inner();
                self.header(&mut a.header);
                Answer::Compact(a)
            }
            Op::LeaseGrant { id, ttl } => {
                let id = self.lease_in(id);
                let mut a = lease
                    .lease_grant(LeaseGrantRequest { ttl, id })
                    .await
                    .map_err(fail)?
                    .into_inner();
                self.header(&mut a.header);
                if id == 0 && a.error.is_empty() {
                    self.auto_leases.lock().unwrap().push(a.id);
                }
                a.id = self.lease_out(a.id);
                Answer::LeaseGrant(a)
            }
            Op::LeaseRevoke(id) => {
                let mut a = lease
                    .lease_revoke(LeaseRevokeRequest {
                        id: self.lease_in(id),
                    })
                    .await
                    .map_err(fail)?
                    .into_inner();
                self.header(&mut a.header);
                Answer::LeaseRevoke(a)
            }
            Op::LeaseTtl { id, keys } => {
                let mut a = lease
                    .lease_time_to_live(LeaseTimeToLiveRequest {
                        id: self.lease_in(id),
                        keys,
                    })
                    .await
                    .map_err(fail)?
                    .into_inner();
                self.header(&mut a.header);
                a.id = self.lease_out(a.id);
                // Remaining TTL depends on timing.
                if a.ttl > 0 && a.granted_ttl >= a.ttl && a.granted_ttl - a.ttl <= 3 {
                    a.ttl = a.granted_ttl;
                }
                a.keys.sort();
                Answer::LeaseTtl(a)
            }
            Op::Leases => {
                let mut a = lease
                    .lease_leases(LeaseLeasesRequest {})
                    .await
                    .map_err(fail)?
                    .into_inner();
                self.header(&mut a.header);
                for l in &mut a.leases {
                    l.id = self.lease_out(l.id);
                }
                a.leases.sort_by_key(|l| l.id);
                Answer::Leases(a)
            }
            Op::KeepAlive(id) => {
                // Queued before the stream opens: grpc-go sends a stream's
                // headers with its first answer.
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(LeaseKeepAliveRequest {
                    id: self.lease_in(id),
                })
                .await
                .expect("keep-alive queue");
                let mut stream = lease
                    .lease_keep_alive(ReceiverStream::new(rx))
                    .await
                    .map_err(fail)?
                    .into_inner();
                let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
                drop(tx);
                let mut a = match first {
                    Ok(Ok(Some(a))) => a,
                    Ok(Ok(None)) => LeaseKeepAliveResponse::default(),
                    Ok(Err(s)) => return Err(fail(s)),
                    Err(_) => {
                        return Err(Failure {
                            code: Code::DeadlineExceeded,
                            message: "no keep-alive answer within 5 s".into(),
                        })
                    }
                };
                self.header(&mut a.header);
                a.id = self.lease_out(a.id);
                Answer::KeepAlive(a)
            }
            Op::Watch { mut req, n } => {
                req.start_revision = self.up(req.start_revision);
                let mut w = self.watch(ch, req, n.or(etcd_events)).await?;
                w.compact_revision = self.down(w.compact_revision);
                w.events.iter_mut().for_each(|e| self.event(e));
                Answer::Watch(w)
            }
            Op::WatchSeq(reqs) => {
                let mut out = self.watch_seq(ch, reqs).await?;
                for r in &mut out {
                    self.header(&mut r.header);
                    r.compact_revision = self.down(r.compact_revision);
                    r.events.iter_mut().for_each(|e| self.event(e));
                }
                Answer::WatchSeq(out)
            }
        })
    }

    /// Sends `reqs` on a new stream, one at a time, collecting each one's
    /// answers until the stream has been quiet for a while.
    async fn watch_seq(
        &self,
        ch: Channel,
        reqs: Vec<RequestUnion>,
    ) -> Result<Vec<WatchResponse>, Failure> {
        let mut client = WatchClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut rx = Some(rx);
        let mut stream = None;
        let mut out = Vec::new();
        for mut r in reqs {
            match &mut r {
                RequestUnion::CreateRequest(c) => c.start_revision = self.up(c.start_revision),
                RequestUnion::CancelRequest(_) | RequestUnion::ProgressRequest(_) => {}
            }
            tx.send(WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("watch request queue");
            // Opened once the first request is queued: grpc-go sends a
            // stream's headers with its first answer.
            if let Some(rx) = rx.take() {
                let opened = client.watch(ReceiverStream::new(rx)).await;
                stream = Some(opened.map_err(fail)?.into_inner());
            }
            let stream = stream.as_mut().expect("opened");
            loop {
                let quiet = Duration::from_millis(300);
                match tokio::time::timeout(quiet, stream.message()).await {
                    Err(_) | Ok(Ok(None)) => break,
                    Ok(Err(s)) => return Err(fail(s)),
                    Ok(Ok(Some(r))) => out.push(r),
                }
            }
        }
        drop(tx);
        Ok(out)
    }

    /// Opens a watch on a new stream; collects until `n` events arrived (or,
    /// without `n`, until the stream is quiet), or the watch is canceled.
    async fn watch(
        &self,
        ch: Channel,
        req: WatchCreateRequest,
        n: Option<usize>,
    ) -> Result<WatchOutcome, Failure> {
        let mut client = WatchClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(req)),
        })
        .await
        .expect("watch request queue");
        let mut stream = client
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(fail)?
            .into_inner();
        let mut out = WatchOutcome::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = out.canceled || n.is_some_and(|n| out.events.len() >= n);
            let wait = if done || n.is_none() {
                // Anything more (an extra event would be a difference).
                Duration::from_millis(if n.is_none() { 500 } else { 150 })
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match tokio::time::timeout(wait, stream.message()).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(s)) => return Err(fail(s)),
                Ok(Ok(Some(r))) => {
                    out.created |= r.created;
                    out.watch_id = r.watch_id;
                    out.canceled |= r.canceled;
                    // Nonzero only on a cancellation (-1: etcd's compaction
                    // point before any compaction).
                    if r.compact_revision != 0 {
                        out.compact_revision = r.compact_revision;
                    }
                    if !r.cancel_reason.is_empty() {
                        out.cancel_reason = r.cancel_reason;
                    }
                    out.events.extend(r.events);
                }
            }
            if Instant::now() > deadline {
                break;
            }
        }
        drop(tx);
        Ok(out)
    }
}

// -------------------------------------------------------------- the harness

struct Mismatch {
    index: usize,
    op: Op,
    via: usize,
    etcd: Outcome,
    keel: Outcome,
}

struct Harness {
    etcd: System,
    keel: System,
    index: usize,
    rr: usize,
    mismatches: Vec<Mismatch>,
    /// etcd's (relative) revision after the last operation.
    rev: i64,
    /// etcd's (relative) compaction point.
    compacted: i64,
    /// Print every operation and etcd's answer (`KEEL_DIFF_VERBOSE=1`).
    verbose: bool,
}

impl Harness {
    /// Runs `op` on both systems (on Keel through the next node in turn) and
    /// compares; returns etcd's answer.
    async fn run(&mut self, op: Op) -> Outcome {
        self.rr += 1;
        let via = self.rr;
        self.run_via(op, via).await
    }

    /// `run`, the answer not needed.
    async fn step(&mut self, op: Op) {
        let _ = self.run(op).await;
    }

    async fn exec_both(&mut self, op: &Op, via: usize) -> (Outcome, Outcome) {
        let e = self.etcd.exec(op, 0, None).await;
        let n = match &e {
            Ok(Answer::Watch(w)) => Some(w.events.len()),
            _ => None,
        };
        let k = self.keel.exec(op, via, n).await;
        if let Some(r) = e.as_ref().ok().and_then(Answer::revision) {
            self.rev = self.rev.max(r);
        }
        if let (Op::Compact(rev), Ok(_)) = (op, &e) {
            self.compacted = *rev;
        }
        (e, k)
    }

    async fn run_via(&mut self, op: Op, via: usize) -> Outcome {
        let index = self.index;
        self.index += 1;
        let (e, k) = self.exec_both(&op, via).await;
        if self.verbose {
            eprintln!("#{index} {}\n  -> {}", show(&op), show(&e));
        }
        if e != k {
            eprintln!(
                "MISMATCH #{index} (keel via node index {}): {}\n  etcd: {}\n  keel: {}",
                via % 3,
                show(&op),
                show(&e),
                show(&k)
            );
            self.mismatches.push(Mismatch {
                index,
                op,
                via,
                etcd: e.clone(),
                keel: k,
            });
        }
        e
    }

    /// An operation Keel deliberately answers differently (`why`): run on
    /// both, shown, not counted. Must not change either system's state.
    async fn known_difference(&mut self, op: Op, why: &str) {
        let (e, k) = self.exec_both(&op, 0).await;
        eprintln!(
            "known difference ({why}): {}\n  etcd: {}\n  keel: {}{}",
            show(&op),
            show(&e),
            show(&k),
            if e == k { "\n  (now the same)" } else { "" }
        );
    }

    async fn put(&mut self, key: &str, value: &str) {
        self.step(put(key, value)).await
    }

    async fn range(&mut self, r: RangeRequest) -> Outcome {
        self.run(Op::Range(r)).await
    }

    /// The current revision (relative), read through a compared range.
    async fn mark(&mut self) -> i64 {
        let _ = self.range(rq("mark", "")).await;
        self.rev
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A range request over `[key, end)` (`end` "" = the single key).
fn rq(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(key),
        range_end: b(end),
        ..Default::default()
    }
}

/// Every key >= `key`.
fn from_key(key: &str) -> RangeRequest {
    rq(key, "\0")
}

/// etcd's prefix end: the prefix with its last byte incremented.
fn prefix_end(p: &str) -> String {
    let mut v = p.as_bytes().to_vec();
    *v.last_mut().expect("non-empty prefix") += 1;
    String::from_utf8(v).expect("ascii")
}

fn prefix(p: &str) -> RangeRequest {
    rq(p, &prefix_end(p))
}

fn putr(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(putr(key, value))
}

fn delr(key: &str, end: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(key),
        range_end: b(end),
        prev_kv,
    }
}

fn del(key: &str, end: &str, prev_kv: bool) -> Op {
    Op::Delete(delr(key, end, prev_kv))
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Req::RequestPut(putr(key, value))),
    }
}

fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Req::RequestRange(r)),
    }
}

fn delete_op(key: &str, end: &str, prev_kv: bool) -> RequestOp {
    RequestOp {
        request: Some(Req::RequestDeleteRange(delr(key, end, prev_kv))),
    }
}

fn txn_op(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Req::RequestTxn(t)),
    }
}

// Compare targets and results (etcd's enum numbers).
const VERSION: i32 = 0;
const CREATE: i32 = 1;
const MOD: i32 = 2;
const VALUE: i32 = 3;
const LEASE: i32 = 4;
const EQUAL: i32 = 0;
const GREATER: i32 = 1;
const LESS: i32 = 2;
const NOT_EQUAL: i32 = 3;

fn cmp(key: &str, target: i32, result: i32, operand: TargetUnion) -> Compare {
    Compare {
        result,
        target,
        key: b(key),
        target_union: Some(operand),
        range_end: Bytes::new(),
    }
}

fn operand(target: i32, n: i64, value: &str) -> TargetUnion {
    match target {
        VERSION => TargetUnion::Version(n),
        CREATE => TargetUnion::CreateRevision(n),
        MOD => TargetUnion::ModRevision(n),
        VALUE => TargetUnion::Value(b(value)),
        _ => TargetUnion::Lease(n),
    }
}

fn watch_req(key: &str, end: &str, start: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: b(key),
        range_end: b(end),
        start_revision: start,
        ..Default::default()
    }
}

fn watch(req: WatchCreateRequest, n: usize) -> Op {
    Op::Watch { req, n: Some(n) }
}

// ------------------------------------------------------------------ script

/// The hand-picked part.
async fn hand_picked(h: &mut Harness) {
    // --- Put, Range basics.
    let r0 = h.mark().await;
    h.put("foo", "bar").await;
    h.step(Op::Put(PutRequest {
        prev_kv: true,
        ..putr("foo", "baz")
    }))
    .await;
    // prev_kv of a new key: none.
    h.step(Op::Put(PutRequest {
        prev_kv: true,
        ..putr("foo2", "x")
    }))
    .await;
    for (k, v) in [
        ("foo3", "y"),
        ("fop", "z"),
        ("fo", "w"),
        ("g", "1"),
        ("h", "2"),
    ] {
        h.put(k, v).await;
    }
    let r1 = h.mark().await;
    // Versions, values and create/mod revisions that differ per key.
    for (k, v) in [("foo2", "a"), ("foo2", "c"), ("fo", "q"), ("g", "0")] {
        h.put(k, v).await;
    }
    let r2 = h.mark().await;
    for r in [
        rq("foo", ""),
        rq("missing", ""),
        prefix("foo"),
        prefix("f"),
        from_key("foo"),
        from_key("\0"),
        rq("fop", "foo"), // end before start: empty
        rq("foo", "foo"), // empty interval
        rq("", ""),       // no key
        rq("", "z"),      // no key, with an end
    ] {
        h.range(r).await.ok();
    }
    for limit in [0, 1, 2, 5, 6, 100, -1] {
        h.range(RangeRequest {
            limit,
            ..prefix("f")
        })
        .await
        .ok();
    }
    for (keys_only, count_only, limit) in [
        (true, false, 0),
        (false, true, 0),
        (false, true, 2),
        (true, true, 1),
    ] {
        h.range(RangeRequest {
            keys_only,
            count_only,
            limit,
            ..from_key("\0")
        })
        .await
        .ok();
    }
    // Every sort target with every order, with and without a limit.
    for target in 0..5 {
        for order in 0..3 {
            for limit in [0, 3] {
                h.range(RangeRequest {
                    sort_target: target,
                    sort_order: order,
                    limit,
                    ..from_key("\0")
                })
                .await
                .ok();
            }
        }
    }
    h.known_difference(
        Op::Range(RangeRequest {
            sort_order: 7,
            ..prefix("f")
        }),
        "etcd ignores an unknown sort order, Keel refuses it (InvalidArgument)",
    )
    .await;
    // Min/max filters (count stays the unfiltered count).
    for (min_mod, max_mod, min_create, max_create) in [
        (r1, 0, 0, 0),
        (r1 + 1, 0, 0, 0),
        (0, r1, 0, 0),
        (0, 0, r1, 0),
        (0, 0, 0, r0 + 2),
        (r0 + 2, r2 - 1, 0, 0),
        (0, 0, r0 + 2, r0 + 3),
        (r2 + 5, 0, 0, 0),
    ] {
        for limit in [0, 2] {
            h.range(RangeRequest {
                min_mod_revision: min_mod,
                max_mod_revision: max_mod,
                min_create_revision: min_create,
                max_create_revision: max_create,
                limit,
                ..from_key("\0")
            })
            .await
            .ok();
        }
    }
    // Reads in the past, now, and in the future.
    for revision in [r0, r0 + 1, r0 + 3, r1, r2 - 1, r2, r2 + 1, r2 + 1000] {
        for r in [from_key("\0"), rq("foo2", "")] {
            h.range(RangeRequest { revision, ..r }).await.ok();
        }
    }
    for r in [
        RangeRequest {
            revision: r1,
            sort_target: 3,
            sort_order: 2,
            limit: 2,
            ..prefix("f")
        },
        RangeRequest {
            serializable: true,
            ..prefix("f")
        },
        RangeRequest {
            serializable: true,
            revision: r1,
            ..prefix("f")
        },
    ] {
        h.range(r).await.ok();
    }

    // --- Put flags and their errors.
    for p in [
        putr("", "v"), // no key
        PutRequest {
            ignore_value: true, // with a value
            ..putr("foo", "v")
        },
        PutRequest {
            ignore_value: true,
            prev_kv: true,
            ..putr("foo", "")
        },
        PutRequest {
            ignore_value: true, // missing key
            ..putr("nothere", "")
        },
        PutRequest {
            ignore_lease: true, // missing key
            ..putr("nothere", "v")
        },
        PutRequest {
            ignore_lease: true, // with a lease
            lease: 5,
            ..putr("foo", "v")
        },
        PutRequest {
            lease: 0x7777, // no such lease
            ..putr("foo", "v")
        },
        PutRequest {
            ignore_lease: true,
            prev_kv: true,
            ..putr("foo", "new")
        },
        PutRequest {
            ignore_value: true,
            ignore_lease: true,
            ..putr("foo", "")
        },
        putr("empty-value", ""),
    ] {
        h.step(Op::Put(p)).await;
    }
    h.range(from_key("\0")).await.ok();

    // --- DeleteRange.
    for (k, v) in [
        ("d/a", "1"),
        ("d/b", "2"),
        ("d/c", "3"),
        ("d/d", "4"),
        ("e", "5"),
    ] {
        h.put(k, v).await;
    }
    for op in [
        del("d/missing", "", false),
        del("d/a", "", true),
        del("d/a", "", true),
        del("d/b", "d/d", false),
        del("d/", &prefix_end("d/"), true),
        del("e", "\0", true),
        del("", "", false),
        del("", "\0", false),
    ] {
        h.step(op).await;
    }
    h.range(from_key("\0")).await.ok();
    let r3 = h.mark().await;
    h.range(RangeRequest {
        revision: r3 - 2,
        ..prefix("d/")
    })
    .await
    .ok();

    // --- Txn: every compare target with every result.
    h.put("t/a", "10").await;
    h.put("t/b", "20").await;
    h.put("t/a", "11").await;
    h.step(Op::LeaseGrant { id: 0x42, ttl: 600 }).await;
    h.step(Op::Put(PutRequest {
        lease: 0x42,
        ..putr("t/l", "leased")
    }))
    .await;
    let a = match h.range(rq("t/a", "")).await {
        Ok(Answer::Range(r)) => r.kvs.first().cloned().unwrap_or_default(),
        _ => KeyValue::default(),
    };
    for target in [VERSION, CREATE, MOD, VALUE, LEASE] {
        for result in [EQUAL, GREATER, LESS, NOT_EQUAL] {
            let n = match target {
                VERSION => a.version,
                CREATE => a.create_revision,
                MOD => a.mod_revision,
                _ => 0,
            };
            // Equal to, below and above the operand of t/a.
            for (dn, v) in [(0, "11"), (-1, "10"), (1, "12")] {
                for key in ["t/a", "t/none", "t/l"] {
                    let n = if target == LEASE && key == "t/l" {
                        0x42 + dn
                    } else {
                        n + dn
                    };
                    h.step(Op::Txn(txn(
                        vec![cmp(key, target, result, operand(target, n, v))],
                        vec![range_op(rq(key, ""))],
                        vec![range_op(rq("t/b", ""))],
                    )))
                    .await;
                }
            }
        }
    }
    // Value compares on a missing key always fail, whatever the operand.
    for result in [EQUAL, GREATER, LESS, NOT_EQUAL] {
        h.step(Op::Txn(txn(
            vec![cmp(
                "t/none",
                VALUE,
                result,
                TargetUnion::Value(Bytes::new()),
            )],
            vec![put_op("t/yes", "1")],
            vec![put_op("t/no", "1")],
        )))
        .await;
    }
    // Compares over a range of keys.
    for (target, result, n) in [
        (VERSION, GREATER, 0),
        (VERSION, EQUAL, 1),
        (CREATE, LESS, a.create_revision + 100),
        (MOD, GREATER, a.mod_revision),
        (LEASE, EQUAL, 0),
        (VALUE, GREATER, 0),
    ] {
        let mut c = cmp("t/", target, result, operand(target, n, "1"));
        c.range_end = b(&prefix_end("t/"));
        h.step(Op::Txn(txn(vec![c], vec![range_op(prefix("t/"))], vec![])))
            .await;
    }
    // An operand of another kind than the target; an empty compare key.
    for c in [
        cmp("t/a", VALUE, EQUAL, TargetUnion::Version(2)),
        cmp("", VERSION, EQUAL, TargetUnion::Version(0)),
    ] {
        h.step(Op::Txn(txn(
            vec![c],
            vec![put_op("t/x", "1")],
            vec![put_op("t/x", "2")],
        )))
        .await;
    }
    // Several compares; writes, deletes and reads in one branch; reads
    // see the branch's earlier writes.
    h.step(Op::Txn(txn(
        vec![
            cmp("t/a", VALUE, EQUAL, operand(VALUE, 0, "11")),
            cmp("t/b", VERSION, EQUAL, TargetUnion::Version(1)),
            cmp("t/none", CREATE, EQUAL, TargetUnion::CreateRevision(0)),
        ],
        vec![
            put_op("t/c", "30"),
            range_op(prefix("t/")),
            delete_op("t/x", "", true),
            RequestOp {
                request: Some(Req::RequestPut(PutRequest {
                    prev_kv: true,
                    ..putr("t/b", "21")
                })),
            },
            range_op(RangeRequest {
                count_only: true,
                ..prefix("t/")
            }),
        ],
        vec![range_op(prefix("t/"))],
    )))
    .await;
    // A failing compare with no failure ops; an empty txn; a read-only txn
    // (serializable or not); txns whose delete deletes nothing.
    let r4 = h.mark().await;
    for t in [
        txn(
            vec![cmp("t/a", VERSION, EQUAL, TargetUnion::Version(99))],
            vec![put_op("t/z", "1")],
            vec![],
        ),
        TxnRequest::default(),
        txn(
            vec![],
            vec![range_op(rq("t/a", "")), range_op(prefix("t/"))],
            vec![],
        ),
        txn(
            vec![],
            vec![range_op(RangeRequest {
                serializable: true,
                ..prefix("t/")
            })],
            vec![],
        ),
        txn(vec![], vec![delete_op("t/nothing", "", true)], vec![]),
        txn(
            vec![],
            vec![
                delete_op("t/nothing", "", true),
                range_op(RangeRequest {
                    serializable: true,
                    ..prefix("t/")
                }),
            ],
            vec![],
        ),
        // A past-revision read inside a txn, and a future one (error).
        txn(
            vec![],
            vec![range_op(RangeRequest {
                revision: r4 - 3,
                ..prefix("t/")
            })],
            vec![],
        ),
        txn(
            vec![],
            vec![
                put_op("t/f", "1"),
                range_op(RangeRequest {
                    revision: r4 + 50,
                    ..prefix("t/")
                }),
            ],
            vec![],
        ),
        // Ops without a key.
        txn(vec![], vec![range_op(rq("", "\0"))], vec![]),
        txn(vec![], vec![delete_op("", "\0", false)], vec![]),
        txn(vec![], vec![put_op("", "1")], vec![]),
    ] {
        h.step(Op::Txn(t)).await;
    }
    // Nested txns, three deep, taking both branches.
    let inner = |v: i64| {
        txn(
            vec![cmp("t/a", VERSION, EQUAL, TargetUnion::Version(v))],
            vec![put_op("t/n2", "s"), range_op(rq("t/n2", ""))],
            vec![put_op("t/n2", "f"), delete_op("t/c", "", true)],
        )
    };
    for v in [2, 3] {
        h.step(Op::Txn(txn(
            vec![cmp("t/b", VERSION, GREATER, TargetUnion::Version(0))],
            vec![
                put_op("t/n1", &format!("v{v}")),
                txn_op(txn(
                    vec![],
                    vec![txn_op(inner(v)), range_op(prefix("t/n"))],
                    vec![],
                )),
                range_op(prefix("t/n")),
            ],
            vec![],
        )))
        .await;
    }
    // Duplicate keys: two puts, a put and an overlapping delete, a put in a
    // nested txn over an outer put, puts in different branches (fine),
    // deletes that overlap each other (fine).
    let dup = [
        vec![put_op("t/d", "1"), put_op("t/d", "2")],
        vec![
            put_op("t/d", "1"),
            delete_op("t/", &prefix_end("t/"), false),
        ],
        vec![delete_op("t/d", "", false), put_op("t/d", "1")],
        vec![
            put_op("t/d", "1"),
            txn_op(txn(vec![], vec![put_op("t/d", "2")], vec![])),
        ],
        vec![
            txn_op(txn(
                vec![],
                vec![put_op("t/d", "2")],
                vec![put_op("t/d", "3")],
            )),
            put_op("t/e", "1"),
        ],
        vec![
            delete_op("t/d", "", false),
            delete_op("t/", &prefix_end("t/"), false),
        ],
    ];
    for ops in dup {
        h.step(Op::Txn(txn(vec![], ops, vec![put_op("t/d", "f")])))
            .await;
    }
    // A key changed twice in one revision, by sibling nested txns (etcd
    // checks each against the outer level, not against each other): a
    // watcher's prev_kv is the key's state before the revision, as etcd
    // reads it (seed 9402 found Keel giving the earlier change).
    h.put("t/w", "1").await;
    let nested = |op| txn_op(txn(vec![], vec![op], vec![]));
    let twice = vec![
        nested(put_op("t/w", "2")),
        nested(delete_op("t/w", "", true)),
    ];
    h.step(Op::Txn(txn(vec![], twice, vec![]))).await;
    let changed = h.mark().await;
    let mut req = watch_req("t/w", "", changed);
    req.prev_kv = true;
    h.step(watch(req, 2)).await;
    // Too many operations: 128 is the limit (per branch, and compares).
    for n in [128, 129] {
        let ops: Vec<RequestOp> = (0..n).map(|i| put_op(&format!("m/{i:03}"), "x")).collect();
        let compares: Vec<Compare> = (0..n)
            .map(|i| {
                cmp(
                    &format!("m/{i:03}"),
                    VERSION,
                    GREATER,
                    TargetUnion::Version(0),
                )
            })
            .collect();
        let never = cmp("t/a", VERSION, LESS, TargetUnion::Version(0));
        let count = range_op(RangeRequest {
            count_only: true,
            ..prefix("m/")
        });
        for t in [
            txn(vec![], ops.clone(), vec![]),
            txn(vec![never], vec![], ops),
            txn(compares, vec![count], vec![]),
        ] {
            h.step(Op::Txn(t)).await;
        }
    }
    h.step(del("m/", &prefix_end("m/"), false)).await;
    h.range(from_key("t/")).await.ok();

    // --- Leases (explicit ids: server-chosen ids differ).
    for (id, ttl) in [
        (0x1001, 60),
        (0x1001, 60),            // exists
        (0x1002, 1),             // below the minimum TTL
        (0x1003, 9_000_000_001), // too large
    ] {
        h.step(Op::LeaseGrant { id, ttl }).await;
    }
    h.step(Op::Leases).await;
    for k in ["l/a", "l/b", "l/c"] {
        h.step(Op::Put(PutRequest {
            lease: 0x1001,
            ..putr(k, "v")
        }))
        .await;
    }
    h.put("l/free", "v").await;
    h.step(Op::Put(PutRequest {
        ignore_lease: true,
        prev_kv: true,
        ..putr("l/c", "v2")
    }))
    .await;
    h.step(Op::Put(PutRequest {
        lease: 0x1002,
        ..putr("l/b", "moved")
    }))
    .await;
    h.range(prefix("l/")).await.ok();
    for (id, keys) in [(0x1001, true), (0x1001, false), (0x7777, true)] {
        h.step(Op::LeaseTtl { id, keys }).await; // 0x7777: missing, TTL -1
    }
    h.step(Op::LeaseRevoke(0x1001)).await; // deletes l/a, l/c
    h.range(prefix("l/")).await.ok();
    h.step(Op::LeaseTtl {
        id: 0x1001,
        keys: true,
    })
    .await;
    for id in [0x1001, 0x1002, 0x42] {
        h.step(Op::LeaseRevoke(id)).await; // 0x1001: gone
    }
    h.step(Op::Leases).await;
    h.range(from_key("\0")).await.ok();

    // --- Watches from the past (each on a new stream; Keel mostly through
    // followers, from their own apply feed).
    let w0 = h.mark().await;
    for (k, v) in [
        ("w/a", "1"),
        ("w/b", "2"),
        ("w/a", "3"),
        ("x", "not watched"),
    ] {
        h.put(k, v).await;
    }
    h.step(del("w/b", "", false)).await;
    h.step(Op::Txn(txn(
        vec![],
        vec![
            put_op("w/c", "4"),
            put_op("w/d", "5"),
            delete_op("w/a", "", false),
        ],
        vec![],
    )))
    .await;
    let w1 = h.mark().await;
    let all = watch_req("w/", &prefix_end("w/"), w0 + 1);
    for (req, n, via) in [
        (all.clone(), 7, 1),
        (
            WatchCreateRequest {
                prev_kv: true,
                ..all.clone()
            },
            7,
            2,
        ),
        (
            WatchCreateRequest {
                filters: vec![0], // no put
                ..all.clone()
            },
            2,
            1,
        ),
        (
            WatchCreateRequest {
                filters: vec![1], // no delete
                prev_kv: true,
                start_revision: w0 + 3,
                ..all.clone()
            },
            3,
            0,
        ),
        (watch_req("w/a", "", w0 + 1), 3, 2),
        (watch_req("w/c", "\0", w1 - 1), 3, 1),
        (watch_req("w/", &prefix_end("w/"), w1 + 1), 0, 1),
    ] {
        h.run_via(watch(req, n), via).await.ok();
    }

    // Negative start revisions before any compaction: etcd takes them as
    // below its compaction point, -1 (canceled with it), but -1 itself
    // watches from now on.
    for start in [-3, -1] {
        h.step(Op::Watch {
            req: watch_req("w/", &prefix_end("w/"), start),
            n: None,
        })
        .await;
    }

    // --- Compaction.
    h.put("c/1", "a").await;
    h.put("c/2", "b").await;
    h.step(Op::Txn(txn(
        vec![],
        vec![put_op("cd/x", "1"), put_op("cd/y", "1")],
        vec![],
    )))
    .await;
    // c0: an update of c/2 and a delete of cd/x in one revision.
    h.step(Op::Txn(txn(
        vec![],
        vec![put_op("c/2", "b2"), delete_op("cd/x", "", false)],
        vec![],
    )))
    .await;
    let c0 = h.mark().await;
    h.step(del("cd/y", "", false)).await;
    h.put("c/1", "c").await;
    h.put("c/3", "d").await;
    for rev in [c0 + 100, c0, c0, c0 - 1] {
        h.step(Op::Compact(rev)).await; // future, ok, compacted, compacted
    }
    for revision in [c0 - 2, c0 - 1, c0, c0 + 1, 0] {
        h.range(RangeRequest {
            revision,
            ..prefix("c/")
        })
        .await
        .ok();
    }
    h.step(Op::Txn(txn(
        vec![],
        vec![range_op(RangeRequest {
            revision: c0 - 1,
            ..prefix("c/")
        })],
        vec![],
    )))
    .await;
    h.run_via(watch(watch_req("c/", &prefix_end("c/"), c0 - 1), 0), 1)
        .await
        .ok();
    // From the compaction point: the first event's previous value is
    // below it, so it comes without prev_kv (as etcd documents).
    for (prev_kv, via) in [(false, 2), (true, 1)] {
        let req = WatchCreateRequest {
            prev_kv,
            ..watch_req("c/", &prefix_end("c/"), c0)
        };
        h.run_via(watch(req, 3), via).await.ok();
    }
    // A delete at exactly the compaction revision: compaction drops that
    // tombstone (etcd's keyIndex.compact keeps the latest revision <= c only
    // if it is a put), so a watch from c does not see it.
    h.run_via(
        Op::Watch {
            req: watch_req("cd/", &prefix_end("cd/"), c0),
            n: None,
        },
        1,
    )
    .await
    .ok();
    h.range(from_key("\0")).await.ok();

    // --- Watch requests etcd refuses or rewrites: an empty range (the key
    // at or after the end) is refused with watch id -1; no key is the key
    // "\0".
    for (key, end) in [("b", "a"), ("b", "b")] {
        h.run(Op::Watch {
            req: watch_req(key, end, 0),
            n: None,
        })
        .await
        .ok();
    }
    h.put("\0", "nul").await;
    let nul = h.mark().await;
    h.run(watch(watch_req("", "", nul), 1)).await.ok();

    // --- Request size limits (etcd's default --max-request-bytes, 1.5 MiB).
    let big = |key: &str, n: usize| PutRequest {
        key: b(key),
        value: Bytes::from(vec![b'x'; n]),
        ..Default::default()
    };
    h.step(Op::Put(big("big", 1536 * 1024 + 10 * 1024))).await;
    h.step(Op::Put(big("big", 1400 * 1024))).await;
    h.range(RangeRequest {
        keys_only: true,
        ..rq("big", "")
    })
    .await
    .ok();
    let two = |n: usize| {
        Op::Txn(txn(
            vec![],
            vec![
                RequestOp {
                    request: Some(Req::RequestPut(big("big1", n))),
                },
                RequestOp {
                    request: Some(Req::RequestPut(big("big2", n))),
                },
            ],
            vec![],
        ))
    };
    h.step(two(800 * 1024)).await;
    h.known_difference(
        two(1024 * 1024),
        "a gRPC message over the server's limit (2 MiB): grpc-go answers ResourceExhausted, \
         tonic OutOfRange",
    )
    .await;
    h.step(del("big", "bih", false)).await;
}

/// More of the hand-picked part: request fields at their edges (zero,
/// negative, from-key, server-chosen), watch streams with chosen ids.
async fn edge_cases(h: &mut Harness) {
    // --- Leases: a server-chosen id (twice), TTL 0 and negative (the
    // minimum TTL), a negative id, an id in use, the id 0 elsewhere.
    let auto0 = AUTO_LEASE;
    let auto1 = AUTO_LEASE + 1;
    h.step(Op::LeaseGrant { id: 0, ttl: 600 }).await;
    h.step(Op::LeaseGrant { id: 0, ttl: 600 }).await;
    h.step(Op::LeaseGrant { id: auto0, ttl: 60 }).await; // exists
    for (id, ttl) in [(0x3001, 0), (0x3002, -5), (-7, 600)] {
        h.step(Op::LeaseGrant { id, ttl }).await;
        h.step(Op::LeaseTtl { id, keys: true }).await;
        h.step(Op::LeaseRevoke(id)).await;
    }
    h.step(Op::LeaseRevoke(0)).await;
    h.step(Op::LeaseTtl { id: 0, keys: true }).await;
    h.step(Op::LeaseRevoke(-99)).await;
    h.step(Op::Put(PutRequest {
        lease: auto0,
        ..putr("la/1", "v")
    }))
    .await;
    h.step(Op::Txn(txn(
        vec![cmp("la/1", LEASE, EQUAL, TargetUnion::Lease(auto0))],
        vec![RequestOp {
            request: Some(Req::RequestPut(PutRequest {
                lease: auto1,
                prev_kv: true,
                ..putr("la/2", "v")
            })),
        }],
        vec![],
    )))
    .await;
    // A put of a missing lease inside a txn; ignore_value and ignore_lease
    // of a missing key inside a txn.
    for p in [
        PutRequest {
            lease: 0x7777,
            ..putr("la/3", "v")
        },
        PutRequest {
            ignore_value: true,
            ..putr("la/none", "")
        },
        PutRequest {
            ignore_lease: true,
            ..putr("la/none", "v")
        },
        PutRequest {
            ignore_value: true,
            ..putr("la/1", "v") // with a value
        },
    ] {
        h.step(Op::Txn(txn(
            vec![],
            vec![RequestOp {
                request: Some(Req::RequestPut(p)),
            }],
            vec![],
        )))
        .await;
    }
    h.range(prefix("la/")).await.ok();
    for id in [auto0, 0x7777, 0] {
        h.step(Op::KeepAlive(id)).await;
    }
    h.step(Op::Leases).await;
    h.step(Op::LeaseTtl {
        id: auto1,
        keys: true,
    })
    .await;
    for id in [auto0, auto1] {
        h.step(Op::LeaseRevoke(id)).await;
    }
    h.range(prefix("la/")).await.ok();

    // --- Ranges: negative revisions and filters, from-key bounds, a key
    // above the usual sizes.
    let now = h.mark().await;
    for r in [
        RangeRequest {
            revision: -1,
            ..prefix("t/")
        },
        RangeRequest {
            min_mod_revision: -1,
            max_mod_revision: -1,
            min_create_revision: -5,
            max_create_revision: -5,
            ..prefix("t/")
        },
        RangeRequest {
            limit: i64::MIN,
            ..prefix("t/")
        },
        RangeRequest {
            max_mod_revision: now,
            min_mod_revision: now,
            ..from_key("\0")
        },
        rq("\u{7f}", "\0"),
        rq("t/", "\0"),
    ] {
        h.range(r).await.ok();
    }
    let long_key = "k".repeat(5000);
    h.put(&long_key, "long").await;
    h.range(rq(&long_key, "")).await.ok();
    h.step(del(&long_key, "", true)).await;

    // --- Txn compares: from-key ranges, an empty key over every key, no
    // operand at all.
    for (key, end, target, result, n) in [
        ("t/", "\0", VERSION, GREATER, 0),
        ("t/", "\0", CREATE, LESS, now + 10),
        ("", "\0", MOD, GREATER, 0),
        ("", "\0", VALUE, NOT_EQUAL, 0),
    ] {
        let mut c = cmp(key, target, result, operand(target, n, "zzz"));
        c.range_end = b(end);
        h.step(Op::Txn(txn(
            vec![c],
            vec![range_op(RangeRequest {
                count_only: true,
                ..from_key("\0")
            })],
            vec![],
        )))
        .await;
    }
    let mut c = cmp("t/a", VERSION, GREATER, TargetUnion::Version(0));
    c.target_union = None;
    h.step(Op::Txn(txn(vec![c], vec![range_op(rq("t/a", ""))], vec![])))
        .await;
    for (target, result, why) in [
        (
            VERSION,
            7,
            "etcd takes an unknown compare result as true, Keel refuses it (InvalidArgument)",
        ),
        (
            9,
            EQUAL,
            "etcd takes an unknown compare target as equal, Keel refuses it (InvalidArgument)",
        ),
    ] {
        h.known_difference(
            Op::Txn(txn(
                vec![cmp("t/a", target, result, TargetUnion::Version(1))],
                vec![range_op(rq("t/a", ""))],
                vec![range_op(rq("t/b", ""))],
            )),
            why,
        )
        .await;
    }
    // Ranges with every option inside a txn; a delete whose end is before
    // its key.
    h.step(Op::Txn(txn(
        vec![],
        vec![
            range_op(RangeRequest {
                limit: 2,
                sort_order: 2,
                sort_target: 4,
                ..prefix("t/")
            }),
            range_op(RangeRequest {
                keys_only: true,
                min_create_revision: 3,
                max_mod_revision: now,
                ..from_key("t/")
            }),
            range_op(RangeRequest {
                count_only: true,
                limit: 1,
                ..prefix("t/")
            }),
            delete_op("t/z", "t/a", true),
        ],
        vec![],
    )))
    .await;

    // --- Compaction at 0 and at a negative revision.
    for rev in [0, -1] {
        h.step(Op::Compact(rev)).await;
    }

    // --- Watches: a negative start revision, one in the future, fragment
    // on small events, both filters, an unknown filter.
    let now = h.mark().await;
    for req in [
        watch_req("t/", "\0", -3),
        watch_req("t/", "\0", now + 5),
        WatchCreateRequest {
            fragment: true,
            prev_kv: true,
            ..watch_req("t/", "\0", h.compacted + 1)
        },
        WatchCreateRequest {
            filters: vec![0, 1],
            ..watch_req("t/", "\0", h.compacted + 1)
        },
        WatchCreateRequest {
            filters: vec![5],
            ..watch_req("t/", "\0", now - 3)
        },
    ] {
        h.step(Op::Watch { req, n: None }).await;
    }
    // One stream: chosen ids, a duplicate, server-chosen ids around them,
    // cancels (of a missing id too), a progress request, refusals.
    let create = |id: i64, key: &str, end: &str| {
        RequestUnion::CreateRequest(WatchCreateRequest {
            watch_id: id,
            ..watch_req(key, end, 0)
        })
    };
    let cancel = |id: i64| RequestUnion::CancelRequest(WatchCancelRequest { watch_id: id });
    h.step(Op::WatchSeq(vec![
        create(1, "a", ""),
        create(1, "b", ""),
        create(0, "c", ""),
        create(0, "c", "\0"),
        create(0, "", "\0"),
        create(7, "z", "a"),
        cancel(1),
        cancel(42),
        create(0, "d", ""),
        RequestUnion::ProgressRequest(WatchProgressRequest {}),
        create(-5, "e", ""),
        cancel(-5),
        cancel(0),
    ]))
    .await;
}

/// The part drawn from a seeded RNG over a small key space.
async fn random_ops(h: &mut Harness, seed: u64, count: usize) {
    const KEYS: u64 = 8;
    let mut rng = Rng::new(seed);
    let key = |rng: &mut Rng| format!("r/{}", rng.below(KEYS));
    let leases = [0x2001i64, 0x2002];
    for id in leases {
        h.run(Op::LeaseGrant { id, ttl: 600 }).await.ok();
    }
    let mut compacted_here = false;
    let mut state: Vec<KeyValue> = Vec::new();
    for i in 0..count {
        let p = rng.below(100);
        let op = if p < 35 {
            let lease = if rng.chance(0.1) {
                leases[rng.below(2) as usize]
            } else {
                0
            };
            let ignore_value = rng.chance(0.05);
            Op::Put(PutRequest {
                key: b(&key(&mut rng)),
                value: if ignore_value {
                    Bytes::new()
                } else {
                    b(&format!("v{i}"))
                },
                lease,
                prev_kv: rng.chance(0.3),
                ignore_value,
                ignore_lease: lease == 0 && rng.chance(0.05),
            })
        } else if p < 50 {
            let k = key(&mut rng);
            let end = match rng.below(12) {
                0..=5 => String::new(),
                6..=8 => format!("r/{}", rng.below(KEYS + 1)),
                9 => "\0".to_string(),
                _ => "r0".to_string(),
            };
            Op::Delete(DeleteRangeRequest {
                key: b(&k),
                range_end: b(&end),
                prev_kv: rng.chance(0.5),
            })
        } else if p < 75 {
            // Refresh what etcd holds now (a compared read), to pick compare
            // operands that sometimes hold.
            if let Ok(Answer::Range(r)) = h.range(prefix("r/")).await {
                state = r.kvs;
            }
            Op::Txn(random_txn(&mut rng, &state, (h.rev, h.compacted), 0))
        } else if p < 94 {
            let mut r = random_range(&mut rng, h.rev, h.compacted);
            r.serializable = rng.chance(0.2);
            Op::Range(r)
        } else if p < 97 {
            // Lease ops: a revocation deletes the lease's keys (events for
            // the watches), a grant brings it back; puts to a revoked lease
            // then fail alike.
            let id = leases[rng.below(2) as usize];
            match rng.below(5) {
                0 => Op::LeaseRevoke(id),
                1 => Op::LeaseGrant { id, ttl: 600 },
                2 => Op::LeaseTtl { id, keys: true },
                3 => Op::KeepAlive(id),
                _ => Op::Leases,
            }
        } else if i > count / 2 && !compacted_here {
            compacted_here = true;
            Op::Compact(h.rev - 15)
        } else {
            // From the compaction point or after it.
            let from = (h.compacted.max(0) + rng.below(10) as i64)
                .min(h.rev)
                .max(1);
            let (key, end) = match rng.below(4) {
                0 => (key(&mut rng), String::new()),
                1 => (key(&mut rng), "\0".to_string()),
                _ => ("r/".to_string(), prefix_end("r/")),
            };
            Op::Watch {
                req: WatchCreateRequest {
                    prev_kv: rng.chance(0.5),
                    filters: match rng.below(6) {
                        0 => vec![0],
                        1 => vec![1],
                        _ => vec![],
                    },
                    ..watch_req(&key, &end, from)
                },
                n: None,
            }
        };
        h.run(op).await.ok();
    }
    h.range(prefix("r/")).await.ok();
    for id in leases {
        h.run(Op::LeaseRevoke(id)).await.ok();
    }
    h.range(from_key("\0")).await.ok();
}

/// A range over the random part's keys with random options, at the current
/// revision or (mostly at or above the compaction point) a past one.
fn random_range(rng: &mut Rng, rev: i64, compacted: i64) -> RangeRequest {
    const KEYS: u64 = 8;
    let lo = rng.below(KEYS);
    let hi = lo + rng.below(KEYS - lo + 1);
    let mut r = match rng.below(10) {
        0 | 1 => prefix("r/"),
        2 => from_key(&format!("r/{lo}")),
        _ => rq(&format!("r/{lo}"), &format!("r/{hi}")),
    };
    r.limit = rng.below(4) as i64;
    if rng.chance(0.5) {
        r.sort_order = rng.below(3) as i32;
        r.sort_target = rng.below(5) as i32;
    }
    r.keys_only = rng.chance(0.1);
    r.count_only = rng.chance(0.1);
    if rng.chance(0.25) {
        let lo = (compacted - 2).max(1);
        r.revision = lo + rng.below((rev - lo + 3).max(1) as u64) as i64;
    }
    if rng.chance(0.1) {
        r.min_mod_revision = rev - rng.below(20) as i64;
    }
    if rng.chance(0.05) {
        r.max_mod_revision = rev - rng.below(20) as i64;
    }
    if rng.chance(0.05) {
        r.min_create_revision = rev - rng.below(30) as i64;
    }
    if rng.chance(0.1) {
        r.max_create_revision = rev - rng.below(30) as i64;
    }
    r
}

/// `at`: etcd's current revision and compaction point.
fn random_txn(rng: &mut Rng, state: &[KeyValue], at: (i64, i64), depth: u32) -> TxnRequest {
    let rev = at.0;
    let mut compare = Vec::new();
    for _ in 0..rng.below(4) {
        let k = format!("r/{}", rng.below(8));
        let cur = state.iter().find(|kv| kv.key[..] == *k.as_bytes());
        let target = rng.below(5) as i32;
        let result = rng.below(4) as i32;
        let exact = rng.chance(0.6);
        let jitter = if exact { 0 } else { rng.below(3) as i64 - 1 };
        let op = match (target, cur) {
            (VERSION, Some(kv)) => TargetUnion::Version(kv.version + jitter),
            (CREATE, Some(kv)) => TargetUnion::CreateRevision(kv.create_revision + jitter),
            (MOD, Some(kv)) => TargetUnion::ModRevision(kv.mod_revision + jitter),
            (VALUE, Some(kv)) if exact => TargetUnion::Value(kv.value.clone()),
            (LEASE, Some(kv)) => TargetUnion::Lease(kv.lease + jitter),
            (VALUE, _) => TargetUnion::Value(b(&format!("v{}", rng.below(300)))),
            (VERSION, None) => TargetUnion::Version(rng.below(2) as i64),
            (CREATE, None) | (MOD, None) => TargetUnion::ModRevision(0),
            _ => TargetUnion::Lease(0),
        };
        let op = match (target, op) {
            (CREATE, TargetUnion::ModRevision(n)) => TargetUnion::CreateRevision(n),
            (_, op) => op,
        };
        let mut c = cmp(&k, target, result, op);
        if rng.chance(0.1) {
            c.range_end = b(&format!("r/{}", rng.below(9)));
        } else if rng.chance(0.03) {
            c.range_end = b("\0");
        }
        compare.push(c);
    }
    let branch = |rng: &mut Rng| -> Vec<RequestOp> {
        (0..rng.below(4))
            .map(|_| {
                let k = format!("r/{}", rng.below(8));
                match rng.below(10) {
                    0..=3 => put_op(&k, &format!("t{}", rng.below(1000))),
                    4..=5 => delete_op(&k, "", rng.chance(0.5)),
                    6 => delete_op(&k, &format!("r/{}", rng.below(9)), true),
                    7 => range_op(RangeRequest {
                        revision: if rng.chance(0.2) { rev } else { 0 },
                        ..prefix("r/")
                    }),
                    8 => range_op(random_range(rng, at.0, at.1)),
                    _ if depth < 2 => txn_op(random_txn(rng, state, at, depth + 1)),
                    _ => range_op(rq(&k, "")),
                }
            })
            .collect()
    };
    let success = branch(rng);
    let failure = branch(rng);
    TxnRequest {
        compare,
        success,
        failure,
    }
}

// -------------------------------------------------------------------- test

async fn connect(addr: &str, within: Duration) -> Channel {
    let start = Instant::now();
    loop {
        let attempt = async {
            let ch = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            KvClient::new(ch.clone())
                .range(rq("probe", ""))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(ch)
        };
        match attempt.await {
            Ok(ch) => return ch,
            Err(e) if start.elapsed() > within => panic!("{addr} not answering: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn start_revision(ch: &Channel) -> i64 {
    let r = KvClient::new(ch.clone())
        .range(rq("probe", ""))
        .await
        .expect("range")
        .into_inner();
    r.header.expect("header").revision
}

#[test]
fn keel_answers_like_etcd() {
    let Some(etcd_bin) = common::etcd_or_skip("the etcd differential test") else {
        return;
    };
    let seed: u64 = std::env::var("KEEL_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b65_656c);
    let count: usize = std::env::var("KEEL_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdProc::start(&etcd_bin, tmp.path());
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(15));
    // Keel's leader first, then the followers.
    let mut order = vec![leader];
    order.extend(c.nodes.iter().map(|n| n.id).filter(|&id| id != leader));
    let mismatches = c.rt.block_on(async {
        let etcd_ch = connect(&etcd.client, Duration::from_secs(30)).await;
        let mut keel_chs = Vec::new();
        for id in &order {
            keel_chs.push(connect(&c.node(*id).etcd, Duration::from_secs(15)).await);
        }
        let etcd_start = start_revision(&etcd_ch).await;
        let keel_start = start_revision(&keel_chs[0]).await;
        eprintln!(
            "etcd {} at {} starts at revision {etcd_start}; keel leader {leader} at {} at {keel_start}; seed {seed}, {count} random ops",
            etcd_bin.display(),
            etcd.client,
            c.node(leader).etcd
        );
        let mut h = Harness {
            etcd: System {
                name: "etcd",
                channels: vec![etcd_ch],
                shift: etcd_start - 1,
                retry_unavailable: false,
                auto_leases: Default::default(),
            },
            keel: System {
                name: "keel",
                channels: keel_chs,
                shift: keel_start - 1,
                retry_unavailable: true,
                auto_leases: Default::default(),
            },
            index: 0,
            rr: 0,
            mismatches: Vec::new(),
            rev: 1,
            compacted: 0,
            verbose: std::env::var_os("KEEL_DIFF_VERBOSE").is_some(),
        };
        hand_picked(&mut h).await;
        edge_cases(&mut h).await;
        let hand = h.index;
        random_ops(&mut h, seed, count).await;
        eprintln!(
            "{} operations ({hand} hand-picked, {} random) against {} and {}; {} mismatches; {:.1?}",
            h.index,
            h.index - hand,
            h.etcd.name,
            h.keel.name,
            h.mismatches.len(),
            started.elapsed()
        );
        h.mismatches
    });
    if !mismatches.is_empty() {
        let mut report = String::new();
        for m in mismatches.iter().take(30) {
            report.push_str(&format!(
                "\n#{} {} (keel via node index {}):\n  etcd: {}\n  keel: {}\n",
                m.index,
                show(&m.op),
                m.via % 3,
                show(&m.etcd),
                show(&m.keel)
            ));
        }
        panic!(
            "{} operations answered differently by etcd and Keel (seed {seed}):{report}\netcd log tail:\n{}\n{}",
            mismatches.len(),
            etcd.log_tail(),
            c.logs()
        );
    }
}
