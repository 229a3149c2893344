//! The in-memory peer transport: the same `PeerSender` interface as the TCP
//! transport, for clusters of several nodes in one process (tests,
//! embedding). A node's messages go to the destination nodes' inbound
//! queues at its `flush`, as the TCP transport writes a turn's messages
//! (so a node's status, published before the flush, is never behind what
//! its messages say); links can be cut to simulate partitions, made to
//! lose a share of their messages, or made slow (each message held a
//! while, in order).

use crate::tcp::Inbound;
use crate::PeerSender;
use keel_core::{Message, NodeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Inner {
    nodes: HashMap<NodeId, Inbound>,
    cut: HashSet<(NodeId, NodeId)>,
    /// Links that lose messages: the chance of losing each one, in
    /// millionths (see `lossy`).
    lossy: HashMap<(NodeId, NodeId), u64>,
    /// Draws for `lossy` links.
    rng: Option<keel_core::rng::Rng>,
    /// Messages a cut (or a lossy link) dropped, by sender, receiver and kind.
    dropped: HashMap<(NodeId, NodeId, &'static str), u64>,
    /// Slow links: how long each holds a message (see `delay`).
    delay: HashMap<(NodeId, NodeId), Duration>,
    /// When each link's last held message is due, while it holds any: a
    /// later message on the link is never delivered before it (a link
    /// keeps its order, as a TCP connection does, also once it is fast
    /// again).
    due: HashMap<(NodeId, NodeId), Instant>,
    /// Held messages by when they are due (and in the order sent).
    held: BTreeMap<(Instant, u64), Message>,
    held_count: u64,
    /// Whether the thread that delivers held messages runs.
    courier: bool,
}

/// A network shared by the nodes of one process.
#[derive(Clone, Default)]
pub struct MemNetwork {
    inner: Arc<Mutex<Inner>>,
    /// Wakes the courier thread when a message is held.
    held: Arc<Condvar>,
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches node `id`, whose inbound messages go to `inbound`.
    pub fn join(&self, id: NodeId, inbound: Inbound) -> MemPeers {
        if let Ok(mut g) = self.inner.lock() {
            // A node that joins again (restarted) gets nothing sent to its
            // former self: with TCP that connection would be gone.
            g.held.retain(|_, m| m.to != id);
            g.due.retain(|&(_, to), _| to != id);
            g.nodes.insert(id, inbound);
        }
        MemPeers {
            net: self.clone(),
            queued: Mutex::new(Vec::new()),
        }
    }

    /// Drops every message between `id` and any other node, both ways.
    pub fn isolate(&self, id: NodeId) {
        if let Ok(mut g) = self.inner.lock() {
            let others: Vec<NodeId> = g.nodes.keys().copied().filter(|&n| n != id).collect();
            for n in others {
                g.cut.insert((id, n));
                g.cut.insert((n, id));
            }
        }
    }

    /// Drops every message from `from` to `to` (one way only).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        if let Ok(mut g) = self.inner.lock() {
            g.cut.insert((from, to));
        }
    }

    /// Makes the link from `from` to `to` (one way only) lose each message
    /// with probability `chance` (0 to 1; 0 makes it whole again), drawn
    /// from a generator seeded with `seed` on the first call. A cut
    /// overrides it.
    pub fn lossy(&self, from: NodeId, to: NodeId, chance: f64, seed: u64) {
        if let Ok(mut g) = self.inner.lock() {
            let millionths = (chance.clamp(0.0, 1.0) * 1e6) as u64;
            if millionths == 0 {
                g.lossy.remove(&(from, to));
            } else {
                g.lossy.insert((from, to), millionths);
            }
            g.rng.get_or_insert_with(|| keel_core::rng::Rng::new(seed));
        }
    }

    /// Makes the link from `from` to `to` (one way only) hold each message
    /// for `by` before delivering it, keeping their order (`Duration::ZERO`
    /// makes it fast again; what it holds is still delivered, in order). A
    /// link cut by the time a held message is due drops it.
    pub fn delay(&self, from: NodeId, to: NodeId, by: Duration) {
        if let Ok(mut g) = self.inner.lock() {
            if by.is_zero() {
                g.delay.remove(&(from, to));
            } else {
                g.delay.insert((from, to), by);
            }
        }
    }

    /// Restores every link (cut, lossy or slow; messages already held by
    /// a slow link are still delivered, in order).
    pub fn heal(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.cut.clear();
            g.lossy.clear();
            g.delay.clear();
        }
    }

    /// How many `kind` messages (`Body::name`) from `from` to `to` a cut
    /// (or a lossy link) dropped so far.
    pub fn dropped(&self, from: NodeId, to: NodeId, kind: &str) -> u64 {
        self.inner.lock().map_or(0, |g| {
            g.dropped
                .iter()
                .filter(|((f, t, k), _)| *f == from && *t == to && *k == kind)
                .map(|(_, n)| n)
                .sum()
        })
    }

    fn deliver(&self, m: Message) {
        let target = self.inner.lock().ok().and_then(|mut g| {
            let lost = match g.lossy.get(&(m.from, m.to)).copied() {
                Some(millionths) => g
                    .rng
                    .as_mut()
                    .is_some_and(|rng| rng.below(1_000_000) < millionths),
                None => false,
            };
            if lost || g.cut.contains(&(m.from, m.to)) {
                *g.dropped.entry((m.from, m.to, m.body.name())).or_default() += 1;
                return None;
            }
            let link = (m.from, m.to);
            let now = Instant::now();
            let behind = g.due.get(&link).copied();
            let delay = g.delay.get(&link).copied();
            if delay.is_none() && behind.is_none() {
                return g.nodes.get(&m.to).cloned().map(|inbound| (inbound, m));
            }
            let at = (now + delay.unwrap_or_default()).max(behind.unwrap_or(now));
            g.due.insert(link, at);
            g.held_count += 1;
            let n = g.held_count;
            g.held.insert((at, n), m);
            if !std::mem::replace(&mut g.courier, true) {
                let (inner, wake) = (Arc::downgrade(&self.inner), self.held.clone());
                std::thread::Builder::new()
                    .name("mem-courier".into())
                    .spawn(move || courier(inner, wake))
                    .ok()?;
            }
            self.held.notify_one();
            None
        });
        if let Some((inbound, m)) = target {
            inbound(m);
        }
    }
}

