//! Real `keel server` processes whose peer links go through fault-injecting
//! proxies (`common::proxy`): an isolated leader is replaced and rejoins
//! without losing an acknowledged write; one cut link, or a link that
//! fails one way only (the half-failed link of Cloudflare's 2020 outage),
//! does not unseat a leader the rest of the cluster still hears, nor raise
//! the term; a slow link below the election timeout moves nothing; an
//! isolated member refuses linearizable reads through the etcd API rather
//! than answer them stale. Every test ends by reading back every
//! acknowledged write.

mod common;

use common::proxy::Way;
use common::TestCluster;
use std::time::{Duration, Instant};

/// One cluster at a time: the tests assert that nothing moves for seconds,
/// which a machine busy with several clusters could break on its own.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `n` keys `prefix{i}`, each acknowledged.
fn write(c: &mut TestCluster, prefix: &str, n: usize) {
    let mut client = c.client();
    for i in 0..n {
        c.put(&mut client, &format!("{prefix}{i}"), &format!("v{i}"));
    }
}

/// The (leader, term) every running node reports, if they all agree.
fn agreed(c: &TestCluster) -> Option<(u64, u64)> {
    let all: Vec<_> = c.nodes.iter().map(|n| c.status(n.id)).collect();
    let first = all.first()?.as_ref()?;
    let view = (first.leader?, first.term);
    all.iter()
        .all(|s| {
            s.as_ref()
                .is_some_and(|s| (s.leader, s.term) == (Some(view.0), view.1))
        })
        .then_some(view)
}

