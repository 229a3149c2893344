//! Small durable files beside the log: the hard state (term, vote and the
//! cluster configuration), the node's identity (its id and cluster id) and
//! snapshots with a manifest naming the latest complete one. Every file is written atomically (new file, sync, rename,
//! sync the directory) and checksummed; decoding never panics.

use crate::frame::{decode_membership, encode_membership};
use crate::LogError;
use bytes::Bytes;
use keel_core::{HardState, Membership, Position, Snapshot, SnapshotMeta};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The hard state file starts with `KHS` and the data directory's format
/// version as an ASCII digit. A binary refuses a directory whose format is
/// newer than it knows (clearly: [`LogError::NewerFormat`]), so a downgrade
/// cannot replay the log with older meanings.
///
/// - 1: the original format.
/// - 2: the hard state records the node's `hold` (`HardState::hold`), and
///   term-start entries may carry `keel_core::TERM_START_MARK`, which a
///   service acts on (the KV store renews its leases). A binary that
///   predates format 2 would replay them as no-ops and its state would
///   diverge from its peers'; it expected `KHS1`, so it refuses the
///   directory (as damaged, the only refusal it knows).
/// - 3: memberships (in log entries, the hard state and snapshot headers)
///   may record the ids removed from the cluster, which are never members
///   again (`Membership::removed`; `frame::REMOVED_FLAG`). A format-2
///   binary would call such a log damaged, and one that read past that
///   would let a removed id back in; it refuses the directory as newer.
///
/// An older format is upgraded in place when the directory is opened
/// (`load_hard_state` rewrites the hard state), before anything of the
/// current format can be written to it.
const HARD_STATE_MAGIC_PREFIX: &[u8; 3] = b"KHS";
/// The data directory format this binary writes (see above).
pub const DATA_FORMAT: u8 = 3;
const HARD_STATE_MAGIC: &[u8; 4] = b"KHS3";
const SNAPSHOT_MAGIC: &[u8; 4] = b"KSN1";
const MANIFEST_MAGIC: &[u8; 4] = b"KMF1";
const IDENTITY_MAGIC: &[u8; 4] = b"KID1";
pub const HARD_STATE_FILE: &str = "hardstate";
pub const MANIFEST_FILE: &str = "MANIFEST";
/// The node id and cluster id the data directory belongs to (`Identity`).
pub const IDENTITY_FILE: &str = "IDENTITY";

/// Present while a node runs (`mark_resync` at its start, `clear_resync`
/// once it stopped cleanly with everything written synced): an open that
/// finds it, after a stop on an error, a kill or a crash, writes the log's
/// last segment again and syncs it before anything in it is trusted
/// (`Opened::resynced`).
///
/// A failed write-back (a disk I/O error, a thin volume out of space)
/// leaves the pages in the kernel's cache, marked clean, and the kernel
/// reports the error once to each open file. A process started after it,
/// on the same boot, would read the log from the cache, sync it without an
/// error, and take for durable (and acknowledge) entries that may never
/// reach the disk. Writing them again makes the kernel write them back; if
/// the disk still fails, that sync fails and the node does not start.
/// (Segments before the last were synced before the next was created, a
/// failure stopping the roll, and every other file of the directory is
/// synced before it is renamed into place.)
pub const RESYNC_FILE: &str = "RESYNC";

/// Written (and synced) by an open before it cuts the last segment at a
/// hole (`Options::cut_after_hole`): the entries after the hole may
/// include some the node acknowledged, so it must count as amnesic, and
/// this survives a crash between the cut and the node's recording that.
/// The node removes it once it has (keel-node's `amnesia::on_start`).
pub const HOLE_CUT_FILE: &str = "HOLE_CUT";

/// Marks the node running (`RESYNC_FILE`), synced with the directory.
pub fn mark_resync(dir: &Path) -> Result<(), LogError> {
    let path = dir.join(RESYNC_FILE);
    File::create(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| LogError::io(&path, "creating", e))?;
    sync_dir(dir)
}

/// Clears `RESYNC_FILE` after a clean stop that synced everything written.
pub fn clear_resync(dir: &Path) -> Result<(), LogError> {
    let path = dir.join(RESYNC_FILE);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io(&path, "removing", e)),
    }
}

/// Syncs a directory so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, "syncing directory", e))
}

/// Writes `bytes` to `dir/name` atomically: tmp file, fsync, rename, fsync dir.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    write_atomic_with(dir, name, |f| f.write_all(bytes))
}

