//! Deterministic simulation of a whole cluster in one thread: nodes running
//! `keel-core`, a simulated network (per-link latency, loss, duplication,
//! reordering, partitions, cut links), simulated disks (unsynced writes lost
//! on crash, slow disks), skewed and jumping clocks, membership changes, and
//! KV clients with retries. Everything is driven by one seed: the same seed
//! replays the same run exactly. Safety invariants are checked after every
//! step; linearizability and liveness at the end of the run.

use crate::invariants::Invariants;
use crate::kv::{self, KvService};
use crate::linearizability::{self, CheckResult, KvInput, Operation};
use bytes::Bytes;
use keel_core::rng::Rng;
use keel_core::{
    Action, Body, Config, Entry, EntryKind, Event, HardState, Membership, MembershipChange,
    Message, Nanos, Node, NodeId, Position, Proposal, Recovered, RejectReason, Reply, Role,
    ServiceHost, Snapshot, SnapshotMeta, Term, TestingBugs, TimerUpdate,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::Path;

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000_000_000;

/// One of `TestingBugs`' switches.
pub type BugFlag = fn(&mut TestingBugs) -> &mut bool;

/// The core's deliberate bugs (`TestingBugs`) by their `--bug` names.
pub const BUGS: [(&str, BugFlag); 16] = [
    ("commit-without-quorum", |b| &mut b.commit_without_quorum),
    ("vote-without-log-check", |b| &mut b.vote_without_log_check),
    ("lease-outlasts-stickiness", |b| {
        &mut b.lease_outlasts_stickiness
    }),
    ("lease-ignores-drift", |b| &mut b.lease_ignores_drift),
    ("lease-assumes-own-timeout", |b| {
        &mut b.lease_assumes_own_timeout
    }),
    ("no-restart-hold", |b| &mut b.no_restart_hold),
    ("lease-ignores-transfer", |b| &mut b.lease_ignores_transfer),
    ("stale-timeout-now", |b| &mut b.stale_timeout_now),
    ("restart-hold-ignores-old-timeout", |b| {
        &mut b.restart_hold_ignores_old_timeout
    }),
    ("removal-before-commit", |b| &mut b.removal_before_commit),
    ("apply-from-applied", |b| &mut b.apply_from_applied),
    ("read-quorum-off-by-one", |b| &mut b.read_quorum_off_by_one),
    ("read-without-new-round", |b| &mut b.read_without_new_round),
    ("read-index-at-applied", |b| &mut b.read_index_at_applied),
    ("install-snapshot-below-commit", |b| {
        &mut b.install_snapshot_below_commit
    }),
    ("amnesia-ignored", |b| &mut b.amnesia_ignored),
];

/// Which faults a run injects.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultMix {
    pub name: &'static str,
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub partitions: bool,
    pub asymmetric: bool,
    pub cut_link: bool,
    pub crashes: bool,
    pub slow_disk: bool,
    pub clock_jumps: bool,
    pub membership: bool,
    /// The leader is asked to hand leadership to another voter (caught up
    /// or not, reachable or not). After 30% of its `TimeoutNow` messages it
    /// hears from no node for 100-400 ms (so it learns of the election
    /// late), and half of them also arrive a second time 0.2-1.5 s later
    /// (a stalled connection's data read after the transfer was given up),
    /// half of those as it starts hearing nothing again. For 30% of the
    /// transfers every `TimeoutNow` arrives only that late.
    pub transfers: bool,
    /// The leader of the moment is cut off from every other node, or from
    /// all but a minority, just after its check-quorum passed, while a
    /// client that reads in a loop from it (a client given only that
    /// node's address) goes on reading there: a deposed leader that has not
    /// noticed yet gets reads after the majority elected another and
    /// committed (`Sim::isolate_leader`).
    pub isolate_leader: bool,
    /// Most (80%) of the snapshot transfers a leader starts while faults
    /// are active are also delivered a second time: every message on that
    /// link for the next 50-300 ms arrives again, in order, 100-800 ms
    /// later (a duplicating, reordering network), after the follower has
    /// installed the snapshot and moved on.
    pub late_copies: bool,
    /// Now and then a node's process is paused (a long garbage-collection
    /// or allocation stall, SIGSTOP, a VM migrated or starved of CPU) for
    /// half a minimum election timeout to six of them, the leader half the
    /// time: it handles nothing meanwhile (messages, client requests, disk
    /// syncs and the service's reports wait for it, as a socket buffers
    /// them), while its clock and everyone else go on. Then it resumes
    /// with stale state and timers that are long due, which fire before
    /// or after it reads the backlog (half the time each): a leader
    /// deposed meanwhile replicates, answers reads and checks its quorum
    /// in its old term, from echoes sent before the pause. A crash during
    /// the pause loses the backlog. Drawn from the second random stream,
    /// so a run goes as before up to its first pause (`Sim::pause`).
    pub pauses: bool,
    /// The share of the messages sent while faults are active that are
    /// also delivered once more, 0.5-3 s later (a transport that resends
    /// what it had buffered once it reconnects): by then mostly of an
    /// older term, or answering a request its receiver has forgotten (a
    /// vote, a heartbeat round). Not if either end restarted meanwhile (a
    /// new process has new connections). Drawn from a stream of their
    /// own, so a run goes as before up to its first replay.
    pub stale_replays: f64,
    /// An operator starts a node under a removed id (`join = true`, an
    /// empty disk: an impostor) on the removed node's machine, and never
    /// asks a leader to add it (it would be refused): a third of the times
    /// the harness would bring a removed node's machine back under a new
    /// id, and whenever a paused leader resumes still counting as a voter
    /// a removed id whose node has stopped (half the time). Half the
    /// impostors are stopped again 0.5-3 s later (an operator who
    /// notices), the others run to the end. In half the runs, also a
    /// stale leader is set up to meet one (`Sim::plot_start`). A stale
    /// leader must get nothing from it: a node still joining ignores a
    /// leader that counts it as a voter. Drawn from a stream of their own,
    /// so a run goes as before up to its first impostor or plot.
    pub impostors: bool,
    /// Latency blips between regions (the `regions` mix): the preferred
    /// region (`SimConfig::preferred_leaders`, the writers' region) or the
    /// leader of the moment loses its links to every other node for
    /// 0.3-2.5 s: half the time they are cut, half the time what crosses
    /// them arrives one to three election timeouts (maximum) late. Either
    /// way the far side may elect a leader outside the preferred set. The
    /// last blip, of the preferred region most of the time, lasts until
    /// the faults heal, so many runs heal with a leader outside it
    /// (`Sim::region_blip`).
    pub region_blips: bool,
    /// The nodes run with `replicated` durability (an entry counts once
    /// written to the OS, and is synced in the background 5-20 ms later;
    /// `Sim::write_inline`), and a machine sometimes loses power: what it
    /// had not synced is gone, and it restarts amnesic
    /// (`Node::set_amnesic`); a minority of the nodes at most are
    /// amnesic at a time. Half the time the leader of the moment
    /// crashes with it, so the other voters must elect a leader without
    /// the writes that only the lost acknowledgements made a quorum's
    /// (`Sim::power_loss`).
    pub power_losses: bool,
}

impl FaultMix {
    const NONE: FaultMix = FaultMix {
        name: "calm",
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        partitions: false,
        asymmetric: false,
        cut_link: false,
        crashes: false,
        slow_disk: false,
        clock_jumps: false,
        membership: false,
        transfers: false,
        isolate_leader: false,
        late_copies: false,
        pauses: false,
        stale_replays: 0.0,
        impostors: false,
        region_blips: false,
        power_losses: false,
    };

    /// Every named mix, from calm to chaos.
    pub fn all() -> Vec<FaultMix> {
        let n = Self::NONE;
        vec![
            n.clone(),
            FaultMix {
                name: "lossy",
                loss: 0.05,
                duplicate: 0.03,
                reorder: 0.1,
                isolate_leader: true,
                late_copies: true,
                ..n.clone()
            },
            FaultMix {
                name: "partitions",
                partitions: true,
                asymmetric: true,
                cut_link: true,
                isolate_leader: true,
                late_copies: true,
                ..n.clone()
            },
            FaultMix {
                name: "cut-link",
                cut_link: true,
                ..n.clone()
            },
            FaultMix {
                name: "crashes",
                crashes: true,
                slow_disk: true,
                late_copies: true,
                ..n.clone()
            },
            FaultMix {
                name: "clock",
                clock_jumps: true,
                reorder: 0.05,
                ..n.clone()
            },
            FaultMix {
                name: "membership",
                membership: true,
                impostors: true,
                crashes: true,
                loss: 0.02,
                late_copies: true,
                ..n.clone()
            },
            FaultMix {
                name: "chaos",
                loss: 0.03,
                duplicate: 0.02,
                reorder: 0.05,
                partitions: true,
                asymmetric: true,
                cut_link: true,
                crashes: true,
                slow_disk: true,
                clock_jumps: true,
                membership: true,
                transfers: false,
                isolate_leader: true,
                late_copies: true,
                pauses: true,
                stale_replays: 0.005,
                impostors: true,
                region_blips: false,
                power_losses: false,
            },
            FaultMix {
                name: "transfers",
                transfers: true,
                crashes: true,
                cut_link: true,
                loss: 0.02,
                duplicate: 0.02,
                reorder: 0.05,
                late_copies: true,
                ..n.clone()
            },
            FaultMix {
                name: "pauses",
                pauses: true,
                stale_replays: 0.01,
                crashes: true,
                loss: 0.02,
                duplicate: 0.02,
                reorder: 0.05,
                late_copies: true,
                ..n
            },
        ]
    }

    /// The mixes outside the default rotation (`all`), so that adding
    /// them left every seed of the rotation's mixes as it was: `regions`,
    /// a cluster over two regions whose links blip (`region_blips`), with
    /// crashes and a little loss and reordering. Its runs always have a
    /// preferred set, the writers' region: node 1 of three, nodes 1 and 2
    /// of five.
    /// `power`: `replicated` durability with power losses
    /// (`power_losses`), crashes, slow disks and a little loss and
    /// reordering.
    pub fn extra() -> Vec<FaultMix> {
        vec![
            FaultMix {
                name: "regions",
                region_blips: true,
                crashes: true,
                loss: 0.01,
                reorder: 0.02,
                ..Self::NONE
            },
            FaultMix {
                name: "power",
                power_losses: true,
                crashes: true,
                slow_disk: true,
                membership: true,
                loss: 0.01,
                reorder: 0.02,
                ..Self::NONE
            },
        ]
    }

    /// Every mix `by_name` knows: the rotation's and the extra ones.
    pub fn named() -> Vec<FaultMix> {
        let mut v = Self::all();
        v.extend(Self::extra());
        v
    }

    pub fn by_name(name: &str) -> Option<FaultMix> {
        Self::named().into_iter().find(|m| m.name == name)
    }

    fn nemesis_kinds(&self) -> Vec<Nemesis> {
        let mut v = Vec::new();
        if self.partitions {
            v.push(Nemesis::Partition);
        }
        if self.asymmetric {
            v.push(Nemesis::Asymmetric);
        }
        if self.cut_link {
            v.push(Nemesis::CutLink);
        }
        if self.crashes {
            v.push(Nemesis::Crash);
        }
        if self.slow_disk {
            v.push(Nemesis::SlowDisk);
        }
        if self.clock_jumps {
            v.push(Nemesis::ClockJump);
        }
        if self.isolate_leader {
            // Twice as often as each other fault: few runs depose a
            // leader that has not noticed while a majority elects another.
            v.extend([Nemesis::IsolateLeader; 2]);
        }
        if self.transfers {
            // As often as all the other faults together.
            v.extend(std::iter::repeat_n(Nemesis::Transfer, v.len().max(1)));
        }
        if self.region_blips {
            // Three times as often as each other fault.
            v.extend([Nemesis::RegionBlip; 3]);
        }
        if self.power_losses {
            // As often as all the other faults together.
            v.extend(std::iter::repeat_n(Nemesis::PowerLoss, v.len().max(1)));
        }
        v
    }
}

#[derive(Clone, Copy, Debug)]
enum Nemesis {
    Partition,
    Asymmetric,
    CutLink,
    Crash,
    SlowDisk,
    ClockJump,
    Transfer,
    IsolateLeader,
    RegionBlip,
    PowerLoss,
}

/// One simulation run's parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Number of voters at the start (3 or 5).
    pub nodes: usize,
    pub mix: FaultMix,
    /// How long faults are injected (simulated time).
    pub fault_time: Nanos,
    pub clients: usize,
    /// How many of the clients only read (the first ones).
    pub readers: usize,
    pub keys: u64,
    pub bugs: TestingBugs,
    /// Take a snapshot after this many applied bytes.
    pub snapshot_every: u64,
    /// After faults heal, a leader must exist and a write must commit
    /// within this much simulated time.
    pub liveness_bound: Nanos,
    /// Test-only: serve reads from the contacted replica's local state,
    /// without read-index (stale reads), to show the linearizability
    /// checker fires.
    pub unsafe_local_reads: bool,
    /// Nodes answer linearizable reads by leader lease (`Config::lease_reads`,
    /// assuming the default clock-drift bound). Lease reads assume clocks
    /// that do not jump (the runtime's clock is monotonic), so in these
    /// runs the clock nemesis changes a node's clock rate, within
    /// `clock_drift_ppm`, instead of stepping it.
    pub lease_reads: bool,
    /// How far each node's clock rate may be from true time, in parts per
    /// million: each node starts at a rate within 1 ± this, most often at an end. 0: every
    /// clock runs at the true rate (the clocks are still offset and, with
    /// the clock nemesis, stepped).
    pub clock_drift_ppm: u64,
    /// The clock-rate error the nodes assume (`Config::clock_drift_ppm`),
    /// which sets the margin their leases leave for it.
    pub assumed_drift_ppm: u64,
    /// Scripted cut-offs of a slow-clocked leader (`None`: none).
    pub lease_cuts: Option<LeaseCuts>,
    /// Scripted leadership transfers that run out at a leader cut off
    /// just after its `TimeoutNow` (`None`: none).
    pub transfer_cuts: Option<TransferCuts>,
    /// The nodes' election timeout range (`Config::election_timeout_min`
    /// and `_max`).
    pub election_timeout: (Nanos, Nanos),
    /// Each node has its own election timeouts: node n's range is
    /// `election_timeout` with both ends scaled by 1 + (n - 1) / 4 (node 1
    /// the shortest), so leases must count on each voter's own stickiness.
    pub uneven_timeouts: bool,
    /// Each restart changes a node's election timeouts: odd incarnations
    /// (after the first crash, the third, ...) run with both ends halved,
    /// even ones with the node's usual range. A node restarted with a
    /// lower timeout must still hold its vote for the one it reported
    /// before (`HardState::hold`).
    pub restarts_change_timeouts: bool,
    /// Node 1's service ignores term starts, as a binary from before they
    /// were marked would replay them (what the data directory's format
    /// gate prevents): to see the replica-divergence check fire.
    pub stale_binary: bool,
    /// How long after `Action::SaveSnapshot` a snapshot's file reaches
    /// storage to be published, drawn per snapshot from this range (in
    /// order per node). The runtime's snapshot thread serializes and writes
    /// the file first, and publishing it stalls storage for 50-80 ms on a
    /// slow disk, so the core takes newer snapshots while older ones are
    /// still unpublished. `(0, 0)`: published with the next disk sync.
    pub publish_delay: (Nanos, Nanos),
    /// A scripted wipe of one follower (`None`: no wipe).
    pub wipe: Option<WipeFollower>,
    /// The named scenario these settings come from, for the replay command.
    pub scenario: Option<Scenario>,
    /// End the run at its first safety violation (any but a liveness one),
    /// before the core takes another step: a core broken on purpose
    /// (`bugs`) goes on from a broken state, and what it does next (a
    /// debug assertion that fires, a later violation of another kind) must
    /// not hide or replace what the checkers found first. The report then
    /// says when it stopped (`Report::stopped_at`) and skips the liveness
    /// checks; the history so far is still checked for linearizability.
    pub stop_at_first_violation: bool,
    /// Every node's `Config::preferred_leaders` (empty: none). Drawn from
    /// the seed by `SimConfig::new` (its own random stream, so the runs
    /// without one go as before): a quarter of the seeds of the usual
    /// mixes get 1 or 2 of the initial voters, every `regions` seed its
    /// region; a scenario clears it unless forced
    /// (`force_preferred_leaders`; `no_preferred_leaders` takes it away).
    /// After the faults heal a preferred
    /// voter must lead within `preferred_bound`.
    pub preferred_leaders: BTreeSet<NodeId>,
    /// Every node's `Config::preferred_leader_hold`: 2-4 election timeouts
    /// (maximum), drawn from the seed.
    pub preferred_leader_hold: Nanos,
    /// The preferred set was forced on (`Some(true)`: `keel-sim
    /// --preferred-leaders`) or off (`Some(false)`), rather than drawn.
    pub preferred_forced: Option<bool>,
    /// Test-only: the cores are not told `preferred_leaders` (as a build
    /// without the feature would run), while the checker still expects a
    /// preferred leader: to show that check fires.
    pub core_ignores_preference: bool,
}

/// The share of the seeds of the usual mixes that get a preferred set.
const PREFERRED_SHARE: f64 = 0.25;

/// One follower loses its whole disk and rejoins: only a snapshot install
/// can bring it back, since the leader's log before its snapshot is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct WipeFollower {
    /// When a follower of the leader of the moment is crashed and wiped.
    pub at: Nanos,
    /// When it restarts, empty (only the initial membership configured).
    pub restart_at: Nanos,
    /// From here until the faults heal (`fault_time`) clients start no new
    /// operations: an idle cluster appends nothing, so only what the leader
    /// sends unasked (heartbeats) can reach the rejoining node.
    pub quiet_from: Nanos,
    /// Within this time of its restart the wiped node must have applied
    /// everything committed when it restarted, and until then it must hear
    /// from the leader at least every election timeout (minimum).
    pub catch_up_bound: Nanos,
}

/// Lease reads' worst case, scripted: the leader of the moment gets the
/// slowest clock the drift bound allows and every other node the fastest.
/// At the same time a minority of its followers and the clients that write
/// lose it: those followers will stand for election early, and with no
/// writes their logs stay as long as the others'. Later the leader is cut
/// off from every other node, and one of the followers it still had
/// restarts, so only its restart hold keeps it from voting for an early
/// candidate. The clients that only read (`SimConfig::readers`) go on
/// reading from the old leader, answered by its lease alone, while the
/// writers find the new leader and write there. A lease that does
/// not leave the drift margin (or overruns it by more than an election
/// plus a write take, tens of milliseconds) answers some of those reads
/// after the new leader's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseCuts {
    /// When the first leader's clock is slowed (with no leader yet, as
    /// soon as there is one).
    pub first: Nanos,
    /// The time from one slowed leader to the next: at least
    /// `skew_before + cut_for`, so cuts never overlap.
    pub every: Nanos,
    /// How long after the clocks are set (and the writers and a minority
    /// of followers lose the leader) it is cut off: by then its lease runs
    /// from heartbeats timed at the new rates.
    pub skew_before: Nanos,
    /// How long it stays cut off.
    pub cut_for: Nanos,
}

/// A leadership transfer that runs out at a leader that kept a lease,
/// scripted: the leader of the moment is asked to hand leadership to a
/// follower it cannot reach for a while (a slow link; writes go on, so the
/// follower falls behind), and hears echoes of its heartbeats from the
/// others meanwhile. Once the target answers again and has caught up, the
/// leader sends it `TimeoutNow`, and just then is cut off from every other
/// node (and the clients that write from it): the target wins an election
/// in the next term (a transfer's election bypasses the voters'
/// stickiness) and commits the writes of the clients that found it, while
/// the old leader hears nothing. Its transfer runs out (a minimum election
/// timeout after it was asked) while the lease from the echoes it heard
/// up to the `TimeoutNow` would still run, about as long past the deadline
/// as the target was unreachable; a client that reads in a loop from it
/// (the pinned reader, pointed at it when the transfer is asked) goes on
/// reading there. A leader that kept its lease across the transfer answers
/// those reads after the new leader's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferCuts {
    /// When the first transfer is asked (with no leader yet, as soon as
    /// there is one).
    pub first: Nanos,
    /// The time from one transfer to the next: at least the longest lag
    /// and `cut_for`, plus the time to catch the target up, so cuts never
    /// overlap.
    pub every: Nanos,
    /// How long the target and the leader cannot reach each other once
    /// the transfer is asked, drawn from this range: below the minimum
    /// election timeout, so the target does not stand on its own.
    pub lag: (Nanos, Nanos),
    /// How long the leader stays cut off after its `TimeoutNow`: past its
    /// check-quorum step-down.
    pub cut_for: Nanos,
}

/// Named scripted scenarios (`--scenario`), on top of a fault mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A wiped follower rejoins a cluster that has gone idle.
    WipedFollowerIdle,
    /// A wiped follower rejoins while writes go on, snapshots are taken
    /// often and their files are published late (several snapshots behind).
    WipedFollowerUnderLoad,
    /// Lease reads with clocks drifting by 10% (and the nodes assuming as
    /// much): a slow-clocked leader is cut off from fast-clocked voters
    /// again and again, some of which stand early and one of which has
    /// just restarted (`LeaseCuts`). Election timeouts of 1-1.1 s make
    /// the drift margin (~200 ms) wide against message delays (~1 ms), and
    /// their narrow range makes the first voter time out soon after its
    /// stickiness ends, as the worst case does.
    LeaseSlowLeader,
    /// Lease reads (the default drift bound) with a leadership transfer
    /// every two seconds whose target lags behind the leader for 80-160 ms
    /// and whose leader is cut off just after sending it `TimeoutNow`
    /// (`TransferCuts`), while the pinned reader goes on reading from the
    /// old leader after its transfer runs out.
    LeaseTransferCut,
}

impl Scenario {
    pub fn all() -> [Scenario; 4] {
        [
            Scenario::WipedFollowerIdle,
            Scenario::WipedFollowerUnderLoad,
            Scenario::LeaseSlowLeader,
            Scenario::LeaseTransferCut,
        ]
    }
    pub fn name(self) -> &'static str {
        match self {
            Scenario::WipedFollowerIdle => "wiped-follower-idle",
            Scenario::WipedFollowerUnderLoad => "wiped-follower-under-load",
            Scenario::LeaseSlowLeader => "lease-slow-leader",
            Scenario::LeaseTransferCut => "lease-transfer-cut",
        }
    }
    /// What the scenario does, in one line (`keel-sim --help`).
    pub fn help(self) -> &'static str {
        match self {
            Scenario::WipedFollowerIdle => {
                "a follower loses its disk and rejoins an idle cluster (snapshot install)"
            }
            Scenario::WipedFollowerUnderLoad => {
                "a follower loses its disk and rejoins under writes, snapshot files published late"
            }
            Scenario::LeaseSlowLeader => {
                "lease reads: a slow-clocked leader is cut off from fast-clocked voters, again and \
                 again"
            }
            Scenario::LeaseTransferCut => {
                "lease reads: a leader is cut off just after its TimeoutNow, and read from after its \
                 transfer runs out"
            }
        }
    }
    pub fn by_name(name: &str) -> Option<Scenario> {
        Self::all().into_iter().find(|s| s.name() == name)
    }
    /// The scenario's settings over `cfg` (best with the calm mix).
    pub fn apply(self, cfg: &mut SimConfig) {
        cfg.scenario = Some(self);
        if cfg.preferred_forced != Some(true) {
            // Scenarios run as they were scripted, before preferred
            // leaders: `force_preferred_leaders` adds them.
            cfg.preferred_leaders.clear();
        }
        if matches!(
            self,
            Scenario::WipedFollowerIdle | Scenario::WipedFollowerUnderLoad
        ) {
            // The wiped node must hear from the leader every election
            // timeout: no isolated leader.
            cfg.mix.isolate_leader = false;
        }
        match self {
            Scenario::WipedFollowerIdle => {
                cfg.snapshot_every = 2 * 1024;
                cfg.publish_delay = (20 * MS, 80 * MS);
                cfg.wipe = Some(WipeFollower {
                    at: SEC,
                    quiet_from: 2 * SEC,
                    restart_at: 2 * SEC + 500 * MS,
                    catch_up_bound: 1_500 * MS,
                });
                cfg.fault_time = 4 * SEC + 500 * MS;
            }
            Scenario::WipedFollowerUnderLoad => {
                cfg.snapshot_every = 1024;
                cfg.publish_delay = (150 * MS, 400 * MS);
                cfg.wipe = Some(WipeFollower {
                    at: SEC,
                    restart_at: SEC + 500 * MS,
                    catch_up_bound: 1_500 * MS,
                    quiet_from: 4 * SEC,
                });
                cfg.fault_time = 4 * SEC + 500 * MS;
            }
            Scenario::LeaseSlowLeader => {
                cfg.lease_reads = true;
                cfg.clock_drift_ppm = 100_000;
                cfg.assumed_drift_ppm = 100_000;
                cfg.clients = 8;
                cfg.readers = 4;
                cfg.keys = 2;
                cfg.election_timeout = (SEC, 1_100 * MS);
                // The first election ends 1-1.2 s in; four cuts of 1.6 s
                // each then end before the faults heal.
                cfg.lease_cuts = Some(LeaseCuts {
                    first: 1_200 * MS,
                    every: 2_500 * MS,
                    skew_before: 300 * MS,
                    cut_for: 1_600 * MS,
                });
                cfg.fault_time = 11 * SEC;
            }
            Scenario::LeaseTransferCut => {
                cfg.lease_reads = true;
                cfg.clock_drift_ppm = cfg.assumed_drift_ppm;
                cfg.keys = 2;
                // The first election ends 0.2-0.6 s in; four transfers,
                // each cut for 1 s, then end before the faults heal.
                cfg.transfer_cuts = Some(TransferCuts {
                    first: SEC,
                    every: 2 * SEC,
                    lag: (80 * MS, 160 * MS),
                    cut_for: SEC,
                });
                cfg.fault_time = 8 * SEC + 500 * MS;
            }
        }
    }
}