/// Delivers the messages slow links hold once each is due, until the
/// network is gone.
fn courier(inner: Weak<Mutex<Inner>>, wake: Arc<Condvar>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut ready = Vec::new();
        // Each taken message's link and due time: the link counts as
        // holding it until it is delivered (`due`), so that a message sent
        // meanwhile waits behind it rather than overtaking it.
        let mut taken = Vec::new();
        {
            let Ok(mut g) = inner.lock() else {
                return;
            };
            let now = Instant::now();
            while let Some(entry) = g.held.first_entry() {
                let at = entry.key().0;
                if at > now {
                    break;
                }
                let m = entry.remove();
                taken.push(((m.from, m.to), at));
                if g.cut.contains(&(m.from, m.to)) {
                    *g.dropped.entry((m.from, m.to, m.body.name())).or_default() += 1;
                } else if let Some(inbound) = g.nodes.get(&m.to).cloned() {
                    ready.push((inbound, m));
                }
            }
            if taken.is_empty() {
                // Until the next is due; at most 50 ms, to notice the
                // network is gone.
                let next = g.held.keys().next().map(|k| k.0);
                let wait = next.map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(now)
                        .min(Duration::from_millis(50))
                });
                let _ = wake.wait_timeout(g, wait);
                continue;
            }
        }
        for (inbound, m) in ready {
            inbound(m);
        }
        let Ok(mut g) = inner.lock() else {
            return;
        };
        for (link, at) in taken {
            if g.due.get(&link) == Some(&at) {
                // Its link's last: the link holds nothing now.
                g.due.remove(&link);
            }
        }
    }
}

