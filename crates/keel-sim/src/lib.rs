//! keel-sim: deterministic simulation of whole Keel clusters under faults,
//! with safety invariants checked after every step, a linearizability
//! checker for client histories, and liveness checks after faults heal.

pub mod history;
pub mod invariants;
pub mod kv;
pub mod linearizability;
pub mod sim;

pub use sim::{
    run, FaultMix, LeaseCuts, PreferredOutcome, Report, Scenario, SimConfig, WipeFollower,
    WipeOutcome, BUGS,
};
