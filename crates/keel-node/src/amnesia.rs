//! Power losses in `replicated` durability. There an entry counts towards
//! commit once written to the OS, and is synced in the background: a
//! process crash loses none of it (the page cache survives), but a machine
//! that loses power comes back without what it had not synced, some of
//! which it may have acknowledged. Its vote could then elect a leader
//! without an entry that only its acknowledgement had made a quorum's.
//!
//! So at every start the node records the kernel's boot id and its
//! durability in [`BOOT_FILE`], and a graceful stop in `replicated` mode
//! that synced everything it wrote marks the record `synced`
//! ([`on_clean_stop`]). A start that finds another boot id after a run in
//! `replicated` mode that did not stop that way takes it that the machine
//! lost power (or crashed, or the process was killed before the machine
//! went down: the node cannot tell which): before anything else it
//! moves its hard state to the next term (`HardState::after_power_loss`)
//! and writes [`AMNESIC_FILE`]; while that file is there the node is
//! amnesic (`keel_core::Node::set_amnesic`): its votes count only beside
//! enough votes of voters that kept their logs, and it removes the file
//! once it has caught up with a leader elected since. (Opening the log
//! syncs what an earlier process left unsynced, so a run in `sync` mode
//! after one in `replicated` mode records `sync` safely.)

use keel_core::HardState;
use keel_log::meta::{self, HardStateFile};
use std::path::Path;
use tracing::warn;

use crate::config::DurabilityConfig;
use crate::runtime::NodeError;

/// The boot id of the machine's kernel when the node last started, and the
/// durability it ran with: `<boot id> <sync|replicated>`, followed by
/// `synced` once a run in `replicated` mode stopped gracefully with
/// everything it wrote synced (a reboot after that loses nothing).
pub const BOOT_FILE: &str = "BOOT";

/// Present while the node is amnesic: it restarted after a power loss in
/// `replicated` mode and has not caught up with a leader elected since.
pub const AMNESIC_FILE: &str = "AMNESIC";

/// The position of the latest membership entry the node knew was
/// committed and held durably (`keel_core::Node::settled_config`), in
/// decimal: elections count votes differently while the configuration in
/// force may not be committed, and a restart's commit position starts
/// over.
pub const SETTLED_CONFIG_FILE: &str = "SETTLED_CONFIG";

/// Where Linux gives the current boot's id (a random UUID per boot).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The current boot's id, if the kernel tells it.
fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// What [`BOOT_FILE`] said: the boot id of the last run.
#[derive(Debug, PartialEq)]
struct Recorded {
    boot: String,
    /// The run was in `replicated` mode...
    replicated: bool,
    /// ... and stopped gracefully with everything it wrote synced.
    synced: bool,
}

/// What [`BOOT_FILE`] said, if it exists. A file this version cannot read
/// counts as a run of another boot in `replicated` mode that did not stop
/// gracefully (the safe side); `warn`: says so in the log.
fn recorded(dir: &Path, warn: bool) -> Result<Option<Recorded>, NodeError> {
    let path = dir.join(BOOT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
        Err(e) => return Err(NodeError::Start(format!("reading {}: {e}", path.display()))),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let (replicated, synced) = match words.get(1..) {
        Some(["sync"]) => (false, false),
        Some(["replicated"]) => (true, false),
        Some(["replicated", "synced"]) => (true, true),
        _ => {
            if warn {
                warn!(
                    "{} is not `<boot id> <sync|replicated> [synced]`: taking it that the \
                     machine lost power during a run in replicated mode",
                    path.display()
                );
            }
            return Ok(Some(Recorded {
                boot: String::new(),
                replicated: true,
                synced: false,
            }));
        }
    };
    Ok(Some(Recorded {
        boot: words[0].to_string(),
        replicated,
        synced,
    }))
}

/// Whether the machine went down since the last run, which was in
/// `replicated` mode and did not stop with everything synced: `now` is the
/// current boot (`None`: the kernel does not tell, and a power loss cannot
/// be told from a crash).
fn lost_power(record: Option<&Recorded>, now: Option<&String>) -> bool {
    match (record, now) {
        (Some(r), Some(now)) => r.replicated && !r.synced && r.boot != *now,
        _ => false,
    }
}

/// How the machine went down since the last run, as a start sees it
/// before the log is opened (`went_down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WentDown {
    /// It did not, or it cannot be told.
    No,
    /// It lost power (or crashed) during a run in `replicated` mode that
    /// had not synced everything: `on_start` will find the node amnesic.
    PowerLost,
    /// It went down after a run in `sync` mode (maybe cut off by a power
    /// loss).
    AfterSyncRun,
}

