//! keel-node: the runtime that wires the consensus core, the durable log,
//! the transport and a service into one running node; its configuration,
//! metrics and HTTP status endpoint.

mod amnesia;
pub mod config;
mod handoff;
pub mod http;
pub mod metrics;
mod reader;
pub mod runtime;
pub mod sched;

pub use config::{NodeConfig, PeerConfig};
pub use runtime::{restore_backup, start, Backup, NodeError, NodeHandle, Notification, BACKUP_DIR};
