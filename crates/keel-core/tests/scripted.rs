//! Scripted consensus scenarios: a small cluster driven message by message,
//! each test steering the exact interleaving that exposes one class of bug
//! (the ones a random schedule seldom produces: a deposed leader answering
//! a read, a vote lost in a crash, an acknowledgement of what is not on
//! disk, Raft's figure 8, ...). Nothing here is random: the same script
//! gives the same run, so each test catches its bug every time.
//!
//! The harness is a runtime that does nothing on its own: messages wait on
//! the wire until a test delivers (or drops) them, disks sync when a test
//! says so (or at once, per node), applied positions are reported when a
//! test says so (or at once), and each node's clock may run at its own
//! rate. While executing actions, in order, it checks what must hold
//! whatever the script: a granted vote is on disk before its reply is sent,
//! an acknowledged position is synced, committed entries are handed to the
//! service once each, in order, and there is at most one leader per term.

use bytes::Bytes;
use keel_core::*;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

const MS: Nanos = 1_000_000;
const CLUSTER: u64 = 7;

/// A node's storage: its hard state and its log as written (synced up to
/// `synced`; a crash loses the rest).
#[derive(Clone, Default)]
struct Disk {
    hard: HardState,
    written: Vec<Entry>,
    synced: Position,
}

impl Disk {
    fn written_end(&self) -> Position {
        self.written.last().map_or(0, Entry::end)
    }
}

type Pred<'a> = &'a dyn Fn(&Message) -> bool;
type CrashPoint = (NodeId, Box<dyn Fn(&Message) -> bool>);

