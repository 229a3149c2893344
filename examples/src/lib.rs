//! keel-examples: example services on Keel, each a deterministic
//! `keel_core::Service` with a documented binary encoding whose decoders
//! never panic: `echo` (replies with the command; the latency benchmark's
//! service), `lock` (named locks with leases expiring through log timers,
//! fencing tokens), `matching` (a price-time priority order book).

pub mod codec;
pub mod echo;
pub mod lock;
pub mod matching;

#[cfg(test)]
mod testing;

pub use codec::DecodeError;
pub use echo::{EchoService, EchoStats};
pub use lock::{LockCommand, LockInfo, LockQuery, LockReply, LockService};
pub use matching::{Fill, Level, MatchCommand, MatchQuery, MatchReply, MatchingEngine, Side};
