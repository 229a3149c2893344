//! The etcd Watch API of a real 3-node Keel cluster, through raw gRPC:
//! many watches on one stream, prefix and single-key watches, NOPUT and
//! NODELETE filters, prev_kv, start revisions in the past, progress
//! requests, cancel, a compacted start revision, a client that closed its
//! side of the stream (still served), the watch gauges falling back when
//! clients go (gRPC and the JSON gateway), and a watch through a
//! follower that keeps delivering every event exactly once while the leader
//! is killed and another one takes over.

mod common;

use common::{etcd_channel as connect, TestCluster};
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::watch_client::WatchClient;
use keel_etcd_proto::etcdserverpb::watch_create_request::FilterType;
use keel_etcd_proto::etcdserverpb::watch_request::RequestUnion;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::mvccpb::event::EventType;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Streaming;

struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

async fn open(ch: &Channel) -> Stream {
    let (tx, rx) = mpsc::channel(16);
    let out = WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    Stream { tx, rx: out }
}

impl Stream {
    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("send watch request");
    }

    /// Ends the request side of the stream (a gRPC half-close).
    fn close_requests(&mut self) {
        // Replacing the only sender drops it, which ends the request stream.
        self.tx = mpsc::channel(1).0;
    }

    async fn create(&mut self, c: WatchCreateRequest) -> i64 {
        self.send(RequestUnion::CreateRequest(c)).await;
        let r = self.next().await;
        assert!(r.created, "expected a created response, got {r:?}");
        r.watch_id
    }

    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("a watch response within 20 s")
            .expect("watch stream error")
            .expect("watch stream ended")
    }

    /// Events until `n` have arrived, as (watch id, type, key, value, mod
    /// revision, prev value).
    async fn events(&mut self, n: usize) -> Vec<(i64, i32, String, String, i64, Option<String>)> {
        let mut got = Vec::new();
        while got.len() < n {
            let r = self.next().await;
            for e in r.events {
                let kv = e.kv.expect("event kv");
                got.push((
                    r.watch_id,
                    e.r#type,
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.mod_revision,
                    e.prev_kv
                        .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                ));
            }
        }
        got
    }
}

