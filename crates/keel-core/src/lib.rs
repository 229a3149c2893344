//! keel-core: Keel's consensus. Raft (Ongaro's dissertation) with Aeron
//! Cluster's design choices — byte positions, leader-stamped time, timers
//! and a term-start entry in the log, pipelined and batched replication —
//! as a pure, single-threaded, deterministic state machine:
//! `Node::step(now, event, &mut actions)`. No IO, no threads, no clocks,
//! no global randomness. The service side (`service`) is equally pure.

pub mod log;
pub mod message;
pub mod node;
pub mod rng;
pub mod service;
pub mod types;

pub use message::{Body, Message};
pub use node::{
    accept_any_snapshot, Action, Config, Event, Node, Proposal, Recovered, RejectReason, Role,
    Stats, TestingBugs, TimerUpdate, HELD_COMMAND_OVERHEAD, LEARNER_NOT_READY,
    REMOVED_FROM_CLUSTER, REMOVED_NOTICE_TIMEOUTS, TERM_START_MARK,
};
pub use service::{
    snapshot_sessions, Admission, ApplyOutput, Context, MagicText, Reply, Service, ServiceHost,
    SessionOutcome, SnapshotTask, SESSIONLESS,
};
pub use types::*;
