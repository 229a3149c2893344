//! The in-memory log against a simple model, and the service host's
//! exactly-once sessions, log timers and snapshot format.

use bytes::Bytes;
use keel_core::log::Log;
use keel_core::*;
use proptest::prelude::*;

fn entry(term: Term, position: Position, len: usize) -> Entry {
    Entry {
        term,
        position,
        timestamp: position,
        kind: EntryKind::Command {
            client: 1,
            seq: position,
        },
        data: Bytes::from(vec![7u8; len]),
    }
}

#[derive(Clone, Debug)]
enum LogOp {
    Append {
        term_bump: bool,
        len: usize,
    },
    Truncate(usize),
    Compact(usize),
    /// Drop the data of entries up to the end of this one (wrapped).
    Evict(usize),
}

fn log_op() -> impl Strategy<Value = LogOp> {
    prop_oneof![
        4 => (any::<bool>(), 0..64usize).prop_map(|(term_bump, len)| LogOp::Append { term_bump, len }),
        1 => any::<usize>().prop_map(LogOp::Truncate),
        1 => any::<usize>().prop_map(LogOp::Compact),
    ]
}

/// The ops both log tests share: an append or a truncation, done to the log
/// and to its model alike. False for every other op (nothing done).
fn append_or_truncate(log: &mut Log, model: &mut Vec<Entry>, term: &mut Term, op: &LogOp) -> bool {
    match *op {
        LogOp::Append { term_bump, len } => {
            if term_bump {
                *term += 1;
            }
            let e = entry(*term, log.last_pos(), len);
            model.push(e.clone());
            log.push(e);
        }
        LogOp::Truncate(i) if !model.is_empty() => {
            let i = i % model.len();
            log.truncate_from(model[i].position);
            model.truncate(i);
        }
        _ => return false,
    }
    true
}

