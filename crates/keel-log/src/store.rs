//! The segmented log on disk: append-only segment files of frames, named by
//! the byte position they start at, so a file offset plus the segment base
//! is the core's log position. Recovery, truncation of a divergent tail,
//! compaction of whole segments below a snapshot, and the reset a snapshot
//! install needs.
//!
//! Recovery rules: a torn tail in the last segment (a frame cut short by
//! the end of the file, or one whose first all-zero disk sector is zero
//! through the end of the file, the last sector possibly partial: sectors
//! an interrupted write never wrote) is cut back to the last valid frame.
//! Any other damage — a bad checksum, a truncated frame in a sealed
//! segment, zeroed sectors followed by anything non-zero, a missing
//! segment, a gap — refuses to open with an error naming the file and
//! offset.

use crate::frame::{self, HEADER_LEN};
use crate::lock::DirLock;
use crate::meta::{self, HardStateFile, Identity};
use crate::LogError;
use keel_core::{Entry, Position, Snapshot, Term};
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECTOR: u64 = 512;
const SEGMENT_SUFFIX: &str = ".seg";
/// Sync times kept for `take_sync_times` (a store nobody asks keeps no
/// more).
const MAX_SYNC_TIMES: usize = 1024;

/// Storage options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Roll to a new segment file once the active one reaches this size.
    pub segment_size: u64,
    /// At open: the machine lost power since the log was last written, and
    /// the node counts as having lost entries it may have acknowledged
    /// (keel-node's amnesia after a power loss in `replicated` mode). A
    /// damaged frame in the last segment over an all-zero sector is then
    /// cut with everything after it, even where data follows the zeros:
    /// pages written before a power loss may reach the disk out of order,
    /// so the unsynced end of a log can have holes. Otherwise (the
    /// default) such a log is refused, as the zeros may be damage in the
    /// middle of entries the node acknowledged.
    pub cut_after_hole: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_size: 64 << 20,
            cut_after_hole: false,
        }
    }
}

impl Options {
    /// The default options with segments of `segment_size` bytes.
    pub fn with_segment_size(segment_size: u64) -> Self {
        Options {
            segment_size,
            ..Options::default()
        }
    }
}

#[derive(Clone, Debug)]
struct Segment {
    base: Position,
    len: u64,
    path: PathBuf,
}

/// Removes `segments` (in log order), the newest first: a crash part way
/// leaves a prefix of the log, which the next `open` reconciles with the
/// snapshot again (a log that ends before the snapshot, or differs from it
/// at its position, is reset). Removed oldest first, it could leave a log
/// starting after the snapshot's position (refused as missing entries), or
/// one starting exactly there whose entries the snapshot superseded (kept,
/// with no entry before it whose term would tell).
fn remove_newest_first(segments: &[Segment], doing: &'static str) -> Result<(), LogError> {
    for s in segments.iter().rev() {
        fs::remove_file(&s.path).map_err(|e| LogError::io(&s.path, doing, e))?;
    }
    Ok(())
}

/// The segment files in `dir`, by base position (their `len` unknown: 0).
fn list_segments(dir: &Path) -> Result<Vec<Segment>, LogError> {
    let mut segments = Vec::new();
    let listing = fs::read_dir(dir).map_err(|e| LogError::io(dir, "listing", e))?;
    for entry in listing {
        let entry = entry.map_err(|e| LogError::io(dir, "listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        let base: Position = stem.parse().map_err(|_| {
            LogError::corrupt(
                &entry.path(),
                0,
                "segment file name is not a position".into(),
            )
        })?;
        segments.push(Segment {
            base,
            len: 0,
            path: entry.path(),
        });
    }
    segments.sort_by_key(|s| s.base);
    Ok(segments)
}