/// `write_atomic` with the contents written by `write` to the tmp file.
fn write_atomic_with(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), LogError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| LogError::io(&tmp, "creating", e))?;
    write(&mut f)
        .and_then(|_| f.sync_all())
        .map_err(|e| LogError::io(&tmp, "writing", e))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| LogError::io(&dst, "renaming into place", e))?;
    sync_dir(dir)
}

fn with_crc(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Checks magic and trailing CRC; returns the payload between them.
fn checked<'a>(path: &Path, b: &'a [u8], magic: &[u8; 4]) -> Result<&'a [u8], LogError> {
    if b.len() < 8 || &b[..4] != magic {
        return Err(LogError::corrupt(
            path,
            0,
            format!("expected magic {:?}", String::from_utf8_lossy(magic)),
        ));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored {
        return Err(LogError::corrupt(
            path,
            (b.len() - 4) as u64,
            "checksum mismatch".into(),
        ));
    }
    Ok(&body[4..])
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// The hard state file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HardStateFile {
    pub hard_state: HardState,
    /// The cluster configuration this node was created with.
    pub membership: Membership,
}

/// Formats 2 and 3: magic, term, vote (0: none), hold, membership,
/// CRC-32C (format 3's membership may record removed ids). Format 1 had no
/// hold.
pub fn save_hard_state(dir: &Path, hs: &HardStateFile) -> Result<(), LogError> {
    let mut b = HARD_STATE_MAGIC.to_vec();
    b.extend_from_slice(&hs.hard_state.term.to_le_bytes());
    b.extend_from_slice(&hs.hard_state.voted_for.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&hs.hard_state.hold.to_le_bytes());
    encode_membership(&hs.membership, &mut b);
    write_atomic(dir, HARD_STATE_FILE, &with_crc(b))
}

/// Loads the hard state; `None` if the file does not exist (a new node). A
/// file of an older format (1 or 2) is rewritten as the current format
/// first; a file of a newer format than [`DATA_FORMAT`] is refused.
pub fn load_hard_state(dir: &Path) -> Result<Option<HardStateFile>, LogError> {
    let path = dir.join(HARD_STATE_FILE);
    let b = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, "reading", e)),
    };
    let format = match b.get(..4) {
        Some([k, h, s, digit]) if [*k, *h, *s] == *HARD_STATE_MAGIC_PREFIX => {
            digit.checked_sub(b'0').filter(|f| (1..=9).contains(f))
        }
        _ => None,
    };
    // A newer format is told apart from damage by its checksum, which every
    // format keeps last (a flipped digit is damage, not a newer version).
    let crc_ok = b.len() >= 8 && {
        let (body, crc) = b.split_at(b.len() - 4);
        crc32c::crc32c(body).to_le_bytes() == crc
    };
    if let Some(found) = format.filter(|&f| f > DATA_FORMAT && crc_ok) {
        return Err(LogError::NewerFormat {
            path,
            found,
            supported: DATA_FORMAT,
        });
    }
    let magic = match format {
        Some(1) => b"KHS1",
        Some(2) => b"KHS2",
        _ => HARD_STATE_MAGIC,
    };
    let p = checked(&path, &b, magic)?;
    let bad = || LogError::corrupt(&path, 4, "hard state fields truncated".into());
    let term = u64_at(p, 0).ok_or_else(bad)?;
    let vote = u64_at(p, 8).ok_or_else(bad)?;
    let (hold, at) = match format {
        Some(1) => (0, 16),
        _ => (u64_at(p, 16).ok_or_else(bad)?, 24),
    };
    let (membership, len) = decode_membership(p.get(at..).ok_or_else(bad)?).map_err(|reason| {
        LogError::corrupt(&path, 4, format!("hard state membership: {reason}"))
    })?;
    if at + len != p.len() {
        return Err(LogError::corrupt(
            &path,
            4,
            "trailing bytes in hard state".into(),
        ));
    }
    let file = HardStateFile {
        hard_state: HardState {
            term,
            voted_for: (vote != 0).then_some(vote),
            hold,
        },
        membership,
    };
    if format.is_some_and(|f| f < DATA_FORMAT) {
        // Upgrade in place before anything of the current format can be
        // written, so that from now on an older binary refuses this
        // directory.
        save_hard_state(dir, &file)?;
    }
    Ok(Some(file))
}