async fn put(kv: &mut KvClient<Channel>, k: &str, v: &str) -> i64 {
    kv.put(PutRequest {
        key: k.as_bytes().to_vec().into(),
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("header")
    .revision
}

async fn del(kv: &mut KvClient<Channel>, k: &str) -> i64 {
    kv.delete_range(DeleteRangeRequest {
        key: k.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .expect("delete")
    .into_inner()
    .header
    .expect("header")
    .revision
}

fn create(key: &str, end: &[u8]) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec().into(),
        range_end: end.to_vec().into(),
        ..Default::default()
    }
}

const PUT: i32 = EventType::Put as i32;
const DELETE: i32 = EventType::Delete as i32;

#[test]
fn watch_options_on_one_stream() {
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    c.rt.block_on(async {
        let ch = connect(&c.nodes[0].etcd).await;
        let mut kv = KvClient::new(ch.clone());
        let first = put(&mut kv, "p/0", "zero").await;
        let mut s = open(&ch).await;

        // Three watches on one stream: a prefix with prev_kv, a single key
        // without puts, and a prefix from a past revision.
        let mut w = create("p/", b"p0");
        w.prev_kv = true;
        let prefix = s.create(w).await;
        let mut w = create("p/1", b"");
        w.filters = vec![FilterType::Noput as i32];
        let only_deletes = s.create(w).await;
        let mut w = create("p/", b"p0");
        w.start_revision = first;
        w.filters = vec![FilterType::Nodelete as i32];
        let past = s.create(w).await;
        assert_eq!(
            (prefix, only_deletes, past),
            (0, 1, 2),
            "etcd numbers watches from 0"
        );
        // The past watch replays the put made before it existed.
        let replay = s.events(1).await;
        assert_eq!(
            replay[0],
            (past, PUT, "p/0".into(), "zero".into(), first, None)
        );

        let r1 = put(&mut kv, "p/1", "one").await;
        let r2 = put(&mut kv, "p/1", "uno").await;
        let r3 = del(&mut kv, "p/1").await;
        let _ = put(&mut kv, "other", "x").await;
        let mut got = s.events(6).await;
        got.sort_by_key(|e| (e.0, e.4));
        assert_eq!(
            got,
            vec![
                (prefix, PUT, "p/1".into(), "one".into(), r1, None),
                (
                    prefix,
                    PUT,
                    "p/1".into(),
                    "uno".into(),
                    r2,
                    Some("one".into())
                ),
                (
                    prefix,
                    DELETE,
                    "p/1".into(),
                    "".into(),
                    r3,
                    Some("uno".into())
                ),
                (only_deletes, DELETE, "p/1".into(), "".into(), r3, None),
                (past, PUT, "p/1".into(), "one".into(), r1, None),
                (past, PUT, "p/1".into(), "uno".into(), r2, None),
            ]
        );

        // A progress request answers with the revision every watch has
        // seen, on watch id -1.
        let last = put(&mut kv, "unwatched", "y").await;
        let mut progress = None;
        for _ in 0..10 {
            s.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
                .await;
            let r = s.next().await;
            assert_eq!(r.watch_id, -1, "{r:?}");
            assert!(r.events.is_empty());
            let rev = r.header.expect("header").revision;
            if rev >= last {
                progress = Some(rev);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(progress, Some(last));

        // Cancel one watch; the others go on.
        s.send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: prefix,
        }))
        .await;
        let r = s.next().await;
        assert!(r.canceled && r.watch_id == prefix, "{r:?}");
        let r4 = put(&mut kv, "p/2", "two").await;
        let got = s.events(1).await;
        assert_eq!(got, vec![(past, PUT, "p/2".into(), "two".into(), r4, None)]);

        // A watch from a compacted revision is told where history starts.
        kv.compact(CompactionRequest {
            revision: r3,
            physical: false,
        })
        .await
        .expect("compact");
        let mut w = create("p/", b"p0");
        w.start_revision = first;
        s.send(RequestUnion::CreateRequest(w)).await;
        let created = s.next().await;
        assert!(created.created, "{created:?}");
        let r = s.next().await;
        assert!(r.canceled, "{r:?}");
        assert_eq!(r.watch_id, created.watch_id);
        assert_eq!(r.compact_revision, r3);

        // A client that has sent all its requests and closed its side of
        // the stream still gets its watches' events, as from etcd.
        s.close_requests();
        let r5 = put(&mut kv, "p/3", "three").await;
        let got = s.events(1).await;
        assert_eq!(
            got,
            vec![(past, PUT, "p/3".into(), "three".into(), r5, None)]
        );
    });
}

/// A response without events carries a revision at or above every event
/// and every created response the stream sent before it: clientv3 resumes
/// a watch after a reconnect from the revision of such a response (a
/// progress response, periodic or asked for), so one below an event it
/// already delivered would deliver that event again. Here watches that
/// start a little in the past, caught up from history up to the store's
/// current revision, are created on a stream whose feed is kept busy by
/// writers, each followed at once by a progress request.
#[test]
fn progress_never_reports_a_revision_below_what_the_stream_sent() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    c.rt.block_on(async {
        let ch = connect(&c.nodes[0].etcd).await;
        let mut kv = KvClient::new(ch.clone());
        let latest = Arc::new(AtomicI64::new(put(&mut kv, "busy/0", "0").await));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (stop, latest, mut kv) = (stop.clone(), latest.clone(), kv.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let rev = put(&mut kv, &format!("busy/{w}/{}", i % 16), "v").await;
                        latest.fetch_max(rev, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut s = open(&ch).await;
        // Every write reaches this stream through the feed.
        s.create(create("busy/", b"busy0")).await;
        // The highest revision an event or a created response carried.
        let mut sent = 0i64;
        let rounds = 40;
        let mut checked = 0;
        for _ in 0..rounds {
            let mut w = create("busy/", b"busy0");
            w.start_revision = (latest.load(Ordering::Relaxed) - 100).max(1);
            s.send(RequestUnion::CreateRequest(w)).await;
            s.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
                .await;
            let mut created = None;
            loop {
                let r = s.next().await;
                let rev = r.header.as_ref().expect("header").revision;
                if let Some(e) = r.events.last() {
                    sent = sent.max(e.kv.as_ref().expect("kv").mod_revision);
                } else if r.created {
                    sent = sent.max(rev);
                    created = Some(r.watch_id);
                } else if r.watch_id == -1 {
                    assert!(
                        rev >= sent,
                        "a progress response at revision {rev} after the stream sent {sent}"
                    );
                    checked += 1;
                    break;
                }
            }
            // Each round's watch goes again, so the stream's watches stay
            // few (its canceled response comes in a later round).
            let watch_id = created.expect("the watch was created before the progress response");
            s.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id }))
                .await;
        }
        assert_eq!(checked, rounds);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }
    });
}