proptest! {
    /// Append / truncate / compact against a Vec model: positions stay
    /// contiguous, `term_at` answers exactly at boundaries, and reads agree.
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(log_op(), 1..60)) {
        let mut log = Log::new(0, 0, 0);
        let mut model: Vec<Entry> = Vec::new();
        let (mut base, mut base_term) = (0u64, 0u64);
        let mut term = 1;
        for op in ops {
            match op {
                _ if append_or_truncate(&mut log, &mut model, &mut term, &op) => {}
                LogOp::Compact(i) if !model.is_empty() => {
                    let i = i % model.len();
                    let e = model[i].clone();
                    let dropped: Vec<Entry> = log.compact_to(e.end(), e.term, e.timestamp).into();
                    let expected: Vec<Entry> = model.drain(..=i).collect();
                    prop_assert_eq!(dropped, expected, "compaction returns exactly what it dropped");
                    base = e.end();
                    base_term = e.term;
                }
                _ => {}
            }
            prop_assert_eq!(log.first_pos(), base);
            prop_assert_eq!(log.last_pos(), model.last().map_or(base, Entry::end));
            prop_assert_eq!(log.last_term(), model.last().map_or(base_term, |e| e.term));
            prop_assert_eq!(log.term_at(base), Some(base_term));
            for e in &model {
                prop_assert_eq!(log.term_at(e.end()), Some(e.term));
                prop_assert_eq!(log.entry_at(e.position), Some(e));
                if e.encoded_len() > 1 {
                    prop_assert_eq!(log.term_at(e.position + 1), None);
                }
            }
            let all: Vec<Entry> = log.entries_between(base, u64::MAX);
            prop_assert_eq!(&all, &model);
        }
    }

    /// Dropping applied entries' data (`evict_data`) keeps every lookup:
    /// terms, timestamps and boundaries stay, `held_bytes` counts what
    /// still has its data, `entries_from` never hands out a hollow entry,
    /// and `hollow_run` names the run to read back from storage instead.
    #[test]
    fn hollow_entries_keep_their_place(
        ops in proptest::collection::vec(
            prop_oneof![
                4 => log_op(),
                2 => any::<usize>().prop_map(LogOp::Evict),
            ],
            1..60,
        ),
        budget in 1u64..300,
    ) {
        let mut log = Log::new(0, 0, 0);
        let mut model: Vec<Entry> = Vec::new();
        let mut base = 0;
        let mut evicted = 0;
        let mut term = 1;
        for op in ops {
            match op {
                _ if append_or_truncate(&mut log, &mut model, &mut term, &op) => {
                    // A truncation takes hollow entries with it.
                    evicted = evicted.min(model.last().map_or(base, Entry::end));
                }
                LogOp::Compact(i) if !model.is_empty() => {
                    let i = i % model.len();
                    let e = model[i].clone();
                    drop(log.compact_to(e.end(), e.term, e.timestamp));
                    model.drain(..=i);
                    base = e.end();
                    evicted = evicted.max(base);
                }
                LogOp::Evict(i) if !model.is_empty() => {
                    let upto = model[i % model.len()].end();
                    log.evict_data(upto);
                    evicted = evicted.max(upto);
                }
                _ => {}
            }
            let hollow = |e: &Entry| e.end() <= evicted && !e.data.is_empty();
            let held: u64 = model.iter().filter(|e| !hollow(e)).map(Entry::encoded_len).sum();
            prop_assert_eq!(log.held_bytes(), held);
            for (k, e) in model.iter().enumerate() {
                let ours = log.entry_at(e.position).expect("held");
                prop_assert_eq!(
                    (ours.term, ours.position, ours.timestamp, &ours.kind, ours.end()),
                    (e.term, e.position, e.timestamp, &e.kind, e.end())
                );
                prop_assert_eq!(keel_core::log::is_hollow(ours), hollow(e));
                if !hollow(e) {
                    prop_assert_eq!(ours, e);
                }
                prop_assert_eq!(log.term_at(e.end()), Some(e.term));
                let sent = log.entries_from(e.position, budget);
                prop_assert!(!sent.iter().any(keel_core::log::is_hollow));
                prop_assert_eq!(&sent[..], &model[k..k + sent.len()]);
                let run = log.hollow_run(e.position, budget);
                if hollow(e) {
                    prop_assert!(sent.is_empty());
                    // A run of hollow entries: at least one, within the
                    // budget unless it is the first.
                    let n = model[k..].iter().take_while(|x| hollow(x)).count();
                    let mut bytes = 0;
                    let mut end = e.end();
                    for x in &model[k..k + n] {
                        if bytes > 0 && bytes + x.encoded_len() > budget {
                            break;
                        }
                        bytes += x.encoded_len();
                        end = x.end();
                    }
                    prop_assert_eq!(run, Some(end));
                } else {
                    prop_assert_eq!(run, None);
                    prop_assert!(!sent.is_empty());
                }
            }
        }
    }

    /// The host's snapshot decoder rejects garbage with an error, never a panic.
    #[test]
    fn host_restore_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut host = ServiceHost::new(Counter::default(), 1_000);
        let snap = Snapshot {
            meta: SnapshotMeta { position: 10, term: 1, timestamp: 0, membership: Membership::default() },
            data: Bytes::from(data),
        };
        let _ = host.restore(&snap);
    }

    /// Reading only a snapshot's sessions rejects garbage with an error,
    /// never a panic, and agrees with a full restore about whether the
    /// session table can be read: whatever restores has readable sessions.
    #[test]
    fn snapshot_sessions_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let sessions = keel_core::snapshot_sessions(&data);
        let mut host = ServiceHost::new(Counter::default(), 1_000);
        let snap = Snapshot {
            meta: SnapshotMeta { position: 10, term: 1, timestamp: 0, membership: Membership::default() },
            data: Bytes::from(data),
        };
        if host.restore(&snap).is_ok() {
            prop_assert!(sessions.is_ok(), "restored, but its sessions did not read: {:?}", sessions);
        }
    }
}

#[test]
fn is_up_to_date_compares_last_term_then_position() {
    let mut log = Log::new(0, 0, 0);
    log.push(entry(2, 0, 10));
    let (t, p) = (log.last_term(), log.last_pos());
    assert!(log.is_up_to_date(t, p));
    assert!(
        log.is_up_to_date(3, 1),
        "higher last term wins even when shorter"
    );
    assert!(
        !log.is_up_to_date(1, p + 1000),
        "lower last term loses even when longer"
    );
    assert!(!log.is_up_to_date(t, p - 1));
}

