//! The client decoding what a server sends back: a fake node answers each
//! request with random bytes, a valid response mutated at one byte, cut
//! short, with a length prefix claiming gigabytes, with trailing garbage,
//! or after an answer to another request. The client must never panic or
//! hang past its timeout, and must return a value only if the bytes it got
//! hold a response to its request that says so: a damaged answer is an
//! error, never a silently different value. (Seeded with keel-core's RNG:
//! keel-client has no property-testing dependency.)

use bytes::Bytes;
use keel_client::{Client, ClientOptions};
use keel_core::rng::Rng;
use keel_net::codec::{
    self, ClientRequest, ClientResponse, ClientResult, Frame, NodeStatus, DEFAULT_MAX_FRAME,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a case damages the answer.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Random,
    Mutated,
    Cut,
    HugeLength,
    Trailing,
    OtherIdFirst,
}

const DAMAGES: [Damage; 6] = [
    Damage::Random,
    Damage::Mutated,
    Damage::Cut,
    Damage::HugeLength,
    Damage::Trailing,
    Damage::OtherIdFirst,
];

fn status(rng: &mut Rng) -> NodeStatus {
    NodeStatus {
        id: rng.range(1, 6),
        role: ["leader", "follower", "candidate"][rng.below(3) as usize].into(),
        term: rng.next_u64() >> rng.below(64),
        leader: rng.chance(0.5).then(|| rng.range(1, 6)),
        append: rng.below(1 << 20),
        durable: rng.below(1 << 20),
        commit: rng.below(1 << 20),
        applied: rng.below(1 << 20),
        voters: (1..=rng.below(4)).collect(),
        learners: (4..4 + rng.below(2)).collect(),
        ..NodeStatus::default()
    }
}

fn result(rng: &mut Rng, want_status: bool) -> ClientResult {
    if want_status {
        return ClientResult::Status(status(rng));
    }
    let data: Vec<u8> = (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect();
    match rng.below(4) {
        0 => ClientResult::Ok(Bytes::from(data)),
        1 => ClientResult::Error(String::from_utf8_lossy(&data).into_owned()),
        2 => ClientResult::Busy,
        _ => ClientResult::StaleOk {
            data: Bytes::from(data),
            applied: rng.next_u64(),
            commit: rng.next_u64(),
        },
    }
}

fn encoded(id: u64, result: ClientResult) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(&Frame::Response(ClientResponse { id, result }), &mut out);
    out
}

/// The bytes a damaged answer to request `id` takes.
fn answer(rng: &mut Rng, damage: Damage, id: u64, want_status: bool) -> Vec<u8> {
    let good = encoded(id, result(rng, want_status));
    match damage {
        Damage::Random => (0..rng.below(200)).map(|_| rng.next_u64() as u8).collect(),
        Damage::Mutated => {
            let mut b = good;
            let at = rng.below(b.len() as u64) as usize;
            b[at] = rng.next_u64() as u8;
            b
        }
        Damage::Cut => good[..rng.below(good.len() as u64) as usize].to_vec(),
        Damage::HugeLength => {
            let mut b = good;
            let claim = [u32::MAX, 1 << 31, (64 << 20) + 1][rng.below(3) as usize];
            b[..4].copy_from_slice(&claim.to_le_bytes());
            b
        }
        Damage::Trailing => {
            let mut b = good;
            b.extend((0..rng.range(1, 30)).map(|_| rng.next_u64() as u8));
            b
        }
        Damage::OtherIdFirst => {
            let mut b = encoded(id.wrapping_add(1 + rng.below(5)), result(rng, want_status));
            let mut second = good;
            let at = rng.below(second.len() as u64) as usize;
            second[at] ^= 1 << rng.below(8);
            b.extend(second);
            b
        }
    }
}