/// Which node of which cluster a data directory belongs to: its votes and
/// its log are that node's alone. Recorded in [`IDENTITY_FILE`] when the
/// directory is first opened as a node's (or seeded by `keel restore`),
/// and checked on every start after (`check_identity`). A file apart from
/// the hard state, so the data format is unchanged: an older binary
/// ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub node_id: u64,
    pub cluster_id: u64,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (The cluster id in hex, as elsewhere: its default is 0x6b65656c.)
        write!(f, "node {} of cluster {:#x}", self.node_id, self.cluster_id)
    }
}

/// Magic, node id, cluster id, CRC-32C; written atomically.
pub fn save_identity(dir: &Path, id: Identity) -> Result<(), LogError> {
    let mut b = IDENTITY_MAGIC.to_vec();
    b.extend_from_slice(&id.node_id.to_le_bytes());
    b.extend_from_slice(&id.cluster_id.to_le_bytes());
    write_atomic(dir, IDENTITY_FILE, &with_crc(b))
}

/// The identity the directory records; `None` if it records none (a new
/// directory, or one written by a version before the record).
pub fn load_identity(dir: &Path) -> Result<Option<Identity>, LogError> {
    let path = dir.join(IDENTITY_FILE);
    let b = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, "reading", e)),
    };
    let p = checked(&path, &b, IDENTITY_MAGIC)?;
    match (u64_at(p, 0), u64_at(p, 8), p.len()) {
        (Some(node_id), Some(cluster_id), 16) => Ok(Some(Identity {
            node_id,
            cluster_id,
        })),
        _ => Err(LogError::corrupt(
            &path,
            4,
            "identity is not a node id and a cluster id".into(),
        )),
    }
}

/// Checks that the directory belongs to node `id` ([`LogError::WrongIdentity`]
/// otherwise), recording `id` first if it records no identity yet (a new
/// directory, or one an older version wrote: its contents are taken to be
/// this node's, as that version did). Whether it recorded it.
pub fn check_identity(dir: &Path, id: Identity) -> Result<bool, LogError> {
    match load_identity(dir)? {
        Some(recorded) if recorded == id => Ok(false),
        Some(recorded) => Err(LogError::WrongIdentity {
            dir: dir.to_path_buf(),
            recorded,
            configured: id,
        }),
        None => save_identity(dir, id).map(|()| true),
    }
}

/// The bytes of a snapshot file; also what a leader streams in chunks to a
/// follower (read from the published file with `read_snapshot_chunk`),
/// which checks the whole file with `check_snapshot_image` before
/// installing it: the checksum covers the transfer end to end.
pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + s.data.len());
    write_snapshot(&mut b, s).expect("writing to a Vec cannot fail");
    b
}

/// Writes the bytes of `encode_snapshot(s)` to `w` without assembling them:
/// the header, the service state as it is, then the checksum of both. The
/// state is the whole replicated state (tens of megabytes and more), so a
/// second copy of it would cost as much again in memory and page faults.
pub fn write_snapshot(w: &mut impl Write, s: &Snapshot) -> std::io::Result<()> {
    let header = snapshot_header(&s.meta, s.data.len() as u64);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header), &s.data);
    w.write_all(&header)?;
    w.write_all(&s.data)?;
    w.write_all(&crc.to_le_bytes())
}

/// A snapshot file's header: magic, metadata, then the state's length.
fn snapshot_header(meta: &SnapshotMeta, state_len: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(64);
    header.extend_from_slice(SNAPSHOT_MAGIC);
    header.extend_from_slice(&meta.position.to_le_bytes());
    header.extend_from_slice(&meta.term.to_le_bytes());
    header.extend_from_slice(&meta.timestamp.to_le_bytes());
    encode_membership(&meta.membership, &mut header);
    header.extend_from_slice(&state_len.to_le_bytes());
    header
}

/// Decodes a snapshot file's bytes; the state is a slice of `b`, not a copy.
pub fn decode_snapshot(path: &Path, b: &Bytes) -> Result<Snapshot, LogError> {
    let (meta, data) = decode_snapshot_parts(path, b)?;
    Ok(Snapshot {
        meta,
        data: b.slice_ref(data),
    })
}

/// The size of a backup's pages and of its trailing SHA-256 (etcd's
/// framing of a snapshot download: its database's pages, then the digest).
const BACKUP_PAGE: u64 = 512;
const BACKUP_DIGEST: u64 = 32;
/// After the snapshot file in a streamed backup: this magic and the id of
/// the cluster it came from.
const BACKUP_FOOTER_MAGIC: &[u8; 4] = b"KBK1";
const BACKUP_FOOTER: u64 = 12;

