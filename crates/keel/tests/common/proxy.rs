//! A fault-injecting TCP proxy for the link between two real nodes: it
//! forwards a peer connection both ways and, on command, cuts it (closes
//! what is open and refuses new connections: a partition of that link),
//! stalls one direction (the connection stays up and nothing gets through
//! that way until the heal, as when a link drops one direction's packets
//! and TCP keeps retransmitting: a half-failed link), or delays every byte
//! by a fixed time (a slow link). Plain threads, so it runs whatever the
//! test's runtime does.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Which way the bytes go: from the dialing node to the listening one, or
/// back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Way {
    /// From the node that dials (the lower id) to the one it dials.
    Forward,
    Back,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    /// Stalled ways (`Way as usize`).
    stalled: [AtomicBool; 2],
    delay_us: AtomicU64,
    stop: AtomicBool,
    /// Both sockets of every open connection, to close them on a cut.
    open: Mutex<Vec<TcpStream>>,
}

pub struct LinkProxy {
    /// Where the dialing node connects (instead of the other's address).
    pub addr: String,
    state: Arc<State>,
}

impl LinkProxy {
    /// A proxy on a fresh loopback port to `target`.
    pub fn start(target: &str) -> LinkProxy {
        let addr = format!("127.0.0.1:{}", super::free_port());
        let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let state = Arc::new(State::default());
        let (st, target) = (state.clone(), target.to_string());
        std::thread::spawn(move || accept(listener, target, st));
        LinkProxy { addr, state }
    }

    /// Partitions the link: open connections are closed, new ones refused
    /// (accepted and closed at once), until `heal`.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        close_all(&self.state);
    }

    /// Holds every byte going `way` (the connection stays up) until
    /// `heal`, which lets them through in order.
    pub fn stall(&self, way: Way) {
        self.state.stalled[way as usize].store(true, Ordering::SeqCst);
    }

    /// Holds every byte for `d` before passing it on (both ways).
    pub fn delay(&self, d: Duration) {
        self.state
            .delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Back to a plain link.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        for w in &self.state.stalled {
            w.store(false, Ordering::SeqCst);
        }
        self.state.delay_us.store(0, Ordering::SeqCst);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        close_all(&self.state);
        // Wake the accepting thread so it sees `stop`.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn close_all(state: &State) {
    let mut open = state.open.lock().unwrap_or_else(|e| e.into_inner());
    for s in open.drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn accept(listener: TcpListener, target: String, state: Arc<State>) {
    for conn in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(down) = conn else { continue };
        if state.cut.load(Ordering::SeqCst) {
            continue; // dropped: closed at once
        }
        let Ok(up) = TcpStream::connect(&target) else {
            continue;
        };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let clones = (
            down.try_clone(),
            up.try_clone(),
            up.try_clone(),
            down.try_clone(),
        );
        let (Ok(d_read), Ok(u_write), Ok(u_read), Ok(d_write)) = clones else {
            continue;
        };
        state
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([down, up]);
        let st = state.clone();
        std::thread::spawn(move || pump(d_read, u_write, Way::Forward, st));
        let st = state.clone();
        std::thread::spawn(move || pump(u_read, d_write, Way::Back, st));
    }
}

/// Copies `from` to `to` until either closes: a reader thread stamps each
/// chunk with its arrival, this one passes it on once the delay is up
/// (so a delay adds to every byte, not to every read).
fn pump(mut from: TcpStream, mut to: TcpStream, way: Way, state: Arc<State>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
    });
    let over = || state.cut.load(Ordering::SeqCst) || state.stop.load(Ordering::SeqCst);
    'bytes: for (at, bytes) in rx {
        let due = at + Duration::from_micros(state.delay_us.load(Ordering::SeqCst));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        while state.stalled[way as usize].load(Ordering::SeqCst) {
            if over() {
                break 'bytes;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if over() || to.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
