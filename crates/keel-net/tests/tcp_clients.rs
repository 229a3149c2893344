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