struct Cluster {
    membership: Membership,
    cfgs: BTreeMap<NodeId, Config>,
    /// Running nodes (a crashed node is absent until restarted).
    nodes: BTreeMap<NodeId, Node>,
    disks: BTreeMap<NodeId, Disk>,
    /// Clock rate of each node off true time, in parts per million.
    rate_ppm: BTreeMap<NodeId, i64>,
    /// True time.
    t: Nanos,
    /// Messages sent and neither delivered nor dropped, oldest first.
    wire: VecDeque<Message>,
    /// Directed links that drop what is sent (and what is in flight).
    cut: HashSet<(NodeId, NodeId)>,
    /// Nodes whose disks sync only when the test says (`sync`).
    manual_sync: HashSet<NodeId>,
    /// Nodes whose service reports what it applied only when the test says
    /// (`report_applied`).
    manual_apply: HashSet<NodeId>,
    /// Per node: where the next `Apply` must start (this incarnation).
    apply_next: BTreeMap<NodeId, Position>,
    /// Per node: everything handed to it with `Apply`, in order.
    applied: BTreeMap<NodeId, Vec<Entry>>,
    ready: Vec<(NodeId, RequestId, Position)>,
    rejected: Vec<(NodeId, RequestId, RejectReason)>,
    installed: Vec<(NodeId, SnapshotMeta)>,
    /// Who led each term (from `RoleChanged`).
    leaders: BTreeMap<Term, NodeId>,
    /// Crash this node right after it sends a message matching the
    /// predicate: the rest of that step's actions are never executed.
    crash_after_send: Option<CrashPoint>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        Self::with_configs(n, |_| {})
    }

    /// `n` voters, each with `Config::new` adjusted by `adjust`. Commit
    /// notifications go out at once (no `commit_notify_delay`), so a
    /// script sees every message a commit causes in the same step.
    fn with_configs(n: u64, adjust: impl Fn(&mut Config)) -> Self {
        let membership = Membership::new(1..=n);
        let mut c = Cluster {
            membership: membership.clone(),
            cfgs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            rate_ppm: BTreeMap::new(),
            t: 0,
            wire: VecDeque::new(),
            cut: HashSet::new(),
            manual_sync: HashSet::new(),
            manual_apply: HashSet::new(),
            apply_next: BTreeMap::new(),
            applied: BTreeMap::new(),
            ready: Vec::new(),
            rejected: Vec::new(),
            installed: Vec::new(),
            leaders: BTreeMap::new(),
            crash_after_send: None,
        };
        for id in 1..=n {
            let mut cfg = Config::new(id, CLUSTER);
            cfg.commit_notify_delay = 0;
            adjust(&mut cfg);
            c.nodes
                .insert(id, Node::new(cfg.clone(), membership.clone(), 0));
            c.cfgs.insert(id, cfg);
            c.disks.insert(id, Disk::default());
            c.apply_next.insert(id, 0);
        }
        c
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("node {id} is down"))
    }

    /// Node `id`'s clock: true time scaled by its rate.
    fn clock(&self, id: NodeId) -> Nanos {
        let ppm = i128::from(self.rate_ppm.get(&id).copied().unwrap_or(0));
        (i128::from(self.t) * (1_000_000 + ppm) / 1_000_000) as Nanos
    }

    fn advance(&mut self, dt: Nanos) {
        self.t += dt;
    }

    /// Feeds one event to a running node and executes its actions in
    /// order (and the events they cause: syncs and applies not held back).
    fn step(&mut self, id: NodeId, ev: Event) {
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let now = self.clock(id);
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            let mut out = Vec::new();
            node.step(now, ev, &mut out);
            for a in out {
                if self.execute(id, a, &mut queue) {
                    self.crash(id);
                    return;
                }
            }
        }
    }

    /// Executes one action of node `id`; true if the node crashes here.
    fn execute(&mut self, id: NodeId, a: Action, queue: &mut VecDeque<Event>) -> bool {
        let disk = self.disks.get_mut(&id).expect("a disk per node");
        match a {
            Action::PersistHardState(hs) => disk.hard = hs,
            Action::Append(es) => {
                let first = es.first().expect("an append of no entries").position;
                assert_eq!(
                    first,
                    disk.written_end(),
                    "node {id}: an append that does not follow its log"
                );
                disk.written.extend(es);
                if !self.manual_sync.contains(&id) {
                    queue.push_back(sync_disk(disk));
                }
            }
            Action::Truncate { from } => {
                disk.written.retain(|e| e.position < from);
                disk.synced = disk.synced.min(from);
            }
            Action::Send(m) => {
                assert_eq!(m.from, id);
                self.check_send(&m);
                let crash = self
                    .crash_after_send
                    .as_ref()
                    .is_some_and(|(n, p)| *n == id && p(&m));
                if !self.cut.contains(&(m.from, m.to)) {
                    self.wire.push_back(m);
                }
                if crash {
                    self.crash_after_send = None;
                    return true;
                }
            }
            Action::Apply(es) => {
                let next = self.apply_next[&id];
                let mut at = next;
                for e in &es {
                    assert_eq!(
                        e.position, at,
                        "node {id}: applied the entry at {} where {at} was due \
                         (it had been handed everything up to {next})",
                        e.position
                    );
                    at = e.end();
                }
                self.apply_next.insert(id, at);
                self.applied.entry(id).or_default().extend(es);
                if !self.manual_apply.contains(&id) {
                    queue.push_back(Event::Applied {
                        position: at,
                        timers: vec![],
                    });
                }
            }
            Action::ReadReady { id: r, index } => self.ready.push((id, r, index)),
            Action::Rejected { id: r, reason } => self.rejected.push((id, r, reason)),
            Action::RoleChanged {
                role: Role::Leader,
                term,
                ..
            } => {
                if let Some(&other) = self.leaders.get(&term) {
                    assert_eq!(other, id, "two leaders of term {term}: {other} and {id}");
                }
                self.leaders.insert(term, id);
            }
            Action::InstallSnapshot { meta, .. } => self.installed.push((id, meta)),
            _ => {}
        }
        false
    }

    /// What must hold of every message when it is sent.
    fn check_send(&self, m: &Message) {
        let disk = &self.disks[&m.from];
        match m.body {
            Body::VoteResp { granted: true, .. } => assert!(
                disk.hard.term == m.term && disk.hard.voted_for == Some(m.to),
                "node {} granted its vote in term {} to {} before that was on disk \
                 (its disk holds term {}, vote {:?})",
                m.from,
                m.term,
                m.to,
                disk.hard.term,
                disk.hard.voted_for
            ),
            Body::AppendResp {
                ok: true, position, ..
            } => assert!(
                position <= disk.synced,
                "node {} acknowledged position {position} with only {} synced",
                m.from,
                disk.synced
            ),
            _ => {}
        }
    }

    /// Syncs node `id`'s disk and tells it so.
    fn sync(&mut self, id: NodeId) {
        let ev = sync_disk(self.disks.get_mut(&id).expect("a disk"));
        self.step(id, ev);
    }

    /// Node `id`'s service reports it applied everything handed to it.
    fn report_applied(&mut self, id: NodeId) {
        let position = self.apply_next[&id];
        self.step(
            id,
            Event::Applied {
                position,
                timers: vec![],
            },
        );
    }

    /// The node stops; everything its disk had not synced is lost.
    fn crash(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        let disk = self.disks.get_mut(&id).expect("a disk");
        let synced = disk.synced;
        disk.written.retain(|e| e.end() <= synced);
    }

    /// The node starts again from its disk (the service from the empty
    /// snapshot, so it is handed the log from the start again).
    fn restart(&mut self, id: NodeId) {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let disk = &self.disks[&id];
        let recovered = Recovered {
            hard_state: disk.hard,
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    position: 0,
                    term: 0,
                    timestamp: 0,
                    membership: self.membership.clone(),
                },
                data: Bytes::new(),
            }),
            snapshot_file_size: 0,
            entries: disk.written.clone(),
        };
        let node = Node::restart(self.cfgs[&id].clone(), recovered, self.clock(id));
        self.nodes.insert(id, node);
        self.apply_next.insert(id, 0);
    }

    /// Delivers, oldest first, the messages on the wire that match `pred`,
    /// and those their delivery sends, until none matches; the others stay
    /// on the wire. Messages over a cut link or to a node that is down are
    /// dropped.
    fn deliver_matching(&mut self, pred: Pred) {
        let mut budget = 10_000;
        while let Some(i) = self.wire.iter().position(pred) {
            budget -= 1;
            assert!(budget > 0, "message storm");
            let m = self.wire.remove(i).expect("found");
            if self.cut.contains(&(m.from, m.to)) || !self.nodes.contains_key(&m.to) {
                continue;
            }
            self.step(m.to, Event::Message(m));
        }
    }

    /// Delivers the oldest message on the wire that matches `pred` (only
    /// that one); false if none does.
    fn deliver_one(&mut self, pred: Pred) -> bool {
        let Some(i) = self.wire.iter().position(pred) else {
            return false;
        };
        let m = self.wire.remove(i).expect("found");
        if !self.cut.contains(&(m.from, m.to)) && self.nodes.contains_key(&m.to) {
            self.step(m.to, Event::Message(m));
        }
        true
    }

    fn deliver_all(&mut self) {
        self.deliver_matching(&|_| true);
    }

    /// Removes the messages on the wire that match `pred`, oldest first.
    fn take_matching(&mut self, pred: Pred) -> Vec<Message> {
        let (taken, kept) = self.wire.drain(..).partition(|m| pred(m));
        self.wire = kept;
        taken.into()
    }

    fn drop_matching(&mut self, pred: Pred) {
        self.take_matching(pred);
    }

    /// Cuts every link between the two groups, both ways.
    fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Lets every election timeout and vote hold run out, then has `cand`
    /// stand (ticking no one else) and delivers the election's messages
    /// only, until it leads; it may take more than one election (a vote
    /// already cast in the next term). The new leader's appends stay on the
    /// wire.
    fn campaign(&mut self, cand: NodeId) {
        for _ in 0..5 {
            let longest = self
                .cfgs
                .values()
                .map(|c| c.election_timeout_max)
                .max()
                .unwrap_or(0);
            self.advance(longest + 100 * MS);
            self.step(cand, Event::Tick);
            self.deliver_matching(&is_election);
            if self.node(cand).is_leader() {
                return;
            }
        }
        panic!("node {cand} did not win an election");
    }

    /// `campaign`, then delivers everything.
    fn elect(&mut self, cand: NodeId) {
        self.campaign(cand);
        self.deliver_all();
    }

    fn propose(&mut self, id: NodeId, req: RequestId, data: &'static [u8]) {
        self.step(
            id,
            Event::Propose(vec![Proposal {
                id: req,
                client: 1,
                seq: req,
                data: Bytes::from_static(data),
            }]),
        );
    }

    fn read(&mut self, id: NodeId, req: RequestId) {
        self.step(id, Event::Read { id: req });
    }

    fn read_ready(&self, req: RequestId) -> Option<(NodeId, Position)> {
        self.ready
            .iter()
            .find(|r| r.1 == req)
            .map(|&(n, _, index)| (n, index))
    }

    fn read_rejected(&self, req: RequestId) -> bool {
        self.rejected.iter().any(|r| r.1 == req)
    }

    /// Where the command with `data` ends in node `id`'s log.
    fn end_of(&self, id: NodeId, data: &[u8]) -> Position {
        self.node(id)
            .log()
            .iter()
            .find(|e| matches!(e.kind, EntryKind::Command { .. }) && e.data == data)
            .map(Entry::end)
            .unwrap_or_else(|| panic!("node {id} does not hold {data:?}"))
    }

    fn holds(&self, id: NodeId, data: &[u8]) -> bool {
        self.node(id).log().iter().any(|e| e.data == data)
    }
}

