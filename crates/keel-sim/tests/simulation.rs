//! Simulated clusters under every fault mix: safety after every step,
//! linearizability and liveness per run. Seeds that once failed are kept as
//! regressions. A failing run prints the command that replays it.

use keel_core::TestingBugs;
use keel_sim::{run, FaultMix, Report, Scenario, SimConfig};

fn mix(name: &str) -> FaultMix {
    FaultMix::by_name(name).unwrap_or_else(|| panic!("no fault mix named {name}"))
}

/// Runs `seeds` seeds of one mix alternating 3 and 5 nodes; panics with the
/// replay commands of every failing seed. A history the linearizability
/// checker could not decide within its budget fails the seed too: an
/// unchecked history is not a pass.
fn sweep(name: &str, seeds: std::ops::Range<u64>) -> Vec<Report> {
    sweep_with(name, seeds, |_| {})
}

/// `sweep`, with each run's settings adjusted by `adjust`.
fn sweep_with(
    name: &str,
    seeds: std::ops::Range<u64>,
    adjust: impl Fn(&mut SimConfig),
) -> Vec<Report> {
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for seed in seeds {
        let nodes = if seed % 2 == 0 { 3 } else { 5 };
        let mut cfg = SimConfig::new(seed, nodes, mix(name));
        adjust(&mut cfg);
        let r = run(&cfg);
        if !r.ok() {
            failures.push(format!(
                "seed {seed}: {}\n  replay: {}",
                r.violations.join("\n  "),
                cfg.replay_command()
            ));
        } else if r.linearizability_unknown() {
            failures.push(format!(
                "seed {seed}: the linearizability check ran out of budget ({:?})\n  replay: {}",
                r.linearizability,
                cfg.replay_command()
            ));
        }
        reports.push(r);
    }
    assert!(
        failures.is_empty(),
        "{} failing seeds:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let ops: u64 = reports.iter().map(|r| r.ops_ok).sum();
    let elections: u64 = reports.iter().map(|r| r.elections).sum();
    println!(
        "{name}: {} seeds, {ops} ops, {elections} elections",
        reports.len()
    );
    assert!(ops > 0, "the workload completed no operation at all");
    reports
}

// 9 mixes × 65 seeds = 585 seeds per `cargo test` (and `transfers` in
// `leadership_transfers_under_faults`).
const SEEDS: u64 = 65;

#[test]
fn calm() {
    let reports = sweep("calm", 0..SEEDS);
    // Without faults, one election per run and no indeterminate operations.
    for r in &reports {
        assert_eq!(
            r.elections, 1,
            "seed {}: {} elections without faults",
            r.seed, r.elections
        );
        assert_eq!(r.ops_unknown, 0, "seed {}", r.seed);
        assert!(r.timers_fired > 0, "seed {}: no log timer fired", r.seed);
    }
}

#[test]
fn lossy_network() {
    sweep("lossy", 1000..1000 + SEEDS);
}

#[test]
fn partitions_asymmetric_and_cut_links() {
    let reports = sweep("partitions", 2000..2000 + SEEDS);
    let installed: u64 = reports.iter().map(|r| r.snapshots_installed).sum();
    let chunks: u64 = reports.iter().map(|r| r.snapshot_chunks).sum();
    assert!(installed > 0);
    assert!(
        chunks > 2 * installed,
        "snapshots should take several chunks ({chunks} for {installed})"
    );
}

#[test]
fn single_cut_link_does_not_thrash() {
    let reports = sweep("cut-link", 3000..3000 + SEEDS);
    // One cut link (Cloudflare 2020) may cost an election now and then, not
    // an election storm: pre-vote, check-quorum and stickiness hold it.
    for r in &reports {
        assert!(
            r.elections <= 5,
            "seed {}: {} elections from single cut links",
            r.seed,
            r.elections
        );
    }
}

#[test]
fn crashes_and_slow_disks() {
    let reports = sweep("crashes", 4000..4000 + SEEDS);
    assert!(reports.iter().map(|r| r.crashes).sum::<u64>() > 0);
}

/// `replicated` durability with power losses (the `power` mix): a node
/// loses what it had not synced and comes back amnesic, the leader often
/// crashing with it; nothing committed is lost.
#[test]
fn power_losses_in_replicated_mode() {
    let reports = sweep("power", 9000..9000 + SEEDS);
    let losses: u64 = reports.iter().map(|r| r.power_losses).sum();
    let lost: u64 = reports.iter().map(|r| r.entries_lost_to_power).sum();
    println!("power: {losses} power losses, {lost} written entries lost");
    assert!(
        losses > 0 && lost > 0,
        "{losses} power losses lost {lost} entries"
    );
}

/// Five-node `power` seed 9: a leader removed itself and stepped down
/// before the removal committed, holding entries the amnesic voters had
/// lost; no voter of the new configuration could be elected, and it did
/// not stand (see the core test
/// `a_leader_that_removed_itself_stands_while_the_removal_is_not_committed`).
#[test]
fn a_self_removed_leader_stands_after_power_losses() {
    let cfg = SimConfig::new(9, 5, mix("power"));
    let r = run(&cfg);
    assert!(
        r.ok(),
        "{:?}\n  replay: {}",
        r.violations,
        cfg.replay_command()
    );
}

/// Counting an amnesic voter's vote like any other's elects leaders
/// without entries only its lost acknowledgement had committed: caught.
#[test]
fn checkers_catch_votes_of_amnesic_voters_counted() {
    let bugs = TestingBugs {
        amnesia_ignored: true,
        ..TestingBugs::default()
    };
    let seed = caught_within(bugs, "power", 60);
    println!("amnesia-ignored caught at seed {seed}");
}

#[test]
fn clock_jumps() {
    sweep("clock", 5000..5000 + SEEDS);
}

#[test]
fn membership_changes_under_faults() {
    let reports = sweep("membership", 6000..6000 + SEEDS);
    assert!(reports.iter().map(|r| r.membership_changes).sum::<u64>() > 0);
    let leader_removals: u64 = reports.iter().map(|r| r.leader_removals).sum();
    println!("membership: {leader_removals} leader removals accepted");
    assert!(
        leader_removals > 0,
        "no run removed the leader: the hardest membership change went untested"
    );
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (notices, stopped, rejoined, added) = (
        sum(|r| r.removed_notices),
        sum(|r| r.removals_acted),
        sum(|r| r.rejoined),
        sum(|r| r.rejoined_members),
    );
    println!(
        "membership: {notices} removal notices, {stopped} removed nodes stopped, {rejoined} \
         rejoined under new ids ({added} added)"
    );
    assert!(
        notices > 0 && stopped > 0 && rejoined > 0,
        "removed nodes were not told, did not stop, or never joined again"
    );
    // Removed ids are never reused: a removed node's machine joins again
    // under a new id, which the leaders accept (the core refuses a removed
    // id), and most such additions commit.
    assert!(
        added * 2 > rejoined,
        "only {added} of {rejoined} nodes that joined again under new ids were added"
    );
}

#[test]
fn chaos() {
    sweep("chaos", 7000..7000 + SEEDS);
}

/// `FaultMix::impostors`: nodes started under removed ids (an operator's
/// mistake: `join = true`, an empty disk, never added), some of them met
/// by a stale leader set up for it (paused and cut off through the
/// removal of one of its two other voters, then reaching only the
/// impostor: with it, a majority of its configuration). Nothing breaks:
/// the impostors, still joining, ignore every leader that counts them as a
/// voter (`Stats::to_voter_ignored`), so no stale leader commits or
/// confirms a read with them; and neither the removed-ids check (an
/// impostor is in no configuration) nor the liveness checks (it never
/// joins) fire on them. With that defence off in the core (a joining node
/// following such a leader), these seeds fail: stale reads, committed
/// entries changed, replicas that applied different entries.
#[test]
fn impostors_under_removed_ids_get_nothing_from_stale_leaders() {
    let mut reports = sweep("membership", 12_000..12_000 + 40);
    reports.extend(sweep("chaos", 13_000..13_000 + 40));
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (impostors, stopped, plots, met, stale, appends, ignored) = (
        sum(|r| r.impostors),
        sum(|r| r.impostors_stopped),
        sum(|r| r.impostor_plots),
        sum(|r| r.impostor_plots_met),
        sum(|r| r.stale_leaders_at_impostors),
        sum(|r| r.voter_appends_at_impostors),
        sum(|r| r.to_voter_ignored),
    );
    println!(
        "impostors: {impostors} started ({stopped} stopped again), {met} of {plots} plots met, \
         {stale} resumed stale leaders counting one as a voter, {appends} appends to them as a \
         voter's, {ignored} ignored"
    );
    assert!(
        impostors > 0 && stopped > 0,
        "no impostor started or stopped"
    );
    assert!(
        met > 0 && stale > 0,
        "no stale leader met an impostor: {met} of {plots} plots met"
    );
    assert!(
        appends > 0 && ignored >= appends,
        "impostors got {appends} appends as voters, and ignored {ignored}"
    );
}

/// `FaultMix::pauses`: processes stopped for up to six election timeouts
/// (the leader half the time) and resumed with long-due timers and a
/// backlog of messages, requests and disk completions, and messages
/// replayed seconds late (`FaultMix::stale_replays`). Nothing breaks, and
/// the windows open: paused leaders resume after a later leader was
/// elected, and reads reach them there (a core that confirms those reads
/// with echoes from before the pause is caught: see
/// `checkers_catch_a_read_confirmed_by_echoes_from_before_a_pause`).
#[test]
fn process_pauses() {
    let reports = sweep("pauses", 8000..8000 + SEEDS);
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (pauses, leaders, deposed, backlog, reads) = (
        sum(|r| r.pauses),
        sum(|r| r.leaders_paused),
        sum(|r| r.resumed_deposed),
        sum(|r| r.events_after_pause),
        sum(|r| r.reads_at_deposed_leaders),
    );
    println!(
        "pauses: {pauses} processes paused ({leaders} leaders, {deposed} resumed deposed), \
         {backlog} events waiting, {reads} reads at deposed leaders"
    );
    assert!(reports.iter().all(|r| r.pauses >= 2), "runs without pauses");
    assert!(
        leaders * 4 >= pauses,
        "{leaders} of {pauses} pauses hit a leader"
    );
    assert!(
        deposed >= SEEDS / 4,
        "only {deposed} paused leaders resumed deposed"
    );
    assert!(
        backlog >= 10 * pauses,
        "{backlog} events waited for {pauses} pauses"
    );
    assert!(
        reads > 0,
        "no read reached a paused leader deposed meanwhile"
    );
    // Stale replays: messages delivered again seconds late, some into a
    // later term than theirs.
    let (replays, older) = (sum(|r| r.stale_replays), sum(|r| r.replays_of_older_terms));
    println!("pauses: {replays} messages replayed late, {older} into a later term");
    assert!(
        replays >= 5 * SEEDS && older * 10 >= replays,
        "{older} of {replays} late replays reached a later term"
    );
}

/// Leader-lease reads under every fault mix, each node's clock running at
/// a rate off true time by up to the drift bound the nodes assume (the
/// clock nemesis changes rates instead of stepping clocks).
#[test]
fn lease_reads_under_every_fault_mix_with_clocks_drifting_within_the_bound() {
    let bound = keel_core::Config::new(1, 0).clock_drift_ppm;
    let mut lease_reads = 0;
    for (i, m) in FaultMix::all().iter().enumerate() {
        let start = 9000 + 100 * i as u64;
        let reports = sweep_with(m.name, start..start + 20, |cfg| {
            cfg.lease_reads = true;
            cfg.clock_drift_ppm = bound;
        });
        lease_reads += reports.iter().map(|r| r.lease_reads).sum::<u64>();
    }
    println!("{lease_reads} reads answered under a lease");
    assert!(lease_reads > 0, "no read was answered under a lease");
}

/// A follower loses its disk and rejoins (`Scenario`): within the
/// scenario's bound it must have applied everything committed before it
/// rejoined, through a snapshot install, and it must hear from the leader
/// at least every election timeout (so it never starts a pre-vote).
fn wiped_follower(sc: Scenario, m: &str, seeds: std::ops::Range<u64>) -> Vec<Report> {
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for seed in seeds {
        let nodes = if seed % 2 == 0 { 3 } else { 5 };
        let cfg = SimConfig::scenario(seed, nodes, mix(m), sc);
        let r = run(&cfg);
        let rejoined = r
            .wiped
            .as_ref()
            .is_some_and(|w| w.pre_votes == 0 && w.snapshots_installed >= 1);
        if !r.ok() || !rejoined || r.linearizability_unknown() {
            failures.push(format!(
                "seed {seed}: {}\n  wiped: {:?}\n  replay: {}",
                r.violations.join("\n  "),
                r.wiped,
                cfg.replay_command()
            ));
        }
        reports.push(r);
    }
    assert!(
        failures.is_empty(),
        "{} failing seeds:\n{}",
        failures.len(),
        failures.join("\n")
    );
    reports
}

/// The wiped node rejoins once the cluster is idle. Every seed failed
/// before heartbeats went to followers whose matched position the leader
/// had compacted away: the leader sent the wiped node nothing at all (seeds
/// 1 and 2 are kept in `regression_seeds`).
#[test]
fn a_wiped_follower_rejoins_an_idle_cluster() {
    wiped_follower(Scenario::WipedFollowerIdle, "calm", 0..30);
}

/// The wiped node rejoins while writes go on, snapshots are taken every
/// 1 KiB and their files are published 150-400 ms late, so the leader's
/// newest snapshot is nearly always unpublished. Every seed failed while
/// the leader waited for its newest snapshot's file before sending any
/// (seeds 1 and 2 are kept in `regression_seeds`); now it sends the newest
/// published file and then the log after it.
#[test]
fn a_wiped_follower_rejoins_under_load_while_snapshot_files_are_published_late() {
    let reports = wiped_follower(Scenario::WipedFollowerUnderLoad, "calm", 0..30);
    let behind: u64 = reports
        .iter()
        .map(|r| r.snapshot_chunks_behind_newest)
        .sum();
    assert!(
        behind > 0,
        "no chunk was sent while a newer snapshot was unpublished: the scenario tests nothing"
    );
}

/// Both wiped-follower scenarios over a lossy network. Seeds 37, 131, 183,
/// 202, 250, 253 and 291 of the idle one failed until a stalled pipeline
/// was noticed: the appends that followed the snapshot install were lost,
/// heartbeats at the matched position were accepted, and the follower
/// stayed behind while the cluster was idle (37 and 202 are kept in
/// `regression_seeds`).
#[test]
fn a_wiped_follower_rejoins_over_a_lossy_network() {
    for sc in [
        Scenario::WipedFollowerIdle,
        Scenario::WipedFollowerUnderLoad,
    ] {
        wiped_follower(sc, "lossy", 0..30);
    }
}

/// Seeds that failed during development. 52, 100, 636, 764: the simulated
/// disk mishandled a snapshot newer than its synced log. 111063: a follower
/// kept its matched position when the same node led again in a new term
/// and committed stale entries (see also the core test
/// `matched_position_does_not_survive_a_new_term_of_the_same_leader`).
/// Wiped-follower scenarios: the leader sent a wiped follower behind its
/// compacted log nothing (see `a_wiped_follower_rejoins_an_idle_cluster`),
/// or no snapshot while its newest one was unpublished (see
/// `a_wiped_follower_rejoins_under_load_while_snapshot_files_are_published_late`),
/// or never noticed that its appends were lost (see
/// `a_wiped_follower_rejoins_over_a_lossy_network`).
#[test]
fn regression_seeds() {
    for (seed, nodes, m) in [
        (52, 3, "crashes"),
        (100, 3, "crashes"),
        (636, 5, "crashes"),
        (764, 5, "crashes"),
        (111063, 3, "chaos"),
        // A restarted node (commit back at 0) told a learner that had lost
        // the entry adding it (it restarted mid catch-up) that the initial
        // configuration excluded it; the learner stopped. (The seed has
        // not reached that scenario since membership draws changed before
        // ids became unique: node 4 is never added. Kept as a seed check;
        // the core tests of that fix cover it.)
        (10404, 3, "membership"),
    ] {
        // As found: some of these seeds now draw a preferred set.
        let mut cfg = SimConfig::new(seed, nodes, mix(m));
        cfg.no_preferred_leaders();
        let r = run(&cfg);
        assert!(
            r.ok(),
            "seed {seed}: {:?}\n  replay: {}",
            r.violations,
            cfg.replay_command()
        );
    }
    // Found when a removed node's machine joined again under its old id
    // with an empty disk: the new node, still joining, granted its vote to
    // node 2, paused through the removal, which still counted the id as a
    // voter and won without the log the cluster had committed since
    // (joining nodes do not vote). Ids are never reused now: node 2 is
    // still paused through node 1's removal, and node 1's machine still
    // joins again meanwhile, but as node 6, which no configuration of
    // node 2's counts.
    let mut cfg = SimConfig::new(10621, 3, mix("chaos"));
    cfg.no_preferred_leaders();
    let r = run(&cfg);
    assert!(
        r.ok() && r.pauses > 0 && r.rejoined > 0 && r.rejoined_members > 0,
        "seed 10621: {} paused, {} rejoined under new ids ({} added): {:?}\n  replay: {}",
        r.pauses,
        r.rejoined,
        r.rejoined_members,
        r.violations,
        cfg.replay_command()
    );
    // A stale leader of term 2, resumed from a pause, took the first append
    // of term 3's leader: in one step it became a follower, cut its log
    // and learned a commit position from that leader. The commit check for
    // leaders judged that commit against the stale node's configuration
    // (a removal later in the new leader's log had already shrunk the
    // quorum it committed with): a false violation. Only a commit advanced
    // in the term the node led is checked against its own configuration.
    let mut cfg = SimConfig::new(81002632, 5, mix("chaos"));
    cfg.force_preferred_leaders();
    let r = run(&cfg);
    assert!(
        r.ok() && r.impostors > 0,
        "seed 81002632: {} impostors: {:?}\n  replay: {}",
        r.impostors,
        r.violations,
        cfg.replay_command()
    );
    // A follower's snapshot compacted its whole simulated log in the same
    // disk sync that wrote its newest entry, and the simulator then
    // reported nothing durable: the follower acknowledged nothing past its
    // older entries until its next write, so the preferred voter it was
    // never caught up, the leader's hand-over to it ran out and the core
    // backed off past the check's bound. (The runtime reports the log's
    // end, compacted or not.)
    let cfg = SimConfig::new(95000953, 5, mix("regions"));
    let r = run(&cfg);
    assert!(
        r.ok() && r.preference_transfers > 0,
        "seed 95000953: {} preference transfers: {:?}\n  replay: {}",
        r.preference_transfers,
        r.violations,
        cfg.replay_command()
    );
    // A candidate of term 4 paused just after asking for votes, and read
    // them (it won) only after a leader of term 5 had committed more: the
    // leader-completeness check wrongly asked it to hold that too. (Before
    // stale replays joined the `pauses` mix.)
    let mut pauses = mix("pauses");
    pauses.stale_replays = 0.0;
    let mut cfg = SimConfig::new(284, 3, pauses);
    cfg.no_preferred_leaders();
    let r = run(&cfg);
    assert!(r.ok() && r.pauses > 0, "seed 284: {:?}", r.violations);
    for (seed, nodes, m, sc) in [
        (1, 3, "calm", Scenario::WipedFollowerIdle),
        (2, 3, "calm", Scenario::WipedFollowerIdle),
        (1, 3, "calm", Scenario::WipedFollowerUnderLoad),
        (2, 3, "calm", Scenario::WipedFollowerUnderLoad),
        (37, 3, "lossy", Scenario::WipedFollowerIdle),
        (202, 5, "lossy", Scenario::WipedFollowerIdle),
    ] {
        let cfg = SimConfig::scenario(seed, nodes, mix(m), sc);
        let r = run(&cfg);
        assert!(
            r.ok(),
            "seed {seed}: {:?}\n  replay: {}",
            r.violations,
            cfg.replay_command()
        );
    }
}

#[test]
fn same_seed_replays_exactly() {
    for (seed, m) in [(77, "chaos"), (8001, "pauses"), (5, "regions")] {
        let cfg = SimConfig::new(seed, 5, mix(m));
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!(
            (a.preference_transfers, a.region_blips),
            (b.preference_transfers, b.region_blips)
        );
        assert_eq!(
            (a.ops_ok, a.messages, a.elections, a.crashes, a.sim_time),
            (b.ops_ok, b.messages, b.elections, b.crashes, b.sim_time)
        );
        assert_eq!(
            (a.pauses, a.events_after_pause),
            (b.pauses, b.events_after_pause)
        );
    }
}

/// The checkers are not vacuous: a core that commits without a majority, or
/// votes without comparing logs, is caught within a bounded number of seeds
/// by a safety invariant or the linearizability checker (a liveness failure
/// alone does not count: a broken core must be caught for what it breaks).
/// Each run stops at its first safety violation, as `keel-sim --bug` does.
fn caught_within(bugs: TestingBugs, m: &str, max_seeds: u64) -> u64 {
    for seed in 0..max_seeds {
        let mut cfg = SimConfig::new(seed, if seed % 2 == 0 { 3 } else { 5 }, mix(m));
        cfg.bugs = bugs;
        cfg.stop_at_first_violation = true;
        let r = run(&cfg);
        if let Some(v) = r.safety_violations().first() {
            println!("{bugs:?}: seed {seed}: {v}");
            return seed;
        }
    }
    panic!("{bugs:?} was not caught by a safety or linearizability check within {max_seeds} seeds of mix {m}");
}

#[test]
fn checkers_catch_commit_without_quorum() {
    let bugs = TestingBugs {
        commit_without_quorum: true,
        ..TestingBugs::default()
    };
    let seed = caught_within(bugs, "partitions", 30);
    println!("commit-without-quorum caught at seed {seed}");
}

/// Telling a node it was removed before the configuration that removed it
/// has committed (the change may yet be lost) is caught.
#[test]
fn checkers_catch_removal_before_commit() {
    let bugs = TestingBugs {
        removal_before_commit: true,
        ..TestingBugs::default()
    };
    let seed = caught_within(bugs, "membership", 20);
    println!("removal-before-commit caught at seed {seed}");
}

#[test]
fn checkers_catch_vote_without_log_check() {
    let bugs = TestingBugs {
        vote_without_log_check: true,
        ..TestingBugs::default()
    };
    let seed = caught_within(bugs, "partitions", 60);
    println!("vote-without-log-check caught at seed {seed}");
}

/// Runs seeds `seeds` of each of `mixes` (3 and 5 nodes alternating) with
/// `bugs`, each stopping at its first safety violation (as `keel-sim --bug`
/// does), and asserts that a broken core is caught for what it breaks: in
/// at least `min_percent`% of the runs the first safety violation is of
/// the intended kind (contains one of `kinds`), and no run panics (a panic
/// of the broken core later in a run can no longer hide what the checkers
/// found first). The share is well below the rate measured over 40 seeds
/// of each mix, so that no particular seed matters.
fn assert_caught_as(
    bugs: TestingBugs,
    mixes: &[&str],
    seeds: std::ops::Range<u64>,
    kinds: &[&str],
    min_percent: usize,
) {
    let (mut runs, mut caught) = (0, 0);
    let mut otherwise = Vec::new();
    for &m in mixes {
        for seed in seeds.clone() {
            let nodes = if seed % 2 == 0 { 3 } else { 5 };
            let mut cfg = SimConfig::new(seed, nodes, mix(m));
            cfg.bugs = bugs;
            cfg.stop_at_first_violation = true;
            let r = run(&cfg);
            runs += 1;
            assert!(
                r.panicked.is_none(),
                "{bugs:?}: seed {seed} ({nodes} nodes, mix {m}) panicked: {:?}\n  replay: {}",
                r.violations,
                cfg.replay_command()
            );
            match r.safety_violations().first() {
                Some(v) if kinds.iter().any(|k| v.contains(k)) => {
                    assert!(r.stopped_at.is_some(), "seed {seed}: the run went on");
                    caught += 1;
                }
                Some(v) => otherwise.push(format!("seed {seed} ({m}): {v}")),
                None => {}
            }
        }
    }
    println!(
        "caught as {kinds:?} in {caught} of {runs} runs; first caught otherwise: {otherwise:?}"
    );
    assert!(
        caught * 100 >= runs * min_percent,
        "{bugs:?} was caught as {kinds:?} in only {caught} of {runs} runs of {mixes:?} \
         (at least {min_percent}% expected); caught otherwise: {otherwise:?}"
    );
}

/// Handing entries out again from the position the service reported
/// applied, rather than from what was already handed out, applies entries
/// twice while the service's reports are late (every seed of every mix).
#[test]
fn checkers_catch_entries_handed_out_again_from_applied() {
    let bugs = TestingBugs {
        apply_from_applied: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["calm", "lossy", "crashes"],
        0..16,
        &["again (it had applied up to"],
        100,
    );
}

/// A read confirmed with one heartbeat echo fewer than a quorum is answered
/// by an isolated leader that a majority has already replaced (caught in
/// 60-95% of the seeds of the mixes that isolate leaders).
#[test]
fn checkers_catch_a_read_confirmed_one_echo_short_of_a_quorum() {
    let bugs = TestingBugs {
        read_quorum_off_by_one: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["lossy", "partitions", "chaos"],
        0..16,
        &["stale read:", "not linearizable"],
        40,
    );
}

/// A read that starts no heartbeat round of its own is confirmed by echoes
/// sent before it arrived, so a leader deposed since answers it.
#[test]
fn checkers_catch_a_read_confirmed_by_an_earlier_heartbeat_round() {
    let bugs = TestingBugs {
        read_without_new_round: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["lossy", "partitions", "chaos"],
        0..16,
        &["stale read:", "not linearizable"],
        40,
    );
}

/// A paused leader that resumes after a majority elected another must not
/// confirm reads with the heartbeat echoes it got before the pause (a read
/// starts a round of its own): with the `pauses` mix alone (no isolated
/// leaders), a core that does is caught in about 1 in 8 seeds.
#[test]
fn checkers_catch_a_read_confirmed_by_echoes_from_before_a_pause() {
    let bugs = TestingBugs {
        read_without_new_round: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["pauses"],
        0..64,
        &["stale read:", "not linearizable"],
        4,
    );
}

/// A read index at the applied position, not the commit, misses writes
/// committed (and answered) but not yet applied here (every seed).
#[test]
fn checkers_catch_a_read_index_at_applied() {
    let bugs = TestingBugs {
        read_index_at_applied: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["calm", "lossy", "crashes"],
        0..16,
        &["stale read:", "not linearizable"],
        100,
    );
}

/// A follower that installs a snapshot below its commit position (a late
/// copy of an old transfer) moves its commit back (caught in 40-85% of the
/// seeds of these mixes). Run on, such a core applies entries whose data it
/// dropped and trips its own debug assertion ("hollow entries to apply")
/// in some seeds: that panic fails the seed with the finding kept, and
/// does not end the caller.
#[test]
fn checkers_catch_a_snapshot_installed_below_the_commit() {
    let bugs = TestingBugs {
        install_snapshot_below_commit: true,
        ..TestingBugs::default()
    };
    assert_caught_as(
        bugs,
        &["partitions", "chaos", "crashes"],
        0..16,
        &["commit moved back"],
        25,
    );
    let mut panics = 0;
    for seed in 0..16 {
        let nodes = if seed % 2 == 0 { 3 } else { 5 };
        let mut cfg = SimConfig::new(seed, nodes, mix("chaos"));
        cfg.bugs = bugs;
        let r = run(&cfg);
        if r.panicked.is_some() {
            panics += 1;
            let last = r.violations.last().map(String::as_str).unwrap_or("");
            assert!(
                last.starts_with("panic: the run panicked at")
                    && last.contains("stepping node")
                    && !r.ok(),
                "seed {seed}: {:?}",
                r.violations
            );
            assert!(
                r.safety_violations()
                    .iter()
                    .any(|v| v.contains("commit moved back")),
                "seed {seed}: the panic hid the finding: {:?}",
                r.violations
            );
        }
    }
    println!("{panics} of 16 chaos seeds run on past the violation panicked");
}

#[test]
fn linearizability_checker_catches_stale_reads() {
    for seed in 0..40 {
        let mut cfg = SimConfig::new(seed, 3, mix("partitions"));
        cfg.unsafe_local_reads = true;
        let r = run(&cfg);
        if r.violations.iter().any(|v| v.contains("not linearizable")) {
            println!("stale reads caught at seed {seed}");
            return;
        }
    }
    panic!("reads served without read-index were never caught as non-linearizable");
}

/// A lease that outlasts the voters' stickiness: an old leader cut off
/// from a majority goes on answering reads from its lease after the
/// majority elected a new leader, and the linearizability checker sees the
/// stale reads. (Five nodes: with three, a cut-off leader leaves two nodes
/// that partitions often split as well, so a new leader rarely overlaps.)
#[test]
fn linearizability_checker_catches_a_lease_that_outlasts_stickiness() {
    for seed in 0..200 {
        let mut cfg = SimConfig::new(seed, 5, mix("partitions"));
        cfg.lease_reads = true;
        cfg.bugs.lease_outlasts_stickiness = true;
        cfg.clients = 12;
        cfg.keys = 2;
        let r = run(&cfg);
        if r.violations.iter().any(|v| v.contains("not linearizable")) {
            println!("stale lease reads caught at seed {seed}");
            return;
        }
    }
    panic!("a lease outlasting the voters' stickiness was never caught");
}

/// Lease reads' worst case (`Scenario::LeaseSlowLeader`): clocks drift by
/// up to 10%, and again and again the leader gets the slowest clock and
/// the voters the fastest, then it is cut off from them (a minority of them
/// lost it earlier and stand for election early; one of those it kept
/// restarts at the cut). The reading clients stay with it and are answered
/// by its lease alone while the voters elect a new leader and the writing
/// clients write there: no read may miss those writes. And the cut-off leader's
/// last read comes at least 800 ms after the cut but no later than a fast
/// voter's stickiness ends (1 s / 1.1; the simulator reports a later one
/// as a violation): its lease lasts nearly as long as it may and never
/// longer. This timing check catches a lease 0.5% too long at once; the
/// linearizability checker needs a lease about 10% too long, so that a
/// new leader can be elected and write inside the overrun.
#[test]
fn lease_reads_stay_linearizable_when_a_slow_clocked_leader_is_cut_off_from_fast_voters() {
    let reports = sweep_with("calm", 0..40, |cfg| Scenario::LeaseSlowLeader.apply(cfg));
    let cuts: u64 = reports.iter().map(|r| r.leaders_cut_off).sum();
    let exposed: u64 = reports.iter().map(|r| r.reads_while_cut_off).sum();
    println!("{cuts} leaders cut off, {exposed} reads answered by them while cut off");
    // A read later than a fast voter's stickiness (1 s / 1.1 of true time
    // from the cut) is a violation the sweep fails on; this checks that the
    // leases last nearly that long.
    for r in &reports {
        assert!(
            r.leaders_cut_off >= 3,
            "seed {}: {} cuts",
            r.seed,
            r.leaders_cut_off
        );
        assert!(
            r.last_read_after_cut >= 800_000_000,
            "seed {}: a cut-off leader answered its last read {:.3} ms after the cut: \
             its lease should last nearly as long as the voters' stickiness (909 ms)",
            r.seed,
            r.last_read_after_cut as f64 / 1e6
        );
    }
}

/// The scenario above is sharp: a lease that leaves no margin for clock
/// drift (it lasts `election_timeout_min` on the slow leader's clock, ~20%
/// longer in true time than the fast voters' stickiness) is caught in the
/// first seed by all three lease checks: a read timed past the voters'
/// stickiness, a lease read after a later leader was elected, and a stale
/// read in the history. (The simulator's random mixes rarely catch it:
/// there fast-clocked nodes win elections, and a slow leader is deposed
/// within a message delay.)
#[test]
fn checkers_catch_a_lease_without_the_drift_margin() {
    let mut cfg = SimConfig::scenario(0, 3, mix("calm"), Scenario::LeaseSlowLeader);
    cfg.bugs.lease_ignores_drift = true;
    assert_caught_by_every_lease_check(&cfg, "a lease without the drift margin");
}

/// Runs `cfg` and asserts that all three lease checks report `what`: a read
/// timed past the voters' stickiness, a lease read after a later leader was
/// elected, and a stale read in the history.
fn assert_caught_by_every_lease_check(cfg: &SimConfig, what: &str) {
    let r = run(cfg);
    for check in [
        "past the voters' stickiness",
        "lease safety:",
        "not linearizable",
    ] {
        assert!(
            r.violations.iter().any(|v| v.contains(check)),
            "{what} was not caught by {check:?}: {:?}\n  replay: {}",
            r.violations,
            cfg.replay_command()
        );
    }
}

/// Election timeouts may differ between nodes (`uneven_timeouts`: node n's
/// are 1 + (n - 1) / 4 times the scenario's): each voter reports how long
/// it holds its vote, and a leader's lease counts on the quorum-th longest
/// of those stickiness windows, never on its own timeout. Under lease
/// reads' worst case, and under every fault mix, no read is stale and a
/// cut-off leader answers no read after its voters could elect another.
#[test]
fn leases_count_on_each_voters_own_stickiness_when_election_timeouts_differ() {
    let reports = sweep_with("calm", 100..120, |cfg| {
        Scenario::LeaseSlowLeader.apply(cfg);
        cfg.uneven_timeouts = true;
    });
    for r in &reports {
        assert!(
            r.leaders_cut_off >= 3,
            "seed {}: {} cuts",
            r.seed,
            r.leaders_cut_off
        );
    }
    let exposed: u64 = reports.iter().map(|r| r.reads_while_cut_off).sum();
    assert!(exposed > 0, "no cut-off leader answered a read");
    let bound = keel_core::Config::new(1, 0).clock_drift_ppm;
    for (i, m) in FaultMix::all().iter().enumerate() {
        let start = 9500 + 100 * i as u64;
        sweep_with(m.name, start..start + 6, |cfg| {
            cfg.lease_reads = true;
            cfg.clock_drift_ppm = bound;
            cfg.uneven_timeouts = true;
        });
    }
}

/// The test above fails for a leader that counts on its voters holding
/// their votes as long as its own election timeout: one whose timeout is
/// longer than its voters' answers reads after they elected a new leader,
/// and all three lease checks see it in seed 1. (In seed 0, since the
/// service's reports reach the core late, the new leader is elected just
/// after the overrun: only the timing check sees it there.)
#[test]
fn checkers_catch_a_lease_that_assumes_the_leaders_own_timeout() {
    let mut cfg = SimConfig::scenario(1, 3, mix("calm"), Scenario::LeaseSlowLeader);
    cfg.uneven_timeouts = true;
    cfg.bugs.lease_assumes_own_timeout = true;
    assert_caught_by_every_lease_check(&cfg, "a lease on the leader's own timeout");
}

/// Leadership transfers under faults (`transfers` mix: transfers to caught-up
/// and lagging voters, crashes, a cut link, loss; `TimeoutNow` messages
/// that arrive late, and leaders that hear nothing for a while after
/// sending one), with and without lease reads: most transfers complete,
/// and nothing breaks safety or linearizability.
#[test]
fn leadership_transfers_under_faults() {
    let mut asked = 0;
    let mut done = 0;
    for lease_reads in [false, true] {
        let reports = sweep_with("transfers", 0..40, |cfg| {
            cfg.lease_reads = lease_reads;
            if lease_reads {
                cfg.clock_drift_ppm = cfg.assumed_drift_ppm;
            }
        });
        asked += reports.iter().map(|r| r.transfers).sum::<u64>();
        done += reports.iter().map(|r| r.transfers_done).sum::<u64>();
    }
    println!("{done} of {asked} leadership transfers completed");
    assert!(
        done * 2 > asked,
        "only {done} of {asked} leadership transfers completed"
    );
}

/// The lease rules around leadership transfers, each broken on purpose, are
/// caught within a few seeds: a leader that keeps its lease after telling a
/// node to campaign by `Scenario::LeaseTransferCut` (the transfer runs out
/// at a leader cut off just after its `TimeoutNow`, with the lease from the
/// echoes it heard until then still running, and its reader reads on), and
/// a target that campaigns on a late `TimeoutNow` although it holds entries
/// appended after it (the leader took its lease back once the target
/// acknowledged them) by the `transfers` mix. (The mix alone caught a kept
/// lease first at seed 136 while a transferring leader refused its own
/// reads, and at seed 961 once it served them by a heartbeat round: few
/// reads were left for a kept lease to answer once the transfer ran out.)
#[test]
fn checkers_catch_lease_rules_broken_around_transfers() {
    // (bug, where it is looked for, in how many seeds)
    let cases = [
        (
            "lease-ignores-transfer",
            "--scenario lease-transfer-cut",
            50,
        ),
        ("stale-timeout-now", "--mix transfers", 100),
    ];
    let config = |how: &str, seed, nodes| {
        if how == "--mix transfers" {
            let mut cfg = SimConfig::new(seed, nodes, mix("transfers"));
            cfg.lease_reads = true;
            cfg.clock_drift_ppm = cfg.assumed_drift_ppm;
            cfg
        } else {
            SimConfig::scenario(seed, nodes, mix("calm"), Scenario::LeaseTransferCut)
        }
    };
    for (name, how, seeds) in cases {
        let (_, flag) = keel_sim::BUGS
            .into_iter()
            .find(|(n, _)| *n == name)
            .expect("a known bug");
        let caught = (0..seeds).find(|&seed| {
            let nodes = if seed % 2 == 0 { 3 } else { 5 };
            let mut cfg = config(how, seed, nodes);
            *flag(&mut cfg.bugs) = true;
            cfg.stop_at_first_violation = true;
            !run(&cfg).safety_violations().is_empty()
        });
        match caught {
            Some(seed) => println!("--bug {name} caught at seed {seed} ({how})"),
            None => panic!("--bug {name} was not caught in {seeds} seeds ({how})"),
        }
    }
}

/// `Scenario::LeaseTransferCut` on the correct core: four times a run, a
/// leader asked to hand over to a follower it cannot reach for 80-160 ms
/// sends `TimeoutNow` once the follower catches up, and is cut off just
/// then; the target is elected and commits the writes of the clients that
/// find it, while the old leader's transfer runs out and its reader goes
/// on reading there. The old leader gave its lease up when it sent
/// `TimeoutNow` and cannot confirm a heartbeat round, so it answers none
/// of those reads (it refuses them when it steps down): no violation over
/// 100 seeds of 3 and 5 nodes, and the pattern did happen in every seed
/// (transfers that ran out at a cut-off leader, reads that reached it
/// after), so the sweep does not pass for want of it.
#[test]
fn a_leader_cut_off_after_timeout_now_answers_no_read_once_its_transfer_runs_out() {
    let reports = sweep_with("calm", 0..100, |cfg| Scenario::LeaseTransferCut.apply(cfg));
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let cuts = sum(|r| r.transfer_cuts);
    let ran_out = sum(|r| r.transfers_ran_out_cut_off);
    let reads = sum(|r| r.reads_after_transfer_ran_out);
    let served = sum(|r| r.reads_served_after_transfer_ran_out);
    let refused = sum(|r| r.reads_refused_after_transfer_ran_out);
    println!(
        "{cuts} leaders cut off after TimeoutNow, {ran_out} still leading when their transfer \
         ran out; {reads} reads reached them after: {served} answered, {refused} refused"
    );
    for r in &reports {
        assert!(
            r.transfers_ran_out_cut_off >= 3 && r.reads_after_transfer_ran_out >= 3,
            "seed {}: {} transfers ran out at a cut-off leader ({} cut off), {} reads reached \
             it after",
            r.seed,
            r.transfers_ran_out_cut_off,
            r.transfer_cuts,
            r.reads_after_transfer_ran_out
        );
    }
    assert_eq!(
        served, 0,
        "a cut-off leader answered reads after its transfer"
    );
    assert!(refused > 0, "no read was refused after a transfer ran out");
}

/// The first of `seeds` whose run (configured by `cfg`) the lease-safety
/// check fails; panics if none does.
fn lease_safety_caught_in(seeds: std::ops::Range<u64>, cfg: impl Fn(u64) -> SimConfig) -> u64 {
    for seed in seeds.clone() {
        let r = run(&cfg(seed));
        if r.violations.iter().any(|v| v.contains("lease safety:")) {
            return seed;
        }
    }
    panic!("the lease-safety check fired in none of seeds {seeds:?}");
}

/// A voter forgets the leader it heard when it restarts, so it must hold
/// its vote for an election timeout after a start as well: without that
/// hold, the restarted voter of `Scenario::LeaseSlowLeader` votes for a
/// follower that lost the leader earlier, which becomes leader while the
/// cut-off leader still answers reads from its lease.
#[test]
fn checkers_catch_a_restarted_voter_that_votes_at_once() {
    let caught = lease_safety_caught_in(0..10, |seed| {
        let nodes = if seed % 2 == 0 { 3 } else { 5 };
        let mut cfg = SimConfig::scenario(seed, nodes, mix("calm"), Scenario::LeaseSlowLeader);
        cfg.bugs.no_restart_hold = true;
        cfg
    });
    println!("a voter without its restart hold caught at seed {caught}");
}

/// Election timeouts may change across a restart
/// (`restarts_change_timeouts`: a node's first restart halves them, the
/// next restores them). A voter restarted with a lower timeout holds its
/// vote for the one it reported before (its hard state keeps it until it
/// has run), so under lease reads' worst case, where a voter the cut-off
/// leader kept restarts, and under the crash mixes, no read is stale and
/// no leader answers one after a later leader was elected. Without that
/// (`restart_hold_ignores_old_timeout`) the lease-safety check fires.
#[test]
fn a_voter_restarted_with_a_lower_election_timeout_keeps_its_old_hold() {
    let reports = sweep_with("calm", 200..215, |cfg| {
        Scenario::LeaseSlowLeader.apply(cfg);
        cfg.restarts_change_timeouts = true;
    });
    let restarts: u64 = reports.iter().map(|r| r.crashes).sum();
    assert!(restarts >= 15, "only {restarts} restarts");
    // Found by the soak with each node's own timeouts: a node restarted
    // with a lower timeout held its vote for others but stood for election
    // itself after its new, shorter timeout, inside its old hold, and won
    // with the vote of a follower the cut-off leader had already lost.
    for seed in [4000021, 4000036, 4000054, 4000055] {
        let mut cfg = SimConfig::scenario(seed, 3, mix("calm"), Scenario::LeaseSlowLeader);
        cfg.restarts_change_timeouts = true;
        cfg.uneven_timeouts = true;
        let r = run(&cfg);
        assert!(
            r.ok(),
            "seed {seed}: {:?}\n  replay: {}",
            r.violations,
            cfg.replay_command()
        );
    }
    let bound = keel_core::Config::new(1, 0).clock_drift_ppm;
    for (m, start) in [("crashes", 9700), ("chaos", 9800)] {
        sweep_with(m, start..start + 10, |cfg| {
            cfg.lease_reads = true;
            cfg.clock_drift_ppm = bound;
            cfg.restarts_change_timeouts = true;
        });
    }
    let caught = lease_safety_caught_in(200..215, |seed| {
        let mut cfg = SimConfig::scenario(seed, 3, mix("calm"), Scenario::LeaseSlowLeader);
        cfg.restarts_change_timeouts = true;
        cfg.bugs.restart_hold_ignores_old_timeout = true;
        cfg
    });
    println!("a restart that forgot its old hold caught at seed {caught}");
}

/// Replicas that applied the same log hold the same service state, term
/// starts included: every new leader's term start pushes the pending key
/// timers out (as the KV store renews its leases), and a node whose
/// service ignored term starts (as a binary from before they were marked
/// would replay them: what the data directory's format gate stops) is
/// caught as a diverged replica.
#[test]
fn replicas_agree_on_term_starts_and_a_node_that_ignores_them_is_caught() {
    let reports = sweep("crashes", 300..306);
    let starts: u64 = reports.iter().map(|r| r.term_starts_applied).sum();
    assert!(starts >= 6, "only {starts} term starts applied");
    let mut cfg = SimConfig::new(300, 3, mix("crashes"));
    cfg.stale_binary = true;
    let r = run(&cfg);
    assert!(
        r.violations.iter().any(|v| v.contains("replicas diverged")),
        "a replica that ignores term starts was not caught: {:?}\n  replay: {}",
        r.violations,
        cfg.replay_command()
    );
}

/// The service applies each `Apply` at once, but its reports of what it
/// applied reach the core late, several at a time, as the runtime's
/// service thread's do: the core commits and hands out more entries
/// meanwhile. So a core that handed out entries from what it heard was
/// applied, rather than from what it had already handed out, applies
/// entries twice (the invariants' apply-once check), and one that took a
/// read's index from what it heard was applied confirms reads below the
/// commit (the stale-read check). With the reports heard at once neither
/// window ever opened.
#[test]
fn the_core_hears_late_what_the_service_applied() {
    for r in &sweep("calm", 0..6) {
        assert!(
            r.applies_ahead_of_reports > 10,
            "seed {}: only {} applies while the service's reports were late",
            r.seed,
            r.applies_ahead_of_reports
        );
    }
}

/// `FaultMix::isolate_leader`: a leader cut off from the majority (its
/// answers to the others cut or late) is deposed by check-quorum only one
/// to two election timeouts later, and the majority may elect another and
/// commit before that; a client that reads in a loop from the old leader
/// goes on reading there. Those reads must wait for a heartbeat round that
/// a quorum echoes: a leader that confirmed them with one echo too few, or
/// with the echoes of an earlier round, answers below the new leader's
/// commit (the stale-read check). Most runs of the `partitions` and
/// `lossy` mixes get such reads to a deposed leader (fewer of `chaos`,
/// whose crashes, clock jumps and membership changes get in the way).
#[test]
fn deposed_leaders_that_have_not_noticed_get_reads() {
    for m in ["partitions", "lossy"] {
        let reports = sweep(m, 100..120);
        let isolations: u64 = reports.iter().map(|r| r.leader_isolations).sum();
        let exposed = reports
            .iter()
            .filter(|r| r.reads_at_deposed_leaders > 0)
            .count();
        println!(
            "{m}: {isolations} leaders isolated; {exposed} of 20 runs read at a deposed leader"
        );
        assert!(
            exposed >= 10,
            "{m}: only {exposed} of 20 runs read at a deposed leader ({isolations} isolations)"
        );
    }
}

/// `FaultMix::late_copies`: most snapshot transfers under faults arrive a
/// second time, late, once the follower has installed the snapshot and
/// committed past it. A follower that installed such a copy would move its
/// commit back (the invariants' snapshot check): here the chunks reach
/// followers past them in most runs that install a snapshot.
#[test]
fn late_snapshot_chunks_reach_followers_past_them() {
    let reports = sweep("crashes", 200..240);
    let installs = reports.iter().filter(|r| r.snapshots_installed > 0).count();
    let exposed = reports
        .iter()
        .filter(|r| r.snapshot_chunks_below_commit > 0)
        .count();
    println!(
        "{exposed} of the {installs} runs that installed a snapshot got chunks below the commit"
    );
    assert!(
        installs >= 10 && exposed * 2 >= installs,
        "only {exposed} of the {installs} runs that installed a snapshot got chunks below the commit"
    );
}

// ----- preferred leaders (`SimConfig::preferred_leaders`) -------------------

/// `regions`: a cluster over two regions whose links blip (cut, or delayed
/// past the election timeout) until the heal, often electing a leader
/// outside the preferred region. After the heal a preferred voter leads
/// within the bound in every run, and the scenario is reached: many runs
/// heal with a leader outside the set, and leaders hand leadership back.
#[test]
fn regions_lead_from_the_writers_region_again_after_latency_blips() {
    let reports = sweep("regions", 0..160);
    let outcomes: Vec<_> = reports
        .iter()
        .filter_map(|r| r.preferred.as_ref())
        .collect();
    assert_eq!(
        outcomes.len(),
        reports.len(),
        "every regions run has a preferred set"
    );
    let skipped: Vec<_> = outcomes.iter().filter_map(|p| p.skipped.as_ref()).collect();
    assert!(
        skipped.is_empty(),
        "regions runs left unchecked: {skipped:?}"
    );
    let outside = outcomes.iter().filter(|p| p.outside_at_heal).count();
    let transfers: u64 = reports.iter().map(|r| r.preference_transfers).sum();
    let slowest = outcomes
        .iter()
        .filter_map(|p| p.led_after)
        .max()
        .unwrap_or(0);
    println!(
        "regions: {outside} of {} runs healed with a leader outside the set; {transfers} \
         preference transfers; a preferred voter led at the latest {} ms after the heal",
        reports.len(),
        slowest / 1_000_000
    );
    assert!(
        outside * 4 >= reports.len(),
        "only {outside} of {} runs healed with a leader outside the preferred set",
        reports.len()
    );
    assert!(
        transfers >= outside as u64,
        "{transfers} preference transfers for {outside} runs that healed outside the set"
    );
}

/// A preferred set in every run of every usual mix (`keel-sim
/// --preferred-leaders`): nothing breaks safety, and after the heal a
/// preferred voter leads within the bound wherever one is a running voter
/// of the final configuration. Runs whose final leader was elected through
/// an operator's transfer (`transfers`), or whose preferred ids were all
/// removed (`membership`, `chaos`), are skipped with their reason; most
/// runs are checked.
#[test]
fn preferred_leaders_under_every_fault_mix() {
    let (mut runs, mut checked, mut moved) = (0, 0, 0u64);
    let mut reasons = Vec::new();
    for m in FaultMix::all() {
        let reports = sweep_with(m.name, 500..520, |cfg| cfg.force_preferred_leaders());
        for r in &reports {
            let p = r.preferred.as_ref().expect("a preferred set was forced");
            runs += 1;
            match &p.skipped {
                None => checked += 1,
                Some(why) => {
                    // Only the cases the core is not asked to move
                    // leadership in.
                    assert!(
                        why.starts_with("no preferred id is a running voter")
                            || why.contains("an operator's transfer"),
                        "{}: seed skipped for {why}",
                        m.name
                    );
                    reasons.push(format!("{}: {why}", m.name));
                }
            }
            moved += r.preference_transfers;
        }
    }
    println!(
        "{checked} of {runs} runs checked, {moved} preference transfers; skipped: {reasons:?}"
    );
    assert!(
        checked * 10 >= runs * 7,
        "only {checked} of {runs} runs were checked; skipped: {reasons:?}"
    );
    assert!(
        moved > 0,
        "no leader ever handed leadership to a preferred voter"
    );
}

/// The preferred-leader check is not vacuous: with cores that are not told
/// the preferred set (as a build without the feature), `regions` runs that
/// heal with a leader outside the set keep it, and the check reports them,
/// as liveness violations of its own kind and nothing else.
#[test]
fn the_preferred_leader_check_fires_when_the_core_ignores_the_preference() {
    let (mut runs, mut flagged, mut outside) = (0, 0, 0);
    for seed in 0..40 {
        let nodes = if seed % 2 == 0 { 3 } else { 5 };
        let mut cfg = SimConfig::new(seed, nodes, mix("regions"));
        cfg.core_ignores_preference = true;
        let r = run(&cfg);
        runs += 1;
        assert!(
            r.safety_violations().is_empty() && r.panicked.is_none(),
            "seed {seed}: {:?}\n  replay: {}",
            r.violations,
            cfg.replay_command()
        );
        let p = r
            .preferred
            .as_ref()
            .expect("regions runs have a preferred set");
        outside += usize::from(p.outside_at_heal);
        let ours = r
            .violations
            .iter()
            .filter(|v| v.starts_with("liveness: preferred leaders"))
            .count();
        assert_eq!(
            ours,
            r.violations.len(),
            "seed {seed}: other violations: {:?}",
            r.violations
        );
        if ours > 0 {
            assert_eq!(r.preference_transfers, 0);
            assert!(
                r.violations[0].contains("outside the set, still led at the end"),
                "seed {seed}: {:?}",
                r.violations
            );
            flagged += 1;
        }
    }
    println!("{flagged} of {runs} runs flagged ({outside} healed with a leader outside the set)");
    assert!(
        flagged * 4 >= runs,
        "only {flagged} of {runs} runs flagged with a core that ignores the preference"
    );
}

/// About a quarter of the seeds of the usual mixes draw a preferred set
/// (from a random stream of their own: the other seeds run as before), and
/// the replay command names a choice forced either way.
#[test]
fn preferred_sets_are_drawn_for_a_quarter_of_the_seeds_and_replayed() {
    let drawn = (0..400)
        .filter(|&seed| {
            !SimConfig::new(seed, 5, mix("chaos"))
                .preferred_leaders
                .is_empty()
        })
        .count();
    assert!(
        (60..=140).contains(&drawn),
        "{drawn} of 400 seeds drew a preferred set"
    );
    let mut off = SimConfig::new(1, 3, mix("crashes"));
    off.no_preferred_leaders();
    assert!(off.preferred_leaders.is_empty());
    assert!(off.replay_command().ends_with(" --preferred-leaders=false"));
    let mut cfg = SimConfig::new(1, 5, mix("calm"));
    cfg.force_preferred_leaders();
    assert!(!cfg.preferred_leaders.is_empty());
    assert!(cfg.replay_command().contains(" --preferred-leaders=true"));
    let regions = SimConfig::new(2, 5, mix("regions"));
    assert_eq!(regions.preferred_leaders, [1, 2].into());
}
