//! Test harness shared by the example services' tests: drives a service
//! through `ServiceHost` with command and timer entries at controlled log
//! times, and moves a host's state to a fresh one by snapshot.

use bytes::Bytes;
use keel_core::{
    ApplyOutput, Entry, EntryKind, Membership, Nanos, Reply, Service, ServiceHost, Snapshot,
    SnapshotMeta, TimerUpdate,
};

const TTL: Nanos = 3_600_000_000_000;

pub(crate) struct Harness<S> {
    pub(crate) host: ServiceHost<S>,
    pos: u64,
    seq: u64,
    /// Log time of the next entry.
    pub(crate) time: Nanos,
    /// Timer changes made by the last applied entry.
    pub(crate) timers: Vec<TimerUpdate>,
}

impl<S: Service> Harness<S> {
    pub(crate) fn new(service: S) -> Harness<S> {
        Harness {
            host: ServiceHost::new(service, TTL),
            pos: 0,
            seq: 0,
            time: 1_000_000,
            timers: Vec::new(),
        }
    }

    pub(crate) fn svc(&self) -> &S {
        self.host.service()
    }

    fn apply(&mut self, kind: EntryKind, data: Bytes) -> ApplyOutput {
        let e = Entry {
            term: 1,
            position: self.pos,
            timestamp: self.time,
            kind,
            data,
        };
        self.pos = e.end();
        let mut out = ApplyOutput::default();
        self.host.apply(&[e], &mut out);
        self.timers = out.timers.clone();
        out
    }

    /// Applies a command at the current time; returns the service's reply.
    pub(crate) fn raw(&mut self, data: Bytes) -> Bytes {
        self.seq += 1;
        let kind = EntryKind::Command {
            client: 1,
            seq: self.seq,
        };
        let mut out = self.apply(kind, data);
        match out.replies.pop() {
            Some((1, _, Reply::Applied(b))) => b,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Applies a new leader's term-start entry at the current time.
    pub(crate) fn term_start(&mut self) {
        self.apply(
            EntryKind::TermStart,
            Bytes::from_static(keel_core::TERM_START_MARK),
        );
    }

    /// Applies a timer entry for (id, deadline) at the current time.
    pub(crate) fn timer(&mut self, id: u64, deadline: Nanos) {
        self.apply(EntryKind::Timer { id, deadline }, Bytes::new());
    }

    /// The deadline of timer `id` if set by the last applied entry.
    pub(crate) fn scheduled(&self, id: u64) -> Option<Nanos> {
        self.timers.iter().rev().find_map(|t| match t {
            TimerUpdate::Set { id: i, deadline } if *i == id => Some(*deadline),
            _ => None,
        })
    }

    /// A harness whose host was restored from this one's snapshot.
    pub(crate) fn restored(&self, fresh: S) -> Harness<S> {
        let snap = Snapshot {
            meta: SnapshotMeta {
                position: self.host.applied(),
                term: 1,
                timestamp: self.time,
                membership: Membership::new([1]),
            },
            data: self.host.snapshot(),
        };
        let mut host = ServiceHost::new(fresh, TTL);
        if let Err(e) = host.restore(&snap) {
            panic!("restore failed: {e}");
        }
        Harness {
            host,
            pos: self.pos,
            seq: self.seq,
            time: self.time,
            timers: Vec::new(),
        }
    }
}