/// A watch on a narrow range from an old revision, over a long history with
/// nothing in its range: the service reads history for it in bounded
/// stretches (`keel_kv::store::EVENTS_SCAN_BUDGET` index entries), and the
/// stream goes on from where each read stopped, through reads with no
/// events, to the events after them and then to the live feed.
#[test]
fn a_narrow_watch_catches_up_across_history_with_nothing_for_it() {
    use keel_kv::store::EVENTS_SCAN_BUDGET;
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    c.rt.block_on(async {
        let ch = connect(&c.nodes[0].etcd).await;
        let mut kv = KvClient::new(ch.clone());
        let first = put(&mut kv, "watched/a", "1").await;
        // Txns of 128 puts: one index entry each, three reads' worth.
        let txns = 3 * EVENTS_SCAN_BUDGET / 128 + 2;
        for t in 0..txns {
            let success = (0..128)
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: format!("other/{t}/{i}").into_bytes().into(),
                        value: b"v".to_vec().into(),
                        ..Default::default()
                    })),
                })
                .collect();
            kv.txn(TxnRequest {
                success,
                ..Default::default()
            })
            .await
            .expect("txn");
        }
        let second = put(&mut kv, "watched/b", "2").await;
        let mut s = open(&ch).await;
        let mut w = create("watched/", b"watched0");
        w.start_revision = first;
        s.create(w).await;
        let got = s.events(2).await;
        let seen: Vec<_> = got.iter().map(|e| (e.2.as_str(), e.4)).collect();
        assert_eq!(seen, [("watched/a", first), ("watched/b", second)]);
        let third = put(&mut kv, "watched/c", "3").await;
        let got = s.events(1).await;
        assert_eq!((got[0].2.as_str(), got[0].4), ("watched/c", third));
    });
}

/// Periodic progress responses (`watch_progress_notify_interval_ms`) go to
/// the watches created with `progress_notify` that had no events since the
/// last tick, as etcd's: a busy watch gets its events instead, and a watch
/// without `progress_notify` gets none.
#[test]
fn periodic_progress_goes_to_idle_watches_only() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = TestCluster::start(3, "watch_progress_notify_interval_ms = 400\n");
    c.wait_for_leader(Duration::from_secs(10));
    c.rt.block_on(async {
        let ch = connect(&c.nodes[0].etcd).await;
        let kv = KvClient::new(ch.clone());
        let mut s = open(&ch).await;
        let with_progress = |key: &str| WatchCreateRequest {
            progress_notify: true,
            ..create(key, b"")
        };
        let busy = s.create(with_progress("busy")).await;
        let idle = s.create(with_progress("idle")).await;
        let quiet = s.create(create("quiet", b"")).await;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, mut kv) = (stop.clone(), kv.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    put(&mut kv, "busy", "v").await;
                }
            })
        };
        let (mut busy_progress, mut idle_progress, mut events) = (0, 0, 0);
        let mut sent = 0;
        while idle_progress < 6 {
            let r = s.next().await;
            let rev = r.header.as_ref().expect("header").revision;
            if let Some(e) = r.events.last() {
                assert_eq!(r.watch_id, busy, "{r:?}");
                sent = e.kv.as_ref().expect("kv").mod_revision;
                events += r.events.len();
                continue;
            }
            assert!(rev >= sent, "progress at {rev} after an event at {sent}");
            match r.watch_id {
                id if id == idle => idle_progress += 1,
                id if id == busy => busy_progress += 1,
                id if id == quiet => panic!("progress for a watch without progress_notify"),
                _ => panic!("unexpected response {r:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        assert!(events > 0);
        // A tick skips the busy watch unless no write at all completed in
        // the interval before it.
        assert!(
            busy_progress * 2 <= idle_progress,
            "the busy watch got {busy_progress} progress responses, the idle one \
             {idle_progress}, with {events} events between"
        );
        drop(kv);
    });
}

