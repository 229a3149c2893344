//! The storage thread: takes appends, truncations, compactions and snapshot
//! installs in order from a queue, writes everything queued as one batch,
//! syncs once per batch (group commit) and reports the durable position
//! back. In `replicated` mode appends are instead written by the caller's
//! thread (`append` returns the durable end): a page-cache write costs
//! microseconds, while a round trip through this thread costs two thread
//! wake-ups on the commit path. Writes that sync (a segment roll, a
//! truncation) still go through this thread, with the appends after them
//! until they are done; otherwise the thread compacts, installs snapshots
//! and hands the periodic sync to the syncer. Snapshots the node took itself are published by the thread that
//! wrote them (`SnapshotHandle`), so their directory syncs never hold up
//! appends; this thread then compacts the log behind them, and a deleter
//! thread deletes the compacted segments. Any I/O error stops the thread
//! and is reported: the node must stop rather than run with unknown state.

use crate::store::lock_unpoisoned;
use crate::{meta, DirLock, LogError, LogStore};
use keel_core::{Entry, Position, Snapshot, Term};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When an entry counts as durable on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Once fsynced here (default; etcd's choice).
    #[default]
    Sync,
    /// Once written to the OS; durability comes from replication to a
    /// majority (Aeron's choice). Synced every `REPLICATED_SYNC_INTERVAL`
    /// (or the interval given to `StorageThread::spawn_with`) by a separate
    /// syncer thread, so a slow disk sync (this machine's
    /// virtio disk stalls for 100 ms at times) never holds up appends.
    Replicated,
}

/// How often `replicated` mode syncs what was written, by default (see
/// `StorageThread::spawn_with`).
pub const REPLICATED_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Most requests taken into one batch.
const MAX_BATCH: usize = 4096;

/// What the storage thread reports.
#[derive(Debug)]
pub enum StorageEvent {
    /// The log is durable (per the durability mode) up to the entry ending
    /// at `position` with `term`.
    Durable { position: Position, term: Term },
    /// The snapshot file at `position`, `size` bytes, is published (named
    /// by the manifest): chunked installs to followers can read it.
    SnapshotPublished { position: Position, size: u64 },
    /// The log was fdatasynced (in `sync` mode after a batch's writes; in
    /// `replicated` mode by the syncer thread in the background; in both
    /// at a segment roll and before a truncation or a snapshot install):
    /// how long the sync took, for a disk-latency metric.
    Synced { took: Duration },
    /// A batch took longer than `SLOW_BATCH` (a slow disk holds up every
    /// commit behind it): how long, and where the time went.
    Slow { took: Duration, detail: String },
    /// Something went wrong that does not stop storage (a compacted
    /// segment that could not be deleted; `open` retries).
    Warning(String),
    /// Storage failed; the thread has stopped.
    Failed(LogError),
}

/// A batch slower than this is reported (`StorageEvent::Slow`).
pub const SLOW_BATCH: Duration = Duration::from_millis(50);

/// Where a batch's time went, for `StorageEvent::Slow`.
#[derive(Default)]
struct BatchTimes {
    appends: Duration,
    segments_rolled: usize,
    truncate_compact: Duration,
    snapshots: Duration,
    sync: Duration,
}

impl BatchTimes {
    fn detail(&self) -> String {
        format!(
            "appends {:?} ({} segment(s) rolled), truncate/compact {:?}, snapshot install {:?}, fdatasync {:?}",
            self.appends, self.segments_rolled, self.truncate_compact, self.snapshots, self.sync
        )
    }
}

enum Request {
    Append(Vec<Entry>),
    Truncate(Position),
    Compact(Position),
    InstallSnapshot(Box<Snapshot>, mpsc::Sender<Result<(), LogError>>),
    /// The snapshot at `position` was published (by a `SnapshotHandle`):
    /// compact up to `compact_upto` and report it.
    Published {
        position: Position,
        compact_upto: Position,
    },
    Barrier(mpsc::Sender<()>),
}