#[test]
fn last_boundary_hint() {
    let mut log = Log::new(0, 0, 0);
    let a = entry(1, 0, 0);
    let b = entry(1, a.end(), 0);
    let c = entry(3, b.end(), 0);
    for e in [&a, &b, &c] {
        log.push(e.clone());
    }
    assert_eq!(log.last_boundary_at_or_before(c.end(), 2), (b.end(), 1));
    assert_eq!(log.last_boundary_at_or_before(c.end(), 3), (c.end(), 3));
    assert_eq!(log.last_boundary_at_or_before(b.end() + 1, 9), (b.end(), 1));
    assert_eq!(log.last_boundary_at_or_before(c.end(), 0), (0, 0));
}

/// A counter service: "inc" adds one and replies with the new value;
/// "timer" schedules timer 1 at +100.
#[derive(Default, Debug)]
struct Counter {
    n: u64,
    fired: Vec<(u64, Nanos)>,
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
    /// Captures the counter; serializes it when called.
    fn prepare_snapshot(&self) -> keel_core::SnapshotTask {
        let n = self.n;
        Box::new(move |out| out.write_all(&n.to_le_bytes()))
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, _c: ClientId, data: &[u8]) -> Bytes {
        if data == b"timer" {
            ctx.schedule_timer(1, ctx.time() + 100);
        } else {
            self.n += 1;
        }
        Bytes::from(self.n.to_le_bytes().to_vec())
    }
    fn query(&self, _d: &[u8]) -> Bytes {
        Bytes::from(self.n.to_le_bytes().to_vec())
    }
    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        self.fired.push((id, ctx.time()));
    }
}

fn cmd(pos: Position, client: ClientId, seq: u64, data: &'static [u8], ts: Nanos) -> Entry {
    Entry {
        term: 1,
        position: pos,
        timestamp: ts,
        kind: EntryKind::Command { client, seq },
        data: Bytes::from_static(data),
    }
}

#[test]
fn retried_commands_are_answered_not_applied_twice() {
    let mut host = ServiceHost::new(Counter::default(), 1_000_000);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, 5, 1, b"inc", 1);
    let e2 = cmd(e1.end(), 5, 1, b"inc", 2); // the same request, retried
    let e3 = cmd(e2.end(), 5, 2, b"inc", 3);
    let e4 = cmd(e3.end(), 5, 1, b"inc", 4); // a very late duplicate
    host.apply(&[e1, e2, e3, e4], &mut out);
    assert_eq!(host.service().n, 2);
    let one = Bytes::from(1u64.to_le_bytes().to_vec());
    let two = Bytes::from(2u64.to_le_bytes().to_vec());
    assert_eq!(
        out.replies,
        vec![
            (5, 1, Reply::Applied(one.clone())),
            (5, 1, Reply::Duplicate(one)),
            (5, 2, Reply::Applied(two)),
            (5, 1, Reply::Stale),
        ]
    );
}

#[test]
fn timers_fire_only_from_their_logged_entry_and_only_once() {
    let mut host = ServiceHost::new(Counter::default(), 1_000_000);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, 5, 1, b"timer", 1_000);
    host.apply(std::slice::from_ref(&e1), &mut out);
    assert_eq!(
        out.timers,
        vec![TimerUpdate::Set {
            id: 1,
            deadline: 1_100
        }]
    );
    let fire = |pos, deadline| Entry {
        term: 1,
        position: pos,
        timestamp: 1_150,
        kind: EntryKind::Timer { id: 1, deadline },
        data: Bytes::new(),
    };
    let stale = fire(e1.end(), 999); // a timer entry for another deadline
    let real = fire(stale.end(), 1_100);
    let dup = fire(real.end(), 1_100); // appended twice across a leader change
    out.clear();
    host.apply(&[stale, real, dup], &mut out);
    assert_eq!(host.service().fired, vec![(1, 1_150)]);
    assert_eq!(out.timers, vec![TimerUpdate::Cancel { id: 1 }]);
}