/// Marks everything written as synced; the event that reports it.
fn sync_disk(disk: &mut Disk) -> Event {
    disk.synced = disk.written_end();
    let (position, term) = disk.written.last().map_or((0, 0), |e| (e.end(), e.term));
    Event::Durable { position, term }
}

fn is_election(m: &Message) -> bool {
    matches!(
        m.body,
        Body::PreVote { .. } | Body::PreVoteResp { .. } | Body::Vote { .. } | Body::VoteResp { .. }
    )
}

fn is_append(m: &Message) -> bool {
    matches!(m.body, Body::Append { .. })
}

// ----- reads ----------------------------------------------------------------

/// A leader cut off from the majority, which has elected a new leader and
/// committed a write there, must not confirm a read: only a heartbeat round
/// answered by a quorum shows it still leads. With `n` = 5 it keeps one
/// follower, whose echoes are not a quorum.
fn a_deposed_leader_never_confirms_a_read(n: u64) {
    let mut c = Cluster::new(n);
    c.elect(1);
    // A read now takes one heartbeat round (this also makes every
    // follower echo the leader's latest heartbeat before the cut).
    c.read(1, 1);
    c.deliver_all();
    assert!(c.read_ready(1).is_some(), "a read confirmed by a quorum");

    let minority: Vec<NodeId> = (1..=(n - 1) / 2).collect();
    let majority: Vec<NodeId> = ((n - 1) / 2 + 1..=n).collect();
    c.partition(&minority, &majority);
    let new = majority[0];
    c.elect(new);
    c.propose(new, 2, b"written by the new leader");
    c.deliver_all();
    let w = c.end_of(new, b"written by the new leader");
    assert!(c.node(new).commit_position() >= w, "the write committed");

    // The old leader has not noticed (it was not ticked): a read there.
    assert!(c.node(1).is_leader());
    c.read(1, 3);
    assert_eq!(
        c.read_ready(3),
        None,
        "a leader answered a read at once, without a heartbeat round"
    );
    c.deliver_all();
    assert_eq!(
        c.read_ready(3),
        None,
        "a leader without a quorum confirmed a read: the write at {w} is missed"
    );
    // Once it hears of the new term it steps down and refuses the read.
    c.heal();
    c.advance(100 * MS);
    c.step(1, Event::Tick);
    c.deliver_all();
    assert!(!c.node(1).is_leader());
    assert_eq!(c.read_ready(3), None);
    assert!(c.read_rejected(3), "the read is refused once it steps down");
}