/// Waits until every node reports the same leader and term, and has
/// applied what that leader has.
fn wait_converged(c: &TestCluster, within: Duration) -> (u64, u64) {
    let start = Instant::now();
    loop {
        if let Some((leader, term)) = agreed(c) {
            let applied = c.status(leader).map_or(0, |s| s.applied);
            let caught_up = c
                .nodes
                .iter()
                .all(|n| c.status(n.id).is_some_and(|s| s.applied >= applied));
            if caught_up {
                return (leader, term);
            }
        }
        assert!(
            start.elapsed() < within,
            "nodes not converged within {within:?}: {:?}{}",
            c.nodes.iter().map(|n| c.status(n.id)).collect::<Vec<_>>(),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For `span`, while writes go on, checks at every step that no node
/// reports a term other than `term` or a leader other than `leader`
/// (a node that hears no leader may report none).
fn assert_stable_while_writing(c: &mut TestCluster, leader: u64, term: u64, span: Duration) {
    let mut client = c.client();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < span {
        c.put(&mut client, &format!("during{i}"), "x");
        i += 1;
        for n in 1..=c.nodes.len() as u64 {
            let s = c
                .status(n)
                .unwrap_or_else(|| panic!("node {n} answers no status"));
            assert_eq!(s.term, term, "node {n}'s term moved: {s:?}{}", c.logs());
            assert!(
                s.leader.is_none() || s.leader == Some(leader),
                "node {n} follows another leader: {s:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(i >= 3, "only {i} writes in {span:?}");
}

#[test]
fn an_isolated_leader_is_replaced_and_rejoins() {
    let _one = serial();
    let mut c = TestCluster::start_proxied(3, "");
    let (old, term) = c.wait_for_leader(Duration::from_secs(10));
    write(&mut c, "before", 20);
    for link in c.links_of(old) {
        link.cut();
    }
    // The other two elect a leader of a later term, and it takes writes.
    let start = Instant::now();
    let (new, new_term) = loop {
        let (l, t) = c.wait_for_leader(Duration::from_secs(10));
        if l != old {
            break (l, t);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the isolated leader {old} still counted as leader{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(new_term > term);
    write(&mut c, "apart", 20);
    // The isolated node, without a quorum, has stepped down.
    let start = Instant::now();
    while c.status(old).is_some_and(|s| s.role == "leader") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the isolated leader {old} did not step down (check-quorum){}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for link in c.links_of(old) {
        link.heal();
    }
    // It rejoins under the new leader and catches up.
    // Pre-vote and stickiness: the rejoining node disturbs nothing.
    assert_eq!(
        wait_converged(&c, Duration::from_secs(15)),
        (new, new_term),
        "the rejoining node moved the leadership or the term"
    );
    write(&mut c, "after", 10);
    let mut client = c.client();
    c.check_acked(&mut client);
}

/// One link of the leader fails (cut, or stalled from the leader to the
/// follower only): the follower behind it can no longer hear the leader,
/// but the third node still does, so its pre-votes are refused and nothing
/// changes for the seconds the link is down (several election timeouts).
/// After the heal the follower catches up. `fail` gets the link and the
/// way from the leader to the follower.
fn a_failed_link_changes_nothing(fail: impl Fn(&common::proxy::LinkProxy, Way)) {
    let _one = serial();
    let mut c = TestCluster::start_proxied(3, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    // All three settled in the first term's leader before the fault.
    let (leader, term) = {
        let start = Instant::now();
        loop {
            if agreed(&c) == Some((leader, term)) {
                break (leader, term);
            }
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    write(&mut c, "before", 10);
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
    // The lower id dials: "forward" is from it.
    let way = if leader < follower {
        Way::Forward
    } else {
        Way::Back
    };
    fail(c.link(leader, follower), way);
    assert_stable_while_writing(&mut c, leader, term, Duration::from_secs(4));
    c.link(leader, follower).heal();
    assert_eq!(wait_converged(&c, Duration::from_secs(15)), (leader, term));
    let mut client = c.client();
    c.check_acked(&mut client);
}

#[test]
fn a_cut_link_does_not_unseat_the_leader() {
    a_failed_link_changes_nothing(|link, _| link.cut());
}

#[test]
fn a_link_failing_one_way_does_not_unseat_the_leader() {
    // The follower still reaches the leader; the leader's heartbeats and
    // appends do not reach it.
    a_failed_link_changes_nothing(|link, leader_to_follower| link.stall(leader_to_follower));
}

#[test]
fn a_slow_link_moves_nothing() {
    // 150 ms each way on two of the three links: heartbeats arrive late
    // but well within the election timeout (500–1000 ms).
    let _one = serial();
    let mut c = TestCluster::start_proxied(3, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    assert_eq!(wait_converged(&c, Duration::from_secs(10)), (leader, term));
    for link in c.links_of(leader) {
        link.delay(Duration::from_millis(150));
    }
    assert_stable_while_writing(&mut c, leader, term, Duration::from_secs(3));
    for link in c.links_of(leader) {
        link.heal();
    }
    assert_eq!(wait_converged(&c, Duration::from_secs(10)), (leader, term));
    let mut client = c.client();
    c.check_acked(&mut client);
}

/// The proxy itself, against an echo server: it forwards, a stalled way
/// holds the bytes until the heal, a cut closes the connection and refuses
/// the next.
#[test]
fn the_proxy_forwards_stalls_and_cuts() {
    use std::io::{Read, Write};
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = echo.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 100];
                while let Ok(n @ 1..) = s.read(&mut b) {
                    if s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let p = common::proxy::LinkProxy::start(&target);
    let mut c = std::net::TcpStream::connect(&p.addr).expect("connect");
    let roundtrip = |c: &mut std::net::TcpStream, text: &[u8], within: Duration| {
        c.set_read_timeout(Some(within)).expect("timeout");
        c.write_all(text).expect("write");
        let mut b = vec![0u8; text.len()];
        c.read_exact(&mut b).map(|()| b)
    };
    assert_eq!(
        roundtrip(&mut c, b"hello", Duration::from_secs(5)).expect("echo"),
        b"hello"
    );
    p.stall(Way::Forward);
    let held = roundtrip(&mut c, b"held", Duration::from_millis(300));
    assert!(held.is_err(), "a stalled way let bytes through: {held:?}");
    p.heal();
    let mut b = [0u8; 4];
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.read_exact(&mut b).expect("the held bytes after the heal");
    assert_eq!(&b, b"held");
    p.cut();
    let mut b = [0u8; 1];
    assert!(
        matches!(c.read(&mut b), Ok(0) | Err(_)),
        "a cut left the connection open"
    );
    let mut again = std::net::TcpStream::connect(&p.addr).expect("connect");
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = again.write_all(b"x");
    assert!(
        matches!(again.read(&mut b), Ok(0) | Err(_)),
        "a cut link took a connection"
    );
}

/// Through the etcd API: a member cut off from the others never answers a
/// linearizable read with stale data (it fails, so the client retries
/// elsewhere), while a serializable read gets its own, older state, as
/// etcd's would; after the heal it reads the newest value.
#[test]
fn an_isolated_member_refuses_linearizable_reads() {
    use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
    use keel_etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
    let _one = serial();
    let c = TestCluster::start_proxied(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut at_leader = KvClient::new(common::etcd_channel(&c.node(leader).etcd).await);
        let mut at_follower = KvClient::new(common::etcd_channel(&c.node(follower).etcd).await);
        let put = |v: &'static str| PutRequest {
            key: "k".into(),
            value: v.into(),
            ..Default::default()
        };
        let read = |serializable| RangeRequest {
            key: "k".into(),
            serializable,
            ..Default::default()
        };
        let value = |r: keel_etcd_proto::etcdserverpb::RangeResponse| {
            r.kvs
                .first()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        };
        at_leader.put(put("old")).await.expect("put old");
        // The follower has it before the cut.
        let seen = at_follower
            .range(read(false))
            .await
            .expect("read")
            .into_inner();
        assert_eq!(value(seen).as_deref(), Some("old"));

        for link in c.links_of(follower) {
            link.cut();
        }
        at_leader
            .put(put("new"))
            .await
            .expect("put new with a majority");
        match at_follower.range(read(false)).await {
            Ok(r) => panic!("an isolated member answered a linearizable read: {r:?}"),
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
        }
        let stale = at_follower
            .range(read(true))
            .await
            .expect("serializable read");
        assert_eq!(value(stale.into_inner()).as_deref(), Some("old"));

        for link in c.links_of(follower) {
            link.heal();
        }
        let start = Instant::now();
        loop {
            if let Ok(r) = at_follower.range(read(false)).await {
                assert_eq!(value(r.into_inner()).as_deref(), Some("new"));
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no linearizable read after the heal"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