pub struct StorageThread {
    tx: Option<mpsc::Sender<Request>>,
    handle: Option<JoinHandle<Result<(), LogError>>>,
    /// Requests sent and not yet taken by the thread.
    queued: Arc<AtomicUsize>,
    /// The store's directory and manifest lock, for `SnapshotHandle`s.
    dir: PathBuf,
    manifest_lock: Arc<Mutex<()>>,
    /// The store, shared with the thread: in `replicated` mode the caller
    /// writes appends itself.
    store: Arc<Mutex<LogStore>>,
    durability: Durability,
    /// `replicated` mode: written since the last periodic sync was asked.
    unsynced: Arc<AtomicBool>,
    /// The thread failed (see `Shared::failed`).
    failed: Arc<AtomicBool>,
    /// `replicated` mode: appends go through the thread until it has
    /// written a segment roll or a truncation (see `append`).
    rolling: Arc<AtomicBool>,
}

impl StorageThread {
    /// Starts the storage thread (`replicated` mode syncing every
    /// `REPLICATED_SYNC_INTERVAL`).
    pub fn spawn(
        store: LogStore,
        durability: Durability,
        report: impl FnMut(StorageEvent) + Send + 'static,
    ) -> Result<Self, LogError> {
        Self::spawn_with(store, durability, REPLICATED_SYNC_INTERVAL, report)
    }