/// Reads the log's entries from `from` to `upto` (entry boundaries) back
/// from the segment files in `dir`: for a leader sending a follower entries
/// whose data it no longer holds in memory (`keel_core::Action::
/// SendLogRange`). Safe alongside the storage thread's appends, as only
/// durable, committed entries are asked for, which nothing rewrites; a
/// range that is not there (compacted away meanwhile), or not whole
/// entries, or damaged, is an error and nothing is returned.
pub fn read_range(dir: &Path, from: Position, upto: Position) -> Result<Vec<Entry>, LogError> {
    use std::os::unix::fs::FileExt;
    if upto < from {
        return Err(LogError::Invalid(format!(
            "log range {from}..{upto} ends before it starts"
        )));
    }
    let segments = list_segments(dir)?;
    let mut out = Vec::new();
    let mut pos = from;
    while pos < upto {
        let Some(seg) = segments.iter().rev().find(|s| s.base <= pos) else {
            return Err(LogError::Invalid(format!(
                "log position {pos} is before the log on disk"
            )));
        };
        let file =
            File::open(&seg.path).map_err(|e| LogError::io(&seg.path, "opening segment", e))?;
        let len = file
            .metadata()
            .map_err(|e| LogError::io(&seg.path, "reading segment size", e))?
            .len();
        let offset = pos - seg.base;
        let want = usize::try_from((upto - pos).min(len.saturating_sub(offset)))
            .map_err(|_| LogError::Invalid(format!("log range {from}..{upto} is too large")))?;
        let mut buf = vec![0; want];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| LogError::io(&seg.path, "reading segment", e))?;
        let mut at = 0;
        while at < buf.len() {
            match frame::decode(&buf[at..], pos) {
                Ok(Some((e, n))) => {
                    out.push(e);
                    at += n;
                    pos += n as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(LogError::Invalid(format!(
                        "{} at offset {}: {e}",
                        seg.path.display(),
                        offset + at as u64
                    )))
                }
            }
        }
        if at == 0 {
            return Err(LogError::Invalid(format!(
                "no whole entry at log position {pos} in {} ({len} bytes)",
                seg.path.display()
            )));
        }
    }
    Ok(out)
}

/// What recovery cut off the end of the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    pub discarded_bytes: u64,
    /// Cut at a hole: an all-zero sector with data after it
    /// (`Options::cut_after_hole`), not at the end of what was written.
    pub hole: bool,
}

/// Everything a node needs to restart, from its data directory.
pub struct Opened {
    pub store: LogStore,
    pub hard_state: Option<HardStateFile>,
    pub snapshot: Option<Snapshot>,
    /// Durable entries after the snapshot, contiguous from its position.
    pub entries: Vec<Entry>,
    pub torn: Option<TornTail>,
    /// The bytes of the last segment written again and synced because the
    /// previous run did not stop cleanly (`meta::RESYNC_FILE`).
    pub resynced: Option<u64>,
}

/// The durable log. Not thread-safe by itself: owned by the storage thread.
pub struct LogStore {
    dir: PathBuf,
    opts: Options,
    segments: Vec<Segment>,
    file: File,
    buf: Vec<u8>,
    /// Runs of terms: (position where the run's first entry starts, term).
    runs: Vec<(Position, Term)>,
    /// Where the log starts and the term of the entry ending there.
    base: (Position, Term),
    last_pos: Position,
    dirty: bool,
    /// How long each sync of the log took, until taken (`take_sync_times`;
    /// at most `MAX_SYNC_TIMES` wait).
    sync_times: Vec<Duration>,
    /// Held while the manifest is checked and rewritten: snapshots are
    /// published from the snapshot thread (`SnapshotHandle`) while this
    /// store installs the leader's on the storage thread.
    manifest_lock: Arc<Mutex<()>>,
    /// `compact` renames dropped segments for someone else to delete.
    defer_deletes: bool,
    /// Retired segment files not yet handed out (see `take_retired`).
    retired: Vec<PathBuf>,
    /// The directory's lock, held while the store lives (dropped last).
    _lock: DirLock,
}

fn segment_name(base: Position) -> String {
    format!("{base:020}{SEGMENT_SUFFIX}")
}

fn create_segment(dir: &Path, base: Position) -> Result<(Segment, File), LogError> {
    let path = dir.join(segment_name(base));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| LogError::io(&path, "creating segment", e))?;
    meta::sync_dir(dir)?;
    Ok((Segment { base, len: 0, path }, file))
}

fn open_for_append(seg: &Segment) -> Result<File, LogError> {
    OpenOptions::new()
        .append(true)
        .open(&seg.path)
        .map_err(|e| LogError::io(&seg.path, "opening segment for append", e))
}

/// Writes a segment's checked bytes (`bytes`, all of the file as recovery
/// read it) over themselves and syncs them (`meta::RESYNC_FILE`): the
/// kernel then writes them back to the disk even where an earlier
/// write-back failed and left them cached as clean. (The bytes recovery
/// checked, not a second read: a page the kernel dropped meanwhile would
/// read back as what the disk holds.) Returns the bytes written. A crash
/// part-way leaves the same bytes.
fn rewrite(path: &Path, bytes: &[u8]) -> Result<u64, LogError> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LogError::io(path, "opening to write again", e))?;
    f.write_all_at(bytes, 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| LogError::io(path, "writing again after an unclean stop", e))?;
    Ok(bytes.len() as u64)
}