#[test]
fn a_watch_through_a_follower_survives_a_leader_kill() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = c
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("follower")
        .id;
    let writer_node = c
        .nodes
        .iter()
        .find(|n| n.id != leader && n.id != follower)
        .expect("third node")
        .id;
    let watch_addr = c.node(follower).etcd.clone();
    let write_addr = c.node(writer_node).etcd.clone();
    let (mut s, start) = c.rt.block_on(async {
        let ch = connect(&watch_addr).await;
        let mut kv = KvClient::new(connect(&write_addr).await);
        let start = put(&mut kv, "k/start", "0").await;
        let mut s = open(&ch).await;
        let mut w = create("k/", b"k0");
        w.start_revision = start + 1;
        s.create(w).await;
        (s, start)
    });
    let write = |c: &TestCluster, from: usize, to: usize| {
        c.rt.block_on(async {
            let mut kv = KvClient::new(connect(&write_addr).await);
            for i in from..to {
                // Retry through the election: etcd clients do the same.
                loop {
                    let r = kv
                        .put(PutRequest {
                            key: format!("k/{i:03}").into_bytes().into(),
                            value: format!("v{i}").into_bytes().into(),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(_) => break,
                        Err(e) if e.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(e) => panic!("put k/{i:03}: {e}"),
                    }
                }
            }
        })
    };
    write(&c, 0, 50);
    c.kill(leader);
    write(&c, 50, 100);
    let got = c.rt.block_on(s.events(100));
    // Every write exactly once, in order: a put whose reply was lost and
    // that was retried would show up as a repeated key, which is fine for
    // etcd's API (two puts), so compare keys in order allowing only
    // consecutive repeats from retries, and require strictly increasing
    // revisions.
    let mut keys: Vec<&str> = got.iter().map(|e| e.2.as_str()).collect();
    keys.dedup();
    let want: Vec<String> = (0..100).map(|i| format!("k/{i:03}")).collect();
    assert_eq!(keys, want);
    assert!(
        got.windows(2).all(|w| w[0].4 < w[1].4),
        "revisions must increase: {got:?}"
    );
    assert!(got[0].4 > start);
}