#[test]
fn a_deposed_leader_of_three_never_confirms_a_read() {
    a_deposed_leader_never_confirms_a_read(3);
}

#[test]
fn a_deposed_leader_of_five_keeping_one_follower_never_confirms_a_read() {
    a_deposed_leader_never_confirms_a_read(5);
}

/// With lease reads, a deposed leader answers reads at once only while no
/// other leader can have been elected: here its clock runs slow and its
/// voters' fast (0.9% each way; the nodes assume up to 1%), its election
/// timeout is longer than theirs, and their echoes of its last heartbeat
/// reach it 50 ms late. Its lease must end, on its slow clock, before they
/// can elect a leader on their fast ones.
#[test]
fn a_deposed_leaders_lease_ends_before_a_new_leader_can_be_elected() {
    let mut c = Cluster::with_configs(3, |cfg| {
        cfg.lease_reads = true;
        cfg.clock_drift_ppm = 10_000;
        if cfg.id == 1 {
            cfg.election_timeout_min = 700 * MS;
            cfg.election_timeout_max = 1_400 * MS;
        } else {
            // They stand as soon as they stop holding their votes.
            cfg.election_timeout_min = 500 * MS;
            cfg.election_timeout_max = 500 * MS + 1;
        }
    });
    c.rate_ppm.insert(1, -9_000);
    c.rate_ppm.insert(2, 9_000);
    c.rate_ppm.insert(3, 9_000);
    c.elect(1);

    // A heartbeat round, the echoes held back 50 ms; then node 1 is cut off.
    c.advance(100 * MS);
    c.step(1, Event::Tick);
    let t0 = c.t;
    c.deliver_matching(&|m| m.from == 1);
    c.advance(50 * MS);
    c.deliver_all();
    c.partition(&[1], &[2, 3]);

    let (mut last_lease_read, mut new_leader_at) = (None, None);
    let mut req = 100;
    while c.t < t0 + 800 * MS {
        c.advance(MS);
        // (Node 2 stands; node 3 only votes, so they do not split.)
        c.step(2, Event::Tick);
        c.deliver_all();
        if new_leader_at.is_none() && (c.node(2).is_leader() || c.node(3).is_leader()) {
            new_leader_at = Some(c.t);
        }
        req += 1;
        c.read(1, req);
        if c.read_ready(req).is_some() {
            last_lease_read = Some(c.t);
        }
    }
    let last_lease_read = last_lease_read.expect("node 1 answered reads from its lease");
    let new_leader_at = new_leader_at.expect("nodes 2 and 3 elected a leader");
    assert!(
        last_lease_read >= t0 + 450 * MS,
        "the lease ended early ({} ms after the heartbeat): the test shows nothing",
        (last_lease_read - t0) / MS
    );
    assert!(
        last_lease_read < new_leader_at,
        "node 1 answered a read from its lease {} ms after the heartbeat, when nodes 2 and 3 \
         had elected a leader at {} ms",
        (last_lease_read - t0) / MS,
        (new_leader_at - t0) / MS
    );
}