    /// `spawn`, with `replicated` mode's background sync every
    /// `sync_interval` (unused in `sync` mode).
    pub fn spawn_with(
        store: LogStore,
        durability: Durability,
        sync_interval: Duration,
        report: impl FnMut(StorageEvent) + Send + 'static,
    ) -> Result<Self, LogError> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (dir, manifest_lock) = (store.dir().to_path_buf(), store.manifest_lock());
        let store = Arc::new(Mutex::new(store));
        let unsynced = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let rolling = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            store: store.clone(),
            queued: queued.clone(),
            unsynced: unsynced.clone(),
            failed: failed.clone(),
            rolling: rolling.clone(),
            sync_interval: sync_interval.max(Duration::from_millis(1)),
        };
        let handle = std::thread::Builder::new()
            .name("keel-storage".into())
            .spawn(move || run(&shared, durability, rx, report))
            .map_err(|e| {
                LogError::io(std::path::Path::new("."), "spawning the storage thread", e)
            })?;
        Ok(StorageThread {
            tx: Some(tx),
            handle: Some(handle),
            queued,
            dir,
            manifest_lock,
            store,
            durability,
            unsynced,
            failed,
            rolling,
        })
    }

    fn send(&self, r: Request) -> Result<(), LogError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .tx
            .as_ref()
            .ok_or(LogError::Stopped)
            .and_then(|tx| tx.send(r).map_err(|_| LogError::Stopped));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }

    /// Requests queued for the thread and not yet taken (a gauge).
    pub fn queue_len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Appends `entries`, which must continue the log. In `sync` mode they
    /// are queued for the storage thread, which reports them `Durable` once
    /// synced: returns `None`. In `replicated` mode they are written to the
    /// OS here, on the calling thread, which makes them durable in that
    /// mode: returns the log's new end (position, term of its last entry).
    ///
    /// Except across a segment roll, which syncs the old segment and the
    /// directory: the append that rolls, and every append and truncation
    /// after it until the thread has caught up, go through the thread as in
    /// `sync` mode (returning `None`, reported `Durable` by the thread), so
    /// the caller never waits on a disk sync. And a membership entry goes
    /// through the thread too, which syncs it before it reports it durable,
    /// in both modes: a configuration a quorum counted must survive a power
    /// loss, or a node that lost it would count its votes against the
    /// configuration before (a voter added to two, say), and could elect a
    /// leader without what that configuration committed.
    pub fn append(&self, entries: Vec<Entry>) -> Result<Option<(Position, Term)>, LogError> {
        match self.durability {
            Durability::Sync => self.send(Request::Append(entries)).map(|()| None),
            Durability::Replicated => {
                let mut store = self.inline_store()?;
                // Decided and queued under the store lock, which the
                // thread holds when it ends a roll (see `serve`).
                if self.rolling.load(Ordering::Acquire)
                    || store.would_roll(&entries)
                    || entries.iter().any(is_membership)
                {
                    self.rolling.store(true, Ordering::Release);
                    return self.send(Request::Append(entries)).map(|()| None);
                }
                store.append(&entries)?;
                self.unsynced.store(true, Ordering::Release);
                Ok(Some((store.last_pos(), store.last_term())))
            }
        }
    }
    /// Removes every entry at or after `from`, through the thread in both
    /// modes (it syncs the file and the directory; rare: a follower's
    /// divergent tail). In `replicated` mode appends after it go through
    /// the thread too until it is written, as after a roll.
    pub fn truncate(&self, from: Position) -> Result<(), LogError> {
        match self.durability {
            Durability::Sync => self.send(Request::Truncate(from)),
            Durability::Replicated => {
                let _store = self.inline_store()?;
                self.rolling.store(true, Ordering::Release);
                self.send(Request::Truncate(from))
            }
        }
    }
    /// The store, for a write on the calling thread; refused once the
    /// storage thread stopped (after a failure the store's state is
    /// unknown).
    fn inline_store(&self) -> Result<std::sync::MutexGuard<'_, LogStore>, LogError> {
        if self.failed.load(Ordering::Acquire)
            || self.handle.as_ref().is_none_or(|h| h.is_finished())
        {
            return Err(LogError::Stopped);
        }
        Ok(lock_unpoisoned(&self.store))
    }
    pub fn compact(&self, upto: Position) -> Result<(), LogError> {
        self.send(Request::Compact(upto))
    }
    /// Synchronous: returns once the snapshot is durable and the log
    /// reconciled with it.
    pub fn install_snapshot(&self, s: Snapshot) -> Result<(), LogError> {
        let (tx, rx) = mpsc::channel();
        self.send(Request::InstallSnapshot(Box::new(s), tx))?;
        rx.recv().map_err(|_| LogError::Stopped)?
    }
    /// As `SnapshotHandle::commit_snapshot`.
    pub fn commit_snapshot(
        &self,
        position: Position,
        staged: PathBuf,
        compact_upto: Position,
    ) -> Result<(), LogError> {
        self.snapshot_handle()?
            .commit_snapshot(position, staged, compact_upto)
    }
    /// A handle another thread can publish snapshots through. The thread
    /// stops (on `shutdown` or drop) only once every handle is dropped too.
    pub fn snapshot_handle(&self) -> Result<SnapshotHandle, LogError> {
        Ok(SnapshotHandle {
            tx: self.tx.clone().ok_or(LogError::Stopped)?,
            queued: self.queued.clone(),
            dir: self.dir.clone(),
            manifest_lock: self.manifest_lock.clone(),
        })
    }
    /// Waits until everything sent before is written and synced.
    pub fn barrier(&self) -> Result<(), LogError> {
        let (tx, rx) = mpsc::channel();
        self.send(Request::Barrier(tx))?;
        rx.recv().map_err(|_| LogError::Stopped)
    }
    /// Writes and syncs everything queued, then stops the thread.
    pub fn shutdown(mut self) -> Result<(), LogError> {
        self.stop()
    }
    /// As `shutdown`, then hands back the data directory's lock, still
    /// held: what the caller writes before dropping it follows everything
    /// the store synced, and no other process has opened the directory in
    /// between.
    pub fn shutdown_holding_lock(mut self) -> Result<DirLock, LogError> {
        self.stop()?;
        let store = self.store.clone();
        drop(self);
        // The thread has ended (`stop` joined it) and with it the only
        // other reference to the store.
        let store = Arc::try_unwrap(store).map_err(|_| LogError::Stopped)?;
        Ok(store
            .into_inner()
            .map_err(|_| LogError::Stopped)?
            .into_lock())
    }
    fn stop(&mut self) -> Result<(), LogError> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| LogError::Stopped)?,
            None => Ok(()),
        }
    }
}

/// Publishes snapshots into the storage thread's directory from another
/// thread.
#[derive(Clone)]
pub struct SnapshotHandle {
    tx: mpsc::Sender<Request>,
    queued: Arc<AtomicUsize>,
    dir: PathBuf,
    manifest_lock: Arc<Mutex<()>>,
}

impl SnapshotHandle {
    /// Publishes a snapshot staged with `meta::stage_snapshot` on the
    /// calling thread (its renames and directory syncs take tens of
    /// milliseconds on a busy disk: appends must not wait behind them),
    /// then has the storage thread compact the log up to `compact_upto`
    /// and report the publication, in order with its other requests.
    /// Ignored (the staged file removed) if the manifest already names a
    /// snapshot at or beyond `position`, e.g. one installed meanwhile from
    /// the leader: the manifest never moves backwards (the manifest lock
    /// orders this with installs).
    pub fn commit_snapshot(
        &self,
        position: Position,
        staged: PathBuf,
        compact_upto: Position,
    ) -> Result<(), LogError> {
        let published = {
            let _manifest = lock_unpoisoned(&self.manifest_lock);
            meta::commit_staged_snapshot(&self.dir, position, &staged)?
        };
        if !published {
            return Ok(());
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let r = Request::Published {
            position,
            compact_upto,
        };
        self.tx.send(r).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            LogError::Stopped
        })
    }
}

