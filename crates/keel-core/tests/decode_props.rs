//! The service host's snapshot envelope (sessions, timers, then the
//! service's state) fed valid, cut, mutated and hostile bytes: a valid
//! envelope round-trips; anything else is refused with an error, never a
//! panic, never a huge allocation from a count or length field, and a
//! refused restore leaves the host as it was.

use bytes::Bytes;
use keel_core::*;
use proptest::prelude::*;

/// An 8-byte counter service; its state must be exactly 8 bytes.
#[derive(Default, Debug)]
struct Counter {
    n: u64,
}

impl Service for Counter {
    fn restore(&mut self, s: Option<&[u8]>) -> Result<(), String> {
        self.n = match s {
            None => 0,
            Some(b) => u64::from_le_bytes(
                b.try_into()
                    .map_err(|_| format!("want 8 bytes, got {}", b.len()))?,
            ),
        };
        Ok(())
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.n.to_le_bytes());
    }
    fn prepare_snapshot(&self) -> SnapshotTask {
        let n = self.n;
        Box::new(move |out| out.write_all(&n.to_le_bytes()))
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, _c: ClientId, data: &[u8]) -> Bytes {
        if let Some(id) = data.strip_prefix(b"timer") {
            let id = id.first().copied().unwrap_or(0);
            ctx.schedule_timer(u64::from(id), ctx.time() + 100);
        } else {
            self.n += 1;
        }
        Bytes::from(data.to_vec())
    }
    fn query(&self, _d: &[u8]) -> Bytes {
        Bytes::from(self.n.to_le_bytes().to_vec())
    }
    fn on_timer(&mut self, _ctx: &mut Context<'_>, _id: u64) {}
}

const TTL: Nanos = 1 << 40;

fn snapshot_of(data: Bytes, position: Position) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            position,
            term: 1,
            timestamp: 0,
            membership: Membership::default(),
        },
        data,
    }
}

/// A host that applied `cmds` (client, payload), one entry each.
fn host_after(cmds: &[(ClientId, Vec<u8>)]) -> (ServiceHost<Counter>, Position) {
    let mut host = ServiceHost::new(Counter::default(), TTL);
    let mut out = ApplyOutput::default();
    let mut pos = 0;
    for (i, (client, data)) in cmds.iter().enumerate() {
        let e = Entry {
            term: 1,
            position: pos,
            timestamp: i as u64 * 10,
            kind: EntryKind::Command {
                client: *client,
                seq: i as u64 + 1,
            },
            data: Bytes::from(data.clone()),
        };
        pos = e.end();
        host.apply(&[e], &mut out);
        out.clear();
    }
    (host, pos)
}

/// What a host holds that a snapshot carries.
fn state(h: &ServiceHost<Counter>) -> (u64, Position, usize, Vec<(u64, Nanos)>) {
    (
        h.service().n,
        h.applied(),
        h.session_count(),
        h.timers().iter().map(|(&k, &v)| (k, v)).collect(),
    )
}

fn command() -> impl Strategy<Value = (ClientId, Vec<u8>)> {
    (
        1u64..6,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<u8>().prop_map(|id| [b"timer".as_slice(), &[id]].concat()),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A host's snapshot restores to the same sessions, timers and state;
    /// its session table reads back alone; re-snapshotting gives the same
    /// bytes. Every strict prefix is refused (the state must be whole), and
    /// a damaged one never panics: refused, the host is unchanged.
    #[test]
    fn host_snapshots_round_trip_and_damage_is_refused(
        cmds in proptest::collection::vec(command(), 0..12),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let (host, pos) = host_after(&cmds);
        let data = host.snapshot();
        let snap = snapshot_of(data.clone(), pos);

        let mut copy = ServiceHost::new(Counter::default(), TTL);
        copy.restore(&snap).expect("a host's own snapshot restores");
        prop_assert_eq!(state(&copy), state(&host));
        prop_assert_eq!(copy.snapshot(), data.clone());
        let sessions = snapshot_sessions(&data).expect("sessions read");
        prop_assert_eq!(sessions.len(), host.session_count());

        // A restored host to damage: whatever is refused leaves it so.
        let before = state(&copy);
        let short = data.slice(..cut.index(data.len()));
        if !short.is_empty() {
            let r = copy.restore(&snapshot_of(short.clone(), pos + 1));
            prop_assert!(r.is_err(), "a cut snapshot ({} of {} bytes) restored", short.len(), data.len());
            prop_assert_eq!(state(&copy), before.clone());
        }
        let mut bad = data.to_vec();
        let at = flip.index(bad.len());
        bad[at] = byte;
        let r = copy.restore(&snapshot_of(Bytes::from(bad.clone()), pos + 1));
        if r.is_err() {
            prop_assert_eq!(state(&copy), before);
        }
        let _ = snapshot_sessions(&bad);
        let _ = snapshot_sessions(&short);
    }

    /// A count or length field claiming far more than the data holds is
    /// refused without reserving that much: sessions, reply lengths and
    /// timers, at every size up to u64::MAX.
    #[test]
    fn hostile_counts_are_refused_without_allocating(
        field in 0usize..4,
        claim in prop_oneof![Just(u64::MAX), Just(u64::MAX / 8), Just(1u64 << 32), 2u64..1 << 40],
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // Magic, applied, last sweep, then the field under test.
        let mut b = b"KSH2".to_vec();
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        match field {
            // The session count.
            0 => b.extend_from_slice(&claim.to_le_bytes()),
            // One session whose reply length is the claim.
            1 => {
                b.extend_from_slice(&1u64.to_le_bytes());
                for v in [9u64, 1, 0] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&claim.to_le_bytes());
            }
            // No sessions; the timer count.
            2 => {
                b.extend_from_slice(&0u64.to_le_bytes());
                b.extend_from_slice(&claim.to_le_bytes());
            }
            // Version 1: no sessions or timers, then the state's length.
            _ => {
                b[..4].copy_from_slice(b"KSH1");
                b.extend_from_slice(&0u64.to_le_bytes());
                b.extend_from_slice(&0u64.to_le_bytes());
                b.extend_from_slice(&claim.to_le_bytes());
            }
        }
        b.extend_from_slice(&tail);
        let mut host = ServiceHost::new(Counter::default(), TTL);
        let r = host.restore(&snapshot_of(Bytes::from(b.clone()), 1));
        prop_assert!(r.is_err(), "a snapshot claiming {} in field {} restored", claim, field);
        prop_assert_eq!(state(&host), (0, 0, 0, Vec::new()));
        if field < 2 {
            prop_assert!(snapshot_sessions(&b).is_err());
        }
    }
}
