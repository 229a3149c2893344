//! The data directory's lock: one process at a time writes a data
//! directory. Two `keel server`s on one directory (one left running by a
//! killed `keel dev`, or an operator's mistake) would both append to the
//! same segments and both acknowledge writes, and a restart would lose some
//! of them. So whatever writes a data directory first takes an exclusive
//! `flock` on its `LOCK` file, without blocking (it tries again for a
//! moment: `BRIEFLY_HELD`, then gives up), and holds it while it
//! writes (a `LogStore` for its lifetime); the kernel releases it when the
//! file is closed, so also when the process dies, however it dies. The
//! holder writes its process id into the file, for the error the next one
//! gets. The file itself is never removed (removing it would let a second
//! process lock a new file while the first still holds the old one).

use crate::LogError;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The lock file in a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// How long a lock that is held is tried again before giving up. A lock
/// outlives its holder's close while a process that another thread of the
/// holder's started has not yet replaced its image (`fork` copies the open
/// file, `exec` closes it): a store closed and opened again while another
/// thread starts a process (a test harness, a supervisor) can find its own
/// lock still held for a moment. A holder that is really running holds it
/// still after this.
const BRIEFLY_HELD: Duration = Duration::from_secs(1);

/// An exclusive lock on a data directory, released when dropped (or when
/// the process dies).
#[derive(Debug)]
pub struct DirLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist), or fails with [`LogError::Locked`]
    /// if another process (or another open of it in this process) holds it
    /// (after trying for `BRIEFLY_HELD`; never blocks in the kernel).
    pub fn acquire(dir: &Path) -> Result<DirLock, LogError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false) // the holder's pid, if it is held
            .open(&path)
            .map_err(|e| LogError::io(&path, "opening the data directory's lock file", e))?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: a plain system call on a file descriptor `file` keeps
            // open; it reads no memory of ours.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock if started.elapsed() < BRIEFLY_HELD => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                std::io::ErrorKind::WouldBlock => {
                    return Err(LogError::Locked {
                        dir: dir.to_path_buf(),
                        holder: holder(&path),
                    })
                }
                _ => return Err(LogError::io(&path, "locking the data directory (flock)", e)),
            }
        }
        // Not synced: only a live holder's pid means anything.
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| LogError::io(&path, "writing the process id into", e))?;
        Ok(DirLock { _file: file })
    }
}

/// The process id the holder of the lock file at `path` wrote into it, if
/// it can be read (it may not have written it yet).
fn holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