/// A new leader may not know how far the log is committed: the write below
/// committed in the previous term, but only the old leader heard. Until an
/// entry of its own term commits, the new leader's commit position says
/// nothing, so a read must wait for that, not just for a heartbeat round.
#[test]
fn a_new_leader_answers_reads_only_once_an_entry_of_its_term_commits() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, 1, b"w");
    // Nodes 2 and 3 take the write and acknowledge it; node 1 commits it,
    // and its commit notifications are lost.
    c.deliver_matching(&|m| m.from == 1);
    c.deliver_matching(&|m| m.to == 1);
    let w = c.end_of(1, b"w");
    assert!(c.node(1).commit_position() >= w);
    c.drop_matching(&|m| m.from == 1);
    assert!(c.node(2).commit_position() < w && c.node(3).commit_position() < w);
    c.crash(1);

    // Node 2 is elected; node 3 takes its term start but does not sync it.
    c.manual_sync.insert(3);
    c.campaign(2);
    c.read(2, 2);
    c.deliver_all();
    assert!(c.node(2).is_leader());
    assert!(
        c.node(2).commit_position() < w,
        "nothing of term 2 is committed yet"
    );
    assert_eq!(
        c.read_ready(2),
        None,
        "the new leader answered a read at {}, below the write committed at {w}",
        c.node(2).commit_position()
    );
    c.sync(3);
    c.deliver_all();
    let (_, index) = c.read_ready(2).expect("the read is answered");
    assert!(index >= w, "the read index {index} misses the write at {w}");
}