impl Drop for StorageThread {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What the storage thread shares with its `StorageThread`.
struct Shared {
    store: Arc<Mutex<LogStore>>,
    queued: Arc<AtomicUsize>,
    unsynced: Arc<AtomicBool>,
    /// Set the moment the thread fails, before it reports and winds down:
    /// from then on the store's state is unknown and nobody writes to it.
    failed: Arc<AtomicBool>,
    /// See `StorageThread::rolling`; cleared here.
    rolling: Arc<AtomicBool>,
    /// `replicated` mode: how often what was written is synced.
    sync_interval: Duration,
}

fn run(
    shared: &Shared,
    durability: Durability,
    rx: mpsc::Receiver<Request>,
    mut report: impl FnMut(StorageEvent),
) -> Result<(), LogError> {
    lock_unpoisoned(&shared.store).defer_deletes();
    let deleter = Deleter::start()?;
    let served = serve(shared, durability, &rx, &deleter, &mut report)
        .and_then(|_| lock_unpoisoned(&shared.store).sync().map(|_| ()));
    let result = match served {
        Ok(()) => Ok(()),
        Err(e) => {
            // Before anything else (the deleter may take a while to stop):
            // no more writes, and the node learns of it.
            shared.failed.store(true, Ordering::Release);
            let msg = e.to_string();
            report(StorageEvent::Failed(e));
            Err(LogError::Invalid(format!("storage stopped: {msg}")))
        }
    };
    deleter.finish(&mut report);
    result
}

/// Deletes retired (compacted) segment files off the storage thread.
struct Deleter {
    tx: Option<mpsc::Sender<Vec<PathBuf>>>,
    problems: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Deleter {
    fn start() -> Result<Deleter, LogError> {
        let (tx, rx) = mpsc::channel::<Vec<PathBuf>>();
        let problems = Arc::new(Mutex::new(Vec::new()));
        let p = problems.clone();
        let handle = std::thread::Builder::new()
            .name("keel-deleter".into())
            .spawn(move || {
                for paths in rx {
                    // The renames must be durable before any file shrinks:
                    // a crash must not leave a shortened file under its
                    // segment name.
                    let dir = paths.first().and_then(|p| p.parent());
                    if let Some(Err(e)) = dir.map(meta::sync_dir) {
                        lock_unpoisoned(&p).push(format!(
                            "syncing the directory before deleting compacted segments \
                             (left for the next open to remove): {e}"
                        ));
                        continue;
                    }
                    for path in paths {
                        if let Err(e) = crate::store::delete_retired(&path) {
                            lock_unpoisoned(&p).push(format!(
                                "deleting compacted segment {}: {e}",
                                path.display()
                            ));
                        }
                    }
                }
            })
            .map_err(|e| LogError::io(std::path::Path::new("."), "spawning the deleter", e))?;
        Ok(Deleter {
            tx: Some(tx),
            problems,
            handle: Some(handle),
        })
    }

    /// Hands over what `store` retired; reports earlier deletion problems.
    fn take(&self, store: &mut LogStore, report: &mut impl FnMut(StorageEvent)) {
        let retired = store.take_retired();
        if !retired.is_empty() {
            if let Some(tx) = &self.tx {
                // Only fails if the deleter died: `open` deletes them then.
                let _ = tx.send(retired);
            }
        }
        self.report(report);
    }

    fn report(&self, report: &mut impl FnMut(StorageEvent)) {
        for p in lock_unpoisoned(&self.problems).drain(..) {
            report(StorageEvent::Warning(p));
        }
    }

    /// Deletes what is queued, then stops.
    fn finish(mut self, report: &mut impl FnMut(StorageEvent)) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.report(report);
    }
}

/// The background syncer of `replicated` mode: syncs the segment handles
/// it is given, one at a time; the first error is kept for the storage
/// thread to stop on.
struct Syncer {
    tx: Option<mpsc::SyncSender<(std::fs::File, PathBuf)>>,
    failed: Arc<std::sync::Mutex<Option<LogError>>>,
    /// How long each finished sync took, not yet reported.
    took: Arc<std::sync::Mutex<Vec<Duration>>>,
    handle: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start() -> Result<Syncer, LogError> {
        let (tx, rx) = mpsc::sync_channel::<(std::fs::File, PathBuf)>(1);
        let failed = Arc::new(std::sync::Mutex::new(None));
        let took = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, times) = (failed.clone(), took.clone());
        let handle = std::thread::Builder::new()
            .name("keel-syncer".into())
            .spawn(move || {
                for (file, path) in rx {
                    let t = Instant::now();
                    if let Err(e) = file.sync_data() {
                        if let Ok(mut slot) = f.lock() {
                            slot.get_or_insert(LogError::io(&path, "syncing", e));
                        }
                        return;
                    }
                    lock_unpoisoned(&times).push(t.elapsed());
                }
            })
            .map_err(|e| LogError::io(std::path::Path::new("."), "spawning the syncer", e))?;
        Ok(Syncer {
            tx: Some(tx),
            failed,
            took,
            handle: Some(handle),
        })
    }