impl SimConfig {
    pub fn new(seed: u64, nodes: usize, mix: FaultMix) -> Self {
        SimConfig {
            seed,
            nodes,
            mix,
            fault_time: 6 * SEC,
            clients: 4,
            readers: 0,
            keys: 4,
            bugs: TestingBugs::default(),
            snapshot_every: 16 * 1024,
            liveness_bound: 5 * SEC,
            unsafe_local_reads: false,
            lease_reads: false,
            clock_drift_ppm: 0,
            assumed_drift_ppm: Config::new(1, 0).clock_drift_ppm,
            lease_cuts: None,
            transfer_cuts: None,
            election_timeout: (200 * MS, 400 * MS),
            uneven_timeouts: false,
            restarts_change_timeouts: false,
            stale_binary: false,
            publish_delay: (0, 0),
            wipe: None,
            scenario: None,
            stop_at_first_violation: false,
            preferred_leaders: BTreeSet::new(),
            preferred_leader_hold: Config::new(1, 0).preferred_leader_hold,
            preferred_forced: None,
            core_ignores_preference: false,
        }
        .with_drawn_preference()
    }

    /// The preferred set and hold drawn from the seed, from a random
    /// stream of their own: whether this seed gets one (a quarter of them;
    /// every `regions` seed), 1 or 2 of the initial voters (the `regions`
    /// mix: the first half of them, rounded down), and a hold of 2-4
    /// maximum election timeouts.
    fn draw_preference(&self) -> (bool, BTreeSet<NodeId>, Nanos) {
        let mut rng = Rng::new(self.seed ^ 0x7072_6566_6572_7265);
        let mut on = rng.chance(PREFERRED_SHARE);
        let mut ids: Vec<NodeId> = (1..=self.nodes as NodeId).collect();
        let mut set = BTreeSet::new();
        for _ in 0..rng.range(1, 3) {
            let k = rng.range(0, ids.len() as u64) as usize;
            set.insert(ids.swap_remove(k));
        }
        let max = self.election_timeout.1;
        let hold = rng.range(2 * max, 4 * max);
        if self.mix.region_blips {
            on = true;
            set = (1..=(self.nodes / 2).max(1) as NodeId).collect();
        }
        (on, set, hold)
    }

    fn with_drawn_preference(mut self) -> Self {
        let (on, set, hold) = self.draw_preference();
        if on {
            self.preferred_leaders = set;
            self.preferred_leader_hold = hold;
        }
        self
    }

    /// Gives this run the preferred set and hold its seed draws, whether
    /// or not the seed would have had one (`keel-sim --preferred-leaders`),
    /// with the hold drawn against the current election timeouts.
    pub fn force_preferred_leaders(&mut self) {
        let (_, set, hold) = self.draw_preference();
        self.preferred_leaders = set;
        self.preferred_leader_hold = hold;
        self.preferred_forced = Some(true);
    }

    /// No preferred set, whatever the seed draws (`keel-sim
    /// --preferred-leaders=false`): a seed runs as it did before preferred
    /// leaders were drawn.
    pub fn no_preferred_leaders(&mut self) {
        self.preferred_leaders.clear();
        self.preferred_forced = Some(false);
    }

    /// How long after the faults heal a preferred voter must lead (when
    /// one is a voter of the final configuration and up): up to four of
    /// the longest election timeouts (those of voters outside the set,
    /// which stand after the preferred ones) to elect a leader and have
    /// the preferred voter answer it, the hold (stretched by the clock
    /// drift: the leader measures it on its own clock), and two election
    /// timeouts (maximum) for the transfer (the catch-up and `TimeoutNow`,
    /// given up after a minimum election timeout) and the target's
    /// election.
    pub fn preferred_bound(&self) -> Nanos {
        let ids = if self.mix.membership {
            self.nodes + 2
        } else {
            self.nodes
        };
        let (mut longest, mut max) = (0, 0);
        for id in 1..=ids as NodeId {
            for inc in 0..2 {
                let (lo, hi) = self.election_timeout_of(id, inc);
                longest = longest.max(2 * hi - lo.min(hi));
                max = max.max(hi);
            }
        }
        let ppm = self.clock_drift_ppm.max(self.assumed_drift_ppm);
        let hold = self.preferred_leader_hold
            + (u128::from(self.preferred_leader_hold) * 2 * u128::from(ppm) / 1_000_000) as Nanos;
        4 * longest + hold + 2 * max
    }

    /// A run of a named scenario.
    pub fn scenario(seed: u64, nodes: usize, mix: FaultMix, scenario: Scenario) -> Self {
        let mut cfg = SimConfig::new(seed, nodes, mix);
        scenario.apply(&mut cfg);
        cfg
    }

    /// Node `id`'s election timeout range in its `incarnation` (see
    /// `uneven_timeouts` and `restarts_change_timeouts`).
    pub fn election_timeout_of(&self, id: NodeId, incarnation: u64) -> (Nanos, Nanos) {
        let (mut lo, mut hi) = self.election_timeout;
        if self.uneven_timeouts {
            let scale = |t: Nanos| t + t / 4 * id.saturating_sub(1);
            (lo, hi) = (scale(lo), scale(hi));
        }
        if self.restarts_change_timeouts && incarnation % 2 == 1 {
            (lo, hi) = (lo / 2, hi / 2);
        }
        (lo, hi)
    }

    /// Whether any of the core's deliberate bugs is on (`keel-sim` then
    /// stops at the first violation unless told not to).
    pub fn any_bug(&self) -> bool {
        self.bugs != TestingBugs::default()
    }

    /// The one-line command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut s = format!(
            "cargo run -p keel-sim --release -- --seed {} --nodes {} --mix {}",
            self.seed, self.nodes, self.mix.name
        );
        let mut bugs = self.bugs;
        for (name, flag) in BUGS {
            if *flag(&mut bugs) {
                s.push_str(&format!(" --bug {name}"));
            }
        }
        if self.lease_reads {
            s.push_str(" --lease-reads");
        }
        if self.clock_drift_ppm > 0 {
            s.push_str(&format!(" --clock-drift-ppm {}", self.clock_drift_ppm));
        }
        if self.uneven_timeouts {
            s.push_str(" --uneven-timeouts");
        }
        if self.restarts_change_timeouts {
            s.push_str(" --restarts-change-timeouts");
        }
        if let Some(on) = self.preferred_forced {
            s.push_str(&format!(" --preferred-leaders={on}"));
        }
        match self.scenario {
            Some(sc) => s.push_str(&format!(" --scenario {}", sc.name())),
            None if self.publish_delay != (0, 0) => s.push_str(&format!(
                " --publish-delay-ms {},{}",
                self.publish_delay.0 / MS,
                self.publish_delay.1 / MS
            )),
            None => {}
        }
        // `keel-sim` stops at the first violation by default when a bug is
        // on, and not otherwise.
        if self.stop_at_first_violation != self.any_bug() {
            s.push_str(&format!(
                " --stop-at-first-violation={}",
                self.stop_at_first_violation
            ));
        }
        s
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub ops_ok: u64,
    pub ops_unknown: u64,
    pub elections: u64,
    pub messages: u64,
    pub crashes: u64,
    /// Machines that lost power (`FaultMix::power_losses`), and the log
    /// entries they lost with it (written, not yet synced).
    pub power_losses: u64,
    pub entries_lost_to_power: u64,
    pub snapshots_installed: u64,
    /// Snapshot chunks sent (a snapshot install takes several).
    pub snapshot_chunks: u64,
    /// Chunks the core asked for whose snapshot file was already replaced
    /// (not sent; the leader resends from the newer snapshot).
    pub snapshot_chunks_unsent: u64,
    /// Chunks sent from the newest published file while the sender had a
    /// newer snapshot whose file was still being written.
    pub snapshot_chunks_behind_newest: u64,
    /// Appends whose entries were read back from the sender's disk model
    /// (`Action::SendLogRange`), and those not sent because the disk no
    /// longer held them (compacted meanwhile).
    pub log_ranges_read: u64,
    /// Reads answered under a leader lease (`SimConfig::lease_reads`).
    pub lease_reads: u64,
    /// Slow-clocked leaders cut off (`SimConfig::lease_cuts`).
    pub leaders_cut_off: u64,
    /// Reads a node cut off by `lease_cuts` answered while cut off: only
    /// its lease can answer them (or a quorum's echo already on its way).
    pub reads_while_cut_off: u64,
    /// The latest such read, as time since its node was cut off: how long
    /// a cut-off leader went on answering from its lease. One later than
    /// the voters' stickiness can last is a violation.
    pub last_read_after_cut: Nanos,
    /// Leaders cut off just after sending `TimeoutNow`
    /// (`SimConfig::transfer_cuts`), and how many of them were still
    /// leading, cut off, when their transfer ran out.
    pub transfer_cuts: u64,
    pub transfers_ran_out_cut_off: u64,
    /// Reads that reached such a leader after its transfer ran out while
    /// it still led that term, and how many of them it answered (only a
    /// lease it should have given up can) or refused.
    pub reads_after_transfer_ran_out: u64,
    pub reads_served_after_transfer_ran_out: u64,
    pub reads_refused_after_transfer_ran_out: u64,
    pub log_ranges_unsent: u64,
    /// Leaders cut off by the `isolate_leader` nemesis.
    pub leader_isolations: u64,
    /// Processes paused (`FaultMix::pauses`), how many of them led then,
    /// and the events (messages, requests, ticks, disk syncs, service
    /// reports) they found waiting when they resumed.
    pub pauses: u64,
    pub leaders_paused: u64,
    pub events_after_pause: u64,
    /// Paused leaders that resumed after a leader of a later term had been
    /// elected (deposed, but not yet told).
    pub resumed_deposed: u64,
    /// Messages delivered once more long after they were sent
    /// (`FaultMix::stale_replays`; none to or from a node restarted since),
    /// and how many of those reached a node already in a later term than
    /// theirs.
    pub stale_replays: u64,
    pub replays_of_older_terms: u64,
    /// Messages delivered a second time, late (`FaultMix::late_copies`).
    pub late_copies: u64,
    /// `Action::Apply`s the core gave while the service had applied more
    /// than the core had heard of (its reports late): a core that handed
    /// out entries from what it heard, not from what it sent, would apply
    /// some twice here.
    pub applies_ahead_of_reports: u64,
    /// Reads that reached a node leading an old term after a later leader
    /// had committed past its commit position: it must not answer them
    /// from its own commit without a heartbeat round a quorum echoes.
    pub reads_at_deposed_leaders: u64,
    /// Snapshot chunks that reached a node whose commit had passed the
    /// snapshot's position (late or repeated): installing one would move
    /// its commit back.
    pub snapshot_chunks_below_commit: u64,
    pub membership_changes: u64,
    /// `Body::Removed` notices sent, nodes that stopped for good on one
    /// (or on committing their own removal as leader), and removed nodes
    /// whose machines joined again with an empty disk under a new id (ids
    /// are never reused: `Sim::rejoin_fresh`).
    pub removed_notices: u64,
    pub removals_acted: u64,
    pub rejoined: u64,
    /// How many of those new ids a configuration committed after they
    /// joined again includes (a leader accepted their addition and it
    /// committed).
    pub rejoined_members: u64,
    /// Nodes started under a removed id by an operator's mistake
    /// (`FaultMix::impostors`): an empty disk, joining, on the removed
    /// node's machine, never proposed for addition; and how many of them
    /// the operator stopped again.
    pub impostors: u64,
    pub impostors_stopped: u64,
    /// Stale leaders set up to meet an impostor (`Sim::plot_start`), and
    /// how many of the impostors they were set up for started.
    pub impostor_plots: u64,
    pub impostor_plots_met: u64,
    /// Leaders that resumed from a pause still leading and counting a
    /// running impostor's id as a voter: they take it for the removed
    /// voter.
    pub stale_leaders_at_impostors: u64,
    /// Appends and snapshot chunks that reached a running impostor from a
    /// leader counting its id as a voter (`Body::Append::to_voter`).
    pub voter_appends_at_impostors: u64,
    /// Impostors that finished joining: a leader that counted their id as
    /// a learner (a removed learner's, in a configuration from before the
    /// removal) caught them up (the README's residual case: do not leave
    /// such a node running).
    pub impostors_joined: u64,
    /// The core's `Stats::to_voter_ignored`, over every node and
    /// incarnation: appends and snapshot chunks a node still joining
    /// ignored because their leader counted it as a voter.
    pub to_voter_ignored: u64,
    /// Leadership transfers asked of a leader, and how many of them a
    /// leader of a later term was the target of.
    pub transfers: u64,
    pub transfers_done: u64,
    /// Membership changes that removed the leader proposing them, accepted
    /// by it (it steps down once the change commits).
    pub leader_removals: u64,
    pub timers_fired: u64,
    /// The most term starts any node's service applied (each renews the
    /// pending key timers).
    pub term_starts_applied: u64,
    pub violations: Vec<String>,
    /// The run ended at this simulated time, at its first safety violation
    /// (`SimConfig::stop_at_first_violation`).
    pub stopped_at: Option<Nanos>,
    /// The run ended in a panic (in the core or the simulator): where (the
    /// simulated time and the node being stepped, if any) and the panic's
    /// message. Also the last of `violations`, as a `panic:` one: the seed
    /// fails, and what the checkers found before the panic is kept.
    pub panicked: Option<String>,
    pub linearizability: Option<CheckResult>,
    pub sim_time: Nanos,
    /// What happened to the wiped follower (`SimConfig::wipe`).
    pub wiped: Option<WipeOutcome>,
    /// The core's `Stats::preference_transfers`, over every node and
    /// incarnation: transfers leaders outside `SimConfig::preferred_leaders`
    /// started to hand leadership to a preferred voter.
    pub preference_transfers: u64,
    /// The core's `Stats::forwards_dropped`, over every node and
    /// incarnation: client writes followers forwarded that the node they
    /// reached could neither append nor pass on.
    pub forwards_dropped: u64,
    /// Latency blips between regions (`FaultMix::region_blips`), and how
    /// many of them delayed the links rather than cut them.
    pub region_blips: u64,
    pub region_delays: u64,
    /// Preference transfers started after the heal, and how many of them
    /// did not make a preferred voter the next leader (after the heal
    /// nothing should stop one).
    pub preference_transfers_after_heal: u64,
    pub preference_transfers_failed: u64,
    /// What the preferred-leader check found (`None`: no preferred set).
    pub preferred: Option<PreferredOutcome>,
}

/// The preferred-leader check of one run (`SimConfig::preferred_leaders`).
#[derive(Clone, Debug, Default)]
pub struct PreferredOutcome {
    /// The leader of the newest term when the faults healed, if one ran.
    pub leader_at_heal: Option<NodeId>,
    /// That leader was outside the preferred set: the run had to move
    /// leadership back.
    pub outside_at_heal: bool,
    /// How long after the heal a preferred voter first led the newest
    /// term (`None`: none did).
    pub led_after: Option<Nanos>,
    /// The bound it had, from the heal: `SimConfig::preferred_bound`, or
    /// longer where the core's back-off after hand-overs that failed under
    /// faults ran past it (`Sim::preferred_deadline`).
    pub bound: Nanos,
    /// Why the check did not apply to this run (`None`: it did).
    pub skipped: Option<String>,
    /// The final leader, outside the set, kept its term as elected through
    /// a hand-over no one asked for (a leader that removed itself sent
    /// `TimeoutNow` to its most caught-up voter): a violation, since the
    /// core counts only a transfer from a voter of the winner's
    /// configuration as one.
    pub handover_kept: bool,
}

/// How a wiped follower rejoined.
#[derive(Clone, Debug, Default)]
pub struct WipeOutcome {
    pub node: NodeId,
    pub restarted_at: Nanos,
    /// The highest commit position in the cluster when it restarted.
    pub target: Position,
    /// How long after its restart it had applied `target`.
    pub caught_up_after: Option<Nanos>,
    /// The longest it went without an append or snapshot chunk from a
    /// leader, from its restart to the check (`catch_up_bound` later).
    pub longest_silence: Nanos,
    /// Pre-votes it started by then (it timed out waiting for a leader).
    pub pre_votes: u64,
    /// Snapshots it installed by then.
    pub snapshots_installed: u64,
    last_heard: Nanos,
    checked: bool,
}

impl Report {
    /// Adds what one core incarnation counted.
    fn add_core_stats(&mut self, s: &keel_core::Stats) {
        self.lease_reads += s.lease_reads;
        self.removed_notices += s.removed_sent;
        self.to_voter_ignored += s.to_voter_ignored;
        self.preference_transfers += s.preference_transfers;
        self.forwards_dropped += s.forwards_dropped;
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
    /// Violations of safety (the invariants, early timers) or
    /// linearizability: every violation except liveness ones and a panic.
    pub fn safety_violations(&self) -> Vec<&str> {
        self.violations
            .iter()
            .map(String::as_str)
            .filter(|v| is_safety(v))
            .collect()
    }
    /// The linearizability checker ran out of budget: the history was
    /// neither confirmed nor refuted.
    pub fn linearizability_unknown(&self) -> bool {
        matches!(self.linearizability, Some(CheckResult::Unknown { .. }))
    }
}

/// Whether a violation is one of safety (or linearizability): not a
/// liveness one, nor the report of a panic.
fn is_safety(v: &str) -> bool {
    !v.starts_with("liveness:") && !v.starts_with("panic:")
}

// ----- the simulated world ----------------------------------------------

#[derive(Clone, Debug)]
enum ReqKind {
    Write { seq: u64, data: Bytes },
    Read { data: Bytes },
}

#[derive(Clone, Debug)]
enum Resp {
    Output(Bytes),
    Reject(RejectReason),
}

#[derive(Debug)]
enum Ev {
    Peer(Message),
    /// A second, late copy of a `TimeoutNow` (`FaultMix::transfers`).
    LateTimeoutNow(Message),
    Request {
        node: NodeId,
        client: u64,
        req: u64,
        kind: ReqKind,
    },
    Response {
        client: u64,
        req: u64,
        resp: Resp,
    },
    Tick(NodeId, u64),
    DiskSync(NodeId, u64),
    /// `power_losses` runs: the background sync of what was written
    /// (`Disk::synced`), of this node and incarnation.
    BackgroundSync(NodeId, u64),
    /// The service's reports of what it applied (and captured) reach the
    /// core (`SimNode::reports`).
    ServiceReports(NodeId, u64),
    ClientWake(u64, u64),
    Nemesis,
    HealLinks(Vec<(NodeId, NodeId)>),
    DiskNormal(NodeId),
    Restart(NodeId),
    HealAll,
    MembershipChange,
    LivenessProbe,
    /// `FaultMix::isolate_leader`: isolate this node if it still leads.
    IsolateLeader(NodeId),
    /// `FaultMix::pauses`: pause a node.
    Pause,
    /// The pause of this node with this number ends.
    Resume(NodeId, u64),
    /// A message delivered once more, long after it was sent
    /// (`FaultMix::stale_replays`), with the incarnations of its sender
    /// and receiver then.
    Replay(Message, u64, u64),
    /// A snapshot file is written and handed to storage to publish.
    SnapshotStaged(NodeId, u64, Box<Snapshot>),
    Wipe,
    WipeRestart(NodeId),
    WipeCheck,
    /// `LeaseCuts`: slow the leader's clock, speed up the others'.
    LeaseSkew,
    /// `LeaseCuts`: a minority of this leader's followers lose it.
    LeaseIsolate(NodeId),
    /// `LeaseCuts`: cut this node off if it still leads.
    LeaseCut(NodeId),
    /// `LeaseCuts`: this node and the clients cut off from it reach each
    /// other again, and it reaches the other nodes.
    LeaseHeal(NodeId),
    /// `TransferCuts`: ask the leader of the moment for a transfer.
    TransferCutStart,
    /// `TransferCuts`: the leader cut off after its `TimeoutNow` reaches
    /// the other nodes and the writers again.
    TransferCutHeal(NodeId),
    /// `FaultMix::impostors`: the operator stops the impostor with this
    /// number running under this id (if it still runs).
    StopImpostor(NodeId, u64),
    /// `FaultMix::impostors`: set up a stale leader to meet an impostor
    /// (`Sim::plot_start`), and follow it up (`Sim::plot_check`).
    PlotStart,
    PlotCheck,
    /// `FaultMix::region_blips`: the last blip, until the faults heal.
    FinalBlip,
    End,
}

struct Queued {
    at: Nanos,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

enum StorageOp {
    Append(Vec<Entry>),
    Truncate(Position),
    Compact(Position),
    /// Write and publish a snapshot file (`Action::SaveSnapshot`).
    Publish(Snapshot),
}

#[derive(Default)]
struct Disk {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    /// The published snapshot file of `snapshot` (keel-log's format), the
    /// model of `snap-<position>.snap`: chunked installs read it. None for
    /// the boot snapshot at 0.
    snapshot_file: Option<Bytes>,
    log: Vec<Entry>,
    /// Where `log` starts (its end while it is empty).
    log_base: Position,
    /// Created to join (an empty disk, no membership) and not yet caught
    /// up: the model of a data directory without the runtime's `JOINED`
    /// file. A restart then tells the core it is still joining.
    joining: bool,
    /// `power_losses` runs: the log's end at its last sync. Entries past
    /// it were written but not synced, and are lost with the power. As in
    /// the runtime's `replicated` mode, appends count once written (inline
    /// on the consensus thread, or by the storage thread behind a
    /// truncation), a truncation syncs what was written before it, and an
    /// append holding a membership entry counts once synced
    /// (`Sim::write_inline`); a background sync follows each write 5-20 ms
    /// later. A process crash keeps what was written, and the restart
    /// syncs it (`LogStore::open`).
    synced: Position,
    /// Lost power and not caught up since: restarts are amnesic (the
    /// model of the runtime's `AMNESIC` file).
    amnesic: bool,
    /// `Node::settled_config` as last recorded (the runtime's
    /// `SETTLED_CONFIG` file).
    settled_config: Position,
}

impl Disk {
    /// The disk of a node started to join (`join = true`): empty, no
    /// membership, `JOINING` recorded.
    fn joining() -> Disk {
        Disk {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    position: 0,
                    term: 0,
                    timestamp: 0,
                    membership: Membership::default(),
                },
                data: Bytes::new(),
            }),
            joining: true,
            ..Disk::default()
        }
    }

    fn log_end(&self) -> Position {
        self.log.last().map_or(self.log_base, Entry::end)
    }

    /// Appends `e` to node `id`'s log, which it must continue.
    fn append(&mut self, id: NodeId, e: Entry, violations: &mut Vec<String>) {
        let end = self.log_end();
        if e.position != end {
            violations.push(format!(
                "node {id}: storage append at {} but the log ends at {end}",
                e.position
            ));
        }
        self.log.push(e);
    }

    /// Whether what is synced holds the log up to `pos`, whose last entry
    /// is of `term`: a snapshot at or past it, or that entry.
    fn holds(&self, pos: Position, term: Option<Term>) -> bool {
        let snap = self.snapshot.as_ref().map_or(0, |s| s.meta.position);
        pos <= snap.max(self.log_base)
            || self
                .log
                .iter()
                .rev()
                .take_while(|e| e.end() >= pos)
                .any(|e| e.end() == pos && Some(e.term) == term)
    }
}

