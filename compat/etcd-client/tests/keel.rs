//! The `etcd-client` crate (a real etcd v3 client library, on tonic) against
//! a running 3-node Keel cluster whose etcd API endpoints are in
//! `KEEL_ETCD_ENDPOINTS` (comma-separated host:port, every node). Run by
//! crates/keel/tests/etcd_client.rs with `--test-threads=1`; each test uses
//! its own key prefix.

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    LeaseGrantOptions, LeaseTimeToLiveOptions, LockOptions, ProclaimOptions, PutOptions,
    ResignOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn endpoints() -> Vec<String> {
    let eps = std::env::var("KEEL_ETCD_ENDPOINTS").expect(
        "KEEL_ETCD_ENDPOINTS is not set: these tests run against a Keel cluster \
         (cargo test -p keel --test etcd_client starts one and runs them)",
    );
    let eps: Vec<String> = eps
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    assert!(!eps.is_empty(), "KEEL_ETCD_ENDPOINTS has no endpoint");
    eps
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10))
}

async fn connect(eps: &[String]) -> Client {
    Client::connect(eps, Some(options()))
        .await
        .unwrap_or_else(|e| panic!("connecting to {eps:?}: {e}"))
}

fn values(kvs: &[etcd_client::KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn put_get_delete_and_ranges() {
    let mut c = connect(&endpoints()).await;
    c.delete("kv/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let first = c.put("kv/a", "1", None).await.unwrap();
    let r1 = first.header().unwrap().revision();
    c.put("kv/b", "2", None).await.unwrap();
    c.put("kv/c", "3", None).await.unwrap();
    let over = c
        .put("kv/a", "one", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    let prev = over.prev_key().expect("prev_kv");
    assert_eq!((prev.value_str().unwrap(), prev.version()), ("1", 1));
    assert_eq!(over.header().unwrap().revision(), r1 + 3);

    let got = c.get("kv/a", None).await.unwrap();
    assert_eq!(values(got.kvs()), pairs(&[("kv/a", "one")]));
    let kv = &got.kvs()[0];
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (r1, r1 + 3, 2)
    );
    assert!(c.get("kv/none", None).await.unwrap().kvs().is_empty());

    let all = c
        .get("kv/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        values(all.kvs()),
        pairs(&[("kv/a", "one"), ("kv/b", "2"), ("kv/c", "3")])
    );
    assert_eq!((all.count(), all.more()), (3, false));

    let range = c
        .get("kv/a", Some(GetOptions::new().with_range("kv/c")))
        .await
        .unwrap();
    assert_eq!(
        values(range.kvs()),
        pairs(&[("kv/a", "one"), ("kv/b", "2")])
    );

    let from = c
        .get(
            "kv/b",
            Some(GetOptions::new().with_from_key().with_limit(2)),
        )
        .await
        .unwrap();
    assert_eq!(values(from.kvs()), pairs(&[("kv/b", "2"), ("kv/c", "3")]));

    let limited = c
        .get(
            "kv/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(2),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        values(limited.kvs()),
        pairs(&[("kv/c", "3"), ("kv/b", "2")])
    );
    assert_eq!((limited.count(), limited.more()), (3, true));

    let by_mod = c
        .get(
            "kv/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Mod, SortOrder::Ascend)
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<&str> = by_mod
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap())
        .collect();
    assert_eq!(keys, ["kv/b", "kv/c", "kv/a"]);
    assert!(by_mod.kvs().iter().all(|kv| kv.value().is_empty()));

    let count = c
        .get(
            "kv/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!((count.count(), count.kvs().len()), (3, 0));

    // The past.
    let old = c
        .get("kv/a", Some(GetOptions::new().with_revision(r1)))
        .await
        .unwrap();
    assert_eq!(values(old.kvs()), pairs(&[("kv/a", "1")]));

    let del = c
        .delete("kv/a", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 1);
    assert_eq!(values(del.prev_kvs()), pairs(&[("kv/a", "one")]));
    let del = c
        .delete("kv/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 2);
    let none = c
        .get("kv/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((none.kvs().len(), none.count()), (0, 0));

    // etcd's errors come through as gRPC statuses.
    let future = c
        .get("kv/a", Some(GetOptions::new().with_revision(1 << 40)))
        .await
        .unwrap_err();
    assert!(
        future
            .to_string()
            .contains("required revision is a future revision"),
        "{future}"
    );
}

#[tokio::test]
async fn txn_compares_and_branches() {
    let mut c = connect(&endpoints()).await;
    c.delete("txn/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    c.put("txn/k", "v1", None).await.unwrap();

    // Compare-and-swap that holds: put and read back in one txn.
    let t = Txn::new()
        .when([Compare::value("txn/k", CompareOp::Equal, "v1")])
        .and_then([TxnOp::put("txn/k", "v2", None), TxnOp::get("txn/k", None)])
        .or_else([TxnOp::put("txn/k", "other", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[1] {
        TxnOpResponse::Get(g) => assert_eq!(values(g.kvs()), pairs(&[("txn/k", "v2")])),
        other => panic!("expected a get response, got {other:?}"),
    }

    // One that does not: the else branch runs.
    let t = Txn::new()
        .when([Compare::version("txn/k", CompareOp::Equal, 1)])
        .and_then([TxnOp::put("txn/k", "never", None)])
        .or_else([TxnOp::get("txn/", Some(GetOptions::new().with_prefix()))]);
    let r = c.txn(t).await.unwrap();
    assert!(!r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(values(g.kvs()), pairs(&[("txn/k", "v2")])),
        other => panic!("expected a get response, got {other:?}"),
    }

    // Create-if-absent, twice: only the first creates.
    for (i, want) in [(0, true), (1, false)] {
        let t = Txn::new()
            .when([Compare::create_revision("txn/new", CompareOp::Equal, 0)])
            .and_then([TxnOp::put("txn/new", format!("try{i}"), None)]);
        assert_eq!(c.txn(t).await.unwrap().succeeded(), want);
    }
    let got = c.get("txn/new", None).await.unwrap();
    assert_eq!(values(got.kvs()), pairs(&[("txn/new", "try0")]));

    // Several compares, mod revision and lease, a delete in the branch.
    let rev = got.kvs()[0].mod_revision();
    let t = Txn::new()
        .when([
            Compare::mod_revision("txn/new", CompareOp::Equal, rev),
            Compare::lease("txn/new", CompareOp::Equal, 0),
            Compare::version("txn/k", CompareOp::Greater, 1),
        ])
        .and_then([TxnOp::delete(
            "txn/",
            Some(DeleteOptions::new().with_prefix()),
        )]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 2),
        other => panic!("expected a delete response, got {other:?}"),
    }

    // The same key twice in a branch: etcd's error.
    let t = Txn::new().and_then([
        TxnOp::put("txn/d", "1", None),
        TxnOp::put("txn/d", "2", None),
    ]);
    let e = c.txn(t).await.unwrap_err();
    assert!(
        e.to_string().contains("duplicate key given in txn request"),
        "{e}"
    );
}

#[tokio::test]
async fn leases_keep_alive_revoke_and_expiry() {
    let mut c = connect(&endpoints()).await;
    c.delete("lease/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();

    // A server-chosen id, a key attached, renewed by the keep-alive stream.
    let lease = c.lease_grant(5, None).await.unwrap();
    let id = lease.id();
    assert!(id > 0, "lease id {id}");
    assert_eq!(lease.ttl(), 5);
    c.put("lease/k", "v", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    for _ in 0..3 {
        keeper.keep_alive().await.unwrap();
        let r = stream.message().await.unwrap().expect("keep-alive answer");
        assert_eq!((r.id(), r.ttl()), (id, 5));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ttl = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 5);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 5, "ttl {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"lease/k".to_vec()]);
    let listed = c.leases().await.unwrap();
    assert!(listed.leases().iter().any(|l| l.id() == id));
    assert_eq!(c.get("lease/k", None).await.unwrap().kvs()[0].lease(), id);

    // Revoking deletes the attached key.
    c.lease_revoke(id).await.unwrap();
    assert!(c.get("lease/k", None).await.unwrap().kvs().is_empty());
    let gone = c.lease_time_to_live(id, None).await.unwrap();
    assert_eq!(gone.ttl(), -1);
    keeper.keep_alive().await.unwrap();
    let r = stream.message().await.unwrap().expect("keep-alive answer");
    assert_eq!(r.ttl(), 0, "renewing a revoked lease answers TTL 0");

    // An explicit id, not renewed: the lease expires and takes its key.
    let lease = c
        .lease_grant(2, Some(LeaseGrantOptions::new().with_id(0x6b65)))
        .await
        .unwrap();
    assert_eq!(lease.id(), 0x6b65);
    c.put(
        "lease/short",
        "v",
        Some(PutOptions::new().with_lease(0x6b65)),
    )
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        if c.get("lease/short", None).await.unwrap().kvs().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the key of a 2 s lease still exists after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "expired after {:?}",
        start.elapsed()
    );
    assert_eq!(c.lease_time_to_live(0x6b65, None).await.unwrap().ttl(), -1);
}

/// (member id, leader id) as `endpoint` reports them.
async fn status(endpoint: &str) -> Option<(u64, u64)> {
    let mut c = Client::connect([endpoint], Some(options())).await.ok()?;
    let s = c.status().await.ok()?;
    Some((s.header()?.member_id(), s.leader()))
}

/// Waits until every endpoint agrees on one leader; (endpoint index of the
/// leader, member id of each endpoint, leader id).
async fn agreed_leader(eps: &[String], within: Duration) -> (usize, Vec<u64>, u64) {
    let start = Instant::now();
    loop {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for ep in eps {
            if let Some((id, leader)) = status(ep).await {
                ids.push(id);
                leaders.push(leader);
            }
        }
        if ids.len() == eps.len() && leaders[0] != 0 && leaders.iter().all(|&l| l == leaders[0]) {
            if let Some(i) = ids.iter().position(|&id| id == leaders[0]) {
                return (i, ids, leaders[0]);
            }
        }
        assert!(
            start.elapsed() < within,
            "no agreed leader within {within:?}: members {ids:?}, leaders {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Moves leadership from the leader at `eps[from]` to member `target` and
/// waits until every endpoint follows it.
async fn move_leader(eps: &[String], from: usize, target: u64) {
    let mut c = Client::connect([&eps[from]], Some(options()))
        .await
        .unwrap();
    c.move_leader(target)
        .await
        .unwrap_or_else(|e| panic!("move_leader to {target} through {}: {e}", eps[from]));
    let start = Instant::now();
    loop {
        let (_, _, leader) = agreed_leader(eps, Duration::from_secs(10)).await;
        if leader == target {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "leader is {leader}, not {target}, 10 s after move_leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const WRITES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_through_the_leader_survives_two_leader_changes() {
    let eps = endpoints();
    assert!(eps.len() >= 3, "needs three endpoints, got {eps:?}");
    let mut c = connect(&eps).await;
    c.delete("wl/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let (leader, ids, leader_id) = agreed_leader(&eps, Duration::from_secs(10)).await;
    let follower = (leader + 1) % eps.len();
    eprintln!(
        "members {ids:?}; leader {leader_id} at {}; watching through it, writing through {}",
        eps[leader], eps[follower]
    );

    // The watch, connected only to the current leader.
    let mut wc = Client::connect([&eps[leader]], Some(options()))
        .await
        .unwrap();
    let mut stream = wc
        .watch("wl/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let created = stream.message().await.unwrap().expect("created response");
    assert!(created.created(), "first watch response: {created:?}");
    let watcher = tokio::spawn(async move {
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            // After the last expected event, wait a little for extras.
            let wait = if events.len() >= WRITES {
                Duration::from_millis(500)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match tokio::time::timeout(wait, stream.message()).await {
                Err(_) => break,
                Ok(Ok(Some(r))) => {
                    assert!(!r.canceled(), "watch canceled: {r:?}");
                    for e in r.events() {
                        let kv = e.kv().expect("event kv");
                        events.push((
                            e.event_type(),
                            kv.key_str().unwrap().to_string(),
                            kv.value_str().unwrap().to_string(),
                            kv.mod_revision(),
                        ));
                    }
                }
                Ok(Ok(None)) => panic!("watch stream ended after {} events", events.len()),
                Ok(Err(e)) => panic!("watch stream failed after {} events: {e}", events.len()),
            }
        }
        (stream, events)
    });

    // The writer, through a follower: put-if-absent, so a retry after an
    // ambiguous failure (during a leader change) cannot write twice.
    let (progress_tx, mut progress) = watch::channel(0usize);
    let (moved_tx, moved) = watch::channel(0u32);
    let writer_ep = eps[follower].clone();
    let writer = tokio::spawn(async move {
        let mut c = Client::connect([&writer_ep], Some(options()))
            .await
            .unwrap();
        let mut moved = moved;
        let mut retries = 0;
        for i in 0..WRITES {
            // Keep writing during each transfer (started at 50 and 120),
            // but not far past it.
            let need = if i >= 190 {
                2
            } else if i >= 100 {
                1
            } else {
                0
            };
            moved.wait_for(|&n| n >= need).await.unwrap();
            let key = format!("wl/{i:03}");
            let start = Instant::now();
            loop {
                let t = Txn::new()
                    .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), format!("{i}"), None)]);
                match c.txn(t).await {
                    Ok(_) => break,
                    Err(e) => {
                        retries += 1;
                        assert!(
                            start.elapsed() < Duration::from_secs(15),
                            "put {key} failing for 15 s: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            progress_tx.send_replace(i + 1);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        retries
    });

    // Two leadership moves while the writer runs: away from the watched
    // node, then to the third node.
    progress.wait_for(|&n| n >= 50).await.unwrap();
    let second = (leader + 2) % eps.len();
    move_leader(&eps, leader, ids[follower]).await;
    eprintln!("leader moved to {}", ids[follower]);
    moved_tx.send_replace(1);
    progress.wait_for(|&n| n >= 120).await.unwrap();
    move_leader(&eps, follower, ids[second]).await;
    eprintln!("leader moved to {}", ids[second]);
    moved_tx.send_replace(2);

    let retries = writer.await.unwrap();
    let (_stream, events) = watcher.await.unwrap();
    eprintln!(
        "{} events through {} ({retries} write retries)",
        events.len(),
        eps[leader]
    );
    let (now_leader, _, _) = agreed_leader(&eps, Duration::from_secs(10)).await;
    assert_ne!(now_leader, leader, "the watched node is still the leader");
    assert_eq!(
        events.len(),
        WRITES,
        "expected exactly {WRITES} events; first keys {:?}",
        events.iter().take(5).collect::<Vec<_>>()
    );
    for (i, (kind, key, value, _)) in events.iter().enumerate() {
        assert_eq!(*kind, EventType::Put, "event {i}");
        assert_eq!(
            (key.as_str(), value.as_str()),
            (format!("wl/{i:03}").as_str(), format!("{i}").as_str()),
            "event {i} out of order, missing or repeated"
        );
    }
    for w in events.windows(2) {
        assert!(
            w[1].3 > w[0].3,
            "mod revisions not increasing: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

/// The value of the next leader an Observe stream reports.
async fn next_value(observed: &mut etcd_client::ObserveStream) -> String {
    let r = tokio::time::timeout(Duration::from_secs(20), observed.message())
        .await
        .expect("an observed leader within 20 s")
        .unwrap()
        .expect("the observe stream open");
    r.kv().expect("kv").value_str().unwrap().to_string()
}

/// The crate's `lock` / `unlock` and election calls, which use etcd's
/// server-side Lock and Election services: a second locker waits for the
/// first to unlock; a candidate leads, proclaims, is observed, resigns, and
/// the next candidate leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_services() {
    let eps = endpoints();
    let mut c = connect(&eps).await;
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let l2 = c.lease_grant(30, None).await.unwrap().id();
    let held = c
        .lock("recipes-lock", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    let key1 = held.key().to_vec();
    assert_eq!(key1, format!("recipes-lock/{l1:x}").into_bytes());
    let mut other = connect(&eps[1..]).await;
    let waiter = tokio::spawn(async move {
        other
            .lock("recipes-lock", Some(LockOptions::new().with_lease(l2)))
            .await
            .map(|r| r.key().to_vec())
    });
    // The waiter's key is queued behind ours, and it has no answer yet.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let queued = c
            .get("recipes-lock/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if queued.kvs().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the second locker never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiter.is_finished(), "the lock was given twice");
    c.unlock(key1).await.unwrap();
    let key2 = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the second locker got the lock within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(key2, format!("recipes-lock/{l2:x}").into_bytes());
    c.unlock(key2).await.unwrap();

    let won = c.campaign("recipes-el", "first", l1).await.unwrap();
    let leader = won.leader().expect("a leader key").clone();
    let mut observer = connect(&eps[2..]).await;
    let mut observed = observer.observe("recipes-el").await.unwrap();
    assert_eq!(next_value(&mut observed).await, "first");
    c.proclaim(
        "second",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .unwrap();
    assert_eq!(next_value(&mut observed).await, "second");
    let now = c.leader("recipes-el").await.unwrap();
    assert_eq!(now.kv().unwrap().value_str().unwrap(), "second");
    let mut rival = connect(&eps[1..]).await;
    let challenger = tokio::spawn(async move { rival.campaign("recipes-el", "third", l2).await });
    c.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .unwrap();
    let won = tokio::time::timeout(Duration::from_secs(20), challenger)
        .await
        .expect("the challenger led within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        won.leader().unwrap().key(),
        format!("recipes-el/{l2:x}").as_bytes()
    );
    assert_eq!(next_value(&mut observed).await, "third");
    c.lease_revoke(l1).await.unwrap();
    c.lease_revoke(l2).await.unwrap();
    let none = c.leader("recipes-el").await.unwrap_err();
    assert!(none.to_string().contains("election: no leader"), "{none}");
}