impl WentDown {
    /// Whether the log's unsynced end may have holes (pages of a write, or
    /// of a sync in progress, reach the disk out of order), which the open
    /// then cuts (`keel_log::Options::cut_after_hole`). What that cuts is
    /// covered: after a power loss in `replicated` mode the node is
    /// amnesic anyway. After a `sync` run nothing at or after such a hole
    /// was acknowledged (an entry is, only once an fdatasync covering it
    /// returned, which made every page written before it durable), but a
    /// hole a damaged disk made in synced data looks the same, so a node
    /// whose log was cut at a hole counts as amnesic too
    /// (`keel_log::meta::HOLE_CUT_FILE`, `on_start`): a catch-up, where
    /// refusing the log cost a rebuild (after a power cut of a whole
    /// cluster, possibly of every node). Without a reboot such a log is
    /// still refused; an orderly reboot makes no hole.
    pub(crate) fn holes_possible(self) -> bool {
        self != WentDown::No
    }
}

/// At a start, before the log is opened: how the machine went down since
/// the last run (`WentDown`), from one read of [`BOOT_FILE`].
pub(crate) fn went_down(dir: &Path) -> Result<WentDown, NodeError> {
    let (record, now) = (recorded(dir, false)?, boot_id());
    Ok(if lost_power(record.as_ref(), now.as_ref()) {
        WentDown::PowerLost
    } else if rebooted_after_sync(record.as_ref(), now.as_ref()) {
        WentDown::AfterSyncRun
    } else {
        WentDown::No
    })
}

/// Whether the record is of a `sync` run on another boot than `now`.
fn rebooted_after_sync(record: Option<&Recorded>, now: Option<&String>) -> bool {
    match (record, now) {
        (Some(r), Some(now)) => !r.replicated && r.boot != *now,
        _ => false,
    }
}

/// At a start, before the core is built: whether the node is amnesic.
/// After a power loss it first writes `hard` moved to the next term, then
/// [`AMNESIC_FILE`]; last, the current boot in [`BOOT_FILE`] (a crash in
/// between finds the power loss again, and only raises the term again).
pub(crate) fn on_start(
    dir: &Path,
    durability: DurabilityConfig,
    hard: &mut HardStateFile,
    node_id: u64,
) -> Result<bool, NodeError> {
    on_boot(boot_id(), dir, durability, hard, node_id)
}

/// `on_start` on the boot `now` (`None`: the kernel does not tell).
fn on_boot(
    now: Option<String>,
    dir: &Path,
    durability: DurabilityConfig,
    hard: &mut HardStateFile,
    node_id: u64,
) -> Result<bool, NodeError> {
    let record = recorded(dir, true)?;
    let power = lost_power(record.as_ref(), now.as_ref());
    // The open cut the log at a hole (after a reboot following a `sync`
    // run: `WentDown::holes_possible`): what it cut was never acknowledged
    // unless the disk damaged synced data, which cannot be told apart.
    let hole_path = dir.join(meta::HOLE_CUT_FILE);
    let hole = hole_path
        .try_exists()
        .map_err(|e| NodeError::Start(format!("checking for {}: {e}", meta::HOLE_CUT_FILE)))?;
    let lost = power || hole;
    if now.is_none() && record.as_ref().is_some_and(|r| r.replicated && !r.synced) {
        warn!(
            "node {node_id}: cannot read {BOOT_ID_PATH}: a power loss since the last run in \
             replicated mode cannot be told from a crash"
        );
    }
    let start_error = |what: &str, e: keel_log::LogError| {
        let after = if power {
            "a power loss"
        } else {
            "a cut at a hole"
        };
        NodeError::Start(format!("after {after}, writing {what}: {e}"))
    };
    if lost {
        let before = hard.hard_state;
        hard.hard_state = HardState::after_power_loss(before);
        meta::save_hard_state(dir, hard).map_err(|e| start_error("the hard state", e))?;
        let why = if power {
            "its machine went down (boot id changed) following a run in replicated mode"
        } else {
            "its log was cut at a hole (a zeroed sector with data after it) after its machine \
             went down"
        };
        let text = format!(
            "Node {node_id} restarted after {why}: it may have lost log entries it had \
             acknowledged. Until it has caught up with a leader elected since (term {} on), its \
             votes count only beside enough votes of voters that kept their logs. The node \
             removes this file itself.\n",
            hard.hard_state.term
        );
        meta::write_atomic(dir, AMNESIC_FILE, text.as_bytes())
            .map_err(|e| start_error(AMNESIC_FILE, e))?;
        if hole {
            std::fs::remove_file(&hole_path)
                .map_err(|e| keel_log::LogError::io(&hole_path, "removing", e))
                .and_then(|()| meta::sync_dir(dir))
                .map_err(|e| start_error(meta::HOLE_CUT_FILE, e))?;
        }
        warn!(
            "node {node_id}: restarted after {why}: this node may have lost entries it had \
             acknowledged. It moves to term {} and votes as amnesic until it has caught up with \
             a leader elected since",
            hard.hard_state.term
        );
    }
    let amnesic = lost
        || dir
            .join(AMNESIC_FILE)
            .try_exists()
            .map_err(|e| NodeError::Start(format!("checking for {AMNESIC_FILE}: {e}")))?;
    if amnesic && !lost {
        warn!(
            "node {node_id}: {AMNESIC_FILE} is present: it has not caught up since a power loss, \
             and votes as amnesic until it has"
        );
    }
    let mode = match durability {
        DurabilityConfig::Sync => "sync",
        DurabilityConfig::Replicated => "replicated",
    };
    let write_boot = |text: String| {
        meta::write_atomic(dir, BOOT_FILE, text.as_bytes())
            .map_err(|e| NodeError::Start(format!("writing {BOOT_FILE}: {e}")))
    };
    match (now, record) {
        (Some(now), _) => write_boot(format!("{now} {mode}\n"))?,
        // The boot cannot be told: at least the mark of a graceful stop
        // must go, as this run may leave unsynced entries, and a record of
        // a `sync` run must not stand for a `replicated` one (a power loss
        // during this run would not be one).
        (None, Some(r))
            if r.synced || (durability == DurabilityConfig::Replicated && !r.replicated) =>
        {
            write_boot(format!("{} replicated\n", r.boot))?
        }
        (None, _) => {}
    }
    Ok(amnesic)
}

