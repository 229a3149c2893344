//! The data directory as a whole: one process at a time writes it (its
//! `LOCK`), it records the node and cluster it belongs to (`IDENTITY`), and
//! the errors about it and about backups say the right thing, once.

use bytes::Bytes;
use keel_core::{HardState, Membership};
use keel_log::meta::{self, HardStateFile, Identity};
use keel_log::{Durability, LogError, LogStore, Options, StorageThread};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const TORTURE: &str = env!("CARGO_BIN_EXE_keel-log-torture");

fn open(dir: &Path) -> Result<keel_log::Opened, LogError> {
    LogStore::open(dir, Options::default())
}

fn refused(r: Result<keel_log::Opened, LogError>) -> LogError {
    match r {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

/// An error and its sources, as anyhow's `{:#}` prints them (what `keel`
/// prints).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut at = e.source();
    while let Some(s) = at {
        out.push_str(&format!(": {s}"));
        at = s.source();
    }
    out
}

#[test]
fn a_second_open_is_refused_until_the_store_and_its_thread_are_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let first = open(&dir).expect("open");
    assert!(dir.join(keel_log::lock::LOCK_FILE).exists());

    let err = refused(open(&dir));
    let pid = std::process::id();
    assert!(
        matches!(&err, LogError::Locked { dir: d, holder: Some(p) } if *d == dir && *p == pid),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");

    // Dropped: the lock goes with it (a reopen, as the tests do).
    drop(first);
    let second = open(&dir).expect("reopen after drop");

    // Owned by the storage thread: held until the thread is stopped.
    let thread =
        StorageThread::spawn(second.store, Durability::Sync, |_| {}).expect("storage thread");
    assert!(matches!(refused(open(&dir)), LogError::Locked { .. }));
    thread.shutdown().expect("shutdown");
    let again = open(&dir).expect("reopen after the thread stopped");

    // A shutdown that keeps the lock: held until the caller drops it,
    // with what was written synced and readable.
    let thread =
        StorageThread::spawn(again.store, Durability::Replicated, |_| {}).expect("storage thread");
    let entry = keel_core::Entry {
        position: 0,
        term: 1,
        timestamp: 0,
        kind: keel_core::EntryKind::Command { client: 9, seq: 1 },
        data: Bytes::from_static(b"kept"),
    };
    thread.append(vec![entry]).expect("append");
    let lock = thread.shutdown_holding_lock().expect("shutdown");
    assert!(matches!(refused(open(&dir)), LogError::Locked { .. }));
    drop(lock);
    let reopened = open(&dir).expect("reopen after the lock was dropped");
    assert!(reopened.store.last_pos() > 0);
    drop(reopened);

    // What the lock file holds is not data: junk in it does not matter.
    std::fs::write(dir.join(keel_log::lock::LOCK_FILE), b"\x00junk").expect("write");
    let third = open(&dir).expect("open with a junk lock file");
    // (And a holder whose pid cannot be read is refused all the same.)
    std::fs::write(dir.join(keel_log::lock::LOCK_FILE), b"junk").expect("write");
    let err = refused(open(&dir));
    assert!(
        matches!(err, LogError::Locked { holder: None, .. }),
        "{err:?}"
    );
    drop(third);
}

/// Another process holds the lock while it runs, and loses it when it is
/// killed (no clean-up needed after a crash).
#[test]
fn another_process_holds_the_lock_until_it_dies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let mut child = Command::new(TORTURE)
        .arg("append")
        .arg(&dir)
        .arg("7")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keel-log-torture");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read");
    assert!(first.starts_with("opened"), "{first:?}");
    // Drained, so that the child goes on appending (and holding the lock).
    let drain = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));

    let err = refused(open(&dir));
    let msg = err.to_string();
    assert!(
        matches!(err, LogError::Locked { holder: Some(p), .. } if p == child.id()),
        "{msg}"
    );
    // A second writer process is refused too.
    let out = Command::new(TORTURE)
        .arg("append")
        .arg(&dir)
        .arg("8")
        .output()
        .expect("run keel-log-torture");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");

    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the child ended"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
    let _ = drain.join();
    let o = open(&dir).expect("open after the holder died");
    assert!(o.store.last_pos() > 0);
}

fn id(node_id: u64, cluster_id: u64) -> Identity {
    Identity {
        node_id,
        cluster_id,
    }
}

