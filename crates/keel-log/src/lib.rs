//! keel-log: Keel's durable storage. Segment files of checksummed frames
//! whose offsets are the consensus core's byte positions (`store`), the
//! frame format (`frame`), hard state and snapshot files written atomically
//! (`meta`), and the storage thread that batches writes into one sync per
//! batch (group commit) and reports the durable position (`thread`).

pub mod frame;
pub mod lock;
pub mod meta;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod thread;

pub use lock::DirLock;
pub use meta::{HardStateFile, Identity};
pub use store::{LogStore, Opened, Options, TornTail};
pub use thread::{Durability, SnapshotHandle, StorageEvent, StorageThread};

use std::path::{Path, PathBuf};

/// Storage errors. Damage names the file and offset and says how to recover.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The OS error is part of the message, and not the error's `source()`:
    /// storage errors are shown with `{}` in many places (a storage failure
    /// reaches the consensus thread as text), and a printer of the whole
    /// chain (anyhow's `{:#}`) would otherwise show it twice.
    #[error("{}: {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    /// The data directory's path is something other than a directory (a
    /// path under a file fails to be created, "Not a directory").
    #[error(
        "data directory {} exists and is not a directory: set data_dir to a directory, or to a \
         path that does not exist yet (it is created)",
        dir.display()
    )]
    NotADirectory { dir: PathBuf },
    #[error(
        "data directory {} is in use by another process{}: it holds the lock on {}. Refusing \
         to start: two processes writing one data directory lose acknowledged writes. Stop the \
         other process (a `keel server` still running, e.g. one a killed `keel dev` left behind) \
         or give this one a data directory of its own",
        dir.display(),
        holder.map_or_else(String::new, |pid| format!(" (pid {pid})")),
        dir.join(lock::LOCK_FILE).display()
    )]
    Locked {
        dir: PathBuf,
        /// The holder's process id, as it wrote it into the lock file.
        holder: Option<u32>,
    },
    #[error(
        "data directory {} holds the data of {recorded}, but this node is configured as \
         {configured}. Refusing to start: the votes and the log in it are that node's, and a \
         node that takes another's could vote twice in a term and break the cluster's safety. \
         Check id, cluster_id and data_dir in the configuration (--id, --cluster-id, \
         --data-dir); to start {configured} anew, give it an empty data directory of its own",
        dir.display()
    )]
    WrongIdentity {
        dir: PathBuf,
        /// What the directory records (`meta::IDENTITY_FILE`).
        recorded: Identity,
        /// What the node was started as.
        configured: Identity,
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
    /// A backup file (`keel restore`'s input) that is not one: unlike
    /// `Corrupt`, nothing in a data directory is wrong.
    #[error(
        "{} is not a Keel backup, or is damaged or cut short (at offset {offset}: {reason}). \
         Nothing was restored: use a complete copy of a backup (`etcdctl snapshot save` against \
         a Keel member), or take a new one",
        path.display()
    )]
    BadBackup {
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
    pub fn io(path: &Path, action: &'static str, error: std::io::Error) -> Self {
        LogError::Io {
            path: path.to_path_buf(),
            action,
            error,
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