/// One node's outbound side of a `MemNetwork`.
pub struct MemPeers {
    net: MemNetwork,
    /// Messages sent since the last `flush`, in order.
    queued: Mutex<Vec<Message>>,
}

impl PeerSender for MemPeers {
    fn send(&self, m: Message) {
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(m);
    }

    fn flush(&self) {
        let queued = std::mem::take(
            &mut *self
                .queued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for m in queued {
            self.net.deliver(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::Body;

    fn msg(from: NodeId, to: NodeId, term: u64) -> Message {
        Message {
            cluster_id: 1,
            from,
            to,
            term,
            body: Body::PreVoteResp {
                granted: true,
                amnesic: false,
                committed: (0, 0),
            },
        }
    }

    /// What arrived at node 2: (term, when).
    type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

    /// A network of nodes 1 and 2 whose arrivals at node 2 are recorded.
    fn two() -> (MemNetwork, MemPeers, Arrivals) {
        let net = MemNetwork::new();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let from1 = net.join(1, Arc::new(|_| {}));
        net.join(
            2,
            Arc::new(move |m: Message| g.lock().unwrap().push((m.term, Instant::now()))),
        );
        (net, from1, got)
    }

    fn wait_for(got: &Mutex<Vec<(u64, Instant)>>, n: usize) -> Vec<(u64, Instant)> {
        let until = Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().len() < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        got.lock().unwrap().clone()
    }

    #[test]
    fn a_slow_link_delivers_late_and_in_order_even_once_fast_again() {
        let (net, peers, got) = two();
        net.delay(1, 2, Duration::from_millis(40));
        let sent = Instant::now();
        peers.send(msg(1, 2, 1));
        peers.send(msg(1, 2, 2));
        peers.flush();
        assert!(
            got.lock().unwrap().is_empty(),
            "a slow link delivered at once"
        );
        // Fast again: the next message still comes after those held.
        net.delay(1, 2, Duration::ZERO);
        peers.send(msg(1, 2, 3));
        peers.flush();
        let arrived = wait_for(&got, 3);
        let terms: Vec<u64> = arrived.iter().map(|(t, _)| *t).collect();
        assert_eq!(terms, vec![1, 2, 3]);
        assert!(arrived[0].1 >= sent + Duration::from_millis(40));
        // Nothing held any more: delivered at once, at the flush.
        peers.send(msg(1, 2, 4));
        assert_eq!(got.lock().unwrap().len(), 3);
        peers.flush();
        assert_eq!(got.lock().unwrap().len(), 4);
    }

    /// A message sent while the courier is handing over the link's last
    /// held one waits for it.
    #[test]
    fn a_message_sent_while_a_held_one_is_being_delivered_comes_after_it() {
        let net = MemNetwork::new();
        let got = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (got.clone(), started.clone());
        let peers = net.join(1, Arc::new(|_| {}));
        net.join(
            2,
            Arc::new(move |m: Message| {
                if m.term == 1 {
                    s.store(true, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                }
                g.lock().unwrap().push((m.term, Instant::now()));
            }),
        );
        net.delay(1, 2, Duration::from_millis(5));
        peers.send(msg(1, 2, 1));
        peers.flush();
        net.delay(1, 2, Duration::ZERO);
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        peers.send(msg(1, 2, 2));
        peers.flush();
        let terms: Vec<u64> = wait_for(&got, 2).iter().map(|(t, _)| *t).collect();
        assert_eq!(terms, vec![1, 2]);
    }

    #[test]
    fn a_held_message_is_dropped_if_its_link_is_cut_before_it_is_due() {
        let (net, peers, got) = two();
        net.delay(1, 2, Duration::from_millis(20));
        peers.send(msg(1, 2, 1));
        peers.flush();
        net.cut(1, 2);
        std::thread::sleep(Duration::from_millis(80));
        assert!(got.lock().unwrap().is_empty());
        assert_eq!(net.dropped(1, 2, "PreVoteResp"), 1);
        net.heal();
        peers.send(msg(1, 2, 2));
        peers.flush();
        assert_eq!(wait_for(&got, 1).len(), 1);
    }
}