/// After a graceful stop whose storage synced everything it wrote (the
/// log; the hard state and the other files are synced as written): in
/// `replicated` mode, marks [`BOOT_FILE`] `synced`, so that a start on
/// another boot (the machine was rebooted) does not take it for a power
/// loss, which would cost the cluster an election and the node its vote
/// until it caught up. The next start records its boot without the mark
/// before the log takes a write.
pub(crate) fn on_clean_stop(dir: &Path, durability: DurabilityConfig) -> Result<(), String> {
    if durability != DurabilityConfig::Replicated {
        return Ok(());
    }
    let Some(now) = boot_id() else {
        return Ok(());
    };
    meta::write_atomic(
        dir,
        BOOT_FILE,
        format!("{now} replicated synced\n").as_bytes(),
    )
    .map_err(|e| format!("writing {BOOT_FILE}: {e}"))
}

/// What [`SETTLED_CONFIG_FILE`] records (0 if nothing, or if it cannot be
/// read: the safe side, with a warning).
pub(crate) fn settled_config(dir: &Path) -> u64 {
    let path = dir.join(SETTLED_CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            warn!(
                "{} does not hold a log position: taking the configuration in force as not \
                 known to be committed",
                path.display()
            );
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            warn!("reading {}: {e}", path.display());
            0
        }
    }
}

/// Records `position` in [`SETTLED_CONFIG_FILE`] (atomically, synced).
pub(crate) fn record_settled_config(dir: &Path, position: u64) -> Result<(), String> {
    meta::write_atomic(dir, SETTLED_CONFIG_FILE, format!("{position}\n").as_bytes())
        .map_err(|e| format!("writing {SETTLED_CONFIG_FILE}: {e}"))
}