/// A backup as it is streamed (`etcdctl snapshot save` against Keel): the
/// snapshot file, a footer naming the cluster it came from, zeros up to a
/// multiple of 512 bytes, then the SHA-256 of everything before it. The
/// pages and the digest are how etcd frames its database download, and
/// etcdctl keeps no download without them. `unwrap_backup` reads it back.
pub struct BackupFraming {
    hash: sha2::Sha256,
    len: u64,
    cluster_id: u64,
}

impl BackupFraming {
    /// Framing for a backup of cluster `cluster_id`.
    pub fn new(cluster_id: u64) -> Self {
        use sha2::Digest;
        BackupFraming {
            hash: sha2::Sha256::new(),
            len: 0,
            cluster_id,
        }
    }
    /// The bytes a backup of a `file_len`-byte snapshot file takes.
    pub fn framed_len(file_len: u64) -> u64 {
        (file_len + BACKUP_FOOTER).div_ceil(BACKUP_PAGE) * BACKUP_PAGE + BACKUP_DIGEST
    }
    /// Takes the next piece of the snapshot file as it goes out.
    pub fn update(&mut self, piece: &[u8]) {
        use sha2::Digest;
        self.hash.update(piece);
        self.len += piece.len() as u64;
    }
    /// What follows the file: the footer, the zero padding and the digest.
    pub fn trailer(mut self) -> Vec<u8> {
        use sha2::Digest;
        let mut out = BACKUP_FOOTER_MAGIC.to_vec();
        out.extend_from_slice(&self.cluster_id.to_le_bytes());
        let pad = Self::framed_len(self.len) - BACKUP_DIGEST - self.len;
        out.resize(pad as usize, 0);
        self.hash.update(&out);
        out.extend_from_slice(&self.hash.finalize());
        out
    }
}

/// What a backup file holds (`unwrap_backup`).
#[derive(Debug)]
pub struct Unwrapped {
    pub snapshot: Snapshot,
    /// The cluster the backup came from (a bare snapshot file does not say).
    pub cluster_id: Option<u64>,
}

/// The snapshot a backup holds: a streamed backup (`BackupFraming`) whose
/// digest, footer and padding check out, or a bare snapshot file. Never
/// panics. A file that is neither is [`LogError::BadBackup`] (not
/// `Corrupt`, whose advice is for a data directory).
pub fn unwrap_backup(path: &Path, b: &Bytes) -> Result<Unwrapped, LogError> {
    unwrap_backup_checked(path, b).map_err(|e| match e {
        LogError::Corrupt {
            path,
            offset,
            reason,
        } => LogError::BadBackup {
            path,
            offset,
            reason,
        },
        e => e,
    })
}

