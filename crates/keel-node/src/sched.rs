//! The scheduling policy of a node's threads (`thread_scheduling`).
//!
//! Linux threads inherit the policy of the thread that creates them, so a
//! node is set up from a thread that has the policy already: the threads
//! it starts then and later (consensus, service, storage, network workers)
//! all have it, and the caller's own thread keeps its own.

use crate::config::ThreadSchedulingConfig;

/// Sets the calling thread's scheduling policy.
#[cfg(target_os = "linux")]
pub fn set_current_thread(policy: ThreadSchedulingConfig) -> std::io::Result<()> {
    let policy = match policy {
        ThreadSchedulingConfig::Batch => libc::SCHED_BATCH,
        ThreadSchedulingConfig::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the calling thread's scheduling policy: here only `Normal`, the
/// system's own (`Batch` is Linux's).
#[cfg(not(target_os = "linux"))]
pub fn set_current_thread(policy: ThreadSchedulingConfig) -> std::io::Result<()> {
    match policy {
        ThreadSchedulingConfig::Normal => Ok(()),
        ThreadSchedulingConfig::Batch => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the batch scheduling policy is Linux-only",
        )),
    }
}

/// Runs `f` on a new thread whose scheduling policy is `policy`, so that
/// every thread `f` starts inherits it; returns what `f` returned. If the
/// policy cannot be set, `f` still runs, with the policy it inherited,
/// after a warning.
pub fn run_with_policy<T: Send>(
    policy: ThreadSchedulingConfig,
    f: impl FnOnce() -> T + Send,
) -> std::io::Result<std::thread::Result<T>> {
    // The caller's tracing span, so what `f` logs reads as it would there.
    let span = tracing::Span::current();
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name("keel-start".into())
            .spawn_scoped(s, move || {
                let _entered = span.enter();
                if let Err(e) = set_current_thread(policy) {
                    tracing::warn!("cannot set the {policy:?} scheduling policy: {e}");
                }
                f()
            })?;
        Ok(t.join())
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy, from the kernel.
    fn current() -> i32 {
        // SAFETY: no arguments to get wrong; pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn threads_started_under_a_policy_inherit_it_and_the_caller_keeps_its_own() {
        let before = current();
        let (started, child) = run_with_policy(ThreadSchedulingConfig::Batch, || {
            let child = std::thread::spawn(current).join().expect("child");
            (current(), child)
        })
        .expect("spawn")
        .expect("no panic");
        assert_eq!(started, libc::SCHED_BATCH);
        assert_eq!(child, libc::SCHED_BATCH, "a thread started later inherits");
        assert_eq!(current(), before, "the caller's thread is left alone");
        let normal = run_with_policy(ThreadSchedulingConfig::Normal, current)
            .expect("spawn")
            .expect("no panic");
        assert_eq!(normal, libc::SCHED_OTHER);
    }
}