#[test]
fn host_snapshot_round_trips_sessions_timers_and_state() {
    let mut host = ServiceHost::new(Counter::default(), 1_000_000);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, 5, 1, b"inc", 10);
    let e2 = cmd(e1.end(), 6, 1, b"timer", 20);
    host.apply(&[e1, e2.clone()], &mut out);
    let snap = Snapshot {
        meta: SnapshotMeta {
            position: e2.end(),
            term: 1,
            timestamp: 20,
            membership: Membership::default(),
        },
        data: host.snapshot(),
    };
    let mut copy = ServiceHost::new(Counter::default(), 1_000_000);
    let timers = copy.restore(&snap).expect("restore");
    assert_eq!(
        timers,
        vec![
            TimerUpdate::Clear,
            TimerUpdate::Set {
                id: 1,
                deadline: 120
            }
        ]
    );
    assert_eq!(copy.service().n, 1);
    assert_eq!(copy.applied(), e2.end());
    // Its session table alone reads back too: client 5's last request and
    // the reply to it, client 6's likewise.
    let sessions = keel_core::snapshot_sessions(&snap.data).expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.client, s.last_seq))
            .collect::<Vec<_>>(),
        vec![(5, 1), (6, 1)]
    );
    assert_eq!(keel_core::snapshot_sessions(&[]), Ok(Vec::new()));
    // The session survived: a retry after restore is a duplicate.
    out.clear();
    copy.apply(&[cmd(e2.end(), 5, 1, b"inc", 30)], &mut out);
    assert!(matches!(out.replies[0].2, Reply::Duplicate(_)));
    assert_eq!(copy.service().n, 1);
    // The first format (the service's state length-prefixed) still
    // restores; here the state is the counter's last 8 bytes.
    let mut v1 = b"KSH1".to_vec();
    let (host_part, state) = snap.data.split_at(snap.data.len() - 8);
    assert_eq!(&host_part[..4], b"KSH2");
    v1.extend_from_slice(&host_part[4..]);
    v1.extend_from_slice(&8u64.to_le_bytes());
    v1.extend_from_slice(state);
    let mut old = ServiceHost::new(Counter::default(), 1_000_000);
    let v1 = Snapshot {
        data: Bytes::from(v1),
        ..snap.clone()
    };
    assert_eq!(old.restore(&v1).expect("restore version 1"), timers);
    assert_eq!((old.service().n, old.session_count()), (1, 2));
    // Damaged snapshots are refused with a reason.
    let mut bad = snap.clone();
    bad.data = bad.data.slice(..bad.data.len() - 1);
    assert!(copy.restore(&bad).is_err());
    // Another format's file is named by its magic, as text an operator
    // can match against the formats they know.
    let mut other = snap.clone();
    other.data = Bytes::from_static(b"KKV2 and the rest of a KV snapshot");
    let e = copy
        .restore(&other)
        .expect_err("a KV snapshot is not a host snapshot");
    assert_eq!(
        e.to_string(),
        r#"snapshot data has bad magic "KKV2", expected "KSH2""#
    );
}

#[test]
fn magic_text_is_quoted_ascii_or_hex() {
    assert_eq!(MagicText(b"ECH1").to_string(), r#""ECH1""#);
    assert_eq!(MagicText(&[0, 0xff, 0x12, 0x34]).to_string(), "0x00ff1234");
    // A space or control byte is not taken for text.
    assert_eq!(MagicText(b"AB C").to_string(), "0x41422043");
    assert_eq!(MagicText(&[]).to_string(), "0x");
}

/// A snapshot prepared between entries and serialized later (on another
/// thread, while more entries are applied) holds the state at the moment it
/// was prepared: service, sessions and timers, byte for byte what
/// `snapshot` returned then.
#[test]
fn a_prepared_snapshot_captures_the_state_when_prepared() {
    let mut host = ServiceHost::new(Counter::default(), 1_000_000);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, 5, 1, b"inc", 10);
    let e2 = cmd(e1.end(), 6, 1, b"timer", 20);
    host.apply(&[e1, e2.clone()], &mut out);
    let then = host.snapshot();
    let task = host.prepare_snapshot();
    let e3 = cmd(e2.end(), 7, 1, b"inc", 30);
    let fire = Entry {
        term: 1,
        position: e3.end(),
        timestamp: 200,
        kind: EntryKind::Timer {
            id: 1,
            deadline: 120,
        },
        data: Bytes::new(),
    };
    host.apply(&[e3, fire], &mut out);
    assert_eq!(host.service().n, 2);
    let later = std::thread::spawn(move || {
        let mut b = Vec::new();
        task(&mut b).map(|()| Bytes::from(b))
    })
    .join()
    .expect("serializing thread")
    .expect("writing to a Vec");
    assert_eq!(later, then);
    assert_ne!(host.snapshot(), then);
    let mut copy = ServiceHost::new(Counter::default(), 1_000_000);
    let snap = Snapshot {
        meta: SnapshotMeta {
            position: e2.end(),
            term: 1,
            timestamp: 20,
            membership: Membership::default(),
        },
        data: later,
    };
    let timers = copy.restore(&snap).expect("restore");
    assert_eq!(copy.service().n, 1);
    assert_eq!(copy.session_count(), 2);
    assert_eq!(
        timers,
        vec![
            TimerUpdate::Clear,
            TimerUpdate::Set {
                id: 1,
                deadline: 120
            }
        ]
    );
}