fn unwrap_backup_checked(path: &Path, b: &Bytes) -> Result<Unwrapped, LogError> {
    use sha2::Digest;
    let n = b.len() as u64;
    let bare = || {
        decode_snapshot(path, b).map(|snapshot| Unwrapped {
            snapshot,
            cluster_id: None,
        })
    };
    if n < BACKUP_PAGE + BACKUP_DIGEST || n % BACKUP_PAGE != BACKUP_DIGEST {
        return bare();
    }
    let (body, digest) = b.split_at((n - BACKUP_DIGEST) as usize);
    if sha2::Sha256::digest(body).as_slice() != digest {
        return bare().map_err(|_| {
            LogError::corrupt(
                path,
                n - BACKUP_DIGEST,
                "neither a snapshot file nor a backup whose SHA-256 matches (cut short or damaged?)"
                    .into(),
            )
        });
    }
    let bad = |what: &str| LogError::corrupt(path, 0, format!("backup {what}"));
    let file_len = snapshot_file_len(body).ok_or_else(|| bad("header unreadable"))?;
    let rest = body
        .get(file_len..)
        .ok_or_else(|| bad("shorter than its header says"))?;
    let footer = rest
        .strip_prefix(BACKUP_FOOTER_MAGIC)
        .and_then(|f| f.get(..8))
        .ok_or_else(|| bad("footer missing"))?;
    let padding = &rest[BACKUP_FOOTER as usize..];
    if padding.len() as u64 >= BACKUP_PAGE || padding.iter().any(|&x| x != 0) {
        return Err(bad("padding is not the zeros up to a 512-byte page"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(footer);
    Ok(Unwrapped {
        snapshot: decode_snapshot(path, &b.slice(..file_len))?,
        cluster_id: Some(u64::from_le_bytes(id)),
    })
}

/// The length of the snapshot file at the start of `b`, from its header.
fn snapshot_file_len(b: &[u8]) -> Option<usize> {
    let p = b.strip_prefix(SNAPSHOT_MAGIC)?;
    let (_, mlen) = decode_membership(p.get(24..)?).ok()?;
    let state = usize::try_from(u64_at(p, 24 + mlen)?).ok()?;
    (SNAPSHOT_MAGIC.len() + 24 + mlen + 8)
        .checked_add(state)?
        .checked_add(4)
}

/// Checks a snapshot file's bytes and splits them into its metadata and its
/// state.
fn decode_snapshot_parts<'a>(
    path: &Path,
    b: &'a [u8],
) -> Result<(SnapshotMeta, &'a [u8]), LogError> {
    let p = checked(path, b, SNAPSHOT_MAGIC)?;
    let bad = |what: &str| LogError::corrupt(path, 4, format!("snapshot {what}"));
    let position = u64_at(p, 0).ok_or_else(|| bad("header truncated"))?;
    let term = u64_at(p, 8).ok_or_else(|| bad("header truncated"))?;
    let timestamp = u64_at(p, 16).ok_or_else(|| bad("header truncated"))?;
    let (membership, mlen) = decode_membership(p.get(24..).ok_or_else(|| bad("header truncated"))?)
        .map_err(|reason| bad(&format!("membership {reason}")))?;
    let at = 24 + mlen;
    let len = u64_at(p, at).ok_or_else(|| bad("length truncated"))?;
    let data = p.get(at + 8..).ok_or_else(|| bad("data truncated"))?;
    if data.len() as u64 != len {
        return Err(bad(&format!(
            "data is {} bytes, header says {len}",
            data.len()
        )));
    }
    let meta = SnapshotMeta {
        position,
        term,
        timestamp,
        membership,
    };
    Ok((meta, data))
}

/// `Config::snapshot_check` for snapshot files: the checksum holds, the
/// file decodes, and its header matches the metadata the leader sent.
pub fn check_snapshot_image(meta: &SnapshotMeta, image: &[u8]) -> bool {
    decode_snapshot_parts(Path::new("received snapshot"), image).is_ok_and(|(m, _)| m == *meta)
}

/// Bytes `offset..offset + len` of the published snapshot file at
/// `position`, for a chunk of an install. `Ok(None)` if there is no such
/// file (a newer snapshot replaced it); an error if the range is not inside
/// the file or reading fails. Never panics.
pub fn read_snapshot_chunk(
    dir: &Path,
    position: Position,
    offset: u64,
    len: u64,
) -> Result<Option<Bytes>, LogError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(snapshot_file_name(position));
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, "opening the snapshot to send", e)),
    };
    let size = f
        .metadata()
        .map_err(|e| LogError::io(&path, "reading the size of the snapshot to send", e))?
        .len();
    let end = offset.checked_add(len).filter(|&end| end <= size);
    let (Some(_), Ok(n)) = (end, usize::try_from(len)) else {
        return Err(LogError::Invalid(format!(
            "snapshot chunk {offset}+{len} is outside {} ({size} bytes)",
            path.display()
        )));
    };
    let mut buf = vec![0; n];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| LogError::io(&path, "reading a chunk of the snapshot to send", e))?;
    Ok(Some(buf.into()))
}

/// The size of the snapshot file at `position`; `None` if there is none.
pub fn snapshot_file_size(dir: &Path, position: Position) -> Result<Option<u64>, LogError> {
    let path = dir.join(snapshot_file_name(position));
    match fs::metadata(&path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::io(&path, "reading the size of", e)),
    }
}

pub fn snapshot_file_name(position: Position) -> String {
    format!("snap-{position:020}.snap")
}

const STAGED_SUFFIX: &str = ".staged";