/// A read's index is at least the commit position when it arrived, even if
/// the service has not applied that far yet; on the leader and forwarded
/// from a follower.
#[test]
fn a_read_index_covers_what_was_committed_when_the_read_arrived() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.manual_apply.insert(1);
    c.manual_apply.insert(2);
    c.propose(1, 1, b"w1");
    c.deliver_all();
    c.report_applied(1);
    c.report_applied(2);
    c.propose(1, 2, b"w2");
    c.deliver_all();
    let w2 = c.end_of(1, b"w2");
    assert_eq!(c.node(1).commit_position(), w2);
    assert_eq!(c.node(2).commit_position(), w2);
    assert!(c.node(1).applied_position() < w2, "not applied yet");

    c.read(1, 10);
    c.read(2, 11);
    c.deliver_all();
    for req in [10, 11] {
        let (_, index) = c.read_ready(req).expect("the read is answered");
        assert!(
            index >= w2,
            "read {req}: index {index} is below the commit {w2} when it arrived"
        );
    }
}

// ----- votes ----------------------------------------------------------------

/// A voter that crashes right after its vote left must remember it: else,
/// restarted with the term before, it votes again in the same term and two
/// leaders share it.
#[test]
fn a_vote_survives_a_crash_right_after_the_reply_left() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.crash(1);
    c.crash_after_send = Some((
        3,
        Box::new(|m| matches!(m.body, Body::VoteResp { granted: true, .. })),
    ));
    c.campaign(2);
    let term = c.node(2).term();
    assert!(!c.nodes.contains_key(&3), "node 3 crashed after voting");
    // Node 2 leads term 2 and is cut off before anyone hears from it.
    c.partition(&[2], &[1, 3]);
    c.restart(1);
    c.restart(3);
    assert_eq!(
        (c.node(3).term(), c.node(3).voted_for()),
        (term, Some(2)),
        "node 3's vote was lost in the crash"
    );
    // Node 1 stands: node 3 must not vote for it in node 2's term.
    c.advance(2_000 * MS);
    c.step(1, Event::Tick);
    c.deliver_matching(&is_election);
    assert!(
        !(c.node(1).is_leader() && c.node(1).term() == term),
        "two leaders of term {term}"
    );
}

/// A voter refuses a candidate whose log is behind its own, here one that
/// misses a committed entry.
#[test]
fn a_voter_refuses_a_candidate_whose_log_is_behind() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.partition(&[3], &[1, 2]);
    c.propose(1, 1, b"w");
    c.deliver_all();
    let w = c.end_of(1, b"w");
    assert!(c.node(1).commit_position() >= w);
    c.crash(1);
    c.heal();
    // Node 3 missed the write; node 2 holds it and must not vote for 3.
    c.advance(2_000 * MS);
    c.step(3, Event::Tick);
    c.deliver_matching(&is_election);
    c.advance(2_000 * MS);
    c.step(3, Event::Tick);
    c.deliver_matching(&is_election);
    assert!(
        !c.node(3).is_leader(),
        "node 3 was elected without the committed write"
    );
}

// ----- acknowledgements and commit ------------------------------------------

/// A follower acknowledges only what its disk has synced: if it counted
/// what it merely wrote, the leader could commit an entry that a crash of
/// the followers then erases.
#[test]
fn followers_acknowledge_only_what_they_have_synced() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.manual_sync.insert(2);
    c.manual_sync.insert(3);
    c.propose(1, 1, b"w");
    c.deliver_all();
    let w = c.end_of(1, b"w");
    assert!(c.holds(2, b"w") && c.holds(3, b"w"));
    // A heartbeat (and a read, which wants an answer at once) make them
    // answer: with what they have synced.
    c.advance(100 * MS);
    c.step(1, Event::Tick);
    c.read(1, 2);
    c.deliver_all();
    assert!(
        c.node(1).commit_position() < w,
        "the leader committed an entry only it has on disk"
    );
    c.sync(2);
    c.deliver_all();
    assert_eq!(c.node(1).commit_position(), w, "committed once synced");
}