    /// Reports the syncs finished since the last call.
    fn report_synced(&self, report: &mut impl FnMut(StorageEvent)) {
        for took in std::mem::take(&mut *lock_unpoisoned(&self.took)) {
            report(StorageEvent::Synced { took });
        }
    }

    /// Asks for a sync of what `store` has written so far, unless the
    /// previous one is still running (then the next interval covers it).
    /// Returns whether it was taken.
    fn request(&self, store: &LogStore) -> Result<bool, LogError> {
        self.check()?;
        let Some(tx) = &self.tx else {
            return Ok(false);
        };
        let handle = store.active_segment_handle()?;
        Ok(tx.try_send(handle).is_ok())
    }

    /// Waits for the syncs asked for, then stops: the first error any of
    /// them met. (Its handles are open files of their own, so the store's
    /// syncs are told of a failed write-back too:
    /// `LogStore::active_segment_handle`.)
    fn finish(mut self) -> Result<(), LogError> {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                return Err(LogError::Invalid("the syncer thread panicked".into()));
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), LogError> {
        match self.failed.lock() {
            Ok(mut f) => f.take().map_or(Ok(()), Err),
            Err(_) => Err(LogError::Invalid("the syncer thread panicked".into())),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    shared: &Shared,
    durability: Durability,
    rx: &mpsc::Receiver<Request>,
    deleter: &Deleter,
    report: &mut impl FnMut(StorageEvent),
) -> Result<(), LogError> {
    let lock = || lock_unpoisoned(&shared.store);
    let mut last_sync = Instant::now();
    // Written here and not yet synced (appends written by the caller's
    // thread in `replicated` mode set `shared.unsynced` instead).
    let mut unsynced = false;
    let mut reported = {
        let store = lock();
        (store.last_pos(), store.last_term())
    };
    let syncer = match durability {
        Durability::Replicated => Some(Syncer::start()?),
        Durability::Sync => None,
    };
    // In replicated mode: hand the periodic sync of what was written since
    // the last one to the syncer thread. Taking the flag before the sync is
    // asked for means a write racing with it is synced next time.
    let background_sync = |store: &LogStore, unsynced: &mut bool| -> Result<(), LogError> {
        let Some(s) = &syncer else {
            return Ok(());
        };
        let inline = shared.unsynced.swap(false, Ordering::AcqRel);
        if !(*unsynced || inline) {
            return Ok(());
        }
        if s.request(store)? {
            *unsynced = false;
        } else if inline {
            shared.unsynced.store(true, Ordering::Release);
        }
        Ok(())
    };
    loop {
        if let Some(s) = &syncer {
            s.report_synced(report);
        }
        let first = match durability {
            Durability::Sync => match rx.recv() {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
            Durability::Replicated => match rx.recv_timeout(shared.sync_interval) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    background_sync(&lock(), &mut unsynced)?;
                    last_sync = Instant::now();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return syncer.map_or(Ok(()), Syncer::finish);
                }
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        shared.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        let mut barriers = Vec::new();
        let started = Instant::now();
        let mut times = BatchTimes::default();
        // The batch's consecutive appends, written with one `write` (one
        // each cost a system call and ext4's per-write work: ~4 per sync
        // under the kv put benchmark).
        let mut appends: Vec<Entry> = Vec::new();
        let write_appends = |appends: &mut Vec<Entry>, times: &mut BatchTimes| {
            if appends.is_empty() {
                return Ok(());
            }
            let t = Instant::now();
            let mut store = lock();
            let segments = store.segment_count();
            store.append(appends)?;
            appends.clear();
            times.segments_rolled += store.segment_count().saturating_sub(segments);
            times.appends += t.elapsed();
            Ok::<(), LogError>(())
        };
        // `replicated` mode: a membership entry is synced before it is
        // reported durable (see `append`).
        let mut must_sync = false;
        for r in batch {
            if let Request::Append(es) = r {
                must_sync |= es.iter().any(is_membership);
                if appends.is_empty() {
                    appends = es;
                } else {
                    appends.extend(es);
                }
                unsynced = true;
                continue;
            }
            write_appends(&mut appends, &mut times)?;
            let t = Instant::now();
            // Locked per request, not per batch: in `replicated` mode the
            // consensus thread appends through the same lock.
            let mut store = lock();
            match r {
                // (Taken above.)
                Request::Append(_) => {}
                Request::Truncate(p) => {
                    store.truncate(p)?;
                    times.truncate_compact += t.elapsed();
                }
                Request::Compact(p) => {
                    store.compact(p)?;
                    times.truncate_compact += t.elapsed();
                }
                Request::InstallSnapshot(s, reply) => {
                    let r = store.install_snapshot(&s);
                    let failed = r.as_ref().err().map(|e| LogError::Invalid(e.to_string()));
                    let _ = reply.send(r);
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    times.snapshots += t.elapsed();
                }
                Request::Published {
                    position,
                    compact_upto,
                } => {
                    store.compact(compact_upto.min(position))?;
                    times.truncate_compact += t.elapsed();
                    // Gone if a newer snapshot was installed meanwhile.
                    if let Some(size) = meta::snapshot_file_size(store.dir(), position)? {
                        report(StorageEvent::SnapshotPublished { position, size });
                    }
                }
                Request::Barrier(reply) => barriers.push(reply),
            }
        }
        write_appends(&mut appends, &mut times)?;
        let mut store = lock();
        // In `replicated` mode an entry counts once written to the OS: say
        // so before the periodic sync, which then never delays a commit.
        if durability == Durability::Replicated && !must_sync {
            report_durable(&store, &mut reported, report);
        }
        // Sync mode, barriers and membership entries sync here; replicated
        // mode's periodic sync goes to the syncer thread.
        if !barriers.is_empty() || must_sync || (unsynced && durability == Durability::Sync) {
            let t = Instant::now();
            store.sync()?;
            // (An error the syncer met first is reported to this sync too:
            // its handle is an open file of its own. Stop on whichever.)
            if let Some(s) = &syncer {
                s.check()?;
            }
            times.sync += t.elapsed();
            unsynced = false;
            shared.unsynced.store(false, Ordering::Release);
            last_sync = Instant::now();
        } else if last_sync.elapsed() >= shared.sync_interval {
            background_sync(&store, &mut unsynced)?;
            last_sync = Instant::now();
        }
        for took in store.take_sync_times() {
            report(StorageEvent::Synced { took });
        }
        report_durable(&store, &mut reported, report);
        deleter.take(&mut store, report);
        // Caught up (nothing sent since this batch was taken, and the
        // senders queue under this lock): appends are written inline again.
        if shared.queued.load(Ordering::Acquire) == 0 {
            shared.rolling.store(false, Ordering::Release);
        }
        drop(store);
        let took = started.elapsed();
        if took >= SLOW_BATCH {
            report(StorageEvent::Slow {
                took,
                detail: times.detail(),
            });
        }
        for b in barriers {
            let _ = b.send(());
        }
    }
}

fn is_membership(e: &Entry) -> bool {
    matches!(e.kind, keel_core::EntryKind::Membership(_))
}

/// Reports the log's end as durable if it moved since the last report.
fn report_durable(
    store: &LogStore,
    reported: &mut (Position, u64),
    report: &mut impl FnMut(StorageEvent),
) {
    let now = (store.last_pos(), store.last_term());
    if now != *reported {
        *reported = now;
        report(StorageEvent::Durable {
            position: now.0,
            term: now.1,
        });
    }
}