/// The position of a `snap-<position>.snap` file name.
fn snapshot_file_position(name: &str) -> Option<Position> {
    name.strip_prefix("snap-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

/// Writes and syncs a snapshot file under a staging name, without
/// publishing it: `commit_staged_snapshot` does that. Staging is the slow
/// part (the whole state), so it can run off the storage thread.
pub fn stage_snapshot(dir: &Path, s: &Snapshot) -> Result<PathBuf, LogError> {
    stage_snapshot_with(dir, &s.meta, |w| w.write_all(&s.data)).map(|(path, _)| path)
}

/// A staged snapshot file as `stage_snapshot` writes it, with the state
/// written by `state` as it goes (it may write in any number of pieces):
/// no more than a buffer's worth of the state is in memory at once. The
/// header's length field is filled in once the state is written, and the
/// file's checksum is assembled from the header's and the state's. Returns
/// the file's path and the state's length. An error from `state` (or from
/// the disk) is returned with the file's path; the partial file is left for
/// `remove_leftovers`.
pub fn stage_snapshot_with(
    dir: &Path,
    meta: &SnapshotMeta,
    state: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(PathBuf, u64), LogError> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!(
        "{}{STAGED_SUFFIX}",
        snapshot_file_name(meta.position)
    ));
    let mut f = File::create(&path).map_err(|e| LogError::io(&path, "creating", e))?;
    let placeholder = snapshot_header(meta, 0);
    let written = (|| {
        f.write_all(&placeholder)?;
        let mut w = CrcWriter {
            inner: std::io::BufWriter::with_capacity(
                STAGE_BUFFER,
                WritebackPaced::new(&mut f, placeholder.len() as u64),
            ),
            crc: 0,
            len: 0,
        };
        state(&mut w)?;
        w.inner.flush()?;
        let (crc, len) = (w.crc, w.len);
        drop(w);
        let header = snapshot_header(meta, len);
        debug_assert_eq!(header.len(), placeholder.len());
        f.write_all_at(&header, 0)?;
        let len_usize = usize::try_from(len).map_err(std::io::Error::other)?;
        let crc = crc32c::crc32c_combine(crc32c::crc32c(&header), crc, len_usize);
        f.write_all(&crc.to_le_bytes())?;
        f.sync_all()?;
        Ok(len)
    })();
    let len = written.map_err(|e| LogError::io(&path, "writing", e))?;
    Ok((path, len))
}

/// The write buffer of a streamed snapshot: what the page cache takes in
/// one system call.
const STAGE_BUFFER: usize = 1 << 20;

/// Writes a file sequentially, and sends each `STAGE_BUFFER` of it to the
/// disk before taking the next (Linux `sync_file_range`), so a snapshot
/// reaches the disk as it is written instead of as one burst at the final
/// sync. A snapshot is the whole state (tens of megabytes and more); left
/// to the final sync, it filled the disk's queue, and the log's
/// `fdatasync`s behind it (each a write's acknowledgement) took 10–33 ms
/// instead of well under one. The snapshot thread waits instead; the
/// data is not yet durable before the final sync, as before.
struct WritebackPaced<'a> {
    file: &'a mut File,
    /// The file offset written up to.
    offset: u64,
    /// Off once the file system said it cannot (pacing is only an
    /// optimisation; a write error fails the snapshot, as at its sync).
    paced: bool,
}

impl<'a> WritebackPaced<'a> {
    fn new(file: &'a mut File, offset: u64) -> Self {
        WritebackPaced {
            file,
            offset,
            paced: true,
        }
    }
}

impl Write for WritebackPaced<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // (A larger write would go to the disk in one burst again.)
        let n = self.file.write(&buf[..buf.len().min(STAGE_BUFFER)])?;
        if self.paced {
            self.paced = writeback(self.file, self.offset, n as u64)?;
        }
        self.offset += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Starts writing `len` bytes of `file` from `offset` to the disk and waits
/// until they are written (not a durability barrier: metadata and the
/// disk's cache are left to `sync_all`). `Ok(false)` if the file system
/// cannot; a write error is returned, not left for `sync_all`, which would
/// not see it again once this wait has reported it.
#[cfg(target_os = "linux")]
fn writeback(file: &File, offset: u64, len: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(false);
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain system call on a file descriptor this borrow keeps
    // open; it reads no memory of ours.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn writeback(_file: &File, _offset: u64, _len: u64) -> std::io::Result<bool> {
    Ok(false)
}