/// The member's watch gauges (etcd's names, on its etcd port's /metrics)
/// follow the streams and watches, and fall back when clients go: a gRPC
/// client that cancels a watch and then disconnects, and a JSON gateway
/// watch whose connection is dropped (the server has to notice).
#[test]
fn watch_streams_end_when_their_clients_go() {
    use std::io::{Read, Write};
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let addr = c.nodes[0].etcd.clone();
    let gauges = |streams: f64, watchers: f64| {
        for (name, want) in [
            ("etcd_debugging_mvcc_watch_stream_total", streams),
            ("etcd_debugging_mvcc_watcher_total", watchers),
        ] {
            let got = common::wait_metric(&addr, name, Duration::from_secs(10), |v| v == want);
            assert_eq!(got, want, "{name}");
        }
    };
    gauges(0.0, 0.0);
    // A runtime whose threads run the client's connection after the block
    // below (the cluster's runs only inside block_on), so the client's
    // going reaches the server.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ch = connect(&addr).await;
        let mut s = open(&ch).await;
        let a = s.create(create("a", b"")).await;
        s.create(create("b", b"")).await;
        gauges(1.0, 2.0);
        s.send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: a,
        }))
        .await;
        assert!(s.next().await.canceled);
        gauges(1.0, 1.0);
        drop(s);
        drop(ch);
    });
    gauges(0.0, 0.0);

    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    let body = r#"{"create_request":{"key":"YQ=="}}"#;
    write!(
        conn,
        "POST /v3/watch HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(r#""created":true"#) {
        let mut buf = [0u8; 1024];
        let n = conn.read(&mut buf).expect("read the watch stream");
        assert!(
            n > 0,
            "the watch stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    gauges(1.0, 1.0);
    drop(conn);
    gauges(0.0, 0.0);
}

/// What etcd does with one revision's many events and with create requests
/// it cannot take: a revision's events are never split over responses (a
/// client resumes from the revision after the last event it saw), unless
/// the watch asked for `fragment`, when a response that would reach the
/// request limit comes in parts, each but the last marked `fragment`; an
/// empty key range and a watch id already in use are refused with watch id
/// -1 and etcd's reasons; no key is key "\0".
#[test]
fn one_revision_is_one_response_or_marked_fragments() {
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    c.rt.block_on(async {
        let ch = connect(&c.nodes[0].etcd).await;
        let mut kv = KvClient::new(ch.clone());
        // 1100 keys of 3000 bytes: deleted in one revision, with prev_kv,
        // 1100 events (over the 1000 a response otherwise holds) and
        // ~3.4 MB (over the 1.5 MiB + 512 KiB message limit).
        const N: usize = 1100;
        let value = "v".repeat(3000);
        let mut whole = open(&ch).await;
        let mut parts = open(&ch).await;
        for (s, fragment) in [(&mut whole, false), (&mut parts, true)] {
            let mut w = create("f/", b"f0");
            w.prev_kv = true;
            w.fragment = fragment;
            s.create(w).await;
        }
        let mut writers = tokio::task::JoinSet::new();
        for t in 0..8 {
            let (mut kv, value) = (kv.clone(), value.clone());
            writers.spawn(async move {
                for i in (t..N).step_by(8) {
                    put(&mut kv, &format!("f/{i:04}"), &value).await;
                }
            });
        }
        while let Some(r) = writers.join_next().await {
            r.expect("writer");
        }
        for s in [&mut whole, &mut parts] {
            assert_eq!(s.events(N).await.len(), N);
        }
        let rev = kv
            .delete_range(DeleteRangeRequest {
                key: b"f/".to_vec().into(),
                range_end: b"f0".to_vec().into(),
                prev_kv: false,
            })
            .await
            .expect("delete the prefix")
            .into_inner()
            .header
            .expect("header")
            .revision;

        let r = whole.next().await;
        assert_eq!(r.events.len(), N, "one response for the whole revision");
        assert!(!r.fragment);
        assert!(r
            .events
            .iter()
            .all(|e| e.r#type == DELETE && e.kv.as_ref().expect("kv").mod_revision == rev));

        let mut got = 0;
        let mut responses = 0;
        loop {
            let r = parts.next().await;
            responses += 1;
            assert!(!r.events.is_empty(), "every part has events: {r:?}");
            assert!(
                prost::Message::encoded_len(&r) <= (1536 + 512) * 1024,
                "a part stays within the message limit"
            );
            got += r.events.len();
            if !r.fragment {
                break;
            }
        }
        assert_eq!(got, N, "the parts hold every event once");
        assert!(responses >= 2, "a 3.4 MB revision comes in parts");

        // An empty range: key at or after its end.
        let mut s = open(&ch).await;
        s.send(RequestUnion::CreateRequest(create("b", b"a"))).await;
        let r = s.next().await;
        assert!(r.created && r.canceled, "{r:?}");
        assert_eq!(
            (r.watch_id, r.cancel_reason.as_str()),
            (-1, "mvcc: watcher range is empty")
        );
        // "From key" ("\0" as the end) is not empty, whatever the key.
        assert_eq!(s.create(create("z", b"\0")).await, 0);
        // A watch id in use: refused, and the watch that has it goes on.
        let mut w = create("dup", b"");
        w.watch_id = 7;
        assert_eq!(s.create(w.clone()).await, 7);
        s.send(RequestUnion::CreateRequest(w)).await;
        let r = s.next().await;
        assert!(r.created && r.canceled, "{r:?}");
        assert_eq!(
            (r.watch_id, r.cancel_reason.as_str()),
            (-1, "mvcc: duplicate watch ID provided on the WatchStream")
        );
        // No key: the key "\0".
        let nul = s.create(create("", b"")).await;
        let r1 = put(&mut kv, "\0", "nul").await;
        let r2 = put(&mut kv, "dup", "d").await;
        let mut got = s.events(2).await;
        got.sort_by_key(|e| e.4);
        assert_eq!(
            got,
            vec![
                (nul, PUT, "\0".into(), "nul".into(), r1, None),
                (7, PUT, "dup".into(), "d".into(), r2, None),
            ]
        );
    });
}

/// etcd's "require leader" calls (metadata `hasleader: true`, as etcdctl's
/// `watch` and Kubernetes send): a member that knows no leader refuses
/// them, and ends their open streams after three election timeouts, so a
/// client cut off with a minority moves to another member instead of
/// waiting on a watch that sees no more writes. Calls without the flag are
/// served as before.
#[test]
fn calls_that_require_a_leader_end_when_it_is_gone() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let lonely = c
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("follower")
        .id;
    // (A majority agreed on the leader; this one may not have heard yet.)
    c.wait_status(lonely, |s| s.leader == Some(leader));
    let addr = c.node(lonely).etcd.clone();
    let open_requiring = |ch: &Channel| {
        let ch = ch.clone();
        async move {
            let (tx, rx) = mpsc::channel(16);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut()
                .insert("hasleader", "true".parse().expect("metadata"));
            WatchClient::new(ch).watch(req).await.map(|r| Stream {
                tx,
                rx: r.into_inner(),
            })
        }
    };
    let ch = c.rt.block_on(connect(&addr));
    let mut s = c.rt.block_on(async {
        let mut s = open_requiring(&ch).await.expect("a leader is known");
        s.create(create("hl", b"")).await;
        let mut kv = KvClient::new(ch.clone());
        let rev = put(&mut kv, "hl", "1").await;
        assert_eq!(s.events(1).await[0].4, rev);
        s
    });
    // Cut the member off: the two others stop.
    let others: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != lonely)
        .collect();
    for &id in &others {
        c.pause(id);
    }
    c.rt.block_on(async {
        let end = tokio::time::timeout(Duration::from_secs(30), s.rx.message())
            .await
            .expect("the stream ends within 30 s");
        let status = end.expect_err("the stream ends with an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "etcdserver: no leader");
        // A new call with the flag is refused at once.
        let refused = open_requiring(&ch).await;
        let status = match refused {
            Err(status) => status,
            // (A refusal may also arrive as the stream's first message.)
            Ok(mut s) => s.rx.message().await.expect_err("refused"),
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "etcdserver: no leader");
        // Without the flag the member still serves its own state.
        let mut plain = open(&ch).await;
        plain.create(create("hl", b"")).await;
    });
    for &id in &others {
        c.resume(id);
    }
    c.wait_for_leader(Duration::from_secs(20));
    c.rt.block_on(async {
        let retry = async {
            loop {
                match open_requiring(&ch).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        let mut s = tokio::time::timeout(Duration::from_secs(20), retry)
            .await
            .expect("calls that require a leader are served again within 20 s");
        s.create(create("hl", b"")).await;
    });
    let _ = &mut c;
}

/// A "require leader" watch whose client has stopped reading still ends
/// when its member loses the leader: the checks no longer wait for the
/// client to read. Before, they ran only when the stream was polled, which
/// the server does only while the client's flow-control window has room,
/// so a watch whose client fell behind (its window full) stayed open on a
/// member cut off from the rest, its events buffered, forever. Now the
/// call's work ends at the third check (the watch-stream gauge falls to
/// 0), and once the client reads, it gets the events sent before, then
/// "etcdserver: no leader".
#[test]
fn a_require_leader_watch_whose_client_stopped_reading_still_ends() {
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let lonely = c
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("follower")
        .id;
    // (A majority agreed on the leader; this one may not have heard yet.)
    c.wait_status(lonely, |s| s.leader == Some(leader));
    let addr = c.node(lonely).etcd.clone();
    let streams = |want: f64| {
        let name = "etcd_debugging_mvcc_watch_stream_total";
        let got = common::wait_metric(&addr, name, Duration::from_secs(30), |v| v == want);
        assert_eq!(got, want, "{name}");
    };
    streams(0.0);
    // A runtime of its own, so the client's connection is served (and
    // its window stays full) while the test thread waits.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut s = rt.block_on(async {
        let ch = connect(&addr).await;
        let (tx, rx) = mpsc::channel(16);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("hasleader", "true".parse().expect("metadata"));
        let out = WatchClient::new(ch)
            .watch(req)
            .await
            .expect("a leader is known")
            .into_inner();
        let mut s = Stream { tx, rx: out };
        s.create(create("slow/", b"slow0")).await;
        s
    });
    streams(1.0);
    // 6 MiB of events the client does not read: far more than the
    // stream's flow-control window (64 KiB) and the watch's buffer hold.
    rt.block_on(async {
        let mut kv = KvClient::new(connect(&c.node(leader).etcd).await);
        let value = "x".repeat(16 << 10);
        for i in 0..400 {
            put(&mut kv, &format!("slow/{i:03}"), &value).await;
        }
    });
    // Cut the member off: the two others stop.
    let others: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != lonely)
        .collect();
    for &id in &others {
        c.pause(id);
    }
    // The call ends though its client reads nothing.
    streams(0.0);
    rt.block_on(async {
        let read = async {
            let mut events = 0;
            loop {
                match s.rx.message().await {
                    Ok(Some(r)) => events += r.events.len(),
                    Ok(None) => panic!("the stream ended without a status"),
                    Err(status) => break (events, status),
                }
            }
        };
        let (events, status) = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the status within 30 s");
        assert!(events > 0, "none of the events sent before arrived");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "etcdserver: no leader");
    });
    for &id in &others {
        c.resume(id);
    }
}