/// The leader counts itself only for what its own disk has synced, and
/// never commits on its own.
#[test]
fn the_leader_commits_only_what_a_quorum_has_synced() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.manual_sync.insert(1);
    c.partition(&[1], &[3]);
    c.propose(1, 1, b"w1");
    c.deliver_all();
    let w1 = c.end_of(1, b"w1");
    assert!(c.node(2).durable_position() >= w1, "node 2 synced it");
    assert!(
        c.node(1).commit_position() < w1,
        "the leader counted its unsynced copy towards the quorum"
    );
    c.sync(1);
    c.deliver_all();
    assert_eq!(c.node(1).commit_position(), w1);

    // Alone, the leader commits nothing, synced or not.
    c.partition(&[1], &[2]);
    c.propose(1, 2, b"w2");
    c.sync(1);
    c.deliver_all();
    assert_eq!(
        c.node(1).commit_position(),
        w1,
        "committed without a quorum"
    );
}

/// Raft's figure 8: a leader must not commit an entry of an earlier term by
/// counting the nodes that hold it, since a node with a later last term can
/// still be elected and overwrite it. Node 1 (leader of term 1) writes `x`
/// alone; node 2 leads term 2 with an entry nobody receives; node 1, back
/// in a later term, copies `x` to node 3 (a majority holds `x`) but its own
/// term's entry reaches no one: `x` must not commit. Node 2 is then
/// elected again and replaces `x` on node 3.
#[test]
fn a_leader_does_not_commit_an_earlier_terms_entry_by_counting_replicas() {
    let mut c = Cluster::with_configs(3, |cfg| cfg.max_batch_bytes = 1);
    c.elect(1);
    c.partition(&[1], &[2, 3]);
    c.propose(1, 1, b"x");
    c.deliver_all();
    c.crash(1);
    c.heal();

    // Node 2 leads term 2 (node 3's vote); its term start reaches no one.
    c.campaign(2);
    c.drop_matching(&|m| m.from == 2);
    c.crash(2);

    // Node 1 leads a later term with node 3's vote and copies x to it, one
    // entry per append; its term start is held back.
    c.restart(1);
    c.campaign(1);
    let term = c.node(1).term();
    let of_term = move |m: &Message| match &m.body {
        Body::Append { entries, .. } => entries.iter().any(|e| e.term == term),
        _ => false,
    };
    // Its first probe (its term start, after x) is refused: node 3 lacks
    // x. The leader backs up and sends x alone.
    assert!(c.deliver_one(&|m| m.to == 3 && is_append(m)));
    c.deliver_matching(&|m| !of_term(m));
    assert!(c.holds(3, b"x"), "node 3 took x");
    let x = c.end_of(1, b"x");
    assert!(
        c.node(1).commit_position() < x,
        "the leader of term {term} committed x (term 1) at {x} by counting replicas"
    );
    c.drop_matching(&of_term);
    c.crash(1);

    // Why: node 2, whose last entry is of term 2, is elected by node 3 and
    // overwrites x there.
    c.restart(2);
    c.elect(2);
    assert!(!c.holds(3, b"x"), "x was replaced on node 3");
}

// ----- stale messages ---------------------------------------------------------