/// Passes writes through, keeping the checksum and the length of what went
/// through.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Publishes a staged snapshot file at `position`: renames it into place,
/// points the manifest at it, then deletes older snapshot files. If the
/// manifest already names a snapshot at or beyond `position` (one installed
/// from the leader meanwhile), nothing changes, the staged file is removed,
/// and the answer is `false`: the manifest never moves backwards. A crash at
/// any point leaves the manifest naming a complete snapshot.
pub fn commit_staged_snapshot(
    dir: &Path,
    position: Position,
    staged: &Path,
) -> Result<bool, LogError> {
    if manifest_position(dir)?.is_some_and(|m| m >= position) {
        let _ = fs::remove_file(staged);
        return Ok(false);
    }
    let dst = dir.join(snapshot_file_name(position));
    fs::rename(staged, &dst).map_err(|e| LogError::io(&dst, "renaming into place", e))?;
    sync_dir(dir)?;
    publish(dir, position)?;
    Ok(true)
}

/// Points the manifest at the snapshot file at `position` (already durable)
/// and deletes snapshot files older than it.
fn publish(dir: &Path, position: Position) -> Result<(), LogError> {
    let mut m = MANIFEST_MAGIC.to_vec();
    m.extend_from_slice(&position.to_le_bytes());
    write_atomic(dir, MANIFEST_FILE, &with_crc(m))?;
    let entries = fs::read_dir(dir).map_err(|e| LogError::io(dir, "listing", e))?;
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if snapshot_file_position(&n).is_some_and(|p| p < position) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Saves a snapshot file, then points the manifest at it, then deletes older
/// snapshot files. A crash at any point leaves the manifest naming a
/// complete snapshot. A no-op returning `false` if the manifest already
/// names a snapshot at or beyond this one's position (the newer one is kept).
pub fn save_snapshot(dir: &Path, s: &Snapshot) -> Result<bool, LogError> {
    let position = s.meta.position;
    if manifest_position(dir)?.is_some_and(|m| m >= position) {
        return Ok(false);
    }
    write_atomic_with(dir, &snapshot_file_name(position), |f| write_snapshot(f, s))?;
    publish(dir, position)?;
    Ok(true)
}

/// Removes what an interrupted write, snapshot save or compaction left
/// behind (staged snapshots, `.tmp` files and retired segments, never
/// referenced by the manifest or the log). Only
/// while nothing else writes to the directory (on open).
pub fn remove_leftovers(dir: &Path) -> Result<(), LogError> {
    let entries = fs::read_dir(dir).map_err(|e| LogError::io(dir, "listing", e))?;
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.ends_with(STAGED_SUFFIX)
            || n.ends_with(".tmp")
            || n.ends_with(crate::store::RETIRED_SUFFIX)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Removes the snapshot files other than the one the manifest names (at
/// `position`, already loaded): what a crash left, a newer file renamed into
/// place before the manifest named it, or older ones not yet deleted.
/// Never referenced again (a newer snapshot gets a file of its own). Only
/// while nothing else writes to the directory (on open). Best effort, as
/// `remove_leftovers`: one that cannot be removed stays, harmless.
pub fn remove_unnamed_snapshots(dir: &Path, position: Position) -> Result<(), LogError> {
    let entries = fs::read_dir(dir).map_err(|e| LogError::io(dir, "listing", e))?;
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if snapshot_file_position(&n).is_some_and(|p| p != position) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The position the manifest names; `None` if there is no manifest.
pub fn manifest_position(dir: &Path) -> Result<Option<Position>, LogError> {
    let path = dir.join(MANIFEST_FILE);
    let b = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, "reading", e)),
    };
    let p = checked(&path, &b, MANIFEST_MAGIC)?;
    u64_at(p, 0)
        .filter(|_| p.len() == 8)
        .map(Some)
        .ok_or_else(|| LogError::corrupt(&path, 4, "manifest body is not one position".into()))
}

/// Loads the snapshot the manifest names; `None` if there is no manifest.
pub fn load_snapshot(dir: &Path) -> Result<Option<Snapshot>, LogError> {
    let Some(position) = manifest_position(dir)? else {
        return Ok(None);
    };
    let snap_path = dir.join(snapshot_file_name(position));
    let b = fs::read(&snap_path)
        .map_err(|e| LogError::io(&snap_path, "reading the snapshot the manifest names", e))?;
    let s = decode_snapshot(&snap_path, &Bytes::from(b))?;
    if s.meta.position != position {
        return Err(LogError::corrupt(
            &snap_path,
            4,
            format!(
                "snapshot is at {}, the manifest says {position}",
                s.meta.position
            ),
        ));
    }
    Ok(Some(s))
}