/// How the damaged frame at the end of the valid prefix looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    /// Like corruption: refuse to open.
    Corrupt,
    /// The file ends inside the frame (its header intact, or not even
    /// complete): an interrupted write.
    CutShort,
    /// Every byte from a sector boundary overlapping the frame to the end
    /// of the file is zero: sectors an interrupted write never wrote.
    Unwritten,
    /// The first all-zero sector overlapping the frame starts at `zeros`,
    /// but the byte at `nonzero` after it is not zero: not an unwritten
    /// tail (the zeros may be the entry's data, and the damage something
    /// else), so refuse.
    ZerosThenData { zeros: usize, nonzero: usize },
}

/// Does the damaged frame at `off` look like an interrupted write rather
/// than corruption? `data` is the whole segment file. An interrupted write
/// leaves the file short (the kernel stops a write at a page boundary when
/// the process is killed) or its last sectors unwritten (zero, from a
/// sector boundary to the end of the file; the last one may be partial,
/// as the file's size need not be a multiple of the sector size); a
/// flipped bit does neither. So: the file ends inside the frame (its header
/// intact, or not even complete), or the first all-zero sector overlapping
/// the frame (or its header, if that is damaged) is zero through the end of
/// the file.
///
/// An all-zero sector followed by anything non-zero is not an unwritten
/// tail: an entry's data may hold zero sectors, and taking one for an
/// unwritten tail would silently drop an acknowledged entry with damage
/// elsewhere. This refuses a genuine torn write too if the frame's data has
/// a whole zero sector before the point where the write stopped; refusing
/// is the safe side. What no rule can tell apart is damage followed only by
/// zeros from a sector boundary to the end of the file (data that ends in
/// zeros) from an interrupted write: that is cut as a torn tail.
fn classify(data: &[u8], off: usize) -> Damage {
    if data.len() - off < HEADER_LEN {
        return Damage::CutShort;
    }
    // The bytes whose damage an unwritten tail explains: the whole frame if
    // its header is intact, else the header.
    let end = match frame::decode_header(&data[off..]) {
        Ok(len) => {
            let end = off.saturating_add(HEADER_LEN + len);
            if end > data.len() {
                return Damage::CutShort; // a valid header whose frame the file cuts short
            }
            end
        }
        Err(_) => off + HEADER_LEN,
    };
    let sector = SECTOR as usize;
    let is_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    // The first all-zero sector overlapping the frame. A sector starting
    // before `off` holds the end of the previous (valid) frame too; the
    // last may be cut short by the end of the file.
    let first_zero = (off / sector * sector..end)
        .step_by(sector)
        .find(|&s| is_zero(&data[s..(s + sector).min(data.len())]));
    let Some(zeros) = first_zero else {
        return Damage::Corrupt;
    };
    match data[zeros..].iter().position(|&b| b != 0) {
        None => Damage::Unwritten,
        Some(at) => Damage::ZerosThenData {
            zeros,
            nonzero: zeros + at,
        },
    }
}

/// The first offset at or after `from` holding a valid frame header, if
/// any: named when a damaged frame over zeros is refused, as a valid header
/// after a damaged frame means the damage is in the middle of the log.
fn valid_header_at_or_after(data: &[u8], from: usize) -> Option<usize> {
    let last = data.len().checked_sub(HEADER_LEN)?;
    (from..=last).find(|&at| {
        let h = &data[at..at + HEADER_LEN];
        // Cheap filters before the checksum: reserved bytes zero, a known
        // kind, and not an all-zero header (whose checksum never matches).
        h[25..28] == [0, 0, 0]
            && h[24] <= 4
            && h.iter().any(|&b| b != 0)
            && frame::decode_header(h).is_ok()
    })
}

/// Creates `dir` and any missing ancestors, and makes their entries
/// durable: a directory's entry lives in its parent, which must be synced
/// (the first hard state is written into `dir`, and syncing `dir` does not
/// make `dir` itself survive a power loss). Returns the directories synced
/// (none if `dir` existed).
fn create_dir_durably(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    // The directories this creates, innermost first.
    let mut created = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        created.push(d);
        at = d.parent();
    }
    // `create_dir_all` would say only "File exists" for a file there. (A
    // path under a file fails below, "Not a directory".)
    if dir.exists() && !dir.is_dir() {
        return Err(LogError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    fs::create_dir_all(dir).map_err(|e| LogError::io(dir, "creating data directory", e))?;
    let mut synced = Vec::new();
    // Outermost first.
    for d in created.iter().rev() {
        // A relative path's parent is "" for the working directory; the
        // root has no parent (and always exists).
        let parent = match d.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
            None => continue,
        };
        meta::sync_dir(parent)?;
        synced.push(parent.to_path_buf());
    }
    Ok(synced)
}

impl LogStore {
    /// Opens (or creates) the data directory and recovers its contents.
    /// Locks the directory first ([`DirLock`]; [`LogError::Locked`] if
    /// another process has it open) and holds the lock for as long as the
    /// store lives.
    pub fn open(dir: &Path, opts: Options) -> Result<Opened, LogError> {
        Self::open_inner(dir, opts, None)
    }

