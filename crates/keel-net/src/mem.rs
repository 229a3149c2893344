//! The in-memory peer transport: the same `PeerSender` interface as the TCP
//! transport, for clusters of several nodes in one process (tests,
//! embedding). Messages go straight to the destination node's inbound
//! queue; links can be cut to simulate partitions.

use crate::tcp::Inbound;
use crate::PeerSender;
use keel_core::{Message, NodeId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    nodes: HashMap<NodeId, Inbound>,
    cut: HashSet<(NodeId, NodeId)>,
    /// Messages a cut dropped, by sender, receiver and kind.
    dropped: HashMap<(NodeId, NodeId, &'static str), u64>,
}

/// A network shared by the nodes of one process.
#[derive(Clone, Default)]
pub struct MemNetwork {
    inner: Arc<Mutex<Inner>>,
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches node `id`, whose inbound messages go to `inbound`.
    pub fn join(&self, id: NodeId, inbound: Inbound) -> MemPeers {
        if let Ok(mut g) = self.inner.lock() {
            g.nodes.insert(id, inbound);
        }
        MemPeers { net: self.clone() }
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

    /// Restores every link.
    pub fn heal(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.cut.clear();
        }
    }

    /// How many `kind` messages (`Body::name`) from `from` to `to` a cut
    /// dropped so far.
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
            if g.cut.contains(&(m.from, m.to)) {
                *g.dropped.entry((m.from, m.to, m.body.name())).or_default() += 1;
                None
            } else {
                g.nodes.get(&m.to).cloned()
            }
        });
        if let Some(inbound) = target {
            inbound(m);
        }
    }
}

/// One node's outbound side of a `MemNetwork`.
pub struct MemPeers {
    net: MemNetwork,
}

impl PeerSender for MemPeers {
    fn send(&self, m: Message) {
        self.net.deliver(m);
    }
}
