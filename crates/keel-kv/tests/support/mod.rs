//! Shared by the KV decoder tests.

use keel_core::{ApplyOutput, Entry, EntryKind, ServiceHost};
use keel_kv::{Command, KvService};

/// A KV service that applied `cmds` in turn, the `i`-th at log time
/// `timestamp(i)` (refused ones change nothing).
pub fn service_after(cmds: &[Command], timestamp: impl Fn(u64) -> u64) -> KvService {
    let mut host = ServiceHost::new(KvService::default(), u64::MAX / 4);
    let mut out = ApplyOutput::default();
    let mut pos = 0;
    for (i, c) in (0u64..).zip(cmds) {
        let e = Entry {
            term: 1,
            position: pos,
            timestamp: timestamp(i),
            kind: EntryKind::Command {
                client: 1,
                seq: i + 1,
            },
            data: c.encode(),
        };
        pos = e.end();
        host.apply(&[e], &mut out);
        out.clear();
    }
    host.service().clone()
}