    /// `open`, as node `identity`: once the directory is locked, and before
    /// anything in it is read or changed, refuses a directory that belongs
    /// to another node or cluster ([`LogError::WrongIdentity`]), and records
    /// the identity in one that records none (`meta::check_identity`).
    pub fn open_as(dir: &Path, opts: Options, identity: Identity) -> Result<Opened, LogError> {
        Self::open_inner(dir, opts, Some(identity))
    }

    fn open_inner(
        dir: &Path,
        opts: Options,
        identity: Option<Identity>,
    ) -> Result<Opened, LogError> {
        create_dir_durably(dir)?;
        let lock = DirLock::acquire(dir)?;
        if let Some(identity) = identity {
            meta::check_identity(dir, identity)?;
        }
        meta::remove_leftovers(dir)?;
        let hard_state = meta::load_hard_state(dir)?;
        let snapshot = meta::load_snapshot(dir)?;
        if let Some(s) = &snapshot {
            meta::remove_unnamed_snapshots(dir, s.meta.position)?;
        }
        let (snap_pos, snap_term) = snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.meta.position, s.meta.term));

        let mut segments = list_segments(dir)?;
        // The last run did not stop cleanly (`meta::RESYNC_FILE`): the last
        // segment's checked bytes are kept, to be written again below.
        // (The mark stays: the node clears it when it stops cleanly.)
        let resync = dir.join(meta::RESYNC_FILE);
        let marked = resync
            .try_exists()
            .map_err(|e| LogError::io(&resync, "looking for", e))?;
        let mut checked_tail = None;

        let mut entries = Vec::new();
        let mut runs: Vec<(Position, Term)> = Vec::new();
        let mut torn = None;
        let mut end: Option<Position> = None;
        let count = segments.len();
        for (i, seg) in segments.iter_mut().enumerate() {
            if let Some(prev_end) = end {
                if seg.base != prev_end {
                    return Err(LogError::corrupt(
                        &seg.path,
                        0,
                        format!("segment starts at position {} but the previous one ends at {prev_end}: a segment is missing", seg.base),
                    ));
                }
            }
            let mut data =
                fs::read(&seg.path).map_err(|e| LogError::io(&seg.path, "reading segment", e))?;
            let last = i + 1 == count;
            let mut off = 0usize;
            while off < data.len() {
                let pos = seg.base + off as u64;
                let damage = match frame::decode(&data[off..], pos) {
                    Ok(Some((e, n))) => {
                        if runs.last().is_none_or(|&(_, t)| t != e.term) {
                            runs.push((e.position, e.term));
                        }
                        if e.position >= snap_pos {
                            entries.push(e);
                        }
                        off += n;
                        continue;
                    }
                    Ok(None) => "frame cut short by the end of the file".to_string(),
                    Err(fe) => fe.to_string(),
                };
                let kind = classify(&data, off);
                let is_torn = match (last, kind) {
                    (false, _) | (_, Damage::Corrupt) => false,
                    (true, Damage::CutShort | Damage::Unwritten) => true,
                    (true, Damage::ZerosThenData { .. }) if opts.cut_after_hole => true,
                    (true, Damage::ZerosThenData { zeros, nonzero }) => {
                        let why = match valid_header_at_or_after(&data, off + 1) {
                            Some(at) => format!(
                                "a valid frame header follows at offset {at}: not a torn tail \
                                 (the entries after it would be lost)"
                            ),
                            None => format!(
                                "a non-zero byte follows at offset {nonzero}: not an unwritten \
                                 tail (the zeros may be the entry's own data; cutting it could \
                                 drop an acknowledged entry)"
                            ),
                        };
                        return Err(LogError::corrupt(
                            &seg.path,
                            off as u64,
                            format!(
                                "{damage}, over an all-zero sector at offset {zeros}, but {why}"
                            ),
                        ));
                    }
                };
                if is_torn {
                    let hole = matches!(kind, Damage::ZerosThenData { .. });
                    if hole {
                        let what = format!(
                            "{} cut at offset {off}: a zeroed sector with data after it\n",
                            seg.path.display()
                        );
                        meta::write_atomic(dir, meta::HOLE_CUT_FILE, what.as_bytes())?;
                    }
                    torn = Some(TornTail {
                        path: seg.path.clone(),
                        offset: off as u64,
                        discarded_bytes: (data.len() - off) as u64,
                        hole,
                    });
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&seg.path)
                        .map_err(|e| LogError::io(&seg.path, "opening to cut a torn tail", e))?;
                    f.set_len(off as u64)
                        .and_then(|_| f.sync_all())
                        .map_err(|e| LogError::io(&seg.path, "cutting a torn tail", e))?;
                    break;
                }
                return Err(LogError::corrupt(&seg.path, off as u64, damage));
            }
            seg.len = off as u64;
            end = Some(seg.base + seg.len);
            if last && marked {
                data.truncate(off);
                checked_tail = Some(data);
            }
        }

        let base_term_of = |runs: &[(Position, Term)], pos: Position| {
            runs.iter().rev().find(|(s, _)| *s < pos).map_or(0, |r| r.1)
        };
        let mut store_base = segments.first().map_or((snap_pos, snap_term), |s| {
            (s.base, if s.base == snap_pos { snap_term } else { 0 })
        });
        // Reconcile the log with the snapshot.
        let log_end = end.unwrap_or(snap_pos);
        let first = segments.first().map_or(snap_pos, |s| s.base);
        let boundary_ok =
            snap_pos == log_end || entries.first().is_some_and(|e| e.position == snap_pos);
        let term_at_snap = if snap_pos == first {
            None
        } else {
            Some(base_term_of(&runs, snap_pos))
        };
        let reset = if first > snap_pos {
            return Err(LogError::corrupt(
                &segments[0].path,
                0,
                format!("the log starts at {first} but the snapshot ends at {snap_pos}: entries in between are missing"),
            ));
        } else if log_end < snap_pos {
            true // the snapshot is ahead of the synced log: it supersedes it
        } else if !boundary_ok {
            // An entry of this log spans the snapshot position, so the log
            // differs from the committed history (which has an entry
            // ending there) at or before it: from there on it is a stale
            // tail that can never be committed, superseded by the snapshot.
            // A follower gets here when it crashed after publishing a
            // snapshot of entries that replaced such a tail but before the
            // storage thread had truncated the tail on disk.
            true
        } else {
            // A log entry ending at the snapshot position must be the same
            // entry (same term); otherwise the snapshot replaced the log.
            term_at_snap.is_some_and(|t| t != snap_term) && snapshot.is_some()
        };

        if reset {
            checked_tail = None; // the segments go
        }
        let (segments, file, runs, last_pos) = if reset || segments.is_empty() {
            if !segments.is_empty() {
                remove_newest_first(&segments, "removing superseded segment")?;
                meta::sync_dir(dir)?;
            }
            entries.clear();
            let (seg, file) = create_segment(dir, snap_pos)?;
            store_base = (snap_pos, snap_term);
            (vec![seg], file, Vec::new(), snap_pos)
        } else {
            let file = open_for_append(&segments[segments.len() - 1])?;
            if store_base.0 != snap_pos {
                store_base.1 = base_term_of(&runs, store_base.0);
            }
            (segments, file, runs, log_end)
        };
        // An earlier process may have been killed before it synced what it
        // wrote (`replicated` durability syncs in the background; a roll or
        // a truncation syncs the segments before the last): synced now, so
        // that a power loss from here on loses none of what this node
        // recovered and acts on.
        if let Some(last) = segments.last() {
            file.sync_data()
                .map_err(|e| LogError::io(&last.path, "syncing", e))?;
        }
        let resynced = match (checked_tail, segments.last()) {
            (Some(bytes), Some(last)) => Some(rewrite(&last.path, &bytes)?),
            _ => None,
        };
        let store = LogStore {
            dir: dir.to_path_buf(),
            opts,
            segments,
            file,
            buf: Vec::new(),
            runs,
            base: store_base,
            last_pos,
            dirty: false,
            sync_times: Vec::new(),
            manifest_lock: Arc::new(Mutex::new(())),
            defer_deletes: false,
            retired: Vec::new(),
            _lock: lock,
        };
        Ok(Opened {
            store,
            hard_state,
            snapshot,
            entries,
            torn,
            resynced,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn last_pos(&self) -> Position {
        self.last_pos
    }
    /// Term of the last entry (0 if unknown, e.g. an empty log).
    pub fn last_term(&self) -> Term {
        self.runs.last().map_or(self.base.1, |r| r.1)
    }
    pub fn first_pos(&self) -> Position {
        self.segments.first().map_or(self.last_pos, |s| s.base)
    }
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// Would appending `entries` fill the active segment and roll to a new
    /// one (a sync of the old segment and of the directory)?
    pub fn would_roll(&self, entries: &[Entry]) -> bool {
        let active = self.segments[self.segments.len() - 1].len;
        let adding: u64 = entries.iter().map(Entry::encoded_len).sum();
        active.saturating_add(adding) >= self.opts.segment_size
    }

    /// Writes entries to the OS (not yet synced). They must continue the log,
    /// and each must fit in a frame (`EntryTooLarge` otherwise: a larger
    /// frame would be written and synced, then refused as corrupt by every
    /// later open). The whole batch is checked before anything is written,
    /// so a refused batch leaves the store as it was.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let mut end = self.last_pos;
        for e in entries {
            if e.position != end {
                return Err(LogError::Invalid(format!(
                    "append at position {} but the log ends at {end}",
                    e.position
                )));
            }
            let body_len = frame::body_len(e);
            if body_len > frame::MAX_BODY_LEN {
                return Err(LogError::EntryTooLarge {
                    position: e.position,
                    body_len,
                });
            }
            end = e.end();
        }
        for e in entries {
            frame::encode(e, &mut self.buf).expect("every entry's size was checked above");
            self.last_pos = e.end();
            if self.runs.last().is_none_or(|&(_, t)| t != e.term) {
                self.runs.push((e.position, e.term));
            }
            let active = self.segments.len() - 1;
            self.segments[active].len += e.encoded_len();
            if self.segments[active].len >= self.opts.segment_size {
                self.flush_buf()?;
                self.sync()?;
                let (seg, file) = create_segment(&self.dir, self.last_pos)?;
                self.segments.push(seg);
                self.file = file;
            }
        }
        self.flush_buf()
    }

    fn flush_buf(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let seg = &self.segments[self.segments.len() - 1];
        self.file
            .write_all(&self.buf)
            .map_err(|e| LogError::io(&seg.path, "writing", e))?;
        self.buf.clear();
        self.dirty = true;
        Ok(())
    }

    /// A second handle on the segment being appended to, for syncing it
    /// from another thread (a sync through it covers everything written
    /// before the call), and that segment's path for error messages.
    ///
    /// The segment opened again, not a duplicate of the store's handle: the
    /// kernel reports a failed write-back once to each open file, so with a
    /// shared one a sync of the store's (a membership entry's, or a
    /// segment's before a roll) racing with or following a failed
    /// background sync would return Ok, and the store would count as
    /// durable what never reached the disk. With its own, each sync sees
    /// the error.
    pub fn active_segment_handle(&self) -> Result<(std::fs::File, PathBuf), LogError> {
        let seg = &self.segments[self.segments.len() - 1];
        let f = OpenOptions::new()
            .read(true)
            .open(&seg.path)
            .map_err(|e| LogError::io(&seg.path, "opening the segment to sync it", e))?;
        Ok((f, seg.path.clone()))
    }

    /// Makes everything written durable (fdatasync).
    /// Syncs what was written since the last sync, if anything: whether
    /// there was.
    pub fn sync(&mut self) -> Result<bool, LogError> {
        if !self.dirty {
            return Ok(false);
        }
        let seg = &self.segments[self.segments.len() - 1];
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| LogError::io(&seg.path, "syncing", e))?;
        if self.sync_times.len() < MAX_SYNC_TIMES {
            self.sync_times.push(started.elapsed());
        }
        self.dirty = false;
        Ok(true)
    }

    /// How long each sync since the last call took (those after a batch,
    /// at a segment roll, before a truncation or an install), for a
    /// disk-latency metric.
    pub fn take_sync_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.sync_times)
    }

    /// Removes every entry starting at or after `from` (an entry boundary).
    pub fn truncate(&mut self, from: Position) -> Result<(), LogError> {
        if from > self.last_pos || from < self.first_pos() {
            return Err(LogError::Invalid(format!(
                "truncate at {from} outside the log [{}, {}]",
                self.first_pos(),
                self.last_pos
            )));
        }
        self.flush_buf()?;
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[self.segments.len() - 1].base > from {
            let s = self.segments.pop().unwrap_or_else(|| unreachable!());
            fs::remove_file(&s.path).map_err(|e| LogError::io(&s.path, "removing segment", e))?;
            removed = true;
        }
        if removed {
            // The removals are durable before the segment left shrinks:
            // shrunk with a later segment still there, the log would have
            // a gap after a crash (refused at open as missing entries).
            meta::sync_dir(&self.dir)?;
        }
        let active = self.segments.len() - 1;
        let seg = &mut self.segments[active];
        if removed {
            // A segment the roll to the next one synced: nothing of it
            // awaits write-back. The store's handle on the segment it keeps
            // is kept: opened before anything of this run was written
            // through it, it is told of every write-back error since (a new
            // one would not be of one the background syncer was told of
            // already: `active_segment_handle`).
            self.file = open_for_append(seg)?;
        }
        // (A segment created in this run is written at the handle's
        // position, not appended: it goes back to the new end.)
        let len = from - seg.base;
        self.file
            .set_len(len)
            .and_then(|_| self.file.seek(std::io::SeekFrom::Start(len)).map(|_| ()))
            .and_then(|_| self.file.sync_all())
            .map_err(|e| LogError::io(&seg.path, "truncating", e))?;
        seg.len = len;
        meta::sync_dir(&self.dir)?;
        self.last_pos = from;
        self.dirty = false;
        while self.runs.last().is_some_and(|&(s, _)| s >= from) {
            self.runs.pop();
        }
        Ok(())
    }

    /// Closes the store, keeping its directory locked: for what must be
    /// written after the store's last sync and before another process may
    /// open the directory.
    pub fn into_lock(self) -> DirLock {
        self._lock
    }

    /// The lock to hold while publishing a snapshot into this store's
    /// directory from another thread (see `meta::commit_staged_snapshot`).
    pub fn manifest_lock(&self) -> Arc<Mutex<()>> {
        self.manifest_lock.clone()
    }

    /// Drops whole segments that end at or before `upto` (covered by a
    /// durable snapshot) from the log. The active segment is never dropped.
    /// A dropped segment is deleted at once, or, after `defer_deletes`,
    /// renamed out of the log (a cheap metadata change) and handed out by
    /// `take_retired` for another thread to delete: freeing a 64 MiB file's
    /// blocks takes 20-100 ms of kernel time that appends must not wait
    /// behind. (A crash before the rename leaves a segment the snapshot
    /// covers, which recovery accepts; one after it, a `.retired` file that
    /// `open` removes.)
    pub fn compact(&mut self, upto: Position) -> Result<(), LogError> {
        while self.segments.len() > 1 && self.segments[1].base <= upto {
            let s = self.segments.remove(0);
            if self.defer_deletes {
                let retired = retired_name(&s.path);
                fs::rename(&s.path, &retired)
                    .map_err(|e| LogError::io(&s.path, "retiring compacted segment", e))?;
                self.retired.push(retired);
            } else {
                fs::remove_file(&s.path)
                    .map_err(|e| LogError::io(&s.path, "removing compacted segment", e))?;
            }
            let first = self.segments[0].base;
            let term = self
                .runs
                .iter()
                .rev()
                .find(|(p, _)| *p < first)
                .map_or(0, |r| r.1);
            // Keep the run the new first entry belongs to.
            if let Some(keep) = self.runs.iter().rposition(|&(p, _)| p <= first) {
                self.runs.drain(..keep);
            }
            self.base = (first, term);
        }
        Ok(())
    }

    /// From now on `compact` leaves deleting dropped segments to the
    /// caller (see `take_retired`).
    pub fn defer_deletes(&mut self) {
        self.defer_deletes = true;
    }

    /// Files of segments `compact` dropped and retired since the last call,
    /// for the caller to delete (see `delete_retired`).
    pub fn take_retired(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.retired)
    }

    /// Replaces the whole log with an empty one starting at `pos` (a
    /// snapshot install whose position the log does not hold).
    pub fn reset(&mut self, pos: Position, term: Term) -> Result<(), LogError> {
        let segments = std::mem::take(&mut self.segments);
        remove_newest_first(&segments, "removing segment")?;
        meta::sync_dir(&self.dir)?;
        let (seg, file) = create_segment(&self.dir, pos)?;
        self.segments.push(seg);
        self.file = file;
        self.buf.clear();
        self.runs.clear();
        self.base = (pos, term);
        self.last_pos = pos;
        self.dirty = false;
        Ok(())
    }

    /// Persists a snapshot and reconciles the log with it as the core's
    /// `InstallSnapshot` requires: keep the suffix if the log holds the
    /// snapshot's last entry, else start over at the snapshot position.
    /// (The manifest never moves backwards: see `meta::save_snapshot`.)
    pub fn install_snapshot(&mut self, s: &Snapshot) -> Result<(), LogError> {
        self.flush_buf()?;
        self.sync()?;
        {
            let _manifest = lock_unpoisoned(&self.manifest_lock);
            meta::save_snapshot(&self.dir, s)?;
        }
        let pos = s.meta.position;
        let holds = pos <= self.last_pos
            && pos >= self.first_pos()
            && self.term_at(pos) == Some(s.meta.term);
        if holds {
            self.compact(pos)
        } else {
            self.reset(pos, s.meta.term)
        }
    }

    /// Term of the entry ending at `pos`, if `pos` is inside the log. (Only
    /// term runs are kept, so this does not check that `pos` is a boundary.)
    fn term_at(&self, pos: Position) -> Option<Term> {
        if pos == self.base.0 {
            return Some(self.base.1);
        }
        self.runs.iter().rev().find(|(s, _)| *s < pos).map(|r| r.1)
    }
}