#[test]
fn idle_sessions_expire_in_log_time() {
    let mut host = ServiceHost::new(Counter::default(), 100);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, 5, 1, b"inc", 0);
    let e2 = cmd(e1.end(), 6, 1, b"inc", 1_000);
    host.apply(&[e1, e2], &mut out);
    assert_eq!(host.session_count(), 1, "session 5 should have expired");
}

#[test]
fn membership_changes_are_validated() {
    let m = Membership::new([1, 2, 3]);
    assert!(MembershipChange::AddLearner(2).apply(&m).is_err());
    assert!(MembershipChange::PromoteLearner(4).apply(&m).is_err());
    assert!(MembershipChange::Remove(9).apply(&m).is_err());
    let m2 = MembershipChange::AddLearner(4).apply(&m).expect("add");
    assert!(m2.learners.contains(&4) && !m2.is_voter(4));
    assert_eq!(m2.quorum(), 2, "learners never count toward quorum");
    let m3 = MembershipChange::PromoteLearner(4)
        .apply(&m2)
        .expect("promote");
    assert_eq!(m3.quorum(), 3);
    assert!(MembershipChange::Remove(1)
        .apply(&Membership::new([1]))
        .is_err());
}

#[test]
fn sessionless_commands_apply_every_time() {
    let mut host = ServiceHost::new(Counter::default(), 1_000_000);
    let mut out = ApplyOutput::default();
    let e1 = cmd(0, SESSIONLESS, 1, b"inc", 1);
    let e2 = cmd(e1.end(), SESSIONLESS, 1, b"inc", 2);
    host.apply(&[e1, e2], &mut out);
    assert_eq!(host.service().n, 2);
    assert_eq!(host.session_count(), 0);
    assert!(out.replies.iter().all(|r| matches!(r.2, Reply::Applied(_))));
}

proptest! {
    /// The log's newest-first search answers exactly as a binary search,
    /// for boundaries, positions inside entries, and positions outside the
    /// log, by start and by end.
    #[test]
    fn newest_first_search_agrees_with_binary_search(
        base in 0u64..1_000,
        sizes in proptest::collection::vec(0usize..40, 0..300),
        probes in proptest::collection::vec(0u64..20_000, 1..60),
    ) {
        let mut entries = std::collections::VecDeque::new();
        let mut pos = base;
        for len in sizes {
            let e = entry(1, pos, len);
            pos = e.end();
            entries.push_back(e);
        }
        let ends: Vec<Position> = entries.iter().map(Entry::end).collect();
        let probes = probes.into_iter().chain(ends.iter().copied()).chain([base, pos]);
        for p in probes {
            prop_assert_eq!(
                keel_core::log::search_newest_first(&entries, p, Entry::end),
                entries.binary_search_by_key(&p, Entry::end)
            );
            prop_assert_eq!(
                keel_core::log::search_newest_first(&entries, p, |e| e.position),
                entries.binary_search_by_key(&p, |e| e.position)
            );
        }
    }
}
