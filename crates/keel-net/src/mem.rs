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

    fn deliver(&self, m: Message) {
        let target = self.inner.lock().ok().and_then(|g| {
            if g.cut.contains(&(m.from, m.to)) {
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
