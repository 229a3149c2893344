//! keel-net: the wire codec for peer and client frames (`codec`) and the TCP
//! transport (`tcp`): one connection per peer pair with a cluster-id
//! handshake, batched writes with TCP_NODELAY, reconnect with backoff, and
//! client connections. Decoding never panics; a bad frame closes that
//! connection with a logged reason.

pub mod codec;
pub mod tcp;
