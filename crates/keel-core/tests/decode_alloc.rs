//! Restoring a service host's snapshot allocates in proportion to the
//! bytes present, never to a count or length field: a valid snapshot with
//! sessions, replies and timers, with every 4- and 8-byte window
//! overwritten by a value claiming gigabytes, restores or is refused with
//! a bounded largest allocation. A counting global allocator measures this
//! test binary.

use bytes::Bytes;
use keel_core::*;

#[path = "../../../test-support/alloc_probe.rs"]
mod alloc_probe;
use alloc_probe::*;

/// A service whose state is its bytes, kept as they are.
#[derive(Default)]
struct Blob(Vec<u8>);

impl Service for Blob {
    fn restore(&mut self, s: Option<&[u8]>) -> Result<(), String> {
        self.0 = s.unwrap_or_default().to_vec();
        Ok(())
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn prepare_snapshot(&self) -> SnapshotTask {
        let b = self.0.clone();
        Box::new(move |out| out.write_all(&b))
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, _c: ClientId, data: &[u8]) -> Bytes {
        self.0.extend_from_slice(data);
        ctx.schedule_timer(self.0.len() as u64, ctx.time() + 100);
        Bytes::copy_from_slice(data)
    }
    fn query(&self, _d: &[u8]) -> Bytes {
        Bytes::new()
    }
    fn on_timer(&mut self, _ctx: &mut Context<'_>, _id: u64) {}
}

#[test]
fn host_snapshots_allocate_nothing_for_a_large_field() {
    let mut host = ServiceHost::new(Blob::default(), 1 << 40);
    let mut out = ApplyOutput::default();
    let mut pos = 0;
    for (client, data) in [(3u64, &b"abc"[..]), (5, b"reply"), (7, b"")] {
        let e = Entry {
            term: 1,
            position: pos,
            timestamp: 10,
            kind: EntryKind::Command { client, seq: 1 },
            data: Bytes::copy_from_slice(data),
        };
        pos = e.end();
        host.apply(&[e], &mut out);
        out.clear();
    }
    let good = host.snapshot();
    assert!(good.len() > 100, "sessions and timers in the snapshot");
    let mut cases = 0;
    for (at, bad) in with_large_fields(&good, |_| {}) {
        let snap = Snapshot {
            meta: SnapshotMeta {
                position: pos,
                term: 1,
                timestamp: 10,
                membership: Membership::default(),
            },
            data: Bytes::from(bad),
        };
        let mut h = ServiceHost::new(Blob::default(), 1 << 40);
        let largest = largest_allocation(|| {
            let _ = h.restore(&snap);
            let _ = snapshot_sessions(&snap.data);
        });
        assert!(
            largest <= bound(snap.data.len()),
            "a host snapshot with a large field at byte {at}: an allocation of {largest} bytes"
        );
        cases += 1;
    }
    assert!(cases > 500, "{cases} cases");
}