/// An append from a leader of an earlier term, arriving late, changes
/// nothing: the follower keeps its log and its leader and tells the sender
/// of the newer term.
#[test]
fn an_append_from_a_deposed_leader_is_refused() {
    let mut c = Cluster::new(3);
    c.elect(1);
    // Node 1's append of z to node 3 is held on a slow link; the others are
    // lost, and node 1 is cut off.
    c.propose(1, 1, b"z");
    let stale = c.take_matching(&|m| m.from == 1 && m.to == 3 && is_append(m));
    assert_eq!(stale.len(), 1);
    c.drop_matching(&|m| m.from == 1);
    c.partition(&[1], &[2, 3]);

    // Node 2 leads term 2 and writes y; node 3 takes and acknowledges its
    // term start and y, but hears only that the term start committed.
    c.campaign(2);
    for data in [None, Some(&b"y"[..])] {
        if let Some(data) = data {
            c.propose(2, 2, data);
        }
        c.deliver_matching(&|m| m.from == 2 && m.to == 3);
        c.deliver_matching(&|m| m.from == 3 && m.to == 2);
        c.drop_matching(&|m| m.from == 2);
    }
    let y = c.end_of(2, b"y");
    assert!(c.node(2).commit_position() >= y);
    assert!(c.node(3).commit_position() < y);

    let before: Vec<Entry> = c.node(3).log().iter().cloned().collect();
    c.heal();
    c.wire.extend(stale);
    c.deliver_matching(&|m| m.from == 1 && m.to == 3);
    let after: Vec<Entry> = c.node(3).log().iter().cloned().collect();
    assert_eq!(
        after, before,
        "a deposed leader's append changed node 3's log"
    );
    assert_eq!(c.node(3).leader(), Some(2));
    assert!(c.holds(3, b"y") && !c.holds(3, b"z"));
    let answer = c
        .wire
        .iter()
        .find(|m| m.from == 3 && m.to == 1)
        .expect("node 3 answers the stale leader");
    assert_eq!(answer.term, c.node(2).term(), "with the newer term");
    assert!(matches!(answer.body, Body::AppendResp { ok: false, .. }));
}

/// A snapshot older than what a follower has committed (a late or repeated
/// message) is not installed: its commit position never moves back.
#[test]
fn a_snapshot_below_the_commit_position_is_not_installed() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.propose(1, 1, b"w1");
    c.deliver_all();
    c.propose(1, 2, b"w2");
    c.deliver_all();
    let (w1, w2) = (c.end_of(1, b"w1"), c.end_of(1, b"w2"));
    assert_eq!(c.node(2).commit_position(), w2);
    let term = c.node(1).term();
    let meta = SnapshotMeta {
        position: w1,
        term,
        timestamp: c.node(1).log().timestamp_at(w1).expect("w1"),
        membership: c.membership.clone(),
    };
    let late = Message {
        cluster_id: CLUSTER,
        from: 1,
        to: 2,
        term,
        body: Body::InstallSnapshot {
            meta,
            offset: 0,
            chunk: Bytes::from_static(b"state at w1"),
            done: true,
            to_voter: true,
        },
    };
    let applied_before = c.applied[&2].len();
    c.step(2, Event::Message(late));
    assert!(
        c.installed.is_empty(),
        "installed a snapshot below its commit"
    );
    assert_eq!(c.node(2).commit_position(), w2, "commit moved back");
    assert!(c.holds(2, b"w2"));
    assert_eq!(c.applied[&2].len(), applied_before, "applied again");
}

// ----- applying -----------------------------------------------------------------

/// Committed entries are handed to the service once each, in order, however
/// late the service reports what it applied (the harness checks every
/// `Apply` starts where the last one ended).
#[test]
fn committed_entries_are_applied_once_however_late_the_service_reports() {
    let mut c = Cluster::new(3);
    c.elect(1);
    c.manual_apply.insert(1);
    c.manual_apply.insert(2);
    for (req, data) in [(1, &b"a"[..]), (2, b"b"), (3, b"c")] {
        c.propose(1, req, data);
        c.deliver_all();
    }
    c.report_applied(1);
    c.report_applied(2);
    c.propose(1, 4, b"d");
    c.deliver_all();
    for id in [1, 2, 3] {
        let commands: Vec<&[u8]> = c.applied[&id]
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Command { .. }))
            .map(|e| &e.data[..])
            .collect();
        assert_eq!(commands, [&b"a"[..], b"b", b"c", b"d"], "node {id}");
    }
    let ends: BTreeSet<Position> = [1, 2, 3].iter().map(|id| c.apply_next[id]).collect();
    assert_eq!(ends.len(), 1, "every node applied to the same end");
}