/// Takes a lock whose data a panic cannot leave half-updated (the manifest
/// is written by atomic renames; the others are plain lists), so a
/// poisoned lock is still good.
pub(crate) fn lock_unpoisoned<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a compacted segment is renamed to before it is deleted off the
/// storage thread; `open` removes such leftovers.
pub(crate) const RETIRED_SUFFIX: &str = ".retired";

fn retired_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(RETIRED_SUFFIX);
    PathBuf::from(name)
}

/// Deletes a retired segment file in steps (shrinking it 8 MiB at a time,
/// then unlinking it), so that the kernel frees its blocks in short bursts
/// instead of one long one that holds up the threads sharing the core.
pub fn delete_retired(path: &Path) -> std::io::Result<()> {
    const STEP: u64 = 8 << 20;
    let f = OpenOptions::new().write(true).open(path)?;
    let mut len = f.metadata()?.len();
    while len > STEP {
        len -= STEP;
        f.set_len(len)?;
        std::thread::yield_now();
    }
    drop(f);
    fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The background syncer's handle is an open file of its own, not a
    /// duplicate sharing the store's (whose write-back errors only one of
    /// them would be told of): file status flags set on one are not seen
    /// on the other.
    #[test]
    fn the_sync_handle_is_an_open_file_of_its_own() {
        use std::os::fd::AsRawFd;
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(tmp.path(), Options::default())
            .expect("open")
            .store;
        let (handle, path) = store.active_segment_handle().expect("handle");
        assert_eq!(path, store.segments[0].path);
        let flags = |fd| {
            // SAFETY: plain fcntl calls on descriptors the files keep open.
            unsafe { libc::fcntl(fd, libc::F_GETFL) }
        };
        let before = flags(store.file.as_raw_fd());
        assert_eq!(before & libc::O_NONBLOCK, 0);
        // SAFETY: as above.
        let set = unsafe {
            libc::fcntl(
                handle.as_raw_fd(),
                libc::F_SETFL,
                flags(handle.as_raw_fd()) | libc::O_NONBLOCK,
            )
        };
        assert_eq!(set, 0);
        assert_ne!(flags(handle.as_raw_fd()) & libc::O_NONBLOCK, 0);
        assert_eq!(
            flags(store.file.as_raw_fd()),
            before,
            "the store's file was shared"
        );
    }

    /// Creating the data directory syncs the parent of every directory it
    /// creates (outermost first), so that the directory survives a power
    /// loss along with the hard state written into it; an existing one is
    /// left alone.
    #[test]
    fn creating_the_data_directory_syncs_the_parents_of_what_it_creates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let dir = root.join("a").join("b").join("data");
        let synced = create_dir_durably(&dir).expect("create");
        assert!(dir.is_dir());
        assert_eq!(
            synced,
            [root.to_path_buf(), root.join("a"), root.join("a").join("b")]
        );
        assert_eq!(
            create_dir_durably(&dir).expect("exists"),
            Vec::<PathBuf>::new()
        );
        let sibling = root.join("a").join("c");
        assert_eq!(
            create_dir_durably(&sibling).expect("create"),
            [root.join("a")]
        );
    }

    /// Segments are removed newest first, so a removal that stops part
    /// way (here at a path that cannot be removed as a file) has left the
    /// older ones: a prefix of the log.
    #[test]
    fn segments_are_removed_newest_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let segments: Vec<Segment> = [0, 100, 200, 300]
            .into_iter()
            .map(|base| Segment {
                base,
                len: 0,
                path: tmp.path().join(segment_name(base)),
            })
            .collect();
        for (i, s) in segments.iter().enumerate() {
            if i == 1 {
                fs::create_dir(&s.path).expect("mkdir");
            } else {
                fs::write(&s.path, b"x").expect("write");
            }
        }
        let e = remove_newest_first(&segments, "removing segment").expect_err("a directory");
        assert!(e.to_string().contains(&segment_name(100)), "{e}");
        let left: Vec<bool> = segments.iter().map(|s| s.path.exists()).collect();
        assert_eq!(left, [true, true, false, false]);
    }

    /// A data directory path that is a file is refused as such, not with
    /// "File exists" (as `create_dir_all` says); one under a file gets the
    /// OS's "Not a directory".
    #[test]
    fn a_data_directory_that_is_a_file_is_refused_as_such() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("afile");
        fs::write(&file, b"x").expect("write");
        let e = create_dir_durably(&file).expect_err("a file taken as a directory");
        assert_eq!(
            e.to_string(),
            format!(
                "data directory {} exists and is not a directory: set data_dir to a directory, \
                 or to a path that does not exist yet (it is created)",
                file.display()
            )
        );
        let under = file.join("data");
        let e = create_dir_durably(&under).expect_err("a directory under a file");
        let os = std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
        assert_eq!(
            e.to_string(),
            format!("{}: creating data directory: {os}", under.display())
        );
        assert_eq!(fs::read(&file).expect("read"), b"x", "the file changed");
    }
}
