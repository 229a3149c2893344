//! Test support shared by the crash-test binary (`keel-log-torture`) and
//! the crash and corruption tests: entries whose content is a function of
//! their position alone, so a reader can verify them without the writer.

use bytes::Bytes;
use keel_core::rng::Rng;
use keel_core::{Entry, EntryKind, Position, Term};

/// The data of the entry at `position`: a function of the position alone,
/// and no byte is ever zero (so damage never looks like an unwritten sector).
pub fn content(position: Position, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(position ^ 0x6B65_656C_2D6C_6F67);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend(rng.next_u64().to_le_bytes().map(|b| b.max(1)));
    }
    out.truncate(len);
    out
}

/// A command entry at `position` carrying `content(position, len)`.
pub fn make_entry(term: Term, position: Position, len: usize) -> Entry {
    Entry {
        term,
        position,
        timestamp: position,
        kind: EntryKind::Command {
            client: 1,
            seq: position,
        },
        data: Bytes::from(content(position, len)),
    }
}
