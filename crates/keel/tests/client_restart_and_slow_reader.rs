//! The native client protocol against a real node: a client restarted with
//! the session id it had before has its writes applied (not taken for
//! retries of its predecessor's), and a client that pipelines requests
//! without reading the answers does not grow the node's memory.

mod common;

use common::{wait_metric, TestCluster};
use keel_client::{Client, ClientOptions};
use keel_net::codec::{self, ClientOp, ClientRequest, Frame};
use std::io::Write;
use std::time::{Duration, Instant};

/// A client that reuses its predecessor's session id (`client_id`) gets
/// its writes applied. Before, every new `Client` numbered its writes from
/// 1 again: after a predecessor that wrote once, the session answered the
/// new client's first write with the predecessor's reply (a "duplicate")
/// and never applied it; after one that wrote more, it refused it as
/// stale.
#[test]
fn a_restarted_client_reusing_its_session_id_has_its_writes_applied() {
    let mut c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let mut opts = ClientOptions::new(c.endpoints());
    opts.client_id = Some(4242);
    let mut check = c.client();
    for (run, writes) in [(1, 1), (2, 3), (3, 1)] {
        let mut client = Client::new(opts.clone()).expect("client");
        for w in 1..=writes {
            c.put(&mut client, "k", &format!("run {run} write {w}"));
            c.check_acked(&mut check); // else "acknowledged write k lost"
        }
    }
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A client that pipelines status requests for seconds and never reads an
/// answer. Before, the node read them all and buffered every answer (the
/// review saw 9 MB -> 778 MB in 8 s); now it stops reading that
/// connection while a few MiB of its answers are held, and goes on
/// serving everyone else.
#[test]
fn a_client_that_never_reads_its_answers_does_not_grow_the_node() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc to read the node's memory from");
        return;
    }
    let mut c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let pid = c.node(1).child.as_ref().expect("running").id();
    let before = rss_kib(pid);
    let mut s = std::net::TcpStream::connect(&c.node(1).client).expect("connect");
    // Short blocking writes: once the node stops reading, they time out.
    s.set_write_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut burst = Vec::new();
    for id in 0..1000 {
        codec::encode(
            &Frame::Request(ClientRequest {
                id,
                client: 0,
                seq: 0,
                op: ClientOp::Status,
            }),
            &mut burst,
        );
    }
    let (mut sent, mut stalls) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let mut off = 0;
        while off < burst.len() && start.elapsed() < Duration::from_secs(4) {
            match s.write(&burst[off..]) {
                Ok(n) => {
                    assert!(n > 0, "the node closed the connection");
                    off += n;
                    sent += n as u64;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    stalls += 1
                }
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    eprintln!(
        "sent {} MiB of requests ({stalls} writes timed out); node RSS {before} KiB -> {after} KiB",
        sent >> 20
    );
    // Meanwhile the node serves others.
    c.put(&mut client, "during", "1");
    assert!(
        after < before + 100 * 1024,
        "the node grew by {} MiB for a client reading nothing",
        (after - before) >> 10
    );
    assert!(
        stalls > 0,
        "the node kept reading a client that reads nothing"
    );
    drop(s);
    c.put(&mut client, "after", "1");
    c.check_acked(&mut client);
}

/// A client that pipelines linearizable reads of a 64 KiB value and never
/// reads an answer. The answers come a consensus turn after each read of
/// the connection, so before, while they were being made the node went on
/// reading requests (only answers already held counted) and took all
/// 3,000: 190 MiB of answers held for a client reading none. Now the
/// requests in flight count as the answers they are expected to bring:
/// the node takes a few MiB's worth and goes on serving everyone else.
#[test]
fn a_client_pipelining_large_reads_without_reading_does_not_grow_the_node() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc to read the node's memory from");
        return;
    }
    const VALUE: usize = 64 << 10;
    const COUNT: u64 = 3_000;
    let (mut c, http) = TestCluster::start_with_http(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "big", &"v".repeat(VALUE));
    let pid = c.node(1).child.as_ref().expect("running").id();
    let before = rss_kib(pid);
    let mut s = std::net::TcpStream::connect(&c.node(1).client).expect("connect");
    s.set_write_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let get = keel_kv::Query::Get {
        key: bytes::Bytes::from_static(b"big"),
    }
    .encode();
    let mut burst = Vec::new();
    for id in 0..COUNT {
        codec::encode(
            &Frame::Request(ClientRequest {
                id,
                client: 0,
                seq: 0,
                op: ClientOp::Read(get.clone()),
            }),
            &mut burst,
        );
    }
    // As much as the node takes within 4 s (all of it fits in the socket
    // buffers, whether or not the node reads it).
    let (mut off, start) = (0, Instant::now());
    while off < burst.len() && start.elapsed() < Duration::from_secs(4) {
        match s.write(&burst[off..]) {
            Ok(n) => {
                assert!(n > 0, "the node closed the connection");
                off += n;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("send: {e}"),
        }
    }
    // Time for the node to take and answer what it will.
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid);
    eprintln!(
        "sent {off} of {} bytes of requests; node RSS {before} KiB -> {after} KiB",
        burst.len()
    );
    // The pause is counted where operators look.
    wait_metric(
        &http[0],
        "keel_client_reads_paused_total",
        Duration::from_secs(5),
        |v| v >= 1.0,
    );
    // Meanwhile the node serves others.
    c.put(&mut client, "during", "1");
    assert!(
        after < before + 64 * 1024,
        "the node grew by {} MiB for a client reading nothing",
        (after - before) >> 10
    );
    drop(s);
    c.put(&mut client, "after", "1");
    c.check_acked(&mut client);
}