/// What a correct client takes from `bytes` as the answer to `id`: the
/// first response to `id`, skipping responses to other requests, as long
/// as the frames before it decode.
fn truth(bytes: &[u8], id: u64) -> Option<ClientResult> {
    let mut rest = bytes;
    loop {
        match codec::decode(rest, DEFAULT_MAX_FRAME) {
            Ok(Some((Frame::Response(r), n))) => {
                if r.id == id {
                    return Some(r.result);
                }
                rest = &rest[n..];
            }
            _ => return None,
        }
    }
}

/// Reads one request frame; `None` if the connection closed or sent
/// something else.
async fn request(s: &mut TcpStream) -> Option<ClientRequest> {
    let mut buf = Vec::new();
    loop {
        match codec::decode(&buf, DEFAULT_MAX_FRAME) {
            Ok(Some((Frame::Request(r), _))) => return Some(r),
            Ok(None) => {}
            _ => return None,
        }
        if s.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// A fake node answering every request on every connection with a
/// damaged answer, then closing the connection. Records what a correct
/// client could take from each answer.
async fn fake_node(
    seed: u64,
    damage: Damage,
    want_status: bool,
) -> (String, Arc<Mutex<Vec<ClientResult>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        while let Ok((mut s, _)) = l.accept().await {
            let Some(req) = request(&mut s).await else {
                continue;
            };
            let bytes = answer(&mut rng, damage, req.id, want_status);
            if let Some(r) = truth(&bytes, req.id) {
                log.lock().expect("lock").push(r);
            }
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        }
    });
    (addr, sent)
}

const TIMEOUT: Duration = Duration::from_millis(400);

/// A status query (one attempt, no retries) against every kind of damage:
/// a status comes back only if the bytes held that status for this
/// request; otherwise an error that says something, within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_status_answers_are_errors_never_wrong_values() {
    let (mut ok, mut refused) = (0, 0);
    for seed in 0..300u64 {
        let damage = DAMAGES[(seed % DAMAGES.len() as u64) as usize];
        let (addr, sent) = fake_node(seed, damage, true).await;
        let started = Instant::now();
        let got = Client::status_of(&addr, TIMEOUT).await;
        assert!(
            started.elapsed() < TIMEOUT + Duration::from_secs(2),
            "seed {seed} {damage:?}: took {:?}",
            started.elapsed()
        );
        let sent = sent.lock().expect("lock").clone();
        match got {
            Ok(s) => {
                ok += 1;
                assert!(
                    sent.contains(&ClientResult::Status(s.clone())),
                    "seed {seed} {damage:?}: took {s:?}, which no answer held (sent {sent:?})"
                );
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    // Both outcomes happen: the cases exercise the decoder, not just
    // the connection.
    assert!(ok > 10 && refused > 100, "ok {ok}, refused {refused}");
}

/// Writes through the retrying call path: an `Ok` value is one a
/// decodable answer to one of its attempts held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_write_answers_are_errors_never_wrong_values() {
    let mut ok = 0;
    for seed in 0..24u64 {
        let damage = DAMAGES[(seed % DAMAGES.len() as u64) as usize];
        let (addr, sent) = fake_node(1000 + seed, damage, false).await;
        let mut c = Client::new(ClientOptions {
            endpoints: vec![addr],
            attempt_timeout: Duration::from_millis(150),
            call_timeout: Duration::from_millis(300),
            client_id: Some(7),
            tls: None,
        })
        .expect("client");
        let started = Instant::now();
        let got = c.write(Bytes::from_static(b"w")).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "seed {seed} {damage:?}: took {:?}",
            started.elapsed()
        );
        if let Ok(data) = got {
            ok += 1;
            let sent = sent.lock().expect("lock").clone();
            assert!(
                sent.iter()
                    .any(|r| matches!(r, ClientResult::Ok(d) if *d == data)),
                "seed {seed} {damage:?}: took {data:?}, which no answer held (sent {sent:?})"
            );
        }
    }
    assert!(ok > 0, "no write was ever answered: the cases test nothing");
}
