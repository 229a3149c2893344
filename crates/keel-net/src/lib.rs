//! keel-net: the wire codec for peer and client frames (`codec`), the TCP
//! transport (`tcp`: one connection per peer pair with a cluster-id
//! handshake, batched writes with TCP_NODELAY, reconnect with backoff, and
//! client connections), and an in-memory transport with the same interface
//! (`mem`). Decoding never panics; a bad frame closes that connection with a
//! logged reason.

pub mod codec;
pub mod mem;
pub mod tcp;

/// Where a node sends its peer messages: fire and forget (a message that
/// cannot be delivered is dropped; Raft retransmits).
pub trait PeerSender: Send {
    fn send(&self, m: keel_core::Message);
    /// Puts what `send` buffered on the wire (the consensus thread calls
    /// it once per turn, so a turn's messages to a peer go in one write).
    fn flush(&self) {}
}

impl PeerSender for tcp::Peers {
    fn send(&self, m: keel_core::Message) {
        tcp::Peers::send(self, m);
    }
    fn flush(&self) {
        tcp::Peers::flush(self);
    }
}