/// The node is no longer amnesic: removes [`AMNESIC_FILE`] (durably).
pub(crate) fn caught_up(dir: &Path) -> Result<(), String> {
    let path = dir.join(AMNESIC_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    meta::sync_dir(dir).map_err(|e| format!("after removing {AMNESIC_FILE}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::Membership;

    fn hard() -> HardStateFile {
        HardStateFile {
            hard_state: HardState {
                term: 5,
                voted_for: Some(2),
                hold: 7,
            },
            membership: Membership::new([1, 2, 3]),
        }
    }

    fn start(dir: &Path, durability: DurabilityConfig, h: &mut HardStateFile) -> bool {
        on_start(dir, durability, h, 1).expect("start")
    }

    /// This boot's id and an empty data directory.
    fn this_boot() -> (String, tempfile::TempDir) {
        let Some(now) = boot_id() else {
            panic!("{BOOT_ID_PATH} is unreadable: these tests need Linux");
        };
        (now, tempfile::tempdir().expect("tempdir"))
    }

    #[test]
    fn a_new_boot_after_a_replicated_run_makes_the_node_amnesic_until_it_catches_up() {
        let (now, tmp) = this_boot();
        let dir = tmp.path();
        let mut h = hard();
        // First start: nothing recorded.
        assert!(!start(dir, DurabilityConfig::Replicated, &mut h));
        assert_eq!(
            std::fs::read_to_string(dir.join(BOOT_FILE)).expect("BOOT"),
            format!("{now} replicated\n")
        );
        // A restart on the same boot (a process crash): not amnesic.
        assert!(!start(dir, DurabilityConfig::Replicated, &mut h));
        assert_eq!(h.hard_state, hard().hard_state);
        // Another boot: amnesic, the next term written with no vote.
        std::fs::write(dir.join(BOOT_FILE), "another-boot replicated\n").expect("write");
        assert!(start(dir, DurabilityConfig::Replicated, &mut h));
        let moved = HardState {
            term: 6,
            voted_for: None,
            hold: 7,
        };
        assert_eq!(h.hard_state, moved);
        let saved = meta::load_hard_state(dir).expect("load").expect("saved");
        assert_eq!(saved.hard_state, moved);
        assert!(dir.join(AMNESIC_FILE).exists());
        // A crash before catching up: still amnesic, the term kept.
        let mut again = saved.clone();
        assert!(start(dir, DurabilityConfig::Replicated, &mut again));
        assert_eq!(again.hard_state, moved);
        caught_up(dir).expect("caught up");
        assert!(!dir.join(AMNESIC_FILE).exists());
        assert!(!start(dir, DurabilityConfig::Replicated, &mut again));
    }

    #[test]
    fn a_new_boot_after_a_graceful_stop_that_synced_is_not_a_loss_once() {
        let (now, tmp) = this_boot();
        let dir = tmp.path();
        let mut h = hard();
        assert!(!start(dir, DurabilityConfig::Replicated, &mut h));
        on_clean_stop(dir, DurabilityConfig::Replicated).expect("stop");
        let boot = || std::fs::read_to_string(dir.join(BOOT_FILE)).expect("BOOT");
        assert_eq!(boot(), format!("{now} replicated synced\n"));
        // The machine rebooted after the graceful stop: nothing was lost.
        std::fs::write(dir.join(BOOT_FILE), "another-boot replicated synced\n").expect("write");
        assert!(!start(dir, DurabilityConfig::Replicated, &mut h));
        assert_eq!(h.hard_state, hard().hard_state);
        assert!(!dir.join(AMNESIC_FILE).exists());
        // The start took the mark away: the run after it may write
        // unsynced entries, and a power loss now is one.
        assert_eq!(boot(), format!("{now} replicated\n"));
        std::fs::write(dir.join(BOOT_FILE), "a-third-boot replicated\n").expect("write");
        assert!(start(dir, DurabilityConfig::Replicated, &mut h));
        // A graceful stop in `sync` mode leaves the record as it was
        // (every entry is synced before it counts there).
        caught_up(dir).expect("caught up");
        assert!(!start(dir, DurabilityConfig::Sync, &mut h));
        on_clean_stop(dir, DurabilityConfig::Sync).expect("stop");
        assert_eq!(boot(), format!("{now} sync\n"));
        // A mark on a record this version cannot otherwise read, or after
        // `sync`, is damage: the safe side.
        for damaged in ["another-boot synced\n", "another-boot sync synced\n"] {
            std::fs::write(dir.join(BOOT_FILE), damaged).expect("write");
            let mut h = hard();
            assert!(
                start(dir, DurabilityConfig::Replicated, &mut h),
                "{damaged:?}"
            );
            caught_up(dir).expect("caught up");
        }
    }

    #[test]
    fn a_start_that_cannot_tell_its_boot_records_what_a_power_loss_would_cost() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let mut h = hard();
        let replicated = DurabilityConfig::Replicated;
        std::fs::write(dir.join(BOOT_FILE), "boot-a replicated synced\n").expect("write");
        assert!(!on_boot(None, dir, replicated, &mut h, 1).expect("start"));
        let boot = std::fs::read_to_string(dir.join(BOOT_FILE)).expect("BOOT");
        assert_eq!(boot, "boot-a replicated\n");
        // That run may have left entries unsynced: another boot is a loss.
        assert!(on_boot(Some("boot-b".into()), dir, replicated, &mut h, 1).expect("start"));
        // Nor does a record of a `sync` run stand for a `replicated` one.
        caught_up(dir).expect("caught up");
        std::fs::write(dir.join(BOOT_FILE), "boot-a sync\n").expect("write");
        assert!(!on_boot(None, dir, replicated, &mut h, 1).expect("start"));
        let boot = std::fs::read_to_string(dir.join(BOOT_FILE)).expect("BOOT");
        assert_eq!(boot, "boot-a replicated\n");
        assert!(on_boot(Some("boot-b".into()), dir, replicated, &mut h, 1).expect("start"));
    }

    #[test]
    fn the_settled_configuration_round_trips_and_a_bad_record_reads_as_none() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        assert_eq!(settled_config(dir), 0);
        record_settled_config(dir, 12345).expect("record");
        assert_eq!(settled_config(dir), 12345);
        for bad in ["", "x\n", "-1", "1 2"] {
            std::fs::write(dir.join(SETTLED_CONFIG_FILE), bad).expect("write");
            assert_eq!(settled_config(dir), 0, "{bad:?}");
        }
    }

    /// A log cut at a hole (`HOLE_CUT_FILE`, written by the open before the
    /// cut) makes the node amnesic, as a power loss does, across a restart
    /// until it has caught up; the mark itself goes once that is recorded.
    #[test]
    fn a_log_cut_at_a_hole_makes_the_node_amnesic() {
        let (now, tmp) = this_boot();
        let dir = tmp.path();
        std::fs::write(dir.join(BOOT_FILE), format!("{now} sync\n")).expect("write");
        std::fs::write(dir.join(meta::HOLE_CUT_FILE), "cut\n").expect("write");
        let mut h = hard();
        assert!(start(dir, DurabilityConfig::Sync, &mut h));
        assert_eq!(h.hard_state.term, 6);
        assert!(dir.join(AMNESIC_FILE).exists());
        assert!(!dir.join(meta::HOLE_CUT_FILE).exists());
        // Still amnesic at the next start, without another term.
        assert!(start(dir, DurabilityConfig::Sync, &mut h));
        assert_eq!(h.hard_state.term, 6);
        caught_up(dir).expect("caught up");
        assert!(!start(dir, DurabilityConfig::Sync, &mut h));
    }

    /// A new boot after a `sync` run lets the open cut a hole in the log's
    /// end (and is no power loss); the same boot, a `replicated` run (a
    /// power loss, handled as one) or no record does not.
    #[test]
    fn a_new_boot_after_a_sync_run_lets_the_log_be_cut_at_a_hole() {
        let now = "boot-b".to_string();
        let rec = |boot: &str, replicated: bool| Recorded {
            boot: boot.into(),
            replicated,
            synced: false,
        };
        assert!(rebooted_after_sync(Some(&rec("boot-a", false)), Some(&now)));
        assert!(!rebooted_after_sync(
            Some(&rec("boot-b", false)),
            Some(&now)
        ));
        assert!(!rebooted_after_sync(Some(&rec("boot-a", true)), Some(&now)));
        assert!(!rebooted_after_sync(None, Some(&now)));
        assert!(!rebooted_after_sync(Some(&rec("boot-a", false)), None));
        assert!(!lost_power(Some(&rec("boot-a", false)), Some(&now)));
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tmp.path().join(BOOT_FILE),
            "another-boot sync
",
        )
        .expect("write");
        let want = match boot_id() {
            Some(_) => WentDown::AfterSyncRun,
            None => WentDown::No,
        };
        assert_eq!(went_down(tmp.path()).expect("read"), want);
    }

    #[test]
    fn a_new_boot_after_a_sync_run_is_not_a_loss_and_an_unreadable_record_is() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let mut h = hard();
        std::fs::write(dir.join(BOOT_FILE), "another-boot sync\n").expect("write");
        assert!(!start(dir, DurabilityConfig::Replicated, &mut h));
        assert_eq!(h.hard_state, hard().hard_state);
        for damaged in ["", "x", "a b c\n", "abc fast\n"] {
            std::fs::write(dir.join(BOOT_FILE), damaged).expect("write");
            let mut h = hard();
            assert!(start(dir, DurabilityConfig::Sync, &mut h), "{damaged:?}");
            assert_eq!(h.hard_state.term, 6, "{damaged:?}");
            caught_up(dir).expect("caught up");
        }
        std::fs::write(dir.join(BOOT_FILE), [0xff, 0xfe, b' ', b'x']).expect("write");
        assert!(start(dir, DurabilityConfig::Sync, &mut hard()));
    }
}