/// Whether `entries` hold a membership entry (synced before it counts in
/// `replicated` durability, see `Disk::synced`).
fn holds_membership(entries: &[Entry]) -> bool {
    entries
        .iter()
        .any(|e| matches!(e.kind, EntryKind::Membership(_)))
}

/// One report of the service to the core.
enum ServiceReport {
    Applied {
        position: Position,
        timers: Vec<TimerUpdate>,
    },
    /// The state at this applied position, captured for a snapshot.
    Captured(Position, Bytes),
}

struct SimNode {
    id: NodeId,
    core: Option<Node>,
    host: ServiceHost<KvService>,
    incarnation: u64,
    disk: Disk,
    pending: Vec<StorageOp>,
    sync_scheduled: bool,
    /// `power_losses` runs: an `Ev::BackgroundSync` is scheduled.
    background_sync_scheduled: bool,
    /// The last entry the latest `flush_pending` wrote (its end and term),
    /// unless a truncation in the same flush cut it: reported durable even
    /// when a compaction in that flush left the disk's log empty.
    flushed: Option<(Position, Term)>,
    disk_latency: (Nanos, Nanos),
    clock: Clock,
    /// Client writes waiting for their entry to apply: (client, seq) → req.
    writes: HashMap<(u64, u64), (u64, u64)>,
    /// Read requests: id → (client, data, the longest committed prefix
    /// when the core got it, which the read must reflect); and reads
    /// confirmed at an index.
    reads: HashMap<u64, (u64, Bytes, Position)>,
    ready_reads: Vec<(u64, Position)>,
    last_snapshot: Position,
    /// The service state captured for the snapshot the core is being told
    /// of (`Event::SnapshotTaken`), while it saves or ignores it.
    captured: Option<(Position, Bytes)>,
    /// What the service applied and captured that the core has not heard
    /// yet, in order: as the runtime's service thread, the service applies
    /// each `Action::Apply` at once (replies go out, reads are served) but
    /// its reports reach the core late, several at a time, so the core
    /// goes on committing (and hands out more entries) meanwhile.
    reports: VecDeque<ServiceReport>,
    /// An `Ev::ServiceReports` is scheduled.
    reports_scheduled: bool,
    /// When the last snapshot file handed to storage got there (files are
    /// written one at a time, in order).
    staged_until: Nanos,
    /// The node learned it was removed (`Action::Removed`): it stops at
    /// the end of the step and stays down (as `keel server` exits and
    /// refuses its data directory) for good: its machine may join again,
    /// with an empty disk, under a new id (`replaced_by`).
    removed: bool,
    /// The id this removed node's machine joined again under
    /// (`Sim::rejoin_fresh`): this slot's id is retired for good.
    replaced_by: Option<NodeId>,
    /// This slot runs an impostor (`Sim::start_impostor`): a node an
    /// operator started under the removed id, never to be added. Its
    /// number, for the operator's stop.
    impostor: Option<u64>,
    /// The disks of the earlier nodes of this slot's id that impostors
    /// replaced (the removed node's first), as they were when those nodes
    /// stopped: what they acknowledged is still on them, and a stale
    /// leader may count those acknowledgements after an impostor started
    /// (`check_commit_durable`).
    earlier_disks: Vec<Disk>,
    /// The disk as it was each time this node lost power since it was
    /// last not amnesic: what it acknowledged before counts as held until
    /// then (`check_commit_durable`), since its votes elect no one without
    /// it (`Node::set_amnesic`).
    before_power_loss: Vec<Disk>,
}

impl SimNode {
    /// Machine `id`, not started (no core), on `disk`.
    fn new(
        id: NodeId,
        cfg: &SimConfig,
        disk: Disk,
        disk_latency: (Nanos, Nanos),
        clock: Clock,
    ) -> Self {
        SimNode {
            id,
            core: None,
            host: ServiceHost::new(service_of(id, cfg), 60 * SEC),
            incarnation: 0,
            disk,
            pending: Vec::new(),
            sync_scheduled: false,
            background_sync_scheduled: false,
            flushed: None,
            disk_latency,
            clock,
            writes: HashMap::new(),
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            last_snapshot: 0,
            captured: None,
            reports: VecDeque::new(),
            reports_scheduled: false,
            staged_until: 0,
            removed: false,
            replaced_by: None,
            impostor: None,
            earlier_disks: Vec::new(),
            before_power_loss: Vec::new(),
        }
    }
}

/// A stale leader set up to meet an impostor (`Sim::plot_start`).
struct Plot {
    /// The leader, paused and cut off from every other node.
    stale: NodeId,
    /// Its pause's number.
    pause: u64,
    /// The voter of its configuration the cluster is steered to remove,
    /// under whose id an impostor starts once its node has stopped.
    victim: NodeId,
    /// When the plot gives up (the removal has not stopped the victim).
    give_up_at: Nanos,
    /// Once the impostor runs: the stale leader reaches it (and only it)
    /// until then, and is resumed.
    met_until: Option<Nanos>,
}

/// A node's clock: `at` when true time was `since`, running `ppm` parts
/// per million fast (or slow, when negative) since then.
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    since: Nanos,
    at: i64,
    ppm: i64,
}

impl Clock {
    fn read(&self, now: Nanos) -> Nanos {
        let elapsed = i128::from(now.saturating_sub(self.since));
        let local = i128::from(self.at) + elapsed * (1_000_000 + i128::from(self.ppm)) / 1_000_000;
        local.clamp(0, i128::from(u64::MAX)) as Nanos
    }

    /// From `now` on, run at `ppm` (continuing from the current reading).
    fn set_rate(&mut self, now: Nanos, ppm: i64) {
        self.at = self.read(now) as i64;
        self.since = now;
        self.ppm = ppm;
    }

    /// Steps the clock by `by` nanoseconds at `now`.
    fn jump(&mut self, now: Nanos, by: i64) {
        self.at = self.read(now) as i64 + by;
        self.since = now;
    }
}

struct ClientOp {
    input: KvInput,
    hist: usize,
    seq: Option<u64>,
    req: u64,
}

struct Client {
    id: u64,
    next_seq: u64,
    target: NodeId,
    op: Option<ClientOp>,
    wake_token: u64,
    /// Only reads, in a loop, and stays with its node until the node
    /// refuses it (a client given one node's address): it retries there
    /// after a time-out rather than trying another node
    /// (`FaultMix::isolate_leader`, `SimConfig::transfer_cuts`). Its random
    /// draws come from `Sim::aux`.
    pinned: bool,
}

pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    /// A second random stream, for the service's report delays, the
    /// pinned reader, leader isolations and late copies: so adding them
    /// left the main stream's draws where they were.
    aux: Rng,
    /// Links whose messages are delivered a second time, late
    /// (`FaultMix::late_copies`): (from, to) → (until, delay).
    late_copies: HashMap<(NodeId, NodeId), (Nanos, Nanos)>,
    /// `FaultMix::isolate_leader`: the nodes cut off (the leader and up to
    /// a minority of its voters) until when, and how late what the others
    /// send them arrives (`None`: it is cut too).
    isolated: Option<(BTreeSet<NodeId>, Nanos, Option<Nanos>)>,
    /// A leader to isolate after its next check-quorum.
    isolate_armed: Option<NodeId>,
    /// Each leader's next check-quorum on its own clock, as the core
    /// schedules it (`isolate_leader`).
    quorum_check_at: HashMap<NodeId, Nanos>,
    now: Nanos,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    /// Node `id` is `nodes[id - 1]`: ids are given out in order, and a
    /// removed node's machine that joins again gets a new slot under the
    /// next unused id (`rejoin_fresh`), its old slot kept, stopped for good.
    nodes: Vec<SimNode>,
    /// The ids of the machines: what clients, faults and pauses pick from.
    /// A machine that joins again under a new id takes the old id's place
    /// (which is never picked again).
    all_ids: Vec<NodeId>,
    /// Every id the harness asked a leader to remove: never proposed for
    /// addition again, whether or not the removal committed.
    removal_asked: BTreeSet<NodeId>,
    /// The new ids removed nodes' machines joined again under, and when.
    rejoined_ids: Vec<(NodeId, Nanos)>,
    link_latency: HashMap<(NodeId, NodeId), Nanos>,
    blocked: HashSet<(NodeId, NodeId)>,
    /// (client, node) pairs that cannot reach each other: the client's
    /// attempts there fail at once.
    unreachable: HashSet<(u64, NodeId)>,
    /// The node `lease_cuts` has cut off from every other node, and when,
    /// until it is healed.
    cut_off: Option<(NodeId, Nanos)>,
    /// `lease_cuts`, before the cut: the leader, and the followers that
    /// cannot reach it (or it them).
    cut_early: Option<(NodeId, Vec<NodeId>)>,
    /// `transfer_cuts`: the transfer under way, until its leader is
    /// healed.
    transfer_cut: Option<TransferCut>,
    /// `transfer_cuts`: the reads that reached a cut-off leader after its
    /// transfer ran out, not yet answered or refused.
    reads_after_ran_out: HashSet<u64>,
    /// When (true time) each node last received an append or snapshot
    /// chunk from each other node, and the hold (minimum election timeout)
    /// it ran with then: (to, from) → (time, hold).
    leader_heard: HashMap<(NodeId, NodeId), (Nanos, Nanos)>,
    /// The latest leadership transfer asked for: its target, and the term
    /// of the leader asked.
    transfer_asked: Option<(NodeId, u64)>,
    /// Every `TimeoutNow` this leader (and term) sends arrives only late.
    late_timeout_now: Option<(NodeId, u64)>,
    loss: f64,
    duplicate: f64,
    reorder: f64,
    clients: Vec<Client>,
    history: Vec<Operation>,
    next_req: u64,
    next_value: u64,
    faults_active: bool,
    healed_at: Option<Nanos>,
    probe: Option<(usize, Nanos)>,
    probe_done: bool,
    inv: Invariants,
    report: Report,
    scratch: Vec<Action>,
    trace: bool,
    /// Every `Removed` notice sent: (from, to, position).
    notices_sent: HashSet<(NodeId, NodeId, Position)>,
    /// Removal notices sent (from, to, position) and acted on in the step
    /// being run: checked against the
    /// committed log once the step's commit is known to the invariants.
    removal_checks: Vec<RemovalCheck>,
    /// (voter, candidate, end, term): a (pre-)vote answer said the entry
    /// ending at `end` in `term` is committed; checked after the step
    /// (the voter's own commit is noted then).
    commit_claims: Vec<(NodeId, NodeId, Position, Term)>,
    /// The node whose core is taking a step (named if it panics).
    stepping: Option<NodeId>,
    /// `FaultMix::pauses`: each paused node's pause number and the events
    /// that reached it meanwhile, in order. (Ordered: healing resumes them
    /// in id order, so a seed replays exactly.)
    paused: BTreeMap<NodeId, (u64, Vec<Ev>)>,
    pause_seq: u64,
    /// The random stream of `FaultMix::stale_replays`.
    replay_rng: Rng,
    /// The random stream of `FaultMix::impostors`.
    impostor_rng: Rng,
    /// The stale leader being set up to meet an impostor, if any.
    plot: Option<Plot>,
    /// Impostors started so far (their numbers).
    impostor_seq: u64,
    /// `FaultMix::region_blips` delaying links: (from, to) → (until, how
    /// late what crosses arrives).
    slow_links: HashMap<(NodeId, NodeId), (Nanos, Nanos)>,
    /// Each node's latest election started by a `TimeoutNow` (a
    /// leadership transfer): its term. A leader elected so keeps
    /// leadership for its term whatever the preferred set says.
    /// With the `TimeoutNow`'s sender and the term it led.
    by_transfer: HashMap<NodeId, (Term, NodeId, Term)>,
    /// The transfers the harness asked (an operator's), and the
    /// preference transfers leaders started: (leader, term).
    operator_transfers: HashSet<(NodeId, Term)>,
    preference_moves: HashSet<(NodeId, Term)>,
    /// The first time after the heal a preferred voter led the newest
    /// term (`SimConfig::preferred_leaders`).
    preferred_led_at: Option<Nanos>,
    /// The leader of the newest term when the faults healed.
    leader_at_heal: Option<NodeId>,
    /// After the heal, the term of the leader that last started a
    /// preference transfer, until the next leader is elected.
    preference_move: Option<Term>,
    /// The core's back-off after failed hand-overs, followed from outside
    /// (`Sim::settle_handover`): each node's latest preference transfer
    /// (its term, its target once a `TimeoutNow` names it, and whether it
    /// started before the heal) until the node knows a leader of a later
    /// term; and its failures in a row, and until when (true time) its
    /// next hand-over waits, and whether that wait comes of a hand-over
    /// started under faults.
    handovers: HashMap<NodeId, (Term, Option<NodeId>, bool, Nanos)>,
    backoff: HashMap<NodeId, (u32, Nanos)>,
    /// The latest end of a wait that hand-overs started under faults
    /// caused (true time; it stays when the wait is over).
    excused_until: Nanos,
    /// The run does not end before this (`Ev::End` waits for it): long
    /// enough after the heal to judge the preferred-leader check.
    end_not_before: Nanos,
}

/// A scripted transfer of `SimConfig::transfer_cuts`.
struct TransferCut {
    leader: NodeId,
    term: Term,
    target: NodeId,
    /// When (true time) the leader sent `TimeoutNow` and was cut off.
    cut_at: Option<Nanos>,
    /// When its transfer ran out, with it still leading `term`.
    ran_out_at: Option<Nanos>,
}

enum RemovalCheck {
    Sent(NodeId, NodeId, Position),
    /// (node, by, position, whether such a notice was sent)
    Acted(NodeId, NodeId, Position, bool),
}

const PROBE_CLIENT: u64 = 999;
/// The longest a run goes on after the heal for the preferred-leader check
/// (the core's back-off after failed hand-overs reaches 64 holds).
const PREFERRED_END_CAP: Nanos = 40 * SEC;
const CLIENT_TIMEOUT: Nanos = 300 * MS;
/// The pinned reader's time-out: short, so a lost request or answer does
/// not keep it away from its node for long.
const PINNED_READ_TIMEOUT: Nanos = 50 * MS;
const TICK: Nanos = 5 * MS;

/// Whether a run has a client that reads in a loop from one node (see
/// `Client::pinned`): for leaders the `isolate_leader` nemesis or
/// `transfer_cuts` cut off.
fn has_pinned_reader(cfg: &SimConfig) -> bool {
    cfg.mix.isolate_leader || cfg.transfer_cuts.is_some()
}

/// A fresh service for node `id` (see `SimConfig::stale_binary`).
fn service_of(id: NodeId, sim: &SimConfig) -> KvService {
    let mut s = KvService::default();
    s.ignores_term_starts = sim.stale_binary && id == 1;
    s
}

fn core_config(id: NodeId, sim: &SimConfig, incarnation: u64) -> Config {
    let seed = sim.seed ^ incarnation;
    let mut c = Config::new(id, 0x6b65_656c);
    c.lease_reads = sim.lease_reads;
    c.clock_drift_ppm = sim.assumed_drift_ppm;
    let bugs = sim.bugs;
    c.heartbeat_interval = 20 * MS;
    (c.election_timeout_min, c.election_timeout_max) = sim.election_timeout_of(id, incarnation);
    c.max_batch_bytes = 4 * 1024;
    c.max_inflight_bytes = 32 * 1024;
    // Small chunks so snapshot installs take several messages.
    c.snapshot_chunk_bytes = 128;
    // Installs check the received file as the real runtime does.
    c.snapshot_check = keel_log::meta::check_snapshot_image;
    // Most runs drop applied entries' data from memory, some at once, so
    // lagging followers are sent entries read back from the disk model.
    c.log_cache_bytes = match seed % 3 {
        0 => u64::MAX,
        1 => 0,
        _ => 8 * 1024,
    };
    c.seed = seed ^ id.wrapping_mul(0x9E37_79B9);
    c.testing_bugs = bugs;
    if !sim.core_ignores_preference {
        c.preferred_leaders = sim.preferred_leaders.clone();
        c.preferred_leader_hold = sim.preferred_leader_hold;
    }
    c
}

