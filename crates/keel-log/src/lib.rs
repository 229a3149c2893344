//! keel-log: Keel's durable storage. Segment files of checksummed frames
//! whose offsets are the consensus core's byte positions (`store`), the
//! frame format (`frame`), hard state and snapshot files written atomically
//! (`meta`), and the storage thread that batches writes into one sync per
//! batch (group commit) and reports the durable position (`thread`).

pub mod frame;
pub mod meta;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod thread;

pub use meta::HardStateFile;
pub use store::{LogStore, Opened, Options, TornTail};
pub use thread::{Durability, SnapshotHandle, StorageEvent, StorageThread};

use std::path::{Path, PathBuf};

/// Storage errors. Damage names the file and offset and says how to recover.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{} is damaged at offset {offset}: {reason}. Refusing to start. To recover, rebuild this \
         node from the cluster: stop it, move its data directory aside, and start it empty; it \
         receives a snapshot and the log from the leader",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "{} was written by a newer version of Keel (data format {found}; this binary reads \
         formats up to {supported}). Refusing to start: run the newer version (downgrades are \
         not supported, the log's entries may mean more to it)",
        path.display()
    )]
    NewerFormat {
        path: PathBuf,
        found: u8,
        supported: u8,
    },
    #[error(
        "refusing to write the entry at log position {position}: its body is {body_len} bytes, \
         over the log's {max}-byte frame limit, so it could never be read back (nothing was \
         written). Whatever proposed it must refuse requests this large",
        max = frame::MAX_BODY_LEN
    )]
    EntryTooLarge {
        position: keel_core::Position,
        body_len: usize,
    },
    #[error("invalid storage request: {0}")]
    Invalid(String),
    #[error("the storage thread has stopped")]
    Stopped,
}

impl LogError {
    pub fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
    pub fn corrupt(path: &Path, offset: u64, reason: String) -> Self {
        LogError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        }
    }
}
