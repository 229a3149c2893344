//! etcd's Lock and Election services (`v3lockpb.Lock`,
//! `v3electionpb.Election`: the server-side recipes that the etcd-client
//! crate's `lock` and election calls, and jetcd, use) through raw gRPC,
//! against a 3-node Keel cluster and against a real etcd 3.4: the same
//! script runs on both, asserting the recipes' behaviour as it goes (a lock
//! waits for the holders before it, unlock and a revoked lease hand it on,
//! a cancelled waiter leaves no key, a leader proclaims and resigns, an
//! observer sees every leader's values in order, etcd's errors), and the
//! two transcripts (keys, values, leases, errors; no revisions) must match.
//! On Keel, the waiting calls go through a follower. Then, on Keel only,
//! where it answers differently on purpose: a waiter whose own lease ended
//! is told so, an abandoned campaign leaves no key, a lock retried at
//! once after its client gave up on it keeps the key it gets, a lock
//! abandoned while its claim is in flight leaves no key, and neither does
//! one abandoned while the cluster has no leader (once it has one again),
//! nor one whose claim failed with its outcome unknown and committed later.

mod common;

use bytes::Bytes;
use common::{etcd_channel, EtcdProc, TestCluster};
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
use keel_etcd_proto::etcdserverpb::watch_client::WatchClient;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::v3electionpb::election_client::ElectionClient;
use keel_etcd_proto::v3electionpb::*;
use keel_etcd_proto::v3lockpb::lock_client::LockClient;
use keel_etcd_proto::v3lockpb::*;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Status;

const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn error(s: Status) -> String {
    format!("error {:?}: {}", s.code(), s.message())
}

/// The keys under `prefix`, oldest first (by create revision), with values.
async fn keys(ch: &Channel, prefix: &str) -> Vec<(String, String)> {
    try_keys(ch, prefix).await.expect("range")
}

async fn try_keys(ch: &Channel, prefix: &str) -> Result<Vec<(String, String)>, Status> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    let r = KvClient::new(ch.clone())
        .range(RangeRequest {
            key: Bytes::from(prefix.to_string()),
            range_end: end.into(),
            sort_target: range_request::SortTarget::Create as i32,
            sort_order: range_request::SortOrder::Ascend as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.kvs
        .iter()
        .map(|kv| (text(&kv.key), text(&kv.value)))
        .collect())
}