/// A clock rate error within ±`bound` parts per million: most often at
/// one end or the other (a slow leader with fast voters is the pairing a
/// lease must survive), otherwise anywhere in between.
fn clock_rate(rng: &mut Rng, bound: u64) -> i64 {
    if bound == 0 {
        return 0;
    }
    let bound = bound as i64;
    match rng.range(0, 5) {
        0 | 1 => -bound,
        2 | 3 => bound,
        _ => rng.range(0, 2 * bound as u64 + 1) as i64 - bound,
    }
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = Rng::new(cfg.seed);
        let total = if cfg.mix.membership {
            cfg.nodes + 2
        } else {
            cfg.nodes
        };
        let all_ids: Vec<NodeId> = (1..=total as u64).collect();
        let initial = Membership::new(1..=cfg.nodes as u64);
        let mut link_latency = HashMap::new();
        for &a in &all_ids {
            for &b in &all_ids {
                link_latency.insert((a, b), rng.range(200_000, 3 * MS));
            }
        }
        let mut nodes = Vec::new();
        for &id in &all_ids {
            let membership = if initial.contains(id) {
                initial.clone()
            } else {
                Membership::default()
            };
            let boot = Snapshot {
                meta: SnapshotMeta {
                    position: 0,
                    term: 0,
                    timestamp: 0,
                    membership: membership.clone(),
                },
                data: Bytes::new(),
            };
            let disk = Disk {
                snapshot: Some(boot),
                // A node created to join records it at its first start
                // (the runtime's `JOINING`).
                joining: !initial.contains(id),
                ..Disk::default()
            };
            let clock = Clock {
                ppm: clock_rate(&mut rng, cfg.clock_drift_ppm),
                ..Clock::default()
            };
            let mut node = SimNode::new(id, &cfg, disk, (100_000, 2 * MS), clock);
            node.core = Some(Node::new(core_config(id, &cfg, 0), membership, 0));
            nodes.push(node);
        }
        let clients = (0..cfg.clients as u64)
            .map(|i| Client {
                id: 100 + i,
                next_seq: 1,
                target: 1,
                op: None,
                wake_token: 0,
                pinned: false,
            })
            .chain(has_pinned_reader(&cfg).then_some(Client {
                id: 100 + cfg.clients as u64,
                next_seq: 1,
                target: 1,
                op: None,
                wake_token: 0,
                pinned: true,
            }))
            .chain(std::iter::once(Client {
                id: PROBE_CLIENT,
                next_seq: 1,
                target: 1,
                op: None,
                wake_token: 0,
                pinned: false,
            }))
            .collect();
        let mix = cfg.mix.clone();
        let mut sim = Sim {
            report: Report {
                seed: cfg.seed,
                ..Report::default()
            },
            rng,
            aux: Rng::new(cfg.seed ^ 0x6175_785f_726e_6721),
            late_copies: HashMap::new(),
            isolated: None,
            isolate_armed: None,
            quorum_check_at: HashMap::new(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            all_ids,
            removal_asked: BTreeSet::new(),
            rejoined_ids: Vec::new(),
            link_latency,
            blocked: HashSet::new(),
            unreachable: HashSet::new(),
            cut_off: None,
            cut_early: None,
            transfer_cut: None,
            reads_after_ran_out: HashSet::new(),
            leader_heard: HashMap::new(),
            transfer_asked: None,
            late_timeout_now: None,
            loss: mix.loss,
            duplicate: mix.duplicate,
            reorder: mix.reorder,
            clients,
            history: Vec::new(),
            next_req: 1,
            next_value: 1,
            faults_active: true,
            healed_at: None,
            probe: None,
            probe_done: false,
            inv: Invariants::new(),
            scratch: Vec::new(),
            trace: std::env::var_os("KEEL_SIM_TRACE").is_some(),
            notices_sent: HashSet::new(),
            removal_checks: Vec::new(),
            commit_claims: Vec::new(),
            stepping: None,
            paused: BTreeMap::new(),
            pause_seq: 0,
            replay_rng: Rng::new(cfg.seed ^ 0x7265_706c_6179_7321),
            impostor_rng: Rng::new(cfg.seed ^ 0x696d_706f_7374_6f72),
            plot: None,
            impostor_seq: 0,
            slow_links: HashMap::new(),
            by_transfer: HashMap::new(),
            operator_transfers: HashSet::new(),
            preference_moves: HashSet::new(),
            preferred_led_at: None,
            leader_at_heal: None,
            preference_move: None,
            handovers: HashMap::new(),
            backoff: HashMap::new(),
            excused_until: 0,
            end_not_before: 0,
            cfg,
        };
        sim.inv.set_initial_membership(initial);
        for i in 0..sim.nodes.len() {
            let id = sim.nodes[i].id;
            let jitter = sim.rng.range(0, TICK);
            sim.schedule(jitter, Ev::Tick(id, 0));
        }
        for c in 0..sim.cfg.clients {
            let t = sim.rng.range(0, 50 * MS);
            sim.schedule(t, Ev::ClientWake(100 + c as u64, 0));
        }
        if has_pinned_reader(&sim.cfg) {
            let t = sim.aux.range(0, 50 * MS);
            sim.schedule(t, Ev::ClientWake(100 + sim.cfg.clients as u64, 0));
        }
        if !sim.cfg.mix.nemesis_kinds().is_empty() {
            let t = sim.rng.range(100 * MS, 600 * MS);
            sim.schedule(t, Ev::Nemesis);
        }
        if sim.cfg.mix.membership {
            sim.schedule(500 * MS, Ev::MembershipChange);
        }
        if sim.cfg.mix.pauses {
            let t = sim.aux.range(300 * MS, 1_500 * MS);
            sim.schedule(t, Ev::Pause);
        }
        if sim.cfg.mix.impostors && sim.impostor_rng.chance(0.5) {
            let t = sim.impostor_rng.range(700 * MS, 2 * SEC);
            sim.schedule(t, Ev::PlotStart);
        }
        if let Some(w) = sim.cfg.wipe.clone() {
            sim.schedule(w.at, Ev::Wipe);
            sim.schedule(w.restart_at.saturating_add(w.catch_up_bound), Ev::WipeCheck);
        }
        if let Some(c) = sim.cfg.lease_cuts {
            assert!(
                c.skew_before + c.cut_for <= c.every,
                "lease cuts must not overlap: {c:?}"
            );
            sim.schedule(c.first, Ev::LeaseSkew);
        }
        if let Some(c) = sim.cfg.transfer_cuts {
            assert!(
                c.lag.1 < c.every && c.cut_for < c.every,
                "transfer cuts must not overlap: {c:?}"
            );
            sim.schedule(c.first, Ev::TransferCutStart);
        }
        let heal = sim.cfg.fault_time;
        if sim.cfg.mix.region_blips {
            let t = heal.saturating_sub(sim.rng.range(1_500 * MS, 3 * SEC));
            sim.schedule(t, Ev::FinalBlip);
        }
        sim.schedule(heal, Ev::HealAll);
        sim
    }

    fn schedule(&mut self, delay: Nanos, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + delay,
            seq: self.seq,
            ev,
        }));
    }

    fn idx(&self, id: NodeId) -> usize {
        (id - 1) as usize
    }

    fn local_now(&self, i: usize) -> Nanos {
        self.nodes[i].clock.read(self.now)
    }

    /// Runs to the end (or to the first safety violation, with
    /// `stop_at_first_violation`) and returns the report. A panic, in the
    /// core or here, ends the run as a failure: the report keeps what was
    /// found before it and names the panic (`Report::panicked`).
    pub fn run(mut self) -> Report {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_events()));
        match run {
            Ok(()) => self.finish(),
            Err(payload) => self.finish_after_panic(payload.as_ref()),
        }
    }

    fn run_events(&mut self) {
        while let Some(Reverse(q)) = self.queue.pop() {
            self.now = q.at;
            if matches!(q.ev, Ev::End) {
                if self.now < self.end_not_before {
                    let wait = self.end_not_before - self.now;
                    self.schedule(wait, Ev::End);
                    continue;
                }
                break;
            }
            self.handle(q.ev);
            if self.report.violations.len() > 20 || self.halted() {
                break;
            }
        }
    }

    /// Whether the run ends here: `stop_at_first_violation` is set and a
    /// safety violation has been found (noted in `Report::stopped_at`).
    fn halted(&mut self) -> bool {
        if self.report.stopped_at.is_some() {
            return true;
        }
        if self.cfg.stop_at_first_violation && self.report.violations.iter().any(|v| is_safety(v)) {
            self.report.stopped_at = Some(self.now);
            return true;
        }
        false
    }

    /// The report of a run that panicked: the violations found before,
    /// then the panic. (No end-of-run check: the state may be half
    /// updated.)
    fn finish_after_panic(mut self, payload: &(dyn std::any::Any + Send)) -> Report {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(a panic with no message)".into());
        let node = self
            .stepping
            .map_or(String::new(), |id| format!(" stepping node {id}"));
        let what = format!("at {:.3} ms{node}: {msg}", self.now as f64 / 1e6);
        self.report
            .violations
            .push(format!("panic: the run panicked {what}"));
        self.report.panicked = Some(what);
        self.report.sim_time = self.now;
        self.report
    }

    fn handle(&mut self, ev: Ev) {
        // What reaches a paused node waits for it.
        let to = match &ev {
            Ev::Peer(m) => Some(m.to),
            Ev::Request { node, .. } => Some(*node),
            Ev::Tick(id, _)
            | Ev::DiskSync(id, _)
            | Ev::ServiceReports(id, _)
            | Ev::SnapshotStaged(id, ..) => Some(*id),
            _ => None,
        };
        if let Some((_, backlog)) = to.and_then(|id| self.paused.get_mut(&id)) {
            backlog.push(ev);
            return;
        }
        match ev {
            Ev::Peer(m) => {
                let i = self.idx(m.to);
                self.heard(&m);
                let to_voter = matches!(
                    m.body,
                    Body::Append { to_voter: true, .. }
                        | Body::InstallSnapshot { to_voter: true, .. }
                );
                if to_voter && self.nodes[i].impostor.is_some() && self.nodes[i].core.is_some() {
                    self.report.voter_appends_at_impostors += 1;
                }
                if let Body::InstallSnapshot { meta, .. } = &m.body {
                    let commit = self.nodes[i].core.as_ref().map(Node::commit_position);
                    if commit.is_some_and(|c| c > meta.position) {
                        self.report.snapshot_chunks_below_commit += 1;
                    }
                }
                let term_before = matches!(m.body, Body::TimeoutNow { .. })
                    .then(|| self.nodes[i].core.as_ref().map(Node::term))
                    .flatten();
                let sender = (m.from, m.term);
                self.step_node(i, Event::Message(m));
                // A node that stands (or wins) on a `TimeoutNow` was
                // elected through a transfer.
                if let (Some(before), Some(core)) = (term_before, self.nodes[i].core.as_ref()) {
                    if core.term() > before && matches!(core.role(), Role::Candidate | Role::Leader)
                    {
                        self.by_transfer
                            .insert(core.id(), (core.term(), sender.0, sender.1));
                    }
                }
            }
            Ev::Request {
                node,
                client,
                req,
                kind,
            } => self.on_request(node, client, req, kind),
            Ev::Response { client, req, resp } => self.on_response(client, req, resp),
            Ev::Tick(id, inc) => {
                let i = self.idx(id);
                if self.nodes[i].incarnation == inc && self.nodes[i].core.is_some() {
                    // The core checks its quorum at the first tick at or
                    // after its deadline, and sets the next one from there.
                    let local = self.local_now(i);
                    let check = self.quorum_check_at.get(&id).is_some_and(|&at| local >= at);
                    self.step_node(i, Event::Tick);
                    let leads = self.nodes[i].core.as_ref().is_some_and(Node::is_leader);
                    if check && leads {
                        let min = self.cfg.election_timeout_of(id, inc).0;
                        self.quorum_check_at.insert(id, local + min);
                        if self.isolate_armed == Some(id) {
                            self.isolate_armed = None;
                            let d = self.aux.range(25 * MS, 45 * MS);
                            self.schedule(d, Ev::IsolateLeader(id));
                        }
                    }
                    let t = TICK + self.rng.range(0, MS);
                    self.schedule(t, Ev::Tick(id, inc));
                }
            }
            Ev::DiskSync(id, inc) => self.disk_sync(id, inc),
            Ev::ServiceReports(id, inc) => self.deliver_reports(id, inc),
            Ev::ClientWake(c, token) => self.client_wake(c, token),
            Ev::Nemesis => self.nemesis(),
            Ev::LateTimeoutNow(m) => {
                if self.faults_active {
                    // Half the time the leader that sent it hears nothing
                    // for a while: should the target campaign, it would
                    // learn of the election late.
                    if self.rng.chance(0.5) {
                        self.deafen(m.from);
                    }
                    self.schedule(0, Ev::Peer(m));
                }
            }
            Ev::HealLinks(links) => {
                for l in links {
                    self.blocked.remove(&l);
                }
            }
            Ev::DiskNormal(id) => {
                let i = self.idx(id);
                self.nodes[i].disk_latency = (100_000, 2 * MS);
            }
            Ev::Restart(id) => self.restart(id),
            Ev::BackgroundSync(id, inc) => {
                let i = self.idx(id);
                let node = &mut self.nodes[i];
                if node.incarnation == inc && node.core.is_some() {
                    node.background_sync_scheduled = false;
                    node.disk.synced = node.disk.log_end();
                }
            }
            Ev::HealAll => self.heal_all(),
            Ev::MembershipChange => self.membership_change(),
            Ev::LivenessProbe => self.liveness_probe(),
            Ev::IsolateLeader(id) => self.isolate_leader(id),
            Ev::Pause => self.pause(),
            Ev::Resume(id, n) => self.resume(id, n),
            Ev::Replay(m, from_inc, to_inc) => {
                // Only into the same connection: a restart of either end
                // (a new process, new connections) drops what was in
                // flight.
                let same = self.nodes[self.idx(m.from)].incarnation == from_inc
                    && self.nodes[self.idx(m.to)].incarnation == to_inc;
                if !same {
                    return;
                }
                self.report.stale_replays += 1;
                let to = &self.nodes[self.idx(m.to)];
                if to.core.as_ref().is_some_and(|c| c.term() > m.term) {
                    self.report.replays_of_older_terms += 1;
                }
                self.handle(Ev::Peer(m));
            }
            Ev::SnapshotStaged(id, inc, s) => {
                let i = self.idx(id);
                if self.nodes[i].incarnation == inc && self.nodes[i].core.is_some() {
                    let upto = s.meta.position;
                    self.nodes[i].pending.push(StorageOp::Publish(*s));
                    self.nodes[i].pending.push(StorageOp::Compact(upto));
                    self.schedule_sync(i);
                }
            }
            Ev::Wipe => self.wipe(),
            Ev::WipeRestart(id) => self.wipe_restart(id),
            Ev::WipeCheck => self.wipe_check(),
            Ev::LeaseSkew => self.lease_skew(),
            Ev::LeaseIsolate(id) => self.lease_isolate(id),
            Ev::LeaseCut(id) => self.lease_cut(id),
            Ev::TransferCutStart => self.transfer_cut_start(),
            Ev::TransferCutHeal(id) => {
                self.unreachable.retain(|&(_, n)| n != id);
                if self.transfer_cut.as_ref().is_some_and(|t| t.leader == id) {
                    self.transfer_cut = None;
                }
            }
            Ev::StopImpostor(id, n) => self.stop_impostor(id, n),
            Ev::PlotStart => self.plot_start(),
            Ev::PlotCheck => self.plot_check(),
            Ev::FinalBlip => {
                if self.faults_active {
                    let region = self.rng.chance(0.7);
                    let dur = self.cfg.fault_time.saturating_sub(self.now);
                    self.region_blip(region, dur);
                }
            }
            Ev::LeaseHeal(id) => {
                self.unreachable.retain(|&(_, n)| n != id);
                if self.cut_off.is_some_and(|(n, _)| n == id) {
                    self.cut_off = None;
                }
                if self.cut_early.as_ref().is_some_and(|(n, _)| *n == id) {
                    self.cut_early = None;
                }
            }
            Ev::End => {}
        }
    }

    // ----- network -----------------------------------------------------

    fn net_delay(&mut self, from: u64, to: u64) -> Option<Nanos> {
        let base = *self.link_latency.get(&(from, to)).unwrap_or(&MS);
        if self.rng.chance(self.loss) {
            return None;
        }
        let mut d = base + self.rng.range(0, base / 2 + 1);
        if self.rng.chance(self.reorder) {
            d += self.rng.range(0, 30 * MS);
        }
        Some(d)
    }

    fn send_peer(&mut self, m: Message) {
        // `transfer_cuts`: the leader is cut off once its `TimeoutNow` is
        // on its way to the target.
        let cut_after = self.faults_active
            && matches!(m.body, Body::TimeoutNow { .. })
            && !self.blocked.contains(&(m.from, m.to))
            && self.transfer_cut.as_ref().is_some_and(|t| {
                t.cut_at.is_none() && (t.leader, t.target, t.term) == (m.from, m.to, m.term)
            });
        self.route_peer(m);
        if cut_after {
            self.transfer_cut_now();
        }
    }

    fn route_peer(&mut self, m: Message) {
        self.report.messages += 1;
        if matches!(m.body, keel_core::Body::InstallSnapshot { .. }) {
            self.report.snapshot_chunks += 1;
        }
        let cut = self.cut_off.is_some_and(|(n, _)| m.from == n || m.to == n)
            || self
                .transfer_cut
                .as_ref()
                .is_some_and(|t| t.cut_at.is_some() && (m.from == t.leader || m.to == t.leader))
            || self.cut_early.as_ref().is_some_and(|(l, early)| {
                (m.from == *l && early.contains(&m.to)) || (m.to == *l && early.contains(&m.from))
            });
        if cut || self.plot_cuts(&m) || self.blocked.contains(&(m.from, m.to)) {
            return;
        }
        let mut late = 0;
        if let Some((side, until, slow)) = &self.isolated {
            if self.now < *until && side.contains(&m.from) != side.contains(&m.to) {
                match slow {
                    Some(extra) if side.contains(&m.to) => late = *extra,
                    _ => return,
                }
            }
        }
        if let Some(&(until, extra)) = self.slow_links.get(&(m.from, m.to)) {
            if self.now < until {
                late += extra;
            }
        }
        let timeout_now = matches!(m.body, keel_core::Body::TimeoutNow { .. });
        if timeout_now {
            if let Some(h) = self.handovers.get_mut(&m.from) {
                if h.0 == m.term && h.1.is_none() {
                    h.1 = Some(m.to);
                }
            }
        }
        if timeout_now && self.faults_active && self.late_timeout_now == Some((m.from, m.term)) {
            let late = self.rng.range(200 * MS, 1_500 * MS);
            self.schedule(late, Ev::LateTimeoutNow(m));
            return;
        }
        let copies = if self.rng.chance(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if let Some(d) = self.net_delay(m.from, m.to) {
                self.schedule(d + late, Ev::Peer(m.clone()));
            }
        }
        if self.faults_active
            && self.cfg.mix.stale_replays > 0.0
            && self.replay_rng.chance(self.cfg.mix.stale_replays)
        {
            let d = self.replay_rng.range(500 * MS, 3 * SEC);
            let incs = (
                self.nodes[self.idx(m.from)].incarnation,
                self.nodes[self.idx(m.to)].incarnation,
            );
            self.schedule(d + late, Ev::Replay(m.clone(), incs.0, incs.1));
        }
        if let Some(&(until, delay)) = self.late_copies.get(&(m.from, m.to)) {
            if self.now < until && self.faults_active {
                self.report.late_copies += 1;
                self.schedule(delay, Ev::Peer(m.clone()));
            }
        }
        if !(self.cfg.mix.transfers && self.faults_active && timeout_now) {
            return;
        }
        // Sometimes the leader then hears nothing for a while (it can still
        // send): it learns of the target's election late, and must not
        // answer reads from a lease meanwhile.
        if self.rng.chance(0.3) {
            self.deafen(m.from);
        }
        if self.rng.chance(0.5) {
            let late = self.rng.range(200 * MS, 1_500 * MS);
            self.schedule(late, Ev::LateTimeoutNow(m));
        }
    }

    /// Whether a stale leader set up to meet an impostor (`Sim::plot`) is
    /// cut off from the other end of `m`: from every other node, until
    /// the impostor runs, and then from every node but the impostor.
    fn plot_cuts(&self, m: &Message) -> bool {
        let Some(p) = &self.plot else {
            return false;
        };
        let other = if m.from == p.stale {
            m.to
        } else if m.to == p.stale {
            m.from
        } else {
            return false;
        };
        !(p.met_until.is_some() && other == p.victim)
    }

    /// For 100-400 ms no message reaches `node` from another node.
    fn deafen(&mut self, node: NodeId) {
        let links = self
            .all_ids
            .iter()
            .filter(|&&n| n != node)
            .map(|&n| (n, node))
            .collect();
        let dur = self.rng.range(100 * MS, 400 * MS);
        self.block(links, dur);
    }

    fn client_link_delay(&mut self) -> Option<Nanos> {
        if self.rng.chance(self.loss) {
            return None;
        }
        Some(self.rng.range(100_000, 2 * MS))
    }

    fn respond(&mut self, client: u64, req: u64, resp: Resp) {
        if let Some(d) = self.client_link_delay() {
            self.schedule(d, Ev::Response { client, req, resp });
        }
    }

    // ----- nodes -------------------------------------------------------

    fn step_node(&mut self, i: usize, ev: Event) {
        self.inv.now = self.now;
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            // With `stop_at_first_violation`, a core that broke safety
            // takes no further step.
            if self.halted() {
                return;
            }
            let now = self.local_now(i);
            let mut out = std::mem::take(&mut self.scratch);
            let id = self.nodes[i].id;
            let transferring = self.nodes[i]
                .core
                .as_ref()
                .is_some_and(Node::is_transferring);
            let (lease_reads, led_from, moved) = match self.nodes[i].core.as_mut() {
                Some(core) => {
                    let before = core.stats();
                    // A leader's commit position and term before the step
                    // (one that advances in that term is checked against
                    // the disks after it; one that moved to a later term
                    // learned its commit from that term's leader as a
                    // follower, and that leader's advance was checked).
                    let led_from = core
                        .is_leader()
                        .then(|| (core.commit_position(), core.term()));
                    self.stepping = Some(id);
                    core.step(now, ev, &mut out);
                    self.stepping = None;
                    let after = core.stats();
                    (
                        (after.lease_reads > before.lease_reads).then(|| core.term()),
                        led_from,
                        (after.preference_transfers > before.preference_transfers)
                            .then(|| core.term()),
                    )
                }
                None => return,
            };
            if let Some(term) = moved {
                self.preference_moves.insert((id, term));
                let under_faults = self.healed_at.is_none();
                let started = self.local_now(i);
                self.handovers
                    .insert(id, (term, None, under_faults, started));
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: preference transfer in term {term}",
                        self.now as f64 / 1e6
                    );
                }
            }
            if let (Some(term), Some(_)) = (moved, self.healed_at) {
                // Followed up in `observe_preferred`.
                self.report.preference_transfers_after_heal += 1;
                self.preference_move = Some(term);
            }
            if let Some(term) = lease_reads {
                let id = self.nodes[i].id;
                self.inv.lease_read(id, term, &mut self.report.violations);
            }
            for a in out.drain(..) {
                self.exec(i, a, &mut queue);
            }
            self.scratch = out;
            if transferring {
                self.observe_transfer_cut(i);
            }
            // The runtime writes `JOINED` once the core has caught up.
            if self.nodes[i].disk.joining
                && self.nodes[i].core.as_ref().is_some_and(|c| !c.joining())
            {
                self.nodes[i].disk.joining = false;
                if self.nodes[i].impostor.is_some() {
                    self.report.impostors_joined += 1;
                }
            }
            let node = &mut self.nodes[i];
            if let Some(core) = node.core.as_ref() {
                node.disk.settled_config = node.disk.settled_config.max(core.settled_config());
            }
            if self.nodes[i].disk.amnesic
                && self.nodes[i].core.as_ref().is_some_and(|c| !c.amnesic())
            {
                // The runtime removes its `AMNESIC` file.
                self.nodes[i].disk.amnesic = false;
                self.nodes[i].before_power_loss.clear();
            }
            let commit = self.nodes[i].core.as_ref().map(Node::commit_position);
            let term = self.nodes[i].core.as_ref().map(Node::term);
            if let (Some((from, led_term)), Some(c)) = (led_from, commit) {
                if c > from && term == Some(led_term) {
                    self.check_commit_durable(i, c);
                }
            }
            if let Some(core) = self.nodes[i].core.as_ref() {
                let inc = self.nodes[i].incarnation;
                self.inv.after_step(core, inc, &mut self.report.violations);
                for check in std::mem::take(&mut self.removal_checks) {
                    let v = &mut self.report.violations;
                    match check {
                        RemovalCheck::Sent(from, to, position) => {
                            self.inv.removal_notice_sent(from, to, position, v)
                        }
                        RemovalCheck::Acted(id, by, position, true) => {
                            self.inv.acted_on_removal(id, by, position, v)
                        }
                        RemovalCheck::Acted(id, by, position, false) => v.push(format!(
                            "removal: node {id} acted on a notice from node {by} about \
                             {position} that was never sent"
                        )),
                    }
                }
                if self.transfer_asked.is_some_and(|(target, term)| {
                    target == core.id() && core.is_leader() && core.term() > term
                }) {
                    self.transfer_asked = None;
                    self.report.transfers_done += 1;
                }
            }
            self.check_commit_claims();
        }
        self.observe_wiped(i);
        self.observe_preferred(i);
        if self.nodes[i].removed && self.nodes[i].core.is_some() {
            // Shut down for good, as the runtime does.
            self.crash(i);
            self.report.crashes -= 1;
        }
    }

    fn exec(&mut self, i: usize, a: Action, queue: &mut VecDeque<Event>) {
        let id = self.nodes[i].id;
        match a {
            Action::PersistHardState(hs) => {
                self.inv.persist_hard_state(
                    id,
                    &self.nodes[i].disk.hard_state,
                    &hs,
                    &mut self.report.violations,
                );
                self.nodes[i].disk.hard_state = hs;
            }
            Action::Append(entries) => {
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: append {}..{}",
                        self.now as f64 / 1e6,
                        entries.first().map_or(0, |e| e.position),
                        entries.last().map_or(0, Entry::end)
                    );
                }
                self.inv
                    .append(id, &entries, self.now, &mut self.report.violations);
                if self.cfg.mix.power_losses && self.write_inline(i, &entries) {
                    if let Some(e) = entries.last() {
                        queue.push_back(Event::Durable {
                            position: e.end(),
                            term: e.term,
                        });
                    }
                    return;
                }
                self.nodes[i].pending.push(StorageOp::Append(entries));
                self.schedule_sync(i);
            }
            Action::Truncate { from } => {
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: truncate from {from}",
                        self.now as f64 / 1e6
                    );
                }
                self.inv.truncate(id, from, &mut self.report.violations);
                self.nodes[i].pending.push(StorageOp::Truncate(from));
                self.schedule_sync(i);
            }
            Action::SaveSnapshot(meta) => {
                // Written and published with a later disk sync (as the
                // runtime's snapshot and storage threads do), then reported
                // to the core.
                let data = match self.nodes[i].captured.take() {
                    Some((position, data)) if position == meta.position => data,
                    _ => {
                        self.report.violations.push(format!(
                            "node {id}: asked to save a snapshot at {} that was not captured",
                            meta.position
                        ));
                        return;
                    }
                };
                let s = Snapshot { meta, data };
                let upto = s.meta.position;
                self.inv.compact(id, upto);
                let (lo, hi) = self.cfg.publish_delay;
                if hi == 0 {
                    self.nodes[i].pending.push(StorageOp::Publish(s));
                    self.nodes[i].pending.push(StorageOp::Compact(upto));
                    self.schedule_sync(i);
                } else {
                    let at = (self.now + self.rng.range(lo, hi)).max(self.nodes[i].staged_until);
                    self.nodes[i].staged_until = at;
                    let inc = self.nodes[i].incarnation;
                    self.schedule(at - self.now, Ev::SnapshotStaged(id, inc, Box::new(s)));
                }
            }
            Action::Send(m) => {
                self.check_sent(i, &m);
                if let Body::Removed { position } = m.body {
                    self.notices_sent.insert((m.from, m.to, position));
                }
                // A voter's reported stickiness is on its disk first, so a
                // restart cannot forget it.
                if let keel_core::Body::AppendResp { hold, .. } = m.body {
                    let on_disk = self.nodes[i].disk.hard_state.hold;
                    if hold > on_disk {
                        self.report.violations.push(format!(
                            "node {id} reported a hold of {} ms with only {} ms on disk",
                            hold / MS,
                            on_disk / MS
                        ));
                    }
                }
                self.send_peer(m)
            }
            Action::SendSnapshotChunk {
                mut message,
                position,
                offset,
                len,
            } => {
                // Read the chunk from the published file, as the runtime
                // does; a replaced file means nothing is sent.
                let disk = &self.nodes[i].disk;
                let file = disk
                    .snapshot_file
                    .as_ref()
                    .filter(|_| disk.snapshot.as_ref().map(|s| s.meta.position) == Some(position));
                let Some(file) = file else {
                    self.report.snapshot_chunks_unsent += 1;
                    return;
                };
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(offset.saturating_add(len)).ok())
                    .filter(|&(a, b)| a <= b && b <= file.len());
                let Some((a, b)) = range else {
                    self.report.violations.push(format!(
                        "node {id}: snapshot chunk {offset}+{len} outside the {}-byte file at {position}",
                        file.len()
                    ));
                    return;
                };
                let bytes = file.slice(a..b);
                if let keel_core::Body::InstallSnapshot { chunk, .. } = &mut message.body {
                    *chunk = bytes;
                }
                self.check_sent(i, &message);
                let newest = self.nodes[i]
                    .core
                    .as_ref()
                    .and_then(|c| c.snapshot_meta().map(|m| m.position));
                if newest.is_some_and(|p| p > position) {
                    self.report.snapshot_chunks_behind_newest += 1;
                }
                if offset == 0
                    && self.faults_active
                    && self.cfg.mix.late_copies
                    && self.aux.chance(0.8)
                {
                    let until = self.now + self.aux.range(50 * MS, 300 * MS);
                    let delay = self.aux.range(100 * MS, 800 * MS);
                    self.late_copies.insert((id, message.to), (until, delay));
                }
                self.send_peer(message);
            }
            Action::SendLogRange {
                mut message,
                from,
                upto,
            } => {
                // Read the entries from the disk model, as the runtime reads
                // the segment files.
                let disk = &self.nodes[i].disk;
                let a = disk.log.partition_point(|e| e.position < from);
                let b = disk.log.partition_point(|e| e.end() <= upto);
                let held = a < b && disk.log[a].position == from && disk.log[b - 1].end() == upto;
                if !held {
                    self.report.log_ranges_unsent += 1;
                    return;
                }
                let read = disk.log[a..b].to_vec();
                // What is on disk must be what the core's log says is there.
                if let Some(core) = self.nodes[i].core.as_ref() {
                    for e in &read {
                        let ours = core.log().entry_at(e.position).map(|o| (o.term, o.end()));
                        if ours != Some((e.term, e.end())) {
                            self.report.violations.push(format!(
                                "node {id}: log entry at {} on disk (term {}) is not the core's ({ours:?})",
                                e.position, e.term
                            ));
                            return;
                        }
                    }
                }
                if let keel_core::Body::Append { entries, .. } = &mut message.body {
                    *entries = read;
                }
                self.check_sent(i, &message);
                self.report.log_ranges_read += 1;
                self.send_peer(message);
            }
            Action::Apply(entries) => {
                let heard = self.nodes[i].core.as_ref().map(Node::applied_position);
                if heard.is_some_and(|h| h < self.nodes[i].host.applied()) {
                    self.report.applies_ahead_of_reports += 1;
                }
                self.inv.apply(
                    id,
                    self.nodes[i].host.applied(),
                    &entries,
                    &mut self.report.violations,
                );
                let mut out = keel_core::ApplyOutput::default();
                self.nodes[i].host.apply(&entries, &mut out);
                for (client, seq, reply) in out.replies {
                    if let Some((c, req)) = self.nodes[i].writes.remove(&(client, seq)) {
                        let resp = match reply {
                            Reply::Applied(b) | Reply::Duplicate(b) => Resp::Output(b),
                            Reply::Stale => continue,
                        };
                        self.respond(c, req, resp);
                    }
                }
                let applied = self.nodes[i].host.applied();
                self.nodes[i].reports.push_back(ServiceReport::Applied {
                    position: applied,
                    timers: out.timers,
                });
                self.serve_reads(i);
                if applied >= self.nodes[i].last_snapshot + self.cfg.snapshot_every {
                    self.nodes[i].last_snapshot = applied;
                    let data = self.nodes[i].host.snapshot();
                    self.nodes[i]
                        .reports
                        .push_back(ServiceReport::Captured(applied, data));
                }
                self.schedule_reports(i);
            }
            Action::InstallSnapshot { meta, image } => {
                let s = match keel_log::meta::decode_snapshot(Path::new("received"), &image) {
                    Ok(s) if s.meta == meta => s,
                    Ok(_) | Err(_) => {
                        self.report.violations.push(format!(
                            "node {id}: installing a snapshot file that does not decode to its metadata"
                        ));
                        return;
                    }
                };
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: install snapshot at {} term {}",
                        self.now as f64 / 1e6,
                        s.meta.position,
                        s.meta.term
                    );
                }
                self.report.snapshots_installed += 1;
                if let Some(o) = self
                    .report
                    .wiped
                    .as_mut()
                    .filter(|o| o.node == id && !o.checked)
                {
                    o.snapshots_installed += 1;
                }
                for (position, size) in self.flush_pending(i) {
                    queue.push_back(Event::SnapshotPublished { position, size });
                }
                let node = &mut self.nodes[i];
                let pos = s.meta.position;
                let keeps = node
                    .disk
                    .log
                    .iter()
                    .any(|e| e.end() == pos && e.term == s.meta.term);
                if keeps {
                    node.disk.log.retain(|e| e.end() > pos);
                } else {
                    node.disk.log.clear();
                }
                node.disk.log_base = pos;
                node.disk.synced = node.disk.synced.min(node.disk.log_end());
                node.disk.snapshot = Some(s.clone());
                node.disk.snapshot_file = Some(image);
                node.last_snapshot = pos;
                self.inv
                    .install_snapshot(id, &s, &mut self.report.violations);
                match self.nodes[i].host.restore(&s) {
                    Ok(timers) => {
                        self.nodes[i].reports.push_back(ServiceReport::Applied {
                            position: pos,
                            timers,
                        });
                        self.schedule_reports(i);
                    }
                    Err(e) => self
                        .report
                        .violations
                        .push(format!("node {id}: snapshot restore failed: {e}")),
                }
                self.inv.restored(id, s.meta.timestamp);
                self.serve_reads(i);
            }
            Action::ReadReady { id: req, index } => {
                // Every write acknowledged before the read reached the node
                // was committed by then: a lower index can miss it (a
                // stale read, which the history shows only if the key
                // changed in between).
                if let Some(&(_, _, floor)) = self.nodes[i].reads.get(&req) {
                    if index < floor {
                        self.report.violations.push(format!(
                            "stale read: node {id} confirmed a read at {index}, but the log \
                             was committed up to {floor} when the read arrived"
                        ));
                    }
                }
                if let Some((_, since)) = self.cut_off.filter(|&(n, _)| n == id) {
                    self.report.reads_while_cut_off += 1;
                    let after = self.now - since;
                    let latest = self.report.last_read_after_cut;
                    self.report.last_read_after_cut = latest.max(after);
                    // (Reported once per run, so the run goes on to its
                    // linearizability check.)
                    let hold = self.cut_leader_lease_bound(id, since);
                    if after > hold && latest <= hold {
                        self.report.violations.push(format!(
                            "lease: node {id} answered a read {:.3} ms after it was cut off, \
                             past the voters' stickiness ({:.3} ms)",
                            after as f64 / 1e6,
                            hold as f64 / 1e6
                        ));
                    }
                }
                if self.reads_after_ran_out.remove(&req) {
                    self.report.reads_served_after_transfer_ran_out += 1;
                }
                self.nodes[i].ready_reads.push((req, index));
                self.serve_reads(i);
            }
            Action::Rejected { id: req, reason } => {
                if self.reads_after_ran_out.remove(&req) {
                    self.report.reads_refused_after_transfer_ran_out += 1;
                }
                let node = &mut self.nodes[i];
                let client = node.reads.remove(&req).map(|(c, _, _)| c).or_else(|| {
                    let key = node
                        .writes
                        .iter()
                        .find(|(_, (_, r))| *r == req)
                        .map(|(k, _)| *k);
                    key.and_then(|k| node.writes.remove(&k)).map(|(c, _)| c)
                });
                if let Some(c) = client {
                    self.respond(c, req, Resp::Reject(reason));
                }
            }
            Action::Removed { by, position } => {
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: removed (node {by} says, from {position})",
                        self.now as f64 / 1e6
                    );
                }
                let sent = by == id || self.notices_sent.contains(&(by, id, position));
                self.removal_checks
                    .push(RemovalCheck::Acted(id, by, position, sent));
                self.report.removals_acted += 1;
                self.nodes[i].removed = true;
                // (An impostor that learned it was removed stops for good
                // too: its machine may join again under a new id.)
                self.nodes[i].impostor = None;
            }
            Action::RoleChanged { role, term, leader } => {
                if self.trace {
                    eprintln!(
                        "{:>10.3}ms node {id}: {role:?} term {term} leader {leader:?}",
                        self.now as f64 / 1e6
                    );
                }
                if role == Role::Leader {
                    let min = self
                        .cfg
                        .election_timeout_of(id, self.nodes[i].incarnation)
                        .0;
                    let at = self.local_now(i) + min;
                    self.quorum_check_at.insert(id, at);
                    self.report.elections += 1;
                    self.inv
                        .leader_elected(id, term, &mut self.report.violations);
                }
            }
        }
    }

    /// What a message claims must hold when it is sent: a granted vote is
    /// on disk first (or a restart could vote again in the term); only the
    /// leader of a term replicates in it; an acknowledgement in a term goes
    /// to that term's leader and only for what is synced here (the leader
    /// counts it towards commit).
    /// The entries votes said were committed were (`commit_claims`).
    fn check_commit_claims(&mut self) {
        for (voter, candidate, end, term) in std::mem::take(&mut self.commit_claims) {
            if !self.inv.is_committed(end, term) {
                self.report.violations.push(format!(
                    "node {voter} told candidate {candidate} that the entry ending at {end} in \
                     term {term} is committed, which no node committed"
                ));
            }
        }
    }

    fn check_sent(&mut self, i: usize, m: &Message) {
        let id = self.nodes[i].id;
        if let Body::PreVoteResp { committed, .. } | Body::VoteResp { committed, .. } = m.body {
            if committed != (0, 0) {
                self.commit_claims
                    .push((id, m.to, committed.0, committed.1));
            }
        }
        let disk = &self.nodes[i].disk;
        match &m.body {
            Body::Removed { position } => {
                let member = self.nodes[i]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.membership().contains(m.to));
                if member {
                    self.report.violations.push(format!(
                        "removal: node {id} told node {} it was removed, which its latest \
                         configuration includes",
                        m.to
                    ));
                }
                self.removal_checks
                    .push(RemovalCheck::Sent(id, m.to, *position));
            }
            Body::VoteResp { granted: true, .. } => {
                let hs = disk.hard_state;
                if hs.term != m.term || hs.voted_for != Some(m.to) {
                    self.report.violations.push(format!(
                        "node {id} granted its vote in term {} to node {} with term {} and \
                         vote {:?} on disk",
                        m.term, m.to, hs.term, hs.voted_for
                    ));
                }
            }
            Body::Append { .. } | Body::InstallSnapshot { .. }
                if self.inv.leader_of(m.term) != Some(id) =>
            {
                self.report.violations.push(format!(
                    "node {id} replicated to node {} in term {}, whose leader is {:?}",
                    m.to,
                    m.term,
                    self.inv.leader_of(m.term)
                ));
            }
            Body::AppendResp {
                ok: true, position, ..
            } => {
                let leader = self.inv.leader_of(m.term);
                let term = self.nodes[i]
                    .core
                    .as_ref()
                    .and_then(|c| c.log().term_at(*position));
                if leader != Some(m.to) {
                    self.report.violations.push(format!(
                        "node {id} acknowledged {position} in term {} to node {}, but the \
                         term's leader is {leader:?}",
                        m.term, m.to
                    ));
                } else if !disk.holds(*position, term) {
                    self.report.violations.push(format!(
                        "node {id} acknowledged {position} (term {term:?}) to its leader with \
                         its disk synced only to {}",
                        disk.log_end()
                    ));
                }
            }
            _ => {}
        }
    }

    /// A leader that advanced its commit to `commit` must have the entry
    /// durable on a quorum of its voters: otherwise crashes can lose it.
    /// (A wiped node counts as holding what it acknowledged before.)
    fn check_commit_durable(&mut self, i: usize, commit: Position) {
        let Some(core) = self.nodes[i].core.as_ref() else {
            return;
        };
        let term = core.log().term_at(commit);
        let m = core.membership();
        let wiped = self.report.wiped.as_ref().map(|w| w.node);
        let holding = m
            .voters
            .iter()
            .filter(|&&n| {
                Some(n) == wiped
                    || self.nodes.iter().find(|x| x.id == n).is_some_and(|x| {
                        // (An acknowledgement may come from an earlier
                        // node of the id, which an impostor replaced.)
                        x.disk.holds(commit, term)
                            || x.earlier_disks.iter().any(|d| d.holds(commit, term))
                            || x.before_power_loss.iter().any(|d| d.holds(commit, term))
                    })
            })
            .count();
        if holding < m.quorum() {
            let id = self.nodes[i].id;
            self.report.violations.push(format!(
                "node {id} committed up to {commit} in term {} with it synced on only \
                 {holding} of its {} voters",
                core.term(),
                m.voters.len()
            ));
        }
    }

    fn serve_reads(&mut self, i: usize) {
        let applied = self.nodes[i].host.applied();
        let node = &mut self.nodes[i];
        let mut served = Vec::new();
        node.ready_reads.retain(|&(req, index)| {
            if index <= applied {
                served.push(req);
                false
            } else {
                true
            }
        });
        for req in served {
            if let Some((c, data, _)) = self.nodes[i].reads.remove(&req) {
                let out = self.nodes[i].host.query(&data);
                self.respond(c, req, Resp::Output(out));
            }
        }
    }

    /// Schedules the delivery of the service's pending reports, unless one
    /// is scheduled (reports made meanwhile go with it): mostly within a
    /// millisecond, sometimes after a few, now and then after tens (a busy
    /// service thread).
    fn schedule_reports(&mut self, i: usize) {
        if self.nodes[i].reports_scheduled || self.nodes[i].reports.is_empty() {
            return;
        }
        self.nodes[i].reports_scheduled = true;
        let d = match self.aux.range(0, 10) {
            0..=5 => self.aux.range(0, MS),
            6..=8 => self.aux.range(MS, 10 * MS),
            _ => self.aux.range(10 * MS, 60 * MS),
        };
        let ev = Ev::ServiceReports(self.nodes[i].id, self.nodes[i].incarnation);
        self.schedule(d, ev);
    }

    /// The core hears the service's pending reports, in order.
    fn deliver_reports(&mut self, id: NodeId, inc: u64) {
        let i = self.idx(id);
        if self.nodes[i].incarnation != inc || self.nodes[i].core.is_none() {
            return;
        }
        self.nodes[i].reports_scheduled = false;
        // (What the service reports meanwhile goes with a later delivery.)
        for r in std::mem::take(&mut self.nodes[i].reports) {
            match r {
                ServiceReport::Applied { position, timers } => {
                    self.step_node(i, Event::Applied { position, timers })
                }
                ServiceReport::Captured(position, data) => {
                    // The core answers with `SaveSnapshot`, which takes the
                    // capture, or with nothing: then it is dropped.
                    self.nodes[i].captured = Some((position, data));
                    self.step_node(i, Event::SnapshotTaken { position });
                    self.nodes[i].captured = None;
                }
            }
            if self.nodes[i].incarnation != inc || self.nodes[i].core.is_none() {
                return;
            }
        }
    }

    /// `replicated` durability (`power_losses` runs): entries are written
    /// to the OS on the consensus thread, and count as durable at once
    /// (`Disk::synced`). Not while a truncation or an append is queued for
    /// the storage thread, nor for a membership entry: appends then go
    /// through it, in order (as after a truncation or a segment roll in
    /// the runtime), and a membership entry is synced before it counts.
    /// Whether written here.
    fn write_inline(&mut self, i: usize, entries: &[Entry]) -> bool {
        let node = &mut self.nodes[i];
        let queued = node
            .pending
            .iter()
            .any(|op| matches!(op, StorageOp::Append(_) | StorageOp::Truncate(_)));
        if queued || holds_membership(entries) {
            return false;
        }
        for e in entries {
            node.disk
                .append(node.id, e.clone(), &mut self.report.violations);
        }
        self.schedule_background_sync(i);
        true
    }

    /// `power_losses` runs: syncs what was written, 5-20 ms from now.
    fn schedule_background_sync(&mut self, i: usize) {
        if !self.nodes[i].background_sync_scheduled {
            self.nodes[i].background_sync_scheduled = true;
            let d = self.rng.range(5 * MS, 20 * MS);
            let ev = Ev::BackgroundSync(self.nodes[i].id, self.nodes[i].incarnation);
            self.schedule(d, ev);
        }
    }

    fn schedule_sync(&mut self, i: usize) {
        if !self.nodes[i].sync_scheduled {
            let (lo, hi) = self.nodes[i].disk_latency;
            self.nodes[i].sync_scheduled = true;
            let d = self.rng.range(lo, hi);
            let ev = Ev::DiskSync(self.nodes[i].id, self.nodes[i].incarnation);
            self.schedule(d, ev);
        }
    }

    /// Carries out the pending storage work; returns the snapshot files it
    /// published (position, size).
    fn flush_pending(&mut self, i: usize) -> Vec<(Position, u64)> {
        let node = &mut self.nodes[i];
        let mut published = Vec::new();
        // (`Disk::synced`: a membership entry is synced before it counts.)
        let mut sync = false;
        node.flushed = None;
        for op in std::mem::take(&mut node.pending) {
            match op {
                StorageOp::Append(es) => {
                    sync |= holds_membership(&es);
                    node.flushed = es.last().map(|e| (e.end(), e.term)).or(node.flushed);
                    for e in es {
                        node.disk.append(node.id, e, &mut self.report.violations);
                    }
                }
                StorageOp::Truncate(from) => {
                    node.disk.log.retain(|e| e.position < from);
                    node.flushed = node.flushed.filter(|&(end, _)| end <= from);
                    // Synced with what was written before it.
                    node.disk.synced = node.disk.log_end();
                }
                StorageOp::Compact(upto) => {
                    let end = node.disk.log_end();
                    node.disk.log.retain(|e| e.end() > upto);
                    if node.disk.log.is_empty() {
                        node.disk.log_base = end.min(upto);
                    } else {
                        node.disk.log_base = node.disk.log[0].position;
                    }
                }
                StorageOp::Publish(s) => {
                    // The manifest never moves backwards.
                    let on_disk = node.disk.snapshot.as_ref().map_or(0, |d| d.meta.position);
                    if s.meta.position > on_disk {
                        let file = Bytes::from(keel_log::meta::encode_snapshot(&s));
                        published.push((s.meta.position, file.len() as u64));
                        node.disk.snapshot = Some(s);
                        node.disk.snapshot_file = Some(file);
                    }
                }
            }
        }
        if sync {
            node.disk.synced = node.disk.log_end();
        }
        published
    }

    fn disk_sync(&mut self, id: NodeId, inc: u64) {
        let i = self.idx(id);
        if self.nodes[i].incarnation != inc || self.nodes[i].core.is_none() {
            return;
        }
        self.nodes[i].sync_scheduled = false;
        let published = self.flush_pending(i);
        if !self.cfg.mix.power_losses {
            self.nodes[i].disk.synced = self.nodes[i].disk.log_end();
        } else if self.nodes[i].disk.synced < self.nodes[i].disk.log_end() {
            // Counted once written: synced in the background.
            self.schedule_background_sync(i);
        }
        let node = &self.nodes[i];
        // The log's end, or, where a snapshot compacted the whole log in
        // this same flush, what the flush wrote: durable all the same (the
        // runtime's storage thread reports each written batch).
        let last = node.disk.log.last().map(|e| (e.end(), e.term));
        if let Some((position, term)) = last.or(node.flushed) {
            self.step_node(i, Event::Durable { position, term });
        }
        for (position, size) in published {
            self.step_node(i, Event::SnapshotPublished { position, size });
        }
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].core.is_some() {
            self.report.crashes += 1;
            self.stop_process(i);
        }
    }

    /// Node `i`'s machine loses power: its process stops, and its log
    /// loses what was written since the last sync. It restarts amnesic.
    fn power_loss(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        self.report.power_losses += 1;
        self.stop_process(i);
        let node = &mut self.nodes[i];
        let before = node.disk.log.len();
        let synced = node.disk.synced;
        if node.disk.log_end() > synced {
            node.before_power_loss.push(Disk {
                hard_state: node.disk.hard_state,
                snapshot: node.disk.snapshot.clone(),
                snapshot_file: None,
                log: node.disk.log.clone(),
                log_base: node.disk.log_base,
                joining: node.disk.joining,
                synced,
                amnesic: node.disk.amnesic,
                settled_config: node.disk.settled_config,
            });
            node.disk.log.retain(|e| e.end() <= synced);
        }
        self.report.entries_lost_to_power += (before - node.disk.log.len()) as u64;
        // As the runtime does before the restart.
        node.disk.hard_state = node.disk.hard_state.after_power_loss();
        node.disk.amnesic = true;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {}: power loss, log cut back to {synced}",
                self.now as f64 / 1e6,
                node.id
            );
        }
    }

    /// Node `i`'s process stops (a crash, or an operator stopping it):
    /// what it had not synced or read yet is lost.
    fn stop_process(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.core.is_none() {
            return;
        }
        if let Some(core) = &node.core {
            self.report.add_core_stats(&core.stats());
        }
        // A new process starts with no back-off.
        self.handovers.remove(&node.id);
        self.backoff.remove(&node.id);
        if self.trace {
            eprintln!("{:>10.3}ms node {}: crash", self.now as f64 / 1e6, node.id);
        }
        node.core = None;
        node.incarnation += 1;
        // What a paused process had not read yet dies with it.
        self.paused.remove(&node.id);
        node.pending.clear();
        node.sync_scheduled = false;
        node.background_sync_scheduled = false;
        node.reports.clear();
        node.reports_scheduled = false;
        node.writes.clear();
        node.reads.clear();
        node.ready_reads.clear();
    }

    fn restart(&mut self, id: NodeId) {
        let i = self.idx(id);
        if self.nodes[i].core.is_some() || self.nodes[i].removed {
            return;
        }
        let node = &mut self.nodes[i];
        let snap_pos = node.disk.snapshot.as_ref().map_or(0, |s| s.meta.position);
        // Recovery keeps the log after the snapshot; a log that does not
        // reach the snapshot (the snapshot was taken of entries this node
        // had applied but not yet synced) is superseded by it.
        node.disk.log.retain(|e| e.position >= snap_pos);
        if node
            .disk
            .log
            .first()
            .is_some_and(|e| e.position != snap_pos)
        {
            node.disk.log.clear();
        }
        node.disk.log_base = snap_pos;
        let entries = node.disk.log.clone();
        let recovered = Recovered {
            hard_state: node.disk.hard_state,
            snapshot: node.disk.snapshot.clone(),
            snapshot_file_size: node
                .disk
                .snapshot_file
                .as_ref()
                .map_or(0, |f| f.len() as u64),
            entries,
        };
        let mut host = ServiceHost::new(service_of(id, &self.cfg), 60 * SEC);
        let timers = match node.disk.snapshot.as_ref().map(|s| host.restore(s)) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                self.report.violations.push(format!(
                    "node {id}: restart could not restore snapshot: {e}"
                ));
                return;
            }
            None => Vec::new(),
        };
        node.host = host;
        node.last_snapshot = snap_pos;
        node.captured = None;
        let now = node.clock.read(self.now);
        if self.trace {
            let last = recovered.entries.last().map_or(snap_pos, Entry::end);
            eprintln!(
                "{:>10.3}ms node {id}: restart with snapshot {snap_pos}, log to {last}",
                self.now as f64 / 1e6
            );
        }
        // (Opening the log syncs what an earlier process wrote.)
        node.disk.synced = node.disk.log_end();
        let cfg = core_config(id, &self.cfg, node.incarnation);
        let mut core = Node::restart(cfg, recovered.clone(), now);
        if node.disk.joining {
            core.resume_joining();
        }
        if node.disk.amnesic {
            core.set_amnesic();
        }
        core.restore_settled_config(node.disk.settled_config);
        let ts = recovered.snapshot.as_ref().map_or(0, |s| s.meta.timestamp);
        self.inv
            .restarted(id, &recovered, &mut self.report.violations);
        self.inv.restored(id, ts);
        node.core = Some(core);
        let inc = node.incarnation;
        self.schedule(TICK, Ev::Tick(id, inc));
        self.step_node(
            i,
            Event::Applied {
                position: snap_pos,
                timers,
            },
        );
    }

    fn on_request(&mut self, node: NodeId, client: u64, req: u64, kind: ReqKind) {
        let i = self.idx(node);
        if self.nodes[i].core.is_none() {
            return;
        }
        match kind {
            ReqKind::Write { seq, data } => {
                self.nodes[i].writes.insert((client, seq), (client, req));
                self.step_node(
                    i,
                    Event::Propose(vec![Proposal {
                        id: req,
                        client,
                        seq,
                        data,
                    }]),
                );
            }
            ReqKind::Read { data } if self.cfg.unsafe_local_reads => {
                let out = self.nodes[i].host.query(&data);
                self.respond(client, req, Resp::Output(out));
            }
            ReqKind::Read { data } => {
                let floor = self.inv.committed_upto();
                let deposed = self.nodes[i].core.as_ref().is_some_and(|c| {
                    c.is_leader()
                        && self.inv.newest_leader_term() > c.term()
                        && floor > c.commit_position()
                });
                if deposed {
                    self.report.reads_at_deposed_leaders += 1;
                }
                let ran_out = self.transfer_cut.as_ref().is_some_and(|t| {
                    t.leader == node
                        && t.ran_out_at.is_some()
                        && self.nodes[i]
                            .core
                            .as_ref()
                            .is_some_and(|c| c.is_leader() && c.term() == t.term)
                });
                if ran_out {
                    self.report.reads_after_transfer_ran_out += 1;
                    self.reads_after_ran_out.insert(req);
                }
                self.nodes[i].reads.insert(req, (client, data, floor));
                self.step_node(i, Event::Read { id: req });
            }
        }
    }

    // ----- clients -----------------------------------------------------

    fn client_idx(&self, id: u64) -> usize {
        if id == PROBE_CLIENT {
            self.clients.len() - 1
        } else {
            (id - 100) as usize
        }
    }

    fn client_wake(&mut self, c: u64, token: u64) {
        let ci = self.client_idx(c);
        if self.clients[ci].wake_token != token {
            return;
        }
        if let Some(op) = self.clients[ci].op.as_ref() {
            // A rejected attempt retries at the hinted node; a timed-out one
            // elsewhere (a pinned reader's at the same node). Either way
            // with the same sequence number.
            if op.req != 0 && !self.clients[ci].pinned {
                let target = self.all_ids[self.rng.range(0, self.all_ids.len() as u64) as usize];
                self.clients[ci].target = target;
            }
            self.send_attempt(ci);
            return;
        }
        let quiet = self.healed_at.is_none()
            && self
                .cfg
                .wipe
                .as_ref()
                .is_some_and(|w| self.now >= w.quiet_from);
        let generating = !quiet
            && self
                .healed_at
                .is_none_or(|h| self.now < h + self.cfg.liveness_bound / 2);
        if c == PROBE_CLIENT || !generating {
            return;
        }
        if self.clients[ci].pinned {
            let key = self.aux.range(0, self.cfg.keys);
            self.start_op(ci, KvInput::Get { key });
            return;
        }
        let key = self.rng.range(0, self.cfg.keys);
        let roll = self.rng.range(0, 100);
        let input = if ci < self.cfg.readers {
            KvInput::Get { key }
        } else if roll < 45 {
            self.next_value += 1;
            KvInput::Put {
                key,
                value: self.next_value,
            }
        } else if roll < 75 {
            KvInput::Get { key }
        } else {
            self.next_value += 1;
            let expected = if self.rng.chance(0.2) {
                None
            } else {
                Some(self.rng.range(1, self.next_value))
            };
            KvInput::Cas {
                key,
                expected,
                new: self.next_value,
            }
        };
        self.start_op(ci, input);
    }

    fn start_op(&mut self, ci: usize, input: KvInput) {
        let client = &mut self.clients[ci];
        let seq = if matches!(input, KvInput::Get { .. }) {
            None
        } else {
            client.next_seq += 1;
            Some(client.next_seq)
        };
        self.history.push(Operation {
            client: client.id,
            input: input.clone(),
            output: None,
            call: self.now,
            ret: None,
        });
        client.op = Some(ClientOp {
            input,
            hist: self.history.len() - 1,
            seq,
            req: 0,
        });
        self.send_attempt(ci);
    }

    fn send_attempt(&mut self, ci: usize) {
        let req = self.next_req;
        self.next_req += 1;
        let client = &mut self.clients[ci];
        let Some(op) = client.op.as_mut() else {
            return;
        };
        op.req = req;
        let data = kv::encode(&op.input);
        let kind = match op.seq {
            Some(seq) => ReqKind::Write { seq, data },
            None => ReqKind::Read { data },
        };
        let (id, mut node) = (client.id, client.target);
        if self.cfg.unsafe_local_reads && matches!(kind, ReqKind::Read { .. }) {
            // The broken client reads from any replica.
            node = self.all_ids[self.rng.range(0, self.all_ids.len() as u64) as usize];
        }
        client.wake_token += 1;
        let token = client.wake_token;
        let timeout = if client.pinned {
            PINNED_READ_TIMEOUT
        } else {
            CLIENT_TIMEOUT
        };
        if self.unreachable.contains(&(id, node)) {
            // Cut off from the node: the attempt fails fast (a real client
            // would time out first) and the client tries another node.
            let resp = Resp::Reject(RejectReason::NotLeader { leader: None });
            let d = self.rng.range(100_000, 2 * MS);
            self.schedule(
                d,
                Ev::Response {
                    client: id,
                    req,
                    resp,
                },
            );
        } else if let Some(d) = self.client_link_delay() {
            self.schedule(
                d,
                Ev::Request {
                    node,
                    client: id,
                    req,
                    kind,
                },
            );
        }
        self.schedule(timeout, Ev::ClientWake(id, token));
    }

    fn on_response(&mut self, c: u64, req: u64, resp: Resp) {
        let ci = self.client_idx(c);
        let Some(op) = self.clients[ci].op.as_ref() else {
            return;
        };
        if op.req != req {
            return;
        }
        match resp {
            Resp::Output(b) => {
                let Some(out) = kv::decode_output(&b) else {
                    self.report
                        .violations
                        .push(format!("client {c}: undecodable reply {b:?}"));
                    return;
                };
                let hist = op.hist;
                self.history[hist].output = Some(out);
                self.history[hist].ret = Some(self.now);
                self.report.ops_ok += 1;
                let client = &mut self.clients[ci];
                client.op = None;
                client.wake_token += 1;
                let token = client.wake_token;
                if c == PROBE_CLIENT {
                    self.probe_done = true;
                    return;
                }
                let think = if self.clients[ci].pinned {
                    self.aux.range(0, 5 * MS)
                } else {
                    self.rng.range(0, 20 * MS)
                };
                self.schedule(think, Ev::ClientWake(c, token));
            }
            Resp::Reject(reason) => {
                let pinned = self.clients[ci].pinned;
                let rng = if pinned { &mut self.aux } else { &mut self.rng };
                let target = match reason {
                    RejectReason::NotLeader { leader: Some(l) } => l,
                    _ => self.all_ids[rng.range(0, self.all_ids.len() as u64) as usize],
                };
                // Retry soon (the wake sees the op still pending). Keep the
                // new target: the wake picks a random one only on timeout.
                let delay = rng.range(2 * MS, 20 * MS);
                let client = &mut self.clients[ci];
                client.target = target;
                client.wake_token += 1;
                let token = client.wake_token;
                self.schedule(delay, Ev::ClientWake(c, token));
                if let Some(op) = self.clients[ci].op.as_mut() {
                    op.req = 0;
                }
            }
        }
    }

    // ----- faults ------------------------------------------------------

    fn nemesis(&mut self) {
        if !self.faults_active {
            return;
        }
        let kinds = self.cfg.mix.nemesis_kinds();
        let kind = kinds[self.rng.range(0, kinds.len() as u64) as usize];
        // While a leader is isolated the rest of the network stays whole, so
        // the majority elects a leader as soon as it may.
        let isolating = self.isolated.as_ref().is_some_and(|i| self.now < i.1);
        let network = matches!(
            kind,
            Nemesis::Partition | Nemesis::Asymmetric | Nemesis::CutLink | Nemesis::IsolateLeader
        );
        if isolating && network {
            let next = self.rng.range(100 * MS, 1000 * MS);
            self.schedule(next, Ev::Nemesis);
            return;
        }
        let ids = self.all_ids.clone();
        let pick = |rng: &mut Rng| ids[rng.range(0, ids.len() as u64) as usize];
        let dur = self.rng.range(300 * MS, 2500 * MS);
        match kind {
            Nemesis::Partition => {
                let side: BTreeSet<NodeId> = self
                    .all_ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.chance(0.5))
                    .collect();
                let mut links = Vec::new();
                for &a in &self.all_ids {
                    for &b in &self.all_ids {
                        if side.contains(&a) != side.contains(&b) {
                            links.push((a, b));
                        }
                    }
                }
                self.block(links, dur);
            }
            Nemesis::Asymmetric => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                if a != b {
                    self.block(vec![(a, b)], dur);
                }
            }
            Nemesis::CutLink => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                if a != b {
                    self.block(vec![(a, b), (b, a)], dur);
                }
            }
            Nemesis::Crash => {
                let id = pick(&mut self.rng);
                let i = self.idx(id);
                self.crash(i);
                let back = self.rng.range(50 * MS, 2 * SEC);
                self.schedule(back, Ev::Restart(id));
            }
            Nemesis::PowerLoss => {
                // Independent machines' power losses: a minority of the
                // nodes amnesic at a time at most (with more, the cluster
                // may rightly wait for an operator: README, "Power loss in
                // `replicated` mode").
                let amnesic = self.nodes.iter().filter(|n| n.disk.amnesic).count();
                if amnesic + 1 > (self.cfg.nodes - 1) / 2 {
                    let next = self.rng.range(100 * MS, 1000 * MS);
                    self.schedule(next, Ev::Nemesis);
                    return;
                }
                // A follower of the leader of the moment most often (its
                // acknowledgements are what a leader counts), and half the
                // time the leader crashes too.
                let leader = self.leader_index();
                let followers: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| Some(i) != leader && self.nodes[i].core.is_some())
                    .collect();
                let i = if !followers.is_empty() && !self.rng.chance(0.2) {
                    followers[self.rng.range(0, followers.len() as u64) as usize]
                } else if let Some(l) = leader {
                    l
                } else {
                    let id = pick(&mut self.rng);
                    self.idx(id)
                };
                let id = self.nodes[i].id;
                self.power_loss(i);
                let back = self.rng.range(50 * MS, 2 * SEC);
                self.schedule(back, Ev::Restart(id));
                if let Some(l) = leader.filter(|&l| l != i && self.rng.chance(0.5)) {
                    let lid = self.nodes[l].id;
                    self.crash(l);
                    let back = self.rng.range(50 * MS, 3 * SEC);
                    self.schedule(back, Ev::Restart(lid));
                }
            }
            Nemesis::SlowDisk => {
                let id = pick(&mut self.rng);
                let i = self.idx(id);
                self.nodes[i].disk_latency = (20 * MS, 300 * MS);
                self.schedule(dur, Ev::DiskNormal(id));
            }
            Nemesis::ClockJump if self.cfg.lease_reads => {
                let id = pick(&mut self.rng);
                let i = self.idx(id);
                let ppm = clock_rate(&mut self.rng, self.cfg.clock_drift_ppm);
                self.nodes[i].clock.set_rate(self.now, ppm);
            }
            Nemesis::ClockJump => {
                let id = pick(&mut self.rng);
                let i = self.idx(id);
                let jump = self.rng.range(0, 2000) as i64 - 500;
                self.nodes[i].clock.jump(self.now, jump * MS as i64);
            }
            Nemesis::Transfer => self.transfer(),
            Nemesis::RegionBlip => {
                let region = self.rng.chance(0.5);
                self.region_blip(region, dur);
            }
            Nemesis::IsolateLeader => {
                // At the leader's next check-quorum (see `isolate_leader`).
                self.isolate_armed = self.leader_index().map(|l| self.nodes[l].id);
            }
        }
        let next = self.rng.range(100 * MS, 1000 * MS);
        self.schedule(next, Ev::Nemesis);
    }

    /// How long after its cut at `cut_at`, in true time, cut-off leader
    /// `id` may answer lease reads: until the quorum-th latest end of its
    /// voters' stickiness, each holding its vote for the minimum election
    /// timeout it ran with then (a restart since does not shorten it), on
    /// a clock at the fastest rate, after the last append or snapshot
    /// chunk it received from the leader (the leader itself counts as
    /// holding for ever).
    fn cut_leader_lease_bound(&self, id: NodeId, cut_at: Nanos) -> Nanos {
        let ppm = u128::from(self.cfg.clock_drift_ppm);
        let Some(core) = self.nodes[self.idx(id)].core.as_ref() else {
            return 0;
        };
        let m = core.membership();
        let mut ends: Vec<Nanos> = m
            .voters
            .iter()
            .map(|&v| {
                if v == id {
                    return Nanos::MAX;
                }
                let Some(&(heard, hold)) = self.leader_heard.get(&(v, id)) else {
                    return 0;
                };
                let min = u128::from(hold);
                heard.saturating_add((min * 1_000_000 / (1_000_000 + ppm)) as Nanos)
            })
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        let end = ends.get(m.quorum() - 1).copied().unwrap_or(0);
        end.saturating_sub(cut_at)
    }

    /// `LeaseCuts`: the leader of the moment gets the slowest clock and
    /// every other node the fastest, and the writers pause; a minority of
    /// its followers lose it 50 ms later, the cut follows `skew_before`
    /// later and ends `cut_for` after that.
    fn lease_skew(&mut self) {
        let Some(cuts) = self.cfg.lease_cuts else {
            return;
        };
        if !self.faults_active {
            return;
        }
        let Some(l) = self.leader_index() else {
            self.schedule(50 * MS, Ev::LeaseSkew);
            return;
        };
        let ppm = self.cfg.clock_drift_ppm as i64;
        for i in 0..self.nodes.len() {
            let rate = if i == l { -ppm } else { ppm };
            self.nodes[i].clock.set_rate(self.now, rate);
        }
        let id = self.nodes[l].id;
        // The writers lose every node now (followers would forward their
        // writes), a minority of the followers lose the leader once the
        // writes already on their way are replicated.
        let writers = self.cfg.readers.min(self.cfg.clients)..self.cfg.clients;
        for c in &self.clients[writers] {
            for &n in &self.all_ids {
                self.unreachable.insert((c.id, n));
            }
        }
        self.schedule(50 * MS, Ev::LeaseIsolate(id));
        self.schedule(cuts.skew_before, Ev::LeaseCut(id));
        self.schedule(cuts.skew_before + cuts.cut_for, Ev::LeaseHeal(id));
        self.schedule(cuts.every, Ev::LeaseSkew);
    }

    /// `LeaseCuts`: the highest-numbered minority of the followers of `id`
    /// (with the writers gone, as long in the log as the others) lose it,
    /// so they will stand for election early.
    fn lease_isolate(&mut self, id: NodeId) {
        let i = self.idx(id);
        let Some(core) = self.nodes[i].core.as_ref().filter(|c| c.is_leader()) else {
            return;
        };
        let voters: Vec<NodeId> = core.membership().voters.iter().copied().collect();
        let followers: Vec<NodeId> = voters.iter().copied().filter(|&v| v != id).collect();
        let early = followers[followers.len() - (voters.len() - 1) / 2..].to_vec();
        self.cut_early = Some((id, early));
    }

    /// `LeaseCuts`: cuts `id` off from every other node, if it still
    /// leads, and restarts one of the followers it still had.
    fn lease_cut(&mut self, id: NodeId) {
        if self.cfg.lease_cuts.is_none() {
            return;
        }
        // The writers reach every other node again.
        self.unreachable.retain(|&(_, n)| n == id);
        let i = self.idx(id);
        let leads = self.nodes[i].core.as_ref().is_some_and(Node::is_leader);
        if !self.faults_active || !leads {
            return;
        }
        self.report.leaders_cut_off += 1;
        if self.trace {
            eprintln!("{:>10.3}ms node {id}: lease cut", self.now as f64 / 1e6);
        }
        // Not in `blocked`: a partition nemesis healing its links must not
        // end the cut early.
        self.cut_off = Some((id, self.now));
        // One of the followers that still had the leader restarts: it may
        // have echoed the leader's last heartbeat and forgotten it.
        let early = self.cut_early.as_ref().map_or(&[][..], |(_, e)| e);
        let kept = self.nodes[i].core.as_ref().and_then(|core| {
            core.membership()
                .voters
                .iter()
                .copied()
                .find(|&v| v != id && !early.contains(&v))
        });
        if let Some(v) = kept {
            let vi = self.idx(v);
            self.crash(vi);
            self.schedule(20 * MS, Ev::Restart(v));
        }
    }

    /// `TransferCuts`: asks the leader of the moment to hand leadership to
    /// a follower it cannot reach for `lag` (both ways), and points the
    /// pinned reader at it. The leader is cut off once it sends the target
    /// `TimeoutNow` (`transfer_cut_now`).
    fn transfer_cut_start(&mut self) {
        let Some(cuts) = self.cfg.transfer_cuts else {
            return;
        };
        if !self.faults_active {
            return;
        }
        let leader = self.leader_index().filter(|&l| {
            let id = self.nodes[l].id;
            !self.paused.contains_key(&id)
                && self.nodes[l]
                    .core
                    .as_ref()
                    .is_some_and(|c| !c.is_transferring())
        });
        let Some(l) = leader else {
            self.schedule(50 * MS, Ev::TransferCutStart);
            return;
        };
        self.schedule(cuts.every, Ev::TransferCutStart);
        let Some((leader, term, target)) = self.transfer_target(l) else {
            return;
        };
        let lag = self.rng.range(cuts.lag.0, cuts.lag.1);
        self.block(vec![(leader, target), (target, leader)], lag);
        for c in self.clients.iter_mut().filter(|c| c.pinned) {
            c.target = leader;
        }
        self.transfer_cut = Some(TransferCut {
            leader,
            term,
            target,
            cut_at: None,
            ran_out_at: None,
        });
        let req = self.next_req;
        self.next_req += 1;
        self.report.transfers += 1;
        self.transfer_asked = Some((target, term));
        self.operator_transfers.insert((leader, term));
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {leader}: transfer to {target} asked, unreachable for {:.1} ms",
                self.now as f64 / 1e6,
                lag as f64 / 1e6
            );
        }
        self.step_node(l, Event::TransferLeadership { id: req, target });
    }

    /// `TransferCuts`: the leader has sent `TimeoutNow`: it is cut off
    /// from every other node, and the writers from it, for `cut_for`.
    fn transfer_cut_now(&mut self) {
        let Some(cuts) = self.cfg.transfer_cuts else {
            return;
        };
        let Some(t) = self.transfer_cut.as_mut() else {
            return;
        };
        t.cut_at = Some(self.now);
        let leader = t.leader;
        self.report.transfer_cuts += 1;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {leader}: cut off after TimeoutNow",
                self.now as f64 / 1e6
            );
        }
        for c in self.clients.iter().filter(|c| !c.pinned) {
            if c.id != PROBE_CLIENT {
                self.unreachable.insert((c.id, leader));
            }
        }
        self.schedule(cuts.cut_for, Ev::TransferCutHeal(leader));
    }

    /// `TransferCuts`: node `i` was transferring before its last step; if
    /// it is the cut-off leader and still leads its term, its transfer ran
    /// out.
    fn observe_transfer_cut(&mut self, i: usize) {
        let Some(core) = self.nodes[i].core.as_ref() else {
            return;
        };
        let Some(t) = self.transfer_cut.as_mut() else {
            return;
        };
        let ran_out = t.leader == core.id()
            && t.cut_at.is_some()
            && t.ran_out_at.is_none()
            && core.is_leader()
            && core.term() == t.term
            && !core.is_transferring();
        if ran_out {
            t.ran_out_at = Some(self.now);
            self.report.transfers_ran_out_cut_off += 1;
            if self.trace {
                eprintln!(
                    "{:>10.3}ms node {}: transfer ran out, cut off",
                    self.now as f64 / 1e6,
                    t.leader
                );
            }
        }
    }

    /// `FaultMix::isolate_leader`: cuts the leader of the moment off from
    /// every other node but up to a minority of its voters, for 0.5-2 s,
    /// and points the pinned reader at it. The cut comes 25-45 ms after the
    /// leader's check-quorum has passed (the simulator mirrors its timing:
    /// every minimum election timeout from its election, at the next
    /// tick), so it has heard its voters since and passes the next check
    /// too: it steps down nearly two minimum election timeouts after the
    /// cut, later than the majority can elect and commit. 70% of the time only what its
    /// side sends is cut, and what the others send it arrives 100-400 ms
    /// late (a congested link): it hears their last echoes, and later the
    /// new term, that much later. Check-quorum deposes it only one to two
    /// minimum election timeouts (plus that delay) later, and the majority
    /// can elect and commit before that: reads it answers meanwhile must
    /// still wait for a heartbeat round that a quorum echoes.
    fn isolate_leader(&mut self, leader: NodeId) {
        let l = self.idx(leader);
        let Some(core) = self.nodes[l].core.as_ref().filter(|c| c.is_leader()) else {
            return;
        };
        if !self.faults_active {
            return;
        }
        let mut others = other_voters(core);
        let keep_max = (others.len() / 2).saturating_sub(1);
        // (Mostly as many as a minority allows: with five voters, a read
        // needs an echo from one of them.)
        let keep = if self.aux.chance(0.7) {
            keep_max
        } else {
            self.aux.range(0, keep_max as u64 + 1) as usize
        };
        let mut side = BTreeSet::from([leader]);
        for _ in 0..keep {
            let k = self.aux.range(0, others.len() as u64) as usize;
            side.insert(others.swap_remove(k));
        }
        let dur = self.aux.range(500 * MS, 2 * SEC);
        let slow = self
            .aux
            .chance(0.7)
            .then(|| self.aux.range(100 * MS, 400 * MS));
        // The other network faults end (their heals find nothing to heal).
        self.blocked.clear();
        self.report.leader_isolations += 1;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {leader}: isolated with {side:?}",
                self.now as f64 / 1e6
            );
        }
        self.isolated = Some((side, self.now + dur, slow));
        for c in self.clients.iter_mut().filter(|c| c.pinned) {
            c.target = leader;
        }
    }

    /// `FaultMix::pauses`: pauses the leader of the moment (half the time)
    /// or any running node, for half a minimum election timeout to six of
    /// them, and schedules the next pause.
    fn pause(&mut self) {
        if !self.faults_active {
            return;
        }
        let next = self.aux.range(500 * MS, 2 * SEC);
        self.schedule(next, Ev::Pause);
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some())
            .filter(|&i| !self.paused.contains_key(&self.nodes[i].id))
            .collect();
        let leader = self
            .leader_index()
            .filter(|l| running.contains(l) && self.aux.chance(0.5));
        let Some(i) = leader.or_else(|| {
            (!running.is_empty()).then(|| running[self.aux.range(0, running.len() as u64) as usize])
        }) else {
            return;
        };
        let id = self.nodes[i].id;
        let min = self
            .cfg
            .election_timeout_of(id, self.nodes[i].incarnation)
            .0;
        let dur = self.aux.range(min / 2, 6 * min);
        self.pause_process(id, leader.is_some());
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {id}: paused for {} ms",
                self.now as f64 / 1e6,
                dur / MS
            );
        }
        self.schedule(dur, Ev::Resume(id, self.pause_seq));
    }

    /// Pause `n` of node `id` ends (if it has not: a crash ends a pause):
    /// what reached it meanwhile is handled now, in order, its timers
    /// (ticks) first or last.
    fn resume(&mut self, id: NodeId, n: u64) {
        if self.paused.get(&id).is_none_or(|p| p.0 != n) {
            return;
        }
        let Some((_, backlog)) = self.paused.remove(&id) else {
            return;
        };
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {id}: resumed, {} events waiting",
                self.now as f64 / 1e6,
                backlog.len()
            );
        }
        self.report.events_after_pause += backlog.len() as u64;
        let newest = self.inv.newest_leader_term();
        if self.nodes[self.idx(id)]
            .core
            .as_ref()
            .is_some_and(|c| c.is_leader() && c.term() < newest)
        {
            self.report.resumed_deposed += 1;
        }
        self.impostors_at_resume(id);
        let (ticks, rest): (Vec<Ev>, Vec<Ev>) = backlog
            .into_iter()
            .partition(|ev| matches!(ev, Ev::Tick(..)));
        let ticks_first = self.aux.chance(0.5);
        let order = if ticks_first {
            ticks.into_iter().chain(rest).collect::<Vec<_>>()
        } else {
            rest.into_iter().chain(ticks).collect()
        };
        for ev in order {
            self.schedule(0, ev);
        }
    }

    fn block(&mut self, links: Vec<(NodeId, NodeId)>, dur: Nanos) {
        for &l in &links {
            self.blocked.insert(l);
        }
        self.schedule(dur, Ev::HealLinks(links));
    }

    /// `FaultMix::region_blips`: for `dur`, the links between one side
    /// and every other node are cut, or (half the time) what crosses them
    /// arrives one to three maximum election timeouts late, both ways. The
    /// side is the preferred region (`SimConfig::preferred_leaders`) if
    /// `region` (or there is no leader), otherwise the leader of the
    /// moment (or the region, if none leads).
    fn region_blip(&mut self, region: bool, dur: Nanos) {
        let leader = self.leader_index().map(|i| self.nodes[i].id);
        let side: BTreeSet<NodeId> = match leader {
            Some(l) if !region || self.cfg.preferred_leaders.is_empty() => BTreeSet::from([l]),
            _ => self.cfg.preferred_leaders.clone(),
        };
        if side.is_empty() {
            return;
        }
        let mut links = Vec::new();
        for &a in &self.all_ids {
            for &b in &self.all_ids {
                if side.contains(&a) && !side.contains(&b) {
                    links.extend([(a, b), (b, a)]);
                }
            }
        }
        self.report.region_blips += 1;
        let cut = self.rng.chance(0.5);
        if self.trace {
            eprintln!(
                "{:>10.3}ms {side:?}: links to the others {} for {} ms",
                self.now as f64 / 1e6,
                if cut { "cut" } else { "delayed" },
                dur / MS
            );
        }
        if cut {
            self.block(links, dur);
        } else {
            self.report.region_delays += 1;
            let max = self.cfg.election_timeout.1;
            let extra = self.rng.range(max, 3 * max);
            for l in links {
                self.slow_links.insert(l, (self.now + dur, extra));
            }
        }
    }

    fn heal_all(&mut self) {
        self.faults_active = false;
        self.plot = None;
        let paused: Vec<(NodeId, u64)> = self.paused.iter().map(|(&id, p)| (id, p.0)).collect();
        for (id, n) in paused {
            self.resume(id, n);
        }
        self.healed_at = Some(self.now);
        self.blocked.clear();
        self.unreachable.clear();
        self.cut_off = None;
        self.cut_early = None;
        self.transfer_cut = None;
        self.late_copies.clear();
        self.slow_links.clear();
        self.isolated = None;
        self.loss = 0.0;
        self.duplicate = 0.0;
        self.reorder = 0.0;
        for i in 0..self.nodes.len() {
            self.nodes[i].disk_latency = (100_000, 2 * MS);
            if self.nodes[i].core.is_none() {
                let id = self.nodes[i].id;
                self.restart(id);
            }
        }
        let newest = self.inv.newest_leader_term();
        self.leader_at_heal = self
            .leader_index()
            .and_then(|i| self.nodes[i].core.as_ref())
            .filter(|c| c.term() >= newest)
            .map(Node::id);
        for i in 0..self.nodes.len() {
            self.observe_preferred(i);
        }
        self.schedule(0, Ev::LivenessProbe);
        let end = self.cfg.liveness_bound + 2 * SEC;
        // Long enough to judge the preferred-leader check.
        self.extend_end();
        self.schedule(end, Ev::End);
    }

    fn liveness_probe(&mut self) {
        let ci = self.clients.len() - 1;
        self.probe = Some((self.history.len(), self.now + self.cfg.liveness_bound));
        self.next_value += 1;
        let input = KvInput::Put {
            key: 0,
            value: self.next_value,
        };
        self.start_op(ci, input);
    }

    fn leader_index(&self) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                n.core
                    .as_ref()
                    .filter(|c| c.is_leader())
                    .map(|c| (i, c.term()))
            })
            .max_by_key(|&(_, t)| t)
            .map(|(i, _)| i)
    }

    /// Asks the leader of the moment to hand leadership to another voter.
    fn transfer(&mut self) {
        let Some(i) = self.leader_index() else {
            return;
        };
        if self.paused.contains_key(&self.nodes[i].id) {
            // The request waits on a paused process: the operator gives up.
            return;
        }
        let Some((leader, term, target)) = self.transfer_target(i) else {
            return;
        };
        let req = self.next_req;
        self.next_req += 1;
        self.report.transfers += 1;
        self.transfer_asked = Some((target, term));
        self.operator_transfers.insert((leader, term));
        self.late_timeout_now = self.rng.chance(0.3).then_some((leader, term));
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {leader}: transfer to {target} asked",
                self.now as f64 / 1e6
            );
        }
        self.step_node(i, Event::TransferLeadership { id: req, target });
    }

    fn membership_change(&mut self) {
        if !self.faults_active {
            return;
        }
        let leader = self
            .leader_index()
            .filter(|&i| !self.paused.contains_key(&self.nodes[i].id));
        if let Some(i) = leader {
            let m = self.nodes[i].core.as_ref().map(|c| c.membership().clone());
            if let Some(m) = m {
                let options = self.membership_options(&m);
                if !options.is_empty() {
                    let change = match self.plot_steer(i, &m, &options) {
                        Some(steered) => steered,
                        None => Some(options[self.rng.range(0, options.len() as u64) as usize]),
                    };
                    if let Some(change) = change {
                        self.propose_membership(i, change);
                    }
                }
            }
        }
        let next = if self.plot.as_ref().is_some_and(|p| p.met_until.is_none()) {
            self.impostor_rng.range(100 * MS, 400 * MS)
        } else {
            self.rng.range(300 * MS, 1500 * MS)
        };
        self.schedule(next, Ev::MembershipChange);
    }

    /// The changes the harness may ask of a leader whose latest
    /// configuration is `m`. Outsiders that can be added: nodes waiting to
    /// join (no membership yet) under an id never removed, and removed
    /// nodes that stopped, whose machines an operator brings back with an
    /// empty disk under a new id (`AddLearner` of the old id here stands
    /// for that: `propose_membership` gives the new id). A removed node
    /// still running on its old data is left to learn it was removed
    /// first.
    fn membership_options(&self, m: &Membership) -> Vec<MembershipChange> {
        let outsiders: Vec<NodeId> = self
            .all_ids
            .iter()
            .copied()
            .filter(|n| !m.contains(*n))
            .filter(|&n| {
                let node = &self.nodes[self.idx(n)];
                let waiting = node.core.as_ref().is_some_and(|c| {
                    let m = c.membership();
                    m.voters.is_empty() && m.learners.is_empty()
                });
                (node.removed && node.replaced_by.is_none())
                    || (waiting
                        && node.impostor.is_none()
                        && !self.removal_asked.contains(&n)
                        && !m.removed.contains(&n))
            })
            // (A plot's victim is kept for its impostor.)
            .filter(|&n| self.plot.as_ref().is_none_or(|p| p.victim != n))
            .collect();
        let mut options = Vec::new();
        for &n in &outsiders {
            options.push(MembershipChange::AddLearner(n));
        }
        for &n in &m.learners {
            options.push(MembershipChange::PromoteLearner(n));
            options.push(MembershipChange::Remove(n));
        }
        if m.voters.len() > 3 {
            for &n in &m.voters {
                options.push(MembershipChange::Remove(n));
            }
        }
        options
    }

    /// Asks leader `nodes[i]` for `change` (see `membership_options`: the
    /// addition of a removed node that stopped brings its machine back
    /// under a new id). A removed id is never proposed again: the harness
    /// reports it if it ever tries.
    fn propose_membership(&mut self, i: usize, mut change: MembershipChange) {
        if let MembershipChange::AddLearner(n) = change {
            let node = &self.nodes[self.idx(n)];
            if node.removed && node.replaced_by.is_none() {
                if self.cfg.mix.impostors && self.impostor_rng.chance(1.0 / 3.0) {
                    // The operator's mistake: the machine starts a node
                    // under its removed id, which no leader is asked to
                    // add (it would be refused).
                    self.start_impostor(n);
                    return;
                }
                change = MembershipChange::AddLearner(self.rejoin_fresh(n));
            }
        }
        match change {
            MembershipChange::AddLearner(n) => {
                let asked = self.removal_asked.contains(&n);
                let committed = self.inv.removed_by(n);
                if asked || committed.is_some() {
                    let why = match committed {
                        Some(end) => {
                            format!("the committed configuration ending at {end} removed it")
                        }
                        None => "it was asked to remove it before".to_string(),
                    };
                    self.report.violations.push(format!(
                        "harness: proposed adding node {n} again, but {why}: removed ids are \
                         never reused"
                    ));
                }
            }
            MembershipChange::Remove(n) => {
                self.removal_asked.insert(n);
            }
            MembershipChange::PromoteLearner(_) => {}
        }
        self.report.membership_changes += 1;
        let req = self.next_req;
        self.next_req += 1;
        let leader = self.nodes[i].id;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {leader}: asked {change:?}",
                self.now as f64 / 1e6
            );
        }
        self.step_node(i, Event::ChangeMembership { id: req, change });
        // Accepted: the leader's latest configuration lacks it.
        if change == MembershipChange::Remove(leader)
            && self.nodes[i]
                .core
                .as_ref()
                .is_some_and(|c| !c.membership().contains(leader))
        {
            self.report.leader_removals += 1;
        }
    }

    /// The machine of node `old`, which stopped for good on learning it
    /// was removed, starts a new node with an empty disk and no membership
    /// (joining) under the next unused id, as an operator brings a removed
    /// member back (etcd, too, never reuses a removed member's id). The new
    /// id takes the old one's place among the machines (`all_ids`: what
    /// clients, faults and pauses pick) and its links' latencies; the old
    /// id is retired: its slot stays stopped, and what is still sent to it
    /// reaches no one. Returns the new id.
    fn rejoin_fresh(&mut self, old: NodeId) -> NodeId {
        let oi = self.idx(old);
        let id = self.nodes.len() as NodeId + 1;
        self.nodes[oi].replaced_by = Some(id);
        self.report.rejoined += 1;
        self.rejoined_ids.push((id, self.now));
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {old}: its machine joins again as node {id}, with an empty disk",
                self.now as f64 / 1e6
            );
        }
        if let Some(slot) = self.all_ids.iter_mut().find(|n| **n == old) {
            *slot = id;
        }
        let links: Vec<((NodeId, NodeId), Nanos)> = self
            .link_latency
            .iter()
            .filter(|((a, b), _)| *a == old || *b == old)
            .map(|(&(a, b), &d)| {
                let new = |n: NodeId| if n == old { id } else { n };
                ((new(a), new(b)), d)
            })
            .collect();
        self.link_latency.extend(links);
        let old_node = &self.nodes[oi];
        let node = SimNode::new(
            id,
            &self.cfg,
            Disk::joining(),
            old_node.disk_latency,
            old_node.clock,
        );
        self.nodes.push(node);
        self.restart(id);
        id
    }

    // ----- impostors (`FaultMix::impostors`) ------------------------------

    /// The machine of node `n`, which stopped for good on learning it was
    /// removed, starts a node under the removed id `n` itself (an
    /// operator's mistake): an empty disk, joining, in `n`'s slot, reached
    /// by whatever still sends to `n`, and never proposed for addition.
    /// Half the time the operator stops it again 0.5-3 s later.
    fn start_impostor(&mut self, n: NodeId) {
        let i = self.idx(n);
        self.impostor_seq += 1;
        let serial = self.impostor_seq;
        self.report.impostors += 1;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {n}: an impostor starts under the removed id, with an empty disk",
                self.now as f64 / 1e6
            );
        }
        let node = &mut self.nodes[i];
        node.removed = false;
        node.impostor = Some(serial);
        let earlier = std::mem::replace(&mut node.disk, Disk::joining());
        node.earlier_disks.push(earlier);
        node.last_snapshot = 0;
        self.restart(n);
        if self.impostor_rng.chance(0.5) {
            let d = self.impostor_rng.range(500 * MS, 3 * SEC);
            self.schedule(d, Ev::StopImpostor(n, serial));
        }
    }

    /// The operator stops impostor `serial` under id `n`, if it still
    /// runs there: the machine is a removed node's again (it may join
    /// under a new id).
    fn stop_impostor(&mut self, n: NodeId, serial: u64) {
        let i = self.idx(n);
        if self.nodes[i].impostor != Some(serial) {
            return;
        }
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {n}: the impostor is stopped",
                self.now as f64 / 1e6
            );
        }
        self.stop_process(i);
        self.nodes[i].removed = true;
        self.nodes[i].impostor = None;
        self.report.impostors_stopped += 1;
    }

    /// Leader `id` resumes from a pause: an impostor runs (half the time
    /// one starts now) under an id its configuration counts as a voter
    /// whose node was removed and stopped meanwhile, so it takes the
    /// impostor for that voter.
    fn impostors_at_resume(&mut self, id: NodeId) {
        if !self.cfg.mix.impostors {
            return;
        }
        let Some(core) = self.nodes[self.idx(id)]
            .core
            .as_ref()
            .filter(|c| c.is_leader())
        else {
            return;
        };
        let mut met = false;
        for v in other_voters(core) {
            let node = &self.nodes[self.idx(v)];
            if node.impostor.is_some() && node.core.is_some() {
                met = true;
            } else if node.removed
                && node.core.is_none()
                && node.replaced_by.is_none()
                && self.faults_active
                && self.impostor_rng.chance(0.5)
            {
                self.start_impostor(v);
                met = true;
            }
        }
        if met {
            self.report.stale_leaders_at_impostors += 1;
        }
    }

    /// Sets up a stale leader to meet an impostor, as in the core's test
    /// of it: the leader of the moment, whose configuration has three
    /// voters, is paused and cut off from every other node, while the
    /// harness steers the others (`plot_steer`) to add a voter and remove
    /// one of its two (the victim). Once the victim's node has stopped on
    /// learning it, an impostor starts under its id, and the stale leader
    /// resumes reaching it alone for 0.3-1.5 s: it takes the impostor for
    /// the victim, and would be a majority with it. (Clients still reach
    /// the stale leader.) Retried until a leader with three voters exists.
    /// Node `id`'s process handles nothing until it is resumed (a pause
    /// numbered `self.pause_seq`); `leader`: it led when paused.
    fn pause_process(&mut self, id: NodeId, leader: bool) {
        self.pause_seq += 1;
        self.paused.insert(id, (self.pause_seq, Vec::new()));
        self.report.pauses += 1;
        if leader {
            self.report.leaders_paused += 1;
        }
    }

    fn plot_start(&mut self) {
        if !self.faults_active || self.plot.is_some() {
            return;
        }
        let candidate = self.leader_index().and_then(|l| {
            let id = self.nodes[l].id;
            let core = self.nodes[l].core.as_ref()?;
            let m = core.membership();
            let ok = !self.paused.contains_key(&id) && m.voters.len() == 3 && m.is_voter(id);
            ok.then(|| (id, other_voters(core)))
        });
        let Some((stale, others)) = candidate else {
            if self.now + 3 * SEC < self.cfg.fault_time {
                let t = self.impostor_rng.range(200 * MS, 600 * MS);
                self.schedule(t, Ev::PlotStart);
            }
            return;
        };
        let victim = others[self.impostor_rng.range(0, others.len() as u64) as usize];
        self.pause_process(stale, true);
        self.report.impostor_plots += 1;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {stale}: paused and cut off, to meet an impostor of node {victim}",
                self.now as f64 / 1e6
            );
        }
        self.plot = Some(Plot {
            stale,
            pause: self.pause_seq,
            victim,
            give_up_at: self.now + 5 * SEC,
            met_until: None,
        });
        self.schedule(20 * MS, Ev::PlotCheck);
    }

    /// Follows the plot up: once the victim's node has stopped, starts
    /// the impostor and resumes the stale leader; lifts the cut when the
    /// meeting is over; gives up (resuming the leader) if the leader's
    /// pause ended otherwise or the removal takes too long.
    fn plot_check(&mut self) {
        let Some(p) = self.plot.as_ref() else {
            return;
        };
        let (stale, victim, pause) = (p.stale, p.victim, p.pause);
        let paused = self.paused.get(&stale).is_some_and(|x| x.0 == pause);
        match p.met_until {
            Some(until) if self.now >= until => {
                self.plot = None;
                return;
            }
            Some(_) => {}
            None if !paused || self.now >= p.give_up_at => {
                self.plot = None;
                if paused {
                    self.resume(stale, pause);
                }
                return;
            }
            None => {
                let v = &self.nodes[self.idx(victim)];
                if v.removed && v.core.is_none() && v.replaced_by.is_none() {
                    self.report.impostor_plots_met += 1;
                    self.start_impostor(victim);
                    let resume_in = self.impostor_rng.range(0, 100 * MS);
                    let met_for = self.impostor_rng.range(300 * MS, 1_500 * MS);
                    if let Some(p) = self.plot.as_mut() {
                        p.met_until = Some(self.now + resume_in + met_for);
                    }
                    self.schedule(resume_in, Ev::Resume(stale, pause));
                }
            }
        }
        self.schedule(20 * MS, Ev::PlotCheck);
    }

    /// The change the plot steers the leader `nodes[i]` (of configuration
    /// `m`, with the harness's `options`) to, until the victim is removed:
    /// promote a learner, or add one, until there are four voters, then
    /// remove the victim. `Some(None)`: ask nothing (the removal is under
    /// way); `None`: not steered.
    fn plot_steer(
        &mut self,
        i: usize,
        m: &Membership,
        options: &[MembershipChange],
    ) -> Option<Option<MembershipChange>> {
        let p = self.plot.as_ref().filter(|p| p.met_until.is_none())?;
        let (stale, victim) = (p.stale, p.victim);
        if self.nodes[i].id == stale {
            return None;
        }
        if !m.contains(victim) {
            return Some(None);
        }
        let remove = MembershipChange::Remove(victim);
        if m.voters.len() > 3 && options.contains(&remove) {
            return Some(Some(remove));
        }
        let promote: Vec<MembershipChange> = options
            .iter()
            .copied()
            .filter(|c| matches!(c, MembershipChange::PromoteLearner(n) if *n != victim))
            .collect();
        let pick = if promote.is_empty() {
            options
                .iter()
                .copied()
                .filter(|c| matches!(c, MembershipChange::AddLearner(_)))
                .collect()
        } else {
            promote
        };
        if pick.is_empty() {
            return None;
        }
        Some(Some(
            pick[self.impostor_rng.range(0, pick.len() as u64) as usize],
        ))
    }

    // ----- a wiped follower (`SimConfig::wipe`) ---------------------------

    /// Crashes a follower of the current leader and wipes its disk.
    fn wipe(&mut self) {
        let leader = self.leader_index();
        let voters = self.cfg.nodes;
        let Some(i) = (0..voters).find(|&i| Some(i) != leader && self.nodes[i].core.is_some())
        else {
            return;
        };
        let Some(w) = self.cfg.wipe.clone() else {
            return;
        };
        let id = self.nodes[i].id;
        if self.trace {
            eprintln!("{:>10.3}ms node {id}: wiped", self.now as f64 / 1e6);
        }
        self.crash(i);
        let membership = Membership::new(1..=voters as u64);
        self.nodes[i].disk = Disk {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    position: 0,
                    term: 0,
                    timestamp: 0,
                    membership,
                },
                data: Bytes::new(),
            }),
            ..Disk::default()
        };
        self.report.wiped = Some(WipeOutcome {
            node: id,
            ..WipeOutcome::default()
        });
        self.schedule(w.restart_at.saturating_sub(self.now), Ev::WipeRestart(id));
    }

    fn wipe_restart(&mut self, id: NodeId) {
        let target = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref().map(Node::commit_position))
            .max()
            .unwrap_or(0);
        let now = self.now;
        if let Some(o) = self.report.wiped.as_mut() {
            o.restarted_at = now;
            o.last_heard = now;
            o.target = target;
        }
        self.restart(id);
    }

    /// Notes an append or snapshot chunk reaching a node (that is up, at
    /// the sender's term or below).
    fn heard(&mut self, m: &Message) {
        let now = self.now;
        let up = self.nodes[self.idx(m.to)].core.is_some();
        let from_leader = matches!(
            m.body,
            keel_core::Body::Append { .. } | keel_core::Body::InstallSnapshot { .. }
        );
        // (One from a stale term is refused: it starts no stickiness.)
        let current = self.nodes[self.idx(m.to)]
            .core
            .as_ref()
            .is_some_and(|c| c.term() <= m.term);
        if from_leader && current {
            let inc = self.nodes[self.idx(m.to)].incarnation;
            let hold = self.cfg.election_timeout_of(m.to, inc).0;
            self.leader_heard.insert((m.to, m.from), (now, hold));
        }
        let Some(o) = self.report.wiped.as_mut() else {
            return;
        };
        if m.to == o.node && o.restarted_at > 0 && !o.checked && up && from_leader {
            o.longest_silence = o.longest_silence.max(now - o.last_heard);
            o.last_heard = now;
        }
    }

    fn observe_wiped(&mut self, i: usize) {
        let now = self.now;
        let applied = self.nodes[i].host.applied();
        let node = self.nodes[i].id;
        if let Some(o) = self.report.wiped.as_mut() {
            if o.node == node
                && o.restarted_at > 0
                && o.caught_up_after.is_none()
                && applied >= o.target
            {
                o.caught_up_after = Some(now - o.restarted_at);
            }
        }
    }

    fn wipe_check(&mut self) {
        let now = self.now;
        let Some(o) = self.report.wiped.as_mut() else {
            return;
        };
        let i = (o.node - 1) as usize;
        o.checked = true;
        o.longest_silence = o.longest_silence.max(now - o.last_heard);
        let core = self.nodes[i].core.as_ref();
        o.pre_votes = core.map_or(0, |c| c.stats().pre_votes_started);
        let silence_bound = core_config(o.node, &self.cfg, 0).election_timeout_min;
        let bound = self.cfg.wipe.as_ref().map_or(0, |w| w.catch_up_bound);
        if o.caught_up_after.is_none() {
            self.report.violations.push(format!(
                "liveness: wiped node {} had applied {} of {} committed before it rejoined, {} ms after rejoining",
                o.node,
                self.nodes[i].host.applied(),
                o.target,
                bound / MS
            ));
        }
        if o.longest_silence > silence_bound {
            self.report.violations.push(format!(
                "liveness: the leader sent wiped node {} nothing for {} ms after it rejoined",
                o.node,
                o.longest_silence / MS
            ));
        }
    }

    // ----- preferred leaders (`SimConfig::preferred_leaders`) ----------

    /// After the heal, notes the first time a preferred voter leads the
    /// newest term.
    /// Also follows up a preference transfer started after the heal: the
    /// next leader elected must be preferred.
    fn observe_preferred(&mut self, i: usize) {
        self.settle_handover(i);
        if let (Some(from), Some(core)) = (self.preference_move, self.nodes[i].core.as_ref()) {
            if core.is_leader() && core.term() > from {
                self.preference_move = None;
                if !self.cfg.preferred_leaders.contains(&core.id()) {
                    self.report.preference_transfers_failed += 1;
                }
            }
        }
        if self.preferred_led_at.is_some() || self.healed_at.is_none() {
            return;
        }
        let newest = self.inv.newest_leader_term();
        if self.nodes[i].core.as_ref().is_some_and(|c| {
            c.is_leader() && c.term() >= newest && self.cfg.preferred_leaders.contains(&c.id())
        }) {
            self.preferred_led_at = Some(self.now);
        }
    }

    /// Follows the core's back-off after a failed hand-over: node `i`'s
    /// latest preference transfer is settled once it knows a leader of a
    /// later term (itself included), or, still leading its term, once the
    /// transfer ran out (an election timeout after it started, on its
    /// clock: the target never stood). Another leader than its target makes
    /// its next hand-over wait four times the hold per failure in a row
    /// (at most three), measured on its clock: here in true time, the
    /// clock drift allowed for; its target resets the count, and so does
    /// any preferred leader the node knows (the failures are no longer in a
    /// row).
    fn settle_handover(&mut self, i: usize) {
        let id = self.nodes[i].id;
        let local = self.local_now(i);
        let Some(core) = self.nodes[i].core.as_ref() else {
            return;
        };
        if core
            .leader()
            .is_some_and(|l| self.cfg.preferred_leaders.contains(&l))
        {
            if let Some(b) = self.backoff.get_mut(&id) {
                b.0 = 0;
            }
        }
        let Some(&(term, target, under_faults, started)) = self.handovers.get(&id) else {
            return;
        };
        let leader = if core.term() > term {
            core.leader()
        } else {
            let ran_out = local >= started + core.config().election_timeout_min;
            (core.is_leader() && core.term() == term && ran_out).then_some(id)
        };
        let Some(leader) = leader else {
            return;
        };
        self.handovers.remove(&id);
        let won = match target {
            Some(t) => leader == t,
            None => self.cfg.preferred_leaders.contains(&leader),
        };
        if won {
            self.backoff.remove(&id);
            return;
        }
        let failures = self.backoff.get(&id).map_or(0, |b| b.0) + 1;
        let failures = failures.min(3);
        let wait = self.cfg.preferred_leader_hold << (2 * failures);
        let ppm = self.cfg.clock_drift_ppm.max(self.cfg.assumed_drift_ppm);
        let wait = wait + (u128::from(wait) * 2 * u128::from(ppm) / 1_000_000) as Nanos;
        let until = self.now + wait;
        if self.trace {
            eprintln!(
                "{:>10.3}ms node {id}: its hand-over of term {term} to {target:?} failed \
                 (node {leader} leads): {failures} in a row, the next waits {} ms",
                self.now as f64 / 1e6,
                wait / MS
            );
        }
        self.backoff.insert(id, (failures, until));
        if under_faults {
            self.excused_until = self.excused_until.max(until);
        }
        if self.healed_at.is_some() {
            self.extend_end();
        }
    }

    /// When a preferred voter must lead by, after the heal at `healed`:
    /// `SimConfig::preferred_bound` after it, or later where a node's
    /// back-off after hand-overs that failed under faults runs past that
    /// (its wait, then the transfer and an election). A back-off of a
    /// hand-over started after the heal extends nothing: nothing should
    /// make one fail then.
    fn preferred_deadline(&self, healed: Nanos) -> Nanos {
        let (min, max) = self.cfg.election_timeout;
        let after_wait = 2 * max + (2 * max - min.min(max));
        (healed + self.cfg.preferred_bound()).max(self.excused_until + after_wait)
    }

    /// After the heal: the run goes on until a second past the preferred
    /// deadline, at most `PREFERRED_END_CAP` after the heal.
    fn extend_end(&mut self) {
        let Some(h) = self.healed_at else {
            return;
        };
        if self.cfg.preferred_leaders.is_empty() {
            return;
        }
        let until = (self.preferred_deadline(h) + SEC).min(h + PREFERRED_END_CAP);
        self.end_not_before = self.end_not_before.max(until);
    }

    /// The preferred-leader check, at the end of the run: when a
    /// preferred id is a voter of the final configuration (the leader's)
    /// and its node is up (after the heal every node runs and every link
    /// works), a preferred voter must have led within
    /// `SimConfig::preferred_bound` of the heal and still lead. The cases
    /// the core is not asked to move leadership in are skipped, each with
    /// its reason (`PreferredOutcome::skipped`).
    fn check_preferred(&mut self) {
        let preferred = self.cfg.preferred_leaders.clone();
        if preferred.is_empty() {
            return;
        }
        if self.preference_move.take().is_some() {
            // No leader was elected after it by the end of the run.
            self.report.preference_transfers_failed += 1;
        }
        let bound = self.healed_at.map_or(self.cfg.preferred_bound(), |h| {
            self.preferred_deadline(h) - h
        });
        let mut out = PreferredOutcome {
            leader_at_heal: self.leader_at_heal,
            outside_at_heal: self.leader_at_heal.is_some_and(|l| !preferred.contains(&l)),
            led_after: self
                .preferred_led_at
                .zip(self.healed_at)
                .map(|(t, h)| t - h),
            bound,
            skipped: None,
            handover_kept: false,
        };
        let set = format!("preferred leaders {preferred:?}");
        let skip = match self.healed_at {
            _ if self.report.stopped_at.is_some() => {
                Some("the run stopped at a safety violation".to_string())
            }
            None => Some("the faults never healed".to_string()),
            Some(h) if self.now < h + bound => Some(format!(
                "the run ended {} ms after the heal, within the bound of {} ms (with the \
                 core's back-off after hand-overs that failed under faults)",
                (self.now - h) / MS,
                bound / MS
            )),
            Some(_) => None,
        };
        if let Some(why) = skip {
            out.skipped = Some(why);
            self.report.preferred = Some(out);
            return;
        }
        let Some(core) = self
            .leader_index()
            .and_then(|i| self.nodes[i].core.as_ref())
        else {
            self.report.violations.push(format!(
                "liveness: {set}: no node led at the end of the run"
            ));
            self.report.preferred = Some(out);
            return;
        };
        let (leader, term, by_transfer) = (core.id(), core.term(), core.elected_by_transfer());
        let final_config = core.membership().clone();
        // Preferred ids that are voters of the final configuration and
        // run as the members they are: not removed (a removed preferred
        // id is not a voter; an impostor under one is not the member),
        // not still joining. (Preferred ids are initial voters, so none
        // is a learner waiting to be promoted.)
        let up: BTreeSet<NodeId> = preferred
            .iter()
            .copied()
            .filter(|&p| final_config.is_voter(p))
            .filter(|&p| {
                self.nodes.get(self.idx(p)).is_some_and(|n| {
                    !n.removed
                        && n.impostor.is_none()
                        && n.core.as_ref().is_some_and(|c| !c.joining())
                })
            })
            .collect();
        let late = out.led_after.filter(|&t| t > bound);
        let failed = match self.report.preference_transfers_failed {
            0 => String::new(),
            n => format!(
                "; {n} preference transfers after the heal were not followed by a preferred \
                 leader (nothing should make one fail then, and each failure makes the next wait \
                 four times longer)"
            ),
        };
        if up.is_empty() {
            out.skipped = Some(format!(
                "no preferred id is a running voter of the final configuration {:?}",
                final_config.voters
            ));
        } else if preferred.contains(&leader) {
            if let Some(t) = late {
                self.report.violations.push(format!(
                    "liveness: {set}: a preferred voter first led {} ms after the faults \
                     healed, past the bound of {} ms (hold {} ms){failed}",
                    t / MS,
                    bound / MS,
                    self.cfg.preferred_leader_hold / MS
                ));
            }
        } else if by_transfer {
            // The core respects a leader elected through a transfer (an
            // operator's) for the rest of its term: skipped, naming who
            // sent the `TimeoutNow`.
            match self.by_transfer.get(&leader).copied() {
                Some((t, from, from_term)) if t == term => {
                    let origin = if self.operator_transfers.contains(&(from, from_term)) {
                        Some("an operator's transfer")
                    } else if self.preference_moves.contains(&(from, from_term)) {
                        Some("a preference transfer")
                    } else {
                        None
                    };
                    match origin {
                        Some(origin) => {
                            out.skipped = Some(format!(
                                "node {leader}, outside the set, was elected through {origin} \
                                 from node {from} of term {from_term}, and keeps leadership for \
                                 term {term}"
                            ))
                        }
                        // A leader that committed its own removal hands
                        // leadership to its most caught-up voter: no one's
                        // choice, which the core must not keep.
                        None => {
                            out.handover_kept = true;
                            self.report.violations.push(format!(
                                "liveness: {set}: node {leader}, outside the set, keeps term \
                                 {term} as elected through a transfer, but its TimeoutNow came \
                                 from node {from} of term {from_term} without an operator's or \
                                 a preference transfer (a leader removing itself): that \
                                 hand-over is no one's choice"
                            ))
                        }
                    }
                }
                _ => self.report.violations.push(format!(
                    "liveness: {set}: node {leader}, outside the set, leads term {term} as \
                     elected through a leadership transfer, but no TimeoutNow started its \
                     election"
                )),
            }
        } else {
            let earlier = match out.led_after {
                Some(t) => format!(", though a preferred voter had led {} ms after it", t / MS),
                None => String::new(),
            };
            self.report.violations.push(format!(
                "liveness: {set}: node {leader}, outside the set, still led at the end of the \
                 run (term {term}, {} ms after the faults healed{earlier}) while preferred voters \
                 {up:?} were up and connected: one should lead within {} ms of the heal \
                 (hold {} ms){failed}",
                self.healed_at.map_or(0, |h| (self.now - h) / MS),
                bound / MS,
                self.cfg.preferred_leader_hold / MS
            ));
        }
        self.report.preferred = Some(out);
    }

    // ----- end of run --------------------------------------------------

    fn finish(mut self) -> Report {
        self.report.sim_time = self.now;
        self.report.rejoined_members = self
            .rejoined_ids
            .iter()
            .filter(|&&(id, at)| self.inv.committed_member_since(id, at))
            .count() as u64;
        for node in &self.nodes {
            if let Some(core) = &node.core {
                self.report.add_core_stats(&core.stats());
            }
        }
        self.check_preferred();
        if self.report.stopped_at.is_some() {
            // Stopped at a safety violation: liveness is not judged.
        } else if let Some((hist, deadline)) = self.probe {
            match self.history.get(hist).and_then(|o| o.ret) {
                Some(t) if t <= deadline => {}
                Some(t) => self.report.violations.push(format!(
                    "liveness: the write after healing committed {} ms after the bound",
                    (t - deadline) / MS
                )),
                None => self.report.violations.push(format!(
                    "liveness: no write committed within {} ms after faults healed",
                    self.cfg.liveness_bound / MS
                )),
            }
        } else {
            self.report
                .violations
                .push("liveness: the run ended before faults healed".into());
        }
        if let Some(i) = self.leader_index() {
            if let Some(core) = self.nodes[i].core.as_ref() {
                self.inv.final_check(core, &mut self.report.violations);
            }
        }
        // Replicas that applied the same log hold the same state (term
        // starts and timers included): compare those at the furthest
        // applied position.
        let applied = |n: &SimNode| n.core.as_ref().map(|_| n.host.applied());
        if let Some(furthest) = self.nodes.iter().filter_map(applied).max() {
            let level: Vec<&SimNode> = self
                .nodes
                .iter()
                .filter(|n| applied(n) == Some(furthest))
                .collect();
            for n in &level[1..] {
                if n.host.service().state() != level[0].host.service().state() {
                    self.report.violations.push(format!(
                        "replicas diverged: nodes {} and {} applied the log to {furthest} \
                         but their service states differ",
                        level[0].id, n.id
                    ));
                }
            }
        }
        for n in &self.nodes {
            let s = n.host.service();
            self.report.timers_fired += s.timers_fired;
            self.report.term_starts_applied = self.report.term_starts_applied.max(s.term_starts);
            if s.timers_early > 0 {
                self.report.violations.push(format!(
                    "node {}: {} timers fired before their deadline",
                    n.id, s.timers_early
                ));
            }
        }
        let history: Vec<Operation> = self
            .history
            .iter()
            .filter(|o| o.output.is_some() || !matches!(o.input, KvInput::Get { .. }))
            .cloned()
            .collect();
        self.report.ops_unknown = history.iter().filter(|o| o.output.is_none()).count() as u64;
        let result = linearizability::check(&history);
        match &result {
            CheckResult::Linearizable => {}
            CheckResult::NotLinearizable { key, ops } => {
                let mut msg = format!("history not linearizable on key {key}:");
                for &o in ops.iter().take(12) {
                    if let Some(op) = history.get(o) {
                        msg.push_str(&format!(
                            "\n    client {} {:?} -> {:?} [{}..{}]",
                            op.client,
                            op.input,
                            op.output,
                            op.call / 1000,
                            op.ret.map_or("?".to_string(), |r| (r / 1000).to_string())
                        ));
                    }
                }
                self.report.violations.push(msg);
            }
            CheckResult::Unknown { .. } => {}
        }
        self.report.linearizability = Some(result);
        self.report
    }
}

