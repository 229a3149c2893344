//! Client connections: responses sent from a plain thread that defers its
//! writes (as the service thread does) all arrive, in order, even when
//! they far exceed the socket buffer, and the connection closes once the
//! client has stopped sending and every request is answered.

mod common;
use bytes::Bytes;
use common::{free_addr, runtime};
use keel_net::codec::{self, ClientOp, ClientRequest, ClientResponse, ClientResult, Frame};
use keel_net::tcp::{self, start_clients, NetStats, ResponseSink};
use std::io::{Read, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const RESPONSE_BYTES: usize = 64 << 10;

#[test]
fn deferred_responses_larger_than_the_socket_buffer_arrive_in_order_then_the_connection_closes() {
    let rt = runtime();
    let addr = free_addr();
    // The handler hands each read's requests to a responder thread.
    let (tx, rx) = mpsc::channel::<(Vec<ClientRequest>, ResponseSink)>();
    let tx = Mutex::new(tx);
    let handler: tcp::RequestHandler = Arc::new(move |reqs, sink: &ResponseSink| {
        let _ = tx.lock().expect("lock").send((reqs, sink.clone()));
    });
    rt.block_on(start_clients(
        &addr,
        1,
        16 << 20,
        handler,
        Arc::new(NetStats::default()),
    ))
    .expect("listen");
    let responder = std::thread::spawn(move || {
        tcp::defer_flushes();
        for (reqs, sink) in rx {
            for r in reqs {
                let ClientOp::Write(data) = r.op else {
                    panic!("unexpected {:?}", r.op)
                };
                let body = Bytes::from(vec![data[0]; RESPONSE_BYTES]);
                assert!(sink.send(ClientResponse {
                    id: r.id,
                    result: ClientResult::Ok(body),
                }));
            }
            drop(sink);
            tcp::flush_deferred();
        }
    });

    // 1,000 requests (64 MiB of answers), then the client stops sending.
    let count = 1_000u64;
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut requests = Vec::new();
    for id in 0..count {
        let req = ClientRequest {
            id,
            client: 1,
            seq: id,
            op: ClientOp::Write(Bytes::from(vec![id as u8])),
        };
        codec::encode(&Frame::Request(req), &mut requests);
    }
    conn.write_all(&requests).expect("write");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // Everything up to EOF: the server closes once all are answered.
    let mut got = Vec::new();
    conn.read_to_end(&mut got)
        .expect("the connection closes after the last answer");
    let mut off = 0;
    let mut next = 0u64;
    while let Some((frame, n)) = codec::decode(&got[off..], 16 << 20).expect("decode") {
        off += n;
        let Frame::Response(ClientResponse {
            id,
            result: ClientResult::Ok(body),
        }) = frame
        else {
            panic!("unexpected frame {frame:?}");
        };
        assert_eq!(id, next, "out of order");
        assert_eq!(body.len(), RESPONSE_BYTES);
        assert!(body.iter().all(|&b| b == id as u8), "response {id} mangled");
        next += 1;
    }
    assert_eq!(off, got.len(), "a partial frame at the end");
    assert_eq!(next, count, "answers missing");
    drop(rt); // stops the handler, which ends the responder
    responder.join().expect("responder");
}

/// Connections served on a thread that defers its writes (the consensus
/// thread runs client connections): answers the request handler gives
/// itself there (refusals) are written when it returns. Nothing else would
/// flush them on this thread here, so a lost flush fails by timeout.
#[test]
fn answers_a_handler_gives_on_a_deferring_thread_go_out_at_once() {
    let addr = free_addr();
    let (ready_tx, ready_rx) = mpsc::channel();
    let listen = addr.clone();
    std::thread::spawn(move || {
        tcp::defer_flushes();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let handler: tcp::RequestHandler = Arc::new(|reqs, sink: &ResponseSink| {
                for r in reqs {
                    sink.send(ClientResponse {
                        id: r.id,
                        result: ClientResult::Busy,
                    });
                }
            });
            start_clients(&listen, 1, 1 << 20, handler, Arc::new(NetStats::default()))
                .await
                .expect("listen");
            let _ = ready_tx.send(());
            std::future::pending::<()>().await;
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("listening");
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = Vec::new();
    codec::encode(
        &Frame::Request(ClientRequest {
            id: 42,
            client: 1,
            seq: 1,
            op: ClientOp::Write(Bytes::from_static(b"x")),
        }),
        &mut req,
    );
    conn.write_all(&req).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let frame = loop {
        if let Some((f, _)) = codec::decode(&got, 1 << 20).expect("decode") {
            break f;
        }
        let n = conn.read(&mut buf).expect("the refusal never came");
        assert!(n > 0, "connection closed without an answer");
        got.extend_from_slice(&buf[..n]);
    };
    assert_eq!(
        frame,
        Frame::Response(ClientResponse {
            id: 42,
            result: ClientResult::Busy
        })
    );
}

/// Serves client connections on `addr`, answering each request at once
/// with `answer(request id)` bytes; returns the count of requests taken.
fn serve_answering(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    answer: impl Fn(u64) -> usize + Send + Sync + 'static,
) -> Arc<std::sync::atomic::AtomicU64> {
    let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = taken.clone();
    let handler: tcp::RequestHandler = Arc::new(move |reqs, sink: &ResponseSink| {
        for r in reqs {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = Bytes::from(vec![r.id as u8; answer(r.id)]);
            sink.send(ClientResponse {
                id: r.id,
                result: ClientResult::Ok(body),
            });
        }
    });
    rt.block_on(start_clients(
        addr,
        1,
        64 << 20,
        handler,
        Arc::new(NetStats::default()),
    ))
    .expect("listen");
    taken
}

/// `count` small requests, ids from `first`.
fn requests(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for id in first..first + count {
        let req = ClientRequest {
            id,
            client: 1,
            seq: id,
            op: ClientOp::Status,
        };
        codec::encode(&Frame::Request(req), &mut out);
    }
    out
}

/// Reads answers from `conn` until `count` have come; checks they are
/// in order from `first` with bodies of `size(id)` bytes.
fn read_answers(
    conn: &mut std::net::TcpStream,
    first: u64,
    count: u64,
    size: impl Fn(u64) -> usize,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut next = first;
    while next < first + count {
        let n = conn.read(&mut chunk).unwrap_or_else(|e| {
            panic!(
                "answer {next} (of {first}..{}) never came: {e}",
                first + count
            )
        });
        assert!(n > 0, "connection closed before answer {next}");
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        while let Some((frame, used)) = codec::decode(&buf[off..], 64 << 20).expect("decode") {
            off += used;
            let Frame::Response(ClientResponse {
                id,
                result: ClientResult::Ok(body),
            }) = frame
            else {
                panic!("unexpected frame {frame:?}");
            };
            assert_eq!(id, next, "out of order");
            assert_eq!(body.len(), size(id), "answer {id}'s size");
            assert!(body.iter().all(|&b| b == id as u8), "answer {id} mangled");
            next += 1;
        }
        buf.drain(..off);
    }
}

/// Waits until `taken` stops growing (unchanged for half a second) or
/// reaches `all`; returns it.
fn settled(taken: &std::sync::atomic::AtomicU64, all: u64) -> u64 {
    let mut last = u64::MAX;
    let mut since = std::time::Instant::now();
    loop {
        let now = taken.load(std::sync::atomic::Ordering::Relaxed);
        if now == all {
            return now;
        }
        if now != last {
            last = now;
            since = std::time::Instant::now();
        } else if since.elapsed() > Duration::from_millis(500) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that pipelines requests and does not read the answers is no
/// longer read once a few MiB of its answers are held for it: the node's
/// memory for it stays bounded (before, every request was read and its
/// answer buffered: 200 MiB here). Once it reads, every answer arrives, in
/// order, and the rest of its requests are served.
#[test]
fn a_client_that_does_not_read_its_answers_is_not_read_until_it_does() {
    const ANSWER: usize = 4 << 10;
    const COUNT: u64 = 50_000;
    let rt = runtime();
    let addr = free_addr();
    let taken = serve_answering(&rt, &addr, |_| ANSWER);
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The requests go from another thread: once the node stops reading,
    // the write blocks until the answers are read.
    let mut w = conn.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&requests(0, COUNT)).expect("write"));
    let held = settled(&taken, COUNT);
    eprintln!("{held} of {COUNT} requests taken while the client read nothing");
    // The cap, the answers to one read's requests (at most 128 KiB of
    // them), the socket buffers at both ends: far below all of them.
    assert!(
        held * (ANSWER as u64) < 64 << 20,
        "{held} of {COUNT} requests taken ({} MiB of answers) from a client reading none",
        (held * ANSWER as u64) >> 20
    );
    read_answers(&mut conn, 0, COUNT, |_| ANSWER);
    writer.join().expect("writer");
    assert_eq!(taken.load(std::sync::atomic::Ordering::Relaxed), COUNT);
}

/// An answer larger than the cap on held answers is sent whole, and the
/// requests that arrive while it waits for the client are served once it
/// has been read.
#[test]
fn an_answer_larger_than_the_cap_goes_out_and_later_requests_are_served() {
    const BIG: usize = 24 << 20;
    const SMALL: usize = 100;
    let size = |id: u64| if id == 0 { BIG } else { SMALL };
    let rt = runtime();
    let addr = free_addr();
    let taken = serve_answering(&rt, &addr, size);
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    conn.write_all(&requests(0, 1)).expect("write");
    // Let the big answer back up, then pipeline more without reading.
    assert_eq!(settled(&taken, 1), 1);
    std::thread::sleep(Duration::from_millis(200));
    conn.write_all(&requests(1, 1000)).expect("write");
    read_answers(&mut conn, 0, 1001, size);
    assert_eq!(taken.load(std::sync::atomic::Ordering::Relaxed), 1001);
}

/// A client that pipelines many requests from one thread and reads the
/// answers on another, answered from a thread that defers its writes (as
/// the service thread does), gets every answer in order.
#[test]
fn a_pipelining_client_that_reads_its_answers_gets_them_all() {
    const COUNT: u64 = 200_000;
    const ANSWER: usize = 200;
    let rt = runtime();
    let addr = free_addr();
    let (tx, rx) = mpsc::channel::<(Vec<ClientRequest>, ResponseSink)>();
    let tx = Mutex::new(tx);
    let handler: tcp::RequestHandler = Arc::new(move |reqs, sink: &ResponseSink| {
        let _ = tx.lock().expect("lock").send((reqs, sink.clone()));
    });
    rt.block_on(start_clients(
        &addr,
        1,
        16 << 20,
        handler,
        Arc::new(NetStats::default()),
    ))
    .expect("listen");
    let responder = std::thread::spawn(move || {
        tcp::defer_flushes();
        for (reqs, sink) in rx {
            for r in reqs {
                sink.send(ClientResponse {
                    id: r.id,
                    result: ClientResult::Ok(Bytes::from(vec![r.id as u8; ANSWER])),
                });
            }
            drop(sink);
            tcp::flush_deferred();
        }
    });
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = conn.try_clone().expect("clone");
    let started = std::time::Instant::now();
    let writer = std::thread::spawn(move || {
        for first in (0..COUNT).step_by(1000) {
            w.write_all(&requests(first, 1000)).expect("write");
        }
    });
    read_answers(&mut conn, 0, COUNT, |_| ANSWER);
    writer.join().expect("writer");
    eprintln!(
        "{COUNT} pipelined requests answered in {:?}",
        started.elapsed()
    );
    drop(conn);
    drop(rt);
    responder.join().expect("responder");
}
