//! keel-net: the wire codec for peer and client frames (`codec`), the TCP
//! transport (`tcp`: one connection per peer pair with a cluster-id
//! handshake, batched writes with TCP_NODELAY, reconnect with backoff, and
//! client connections; mutual TLS on the peer links with `tls`), and an
//! in-memory transport with the same interface (`mem`). Decoding never panics; a bad frame closes that connection with a
//! logged reason.

pub mod codec;
pub mod mem;
pub mod tcp;
pub mod tls;

/// Is `addr` host:port: a host without whitespace (a name, an IPv4
/// address, or an IPv6 one in brackets) and a port number, 0 only if
/// `port_zero` (a listener's "any free port")? Only the form is checked:
/// a name is resolved when it is used. Shared by the node's configuration
/// and the client's endpoints, so both take the same addresses.
pub fn is_host_port(addr: &str, port_zero: bool) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let bracketed = host.len() > 2 && host.starts_with('[') && host.ends_with(']');
    !host.is_empty()
        && (bracketed || !host.contains(':'))
        && !host.chars().any(char::is_whitespace)
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(port.parse::<u16>(), Ok(p) if p > 0 || port_zero)
}

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