/// Runs one seed.
pub fn run(cfg: &SimConfig) -> Report {
    Sim::new(cfg.clone()).run()
}

/// The voters of `core`'s configuration other than itself.
impl Sim {
    /// Node `i` (a leader, running), its term, and a voter other than it
    /// drawn at random to hand leadership to.
    fn transfer_target(&mut self, i: usize) -> Option<(NodeId, Term, NodeId)> {
        let core = self.nodes[i].core.as_ref()?;
        let (leader, term) = (core.id(), core.term());
        let others = other_voters(core);
        if others.is_empty() {
            return None;
        }
        let target = others[self.rng.range(0, others.len() as u64) as usize];
        Some((leader, term, target))
    }
}

fn other_voters(core: &Node) -> Vec<NodeId> {
    let me = core.id();
    core.membership()
        .voters
        .iter()
        .copied()
        .filter(|&v| v != me)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::EntryKind;

    /// A three-node simulation (not run) whose node 1 has been sent, as a
    /// follower of node 2 in term 3, one entry it has not synced yet.
    fn follower_with_unsynced_entry() -> (Sim, Entry) {
        let mut sim = Sim::new(SimConfig::new(1, 3, FaultMix::by_name("calm").unwrap()));
        let mut v = Vec::new();
        sim.inv.leader_elected(2, 3, &mut v);
        let e = Entry {
            term: 3,
            position: 0,
            timestamp: 1,
            kind: EntryKind::TermStart,
            data: Bytes::from_static(b"x"),
        };
        let append = Message {
            cluster_id: sim.nodes[0].core.as_ref().unwrap().config().cluster_id,
            from: 2,
            to: 1,
            term: 3,
            body: Body::Append {
                prev_pos: 0,
                prev_term: 0,
                commit: 0,
                heartbeat: 1,
                entries: vec![e.clone()],
                to_voter: true,
            },
        };
        sim.step_node(0, Event::Message(append));
        assert_eq!(
            sim.nodes[0].core.as_ref().unwrap().append_position(),
            e.end()
        );
        assert!(
            sim.report.violations.is_empty(),
            "{:?}",
            sim.report.violations
        );
        (sim, e)
    }

    fn message(to: NodeId, term: Term, body: Body) -> Message {
        Message {
            cluster_id: 0,
            from: 1,
            to,
            term,
            body,
        }
    }

    fn ack(position: Position) -> Body {
        Body::AppendResp {
            ok: true,
            position,
            hint_pos: 0,
            hint_term: 0,
            heartbeat: 1,
            hold: 0,
        }
    }

    /// A panic during a run (in the core, or here) ends the run as a
    /// failure, keeping what was found before it, rather than unwinding
    /// through the caller (a soak, a test sweeping seeds).
    #[test]
    fn a_panic_fails_the_run_and_keeps_what_was_found_before() {
        let cfg = SimConfig::new(3, 3, FaultMix::by_name("calm").unwrap());
        let replay = cfg.replay_command();
        let mut sim = Sim::new(cfg);
        sim.report.violations.push("found before".into());
        // There is no node 9: handling its tick panics (index out of bounds).
        sim.schedule(SEC, Ev::Tick(9, 0));
        let r = sim.run();
        assert!(!r.ok());
        assert_eq!(r.safety_violations(), ["found before"]);
        assert!(
            r.violations[1]
                .starts_with("panic: the run panicked at 1000.000 ms: index out of bounds"),
            "{:?}",
            r.violations
        );
        assert!(r
            .panicked
            .is_some_and(|p| p.contains("index out of bounds")));
        assert_eq!(r.sim_time, SEC);
        assert!(!replay.contains("stop-at-first-violation"), "{replay}");
    }

    /// With `stop_at_first_violation` a run ends at its first safety
    /// violation, before any core takes another step, and liveness is not
    /// judged; a liveness finding does not stop it. Without, it runs on.
    #[test]
    fn a_run_stops_at_its_first_safety_violation_if_asked() {
        for stop in [false, true] {
            let mut cfg = SimConfig::new(3, 3, FaultMix::by_name("calm").unwrap());
            cfg.stop_at_first_violation = stop;
            let replay = cfg.replay_command();
            let mut sim = Sim::new(cfg);
            sim.report.violations.push("liveness: slow".into());
            assert!(!sim.halted());
            sim.report.violations.push("broken".into());
            let r = sim.run();
            assert_eq!(r.violations, ["liveness: slow", "broken"]);
            if stop {
                assert_eq!(r.stopped_at, Some(r.sim_time));
                assert!(r.sim_time < 50 * MS, "{}", r.sim_time);
                assert_eq!((r.messages, r.ops_ok), (0, 0));
                assert!(
                    replay.ends_with(" --stop-at-first-violation=true"),
                    "{replay}"
                );
            } else {
                assert_eq!(r.stopped_at, None);
                assert!(r.sim_time > 6 * SEC && r.ops_ok > 0);
            }
        }
    }

    /// A vote that says an entry is committed which no node committed (a
    /// candidate would then stop checking the configuration before).
    #[test]
    fn a_vote_claiming_an_uncommitted_entry_is_caught() {
        let (mut sim, e) = follower_with_unsynced_entry();
        let claim = |committed| {
            let body = Body::PreVoteResp {
                granted: true,
                amnesic: false,
                committed,
            };
            message(3, 4, body)
        };
        sim.check_sent(0, &claim((0, 0)));
        sim.check_commit_claims();
        assert!(sim.report.violations.is_empty());
        sim.check_sent(0, &claim((e.end(), e.term)));
        sim.check_commit_claims();
        assert!(
            sim.report.violations[0].contains("which no node committed"),
            "{:?}",
            sim.report.violations
        );
    }

    #[test]
    fn a_vote_granted_before_it_is_on_disk_is_caught() {
        let (mut sim, _) = follower_with_unsynced_entry();
        let vote = message(
            3,
            4,
            Body::VoteResp {
                granted: true,
                amnesic: false,
                committed: (0, 0),
            },
        );
        sim.check_sent(0, &vote);
        assert!(
            sim.report.violations[0].contains("granted its vote"),
            "{:?}",
            sim.report.violations
        );
        sim.report.violations.clear();
        sim.nodes[0].disk.hard_state = HardState {
            term: 4,
            voted_for: Some(3),
            ..HardState::default()
        };
        sim.check_sent(0, &vote);
        let refusal = message(
            2,
            4,
            Body::VoteResp {
                granted: false,
                amnesic: false,
                committed: (0, 0),
            },
        );
        sim.check_sent(0, &refusal);
        assert!(
            sim.report.violations.is_empty(),
            "{:?}",
            sim.report.violations
        );
    }

    #[test]
    fn an_acknowledgement_of_what_is_not_synced_is_caught() {
        let (mut sim, e) = follower_with_unsynced_entry();
        sim.check_sent(0, &message(2, 3, ack(e.end())));
        assert!(
            sim.report.violations[0].contains("disk synced only to 0"),
            "{:?}",
            sim.report.violations
        );
        sim.report.violations.clear();
        sim.flush_pending(0);
        sim.check_sent(0, &message(2, 3, ack(e.end())));
        assert!(
            sim.report.violations.is_empty(),
            "{:?}",
            sim.report.violations
        );
    }

    #[test]
    fn replication_outside_the_leader_of_the_term_is_caught() {
        let (mut sim, e) = follower_with_unsynced_entry();
        sim.flush_pending(0);
        // An acknowledgement in term 3 to node 3, which does not lead it
        // (a follower that took an append from a stale leader).
        sim.check_sent(0, &message(3, 3, ack(e.end())));
        assert!(
            sim.report.violations[0].contains("term's leader is Some(2)"),
            "{:?}",
            sim.report.violations
        );
        sim.report.violations.clear();
        // Node 1 never led term 3.
        let heartbeat = Body::Append {
            prev_pos: 0,
            prev_term: 0,
            commit: 0,
            heartbeat: 0,
            entries: Vec::new(),
            to_voter: true,
        };
        sim.check_sent(0, &message(3, 3, heartbeat));
        assert!(
            sim.report.violations[0].contains("replicated to node 3 in term 3"),
            "{:?}",
            sim.report.violations
        );
    }

    #[test]
    fn a_commit_without_a_synced_quorum_is_caught() {
        let (mut sim, e) = follower_with_unsynced_entry();
        // Node 1 holds the entry in memory only; then on disk; then node 3
        // has it on disk too.
        sim.check_commit_durable(0, e.end());
        assert_eq!(sim.report.violations.len(), 1);
        sim.flush_pending(0);
        sim.check_commit_durable(0, e.end());
        assert_eq!(sim.report.violations.len(), 2);
        assert!(
            sim.report.violations[1].contains("synced on only 1 of its 3 voters"),
            "{:?}",
            sim.report.violations
        );
        sim.nodes[2].disk.log.push(e.clone());
        sim.check_commit_durable(0, e.end());
        assert_eq!(
            sim.report.violations.len(),
            2,
            "{:?}",
            sim.report.violations
        );
    }

    #[test]
    fn a_read_confirmed_below_what_was_committed_when_it_arrived_is_caught() {
        let (mut sim, e) = follower_with_unsynced_entry();
        // Node 2 (the leader) has committed the entry.
        let mut v = Vec::new();
        sim.inv.append(2, std::slice::from_ref(&e), 0, &mut v);
        let leader = crate::invariants::NodeView {
            id: 2,
            incarnation: 0,
            append_position: e.end(),
            last_term: 3,
            commit: e.end(),
            leading: Some(3),
        };
        sim.inv.check_node(&leader, &mut v);
        assert!(v.is_empty(), "{v:?}");
        // Node 1 forwards a read to its leader, which answers at 0.
        let get = kv::encode(&KvInput::Get { key: 1 });
        sim.on_request(1, 100, 7, ReqKind::Read { data: get });
        assert!(sim.nodes[0].reads.contains_key(&7));
        let mut queue = VecDeque::new();
        sim.exec(0, Action::ReadReady { id: 7, index: 0 }, &mut queue);
        assert!(
            sim.report.violations[0].starts_with("stale read"),
            "{:?}",
            sim.report.violations
        );
    }

    /// Handles `sim`'s events in order until `done` holds (within 10 s of
    /// simulated time).
    fn run_until(sim: &mut Sim, what: &str, done: impl Fn(&Sim) -> bool) {
        while !done(sim) {
            let Some(Reverse(q)) = sim.queue.pop() else {
                panic!("no more events, and not {what}");
            };
            assert!(q.at < 10 * SEC, "not {what} within 10 s");
            sim.now = q.at;
            sim.handle(q.ev);
        }
    }

    /// The leader's latest configuration.
    fn leader_membership(sim: &Sim) -> Membership {
        let l = sim.leader_index().expect("a leader");
        sim.nodes[l].core.as_ref().unwrap().membership().clone()
    }

    /// A removed node that stopped is brought back with an empty disk under
    /// the next unused id, which takes the old id's place among the
    /// machines (links, picks) and is added as a learner; the old id is
    /// retired for good: the harness never proposes it again (and says so
    /// if made to).
    #[test]
    fn a_removed_node_rejoins_under_a_new_id() {
        let mut mix = FaultMix::by_name("calm").unwrap();
        mix.membership = true;
        let mut sim = Sim::new(SimConfig::new(1, 3, mix));
        // Only the changes this test asks for.
        sim.queue
            .retain(|q| !matches!(q.0.ev, Ev::MembershipChange));
        assert_eq!(sim.all_ids, [1, 2, 3, 4, 5]);
        run_until(&mut sim, "a leader that committed", |s| {
            s.leader_index()
                .is_some_and(|l| s.nodes[l].core.as_ref().unwrap().commit_position() > 0)
        });
        let l = sim.leader_index().unwrap();
        let victim = other_voters(sim.nodes[l].core.as_ref().unwrap())[0];
        sim.propose_membership(l, MembershipChange::Remove(victim));
        run_until(&mut sim, "the removed node stopped", |s| {
            s.nodes[s.idx(victim)].removed && s.nodes[s.idx(victim)].core.is_none()
        });
        let m = leader_membership(&sim);
        assert!(!m.contains(victim), "{m:?}");
        // Its machine may come back (standing for a new id), as may the
        // nodes waiting to join.
        let options = sim.membership_options(&m);
        for n in [victim, 4, 5] {
            assert!(
                options.contains(&MembershipChange::AddLearner(n)),
                "{options:?}"
            );
        }
        let l = sim.leader_index().unwrap();
        sim.propose_membership(l, MembershipChange::AddLearner(victim));
        // Node 6, a new slot; 6 in the victim's place among the machines.
        assert_eq!(sim.nodes.len(), 6);
        assert_eq!(sim.report.rejoined, 1);
        let mut ids = vec![1, 2, 3, 4, 5];
        ids[victim as usize - 1] = 6;
        assert_eq!(sim.all_ids, ids);
        let new = &sim.nodes[5];
        assert_eq!(new.id, 6);
        assert!(new.core.as_ref().is_some_and(Node::joining));
        assert!(new.disk.joining && new.disk.log.is_empty());
        assert_eq!(
            new.clock.read(sim.now),
            sim.nodes[sim.idx(victim)].clock.read(sim.now)
        );
        for &n in &sim.all_ids {
            assert!(
                sim.link_latency.contains_key(&(n, 6)) && sim.link_latency.contains_key(&(6, n))
            );
        }
        // The leader accepted it (its latest configuration has it).
        let m = leader_membership(&sim);
        assert!(m.learners.contains(&6) && !m.contains(victim), "{m:?}");
        run_until(&mut sim, "node 6 added", |s| {
            s.inv.committed_member_since(6, 0)
        });
        run_until(&mut sim, "node 6 caught up", |s| {
            s.nodes[5].core.as_ref().is_some_and(|c| !c.joining())
        });
        assert!(sim.inv.removed_by(victim).is_some());
        // The old id is offered no more.
        let m = leader_membership(&sim);
        assert!(!sim
            .membership_options(&m)
            .contains(&MembershipChange::AddLearner(victim)));
        assert!(
            sim.report.violations.is_empty(),
            "{:?}",
            sim.report.violations
        );
        // Made to propose it, the harness reports it.
        let l = sim.leader_index().unwrap();
        sim.propose_membership(l, MembershipChange::AddLearner(victim));
        assert_eq!(sim.nodes.len(), 6, "a second machine for one removed node");
        assert_eq!(
            sim.report.violations,
            [format!(
                "harness: proposed adding node {victim} again, but the committed configuration \
                 ending at {} removed it: removed ids are never reused",
                sim.inv.removed_by(victim).unwrap()
            )]
        );
        let m = leader_membership(&sim);
        assert!(!m.contains(victim), "the core accepted it: {m:?}");
    }
}