#[test]
fn a_data_directory_belongs_to_one_node_of_one_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let node1 = id(1, 99);
    // Recorded on the first open, before the node writes anything.
    drop(LogStore::open_as(&dir, Options::default(), node1).expect("first open"));
    assert_eq!(meta::load_identity(&dir).expect("load"), Some(node1));
    let hs = HardStateFile {
        hard_state: HardState {
            term: 4,
            voted_for: Some(1),
            hold: 0,
        },
        membership: Membership::new([1, 2, 3]),
    };
    meta::save_hard_state(&dir, &hs).expect("save");
    drop(LogStore::open_as(&dir, Options::default(), node1).expect("same node"));

    for (other, what) in [
        (id(5, 99), "configured as node 5 of cluster 0x63."),
        (id(1, 7), "configured as node 1 of cluster 0x7."),
    ] {
        let err = refused(LogStore::open_as(&dir, Options::default(), other));
        assert!(
            matches!(err, LogError::WrongIdentity { recorded, configured, .. }
                if recorded == node1 && configured == other),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(
            msg.contains("holds the data of node 1 of cluster 0x63,"),
            "{msg}"
        );
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains("empty data directory"), "{msg}");
        // Refused before anything changed.
        assert_eq!(meta::load_identity(&dir).expect("load"), Some(node1));
        assert_eq!(meta::load_hard_state(&dir).expect("load"), Some(hs.clone()));
    }

    // A damaged record is damage.
    let path = dir.join(meta::IDENTITY_FILE);
    let mut b = std::fs::read(&path).expect("read");
    b[6] ^= 1;
    std::fs::write(&path, b).expect("write");
    let err = refused(LogStore::open_as(&dir, Options::default(), node1));
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("IDENTITY"), "{err}");
}

/// A directory an older version wrote records no identity: it opens as
/// before, and records the node's from then on.
#[test]
fn a_directory_without_the_record_gets_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let o = open(&dir).expect("open");
    let hs = HardStateFile {
        hard_state: HardState {
            term: 2,
            voted_for: Some(3),
            hold: 0,
        },
        membership: Membership::new([1, 2, 3]),
    };
    meta::save_hard_state(&dir, &hs).expect("save");
    drop(o);
    assert_eq!(meta::load_identity(&dir).expect("load"), None);

    let o = LogStore::open_as(&dir, Options::default(), id(3, 1)).expect("old directory");
    assert_eq!(o.hard_state, Some(hs));
    drop(o);
    assert_eq!(meta::load_identity(&dir).expect("load"), Some(id(3, 1)));
    let err = refused(LogStore::open_as(&dir, Options::default(), id(2, 1)));
    assert!(matches!(err, LogError::WrongIdentity { .. }), "{err:?}");
}

/// The OS error of an I/O error is printed once, whether the error is
/// shown alone or with its sources.
#[test]
fn an_io_error_names_the_os_error_once() {
    let e = LogError::io(
        Path::new("/data/00000000000000000000.seg"),
        "syncing",
        std::io::Error::from_raw_os_error(28),
    );
    let os = std::io::Error::from_raw_os_error(28).to_string();
    for shown in [e.to_string(), chain(&e)] {
        assert_eq!(shown.matches(&os).count(), 1, "{shown}");
        assert!(shown.starts_with("/data/00000000000000000000.seg: syncing"));
    }
    // A real one.
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let err = refused(open(&file.join("data")));
    let shown = chain(&err);
    assert_eq!(shown.matches("(os error ").count(), 1, "{shown}");
}

/// A file that is not a backup is not a damaged data directory: its error
/// says so, and gives none of a data directory's recovery advice.
#[test]
fn a_bad_backup_gets_its_own_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("backup.keel");
    let s = keel_core::Snapshot {
        meta: keel_core::SnapshotMeta {
            position: 100,
            term: 2,
            timestamp: 5,
            membership: Membership::new([1, 2, 3]),
        },
        data: Bytes::from(vec![7u8; 3000]),
    };
    let image = meta::encode_snapshot(&s);
    let mut framing = meta::BackupFraming::new(1);
    framing.update(&image);
    let framed = [image.clone(), framing.trailer()].concat();
    assert!(meta::unwrap_backup(&path, &Bytes::from(framed.clone())).is_ok());
    let cases: [&[u8]; 4] = [
        b"junk\n",
        &framed[..framed.len() / 2],
        &framed[..framed.len() - 1],
        &image[..image.len() - 10],
    ];
    for bytes in cases {
        let err = meta::unwrap_backup(&path, &Bytes::copy_from_slice(bytes))
            .expect_err("a bad backup accepted");
        assert!(matches!(err, LogError::BadBackup { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("not a Keel backup"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("Nothing was restored"), "{msg}");
        assert!(!msg.contains("Refusing to start"), "{msg}");
        assert!(!msg.contains("data directory"), "{msg}");
    }
}