/// Waits until `prefix` holds `n` keys. (A read the cluster cannot answer
/// yet, just after an election, is tried again.)
async fn until_keys(ch: &Channel, prefix: &str, n: usize) -> Vec<(String, String)> {
    within(&format!("{n} keys under {prefix}"), async {
        loop {
            match try_keys(ch, prefix).await {
                Ok(k) if k.len() == n => return k,
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::Unavailable => {}
                Err(e) => panic!("range: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Grants leases `ids` (60 s) through `ch`; the client, for more.
async fn grant(ch: &Channel, ids: &[i64]) -> LeaseClient<Channel> {
    let mut leases = LeaseClient::new(ch.clone());
    for &id in ids {
        leases
            .lease_grant(LeaseGrantRequest { ttl: 60, id })
            .await
            .expect("grant");
    }
    leases
}

/// The key a contender under `lease` owns for `name`.
fn key(name: &str, lease: i64) -> String {
    format!("{name}/{lease:x}")
}

fn lock(ch: &Channel, name: &str, lease: i64) -> JoinHandle<Result<LockResponse, Status>> {
    let mut c = LockClient::new(ch.clone());
    let req = LockRequest {
        name: Bytes::from(name.to_string()),
        lease,
    };
    tokio::spawn(async move { c.lock(req).await.map(|r| r.into_inner()) })
}

fn campaign(
    ch: &Channel,
    name: &str,
    lease: i64,
    value: &str,
) -> JoinHandle<Result<CampaignResponse, Status>> {
    let mut c = ElectionClient::new(ch.clone());
    let req = CampaignRequest {
        name: Bytes::from(name.to_string()),
        lease,
        value: Bytes::from(value.to_string()),
    };
    tokio::spawn(async move { c.campaign(req).await.map(|r| r.into_inner()) })
}

/// The next leader an Observe stream reports, as `key=value`.
async fn next(o: &mut tonic::Streaming<LeaderResponse>) -> String {
    let r = within("an observed leader", o.message())
        .await
        .expect("observe stream")
        .expect("observe stream open");
    let kv = r.kv.expect("kv");
    format!("{}={}", text(&kv.key), text(&kv.value))
}

/// Waits until `key` holds `value`.
async fn until_value(ch: &Channel, key: &str, value: &str) {
    within(&format!("{key}={value}"), async {
        loop {
            let r = KvClient::new(ch.clone())
                .range(RangeRequest {
                    key: Bytes::from(key.to_string()),
                    ..Default::default()
                })
                .await
                .expect("range")
                .into_inner();
            if r.kvs.first().is_some_and(|kv| kv.value == value.as_bytes()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Puts `key` = `value` under `lease`, as a call of that lease whose
/// member went away would have left it.
async fn leave_key(ch: &Channel, key: &str, value: &str, lease: i64) {
    KvClient::new(ch.clone())
        .put(PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            lease,
            ..Default::default()
        })
        .await
        .expect("put");
}

async fn done<T>(what: &str, h: JoinHandle<T>) -> T {
    within(what, h).await.expect("task")
}

/// Runs the script through `a` (the leader, for Keel) and `b` (a
/// follower), asserting as it goes; returns the transcript. Leases are
/// granted with ids from `base`, so keys are the same on both systems.
async fn script(a: Channel, b: Channel, base: i64) -> Vec<String> {
    let mut t = Vec::new();
    let [l1, l2, l3, l4] = [1, 2, 3, 4].map(|n| base + n);
    let mut leases = grant(&a, &[l1, l2, l3, l4]).await;
    let mut locks = LockClient::new(a.clone());

    // Lock: the first contender holds it at once; the same lease again is
    // the same acquisition.
    let held = done("lock l1", lock(&a, "job", l1)).await.expect("lock l1");
    assert_eq!(text(&held.key), key("job", l1));
    let again = done("lock l1 again", lock(&a, "job", l1))
        .await
        .expect("lock l1 again");
    assert_eq!(again.key, held.key);
    t.push(format!(
        "lock l1: {}, again: {}",
        text(&held.key),
        text(&again.key)
    ));

    // A second contender waits while the first holds it; unlock hands on.
    let waiter = lock(&b, "job", l2);
    let queued = until_keys(&a, "job/", 2).await;
    assert_eq!(queued[0].0, key("job", l1), "{queued:?}");
    assert!(!waiter.is_finished(), "lock l2 answered while l1 holds it");
    t.push(format!("queued: {queued:?}"));
    locks
        .unlock(UnlockRequest {
            key: held.key.clone(),
        })
        .await
        .expect("unlock");
    let second = done("lock l2", waiter).await.expect("lock l2");
    assert_eq!(text(&second.key), key("job", l2));
    t.push(format!("after unlock: {}", text(&second.key)));

    // A revoked lease hands it on too.
    let waiter = lock(&a, "job", l3);
    until_keys(&a, "job/", 2).await;
    assert!(!waiter.is_finished(), "lock l3 answered while l2 holds it");
    leases
        .lease_revoke(LeaseRevokeRequest { id: l2 })
        .await
        .expect("revoke l2");
    let third = done("lock l3", waiter).await.expect("lock l3");
    assert_eq!(text(&third.key), key("job", l3));
    t.push(format!("after revoke: {}", text(&third.key)));

    // A waiter that gives up leaves no key behind.
    let waiter = lock(&b, "job", l4);
    until_keys(&a, "job/", 2).await;
    waiter.abort();
    let left = until_keys(&a, "job/", 1).await;
    t.push(format!("after a waiter gave up: {left:?}"));

    // A waiter's key left by an earlier call of its lease (through a
    // member that went away, say): a retry adopts it, and when the retry
    // gives up too, the key goes as if the retry had made it. (The client
    // gives up once its request has surely reached the server; the key
    // must go whenever the server learns of it.)
    leave_key(&a, &key("job", l4), "", l4).await;
    let mut retry = LockClient::new(b.clone());
    let retry = retry.lock(LockRequest {
        name: Bytes::from_static(b"job"),
        lease: l4,
    });
    let r = tokio::time::timeout(Duration::from_millis(500), retry).await;
    assert!(r.is_err(), "lock l4 answered while l3 holds it: {r:?}");
    let left = until_keys(&a, "job/", 1).await;
    t.push(format!("after a retry of a waiter gone gave up: {left:?}"));
    locks
        .unlock(UnlockRequest {
            key: third.key.clone(),
        })
        .await
        .expect("unlock l3");
    t.push(format!("after unlock: {:?}", keys(&a, "job/").await));

    // Errors: a lease that does not exist.
    let r = done("lock with no such lease", lock(&a, "job", base + 99)).await;
    t.push(format!(
        "no such lease: {}",
        r.map_or_else(error, |r| text(&r.key))
    ));
    // No lease: one of the default session TTL is granted for it.
    let r = done("lock without a lease", lock(&a, "solo", 0))
        .await
        .expect("lock without a lease");
    let granted = i64::from_str_radix(text(&r.key).trim_start_matches("solo/"), 16)
        .expect("a lease id in the key");
    let ttl = leases
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: granted,
            keys: true,
        })
        .await
        .expect("ttl")
        .into_inner();
    assert_eq!(ttl.keys, vec![r.key.clone()]);
    t.push(format!("no lease: granted ttl {}", ttl.granted_ttl));

    // Election.
    let mut el = ElectionClient::new(a.clone());
    let name = || Bytes::from_static(b"el");
    let r = el.leader(LeaderRequest { name: name() }).await;
    t.push(format!(
        "leader of nobody: {}",
        r.map_or_else(error, |_| "a leader".into())
    ));
    let won = done("campaign l1", campaign(&a, "el", l1, "a"))
        .await
        .expect("campaign l1");
    let lk = won.leader.expect("leader key");
    assert_eq!(
        (text(&lk.name), text(&lk.key), lk.lease),
        ("el".into(), key("el", l1), l1)
    );
    let created = KvClient::new(a.clone())
        .range(RangeRequest {
            key: lk.key.clone(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs[0]
        .create_revision;
    assert_eq!(
        lk.rev, created,
        "the leader key's rev is its create revision"
    );
    t.push(format!(
        "campaign l1: {} lease {}",
        text(&lk.key),
        lk.lease == l1
    ));

    // A candidate's key left by an earlier campaign of its lease: a retry
    // adopts it (and proclaims its value), and resigns when it gives up.
    let won = done("campaign l1", campaign(&a, "cand", l1, "a"))
        .await
        .expect("campaign l1");
    leave_key(&a, &key("cand", l4), "old", l4).await;
    let retry = campaign(&b, "cand", l4, "new");
    until_value(&a, &key("cand", l4), "new").await;
    assert!(!retry.is_finished(), "campaign l4 won while l1 leads");
    retry.abort();
    let left = until_keys(&a, "cand/", 1).await;
    t.push(format!(
        "after a retry of a candidate gone gave up: {left:?}"
    ));
    el.resign(ResignRequest { leader: won.leader })
        .await
        .expect("resign");

    let mut observed = ElectionClient::new(b.clone())
        .observe(LeaderRequest { name: name() })
        .await
        .expect("observe")
        .into_inner();
    t.push(format!("observed: {}", next(&mut observed).await));
    el.proclaim(ProclaimRequest {
        leader: Some(lk.clone()),
        value: Bytes::from_static(b"b"),
    })
    .await
    .expect("proclaim");
    t.push(format!(
        "observed after proclaim: {}",
        next(&mut observed).await
    ));
    let now = el
        .leader(LeaderRequest { name: name() })
        .await
        .expect("leader")
        .into_inner();
    t.push(format!("leader: {}", text(&now.kv.expect("kv").value)));

    let challenger = campaign(&b, "el", l3, "c");
    until_keys(&a, "el/", 2).await;
    assert!(!challenger.is_finished(), "campaign l3 won while l1 leads");
    let stale = LeaderKey {
        rev: lk.rev + 1000,
        ..lk.clone()
    };
    let r = el
        .proclaim(ProclaimRequest {
            leader: Some(stale),
            value: Bytes::from_static(b"x"),
        })
        .await;
    t.push(format!(
        "proclaim by a non-leader: {}",
        r.map_or_else(error, |_| "ok".into())
    ));
    let r = el.resign(ResignRequest { leader: None }).await;
    t.push(format!(
        "resign without a key: {}",
        r.map_or_else(error, |_| "ok".into())
    ));
    el.resign(ResignRequest {
        leader: Some(lk.clone()),
    })
    .await
    .expect("resign");
    let won = done("campaign l3", challenger).await.expect("campaign l3");
    let lk3 = won.leader.expect("leader key");
    assert_eq!(text(&lk3.key), key("el", l3));
    t.push(format!("after resign: {}", text(&lk3.key)));
    t.push(format!(
        "observed after resign: {}",
        next(&mut observed).await
    ));
    // Campaigning again under the same lease proclaims the new value.
    let again = done("campaign l3 again", campaign(&a, "el", l3, "d"))
        .await
        .expect("campaign l3 again");
    assert_eq!(again.leader.expect("leader key").key, lk3.key);
    t.push(format!(
        "observed after campaigning again: {}",
        next(&mut observed).await
    ));
    leases
        .lease_revoke(LeaseRevokeRequest { id: l3 })
        .await
        .expect("revoke l3");
    let r = el.leader(LeaderRequest { name: name() }).await;
    t.push(format!(
        "leader after its lease ended: {}",
        r.map_or_else(error, |_| "a leader".into())
    ));
    t
}

/// Where Keel answers differently from etcd 3.4, on purpose: a waiter
/// whose own lease ended while it waited is told so (etcd 3.4 answers it
/// with a key that no longer exists; 3.5 with this error). A campaign
/// whose client gives up leaves no key behind. And a lock retried at once
/// after its client gave up on it waits its turn with a key of its own
/// (not the abandoned call's, which is being deleted).
async fn keel_only(a: Channel, b: Channel, base: i64) {
    let [l1, l2, l3, l4] = [1, 2, 3, 4].map(|n| base + n);
    let mut leases = grant(&a, &[l1, l2, l3, l4]).await;
    let held = done("lock l1", lock(&a, "gone", l1))
        .await
        .expect("lock l1");
    let waiter = lock(&b, "gone", l2);
    until_keys(&a, "gone/", 2).await;
    leases
        .lease_revoke(LeaseRevokeRequest { id: l2 })
        .await
        .expect("revoke l2");
    LockClient::new(a.clone())
        .unlock(UnlockRequest { key: held.key })
        .await
        .expect("unlock");
    let r = done("lock l2", waiter).await;
    assert_eq!(
        r.map_or_else(error, |r| text(&r.key)),
        "error Unknown: mutex: session is expired"
    );

    let won = done("campaign l1", campaign(&a, "quit", l1, "a"))
        .await
        .expect("campaign l1");
    let quitter = campaign(&b, "quit", l3, "b");
    until_keys(&a, "quit/", 2).await;
    quitter.abort();
    let left = until_keys(&a, "quit/", 1).await;
    assert_eq!(left[0].0, text(&won.leader.expect("leader key").key));

    // A call that gives up deletes its key in a task of its own. A retry
    // under the same lease shares the key (adopts it) if it claims before
    // that deletion, which must then leave the key alone; if after, it
    // claims a new key. Either way the retry gets the lock, and the key it
    // holds stays. (The losing build deleted it within milliseconds.)
    let mut held_keys = Vec::new();
    for round in 0..40 {
        let name = format!("retry{round}");
        let held = done("lock l1", lock(&a, &name, l1)).await.expect("lock l1");
        let gave_up = lock(&b, &name, l4);
        until_keys(&a, &format!("{name}/"), 2).await;
        gave_up.abort();
        let _ = gave_up.await;
        let retry = lock(&b, &name, l4);
        if round % 2 == 1 {
            // Also with the retry queued before the holder lets go.
            until_keys(&a, &format!("{name}/"), 2).await;
        }
        LockClient::new(a.clone())
            .unlock(UnlockRequest { key: held.key })
            .await
            .expect("unlock");
        let r = done("the retried lock", retry)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the retried lock: {}", error(e)));
        assert_eq!(text(&r.key), key(&name, l4));
        held_keys.push((name, r.key));
    }
    for (name, k) in held_keys {
        assert_eq!(
            keys(&a, &format!("{name}/")).await,
            vec![(text(&k), String::new())],
            "{name}: the retried lock's key is there, alone"
        );
    }

    // Calls abandoned at staggered moments, some while their claim is on
    // its way: a key a claim makes after its call is gone is deleted too.
    // (The build without it left one there in most runs, and every later
    // call under the lease adopted it, so it stayed.)
    let held = done("lock l1", lock(&a, "midclaim", l1))
        .await
        .expect("lock l1");
    for round in 0..40u64 {
        let gave_up = lock(&b, "midclaim", l4);
        tokio::time::sleep(Duration::from_micros(150 * (round % 20))).await;
        gave_up.abort();
        let _ = gave_up.await;
    }
    // A write through b after the claims it took: once it is answered,
    // they are applied (b forwards its proposals in order), so a key one
    // of them made is counted below until it is deleted.
    KvClient::new(b.clone())
        .put(PutRequest {
            key: Bytes::from_static(b"midclaim-barrier"),
            ..Default::default()
        })
        .await
        .expect("put through b");
    assert_eq!(
        until_keys(&a, "midclaim/", 1).await,
        vec![(text(&held.key), String::new())],
        "only the holder's key is left"
    );
}

/// An abandoned call's key is deleted even if the cluster has no leader
/// when its client gives up: the deletion retries until one is back.
/// `waiting` is the node the call goes through; the others are paused.
fn abandoned_without_a_leader(c: &TestCluster, holding: u64, waiting: u64, base: i64) {
    let (l1, l2) = (base + 1, base + 2);
    let (waiter, held) = c.rt.block_on(async {
        let a = etcd_channel(&c.node(holding).etcd).await;
        let b = etcd_channel(&c.node(waiting).etcd).await;
        grant(&a, &[l1, l2]).await;
        let held = done("lock l1", lock(&a, "noleader", l1))
            .await
            .expect("lock l1");
        let waiter = lock(&b, "noleader", l2);
        // Read through b: its claim has its answer there.
        until_keys(&b, "noleader/", 2).await;
        (waiter, held)
    });
    let others: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != waiting)
        .collect();
    for &id in &others {
        c.pause(id);
    }
    let start = std::time::Instant::now();
    while c.status(waiting).and_then(|s| s.leader).is_some() {
        assert!(
            start.elapsed() < WAIT,
            "node {waiting} still names a leader with the others paused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.rt.block_on(async {
        waiter.abort();
        let _ = waiter.await;
        within("a failed deletion, to be retried", async {
            while !c.log_of(waiting).contains("noleader/") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    });
    assert!(
        c.log_of(waiting).contains("; retrying"),
        "the deletion says it retries: {}",
        c.log_of(waiting)
    );
    for &id in &others {
        c.resume(id);
    }
    c.wait_for_leader(WAIT);
    c.rt.block_on(async {
        let b = etcd_channel(&c.node(waiting).etcd).await;
        assert_eq!(
            until_keys(&b, "noleader/", 1).await,
            vec![(text(&held.key), String::new())],
            "the abandoned call's key is gone once there is a leader again"
        );
    });
}

/// A lock whose claim txn reached the leader's log, but whose leader lost
/// its followers and stepped down before it committed: the call fails
/// (Unavailable: outcome unknown), and the txn commits later, once a
/// leader is elected again. The key it made is nobody's: it is deleted.
fn claim_with_unknown_outcome(c: &TestCluster, base: i64) {
    let (leader, _) = c.wait_for_leader(WAIT);
    let followers: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != leader)
        .collect();
    let lease = base + 1;
    let a = c.rt.block_on(etcd_channel(&c.node(leader).etcd));
    let before = c.rt.block_on(async {
        grant(&a, &[lease]).await;
        let put = KvClient::new(a.clone())
            .put(PutRequest {
                key: Bytes::from_static(b"unknownclaim-start"),
                ..Default::default()
            })
            .await
            .expect("put");
        put.into_inner().header.expect("header").revision
    });
    // SIGSTOP takes effect at once: the claim's txn cannot commit. (The
    // lock goes at once, on a connection made before, while the leader
    // still leads: it steps down once it has heard from no follower for
    // an election timeout.)
    for &f in &followers {
        c.pause(f);
    }
    let failed = c.rt.block_on(async {
        done("a lock without followers", lock(&a, "unknownclaim", lease)).await
    });
    let e = failed.expect_err("a lock while no follower answers");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // One follower back. Whichever of the two is elected has the txn in
    // its log (the follower wins only with the old leader's vote, which
    // needs its log to be as long: it got the append before it stopped),
    // so the txn commits in the new term.
    c.resume(followers[0]);
    c.wait_for_leader(WAIT);
    c.rt.block_on(async {
        let a = etcd_channel(&c.node(leader).etcd).await;
        let mut w = WatchClient::new(a.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: Bytes::from_static(b"unknownclaim/"),
                    range_end: Bytes::from_static(b"unknownclaim0"),
                    start_revision: before + 1,
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("watch request");
        let mut events = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        let mut seen = Vec::new();
        within(
            "the key the unknown claim made, created and deleted",
            async {
                while seen.len() < 2 {
                    let r = events.message().await.expect("watch").expect("open");
                    seen.extend(
                        r.events
                            .iter()
                            .map(|e| (e.r#type, text(&e.kv.as_ref().expect("kv").key))),
                    );
                }
            },
        )
        .await;
        let k = key("unknownclaim", lease);
        assert_eq!(seen, vec![(0, k.clone()), (1, k)], "put, then delete");
        drop(tx);
    });
    c.resume(followers[1]);
}

#[test]
fn lock_and_election_services_behave_like_etcds() {
    let etcd_bin = common::etcd_or_skip("the etcd half of the lock and election test");
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(15));
    let follower = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|&id| id != leader)
        .expect("a follower");
    let base = 0x4b00;
    let keel = c.rt.block_on(async {
        let a = etcd_channel(&c.node(leader).etcd).await;
        let b = etcd_channel(&c.node(follower).etcd).await;
        script(a, b, base).await
    });
    for line in &keel {
        eprintln!("keel: {line}");
    }
    c.rt.block_on(async {
        let a = etcd_channel(&c.node(leader).etcd).await;
        let b = etcd_channel(&c.node(follower).etcd).await;
        keel_only(a, b, base + 100).await
    });
    abandoned_without_a_leader(&c, leader, follower, base + 200);
    claim_with_unknown_outcome(&c, base + 300);
    let Some(bin) = etcd_bin else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdProc::start(&bin, tmp.path());
    let theirs = c.rt.block_on(async {
        let ch = etcd_channel(&etcd.client).await;
        within("etcd's script", script(ch.clone(), ch, base)).await
    });
    assert_eq!(
        keel,
        theirs,
        "Keel's transcript (left) differs from etcd's (right); etcd's log:\n{}",
        etcd.log_tail()
    );
}

/// How many values the leader proclaims while its observer does not read
/// (8 KB each: more than the stream's flow-control windows and send
/// buffers hold, so the member's observer stops reading its feed), and
/// how many other writes pass meanwhile (more than the 4096 notifications
/// a member's feed keeps for a reader that fell behind).
const SLOW_PROCLAIMS: usize = 200;
const SLOW_OTHER_WRITES: usize = 4300;

/// A channel to `url` with HTTP/2's default flow-control windows (64 KB).
async fn ch_with_default_windows(url: String) -> Channel {
    Channel::from_shared(url)
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect")
}

/// The value the leader proclaims `i`-th: `v<i>-` and filler to 8 KB.
fn slow_value(i: usize) -> Bytes {
    let mut v = format!("v{i}-").into_bytes();
    v.resize(8 * 1024, b'x');
    Bytes::from(v)
}

/// An observer that reads nothing while the leader proclaims many values
/// and many other writes pass, then reads: the values it is sent, by
/// number (`v<i>`), in the order sent.
async fn slow_observer(addr: &str) -> Vec<String> {
    let url = format!("http://{addr}");
    let ch = etcd_channel(addr).await;
    let name = Bytes::from_static(b"slow-observer");
    let lease = LeaseClient::new(ch.clone())
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    let mut el = ElectionClient::new(ch.clone());
    let won = el
        .campaign(CampaignRequest {
            name: name.clone(),
            lease,
            value: slow_value(0),
        })
        .await
        .expect("campaign")
        .into_inner();
    // HTTP/2's default windows (hyper's client takes 2 MB a stream), so
    // that an observer that does not read holds its server up soon.
    let small = ch_with_default_windows(url).await;
    let mut observed = ElectionClient::new(small)
        .observe(LeaderRequest { name: name.clone() })
        .await
        .expect("observe")
        .into_inner();
    let number = |r: LeaderResponse| {
        let v = r.kv.expect("kv").value;
        text(&v).split('-').next().unwrap_or_default().to_string()
    };
    let first = within("the first observed value", observed.message())
        .await
        .expect("observe stream")
        .expect("observe stream open");
    let mut seen = vec![number(first)];
    let proclaim = |i: usize| {
        let (mut el, leader) = (el.clone(), won.leader.clone());
        async move {
            el.proclaim(ProclaimRequest {
                leader,
                value: slow_value(i),
            })
            .await
            .expect("proclaim")
        }
    };
    for i in 1..=SLOW_PROCLAIMS {
        proclaim(i).await;
    }
    let mut kv = KvClient::new(ch.clone());
    for i in 0..SLOW_OTHER_WRITES {
        kv.put(PutRequest {
            key: Bytes::from(format!("slow-other/{i}")),
            value: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .await
        .expect("put");
    }
    let last = SLOW_PROCLAIMS + 10;
    for i in SLOW_PROCLAIMS + 1..=last {
        proclaim(i).await;
    }
    let want = format!("v{last}");
    while seen.last() != Some(&want) {
        let r = within("the observed values", observed.message())
            .await
            .expect("observe stream")
            .unwrap_or_else(|| panic!("the observe stream ended after {seen:?}"));
        seen.push(number(r));
    }
    seen
}

/// An Observe client that falls far behind still gets every value its
/// leader proclaimed, in order, as etcd's (a watch on the leader's key from
/// the revision it was read at) does; Keel's re-read the leader once its
/// feed had dropped events for it, skipping the values in between.
#[test]
fn a_slow_observer_sees_every_value_in_order() {
    let etcd_bin = common::etcd_or_skip("the etcd half of the slow observer test");
    let want: Vec<String> = (0..=SLOW_PROCLAIMS + 10).map(|i| format!("v{i}")).collect();
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(15));
    let keel = c.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), slow_observer(&c.node(1).etcd))
            .await
            .expect("the slow observer on Keel within 300 s")
    });
    assert_eq!(keel, want, "Keel's observer");
    let Some(bin) = etcd_bin else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdProc::start(&bin, tmp.path());
    let theirs = c.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), slow_observer(&etcd.client))
            .await
            .expect("the slow observer on etcd within 300 s")
    });
    assert_eq!(
        theirs,
        want,
        "etcd's observer; its log:\n{}",
        etcd.log_tail()
    );
}
