//! Scenario tests of the consensus core through its public step interface,
//! with a minimal in-test runtime: instant, reliable messages and disks.

use bytes::Bytes;
use keel_core::*;
use std::collections::{BTreeMap, HashSet, VecDeque};

const MS: Nanos = 1_000_000;

struct Harness {
    nodes: Vec<Node>,
    now: Nanos,
    inbox: VecDeque<Message>,
    applied: Vec<Vec<Entry>>,
    ready_reads: Vec<(NodeId, RequestId, Position)>,
    rejected: Vec<(NodeId, RequestId, RejectReason)>,
    /// Directed links that drop messages.
    cut: HashSet<(NodeId, NodeId)>,
    persisted: Vec<HardState>,
    /// Each node's snapshot files by position (the test's "disk"): a
    /// snapshot's file is its data behind a 4-byte "SNAP" header.
    files: Vec<BTreeMap<Position, Bytes>>,
    /// Each node's captured service states not yet saved (the runtime's
    /// side of `Event::SnapshotTaken`).
    captured: Vec<BTreeMap<Position, Bytes>>,
    /// Snapshots each node installed (the received file bytes).
    installed: Vec<Vec<Bytes>>,
    /// Hold back `SnapshotPublished` (the file is still being written).
    hold_publish: bool,
    /// Flip a byte of the next chunk read from a snapshot file.
    corrupt_next_chunk: bool,
    /// `Action::Removed` as emitted: (node, by, position).
    removed: Vec<(NodeId, NodeId, Position)>,
}

/// The harness's snapshot file format.
fn image_of(data: &[u8]) -> Bytes {
    [&b"SNAP"[..], data].concat().into()
}

/// A `Config::snapshot_check` for `image_of` files.
fn check_image(_: &SnapshotMeta, image: &[u8]) -> bool {
    image.starts_with(b"SNAP")
}

/// A message from node 1, leader in term 1, to node 2 (the single
/// follower driven directly in some tests).
/// The successful append answers in `out`: (position, heartbeat).
fn answers(out: &[Action]) -> Vec<(Position, u64)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send(Message {
                body:
                    Body::AppendResp {
                        ok: true,
                        position,
                        heartbeat,
                        ..
                    },
                ..
            }) => Some((*position, *heartbeat)),
            _ => None,
        })
        .collect()
}

/// An append from leader 1 in term 1 after `prev_pos`, committing nothing.
fn append(prev_pos: Position, heartbeat: u64, entries: Vec<Entry>) -> Event {
    Event::Message(from_leader_1(Body::Append {
        prev_pos,
        prev_term: if prev_pos == 0 { 0 } else { 1 },
        commit: 0,
        heartbeat,
        entries,
        to_voter: true,
    }))
}

fn from_leader_1(body: Body) -> Message {
    Message {
        cluster_id: 7,
        from: 1,
        to: 2,
        term: 1,
        body,
    }
}

impl Harness {
    fn new(n: u64) -> Self {
        let m = Membership::new(1..=n);
        Self::with(
            (1..=n)
                .map(|id| Node::new(Config::new(id, 7), m.clone(), 0))
                .collect(),
        )
    }
    fn with(nodes: Vec<Node>) -> Self {
        let k = nodes.len();
        Harness {
            nodes,
            now: 0,
            inbox: VecDeque::new(),
            applied: vec![Vec::new(); k],
            ready_reads: Vec::new(),
            rejected: Vec::new(),
            cut: HashSet::new(),
            persisted: vec![HardState::default(); k],
            files: vec![BTreeMap::new(); k],
            captured: vec![BTreeMap::new(); k],
            installed: vec![Vec::new(); k],
            hold_publish: false,
            corrupt_next_chunk: false,
            removed: Vec::new(),
        }
    }
    /// Node `id` captured its service state `data` at `position`.
    fn snapshot_taken(&mut self, id: NodeId, position: Position, data: Bytes) {
        self.captured[(id - 1) as usize].insert(position, data);
        self.step(id, Event::SnapshotTaken { position });
    }
    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[(id - 1) as usize]
    }
    fn step(&mut self, id: NodeId, ev: Event) {
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let i = (id - 1) as usize;
            let mut out = Vec::new();
            self.nodes[i].step(self.now, ev, &mut out);
            for a in out {
                match a {
                    Action::Append(es) => {
                        let last = es.last().expect("append of no entries");
                        queue.push_back(Event::Durable {
                            position: last.end(),
                            term: last.term,
                        });
                    }
                    Action::Send(m) => {
                        assert_eq!(m.cluster_id, 7);
                        if !self.cut.contains(&(m.from, m.to)) {
                            self.inbox.push_back(m);
                        }
                    }
                    Action::Apply(es) => {
                        let position = es.last().map_or(0, Entry::end);
                        self.applied[i].extend(es);
                        queue.push_back(Event::Applied {
                            position,
                            timers: vec![],
                        });
                    }
                    Action::ReadReady { id: r, index } => self.ready_reads.push((id, r, index)),
                    Action::Rejected { id: r, reason } => self.rejected.push((id, r, reason)),
                    Action::PersistHardState(hs) => self.persisted[i] = hs,
                    Action::SaveSnapshot(meta) => {
                        let data = self.captured[i]
                            .remove(&meta.position)
                            .expect("the core saves only snapshots it was told were captured");
                        let image = image_of(&data);
                        let size = image.len() as u64;
                        self.files[i].insert(meta.position, image);
                        if !self.hold_publish {
                            queue.push_back(Event::SnapshotPublished {
                                position: meta.position,
                                size,
                            });
                        }
                    }
                    Action::SendSnapshotChunk {
                        mut message,
                        position,
                        offset,
                        len,
                    } => {
                        // The core sends no bytes: read them from the file.
                        let Body::InstallSnapshot { chunk, .. } = &mut message.body else {
                            panic!("a chunk action with a {}", message.body.name());
                        };
                        assert!(chunk.is_empty());
                        let Some(file) = self.files[i].get(&position) else {
                            continue; // gone: send nothing
                        };
                        let (a, b) = (offset as usize, (offset + len) as usize);
                        let mut bytes = file[a..b].to_vec();
                        if std::mem::take(&mut self.corrupt_next_chunk) {
                            bytes[0] ^= 0xff;
                        }
                        *chunk = bytes.into();
                        if !self.cut.contains(&(message.from, message.to)) {
                            self.inbox.push_back(message);
                        }
                    }
                    Action::InstallSnapshot { meta, image } => {
                        self.files[i].insert(meta.position, image.clone());
                        self.installed[i].push(image);
                    }
                    Action::Removed { by, position } => self.removed.push((id, by, position)),
                    _ => {}
                }
            }
        }
    }
    fn deliver(&mut self) {
        let mut budget = 100_000;
        while let Some(m) = self.inbox.pop_front() {
            budget -= 1;
            assert!(budget > 0, "message storm");
            self.step(m.to, Event::Message(m));
        }
    }
    /// Advances time in 10 ms ticks, delivering everything after each.
    fn run_for(&mut self, dt: Nanos) {
        let end = self.now + dt;
        while self.now < end {
            self.now += 10 * MS;
            for id in 1..=self.nodes.len() as u64 {
                self.step(id, Event::Tick);
            }
            self.deliver();
        }
    }
    fn leader(&self) -> Option<NodeId> {
        self.nodes.iter().find(|n| n.is_leader()).map(Node::id)
    }
    /// Cuts leader `leader` off from `others` and asks it for a read every
    /// 5 ms for up to `within` (while it leads). Returns when it last
    /// answered one at once (from its lease), and when one of `others`
    /// first led, both after the cut; and the time of the cut.
    fn lease_reads_after_cut(
        &mut self,
        leader: NodeId,
        others: &[NodeId],
        within: Nanos,
    ) -> (Nanos, Option<Nanos>, Nanos) {
        let cut_at = self.now;
        for &other in others {
            self.cut.insert((leader, other));
            self.cut.insert((other, leader));
        }
        let (mut last_lease_read, mut new_leader_at) = (cut_at, None);
        let mut id = 100;
        while self.now < cut_at + within && self.node(leader).is_leader() {
            self.run_for(5 * MS);
            if new_leader_at.is_none() && others.iter().any(|&n| self.node(n).is_leader()) {
                new_leader_at = Some(self.now);
            }
            id += 1;
            let before = self.ready_reads.len();
            self.step(leader, Event::Read { id });
            if self.ready_reads.len() > before {
                last_lease_read = self.now;
            }
        }
        (last_lease_read, new_leader_at, cut_at)
    }
    fn propose(&mut self, id: NodeId, req: RequestId, seq: u64, data: &'static [u8]) {
        self.step(
            id,
            Event::Propose(vec![Proposal {
                id: req,
                client: 1,
                seq,
                data: Bytes::from_static(data),
            }]),
        );
        self.deliver();
    }
}

#[test]
fn single_node_elects_itself_and_commits_only_once_durable() {
    let mut node = Node::new(Config::new(1, 7), Membership::new([1]), 0);
    let mut out = Vec::new();
    node.step(2_000 * MS, Event::Tick, &mut out);
    assert!(node.is_leader());
    assert_eq!(node.term(), 1);
    // Term and vote (and the node's hold) are persisted before anything
    // else happens.
    assert!(matches!(
        out[1],
        Action::PersistHardState(HardState {
            term: 1,
            voted_for: Some(1),
            hold: 500_000_000,
        })
    ));
    let term_start = out
        .iter()
        .find_map(|a| match a {
            Action::Append(es) => Some(es[0].clone()),
            _ => None,
        })
        .expect("a term-start entry");
    assert_eq!(term_start.kind, EntryKind::TermStart);
    assert_eq!(term_start.position, 0);
    assert_eq!(
        node.commit_position(),
        0,
        "nothing commits before it is durable"
    );
    out.clear();
    node.step(
        2_001 * MS,
        Event::Durable {
            position: term_start.end(),
            term: 1,
        },
        &mut out,
    );
    assert_eq!(node.commit_position(), term_start.end());
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Apply(es) if es[0] == term_start)));
}

/// Timers that a late turn finds due together are logged in the order
/// they came due, not by id: a lease with a larger id that expired first is
/// revoked first, as etcd revokes leases in expiry order.
#[test]
fn timers_due_together_are_logged_in_deadline_order() {
    let mut node = Node::new(Config::new(1, 7), Membership::new([1]), 0);
    let mut out = Vec::new();
    let mut now = 2_000 * MS;
    node.step(now, Event::Tick, &mut out);
    let end = out
        .iter()
        .find_map(|a| match a {
            Action::Append(es) => es.last().map(Entry::end),
            _ => None,
        })
        .expect("a term-start entry");
    node.step(
        now,
        Event::Durable {
            position: end,
            term: 1,
        },
        &mut out,
    );
    node.step(
        now,
        Event::Applied {
            position: end,
            timers: vec![
                TimerUpdate::Set {
                    id: 9,
                    deadline: now + 10 * MS,
                },
                TimerUpdate::Set {
                    id: 3,
                    deadline: now + 14 * MS,
                },
            ],
        },
        &mut out,
    );
    // The next turn comes late: both are due.
    now += 50 * MS;
    out.clear();
    node.step(now, Event::Tick, &mut out);
    let fired: Vec<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::Append(es) => Some(es),
            _ => None,
        })
        .flatten()
        .filter_map(|e| match e.kind {
            EntryKind::Timer { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(fired, vec![9, 3]);
}

#[test]
fn three_nodes_elect_one_leader_and_replicate() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    assert_eq!(h.nodes.iter().filter(|n| n.is_leader()).count(), 1);
    h.propose(leader, 1, 1, b"hello");
    h.run_for(100 * MS);
    for i in 0..3 {
        let cmd: Vec<&Entry> = h.applied[i]
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Command { .. }))
            .collect();
        assert_eq!(cmd.len(), 1, "node {} applied {:?}", i + 1, h.applied[i]);
        assert_eq!(&cmd[0].data[..], b"hello");
    }
    // Positions are byte offsets: each entry starts where the previous ended.
    let log = &h.applied[0];
    for w in log.windows(2) {
        assert_eq!(w[0].end(), w[1].position);
    }
}

#[test]
fn followers_forward_proposals_and_reads_to_the_leader() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
    h.propose(follower, 9, 1, b"via a follower");
    h.run_for(50 * MS);
    assert!(h.rejected.is_empty(), "{:?}", h.rejected);
    for i in 0..3 {
        assert!(h.applied[i]
            .iter()
            .any(|e| &e.data[..] == b"via a follower"));
    }
    let commit = h.node(leader).commit_position();
    h.step(follower, Event::Read { id: 10 });
    h.deliver();
    assert_eq!(h.ready_reads, vec![(follower, 10, commit)]);
    // Without a known leader there is nobody to forward to.
    let mut lonely = Node::new(Config::new(1, 7), Membership::new([1, 2, 3]), 0);
    let mut out = Vec::new();
    lonely.step(0, Event::Read { id: 3 }, &mut out);
    assert!(matches!(
        out.as_slice(),
        [Action::Rejected {
            id: 3,
            reason: RejectReason::NotLeader { leader: None }
        }]
    ));
}

/// A follower's read whose `ReadIndex` (or its answer) is lost while the
/// follower keeps its leader (a peer link that reconnected, a full queue)
/// is refused after two election timeouts instead of waiting forever; the
/// core's next deadline says when, so a runtime that sleeps until it gets
/// there.
#[test]
fn a_forwarded_read_whose_answer_is_lost_is_refused_in_time() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
    h.cut.insert((follower, leader));
    h.step(follower, Event::Read { id: 11 });
    h.deliver();
    h.cut.clear();
    let asked_at = h.now;
    let limit = 2 * h.node(follower).config().election_timeout_max;
    assert!(h.node(follower).next_deadline() <= asked_at + limit);
    // A later read gets through and is answered; the lost one waits.
    h.step(follower, Event::Read { id: 12 });
    h.deliver();
    assert_eq!(
        h.ready_reads.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![12]
    );
    h.run_for(limit - 20 * MS);
    assert!(h.rejected.is_empty(), "refused early: {:?}", h.rejected);
    h.run_for(40 * MS);
    assert_eq!(
        h.node(follower).leader(),
        Some(leader),
        "same leader throughout"
    );
    assert_eq!(
        h.rejected,
        vec![(
            follower,
            11,
            RejectReason::NotLeader {
                leader: Some(leader)
            }
        )]
    );
}

#[test]
fn an_isolated_node_does_not_raise_its_term_and_does_not_disrupt_on_return() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let term = h.node(leader).term();
    let lonely = (1..=3).find(|&n| n != leader).expect("a follower");
    for other in 1..=3 {
        h.cut.insert((lonely, other));
        h.cut.insert((other, lonely));
    }
    h.run_for(5_000 * MS);
    // Pre-vote: its elections never got a majority, so its term stayed.
    assert_eq!(h.node(lonely).term(), term);
    h.cut.clear();
    h.run_for(1_000 * MS);
    assert_eq!(h.leader(), Some(leader));
    assert_eq!(
        h.node(leader).term(),
        term,
        "the returning node disrupted the leader"
    );
}

#[test]
fn a_leader_cut_from_the_majority_steps_down_by_check_quorum() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let old = h.leader().expect("a leader");
    for other in 1..=3 {
        h.cut.insert((old, other));
        h.cut.insert((other, old));
    }
    h.run_for(3_000 * MS);
    assert!(!h.node(old).is_leader(), "isolated leader kept leading");
    let new = h.leader().expect("the majority elected a new leader");
    assert_ne!(new, old);
}

#[test]
fn leadership_transfer_hands_over_to_the_target() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = (1..=3).find(|&n| n != leader).expect("a follower");
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.deliver();
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(target));
}

#[test]
fn read_index_waits_for_the_term_start_and_a_heartbeat_round() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    h.step(leader, Event::Read { id: 5 });
    assert!(
        h.ready_reads.is_empty(),
        "read served before leadership was confirmed"
    );
    h.deliver();
    let commit = h.node(leader).commit_position();
    assert_eq!(h.ready_reads, vec![(leader, 5, commit)]);
}

/// Voters 1 and 2, with a leader, and node 3 added as a learner; the
/// harness and the leader.
fn two_voters_and_learner_3() -> (Harness, NodeId) {
    let m = Membership::new([1, 2]);
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| Node::new(Config::new(id, 7), m.clone(), 0))
        .collect();
    nodes.push(Node::new(Config::new(3, 7), Membership::default(), 0));
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    h.step(
        leader,
        Event::ChangeMembership {
            id: 1,
            change: MembershipChange::AddLearner(3),
        },
    );
    h.run_for(200 * MS);
    assert!(h.node(3).membership().learners.contains(&3));
    (h, leader)
}

/// A learner far behind the leader's log is not promoted (etcd: "can
/// only promote a learner member which is in sync with leader"): as a voter
/// it could neither count towards commits nor vote for anyone up to date
/// until it caught up. Once it has caught up, the promotion goes through.
#[test]
fn a_learner_behind_the_log_is_not_promoted() {
    let (mut h, leader) = two_voters_and_learner_3();
    // The learner is cut off while the log grows.
    h.cut.insert((leader, 3));
    for i in 0..50 {
        h.propose(leader, 10 + i, i + 1, b"while the learner is away");
    }
    h.run_for(100 * MS);
    h.step(
        leader,
        Event::ChangeMembership {
            id: 2,
            change: MembershipChange::PromoteLearner(3),
        },
    );
    let refused = h.rejected.iter().find(|r| r.1 == 2).expect("refused");
    assert!(
        matches!(&refused.2, RejectReason::Invalid(m) if m.starts_with(LEARNER_NOT_READY)),
        "{refused:?}"
    );
    assert!(h.node(leader).membership().learners.contains(&3));
    h.cut.clear();
    h.run_for(500 * MS);
    h.step(
        leader,
        Event::ChangeMembership {
            id: 3,
            change: MembershipChange::PromoteLearner(3),
        },
    );
    h.run_for(100 * MS);
    assert!(h.node(leader).membership().is_voter(3));
}

#[test]
fn learners_replicate_but_never_count() {
    let (mut h, leader) = two_voters_and_learner_3();
    h.propose(leader, 2, 1, b"to-learner");
    h.run_for(200 * MS);
    assert!(h.applied[2].iter().any(|e| &e.data[..] == b"to-learner"));
    // A learner never campaigns, even when the leader goes silent.
    assert!(!h.node(3).is_leader());
    // With the other voter cut off, the learner's ack does not make a quorum.
    let other = if leader == 1 { 2 } else { 1 };
    h.cut.insert((leader, other));
    h.cut.insert((other, leader));
    let before = h.node(leader).commit_position();
    h.propose(leader, 3, 2, b"needs-two-voters");
    h.run_for(50 * MS);
    assert_eq!(h.node(leader).commit_position(), before);
    // Promote-then-remove goes through the log one change at a time.
    h.cut.clear();
    h.run_for(1_000 * MS);
    let leader = h.leader().expect("a leader");
    h.step(
        leader,
        Event::ChangeMembership {
            id: 4,
            change: MembershipChange::PromoteLearner(3),
        },
    );
    h.run_for(100 * MS);
    assert!(h.node(leader).membership().is_voter(3));
}

#[test]
fn removing_the_leader_hands_leadership_to_a_remaining_voter() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    h.step(
        leader,
        Event::ChangeMembership {
            id: 1,
            change: MembershipChange::Remove(leader),
        },
    );
    h.run_for(1_000 * MS);
    let new = h.leader().expect("a new leader");
    assert_ne!(new, leader);
    assert!(!h.node(new).membership().contains(leader));
    h.propose(new, 2, 1, b"after");
    h.run_for(100 * MS);
    assert!(h.applied[(new - 1) as usize]
        .iter()
        .any(|e| &e.data[..] == b"after"));
}

#[test]
fn leader_stamped_time_never_goes_backwards_across_leaders() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    h.propose(leader, 1, 1, b"a");
    h.run_for(50 * MS);
    // The next leader's clock is far behind: its entries are still stamped
    // no earlier than the log's last timestamp.
    let target = (1..=3).find(|&n| n != leader).expect("a follower");
    let last_ts = h.applied[0].last().expect("applied").timestamp;
    h.step(leader, Event::TransferLeadership { id: 2, target });
    h.deliver();
    h.now = 1; // a clock jump backwards
    h.deliver();
    h.propose(target, 3, 2, b"b");
    h.deliver();
    let i = (target - 1) as usize;
    let e = h.applied[i]
        .iter()
        .find(|e| &e.data[..] == b"b")
        .expect("b applied");
    assert!(e.timestamp >= last_ts);
    for w in h.applied[i].windows(2) {
        assert!(w[0].timestamp <= w[1].timestamp);
    }
}

#[test]
fn messages_from_another_cluster_are_ignored() {
    let mut node = Node::new(Config::new(1, 7), Membership::new([1, 2]), 0);
    let mut out = Vec::new();
    let m = Message {
        cluster_id: 8,
        from: 2,
        to: 1,
        term: 50,
        body: Body::Vote {
            last_pos: 1 << 40,
            last_term: 50,
            transfer: false,
        },
    };
    node.step(0, Event::Message(m), &mut out);
    assert!(out.is_empty());
    assert_eq!(node.term(), 0);
}

#[test]
fn compaction_then_install_snapshot_on_a_wiped_follower() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    for seq in 1..=20 {
        h.propose(leader, seq, seq, b"0123456789");
    }
    h.run_for(50 * MS);
    let applied = h.node(leader).applied_position();
    h.snapshot_taken(leader, applied, Bytes::from_static(b"state"));
    assert_eq!(h.node(leader).log().first_pos(), applied);
    // Replace a follower with a wiped one that knows only the membership.
    let victim = (1..=3).find(|&n| n != leader).expect("a follower");
    let i = (victim - 1) as usize;
    h.nodes[i] = Node::new(Config::new(victim, 7), Membership::new(1..=3), h.now);
    h.applied[i].clear();
    h.run_for(1_000 * MS);
    let n = h.node(victim);
    assert_eq!(n.log().first_pos(), applied);
    assert_eq!(n.snapshot_meta().map(|m| m.position), Some(applied));
    assert_eq!(h.installed[i], vec![image_of(b"state")]);
    assert_eq!(n.snapshot_file(), Some((applied, 9)));
    assert!(n.commit_position() >= applied);
}

/// Found by the simulator (seed 111063, chaos): a follower that had
/// uncommitted entries from node 2's term-1 leadership must not treat them
/// as matching when node 2 leads again in a later term.
#[test]
fn matched_position_does_not_survive_a_new_term_of_the_same_leader() {
    let mut f = Node::new(Config::new(3, 7), Membership::new([1, 2, 3]), 0);
    let mut out = Vec::new();
    let e1 = Entry {
        term: 1,
        position: 0,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::new(),
    };
    let e2 = Entry {
        term: 1,
        position: e1.end(),
        timestamp: 1,
        kind: EntryKind::Command { client: 1, seq: 1 },
        data: Bytes::from_static(b"never committed"),
    };
    let end = e2.end();
    let append = |term, entries: Vec<Entry>, commit| Message {
        cluster_id: 7,
        from: 2,
        to: 3,
        term,
        body: Body::Append {
            prev_pos: 0,
            prev_term: 0,
            commit,
            heartbeat: 0,
            entries,
            to_voter: true,
        },
    };
    f.step(10, Event::Message(append(1, vec![e1, e2], 0)), &mut out);
    f.step(
        11,
        Event::Durable {
            position: end,
            term: 1,
        },
        &mut out,
    );
    // Node 2 leads again in term 4 with a different log whose commit
    // position happens to be beyond ours: an empty heartbeat at 0.
    f.step(20, Event::Message(append(4, vec![], end)), &mut out);
    assert_eq!(
        f.commit_position(),
        0,
        "committed entries it never matched in term 4"
    );
}

/// Node 1 (`cfg1`, 1 kB snapshot chunks) leads a 2-node cluster and
/// compacts its log behind a 10 kB snapshot (the snapshot's data is
/// returned) with writes of its own after it, and node 2 is replaced by a
/// wiped node.
fn leader_with_a_10k_snapshot_and_a_wiped_follower(
    mut cfg1: Config,
) -> (Harness, Position, Vec<u8>) {
    let m = Membership::new([1, 2]);
    cfg1.snapshot_chunk_bytes = 1000;
    let nodes = vec![
        Node::new(cfg1, m.clone(), 0),
        Node::new(Config::new(2, 7), m, 0),
    ];
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    node_1_leads(&mut h);
    h.cut.insert((1, 2));
    for seq in 1..=5 {
        h.propose(1, seq, seq, b"only on the leader");
    }
    // The proposals do not commit without node 2; install a snapshot of
    // what is committed and let node 2 fall behind it.
    let applied = h.node(1).applied_position();
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    h.snapshot_taken(1, applied, Bytes::from(big.clone()));
    h.nodes[1] = Node::new(Config::new(2, 7), Membership::new([1, 2]), h.now);
    h.cut.clear();
    (h, applied, big)
}

#[test]
fn a_large_snapshot_is_installed_in_chunks() {
    let (mut h, applied, big) = leader_with_a_10k_snapshot_and_a_wiped_follower(Config::new(1, 7));
    let mut chunks = 0;
    for _ in 0..200 {
        h.now += 10 * MS;
        h.step(1, Event::Tick);
        while let Some(msg) = h.inbox.pop_front() {
            if let Body::InstallSnapshot { chunk, .. } = &msg.body {
                assert!(chunk.len() <= 1000);
                chunks += 1;
            }
            h.step(msg.to, Event::Message(msg));
        }
        if h.node(2).snapshot_meta().is_some() {
            break;
        }
    }
    assert_eq!(chunks, 11, "a 10 kB snapshot's file in 1 kB chunks");
    assert_eq!(h.installed[1], vec![image_of(&big)]);
    h.run_for(200 * MS);
    assert!(
        h.node(2).commit_position() > applied,
        "the log after the snapshot followed"
    );
}

/// A snapshot's chunks go out while less than `max_inflight_bytes` of them
/// is unacknowledged, not one per round trip (a far follower would take a
/// round trip per chunk). A chunk lost on the way (a connection dropped)
/// is sent again, from what the follower acknowledged, once nothing more
/// has been acknowledged for an election timeout.
#[test]
fn snapshot_chunks_are_pipelined_and_a_lost_one_is_sent_again() {
    let mut cfg1 = Config::new(1, 7);
    cfg1.max_inflight_bytes = 4000;
    let retry = cfg1.election_timeout_min;
    let (mut h, applied, big) = leader_with_a_10k_snapshot_and_a_wiped_follower(cfg1);
    let offsets = |h: &Harness| -> Vec<u64> {
        h.inbox
            .iter()
            .filter_map(|m| match &m.body {
                Body::InstallSnapshot { offset, .. } => Some(*offset),
                _ => None,
            })
            .collect()
    };
    // The first step that finds node 2 behind the log sends a window's
    // worth at once.
    let mut sent = Vec::new();
    'found: for _ in 0..100 {
        h.now += 10 * MS;
        h.step(1, Event::Tick);
        loop {
            sent = offsets(&h);
            if !sent.is_empty() {
                break 'found;
            }
            let Some(m) = h.inbox.pop_front() else {
                break;
            };
            h.step(m.to, Event::Message(m));
        }
    }
    assert_eq!(sent, vec![0, 1000, 2000, 3000]);
    // The third chunk is lost: node 2 takes the first two, then ignores
    // what does not follow on (answering with what it holds).
    let lost = h
        .inbox
        .iter()
        .position(|m| matches!(m.body, Body::InstallSnapshot { offset: 2000, .. }))
        .expect("the third chunk");
    h.inbox.remove(lost);
    h.deliver();
    assert!(h.installed[1].is_empty());
    assert!(offsets(&h).is_empty(), "sent again before the timeout");
    // Nothing acknowledged for an election timeout: sent again from 2000.
    h.now += retry;
    h.step(1, Event::Tick);
    assert_eq!(offsets(&h).first(), Some(&2000));
    for _ in 0..100 {
        h.deliver();
        if !h.installed[1].is_empty() {
            break;
        }
        h.now += 10 * MS;
        h.step(1, Event::Tick);
    }
    assert_eq!(h.installed[1], vec![image_of(&big)]);
    h.run_for(200 * MS);
    assert!(h.node(2).commit_position() > applied);
}

/// Chunks of a snapshot that come out of order (the network reordered
/// them) are kept and joined once the ones before them come: the file is
/// installed whole, and each answer says how much of it is held in order.
#[test]
fn snapshot_chunks_out_of_order_are_joined() {
    let mut cfg = Config::new(2, 7);
    cfg.snapshot_check = check_image;
    let mut f = Node::new(cfg, Membership::new([1, 2, 3]), 0);
    let image = image_of(b"0123456789");
    let meta = SnapshotMeta {
        position: 10_000,
        term: 1,
        timestamp: 5,
        membership: Membership::new([1, 2, 3]),
    };
    let chunk = |from: usize, to: usize| {
        Event::Message(from_leader_1(Body::InstallSnapshot {
            meta: meta.clone(),
            offset: from as u64,
            chunk: image.slice(from..to),
            done: to == image.len(),
            to_voter: true,
        }))
    };
    let acked = |out: &[Action]| -> Vec<u64> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(Message {
                    body: Body::SnapshotAck { received, .. },
                    ..
                }) => Some(*received),
                _ => None,
            })
            .collect()
    };
    let installed = |out: &[Action]| {
        out.iter().find_map(|a| match a {
            Action::InstallSnapshot { image, .. } => Some(image.clone()),
            _ => None,
        })
    };
    let mut out = Vec::new();
    f.step(10 * MS, chunk(9, 14), &mut out);
    f.step(11 * MS, chunk(4, 9), &mut out);
    assert_eq!(acked(&out), vec![0, 0]);
    assert_eq!(installed(&out), None);
    out.clear();
    f.step(12 * MS, chunk(0, 4), &mut out);
    assert_eq!(installed(&out), Some(image));
    assert_eq!(f.incoming_snapshot_bytes(), 0);
}

/// A file is known by its snapshot and the term of the leader sending it:
/// another leader's file of the same snapshot (which may differ, and be
/// shorter) is never joined to what was held of the first one's.
#[test]
fn chunks_of_another_leaders_file_are_not_joined() {
    let mut cfg = Config::new(2, 7);
    cfg.snapshot_check = check_image;
    let mut f = Node::new(cfg, Membership::new([1, 2, 3]), 0);
    let (a, b) = (image_of(b"AAAAAAAAAAAA"), image_of(b"BBBBBB"));
    let meta = SnapshotMeta {
        position: 10_000,
        term: 1,
        timestamp: 5,
        membership: Membership::new([1, 2, 3]),
    };
    let chunk = |from: NodeId, term: Term, image: &Bytes, at: usize, to: usize| {
        Event::Message(to_node_2(
            from,
            term,
            Body::InstallSnapshot {
                meta: meta.clone(),
                offset: at as u64,
                chunk: image.slice(at..to),
                done: to == image.len(),
                to_voter: true,
            },
        ))
    };
    let installed = |out: &[Action]| {
        out.iter().find_map(|a| match a {
            Action::InstallSnapshot { image, .. } => Some(image.clone()),
            _ => None,
        })
    };
    let mut out = Vec::new();
    f.step(10 * MS, chunk(1, 1, &a, 0, 8), &mut out);
    assert_eq!(f.incoming_snapshot_bytes(), 8);
    // Leader 3 of term 2: the rest of its file comes before its start.
    f.step(11 * MS, chunk(3, 2, &b, 8, b.len()), &mut out);
    assert_eq!(installed(&out), None, "joined to the other leader's bytes");
    assert_eq!(f.incoming_snapshot_bytes(), 0);
    f.step(12 * MS, chunk(3, 2, &b, 0, 8), &mut out);
    assert_eq!(installed(&out), Some(b));
}

/// Node 1 leads a 2-node cluster; its log is compacted behind a snapshot of
/// `data`, and node 2 is replaced by a wiped node built from `cfg2`.
fn leader_with_snapshot_and_wiped_follower(data: &[u8], cfg2: Config) -> (Harness, Position) {
    let m = Membership::new([1, 2]);
    let mut cfg1 = Config::new(1, 7);
    cfg1.snapshot_chunk_bytes = 1000;
    let nodes = vec![
        Node::new(cfg1, m.clone(), 0),
        Node::new(Config::new(2, 7), m, 0),
    ];
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    node_1_leads(&mut h);
    for seq in 1..=5 {
        h.propose(1, seq, seq, b"committed");
    }
    h.run_for(50 * MS);
    let applied = h.node(1).applied_position();
    h.snapshot_taken(1, applied, Bytes::copy_from_slice(data));
    assert_eq!(h.node(1).log().first_pos(), applied);
    h.nodes[1] = Node::new(cfg2, Membership::new([1, 2]), h.now);
    (h, applied)
}

#[test]
fn the_leader_keeps_only_snapshot_metadata_and_streams_the_published_file() {
    let data: Vec<u8> = (0..2_500u32).map(|i| (i * 7) as u8).collect();
    let mut h = Harness::new(1);
    h.hold_publish = true;
    h.run_for(1_500 * MS);
    assert_eq!(h.leader(), Some(1));
    h.propose(1, 1, 1, b"x");
    let applied = h.node(1).applied_position();
    h.snapshot_taken(1, applied, Bytes::from(data));
    // Only metadata stays in the core; the file is not published yet.
    assert_eq!(h.node(1).snapshot_meta().map(|m| m.position), Some(applied));
    assert_eq!(h.node(1).snapshot_file(), None);
    h.step(
        1,
        Event::SnapshotPublished {
            position: applied,
            size: 2_504,
        },
    );
    assert_eq!(h.node(1).snapshot_file(), Some((applied, 2_504)));
    // An older publication (e.g. reported late) never replaces it.
    h.step(
        1,
        Event::SnapshotPublished {
            position: 1,
            size: 10,
        },
    );
    assert_eq!(h.node(1).snapshot_file(), Some((applied, 2_504)));
}

/// While the newest snapshot's file is still being written, a follower
/// behind the log gets the newest published file (with that file's
/// metadata) and then the log after it: the log is compacted only once a
/// file is published. (The leader used to wait for the newest file, and
/// snapshots taken faster than their files were published kept it waiting
/// for as long as writes went on.)
#[test]
fn a_follower_gets_the_newest_published_file_while_a_newer_one_is_written() {
    let big: Vec<u8> = (0..2_500u32).map(|i| i as u8).collect();
    let mut cfg2 = Config::new(2, 7);
    cfg2.snapshot_check = check_image;
    let (mut h, old) = leader_with_snapshot_and_wiped_follower(b"old", Config::new(2, 7));
    // The next snapshot's file is "being written": not published.
    h.hold_publish = true;
    h.propose(1, 100, 100, b"more");
    h.run_for(50 * MS);
    let newest = h.node(1).applied_position();
    assert!(newest > old);
    h.snapshot_taken(1, newest, Bytes::from(big.clone()));
    assert_eq!(h.node(1).snapshot_meta().map(|m| m.position), Some(newest));
    // Compacted only up to the published file, which stays the one sent.
    assert_eq!(h.node(1).log().first_pos(), old);
    assert_eq!(h.node(1).snapshot_file(), Some((old, 7)));
    assert_eq!(
        h.node(1).published_snapshot_meta().map(|m| m.position),
        Some(old)
    );
    h.nodes[1] = Node::new(cfg2, Membership::new([1, 2]), h.now);
    h.installed[1].clear();
    h.run_for(300 * MS);
    assert_eq!(h.installed[1], vec![image_of(b"old")]);
    assert_eq!(h.node(2).snapshot_file(), Some((old, 7)));
    assert!(
        h.node(2).commit_position() >= newest,
        "the log after the published file followed"
    );
    // Published at last: the log is compacted to it; the follower, already
    // past it, needs no second install.
    let size = h.files[0][&newest].len() as u64;
    h.step(
        1,
        Event::SnapshotPublished {
            position: newest,
            size,
        },
    );
    assert_eq!(h.node(1).log().first_pos(), newest);
    assert_eq!(h.node(1).snapshot_file(), Some((newest, size)));
    h.propose(1, 101, 101, b"after");
    h.run_for(100 * MS);
    assert_eq!(h.installed[1].len(), 1);
    assert_eq!(h.node(2).commit_position(), h.node(1).commit_position());
}

/// Three nodes; a follower goes down and misses appends, the leader's log
/// is compacted past what the follower matched (a snapshot of `data`), and
/// the follower comes back wiped. Nothing new is written afterwards.
/// Returns (harness, leader, victim, snapshot position).
fn wiped_follower_behind_the_compacted_log(
    data: &'static [u8],
) -> (Harness, NodeId, NodeId, Position) {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let victim = (1..=3).find(|&n| n != leader).expect("a follower");
    for seq in 1..=5 {
        h.propose(leader, seq, seq, b"everyone has these");
    }
    h.run_for(50 * MS);
    let matched = h.node(victim).commit_position();
    // The victim is down: appends to it are lost.
    h.cut.insert((leader, victim));
    h.cut.insert((victim, leader));
    for seq in 6..=10 {
        h.propose(leader, seq, seq, b"the victim never got these");
    }
    h.run_for(50 * MS);
    let applied = h.node(leader).applied_position();
    h.snapshot_taken(leader, applied, Bytes::from_static(data));
    assert!(h.node(leader).log().first_pos() > matched);
    let i = (victim - 1) as usize;
    h.nodes[i] = Node::new(Config::new(victim, 7), Membership::new(1..=3), h.now);
    h.applied[i].clear();
    h.cut.clear();
    (h, leader, victim, applied)
}

/// Found by the process test `a_wiped_node_rejoins_through_a_snapshot`: a
/// follower killed, wiped and restarted while the leader's log is compacted
/// past the follower's last matched position, and nothing new is written.
/// The leader used to send it nothing (a heartbeat goes at the matched
/// position, which it no longer holds; all appends were already sent), so
/// the follower kept timing out and was never told about the snapshot.
#[test]
fn a_wiped_follower_behind_the_compacted_log_hears_heartbeats_and_gets_the_snapshot() {
    let (mut h, leader, victim, _) = wiped_follower_behind_the_compacted_log(b"state");
    let term = h.node(leader).term();
    h.run_for(2_000 * MS);
    let n = h.node(victim);
    assert_eq!(n.stats().pre_votes_started, 0, "it never heard the leader");
    assert_eq!((n.term(), n.leader()), (term, Some(leader)));
    assert_eq!(h.installed[(victim - 1) as usize], vec![image_of(b"state")]);
    assert_eq!(n.commit_position(), h.node(leader).commit_position());
}

/// A follower whose snapshot chunks cannot be sent (the file is unreadable
/// for a while) still hears heartbeats: it neither times out nor disturbs
/// the leader, and gets the snapshot once the file is readable again.
#[test]
fn heartbeats_reach_a_follower_while_its_snapshot_cannot_be_sent() {
    let (mut h, leader, victim, applied) = wiped_follower_behind_the_compacted_log(b"first");
    let i = (leader - 1) as usize;
    let file = h.files[i].remove(&applied).expect("the published file");
    let term = h.node(leader).term();
    let mut heartbeats = 0;
    for _ in 0..300 {
        h.now += 10 * MS;
        for id in 1..=3 {
            h.step(id, Event::Tick);
        }
        heartbeats += h
            .inbox
            .iter()
            .filter(|m| m.to == victim && matches!(m.body, Body::Append { .. }))
            .count();
        h.deliver();
    }
    // 3 s with the default 50 ms heartbeat interval.
    assert!(heartbeats >= 50, "{heartbeats} heartbeats in 3 s");
    let v = (victim - 1) as usize;
    assert!(h.installed[v].is_empty());
    let n = h.node(victim);
    assert_eq!(n.stats().pre_votes_started, 0);
    assert_eq!((n.term(), n.leader()), (term, Some(leader)));
    assert!(h.node(leader).is_leader());
    h.files[i].insert(applied, file);
    h.run_for(1_000 * MS);
    assert_eq!(h.installed[v], vec![image_of(b"first")]);
    assert_eq!(
        h.node(victim).commit_position(),
        h.node(leader).commit_position()
    );
}

/// Found by the simulator (wiped-follower-idle over a lossy network, seed
/// 37): the last appends to a follower are lost and nothing more is
/// written. The leader replicates in a pipeline and used to heartbeat at
/// the follower's matched position, which the follower accepts, so it
/// never learned the appends were lost and the follower stayed behind for
/// as long as the cluster was idle.
#[test]
fn a_follower_that_lost_the_last_appends_catches_up_while_idle() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let victim = (1..=3).find(|&n| n != leader).expect("a follower");
    h.propose(leader, 1, 1, b"everyone has this");
    h.run_for(100 * MS);
    assert_eq!(
        h.node(victim).commit_position(),
        h.node(leader).commit_position()
    );
    // The appends of the next write to the victim are lost.
    h.cut.insert((leader, victim));
    h.propose(leader, 2, 2, b"lost on the way to the victim");
    h.cut.clear();
    let commit = h.node(leader).commit_position();
    assert!(h.node(victim).log().last_pos() < commit);
    h.run_for(500 * MS);
    assert_eq!(h.node(victim).log().last_pos(), commit);
    assert_eq!(h.node(victim).commit_position(), commit);
}

/// The core pairs each publication with the metadata of the snapshot it
/// saved: late, unknown or superseded publications never make the file it
/// sends and the metadata it sends with it disagree.
#[test]
fn publications_are_matched_with_their_own_snapshot_metadata() {
    let mut h = Harness::new(1);
    h.hold_publish = true;
    h.run_for(1_500 * MS);
    assert_eq!(h.leader(), Some(1));
    let mut taken = Vec::new();
    for seq in 1..=3 {
        h.propose(1, seq, seq, b"x");
        let position = h.node(1).applied_position();
        h.snapshot_taken(1, position, Bytes::from(vec![seq as u8; 10 * seq as usize]));
        taken.push(position);
    }
    // A stale capture (older than the newest taken) is not saved.
    h.snapshot_taken(1, taken[1], Bytes::from_static(b"stale"));
    assert_eq!(h.node(1).snapshot_file(), None);
    assert_eq!(h.node(1).log().first_pos(), 0, "nothing published yet");
    let size = |h: &Harness, p: Position| h.files[0][&p].len() as u64;
    // A position it never saved: ignored.
    h.step(
        1,
        Event::SnapshotPublished {
            position: taken[0] + 1,
            size: 99,
        },
    );
    assert_eq!(h.node(1).snapshot_file(), None);
    // The first, with its own metadata; the log compacted to it.
    let s0 = size(&h, taken[0]);
    h.step(
        1,
        Event::SnapshotPublished {
            position: taken[0],
            size: s0,
        },
    );
    assert_eq!(h.node(1).snapshot_file(), Some((taken[0], s0)));
    assert_eq!(
        h.node(1).published_snapshot_meta().map(|m| m.position),
        Some(taken[0])
    );
    assert_eq!(h.node(1).log().first_pos(), taken[0]);
    // The third published before the second is reported (storage replaced
    // it): the second's report, late, changes nothing.
    let s2 = size(&h, taken[2]);
    h.step(
        1,
        Event::SnapshotPublished {
            position: taken[2],
            size: s2,
        },
    );
    let s1 = size(&h, taken[1]);
    h.step(
        1,
        Event::SnapshotPublished {
            position: taken[1],
            size: s1,
        },
    );
    assert_eq!(h.node(1).snapshot_file(), Some((taken[2], s2)));
    let meta = h.node(1).published_snapshot_meta().expect("published");
    assert_eq!(meta, h.node(1).snapshot_meta().expect("newest"));
    assert_eq!(h.node(1).log().first_pos(), taken[2]);
}

/// A follower installs a snapshot from its leader while its own, older
/// snapshot is still being written: the installed file is the one it
/// knows; the late report of its own (storage never publishes it over the
/// newer one, but a runtime may report it anyway) changes nothing.
#[test]
fn an_installed_snapshot_supersedes_the_followers_own_unpublished_ones() {
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2]), 0);
    let mut out = Vec::new();
    let e1 = Entry {
        term: 1,
        position: 0,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::new(),
    };
    let end = e1.end();
    f.step(
        10,
        Event::Message(from_leader_1(Body::Append {
            prev_pos: 0,
            prev_term: 0,
            commit: end,
            heartbeat: 0,
            entries: vec![e1],
            to_voter: true,
        })),
        &mut out,
    );
    f.step(
        11,
        Event::Durable {
            position: end,
            term: 1,
        },
        &mut out,
    );
    assert_eq!(f.commit_position(), end);
    f.step(
        12,
        Event::Applied {
            position: end,
            timers: vec![],
        },
        &mut out,
    );
    f.step(13, Event::SnapshotTaken { position: end }, &mut out);
    assert_eq!(f.snapshot_meta().map(|m| m.position), Some(end));
    let meta = SnapshotMeta {
        position: end + 1_000,
        term: 1,
        timestamp: 5,
        membership: Membership::new([1, 2]),
    };
    let image = image_of(b"leader's");
    f.step(
        14,
        Event::Message(from_leader_1(Body::InstallSnapshot {
            meta: meta.clone(),
            offset: 0,
            chunk: image.clone(),
            done: true,
            to_voter: true,
        })),
        &mut out,
    );
    assert_eq!(f.snapshot_file(), Some((meta.position, image.len() as u64)));
    f.step(
        15,
        Event::SnapshotPublished {
            position: end,
            size: 7,
        },
        &mut out,
    );
    assert_eq!(f.snapshot_file(), Some((meta.position, image.len() as u64)));
    assert_eq!(f.published_snapshot_meta(), Some(&meta));
    assert_eq!(f.log().first_pos(), meta.position);
}

/// A follower holds a snapshot's chunks in memory until it is whole. What
/// it holds is dropped once it stands for election in a term of its own
/// (no leader will send the rest; a pre-candidate may hear from its leader
/// again and go on), and once appends commit past the snapshot's position
/// (it would be refused when whole), rather than kept until another
/// snapshot comes.
#[test]
fn a_partly_received_snapshot_is_dropped_once_it_cannot_be_used() {
    let part = image_of(b"the first part");
    let first_chunk = |position| {
        Event::Message(from_leader_1(Body::InstallSnapshot {
            meta: SnapshotMeta {
                position,
                term: 1,
                timestamp: 5,
                membership: Membership::new([1, 2, 3]),
            },
            offset: 0,
            chunk: part.clone(),
            done: false,
            to_voter: true,
        }))
    };
    let mut out = Vec::new();

    // The leader goes silent: the follower asks around, then stands.
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    f.step(10 * MS, first_chunk(10_000), &mut out);
    assert_eq!(f.incoming_snapshot_bytes(), part.len());
    f.step(10_000 * MS, Event::Tick, &mut out);
    assert_eq!(f.role(), Role::PreCandidate);
    assert_eq!(f.incoming_snapshot_bytes(), part.len());
    let grant = Message {
        cluster_id: 7,
        from: 3,
        to: 2,
        term: f.term() + 1,
        body: Body::PreVoteResp {
            granted: true,
            amnesic: false,
            committed: (0, 0),
        },
    };
    f.step(10_001 * MS, Event::Message(grant), &mut out);
    assert_eq!(f.role(), Role::Candidate);
    assert_eq!(f.incoming_snapshot_bytes(), 0);

    // Appends catch it up past the snapshot's position instead.
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    let e = Entry {
        term: 1,
        position: 0,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::from_static(b"a term start with some data in it"),
    };
    let end = e.end();
    f.step(10 * MS, first_chunk(end), &mut out);
    assert_eq!(f.incoming_snapshot_bytes(), part.len());
    f.step(11 * MS, append(0, 0, vec![e]), &mut out);
    f.step(
        12 * MS,
        Event::Durable {
            position: end,
            term: 1,
        },
        &mut out,
    );
    assert_eq!(f.incoming_snapshot_bytes(), part.len(), "not committed yet");
    f.step(
        13 * MS,
        Event::Message(from_leader_1(Body::Append {
            prev_pos: end,
            prev_term: 1,
            commit: end,
            heartbeat: 1,
            entries: vec![],
            to_voter: true,
        })),
        &mut out,
    );
    assert_eq!(f.commit_position(), end);
    assert_eq!(f.incoming_snapshot_bytes(), 0);
}

#[test]
fn a_snapshot_damaged_on_the_way_is_rejected_and_sent_again() {
    let big: Vec<u8> = (0..3_000u32).map(|i| i as u8).collect();
    let mut cfg2 = Config::new(2, 7);
    cfg2.snapshot_check = check_image;
    let (mut h, applied) = leader_with_snapshot_and_wiped_follower(&big, cfg2);
    h.corrupt_next_chunk = true; // breaks the "SNAP" header of the first
    h.run_for(2_000 * MS);
    assert_eq!(h.node(2).stats().snapshots_rejected, 1);
    assert_eq!(h.installed[1], vec![image_of(&big)]);
    assert!(h.node(2).commit_position() >= applied);
}

#[test]
fn a_vanished_snapshot_file_sends_nothing_and_the_retry_timer_resends() {
    let (mut h, applied) = leader_with_snapshot_and_wiped_follower(b"first", Config::new(2, 7));
    // The file cannot be read (replaced, or a read error): nothing is sent.
    let file = h.files[0].remove(&applied).expect("the published file");
    h.run_for(300 * MS);
    assert!(h.installed[1].is_empty(), "nothing to read, nothing sent");
    assert_eq!(h.node(2).commit_position(), 0);
    // Readable again: the leader's retry timeout sends it.
    h.files[0].insert(applied, file);
    h.run_for(1_000 * MS);
    assert_eq!(h.installed[1], vec![image_of(b"first")]);
    assert!(h.node(2).commit_position() >= applied);
}

/// A follower answers an append of new entries once they are durable, not
/// also at once with its old position (that answer only woke the leader);
/// an append that carries a newer heartbeat (a read waits on it) is still
/// answered at once. One with nothing new is answered only if the last
/// answer is half a heartbeat interval old.
#[test]
fn a_follower_acknowledges_new_entries_once_durable() {
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    let entry = |position, data: &'static [u8]| Entry {
        term: 1,
        position,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::from_static(data),
    };
    let e1 = entry(0, b"");
    let end1 = e1.end();
    let mut out = Vec::new();
    f.step(10, append(0, 0, vec![e1.clone()]), &mut out);
    assert!(out.iter().any(|a| matches!(a, Action::Append(_))));
    assert_eq!(answers(&out), vec![], "no answer before the write");
    out.clear();
    f.step(
        11,
        Event::Durable {
            position: end1,
            term: 1,
        },
        &mut out,
    );
    assert_eq!(answers(&out), vec![(end1, 0)]);
    // Nothing new (a resent append, a heartbeat, a commit notification)
    // right after an acknowledgement: not answered, the leader heard from
    // us just now.
    out.clear();
    f.step(12, append(0, 0, vec![e1.clone()]), &mut out);
    assert_eq!(answers(&out), vec![], "answered nothing new at once");
    // Half a heartbeat interval after the last answer: answered (the
    // leader's check-quorum must keep hearing from us).
    let later = 11 + Config::new(2, 7).heartbeat_interval / 2;
    out.clear();
    f.step(later, append(0, 0, vec![e1]), &mut out);
    assert_eq!(answers(&out), vec![(end1, 0)]);
    // New entries with a newer heartbeat: answered at once for the read,
    // and again once durable.
    let e2 = entry(end1, b"x");
    let end2 = e2.end();
    out.clear();
    f.step(later + 1, append(end1, 1, vec![e2]), &mut out);
    assert_eq!(answers(&out), vec![(end1, 1)]);
    out.clear();
    f.step(
        later + 2,
        Event::Durable {
            position: end2,
            term: 1,
        },
        &mut out,
    );
    assert_eq!(answers(&out), vec![(end2, 1)]);
}

/// An append whose entries do not follow each other from `prev_pos` (a
/// gap, an overlap, a first entry elsewhere) or whose positions run past
/// the end of the position space is malformed: no correct leader sends
/// one. The follower drops it whole, without panicking or writing any of
/// it, and still takes the well-formed append after it.
#[test]
fn a_malformed_append_is_dropped_whole() {
    let entry = |position, data: &'static [u8]| Entry {
        term: 1,
        position,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::from_static(data),
    };
    let e1 = entry(0, b"a");
    let end1 = e1.end();
    let malformed = [
        // A gap after the first entry.
        vec![e1.clone(), entry(end1 + 1, b"b")],
        // The second entry overlaps the first.
        vec![e1.clone(), entry(end1 - 1, b"b")],
        // The first entry is not at prev_pos.
        vec![entry(5, b"a")],
        // The second entry ends past u64::MAX.
        vec![e1.clone(), entry(u64::MAX - 3, b"b")],
    ];
    for entries in malformed {
        let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
        let mut out = Vec::new();
        f.step(10, append(0, 0, entries.clone()), &mut out);
        assert!(
            !out.iter().any(|a| matches!(a, Action::Append(_))),
            "wrote part of a malformed append {entries:?}: {out:?}"
        );
        out.clear();
        f.step(11, append(0, 0, vec![e1.clone()]), &mut out);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Append(v) if v == &vec![e1.clone()])),
            "the well-formed append after {entries:?} was not taken: {out:?}"
        );
    }
    // A lone entry at the very end of the position space: dropped, its end
    // never computed (it would overflow).
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    let mut out = Vec::new();
    f.step(
        10,
        append(u64::MAX - 1, 0, vec![entry(u64::MAX - 1, b"b")]),
        &mut out,
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Append(_))),
        "{out:?}"
    );
}

/// A snapshot chunk claiming an offset at the end of the position space
/// (no leader sends one) neither panics nor installs anything.
#[test]
fn a_snapshot_chunk_at_an_impossible_offset_is_ignored() {
    let mut f = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    let meta = SnapshotMeta {
        position: 1000,
        term: 1,
        timestamp: 1,
        membership: Membership::new([1, 2, 3]),
    };
    for offset in [u64::MAX, u64::MAX - 2] {
        let mut out = Vec::new();
        f.step(
            10,
            Event::Message(from_leader_1(Body::InstallSnapshot {
                meta: meta.clone(),
                offset,
                chunk: Bytes::from_static(b"SNAPxx"),
                done: true,
                to_voter: true,
            })),
            &mut out,
        );
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::InstallSnapshot { .. })),
            "{out:?}"
        );
    }
}

/// However slow the heartbeats, a follower with nothing new to say is quiet
/// for less than the leader's check-quorum window (a heartbeat interval
/// plus the quiet time must stay below `election_timeout_min`), and a clock
/// that went backwards does not silence it.
#[test]
fn a_quiet_follower_still_answers_within_the_check_quorum_window() {
    let mut cfg = Config::new(2, 7);
    cfg.heartbeat_interval = 450 * MS;
    cfg.election_timeout_min = 500 * MS;
    let mut f = Node::new(cfg, Membership::new([1, 2, 3]), 0);
    let mut out = Vec::new();
    f.step(1_000 * MS, append(0, 0, Vec::new()), &mut out);
    assert_eq!(answers(&out), vec![(0, 0)], "first contact");
    // 10 ms later: quiet. 30 ms later (beyond the 25 ms this
    // configuration leaves): answered, not half a heartbeat (225 ms) later.
    for (at, expect) in [(1_010, vec![]), (1_040, vec![(0, 0)])] {
        out.clear();
        f.step(at * MS, append(0, 0, Vec::new()), &mut out);
        assert_eq!(answers(&out), expect, "at {at} ms");
    }
    // The clock jumps back before the last answer: answered at once.
    out.clear();
    f.step(600 * MS, append(0, 0, Vec::new()), &mut out);
    assert_eq!(answers(&out), vec![(0, 0)], "after a backward jump");
}

/// With nothing else to send, a leader tells followers that the commit
/// position advanced `commit_notify_delay` later (the next append would
/// carry it sooner); a follower whose own clients' writes were committed
/// (it forwarded them) is told at once.
#[test]
fn commit_notifications_wait_unless_a_follower_waits_on_its_writes() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let delay = Config::new(1, 7).commit_notify_delay;
    assert!(delay >= MS);
    let followers: Vec<NodeId> = (1..=3).filter(|&n| n != leader).collect();
    let commit_of = |h: &Harness, n: NodeId| h.node(n).commit_position();

    h.propose(leader, 1, 1, b"a");
    let committed = commit_of(&h, leader);
    assert!(committed > 0);
    for &f in &followers {
        assert!(commit_of(&h, f) < committed, "node {f} told at once");
    }
    h.now += delay;
    h.step(leader, Event::Tick);
    h.deliver();
    for &f in &followers {
        assert_eq!(commit_of(&h, f), committed, "node {f} after the delay");
    }

    // Proposed at a follower: forwarded, and that follower hears at once.
    let (asker, other) = (followers[0], followers[1]);
    h.propose(asker, 2, 2, b"b");
    let committed = commit_of(&h, leader);
    assert_eq!(commit_of(&h, asker), committed);
    assert!(commit_of(&h, other) < committed);
}

/// A 3-node harness whose nodes all have lease reads on.
fn lease_harness() -> Harness {
    let m = Membership::new(1..=3);
    Harness::with(
        (1..=3)
            .map(|id| {
                let mut cfg = Config::new(id, 7);
                cfg.lease_reads = true;
                Node::new(cfg, m.clone(), 0)
            })
            .collect(),
    )
}

#[test]
fn the_lease_is_the_election_timeout_shortened_by_the_drift_bound_on_both_sides() {
    let mut cfg = Config::new(1, 7);
    cfg.election_timeout_min = 500 * MS;
    cfg.clock_drift_ppm = 10_000;
    // 500 ms * 0.99 / 1.01
    assert_eq!(cfg.lease_duration(), 490_099_009);
    cfg.clock_drift_ppm = 0;
    assert_eq!(cfg.lease_duration(), 500 * MS);
    cfg.clock_drift_ppm = 1_000_000;
    assert_eq!(cfg.lease_duration(), 0);
    cfg.clock_drift_ppm = u64::MAX;
    assert_eq!(cfg.lease_duration(), 0);
}

/// With lease reads a leader answers at once while a quorum echoed a
/// heartbeat it created within the lease; cut off from the followers, it
/// falls back to a heartbeat round (which cannot complete) once the lease
/// has run out, and no other node is elected before that.
#[test]
fn lease_reads_are_answered_at_once_until_the_lease_runs_out() {
    let mut h = lease_harness();
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let commit = h.node(leader).commit_position();
    h.step(leader, Event::Read { id: 5 });
    assert_eq!(
        h.ready_reads,
        vec![(leader, 5, commit)],
        "a read in the lease waits for nothing"
    );

    // The last heartbeat the followers echo is created at `cut_at` at the
    // latest, so the lease ends by `cut_at + lease`.
    let cut_at = h.now;
    for other in (1..=3).filter(|&n| n != leader) {
        h.cut.insert((leader, other));
        h.cut.insert((other, leader));
    }
    let lease = Config::new(1, 7).lease_duration();
    let mut answered_at_once_until = cut_at;
    let mut id = 100;
    while h.now < cut_at + lease + 20 * MS {
        h.run_for(10 * MS);
        if !h.node(leader).is_leader() {
            break;
        }
        id += 1;
        let before = h.ready_reads.len();
        h.step(leader, Event::Read { id });
        if h.ready_reads.len() > before {
            answered_at_once_until = h.now;
        }
        assert!(
            h.leader() == Some(leader),
            "another leader while the old one may serve lease reads"
        );
    }
    assert!(
        answered_at_once_until > cut_at + lease / 2,
        "the lease did not hold: last lease read {} ms after the cut",
        (answered_at_once_until - cut_at) / MS
    );
    assert!(
        answered_at_once_until < cut_at + lease,
        "a lease read {} ms after the cut, past the lease of {} ms",
        (answered_at_once_until - cut_at) / MS,
        lease / MS
    );
    // The reads after the lease wait for a heartbeat round that never
    // completes; the majority elects a new leader later.
    h.run_for(3_000 * MS);
    let new = h.leader().expect("the majority elected a new leader");
    assert_ne!(new, leader);
}

/// Lease-reading nodes of `m` (voters and learners), node n with minimum
/// election timeout `timeout(n)` (max 100 ms more), run until node 1 leads
/// (handed leadership if another node won the first election).
fn node_1_leads_with_timeouts(m: &Membership, timeout: impl Fn(NodeId) -> Nanos) -> Harness {
    let mut h = Harness::with(
        m.voters
            .iter()
            .chain(&m.learners)
            .map(|&id| {
                let mut cfg = Config::new(id, 7);
                cfg.lease_reads = true;
                cfg.election_timeout_min = timeout(id);
                cfg.election_timeout_max = timeout(id) + 100 * MS;
                Node::new(cfg, m.clone(), 0)
            })
            .collect(),
    );
    h.run_for(1_500 * MS);
    let first = h.leader().expect("a leader");
    if first != 1 {
        h.step(first, Event::TransferLeadership { id: 1, target: 1 });
        h.run_for(500 * MS);
    }
    assert_eq!(h.leader(), Some(1), "the transfer to node 1 succeeded");
    h
}

/// Election timeouts may differ between nodes: a leader's lease runs on the
/// stickiness its voters report with their echoes, not on its own election
/// timeout. Here the leader waits 900 ms before it would vote again, its
/// followers 300 ms: cut off, it stops answering reads from its lease
/// within their 300 ms, before they elect a new leader. (A leader that
/// counted on its own timeout would answer for ~880 ms, the followers'
/// new leader from ~300 ms on.)
#[test]
fn the_lease_lasts_as_long_as_the_voters_report_they_hold_their_votes() {
    let m = Membership::new(1..=3);
    let mut h = node_1_leads_with_timeouts(&m, |id| if id == 1 { 900 * MS } else { 300 * MS });
    h.run_for(200 * MS);
    h.step(1, Event::Read { id: 7 });
    assert!(
        h.ready_reads.iter().any(|r| r.0 == 1 && r.1 == 7),
        "node 1 answers a read from its lease"
    );

    let mut follower_cfg = Config::new(2, 7);
    follower_cfg.clock_drift_ppm = h.node(1).config().clock_drift_ppm;
    let lease = follower_cfg.lease_for(300 * MS);
    let (last_lease_read, new_leader_at, cut_at) = h.lease_reads_after_cut(1, &[2, 3], 1_000 * MS);
    let new_leader_at = new_leader_at.expect("nodes 2 and 3 elected a leader");
    assert!(
        last_lease_read > cut_at + lease / 2,
        "the lease did not hold: last lease read {} ms after the cut",
        (last_lease_read - cut_at) / MS
    );
    assert!(
        last_lease_read < cut_at + lease && last_lease_read < new_leader_at,
        "a lease read {} ms after the cut: the followers hold their votes for 300 ms \
         and elected a leader {} ms after it",
        (last_lease_read - cut_at) / MS,
        (new_leader_at - cut_at) / MS
    );
}

/// A lease counted on the voters of the configuration it was taken in:
/// once a long-holding voter is removed and a learner with a short hold
/// promoted, the lease is the new quorum's. Here node 2 holds its vote for
/// 2 s, nodes 3 and 4 for 300 ms: after the changes, leader 1 cut off must
/// stop answering reads from its lease before 3 and 4 elect a leader.
#[test]
fn a_lease_does_not_outlive_the_configuration_it_was_taken_in() {
    let mut m = Membership::new(1..=3);
    m.learners.insert(4);
    let mut h = node_1_leads_with_timeouts(&m, |id| match id {
        1 => 1_000 * MS,
        2 => 2_000 * MS,
        _ => 300 * MS,
    });
    h.propose(1, 2, 1, b"a write after the transfer");
    h.run_for(200 * MS);
    for (id, change) in [
        (3, MembershipChange::Remove(2)),
        (4, MembershipChange::PromoteLearner(4)),
    ] {
        h.step(1, Event::ChangeMembership { id, change });
        h.run_for(200 * MS);
    }
    assert_eq!(
        h.node(1).membership().voters,
        [1, 3, 4].into_iter().collect(),
        "the changes committed"
    );
    h.step(1, Event::Read { id: 5 });
    assert!(
        h.ready_reads.iter().any(|r| r.1 == 5),
        "node 1 answers a read from its lease"
    );
    let (last_lease_read, new_leader_at, cut_at) =
        h.lease_reads_after_cut(1, &[2, 3, 4], 2_500 * MS);
    let new_leader_at = new_leader_at.expect("nodes 3 and 4 elected a leader");
    assert!(
        last_lease_read < new_leader_at,
        "a lease read {} ms after the cut, after nodes 3 and 4 elected a leader ({} ms)",
        (last_lease_read - cut_at) / MS,
        (new_leader_at - cut_at) / MS
    );
}

/// A leader that told a follower to campaign (leadership transfer) trusts
/// no lease while that election may still come: it bypasses the voters'
/// stickiness. After the transfer gives up, reads take a heartbeat round
/// until an entry appended after the last `TimeoutNow` has committed; the
/// target, holding that entry, ignores the message however late it
/// arrives (and could not win an election on it anyway), and the lease is
/// back.
#[test]
fn a_leader_gives_up_its_lease_while_a_timeout_now_may_still_arrive() {
    let run = |stale_timeout_now: bool| {
        let m = Membership::new(1..=3);
        let mut h = Harness::with(
            (1..=3)
                .map(|id| {
                    let mut cfg = Config::new(id, 7);
                    cfg.lease_reads = true;
                    cfg.testing_bugs.stale_timeout_now = stale_timeout_now;
                    Node::new(cfg, m.clone(), 0)
                })
                .collect(),
        );
        h.run_for(1_500 * MS);
        let leader = h.leader().expect("a leader");
        let term = h.node(leader).term();
        let target = (1..=3).find(|&n| n != leader).expect("a follower");
        // Every TimeoutNow is lost (one goes with each answer from the
        // target while the transfer lasts), so the transfer times out and
        // the leader stays.
        let sent_at = h.node(leader).append_position();
        h.cut.insert((leader, target));
        h.step(leader, Event::TransferLeadership { id: 1, target });
        h.deliver();
        h.run_for(Config::new(1, 7).election_timeout_min + 10 * MS);
        h.cut.remove(&(leader, target));
        h.run_for(100 * MS);
        assert_eq!(h.leader(), Some(leader));
        h.step(leader, Event::Read { id: 2 });
        assert!(
            h.ready_reads.iter().all(|r| r.1 != 2),
            "a lease read while the target may still get its TimeoutNow"
        );
        h.deliver();
        let commit = h.node(leader).commit_position();
        assert!(h.ready_reads.contains(&(leader, 2, commit)));

        // A write: once it commits, the lease is back.
        h.propose(leader, 3, 1, b"after the transfer");
        h.run_for(100 * MS);
        h.step(leader, Event::Read { id: 4 });
        assert!(
            h.ready_reads.iter().any(|r| r.1 == 4),
            "no lease read after a later entry committed"
        );
        // The lost TimeoutNow arrives now: the target must not campaign
        // (an election that bypasses stickiness, under a lease).
        h.step(
            target,
            Event::Message(Message {
                cluster_id: 7,
                from: leader,
                to: target,
                term,
                body: Body::TimeoutNow { last_pos: sent_at },
            }),
        );
        h.node(target).term() == term
    };
    assert!(run(false), "the target campaigned on a stale TimeoutNow");
    assert!(
        !run(true),
        "the test did not deliver the TimeoutNow it means to (the bug went unseen)"
    );
}

/// The lease also comes back after a transfer to a node that is gone for
/// good (stopped, or removed next): what counts is that an entry appended
/// after the last `TimeoutNow` has committed, not that the target heard of
/// it. Any election the target starts on that message lacks the entry and
/// cannot win.
#[test]
fn the_lease_comes_back_after_a_transfer_to_a_node_that_is_gone() {
    let mut h = lease_harness();
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = (1..=3).find(|&n| n != leader).expect("a follower");
    for other in [
        leader,
        (1..=3)
            .find(|&n| n != leader && n != target)
            .expect("a third"),
    ] {
        h.cut.insert((other, target));
        h.cut.insert((target, other));
    }
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.run_for(Config::new(1, 7).election_timeout_min + 10 * MS);
    assert_eq!(h.leader(), Some(leader));
    h.step(leader, Event::Read { id: 2 });
    assert!(
        h.ready_reads.iter().all(|r| r.1 != 2),
        "a lease read before anything past the TimeoutNow committed"
    );
    h.propose(leader, 3, 1, b"after the transfer");
    h.run_for(100 * MS);
    h.step(leader, Event::Read { id: 4 });
    assert!(
        h.ready_reads.iter().any(|r| r.1 == 4),
        "no lease read after an entry past the TimeoutNow committed"
    );
}

/// A (re)started voter grants no pre-vote for an election timeout: it may
/// have echoed a leader's heartbeat just before it went down, and that
/// leader's lease counts on its stickiness.
#[test]
fn a_restarted_voter_holds_its_vote_for_an_election_timeout() {
    let pre_vote_granted = |at: Nanos| {
        let start = 10_000 * MS;
        let mut node = Node::new(Config::new(2, 7), Membership::new(1..=3), start);
        let mut out = Vec::new();
        node.step(
            start + at,
            Event::Message(to_node_2(
                3,
                1,
                Body::PreVote {
                    last_pos: 0,
                    last_term: 0,
                },
            )),
            &mut out,
        );
        granted(&out)
    };
    let timeout = Config::new(2, 7).election_timeout_min;
    assert!(!pre_vote_granted(MS));
    assert!(!pre_vote_granted(timeout - MS));
    assert!(pre_vote_granted(timeout));
}

/// A voter restarted with a lower `election_timeout_min` than it ran with
/// holds its vote for the old one (it may have reported that hold with its
/// last acknowledgement, and a leader's lease counts on it), and its hard
/// state keeps the old hold until that has run, so a second restart in
/// between holds for it too. A raised one is on disk before the node
/// reports it.
#[test]
fn a_restart_with_a_lower_election_timeout_holds_for_the_old_one() {
    let start = 10_000 * MS;
    let (old, new) = (800 * MS, 300 * MS);
    let cfg = |min: Nanos| {
        let mut c = Config::new(2, 7);
        (c.election_timeout_min, c.election_timeout_max) = (min, 2 * min);
        c
    };
    let recovered = |hold: Nanos| Recovered {
        hard_state: HardState {
            term: 3,
            voted_for: None,
            hold,
        },
        snapshot: Some(Snapshot {
            meta: SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership: Membership::new(1..=3),
            },
            data: bytes::Bytes::new(),
        }),
        snapshot_file_size: 0,
        entries: Vec::new(),
    };
    let pre_vote = to_node_2(
        3,
        3,
        Body::PreVote {
            last_pos: 0,
            last_term: 0,
        },
    );
    let persisted = |out: &[Action]| -> Vec<Nanos> {
        out.iter()
            .filter_map(|a| match a {
                Action::PersistHardState(hs) => Some(hs.hold),
                _ => None,
            })
            .collect()
    };
    let granted_at = |c: Config, hold: Nanos, at: Nanos| {
        let mut node = Node::restart(c, recovered(hold), start);
        let mut out = Vec::new();
        node.step(start + at, Event::Message(pre_vote.clone()), &mut out);
        granted(&out)
    };
    // Lowered: holds for the old timeout, not the new one.
    assert!(!granted_at(cfg(new), old, new + MS));
    assert!(!granted_at(cfg(new), old, old - MS));
    assert!(granted_at(cfg(new), old, old));
    // Nor does it stand for election itself before the old hold has run:
    // its own vote would count towards a quorum inside that promise.
    let pre_votes = |out: &[Action]| {
        out.iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send(Message {
                        body: Body::PreVote { .. },
                        ..
                    })
                )
            })
            .count()
    };
    let mut node = Node::restart(cfg(new), recovered(old), start);
    let mut out = Vec::new();
    let mut t = start;
    while t < start + old {
        node.step(t, Event::Tick, &mut out);
        t += 5 * MS;
    }
    assert_eq!(pre_votes(&out), 0, "stood for election inside its old hold");
    while t < start + old + 2 * new + 10 * MS {
        node.step(t, Event::Tick, &mut out);
        t += 5 * MS;
    }
    assert!(
        pre_votes(&out) > 0,
        "never stood for election after its old hold"
    );
    // The bug flag shows what this protects against.
    let mut buggy = cfg(new);
    buggy.testing_bugs.restart_hold_ignores_old_timeout = true;
    assert!(granted_at(buggy, old, new + MS));

    // The hard state keeps the old hold until it has run since the start.
    let mut node = Node::restart(cfg(new), recovered(old), start);
    let mut out = Vec::new();
    let vote_for_3 = to_node_2(
        3,
        4,
        Body::Vote {
            last_pos: 0,
            last_term: 0,
            transfer: true,
        },
    );
    node.step(start + MS, Event::Message(vote_for_3), &mut out);
    assert!(granted(&out), "a transfer's vote is exempt from stickiness");
    let holds = persisted(&out);
    assert!(
        !holds.is_empty() && holds.iter().all(|&h| h == old),
        "term and vote written before the old hold ran: {holds:?}"
    );
    out.clear();
    node.step(start + old - MS, Event::Tick, &mut out);
    assert_eq!(persisted(&out), Vec::<Nanos>::new());
    node.step(start + old, Event::Tick, &mut out);
    assert_eq!(persisted(&out), [new], "once the old hold has run");

    // Raised: the new hold is recorded first, before anything is sent.
    let mut node = Node::restart(cfg(old), recovered(new), start);
    let mut out = Vec::new();
    let heartbeat = to_node_2(
        1,
        3,
        Body::Append {
            prev_pos: 0,
            prev_term: 0,
            commit: 0,
            heartbeat: 1,
            entries: Vec::new(),
            to_voter: true,
        },
    );
    node.step(start + MS, Event::Message(heartbeat), &mut out);
    assert!(
        matches!(out.first(), Some(Action::PersistHardState(hs)) if hs.hold == old),
        "{out:?}"
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send(Message { body: Body::AppendResp { hold, .. }, .. }) if *hold == old
    )));
    // Equal: nothing to record.
    let mut node = Node::restart(cfg(new), recovered(new), start);
    let mut out = Vec::new();
    node.step(start + old, Event::Tick, &mut out);
    assert_eq!(persisted(&out), Vec::<Nanos>::new());
}

/// A message to node 2 from `from` at `term`.
fn to_node_2(from: NodeId, term: Term, body: Body) -> Message {
    Message {
        cluster_id: 7,
        from,
        to: 2,
        term,
        body,
    }
}

/// Whether `out` grants a vote or a pre-vote.
fn granted(out: &[Action]) -> bool {
    out.iter().any(|a| {
        matches!(
            a,
            Action::Send(Message {
                body: Body::PreVoteResp { granted: true, .. }
                    | Body::VoteResp { granted: true, .. },
                ..
            })
        )
    })
}

/// A voter that heard from the leader stays sticky for an election timeout
/// even when a higher-term message (here a late refusal of a pre-vote it
/// sent) moves it to a new term with no leader: a vote of that term from
/// another candidate is refused until then, unless it is a leadership
/// transfer's. Otherwise that candidate could be elected inside the old
/// leader's lease (found by review: a stale lease read).
#[test]
fn stickiness_survives_a_higher_term_message() {
    let timeout = Config::new(2, 7).election_timeout_min;
    let t = 5_000 * MS;
    // Node 2 hears leader 1 at `t`, then a refusal at term 2 from node 3.
    let moved_on = || {
        let mut b = Node::new(Config::new(2, 7), Membership::new(1..=3), 0);
        let mut out = Vec::new();
        b.step(t, append(0, 1, Vec::new()), &mut out);
        assert_eq!(b.leader(), Some(1));
        let refusal = to_node_2(
            3,
            2,
            Body::PreVoteResp {
                granted: false,
                amnesic: false,
                committed: (0, 0),
            },
        );
        b.step(t + MS, Event::Message(refusal), &mut out);
        assert_eq!((b.term(), b.leader()), (2, None));
        b
    };
    let answer = |b: &mut Node, at: Nanos, term: Term, body: Body| {
        let mut out = Vec::new();
        b.step(at, Event::Message(to_node_2(3, term, body)), &mut out);
        granted(&out)
    };
    let vote = |transfer| Body::Vote {
        last_pos: 0,
        last_term: 0,
        transfer,
    };
    for (at, body, want) in [
        (t + 2 * MS, vote(false), false),
        (t + timeout - MS, vote(false), false),
        (t + 2 * MS, vote(true), true),
    ] {
        let got = answer(&mut moved_on(), at, 2, body.clone());
        assert_eq!(got, want, "{body:?} at {} ms", (at - t) / MS);
    }
    // A pre-vote for a later term is refused too, until the timeout.
    let mut b = moved_on();
    let pre_vote = Body::PreVote {
        last_pos: 0,
        last_term: 0,
    };
    assert!(!answer(&mut b, t + 2 * MS, 3, pre_vote.clone()));
    assert!(
        answer(&mut b, t + timeout, 3, pre_vote),
        "not granted once the timeout passed"
    );
    assert!(
        answer(&mut b, t + timeout, 2, vote(false)),
        "vote not granted once the timeout passed"
    );
}

/// A follower that refuses a higher-term vote (the candidate's log is
/// behind its own) moves to that term but keeps its election timer, so
/// candidates that cannot win do not keep the one that could from
/// standing; a vote it grants resets the timer, as in Raft.
#[test]
fn a_refused_vote_does_not_reset_the_election_timer() {
    let timeout = Config::new(2, 7).election_timeout_min;
    let t = 5_000 * MS;
    // Node 2 holds an entry of term 1 from leader 1, heard at `t`.
    let e = Entry {
        term: 1,
        position: 0,
        timestamp: 1,
        kind: EntryKind::TermStart,
        data: Bytes::new(),
    };
    let end = e.end();
    let follower = || {
        let mut b = Node::new(Config::new(2, 7), Membership::new(1..=3), 0);
        let mut out = Vec::new();
        b.step(t, append(0, 1, vec![e.clone()]), &mut out);
        assert_eq!((b.leader(), b.append_position()), (Some(1), end));
        b
    };
    let vote = |b: &mut Node, at: Nanos, last_term: Term, last_pos: Position| {
        let mut out = Vec::new();
        let body = Body::Vote {
            last_pos,
            last_term,
            transfer: false,
        };
        b.step(at, Event::Message(to_node_2(3, 2, body)), &mut out);
        granted(&out)
    };
    // After stickiness, node 3 asks with an empty log: refused, timer kept.
    let mut b = follower();
    let deadline = b.next_deadline();
    assert!(deadline > t + timeout, "the timer runs past stickiness");
    assert!(!vote(&mut b, t + timeout, 0, 0));
    assert_eq!((b.term(), b.leader()), (2, None));
    assert_eq!(
        b.next_deadline(),
        deadline,
        "a refused vote reset the timer"
    );
    // At that deadline it stands (a pre-vote for term 3).
    let mut out = Vec::new();
    b.step(deadline, Event::Tick, &mut out);
    assert_eq!(b.role(), Role::PreCandidate);
    // Asking around, it refuses node 3's vote for term 3 and keeps its
    // new timer too.
    let asking = b.next_deadline();
    let mut out = Vec::new();
    let body = Body::Vote {
        last_pos: 0,
        last_term: 0,
        transfer: false,
    };
    b.step(
        deadline + MS,
        Event::Message(to_node_2(3, 3, body)),
        &mut out,
    );
    assert!(!granted(&out));
    assert_eq!((b.term(), b.role()), (3, Role::Follower));
    assert_eq!(b.next_deadline(), asking, "a refused vote reset the timer");
    // A vote it grants (node 3's log as long) resets the timer.
    let mut b = follower();
    assert!(vote(&mut b, t + timeout, 1, end));
    assert!(
        b.next_deadline() >= t + 2 * timeout,
        "a granted vote resets"
    );
}

// ----- removed members ------------------------------------------------------

/// Node `leader` of a three-node harness removes `target`; returns the
/// position from which the configuration without it is in force (the end
/// of its membership entry).
/// Of voters {1, 2} with a leader elected, node 1 leads (node 2 hands
/// leadership over if it has it).
fn node_1_leads(h: &mut Harness) {
    if h.leader() != Some(1) {
        h.step(2, Event::TransferLeadership { id: 1, target: 1 });
        h.run_for(500 * MS);
    }
    assert_eq!(h.leader(), Some(1));
}

fn remove(h: &mut Harness, leader: NodeId, target: NodeId, req: RequestId) -> Position {
    h.step(
        leader,
        Event::ChangeMembership {
            id: req,
            change: MembershipChange::Remove(target),
        },
    );
    let end = h.node(leader).append_position();
    assert!(!h.node(leader).membership().contains(target));
    end
}

fn messages_sent_on_tick(h: &mut Harness, id: NodeId) -> usize {
    let before = h.inbox.len();
    h.step(id, Event::Tick);
    h.inbox.len() - before
}

#[test]
fn a_removed_follower_is_told_by_the_leader_and_stops_for_good() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = if leader == 3 { 2 } else { 3 };
    let position = remove(&mut h, leader, target, 1);
    h.run_for(200 * MS);
    // Told with the heartbeats once the removal committed.
    assert_eq!(h.removed, vec![(target, leader, position)]);
    assert_eq!(h.node(target).removed(), Some((leader, position)));
    assert!(h.node(leader).stats().removed_sent > 0);
    // It does nothing any more: no campaign however long, requests refused.
    h.cut.insert((leader, target));
    h.run_for(3_000 * MS);
    assert_eq!(messages_sent_on_tick(&mut h, target), 0);
    assert!(!h.node(target).is_leader());
    h.step(target, Event::Read { id: 50 });
    h.propose(target, 51, 1, b"x");
    let refused: Vec<_> = h.rejected.iter().filter(|r| r.0 == target).collect();
    assert_eq!(
        refused,
        vec![
            &(target, 50, RejectReason::Removed),
            &(target, 51, RejectReason::Removed)
        ]
    );
    assert_eq!(h.node(target).next_deadline(), Nanos::MAX);
    // The remaining two still commit.
    h.propose(leader, 2, 1, b"after");
    h.run_for(100 * MS);
    let other = (1..=3).find(|&n| n != leader && n != target).unwrap();
    assert!(h.applied[(other - 1) as usize]
        .iter()
        .any(|e| &e.data[..] == b"after"));
}

#[test]
fn a_leader_that_commits_its_own_removal_hands_over_and_stops() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let position = remove(&mut h, leader, leader, 1);
    h.run_for(1_000 * MS);
    assert_eq!(h.removed, vec![(leader, leader, position)]);
    let new = h.leader().expect("a new leader");
    assert_ne!(new, leader);
    assert_eq!(messages_sent_on_tick(&mut h, leader), 0);
}

/// A node cut off while it is removed, until well after the leader stopped
/// telling it, learns it from the answers to its pre-votes.
#[test]
fn a_node_removed_while_away_learns_it_from_the_answers_to_its_pre_votes() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = if leader == 3 { 2 } else { 3 };
    let other = (1..=3).find(|&n| n != leader && n != target).unwrap();
    for n in [leader, other] {
        h.cut.insert((n, target));
        h.cut.insert((target, n));
    }
    let position = remove(&mut h, leader, target, 1);
    // Past the leader's notices: 10 maximum election timeouts.
    h.run_for(12_000 * MS);
    assert!(h.removed.is_empty());
    assert!(h.node(target).removed().is_none());
    // It never got the entry that removed it: it still sees itself as a
    // voter, and pre-votes.
    assert!(h.node(target).membership().is_voter(target));
    let term_before = h.node(leader).term();
    h.cut.clear();
    h.run_for(2_000 * MS);
    assert_eq!(h.removed.len(), 1, "{:?}", h.removed);
    let (who, by, at) = h.removed[0];
    assert_eq!((who, at), (target, position));
    assert!(by == leader || by == other);
    // Its (pre-)votes disturbed no one.
    assert_eq!(h.leader(), Some(leader));
    assert_eq!(h.node(leader).term(), term_before);
}

/// A removed learner that did not hear of its removal while it was told
/// (cut off), and stays silent as learners do, asks the voters after an
/// election timeout and learns it.
#[test]
fn a_removed_learner_away_during_the_notices_learns_it_too() {
    let (mut h, leader) = two_voters_and_learner_3();
    let other = if leader == 1 { 2 } else { 1 };
    for n in [leader, other] {
        h.cut.insert((n, 3));
        h.cut.insert((3, n));
    }
    let position = remove(&mut h, leader, 3, 2);
    h.run_for(12_000 * MS);
    assert!(h.removed.is_empty());
    h.cut.clear();
    h.run_for(2_000 * MS);
    assert_eq!(h.removed.len(), 1, "{:?}", h.removed);
    assert_eq!((h.removed[0].0, h.removed[0].2), (3, position));
}

/// The notice is ignored by a node that knows a later configuration
/// including it (it was added again), and by a node waiting to be added.
#[test]
fn removal_notices_are_ignored_by_joining_and_re_added_nodes() {
    let notice = |position| {
        Event::Message(Message {
            cluster_id: 7,
            from: 1,
            to: 2,
            term: 1,
            body: Body::Removed { position },
        })
    };
    // Waiting to be added: no membership.
    let mut joining = Node::new(Config::new(2, 7), Membership::default(), 0);
    let mut out = Vec::new();
    joining.step(0, notice(100), &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert!(joining.removed().is_none());
    assert_eq!(joining.stats().removed_ignored, 1);

    // Node 2's log: removed at 0..e1, added again at e1..e2.
    let entry = |position, m: Membership| Entry {
        term: 1,
        position,
        timestamp: 0,
        kind: EntryKind::Membership(std::sync::Arc::new(m)),
        data: Bytes::new(),
    };
    let e1 = entry(0, Membership::new([1, 3]));
    let mut m = Membership::new([1, 3]);
    m.learners.insert(2);
    let e2 = entry(e1.end(), m);
    let mut node = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    node.step(0, append(0, 1, vec![e1.clone(), e2.clone()]), &mut out);
    out.clear();
    // A stale notice of the removal: a later configuration includes it.
    node.step(0, notice(e1.end()), &mut out);
    assert!(out.iter().all(|a| !matches!(a, Action::Removed { .. })));
    assert!(node.removed().is_none());
    // A notice of a configuration after the one that added it is taken.
    node.step(0, notice(e2.end() + 64), &mut out);
    assert!(matches!(
        out.last(),
        Some(Action::Removed { by: 1, position }) if *position == e2.end() + 64
    ));
}

/// A node never sends `Removed` to a node its latest configuration
/// includes, nor before the configuration excluding it has committed.
#[test]
fn no_removal_notice_before_the_removal_commits() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = if leader == 3 { 2 } else { 3 };
    let other = (1..=3).find(|&n| n != leader && n != target).unwrap();
    // The other voter does not answer: the removal cannot commit.
    h.cut.insert((other, leader));
    remove(&mut h, leader, target, 1);
    h.run_for(300 * MS);
    assert!(h.removed.is_empty());
    assert_eq!(h.node(leader).stats().removed_sent, 0);
    h.cut.clear();
    h.run_for(300 * MS);
    assert_eq!(h.removed.len(), 1);
}

/// Voters {1, 2, 3} and node 4 created to join, after a leader was
/// elected: (harness, leader).
fn three_and_joining_4() -> (Harness, NodeId) {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::new(Config::new(id, 7), Membership::new([1, 2, 3]), 0))
        .collect();
    nodes.push(Node::new(Config::new(4, 7), Membership::default(), 0));
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    (h, leader)
}

/// Voters {1, 2, 3} and node 4 created to join; once a leader is elected
/// it removes a follower (`target`) and the removal commits. Returns
/// (harness, leader, target).
fn a_follower_removed() -> (Harness, NodeId, NodeId) {
    let (mut h, leader) = three_and_joining_4();
    let target = if leader == 3 { 2 } else { 3 };
    remove(&mut h, leader, target, 1);
    h.run_for(300 * MS);
    (h, leader, target)
}

/// A removed id is never added again, by the leader that removed it or a
/// later one: a member that missed the removal may still count the id as
/// a voter of its old configuration, and a new node under it (empty
/// disk, term 0) would answer a stale leader as that voter. The refusal
/// says why; every later configuration keeps the record, and a new node
/// under a new id is added.
#[test]
fn a_removed_id_is_never_added_again() {
    let (mut h, leader, target) = a_follower_removed();
    assert_eq!(h.node(leader).membership().removed, [target].into());
    let refused = |h: &mut Harness, at: NodeId, req: RequestId| {
        let before = h.node(at).membership().clone();
        h.step(
            at,
            Event::ChangeMembership {
                id: req,
                change: MembershipChange::AddLearner(target),
            },
        );
        let reason = h
            .rejected
            .iter()
            .find(|(node, id, _)| *node == at && *id == req)
            .map(|(_, _, r)| format!("{r:?}"));
        let reason = reason.expect("the addition is refused");
        assert!(
            reason.contains(&format!("node {target} was removed")) && reason.contains("new id"),
            "{reason}"
        );
        assert_eq!(h.node(at).membership(), &before);
    };
    refused(&mut h, leader, 2);
    // A later configuration (node 4 added) and a later leader keep it.
    for (req, change) in [
        (3, MembershipChange::AddLearner(4)),
        (4, MembershipChange::PromoteLearner(4)),
    ] {
        h.step(leader, Event::ChangeMembership { id: req, change });
        h.run_for(1_000 * MS);
    }
    let mut want = Membership::new([1, 2, 3, 4]);
    want.voters.remove(&target);
    want.removed.insert(target);
    for n in (1..=4).filter(|&n| n != target) {
        assert_eq!(h.node(n).membership(), &want, "node {n}");
    }
    h.step(leader, Event::TransferLeadership { id: 5, target: 4 });
    h.run_for(1_000 * MS);
    assert_eq!(h.leader(), Some(4));
    refused(&mut h, 4, 6);
}

/// Data written before removed ids were recorded: a configuration that
/// removed node 3 records nothing, so the leader adds a new node 3 (empty
/// data directory, joining). It replays the log, whose configurations
/// once removed it, and stale notices of that removal reaching it
/// meanwhile are ignored.
#[test]
fn an_id_removed_under_an_earlier_version_joins_again_and_ignores_stale_notices() {
    // One entry per append: the new node holds the log up to its old
    // removal before it holds the configuration that adds it again.
    let config = |id| Config {
        max_batch_bytes: 1,
        ..Config::new(id, 7)
    };
    let first = membership_entry(0, Membership::new([1, 2, 3]));
    // Removed by an earlier version: no record of the removed id.
    let removal = membership_entry(first.end(), Membership::new([1, 2]));
    let position = removal.end();
    let recovered = || Recovered {
        hard_state: HardState {
            term: 1,
            ..HardState::default()
        },
        entries: vec![first.clone(), removal.clone()],
        ..Recovered::default()
    };
    let target = 3;
    let mut h = Harness::with(vec![
        Node::restart(config(1), recovered(), 0),
        Node::restart(config(2), recovered(), 0),
        Node::new(config(target), Membership::default(), 0),
    ]);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    for i in 0..20 {
        h.propose(leader, 10 + i, i + 1, b"while it is gone");
    }
    h.run_for(200 * MS);
    assert!(h.node(leader).commit_position() > position);
    h.step(
        leader,
        Event::ChangeMembership {
            id: 2,
            change: MembershipChange::AddLearner(target),
        },
    );
    assert!(h.rejected.is_empty(), "{:?}", h.rejected);
    // Every message to it is followed by a stale notice of the removal.
    let mut budget = 100_000;
    for _ in 0..100 {
        h.now += 10 * MS;
        for id in 1..=3 {
            h.step(id, Event::Tick);
        }
        while let Some(m) = h.inbox.pop_front() {
            budget -= 1;
            assert!(budget > 0);
            let to = m.to;
            h.step(to, Event::Message(m));
            if to == target {
                h.step(
                    target,
                    Event::Message(Message {
                        cluster_id: 7,
                        from: leader,
                        to: target,
                        term: 1,
                        body: Body::Removed { position },
                    }),
                );
            }
        }
    }
    assert!(h.removed.is_empty(), "{:?}", h.removed);
    assert!(h.node(target).removed().is_none());
    assert!(h.node(target).stats().removed_ignored > 0);
    assert!(h.node(target).membership().learners.contains(&target));
    assert_eq!(
        h.node(target).commit_position(),
        h.node(leader).commit_position()
    );
}

/// A PreVote from node 4 to node 2, whose log holds `entries` and which
/// restarted (its commit position back at 0); what node 2 answers.
fn answer_to_pre_vote_after_restart(entries: Vec<Entry>) -> Vec<Action> {
    let recovered = Recovered {
        hard_state: HardState::default(),
        snapshot: Some(Snapshot {
            meta: SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership: Membership::new([1, 2, 3]),
            },
            data: Bytes::new(),
        }),
        snapshot_file_size: 0,
        entries,
    };
    let mut node = Node::restart(Config::new(2, 7), recovered, 0);
    let mut out = Vec::new();
    node.step(
        0,
        Event::Message(Message {
            cluster_id: 7,
            from: 4,
            to: 2,
            term: 1,
            body: Body::PreVote {
                last_pos: 0,
                last_term: 0,
            },
        }),
        &mut out,
    );
    out
}

fn membership_entry(position: Position, m: Membership) -> Entry {
    Entry {
        term: 1,
        position,
        timestamp: 0,
        kind: EntryKind::Membership(std::sync::Arc::new(m)),
        data: Bytes::new(),
    }
}

/// A node whose latest configuration it does not know to be committed
/// (restarted: its commit position is back at its snapshot's) tells no one
/// they were removed: node 4 may have been added after that configuration
/// (simulator seed 10404 of mix membership). Once it knows the
/// configuration committed, it does.
#[test]
fn a_node_that_does_not_know_its_configuration_committed_tells_no_one_they_were_removed() {
    let mut m = Membership::new([1, 2, 3]);
    m.learners.insert(5);
    let e = membership_entry(0, m);
    let removed = |out: &[Action]| {
        out.iter().any(|a| {
            matches!(
                a,
                Action::Send(Message {
                    body: Body::Removed { .. },
                    ..
                })
            )
        })
    };
    let out = answer_to_pre_vote_after_restart(vec![e.clone()]);
    assert!(!removed(&out), "{out:?}");
    // Committed (its snapshot covers it): node 4 is told.
    let recovered = Recovered {
        snapshot: Some(Snapshot {
            meta: SnapshotMeta {
                position: e.end(),
                term: 1,
                timestamp: 0,
                membership: match &e.kind {
                    EntryKind::Membership(m) => (**m).clone(),
                    _ => unreachable!(),
                },
            },
            data: Bytes::new(),
        }),
        snapshot_file_size: 1,
        ..Recovered::default()
    };
    let mut node = Node::restart(Config::new(2, 7), recovered, 0);
    let mut out = Vec::new();
    node.step(
        0,
        Event::Message(Message {
            cluster_id: 7,
            from: 4,
            to: 2,
            term: 1,
            body: Body::PreVote {
                last_pos: 0,
                last_term: 0,
            },
        }),
        &mut out,
    );
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Send(Message { to: 4, body: Body::Removed { position }, .. }) if *position == e.end()
        )),
        "{out:?}"
    );
}

/// A node no configuration it holds has ever included (a joining node
/// that restarted before it got the entry adding it, so its volatile
/// joining state is gone) ignores removal notices, and asks no voter.
#[test]
fn a_node_never_a_member_as_far_as_its_data_goes_ignores_removal_notices() {
    let recovered = Recovered {
        snapshot: Some(Snapshot {
            meta: SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership: Membership::default(),
            },
            data: Bytes::new(),
        }),
        // Replayed from the log before it restarted: the old configuration.
        entries: vec![membership_entry(0, Membership::new([1, 2, 3]))],
        ..Recovered::default()
    };
    let mut node = Node::restart(Config::new(4, 7), recovered, 0);
    let mut out = Vec::new();
    // No probe of the voters however long it waits.
    node.step(10_000 * MS, Event::Tick, &mut out);
    assert!(out.iter().all(|a| !matches!(a, Action::Send(_))), "{out:?}");
    node.step(
        10_000 * MS,
        Event::Message(Message {
            cluster_id: 7,
            from: 1,
            to: 4,
            term: 1,
            body: Body::Removed { position: 0 },
        }),
        &mut out,
    );
    assert!(node.removed().is_none());
    assert_eq!(node.stats().removed_ignored, 1);
}

/// A voter that missed the entries adding a node (it was cut off while
/// node 4 was added and promoted, and node 3 removed) still votes for it:
/// its committed configuration lacks node 4, but node 4's log is ahead of
/// its own and may hold configurations it has not seen. With the leader
/// gone, the two left of {leader, lagging, 4} are a quorum and must elect
/// one (found by review: the lagging voter answered node 4's pre-votes
/// with `Removed` only, and its own pre-votes went to the gone leader and
/// the removed node 3, so no leader was ever elected).
#[test]
fn a_voter_behind_the_configurations_that_added_a_node_still_votes_for_it() {
    let (mut h, leader) = three_and_joining_4();
    let mut others = (1..=3).filter(|&n| n != leader);
    let (lagging, replaced) = (others.next().unwrap(), others.next().unwrap());
    for n in 1..=4 {
        h.cut.insert((n, lagging));
        h.cut.insert((lagging, n));
    }
    for (req, change) in [
        (1, MembershipChange::AddLearner(4)),
        (2, MembershipChange::PromoteLearner(4)),
        (3, MembershipChange::Remove(replaced)),
    ] {
        h.step(leader, Event::ChangeMembership { id: req, change });
        h.run_for(300 * MS);
    }
    let mut after = Membership::new([leader, lagging, 4]);
    after.removed.insert(replaced);
    assert_eq!(h.node(leader).membership(), &after);
    assert!(h.node(replaced).removed().is_some());
    assert_eq!(h.node(lagging).membership(), &Membership::new([1, 2, 3]));
    // The leader is gone for good; the lagging voter is back.
    h.cut.clear();
    for n in 1..=4 {
        h.cut.insert((n, leader));
        h.cut.insert((leader, n));
    }
    h.run_for(5_000 * MS);
    let led = [lagging, 4].into_iter().find(|&n| h.node(n).is_leader());
    assert_eq!(led, Some(4), "no leader among the remaining quorum");
    assert_eq!(h.node(lagging).membership(), &after);
    assert!(h.removed.iter().all(|r| r.0 == replaced), "{:?}", h.removed);
}

fn entry_of(term: Term, position: Position, kind: EntryKind) -> Entry {
    Entry {
        term,
        position,
        timestamp: 0,
        kind,
        data: Bytes::new(),
    }
}

/// The log of a cluster in which node 4 was a voter until `c1` removed it,
/// and `c2` added it back as a learner (both in term 2), after a snapshot
/// at `snap` (term 1) whose configuration includes the earlier node 4; a
/// leader of term 3 follows with its term start.
struct ReAdded {
    snap: SnapshotMeta,
    c1: Entry,
    c2: Entry,
    term_start: Entry,
}

fn re_added() -> ReAdded {
    let snap = SnapshotMeta {
        position: 1_000,
        term: 1,
        timestamp: 0,
        membership: Membership::new([1, 2, 3, 4]),
    };
    let c1 = entry_of(
        2,
        snap.position,
        EntryKind::Membership(std::sync::Arc::new(Membership::new([1, 2, 3]))),
    );
    let mut with_learner = Membership::new([1, 2, 3]);
    with_learner.learners.insert(4);
    let c2 = entry_of(
        2,
        c1.end(),
        EntryKind::Membership(std::sync::Arc::new(with_learner)),
    );
    let term_start = entry_of(3, c2.end(), EntryKind::TermStart);
    ReAdded {
        snap,
        c1,
        c2,
        term_start,
    }
}

/// `body` from node `from` at `term` to node 4.
fn to_node_4(from: NodeId, term: Term, body: Body) -> Event {
    Event::Message(Message {
        cluster_id: 7,
        from,
        to: 4,
        term,
        body,
    })
}

fn acted_on_removal(out: &[Action]) -> bool {
    out.iter().any(|a| matches!(a, Action::Removed { .. }))
}

/// A node added again under the id of a removed one (empty data, joining)
/// is sent a snapshot taken before that removal, so its configuration
/// includes the earlier node of its id, by a new leader (term 3) whose
/// commit position is not past the snapshot yet. It has not caught up:
/// it must go on ignoring removal notices, such as a lagging node's whose
/// latest committed configuration is the one that removed the earlier
/// node (found by review: it counted itself caught up there, on the old
/// configuration, and stopped for good).
#[test]
fn a_joining_node_is_not_caught_up_on_an_earlier_nodes_configuration() {
    let r = re_added();
    let mut n = Node::new(Config::new(4, 7), Membership::default(), 0);
    assert!(n.joining());
    let mut out = Vec::new();
    let t = 10 * MS;
    n.step(
        t,
        to_node_4(
            1,
            3,
            Body::InstallSnapshot {
                meta: r.snap.clone(),
                offset: 0,
                chunk: Bytes::from_static(b"state"),
                done: true,
                to_voter: false,
            },
        ),
        &mut out,
    );
    assert_eq!(n.commit_position(), r.snap.position);
    let heartbeat = |commit| {
        to_node_4(
            1,
            3,
            Body::Append {
                prev_pos: r.snap.position,
                prev_term: r.snap.term,
                commit,
                heartbeat: 1,
                entries: Vec::new(),
                to_voter: false,
            },
        )
    };
    n.step(t, heartbeat(r.snap.position), &mut out);
    assert!(n.joining(), "caught up on its predecessor's configuration");
    n.step(
        t,
        to_node_4(
            2,
            2,
            Body::Removed {
                position: r.c1.end(),
            },
        ),
        &mut out,
    );
    assert!(!acted_on_removal(&out), "{out:?}");
    assert!(n.removed().is_none());
    // Caught up for real: it holds the configuration adding it again and
    // the leader's term start, durable.
    let entries = vec![r.c1.clone(), r.c2.clone(), r.term_start.clone()];
    let end = r.term_start.end();
    n.step(
        t,
        to_node_4(
            1,
            3,
            Body::Append {
                prev_pos: r.snap.position,
                prev_term: r.snap.term,
                commit: end,
                heartbeat: 2,
                entries,
                to_voter: false,
            },
        ),
        &mut out,
    );
    assert!(n.joining(), "done before its entries are durable");
    n.step(
        t,
        Event::Durable {
            position: end,
            term: 3,
        },
        &mut out,
    );
    assert!(!n.joining());
    out.clear();
    // A stale notice is ignored for the configuration after it; a
    // removal after the one that added it back is taken.
    n.step(
        t,
        to_node_4(
            2,
            2,
            Body::Removed {
                position: r.c1.end(),
            },
        ),
        &mut out,
    );
    assert!(!acted_on_removal(&out), "{out:?}");
    n.step(
        t,
        to_node_4(2, 3, Body::Removed { position: end }),
        &mut out,
    );
    assert!(acted_on_removal(&out), "{out:?}");
}

/// The restart of a node added again under a removed node's id, before it
/// caught up: its data (a snapshot taken before the removal) holds a
/// configuration that included the earlier node of its id, so it cannot
/// tell from its data that it is still joining. The runtime, which
/// records that it finished joining, says so with `resume_joining`, and a
/// lagging node's notice of the earlier removal is ignored (the hole its
/// author left open). Without it the node would stop for good.
#[test]
fn a_re_added_node_restarted_before_it_caught_up_resumes_joining() {
    let r = re_added();
    let restarted = || {
        Node::restart(
            Config::new(4, 7),
            Recovered {
                hard_state: HardState {
                    term: 3,
                    ..HardState::default()
                },
                snapshot: Some(Snapshot {
                    meta: r.snap.clone(),
                    data: Bytes::from_static(b"state"),
                }),
                snapshot_file_size: 10,
                entries: Vec::new(),
            },
            0,
        )
    };
    let notice = || {
        to_node_4(
            2,
            2,
            Body::Removed {
                position: r.c1.end(),
            },
        )
    };
    // Told nothing, the core takes it for a member that was removed.
    let mut n = restarted();
    assert!(!n.joining());
    let mut out = Vec::new();
    n.step(0, notice(), &mut out);
    assert!(acted_on_removal(&out), "{out:?}");

    let mut n = restarted();
    n.resume_joining();
    assert!(n.joining());
    let mut out = Vec::new();
    n.step(0, notice(), &mut out);
    assert!(!acted_on_removal(&out), "{out:?}");
    assert!(n.removed().is_none());
    // Caught up with the leader: done.
    let entries = vec![r.c1.clone(), r.c2.clone(), r.term_start.clone()];
    let end = r.term_start.end();
    let append = Body::Append {
        prev_pos: r.snap.position,
        prev_term: r.snap.term,
        commit: end,
        heartbeat: 1,
        entries,
        to_voter: false,
    };
    n.step(10_000 * MS, to_node_4(1, 3, append), &mut out);
    n.step(
        10_000 * MS,
        Event::Durable {
            position: end,
            term: 3,
        },
        &mut out,
    );
    assert!(!n.joining());
}

/// A joining node grants no (pre-)vote: its data may be empty, or hold a
/// configuration from before an earlier node of its id was removed, so a
/// candidate that missed the removal and still counts the id as a voter
/// would win with it without the log committed since (simulator seed
/// 10621 of `chaos`). The same node, once a member, grants them.
#[test]
fn a_joining_node_grants_no_votes() {
    let ask = |term, body| {
        Event::Message(Message {
            cluster_id: 7,
            from: 3,
            to: 2,
            term,
            body,
        })
    };
    let answers = |node: &mut Node, term| {
        let mut out = Vec::new();
        let mut got = Vec::new();
        for body in [
            Body::PreVote {
                last_pos: 10_000,
                last_term: 4,
            },
            Body::Vote {
                last_pos: 10_000,
                last_term: 4,
                transfer: false,
            },
        ] {
            // Long after any leader's stickiness.
            node.step(60_000_000_000, ask(term, body), &mut out);
        }
        for a in &out {
            match a {
                Action::Send(Message {
                    body: Body::PreVoteResp { granted, .. },
                    ..
                }) => got.push(("pre-vote", *granted)),
                Action::Send(Message {
                    body: Body::VoteResp { granted, .. },
                    ..
                }) => got.push(("vote", *granted)),
                _ => {}
            }
        }
        got
    };
    // Waiting to be added, nothing on disk.
    let mut empty = Node::new(Config::new(2, 7), Membership::default(), 0);
    assert_eq!(
        answers(&mut empty, 5),
        [("pre-vote", false), ("vote", false)]
    );
    // Restarted while joining, its data holding a configuration that
    // listed an earlier node 2 as a voter.
    let mut resumed = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    resumed.resume_joining();
    assert_eq!(
        answers(&mut resumed, 5),
        [("pre-vote", false), ("vote", false)]
    );
    // A member votes.
    let mut member = Node::new(Config::new(2, 7), Membership::new([1, 2, 3]), 0);
    assert_eq!(
        answers(&mut member, 5),
        [("pre-vote", true), ("vote", true)]
    );
}

/// A learner is promoted only once it has finished joining (caught up with
/// the leader to the commit position the leader told it, in its term): a
/// joining node grants no vote (`a_joining_node_grants_no_votes`), and
/// only a leader ends its joining, so a voter promoted mid-join (at 90%
/// of a long log) that loses the leader before it catches up would stall
/// the cluster for good: here voters 1, 2 and the new 3, the leader gone,
/// and 2 needing 3's vote that 3 withholds until a leader reaches it.
#[test]
fn a_learner_is_promoted_only_once_it_has_finished_joining_so_losing_the_leader_then_elects() {
    let m = Membership::new([1, 2]);
    let small = |id| {
        let mut c = Config::new(id, 7);
        // Catching up takes many appends: a window to promote in.
        c.max_batch_bytes = 512;
        c
    };
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| Node::new(small(id), m.clone(), 0))
        .collect();
    nodes.push(Node::new(small(3), Membership::default(), 0));
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let other = if leader == 1 { 2 } else { 1 };
    for i in 0..2_000 {
        h.propose(
            leader,
            10 + i,
            i + 1,
            b"a hundred bytes of log entry data, and then some more so that the log grows...",
        );
    }
    h.run_for(100 * MS);
    // Added while cut off: it catches up once the cut heals.
    h.cut.insert((leader, 3));
    h.step(
        leader,
        Event::ChangeMembership {
            id: 1,
            change: MembershipChange::AddLearner(3),
        },
    );
    h.run_for(100 * MS);
    assert!(h.node(3).joining());
    h.cut.clear();
    // Deliver one message at a time, asking to promote 3 after each. At
    // 95% of the log, 3 stops hearing from the leader for 200 ms (a slow
    // link or disk): as far as the leader can tell, it holds 95%.
    let mut stalled_at = None;
    let mut refused_at_90 = false;
    let mut req = 1_000;
    let mut joining_when_promoted = None;
    let mut budget = 100_000;
    while joining_when_promoted.is_none() {
        if h.inbox.is_empty() {
            h.now += 10 * MS;
            for id in 1..=3 {
                h.step(id, Event::Tick);
            }
        }
        let Some(msg) = h.inbox.pop_front() else {
            continue;
        };
        h.step(msg.to, Event::Message(msg));
        let end = h.node(leader).append_position();
        if stalled_at.is_none() && h.node(3).durable_position() * 100 >= end * 95 {
            stalled_at = Some(h.now);
            h.cut.insert((leader, 3));
            h.inbox.retain(|m| m.to != 3);
        }
        if stalled_at.is_some_and(|t| h.now >= t + 200 * MS) {
            h.cut.clear();
        }
        req += 1;
        h.step(
            leader,
            Event::ChangeMembership {
                id: req,
                change: MembershipChange::PromoteLearner(3),
            },
        );
        if !h.rejected.iter().any(|r| r.1 == req) {
            joining_when_promoted = Some(h.node(3).joining());
        } else if stalled_at.is_some() && h.node(3).joining() {
            let end = h.node(leader).append_position();
            let held = h.node(leader).follower_progress();
            if held.iter().any(|&(n, p)| n == 3 && p * 10 >= end * 9) {
                refused_at_90 = true;
            }
        }
        budget -= 1;
        assert!(budget > 0, "3 was never promoted");
    }
    // The promotion commits on 1 and 2, and the leader goes.
    h.cut.insert((leader, 3));
    h.cut.insert((3, leader));
    h.run_for(100 * MS);
    assert!(h.node(other).membership().is_voter(3));
    for n in [other, 3] {
        h.cut.insert((leader, n));
        h.cut.insert((n, leader));
    }
    h.run_for(5_000 * MS);
    assert_eq!(joining_when_promoted, Some(false), "promoted while joining");
    assert!(
        refused_at_90,
        "never refused while joining at 90% of the log"
    );
    assert!(
        h.node(other).is_leader() || h.node(3).is_leader(),
        "no leader among {other} and 3 with the old leader gone (3 joining: {})",
        h.node(3).joining()
    );
}

/// Voters created to join by an earlier version, which did not record
/// whether they had finished joining, all restarted at once on this one
/// (`resume_joining_voting`): they grant votes as that version did, so
/// a leader is elected even though the one voter that never joined has
/// a log ahead of theirs.
/// (Resumed as joining with `resume_joining`, as a node of this version
/// that restarted before it finished, they would withhold their votes, and
/// only a leader ends their joining: none would ever be elected.)
#[test]
fn voters_joined_under_an_earlier_version_vote_after_a_restart_of_all() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let others: Vec<NodeId> = (1..=3).filter(|&n| n != leader).collect();
    // All down: the leader with an entry only it holds (in flight at the
    // shutdown): its log is ahead, so it needs the others' votes.
    for a in 1..=3 {
        for b in 1..=3 {
            h.cut.insert((a, b));
        }
    }
    h.propose(leader, 5, 1, b"only on the leader");
    for &o in &others {
        h.nodes[(o - 1) as usize].resume_joining_voting();
        assert!(h.node(o).joining());
    }
    h.run_for(3_000 * MS);
    assert_eq!(h.leader(), None);
    h.cut.clear();
    h.run_for(5_000 * MS);
    assert!(h.leader().is_some(), "no leader");
    for &o in &others {
        assert!(!h.node(o).joining(), "{o} caught up and joined");
    }
}

// ----- a stale leader and the node that replaced a removed one --------------

/// Like `Harness::run_for`, but node `paused` is not stepped at all (a
/// process stopped: no ticks, nothing received; the links to it are cut).
fn run_paused(h: &mut Harness, paused: NodeId, dt: Nanos) {
    let end = h.now + dt;
    while h.now < end {
        h.now += 10 * MS;
        for id in 1..=h.nodes.len() as u64 {
            if id != paused {
                h.step(id, Event::Tick);
            }
        }
        h.deliver();
    }
}

fn cut_both(h: &mut Harness, a: NodeId, b: NodeId) {
    h.cut.insert((a, b));
    h.cut.insert((b, a));
}

fn change(h: &mut Harness, leader: NodeId, id: RequestId, change: MembershipChange) {
    let rejected = h.rejected.len();
    h.step(leader, Event::ChangeMembership { id, change });
    assert_eq!(h.rejected.len(), rejected, "{change:?}: {:?}", h.rejected);
}

/// Leader `w` refuses request `req` to add the removed node `v` again.
fn re_adding_is_refused(h: &mut Harness, w: NodeId, v: NodeId, req: RequestId) {
    let rejected = h.rejected.len();
    h.step(
        w,
        Event::ChangeMembership {
            id: req,
            change: MembershipChange::AddLearner(v),
        },
    );
    assert_eq!(h.rejected.len(), rejected + 1, "re-adding {v} is refused");
}

/// Leader `l` of term t in configuration {1, 2, 3} is paused (after an
/// entry of its own that never left it when `just_elected` is false;
/// right after its election, its term start never sent, otherwise). The
/// other two elect `w` (term > t), which adds node 4, promotes it and
/// removes `v`; adding a fresh node (empty data, joining) under the id
/// `v` is refused, so it is added as node 5, whose link with `w` is slow.
/// Returns (harness, l, v, w, l's commit position before the pause, the
/// position of l's entry that never left it).
fn stale_leader_meets_a_replacement(
    just_elected: bool,
) -> (Harness, NodeId, NodeId, NodeId, Position, Position) {
    let m = Membership::new([1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::new(Config::new(id, 7), m.clone(), 0))
        .collect();
    for id in 4..=5 {
        nodes.push(Node::new(Config::new(id, 7), Membership::default(), 0));
    }
    let mut h = Harness::with(nodes);
    let l = if just_elected {
        // Paused as soon as it wins: its term start reaches no one.
        'elect: loop {
            h.now += 10 * MS;
            for id in 1..=5 {
                h.step(id, Event::Tick);
            }
            while let Some(m) = h.inbox.pop_front() {
                h.step(m.to, Event::Message(m));
                if let Some(l) = h.leader() {
                    h.inbox.retain(|m| m.from != l && m.to != l);
                    break 'elect l;
                }
            }
            assert!(h.now < 5_000 * MS, "no leader");
        }
    } else {
        h.run_for(1_500 * MS);
        let l = h.leader().expect("a leader");
        for i in 0..3 {
            h.propose(l, 1 + i, 1 + i, b"committed everywhere");
        }
        h.run_for(100 * MS);
        l
    };
    for n in 1..=5 {
        if n != l {
            cut_both(&mut h, l, n);
        }
    }
    // Everything before l's own entry (its term start, or X) committed.
    let commit_before = h.node(l).commit_position();
    let x = commit_before;
    if !just_elected {
        assert_eq!(h.node(l).append_position(), x);
        // Appended just before the pause; its appends are lost.
        h.propose(l, 10, 10, b"X, only on the stale leader");
        assert!(h.node(l).append_position() > x);
        let progress = h.node(l).follower_progress();
        assert!(
            progress.iter().all(|&(_, matched)| matched > 0),
            "{progress:?}"
        );
    }
    let t = h.node(l).term();
    run_paused(&mut h, l, 3_000 * MS);
    let w = (1..=3)
        .find(|&n| n != l && h.node(n).is_leader())
        .expect("the other two elect a leader");
    let v = (1..=3).find(|&n| n != l && n != w).unwrap();
    assert!(h.node(w).term() > t);
    change(&mut h, w, 100, MembershipChange::AddLearner(4));
    run_paused(&mut h, l, 1_000 * MS);
    change(&mut h, w, 101, MembershipChange::PromoteLearner(4));
    run_paused(&mut h, l, 500 * MS);
    change(&mut h, w, 102, MembershipChange::Remove(v));
    run_paused(&mut h, l, 500 * MS);
    assert!(h.removed.iter().any(|r| r.0 == v), "{:?}", h.removed);
    // A fresh node can not come back as v: it is node 5, slow to hear
    // from w.
    re_adding_is_refused(&mut h, w, v, 103);
    cut_both(&mut h, w, 5);
    change(&mut h, w, 104, MembershipChange::AddLearner(5));
    run_paused(&mut h, l, 500 * MS);
    let mut latest = Membership::new([l, w, 4]);
    latest.learners.insert(5);
    latest.removed.insert(v);
    assert_eq!(h.node(w).membership(), &latest);
    assert_eq!(h.node(w).commit_position(), h.node(w).append_position());
    // What the real cluster committed at x is not l's entry there.
    let theirs = h.node(w).log().entry_at(x).expect("committed at x").term;
    assert!(theirs > t, "term {theirs} at {x}");
    assert_eq!(h.node(l).log().entry_at(x).map(|e| e.term), Some(t));
    assert_eq!(h.node(5).term(), 0);
    (h, l, v, w, commit_before, x)
}

/// The stale leader resumes and reaches only the removed node v and the
/// fresh node 5 (w's messages to them are delayed). It must not commit its
/// entry at x, which conflicts with the entry the real cluster committed
/// there, with the quorum {l, v} its stale configuration {1, 2, 3} allows:
/// v's data holds the later term, and node 5 is no member it knows (had
/// the fresh node come back as v, with term 0, it would have acknowledged
/// l's appends as v: the bug this guards against).
fn stale_leader_commits_nothing_with_a_replacement(just_elected: bool) {
    let (mut h, l, v, w, commit_before, x) = stale_leader_meets_a_replacement(just_elected);
    for n in [v, 5] {
        h.cut.remove(&(l, n));
        h.cut.remove(&(n, l));
    }
    let mut still_leading = 0;
    let start = h.now;
    while h.now < start + 3_000 * MS {
        h.run_for(10 * MS);
        assert!(
            h.node(l).commit_position() <= commit_before,
            "the stale leader {l} committed to {} (was {commit_before}; its entry at {x} \
             conflicts with the one {w} committed) with {v} or the fresh node 5, which holds {}",
            h.node(l).commit_position(),
            h.node(5).append_position(),
        );
        if h.node(l).is_leader() {
            still_leading = h.now - start;
        }
    }
    assert!(
        still_leading < 1_000 * MS,
        "the stale leader {l} kept leading for {} ms on the answers of {v} or node 5",
        still_leading / MS
    );
}

#[test]
fn a_stale_leader_commits_nothing_with_the_node_that_replaced_a_removed_one() {
    stale_leader_commits_nothing_with_a_replacement(false);
}

#[test]
fn a_stale_leader_just_elected_commits_nothing_with_the_node_that_replaced_a_removed_one() {
    stale_leader_commits_nothing_with_a_replacement(true);
}

/// The ids removed from the cluster survive compaction: the leader's
/// snapshot metadata records them, a node that gets the state by a
/// snapshot install (the removal is no longer in any log) learns them from
/// it, a restart from that snapshot keeps them, and that node, leading,
/// refuses the removed id. (Were the snapshot's membership rebuilt from its
/// voters and learners, the configuration appended after it would forget
/// the removal and the id could be added back.)
#[test]
fn removed_ids_survive_snapshots_their_install_and_a_restart() {
    let (mut h, leader, target) = a_follower_removed();
    for seq in 1..=5 {
        h.propose(leader, 10 + seq, seq, b"after the removal");
    }
    h.run_for(100 * MS);
    let applied = h.node(leader).applied_position();
    h.snapshot_taken(leader, applied, Bytes::from_static(b"state"));
    assert_eq!(h.node(leader).log().first_pos(), applied);
    let meta = h.node(leader).snapshot_meta().expect("a snapshot").clone();
    assert_eq!(meta.membership.removed, [target].into(), "{meta:?}");
    // Node 4 gets the state as a snapshot: nothing in a log it receives
    // removed `target`.
    change(&mut h, leader, 2, MembershipChange::AddLearner(4));
    h.run_for(1_000 * MS);
    assert_eq!(h.installed[3], vec![image_of(b"state")]);
    let installed = h.node(4).snapshot_meta().expect("installed").clone();
    assert_eq!(installed.membership, meta.membership);
    assert_eq!(h.node(4).membership().removed, [target].into());
    // A restart from that snapshot alone.
    let restarted = Node::restart(
        Config::new(4, 7),
        Recovered {
            hard_state: HardState {
                term: h.node(4).term(),
                ..HardState::default()
            },
            snapshot: Some(Snapshot {
                meta: installed,
                data: Bytes::from_static(b"state"),
            }),
            snapshot_file_size: 9,
            entries: Vec::new(),
        },
        h.now,
    );
    assert_eq!(restarted.membership().removed, [target].into());
    // Node 4, promoted and leading, refuses the removed id.
    change(&mut h, leader, 3, MembershipChange::PromoteLearner(4));
    h.run_for(1_000 * MS);
    h.step(leader, Event::TransferLeadership { id: 4, target: 4 });
    h.run_for(1_000 * MS);
    assert_eq!(h.leader(), Some(4));
    let rejected = h.rejected.len();
    h.step(
        4,
        Event::ChangeMembership {
            id: 5,
            change: MembershipChange::AddLearner(target),
        },
    );
    let reason = h.rejected[rejected..]
        .iter()
        .find(|(node, id, _)| (*node, *id) == (4, 5))
        .map(|(_, _, r)| format!("{r:?}"))
        .expect("re-adding the removed id is refused");
    assert!(
        reason.contains(&format!("node {target} was removed")),
        "{reason}"
    );
    assert!(!h.node(4).membership().contains(target));
}

/// A node started under a removed id (`join = true`, empty disk) before
/// its addition is refused (the documented procedure starts a node before
/// `add-learner`): a stale leader that counts the id as a voter of its old
/// configuration ({1, 2, 3} here) reaches it. The node, still joining,
/// ignores a leader that counts it as a voter (it would be a learner), so
/// that leader commits nothing with it (it did: its entry at x, which
/// conflicts with what the cluster committed there) and steps down.
#[test]
fn a_stale_leader_commits_nothing_with_a_fresh_node_started_under_the_removed_id() {
    for just_elected in [false, true] {
        let (mut h, l, v, w, commit_before, x) = stale_leader_meets_a_replacement(just_elected);
        // v's disk is wiped and a node started under its id to be added
        // again (which is then refused).
        h.nodes[(v - 1) as usize] = Node::new(Config::new(v, 7), Membership::default(), h.now);
        re_adding_is_refused(&mut h, w, v, 200);
        h.cut.remove(&(l, v));
        h.cut.remove(&(v, l));
        let start = h.now;
        let mut still_leading = 0;
        while h.now < start + 3_000 * MS {
            h.run_for(10 * MS);
            assert!(
                h.node(l).commit_position() <= commit_before,
                "(just elected: {just_elected}) the stale leader {l} committed to {} (was \
                 {commit_before}; its entry at {x} conflicts with the one {w} committed) with \
                 the fresh node started under the removed id {v}",
                h.node(l).commit_position(),
            );
            if h.node(l).is_leader() {
                still_leading = h.now - start;
            }
        }
        assert!(h.node(v).stats().to_voter_ignored > 0);
        assert_eq!(h.node(v).term(), 0, "the stale leader's term was not taken");
        assert!(
            still_leading < 1_000 * MS,
            "the stale leader {l} kept leading for {} ms",
            still_leading / MS
        );
    }
}

// ----- a joining node and the leader that promotes it -----------------------

/// Voters {1, 2} led by 1, whose log is compacted behind a snapshot at its
/// end (an entry of its term: idle since) that holds the configuration
/// adding node 3 as a learner; node 3 was created to join (empty data)
/// and cut off until then. Returns the harness and the snapshot position.
fn idle_leader_with_snapshot_and_joining_learner_3() -> (Harness, Position) {
    let m = Membership::new([1, 2]);
    let nodes = vec![
        Node::new(Config::new(1, 7), m.clone(), 0),
        Node::new(Config::new(2, 7), m, 0),
        Node::new(Config::new(3, 7), Membership::default(), 0),
    ];
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    node_1_leads(&mut h);
    cut_both(&mut h, 1, 3);
    change(&mut h, 1, 1, MembershipChange::AddLearner(3));
    h.deliver();
    for seq in 1..=5 {
        h.propose(1, 10 + seq, seq, b"committed");
    }
    h.run_for(50 * MS);
    let end = h.node(1).append_position();
    assert_eq!(h.node(1).applied_position(), end);
    assert_eq!(h.node(1).log().term_at(end), Some(h.node(1).term()));
    h.snapshot_taken(1, end, Bytes::from_static(b"state"));
    assert_eq!(h.node(1).log().first_pos(), end);
    assert!(h.node(3).joining());
    (h, end)
}

/// Found by review: a joining node that installs a snapshot acknowledges
/// its position, and when that is the end of an idle leader's log (an
/// entry of its term, past everything it said was committed, in a
/// configuration that includes the node) the leader takes the node to
/// have finished joining and promotes it at once. The node did not count
/// the install towards its joining (only appends and durable entries
/// did): promoted while still joining, it ignored every append of its
/// own leader (`to_voter`) and never caught up, nor recorded that it
/// joined, for good. It finishes joining on the install, before that
/// acknowledgement goes out.
#[test]
fn a_learner_promoted_on_the_acknowledgement_of_a_snapshot_has_finished_joining() {
    let (mut h, snap) = idle_leader_with_snapshot_and_joining_learner_3();
    h.cut.clear();
    // One message at a time, asking to promote 3 after each.
    let mut req = 100;
    let mut budget = 10_000;
    let joining_when_promoted = loop {
        if h.inbox.is_empty() {
            h.now += 10 * MS;
            for id in 1..=3 {
                h.step(id, Event::Tick);
            }
        }
        if let Some(msg) = h.inbox.pop_front() {
            h.step(msg.to, Event::Message(msg));
        }
        req += 1;
        h.step(
            1,
            Event::ChangeMembership {
                id: req,
                change: MembershipChange::PromoteLearner(3),
            },
        );
        if !h.rejected.iter().any(|r| r.1 == req) {
            break h.node(3).joining();
        }
        budget -= 1;
        assert!(budget > 0, "3 was never promoted");
    };
    assert_eq!(h.installed[2].len(), 1, "3 caught up by the snapshot");
    assert_eq!(h.node(3).commit_position(), snap);
    // What was in flight to 3 is lost; from here on it hears a leader
    // that counts it as a voter.
    h.inbox.retain(|m| m.to != 3);
    h.run_for(1_000 * MS);
    let end = h.node(1).append_position();
    assert!(h.node(1).membership().is_voter(3));
    assert!(
        !joining_when_promoted,
        "promoted while joining (then: {} appends of its leader ignored; holds {} of {end})",
        h.node(3).stats().to_voter_ignored,
        h.node(3).durable_position(),
    );
    assert!(!h.node(3).joining());
    assert_eq!(h.node(3).durable_position(), end, "3 caught up");
    assert_eq!(h.node(3).commit_position(), h.node(1).commit_position());
    assert_eq!(h.node(3).stats().to_voter_ignored, 0);
}

/// The step in which a joining node installs a snapshot that ends its
/// joining gives `Action::InstallSnapshot` before the acknowledgement,
/// and ends joining in that step: a runtime records that the node joined
/// after installing and before sending (`Node::joining`). Without the
/// record the node would, restarted, resume joining as a voter its
/// leader promoted on that acknowledgement, and ignore it for good.
#[test]
fn a_snapshot_that_ends_joining_is_installed_before_its_acknowledgement() {
    let mut n = Node::new(Config::new(4, 7), Membership::default(), 0);
    let mut with_4 = Membership::new([1, 2]);
    with_4.learners.insert(4);
    let snap = SnapshotMeta {
        position: 500,
        term: 2,
        timestamp: 0,
        membership: with_4,
    };
    let mut out = Vec::new();
    // The leader's probe (rejected: nothing here), then its snapshot.
    n.step(
        10 * MS,
        to_node_4(
            1,
            2,
            Body::Append {
                prev_pos: snap.position,
                prev_term: 2,
                commit: snap.position,
                heartbeat: 1,
                entries: Vec::new(),
                to_voter: false,
            },
        ),
        &mut out,
    );
    assert!(n.joining());
    out.clear();
    n.step(
        10 * MS,
        to_node_4(
            1,
            2,
            Body::InstallSnapshot {
                meta: snap.clone(),
                offset: 0,
                chunk: Bytes::from_static(b"state"),
                done: true,
                to_voter: false,
            },
        ),
        &mut out,
    );
    assert!(!n.joining(), "caught up on the snapshot: {out:?}");
    let install = out
        .iter()
        .position(|a| matches!(a, Action::InstallSnapshot { .. }));
    let ack = out.iter().position(|a| {
        matches!(a, Action::Send(Message { body: Body::AppendResp { ok: true, position, .. }, .. })
            if *position == snap.position)
    });
    assert!(
        install.is_some() && ack.is_some() && install < ack,
        "{out:?}"
    );
}

/// A node whose runtime recorded that it joined (so no `resume_joining`
/// on its restart) but whose data holds no configuration that includes it
/// (it crashed between the record and the snapshot install, or the entry
/// that added it was uncommitted and overwritten) was never promoted: a
/// leader that counts it as a voter takes it for an earlier node of its
/// id, and is ignored as while joining. A leader that counts it as a
/// learner is followed.
#[test]
fn a_node_whose_data_never_included_it_ignores_a_leader_that_counts_it_as_a_voter() {
    let snap = SnapshotMeta {
        position: 500,
        term: 2,
        timestamp: 0,
        membership: Membership::new([1, 2, 3]),
    };
    let recovered = Recovered {
        hard_state: HardState {
            term: 2,
            voted_for: None,
            hold: Config::new(4, 7).election_timeout_min,
        },
        snapshot: Some(Snapshot {
            meta: snap.clone(),
            data: Bytes::from_static(b"state"),
        }),
        snapshot_file_size: 9,
        entries: Vec::new(),
    };
    let append = |to_voter| Body::Append {
        prev_pos: snap.position,
        prev_term: 2,
        commit: snap.position,
        heartbeat: 1,
        entries: Vec::new(),
        to_voter,
    };
    let mut n = Node::restart(Config::new(4, 7), recovered, 0);
    assert!(n.joining());
    let mut out = Vec::new();
    n.step(10 * MS, to_node_4(1, 5, append(true)), &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!((n.term(), n.leader()), (2, None));
    assert_eq!(n.stats().to_voter_ignored, 1);
    n.step(10 * MS, to_node_4(1, 5, append(false)), &mut out);
    assert_eq!((n.term(), n.leader()), (5, Some(1)));
    assert_eq!(answers(&out), vec![(snap.position, 1)]);
}

// ----- preferred leaders ----------------------------------------------------

/// Three voters that prefer `preferred` as leader, with a hold of `hold`;
/// `seed` varies their election timeouts.
fn preferring(preferred: &[NodeId], hold: Nanos, seed: u64) -> Harness {
    preferring_among(3, preferred, hold, |c| c.seed = seed * 10 + c.id)
}

/// Voters 1..=`n` that prefer `preferred` as leader, with a hold of
/// `hold`, their configurations then passed through `configure`.
fn preferring_among(
    n: u64,
    preferred: &[NodeId],
    hold: Nanos,
    configure: impl Fn(&mut Config),
) -> Harness {
    let m = Membership::new(1..=n);
    Harness::with(
        (1..=n)
            .map(|id| {
                let mut c = Config::new(id, 7);
                c.preferred_leaders = preferred.iter().copied().collect();
                c.preferred_leader_hold = hold;
                configure(&mut c);
                Node::new(c, m.clone(), 0)
            })
            .collect(),
    )
}

fn isolate(h: &mut Harness, lonely: NodeId) {
    for other in 1..=h.nodes.len() as NodeId {
        h.cut.insert((lonely, other));
        h.cut.insert((other, lonely));
    }
}

/// Three voters preferring node 1, which was cut off while node 2 or 3
/// (returned) was elected; the cut is still on.
fn led_from_afar(hold: Nanos, seed: u64) -> (Harness, NodeId) {
    let mut h = preferring(&[1], hold, seed);
    isolate(&mut h, 1);
    h.run_for(3_000 * MS);
    let far = h
        .leader()
        .expect("node 2 or 3 leads while node 1 is cut off");
    assert_ne!(far, 1);
    (h, far)
}

fn preference_transfers(h: &Harness) -> u64 {
    (1..=3)
        .map(|n| h.node(n).stats().preference_transfers)
        .sum()
}

#[test]
fn a_preferred_voter_stands_first_and_keeps_leading() {
    for seed in 0..20 {
        let mut h = preferring(&[3], 2_000 * MS, seed);
        h.run_for(1_500 * MS);
        assert_eq!(h.leader(), Some(3), "seed {seed}");
        for n in [1, 2] {
            let s = h.node(n).stats();
            assert_eq!(s.pre_votes_started, 0, "seed {seed}: node {n} stood");
        }
        h.run_for(6_000 * MS);
        assert_eq!(h.leader(), Some(3), "seed {seed}");
        assert_eq!(preference_transfers(&h), 0, "seed {seed}");
    }
}

#[test]
fn a_leader_outside_the_preferred_set_hands_over_once_a_preferred_voter_answered_for_the_hold() {
    let hold = 2_000 * MS;
    let (mut h, far) = led_from_afar(hold, 1);
    h.propose(far, 1, 1, b"before");
    h.cut.clear();
    h.run_for(hold - 200 * MS);
    assert_eq!(h.leader(), Some(far), "handed over before the hold");
    assert_eq!(preference_transfers(&h), 0);
    h.run_for(1_000 * MS);
    assert_eq!(h.leader(), Some(1), "leadership came back to node 1");
    assert_eq!(h.node(far).stats().preference_transfers, 1);
    // It serves: a write commits and reaches every node after the first.
    h.propose(1, 2, 2, b"after");
    h.run_for(100 * MS);
    for n in 1..=3usize {
        let data: Vec<&[u8]> = h.applied[n - 1]
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Command { .. }))
            .map(|e| &e.data[..])
            .collect();
        assert_eq!(data, [&b"before"[..], b"after"], "node {n}");
    }
    h.run_for(4 * hold);
    assert_eq!(h.leader(), Some(1));
    assert_eq!(preference_transfers(&h), 1);
}

#[test]
fn a_leader_elected_through_a_transfer_keeps_leading_for_its_term() {
    let hold = 1_000 * MS;
    let mut h = preferring(&[1], hold, 2);
    h.run_for(1_500 * MS);
    assert_eq!(h.leader(), Some(1));
    h.step(1, Event::TransferLeadership { id: 1, target: 2 });
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(2));
    let term = h.node(2).term();
    h.run_for(5 * hold);
    assert_eq!(h.leader(), Some(2), "an operator's transfer was undone");
    assert_eq!(h.node(2).term(), term);
    assert_eq!(preference_transfers(&h), 0);
}

#[test]
fn a_preferred_voter_on_a_flapping_link_is_not_handed_leadership() {
    let hold = 2_000 * MS;
    let (mut h, far) = led_from_afar(hold, 3);
    // Up for most of each hold, but down for 350 ms (seven heartbeats,
    // more than half node 1's minimum election timeout, but under it) every
    // 1.35 s.
    for _ in 0..10 {
        h.cut.clear();
        h.run_for(1_000 * MS);
        isolate(&mut h, 1);
        h.run_for(350 * MS);
    }
    assert_eq!(h.leader(), Some(far), "moved over a flapping link");
    assert_eq!(preference_transfers(&h), 0);
    h.cut.clear();
    h.run_for(hold + 500 * MS);
    assert_eq!(h.leader(), Some(1), "the steady link was not used");
}

#[test]
fn removing_a_preferred_leader_hands_leadership_to_a_preferred_voter() {
    let hold = 1_000 * MS;
    let mut h = preferring(&[1, 2], hold, 4);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    assert!(leader == 1 || leader == 2, "a preferred voter leads first");
    let other = 3 - leader;
    remove(&mut h, leader, leader, 1);
    h.run_for(1_000 * MS);
    assert!(h.node(leader).removed().is_some());
    h.run_for(5 * hold);
    assert_eq!(
        h.leader(),
        Some(other),
        "the removed leader handed over to node 3 (elected by a transfer, it keeps leading)"
    );
}

#[test]
fn hand_overs_to_a_preferred_voter_that_cannot_win_back_off() {
    let hold = 2_000 * MS;
    let mut h = preferring_among(5, &[1], hold, |c| {
        c.seed = 70 + c.id;
        if c.id >= 3 {
            // Slower to stand than node 2.
            c.election_timeout_max = 3_000 * MS;
        }
    });
    // Node 1 reaches node 2 only: it answers node 2 without a break, but
    // cannot win an election.
    for other in 3..=5 {
        h.cut.insert((1, other));
        h.cut.insert((other, 1));
    }
    h.run_for(3_000 * MS);
    assert_eq!(h.leader(), Some(2), "node 2 stands first of 2..=5");
    let mut leaderless: Nanos = 0;
    for _ in 0..3_000 {
        h.run_for(10 * MS);
        if !(2..=5).any(|n| h.node(n).is_leader()) {
            leaderless += 10 * MS;
        }
    }
    let transfers: u64 = (1..=5)
        .map(|n| h.node(n).stats().preference_transfers)
        .sum();
    assert!(
        transfers <= 2,
        "{transfers} hand-overs to a node that cannot win in 30 s"
    );
    assert!(
        leaderless < 3_000 * MS,
        "{} ms without a leader",
        leaderless / MS
    );
}

#[test]
fn a_preferred_voter_far_behind_the_log_is_not_handed_leadership() {
    let hold = 1_000 * MS;
    let (mut h, far) = led_from_afar(hold, 5);
    // Node 1 answers (heartbeats reach it) but every append carrying
    // entries to it is lost: it stays far behind while entries keep coming.
    h.cut.clear();
    let lost = |m: &Message| {
        m.to == 1 && matches!(&m.body, Body::Append { entries, .. } if !entries.is_empty())
    };
    for seq in 1..=400 {
        if seq % 10 == 0 {
            let data = Bytes::from(vec![7u8; 300 * 1024]);
            let p = Proposal {
                id: 100 + seq,
                client: 1,
                seq,
                data,
            };
            h.step(far, Event::Propose(vec![p]));
        }
        h.now += 10 * MS;
        for id in 1..=3 {
            h.step(id, Event::Tick);
        }
        while let Some(m) = h.inbox.pop_front() {
            if !lost(&m) {
                h.step(m.to, Event::Message(m));
            }
        }
    }
    assert!(h.node(1).append_position() < h.node(far).append_position() / 2);
    assert_eq!(
        h.leader(),
        Some(far),
        "handed to a voter far behind the log"
    );
    assert_eq!(preference_transfers(&h), 0);
}

#[test]
fn a_short_drop_of_a_preferred_voters_answers_does_not_restart_the_hold() {
    let hold = 2_000 * MS;
    let (mut h, far) = led_from_afar(hold, 6);
    h.cut.clear();
    h.run_for(hold / 2);
    // 200 ms without answers (a TCP retransmission's worth).
    isolate(&mut h, 1);
    h.run_for(200 * MS);
    h.cut.clear();
    h.run_for(hold / 2 + 200 * MS);
    assert_eq!(
        h.leader(),
        Some(1),
        "the hold started again after a short drop"
    );
    assert_eq!(h.node(far).stats().preference_transfers, 1);
}

#[test]
fn a_timer_due_during_a_leadership_transfer_waits_for_it() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    let target = (1..=3).find(|&n| n != leader).expect("a follower");
    // Every node's service set the timer (as applying an entry would).
    let deadline = h.now + 5 * MS;
    for n in 1..=3 {
        let position = h.node(n).applied_position();
        let timers = vec![TimerUpdate::Set { id: 9, deadline }];
        h.step(n, Event::Applied { position, timers });
    }
    h.now += 10 * MS;
    // The target is caught up: TimeoutNow goes at once. A timer entry
    // appended after it would put the voters' logs ahead of the target's.
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.step(leader, Event::Tick);
    assert!(
        h.node(leader).next_deadline() > h.now,
        "spins on the held timer"
    );
    h.deliver();
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(target), "the transfer failed");
    // The new leader fires the timer.
    h.run_for(100 * MS);
    let fired = h.applied[(target - 1) as usize]
        .iter()
        .any(|e| matches!(e.kind, EntryKind::Timer { id: 9, .. }));
    assert!(fired, "the timer never fired");
}

#[test]
fn a_removed_leaders_successor_outside_the_preferred_set_hands_over_to_it_later() {
    let hold = 1_000 * MS;
    let mut h = preferring_among(5, &[1], hold, |_| {});
    isolate(&mut h, 1);
    h.run_for(3_000 * MS);
    let leader = h
        .leader()
        .expect("one of 2..=5 leads while node 1 is cut off");
    // Node 1 does not hold the removal when it commits and the leader
    // steps down, handing over to another node. That node was chosen by
    // no one: once node 1 is back and has answered for the hold, it
    // hands leadership to node 1.
    remove(&mut h, leader, leader, 1);
    h.run_for(200 * MS);
    assert!(h.node(leader).removed().is_some());
    h.cut.clear();
    h.run_for(6 * hold);
    assert_eq!(
        h.leader(),
        Some(1),
        "a successor elected by the removed leader's hand-over kept leading"
    );
}

// ----- second review of preferred leaders -------------------------------

/// Like `run_for`, but messages for which `lost` is true are dropped.
fn run_losing(h: &mut Harness, dt: Nanos, lost: &dyn Fn(&Message) -> bool) {
    let end = h.now + dt;
    while h.now < end {
        h.now += 10 * MS;
        for id in 1..=h.nodes.len() as u64 {
            h.step(id, Event::Tick);
        }
        let mut budget = 100_000;
        while let Some(m) = h.inbox.pop_front() {
            budget -= 1;
            assert!(budget > 0, "message storm");
            if !lost(&m) {
                h.step(m.to, Event::Message(m));
            }
        }
    }
}

/// Runs until `n` leads (up to `within`); the time it took.
fn until_leads(
    h: &mut Harness,
    n: NodeId,
    within: Nanos,
    lost: &dyn Fn(&Message) -> bool,
) -> Option<Nanos> {
    let start = h.now;
    while h.now < start + within {
        run_losing(h, 10 * MS, lost);
        if h.leader() == Some(n) {
            return Some(h.now - start);
        }
    }
    None
}

/// Node 2 never stands (its pre-votes are lost), so node 3 is the only
/// leader outside the preferred set {1}; when `blocked`, node 1's
/// (pre-)votes are lost too: a hand-over to it fails.
fn votes_lost(blocked: bool) -> impl Fn(&Message) -> bool {
    move |m: &Message| {
        (m.from == 2 && matches!(m.body, Body::PreVote { .. }))
            || (blocked
                && m.from == 1
                && matches!(m.body, Body::PreVote { .. } | Body::Vote { .. }))
    }
}

#[test]
fn the_back_off_resets_once_a_preferred_voter_has_led() {
    let hold = 1_000 * MS;
    let mut h = preferring(&[1], hold, 11);
    let (free, blocked) = (votes_lost(false), votes_lost(true));
    // Node 3 leads while node 1 is cut off.
    isolate(&mut h, 1);
    run_losing(&mut h, 3_000 * MS, &free);
    assert_eq!(h.leader(), Some(3));
    // Two hand-overs in a row to node 1 fail (its votes are lost).
    h.cut.clear();
    run_losing(&mut h, 8_000 * MS, &blocked);
    assert_eq!(h.node(3).stats().preference_transfers, 2);
    assert_eq!(h.leader(), Some(3));
    // Node 1 then leads for a while, by an ordinary election (node 3 cut
    // off): the failures are no longer "in a row".
    isolate(&mut h, 3);
    assert!(until_leads(&mut h, 1, 5_000 * MS, &free).is_some());
    h.cut.clear();
    run_losing(&mut h, 30_000 * MS, &free);
    assert_eq!(h.leader(), Some(1));
    // Much later node 3 leads again; one hand-over fails.
    isolate(&mut h, 1);
    assert!(until_leads(&mut h, 3, 5_000 * MS, &free).is_some());
    h.cut.clear();
    let before = h.node(3).stats().preference_transfers;
    while h.node(3).stats().preference_transfers == before {
        run_losing(&mut h, 10 * MS, &blocked);
    }
    // It fails: node 3 is elected again.
    let term = h.node(3).term();
    while !(h.leader() == Some(3) && h.node(3).term() > term) {
        run_losing(&mut h, 10 * MS, &blocked);
    }
    // Node 1 can win again: a single failure waits four holds (plus an
    // election), not 64.
    let took = until_leads(&mut h, 1, 70 * hold, &free);
    assert!(
        took.is_some_and(|t| t <= 7 * hold),
        "node 1 led again only after {:?} ms",
        took.map(|t| t / MS)
    );
}

#[test]
fn a_hand_over_whose_target_never_stands_backs_off() {
    // A preferred voter that answers every heartbeat but whose TimeoutNow
    // is lost (or that never quite catches up: a stuck disk) does not
    // come to lead; each attempt refuses writes for election_timeout_min.
    let hold = 1_000 * MS;
    let (mut h, far) = led_from_afar(hold, 12);
    h.cut.clear();
    let lost = |m: &Message| matches!(m.body, Body::TimeoutNow { .. });
    run_losing(&mut h, 30 * hold, &lost);
    assert_eq!(h.leader(), Some(far));
    let n = h.node(far).stats().preference_transfers;
    assert!(
        n <= 4,
        "{n} hand-overs in 30 holds to a node that never led (each refusing writes for {} ms)",
        h.node(far).config().election_timeout_min / MS
    );
}

#[test]
fn a_removed_leader_whose_preferred_voter_acked_late_leaves_no_long_gap() {
    // Five voters preferring 1; node 1 holds the removal entry but its
    // acknowledgement arrives after the others' (a farther link): the
    // removed leader hands over to no one and the cluster waits an
    // election timeout with no leader.
    let hold = 1_000 * MS;
    let mut h = preferring_among(5, &[1], hold, |_| {});
    isolate(&mut h, 1);
    h.run_for(3_000 * MS);
    let leader = h.leader().expect("a leader");
    h.cut.clear();
    h.run_for(500 * MS); // node 1 catches up, answers, (not yet for the hold)
    assert_eq!(h.leader(), Some(leader));
    remove(&mut h, leader, leader, 1);
    // Node 1's acknowledgements are late: lost until the removal commits.
    let removal_done = |h: &Harness| h.node(leader).removed().is_some();
    while !removal_done(&h) {
        run_losing(&mut h, 10 * MS, &|m: &Message| {
            m.from == 1 && matches!(m.body, Body::AppendResp { .. })
        });
    }
    let start = h.now;
    let mut led_at = None;
    while h.now < start + 3_000 * MS {
        h.run_for(10 * MS);
        if h.leader().is_some() {
            led_at = Some(h.now - start);
            break;
        }
    }
    assert!(
        led_at.is_some_and(|t| t <= 100 * MS),
        "no leader for {:?} ms after the removed leader stepped down",
        led_at.map(|t| t / MS)
    );
}

/// The leader of a 3-node harness and its two followers, lowest id first.
fn leader_and_followers(h: &Harness) -> (NodeId, NodeId, NodeId) {
    let leader = h.leader().expect("a leader");
    let mut followers = (1..=3).filter(|&n| n != leader);
    let target = followers.next().expect("a follower");
    (leader, target, followers.next().expect("a third"))
}

/// How many times each node applied `data`.
fn applied_count(h: &Harness, data: &[u8]) -> Vec<usize> {
    h.applied
        .iter()
        .map(|es| es.iter().filter(|e| &e.data[..] == data).count())
        .collect()
}

fn forwards_dropped(h: &Harness) -> u64 {
    (1..=h.nodes.len() as u64)
        .map(|n| h.node(n).stats().forwards_dropped)
        .sum()
}

/// A follower's write that reaches the leader while it transfers
/// leadership is held (the leader's log must hold still so that the
/// target catches up) and passed on to the new leader once the old one
/// hears from it: applied once everywhere, not dropped for the follower's
/// client to time out on.
#[test]
fn a_write_forwarded_during_a_transfer_is_passed_on_to_the_new_leader() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let (leader, target, other) = leader_and_followers(&h);
    // The TimeoutNow goes out first, then the follower's forward: the
    // leader takes the forward while the transfer is in progress.
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.propose(other, 2, 1, b"forwarded during the transfer");
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(target), "the transfer failed");
    assert_eq!(
        applied_count(&h, b"forwarded during the transfer"),
        vec![1, 1, 1]
    );
    assert_eq!(forwards_dropped(&h), 0);
    assert!(h.rejected.is_empty(), "{:?}", h.rejected);
}

/// A transfer that runs out (its target cut off) leaves the leader
/// leading: the writes it held are appended then, once.
#[test]
fn writes_forwarded_during_a_failed_transfer_are_appended_when_it_ends() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let (leader, target, other) = leader_and_followers(&h);
    for n in [leader, other] {
        h.cut.insert((n, target));
        h.cut.insert((target, n));
    }
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.propose(other, 2, 1, b"held");
    h.run_for(50 * MS);
    assert_eq!(
        applied_count(&h, b"held"),
        vec![0, 0, 0],
        "appended during the transfer"
    );
    h.run_for(Config::new(1, 7).election_timeout_min);
    assert_eq!(h.leader(), Some(leader));
    let mut counts = applied_count(&h, b"held");
    counts.remove((target - 1) as usize);
    assert_eq!(
        counts,
        vec![1, 1],
        "the held write after the transfer ran out"
    );
    assert_eq!(forwards_dropped(&h), 0);
}

/// A forward sent in an earlier term to a node that no longer leads is
/// passed on to the leader it knows; one sent in its own term to a node
/// that knows another leader (no correct follower sends one) is dropped
/// and counted.
#[test]
fn a_forward_sent_to_a_former_leader_is_passed_on() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let old = h.leader().expect("a leader");
    let old_term = h.node(old).term();
    let new = (1..=3).find(|&n| n != old).expect("a follower");
    let other = (1..=3).find(|&n| n != old && n != new).expect("a third");
    h.step(old, Event::TransferLeadership { id: 1, target: new });
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(new));
    let forward = |term: Term, data: &'static [u8]| {
        Event::Message(Message {
            cluster_id: 7,
            from: other,
            to: old,
            term,
            body: Body::Forward {
                commands: vec![(1, 7, Bytes::from_static(data))],
            },
        })
    };
    h.step(old, forward(old_term, b"late forward"));
    h.run_for(50 * MS);
    assert_eq!(applied_count(&h, b"late forward"), vec![1, 1, 1]);
    assert_eq!(forwards_dropped(&h), 0);
    h.step(old, forward(h.node(old).term(), b"misdirected"));
    h.run_for(50 * MS);
    assert_eq!(applied_count(&h, b"misdirected"), vec![0, 0, 0]);
    assert_eq!(h.node(old).stats().forwards_dropped, 1);
}

/// Three nodes that hold at most two commands' overhead and 40 bytes of
/// data during a transfer (room for one command of 30 bytes, not two),
/// with a leader: (harness, leader, a follower, the other follower).
fn small_hold_cluster() -> (Harness, NodeId, NodeId, NodeId) {
    let nodes = (1..=3)
        .map(|id| {
            let mut cfg = Config::new(id, 7);
            cfg.max_inflight_bytes = 2 * HELD_COMMAND_OVERHEAD + 40;
            Node::new(cfg, Membership::new(1..=3), 0)
        })
        .collect();
    let mut h = Harness::with(nodes);
    h.run_for(1_500 * MS);
    let (leader, target, other) = leader_and_followers(&h);
    (h, leader, target, other)
}

/// A leader holds at most `max_inflight_bytes` of forwarded writes during a
/// transfer; what does not fit is dropped and counted, what fits is kept.
#[test]
fn forwards_held_during_a_transfer_are_bounded() {
    let (mut h, leader, target, other) = small_hold_cluster();
    h.step(leader, Event::TransferLeadership { id: 1, target });
    let forward = |seq, data: &'static [u8]| {
        Event::Message(Message {
            cluster_id: 7,
            from: other,
            to: leader,
            term: h.node(leader).term(),
            body: Body::Forward {
                commands: vec![(1, seq, Bytes::from_static(data))],
            },
        })
    };
    let (first, second) = (forward(1, &[1; 30]), forward(2, &[2; 30]));
    h.step(leader, first);
    h.step(leader, second);
    assert_eq!(h.node(leader).stats().forwards_dropped, 1);
    h.run_for(100 * MS);
    assert_eq!(h.leader(), Some(target));
    assert_eq!(applied_count(&h, &[1; 30]), vec![1, 1, 1]);
    assert_eq!(applied_count(&h, &[2; 30]), vec![0, 0, 0]);
}

/// A transferring leader holds its own clients' writes too, instead of
/// refusing them: passed on to the new leader when the transfer succeeds,
/// appended when it runs out; from the first that does not fit within
/// `max_inflight_bytes` on, a batch is refused (`TransferInProgress`).
#[test]
fn a_transferring_leader_holds_its_own_writes() {
    for target_reachable in [true, false] {
        // Room for the 30-byte command, not the 20-byte one after it.
        let (mut h, leader, target, _) = small_hold_cluster();
        if !target_reachable {
            for n in (1..=3).filter(|&n| n != target) {
                h.cut.insert((n, target));
                h.cut.insert((target, n));
            }
        }
        h.step(leader, Event::TransferLeadership { id: 1, target });
        assert!(h.node(leader).is_transferring());
        let proposal = |id, seq, data: &'static [u8]| Proposal {
            id,
            client: 1,
            seq,
            data: Bytes::from_static(data),
        };
        h.step(
            leader,
            Event::Propose(vec![
                proposal(2, 1, &[1; 30]),
                proposal(3, 2, &[2; 20]),
                proposal(4, 3, &[3; 5]),
            ]),
        );
        let refused: Vec<RequestId> = h.rejected.iter().map(|r| r.1).collect();
        assert_eq!(refused, vec![3, 4], "from the first that does not fit on");
        assert!(h
            .rejected
            .iter()
            .all(|r| r.2 == RejectReason::TransferInProgress));
        h.run_for(Config::new(1, 7).election_timeout_min + 10 * MS);
        let expected_leader = if target_reachable { target } else { leader };
        assert_eq!(h.leader(), Some(expected_leader));
        let mut counts = applied_count(&h, &[1; 30]);
        if !target_reachable {
            counts.remove((target - 1) as usize);
        }
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
        assert_eq!(applied_count(&h, &[2; 20]), vec![0, 0, 0]);
        assert_eq!(forwards_dropped(&h), 0);
    }
}

/// A leader transferring leadership still serves linearizable reads
/// through a heartbeat round (its followers' `ReadIndex` always were): a
/// quorum answering in its term shows no later leader was elected first.
#[test]
fn a_transferring_leader_serves_reads_by_a_heartbeat_round() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let (leader, target, _) = leader_and_followers(&h);
    for n in (1..=3).filter(|&n| n != target) {
        h.cut.insert((n, target));
        h.cut.insert((target, n));
    }
    h.step(leader, Event::TransferLeadership { id: 1, target });
    assert!(h.node(leader).is_transferring());
    h.step(leader, Event::Read { id: 2 });
    h.run_for(100 * MS);
    assert!(h.node(leader).is_transferring(), "the transfer ended early");
    let commit = h.node(leader).commit_position();
    assert_eq!(h.ready_reads, vec![(leader, 2, commit)], "{:?}", h.rejected);
}

/// A write a transferring leader holds for its own client, still held when
/// it stands for election itself (the target won no election, and no other
/// leader came), is refused "not the leader" then, not dropped silently
/// for its client to time out on: it was never appended, nor sent on.
#[test]
fn a_held_write_dropped_at_an_election_is_refused() {
    let mut h = Harness::new(3);
    h.run_for(1_500 * MS);
    let (leader, target, other) = leader_and_followers(&h);
    h.step(leader, Event::TransferLeadership { id: 1, target });
    h.step(
        leader,
        Event::Propose(vec![Proposal {
            id: 2,
            client: 0,
            seq: 1,
            data: Bytes::from_static(b"held"),
        }]),
    );
    assert!(h.node(leader).holds_commands());
    // The target campaigns on the TimeoutNow already sent, but hears no
    // answer: the leader steps down on its vote request, still holding.
    h.cut.insert((leader, target));
    h.cut.insert((other, target));
    h.deliver();
    assert!(!h.node(leader).is_leader());
    assert!(h.node(leader).holds_commands());
    assert!(h.rejected.is_empty(), "{:?}", h.rejected);
    // Cut off, the old leader stands for election with the write held.
    for n in [target, other] {
        h.cut.insert((leader, n));
        h.cut.insert((n, leader));
    }
    h.run_for(2 * Config::new(1, 7).election_timeout_max);
    assert!(!h.node(leader).holds_commands());
    assert_eq!(
        h.rejected,
        vec![(leader, 2, RejectReason::NotLeader { leader: None })]
    );
    h.cut.clear();
    h.run_for(2 * Config::new(1, 7).election_timeout_max);
    assert!(h.leader().is_some());
    assert_eq!(applied_count(&h, b"held"), vec![0, 0, 0]);
}

// ----- a voter that lost unsynced writes (`Node::set_amnesic`) ------------

/// Node `id` of `h` restarts from `entries` (its disk after losing what it
/// had not synced) and its persisted hard state moved on as the runtime
/// does (`HardState::after_power_loss`), amnesic (its votes not saying so
/// if `amnesia_ignored`).
fn power_loss(h: &mut Harness, id: NodeId, entries: Vec<Entry>, amnesia_ignored: bool) {
    let initial = Membership::new(1..=h.nodes.len() as u64);
    power_loss_in(h, id, entries, amnesia_ignored, initial);
}

/// `power_loss` of a node created with the `initial` membership.
fn power_loss_in(
    h: &mut Harness,
    id: NodeId,
    entries: Vec<Entry>,
    amnesia_ignored: bool,
    initial: Membership,
) {
    let i = (id - 1) as usize;
    let mut cfg = Config::new(id, 7);
    cfg.testing_bugs.amnesia_ignored = amnesia_ignored;
    let recovered = Recovered {
        hard_state: h.persisted[i].after_power_loss(),
        snapshot: Some(Snapshot {
            meta: SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership: initial,
            },
            data: Bytes::new(),
        }),
        snapshot_file_size: 0,
        entries,
    };
    let mut node = Node::restart(cfg, recovered, h.now);
    node.set_amnesic();
    h.nodes[i] = node;
}

/// A three-node harness with node 1 leading.
fn three_led_by_1() -> Harness {
    led_by_1(3)
}

/// An `n`-node harness with node 1 leading.
fn led_by_1(n: u64) -> Harness {
    let mut h = Harness::new(n);
    h.run_for(1_500 * MS);
    let leader = h.leader().expect("a leader");
    if leader != 1 {
        h.step(leader, Event::TransferLeadership { id: 1, target: 1 });
        h.run_for(500 * MS);
    }
    assert_eq!(h.leader(), Some(1));
    h
}

/// Leader 1 commits `b"lost"` with node 2's acknowledgement alone (node 3
/// hears nothing of it); node 2 then loses power before syncing it, and
/// leader 1 goes down. Returns the harness and the entry.
fn acknowledged_then_lost_by_power(amnesia_ignored: bool) -> (Harness, Entry) {
    let mut h = three_led_by_1();
    let synced: Vec<Entry> = h.node(2).log().iter().cloned().collect();
    h.cut.insert((1, 3));
    h.propose(1, 1, 1, b"lost");
    h.run_for(30 * MS);
    let e = h.node(1).log().iter().last().cloned().expect("the entry");
    assert_eq!(&e.data[..], b"lost");
    assert!(
        h.applied[0].iter().any(|a| a == &e),
        "leader 1 committed it with node 2"
    );
    assert!(h.node(3).log().entry_at(e.position).is_none());
    for n in [2, 3] {
        h.cut.insert((1, n));
        h.cut.insert((n, 1));
    }
    power_loss(&mut h, 2, synced, amnesia_ignored);
    (h, e)
}

/// The case `set_amnesic` is for: without it, nodes 2 and 3 elect a
/// leader that lacks a committed entry (the bug the simulator's
/// `amnesia_ignored` runs find end to end).
#[test]
fn a_voter_that_lost_acknowledged_writes_cannot_elect_a_leader_without_them() {
    let (mut h, e) = acknowledged_then_lost_by_power(true);
    h.run_for(3_000 * MS);
    let leader = [2, 3].into_iter().find(|&n| h.node(n).is_leader());
    let leader = leader.expect("without amnesia 2 and 3 elect a leader");
    assert!(h.node(leader).log().entry_at(e.position) != Some(&e));

    let (mut h, e) = acknowledged_then_lost_by_power(false);
    let restart_term = h.node(2).term();
    assert_eq!(restart_term, h.node(1).term() + 1);
    assert_eq!(h.node(2).voted_for(), None);
    assert!(h.node(2).amnesic());
    h.run_for(3_000 * MS);
    assert!(
        !h.node(2).is_leader() && !h.node(3).is_leader(),
        "node 2's vote alone elects no one"
    );
    assert!(h.node(2).amnesic());
    // Node 1 comes back: a leader with the entry is elected, and node 2
    // catches up and is no longer amnesic.
    h.cut.clear();
    h.run_for(3_000 * MS);
    let leader = h.leader().expect("a leader once node 1 is back");
    assert!(h.node(leader).term() >= restart_term);
    h.propose(leader, 2, 2, b"after");
    h.run_for(100 * MS);
    for n in 1..=3 {
        assert_eq!(h.node(n).log().entry_at(e.position), Some(&e), "node {n}");
    }
    assert!(!h.node(2).amnesic());
    assert_eq!(h.node(2).stats().amnesia_ended, 1);
}

/// A cluster that lost power everywhere at once (every voter amnesic)
/// still elects a leader, by every voter's vote, and then none is amnesic.
/// So does a single node.
#[test]
fn every_voter_amnesic_elects_by_every_vote() {
    for n in [1, 3] {
        let mut h = Harness::new(n);
        h.run_for(1_500 * MS);
        let leader = h.leader().expect("a leader");
        h.propose(leader, 1, 1, b"kept");
        h.run_for(100 * MS);
        for id in 1..=n {
            let entries = h.node(id).log().iter().cloned().collect();
            power_loss(&mut h, id, entries, false);
        }
        h.run_for(3_000 * MS);
        let leader = h.leader().expect("elected by every vote");
        h.run_for(100 * MS);
        for id in 1..=n {
            assert!(!h.node(id).amnesic(), "{n} nodes: node {id}");
            let kept = h.node(id).log().iter().any(|e| &e.data[..] == b"kept");
            assert!(kept, "{n} nodes: node {id}");
        }
        assert!(h.node(leader).is_leader());
    }
}

/// With one voter of three amnesic and the others up, a leader is elected
/// as usual (the other two are a quorum), and the amnesic one catches up.
#[test]
fn one_amnesic_voter_of_three_does_not_stop_elections() {
    let mut h = three_led_by_1();
    let entries = h.node(3).log().iter().cloned().collect();
    power_loss(&mut h, 3, entries, false);
    h.run_for(3_000 * MS);
    let leader = h.leader().expect("a leader");
    assert!(h.node(leader).term() >= h.node(3).term());
    assert!(!h.node(3).amnesic());
}

/// With four voters, a candidate needs a quorum of votes (three), two of
/// them from voters that are not amnesic (two meet every quorum of
/// three): so two amnesic voters, one of them down, still leave an
/// electable cluster, and three do not (one voter that kept its log meets
/// too few quorums).
#[test]
fn with_four_voters_two_kept_logs_and_a_quorum_of_votes_elect() {
    for amnesic in [vec![3, 4], vec![2, 3, 4]] {
        let mut h = Harness::new(4);
        h.run_for(1_500 * MS);
        let leader = h.leader().expect("a leader");
        h.propose(leader, 1, 1, b"kept");
        h.run_for(100 * MS);
        for &id in &amnesic {
            let entries = h.node(id).log().iter().cloned().collect();
            power_loss(&mut h, id, entries, false);
        }
        for n in 1..=3 {
            h.cut.insert((4, n));
            h.cut.insert((n, 4));
        }
        h.run_for(3_000 * MS);
        let leader = (1..=3).find(|&n| h.node(n).is_leader());
        if amnesic.len() == 2 {
            let leader = leader.expect("nodes 1 and 2 kept their logs: a leader");
            h.propose(leader, 2, 2, b"after");
            h.run_for(100 * MS);
            assert!(!h.node(3).amnesic(), "node 3 caught up");
        } else {
            assert_eq!(leader, None, "only node 1 kept its log: no leader");
        }
    }
}

/// Voters 1-3 led by node 1, and node 4 added as a learner; the first
/// configuration.
fn three_led_by_1_and_learner_4() -> (Harness, Membership) {
    let (mut h, leader) = three_and_joining_4();
    if leader != 1 {
        h.step(leader, Event::TransferLeadership { id: 1, target: 1 });
        h.run_for(500 * MS);
    }
    assert_eq!(h.leader(), Some(1));
    h.step(1, change_at_1(MembershipChange::AddLearner(4)));
    h.run_for(200 * MS);
    assert!(h.node(4).membership().learners.contains(&4));
    (h, Membership::new([1, 2, 3]))
}

/// Nodes 2 and 3, cut off from 1 and 4, elect one of them, which commits
/// an entry; the other loses what it holds past `term` (written, not
/// synced) to a power loss, and the leader goes down while the others
/// heal: nodes 1, 4 and the amnesic one must elect no leader without the
/// entry. Returns the leader of 2 and 3, cut off, and the entry.
fn commit_at_2_and_3_then_lose_it(h: &mut Harness, m: Membership, term: Term) -> (NodeId, Entry) {
    h.run_for(2_000 * MS);
    let l2 = [2, 3].into_iter().find(|&n| h.node(n).is_leader());
    let l2 = l2.expect("2 and 3 elect a leader");
    let other = 5 - l2;
    h.propose(l2, 9, 9, b"committed by 2 and 3");
    h.run_for(30 * MS);
    let e = h.node(l2).log().iter().last().cloned().expect("the entry");
    assert!(h.applied[(l2 - 1) as usize].contains(&e), "committed");
    let kept = h.node(other).log().iter().filter(|x| x.term <= term);
    let kept: Vec<Entry> = kept.cloned().collect();
    power_loss_in(h, other, kept, false, m);
    h.cut.clear();
    for n in [1, other, 4] {
        cut(h, l2, n);
    }
    h.run_for(4_000 * MS);
    for n in [1, other, 4] {
        let node = h.node(n);
        assert!(
            !node.is_leader() || node.log().entry_at(e.position) == Some(&e),
            "node {n} leads without the committed entry"
        );
    }
    (l2, e)
}

/// A membership change asked of node 1.
fn change_at_1(change: MembershipChange) -> Event {
    Event::ChangeMembership { id: 1, change }
}

/// Cuts the link between `a` and `b` both ways.
fn cut(h: &mut Harness, a: NodeId, b: NodeId) {
    h.cut.insert((a, b));
    h.cut.insert((b, a));
}

/// While a candidate's latest configuration is not committed, the votes
/// of voters that kept their logs must be a quorum of it: fewer (half of
/// an even-sized one) need not meet a quorum of the configuration before,
/// which may have committed an entry since (found by review). Here node 1
/// appended the promotion of learner 4 (voters 1-4) and only node 4 got
/// it; nodes 2 and 3 then committed an entry without them, node 2 lost
/// it to a power loss and node 3 went down: nodes 1, 4 and the amnesic 2
/// are a quorum of the four, but must not elect a leader without it.
#[test]
fn an_uncommitted_configuration_needs_a_quorum_of_kept_votes() {
    let (mut h, m) = three_led_by_1_and_learner_4();
    for n in [2, 3] {
        cut(&mut h, 1, n);
        cut(&mut h, 4, n);
    }
    h.step(1, change_at_1(MembershipChange::PromoteLearner(4)));
    h.run_for(50 * MS);
    assert!(h.node(4).membership().voters.contains(&4), "node 4 got it");
    assert!(!h.node(2).membership().voters.contains(&4));
    let term1 = h.node(1).log().last_term();
    let (_, e) = commit_at_2_and_3_then_lose_it(&mut h, m, term1);
    // The leader of 2 and 3 back: a leader with the entry, and no one
    // amnesic after.
    h.cut.clear();
    h.run_for(3_000 * MS);
    let leader = h.leader().expect("a leader");
    h.propose(leader, 10, 10, b"after");
    h.run_for(200 * MS);
    for n in 1..=4 {
        assert_eq!(h.node(n).log().entry_at(e.position), Some(&e), "node {n}");
        assert!(!h.node(n).amnesic(), "node {n}");
    }
}

/// An entry of a later term after the configuration in force does not
/// settle it (found by review, against a version that took it so): node 1
/// appends the promotion of learner 4 (voters 1-4), which only node 4
/// gets, then wins a later term with node 2's vote (both 1 and 2 kept
/// their logs: a quorum of the voters before too) and its term's first
/// entry reaches node 4 only. Nodes 2 and 3, which never got the
/// promotion, elect one of them in a later term still and commit an
/// entry; the other loses it to a power loss, and the leader goes down.
/// Nodes 1, 4 and the amnesic one must not elect a leader without it.
#[test]
fn a_later_term_after_an_uncommitted_configuration_does_not_settle_it() {
    let (mut h, m) = three_led_by_1_and_learner_4();
    // Node 1 and learner 4 on one side, 2 and 3 apart from each other.
    for (a, b) in [(1, 2), (1, 3), (4, 2), (4, 3), (2, 3)] {
        cut(&mut h, a, b);
    }
    h.step(1, change_at_1(MembershipChange::PromoteLearner(4)));
    h.run_for(50 * MS);
    let promoted_term = h.node(1).log().last_term();
    assert!(h.node(4).membership().voters.contains(&4));
    // Node 2 hears node 1 again, but none of its appends: node 1 wins a
    // later term with the votes of 1, 2 and 4.
    h.cut.remove(&(1, 2));
    h.cut.remove(&(2, 1));
    let mut budget = 20_000;
    while !h.node(1).is_leader() || h.node(1).log().last_term() == promoted_term {
        budget -= 1;
        assert!(budget > 0, "node 1 never led a later term");
        h.now += MS;
        for id in 1..=4 {
            h.step(id, Event::Tick);
        }
        while let Some(msg) = h.inbox.pop_front() {
            let append = matches!(msg.body, Body::Append { .. } | Body::InstallSnapshot { .. });
            if !(append && msg.from == 1 && msg.to == 2) {
                h.step(msg.to, Event::Message(msg));
            }
        }
    }
    assert!(
        !h.node(2).membership().voters.contains(&4),
        "node 2 lacks it"
    );
    // Nodes 2 and 3 alone.
    h.cut.clear();
    for (a, b) in [(1, 2), (1, 3), (4, 2), (4, 3)] {
        cut(&mut h, a, b);
    }
    commit_at_2_and_3_then_lose_it(&mut h, m, promoted_term);
}

/// A leader that removed itself and stepped down before the removal
/// committed may be the one node that can still be elected: here node 1
/// removes itself, only node 2 gets the new configuration (voters 2 and
/// 3) and an entry after it, node 2 loses that entry to a power loss and
/// node 1 steps down. Node 3 lacks the new configuration (nodes 1 and 2
/// refuse it), and node 2, amnesic, needs node 1's vote too, which it
/// refuses (its log is longer): node 1, a voter of the configuration
/// before while the one in force is not known to be committed, stands
/// (five-node `power` seed 9 stalled so). Elected, it commits its removal
/// and hands over.
#[test]
fn a_leader_that_removed_itself_stands_while_the_removal_is_not_committed() {
    let mut h = three_led_by_1();
    cut(&mut h, 1, 3);
    h.step(1, change_at_1(MembershipChange::Remove(1)));
    h.run_for(30 * MS);
    assert_eq!(
        h.node(2).membership().voters,
        Membership::new([2, 3]).voters
    );
    assert!(h.node(3).membership().voters.contains(&1));
    let synced: Vec<Entry> = h.node(2).log().iter().cloned().collect();
    h.propose(1, 1, 1, b"after the removal");
    h.run_for(30 * MS);
    let e = h.node(1).log().iter().last().cloned().expect("the entry");
    assert_eq!(h.node(2).log().entry_at(e.position), Some(&e));
    power_loss(&mut h, 2, synced, false);
    // Node 2's next term deposes node 1.
    h.run_for(500 * MS);
    assert_eq!(h.leader(), None);
    h.cut.clear();
    h.run_for(4_000 * MS);
    let leader = h.leader().expect("a leader");
    assert_ne!(leader, 1, "node 1 handed over once its removal committed");
    assert!(h.node(1).removed().is_some());
    h.propose(leader, 2, 2, b"later");
    h.run_for(200 * MS);
    for n in [2, 3] {
        assert_eq!(h.node(n).log().entry_at(e.position), Some(&e), "node {n}");
        assert!(!h.node(n).amnesic(), "node {n}");
    }
}

/// A candidate that does not know its configuration is committed learns it
/// from a voter that does (`committed` in its vote): then the voters of
/// the configuration before need not meet its quorums too. Here five
/// voters remove node 5, which is gone; node 1 commits the removal and an
/// entry after it, but nodes 3 and 4 never hear of the commit; nodes 1
/// and 2 lose the entry to a power loss (node 1 knows the removal
/// committed: `settled_config`). Nodes 3 and 4 hold the longest logs, so
/// one of them must lead, and while it takes the removal as maybe
/// uncommitted it needs the votes of three voters that kept their logs
/// among the five before, where only the two of them did. Node 1's vote
/// says the removal committed: one of them wins.
#[test]
fn a_voter_that_knows_the_configuration_committed_says_so_in_its_vote() {
    let mut h = led_by_1(5);
    for n in 1..=4 {
        cut(&mut h, 5, n);
    }
    h.step(1, change_at_1(MembershipChange::Remove(5)));
    h.propose(1, 1, 1, b"after the removal");
    let membership_entry = |h: &Harness| {
        let log = h.node(1).log();
        let configs = log
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Membership(_)));
        configs.last().cloned().expect("the removal")
    };
    let config = membership_entry(&h);
    let e = h.node(1).log().iter().last().cloned().expect("the entry");
    assert_eq!(&e.data[..], b"after the removal");
    // Everything delivered but what would tell nodes 3 and 4 that the
    // removal committed.
    let mut budget = 20_000;
    while h.node(1).commit_position() < e.end() {
        budget -= 1;
        assert!(budget > 0, "node 1 never committed the entry");
        h.now += MS;
        for id in 1..=5 {
            h.step(id, Event::Tick);
        }
        while let Some(msg) = h.inbox.pop_front() {
            let tells = matches!(msg.body, Body::Append { commit, .. } if commit > config.position);
            let hides = tells && msg.from == 1 && [3, 4].contains(&msg.to);
            if !hides && !h.cut.contains(&(msg.from, msg.to)) {
                h.step(msg.to, Event::Message(msg));
            }
        }
    }
    assert_eq!(h.node(1).settled_config(), config.position);
    for n in [3, 4] {
        assert!(h.node(n).commit_position() <= config.position, "node {n}");
        assert_eq!(h.node(n).log().entry_at(e.position), Some(&e), "node {n}");
    }
    let settled = h.node(1).settled_config();
    for n in [1, 2] {
        let kept = h
            .node(n)
            .log()
            .iter()
            .filter(|x| x.position <= config.position);
        let kept: Vec<Entry> = kept.cloned().collect();
        power_loss(&mut h, n, kept, false);
    }
    h.nodes[0].restore_settled_config(settled);
    h.inbox.clear();
    h.cut.clear();
    for n in 1..=4 {
        cut(&mut h, 5, n);
    }
    h.run_for(4_000 * MS);
    let leader = h.leader().expect("a leader");
    assert!([3, 4].contains(&leader), "{leader}");
    h.propose(leader, 2, 2, b"later");
    h.run_for(200 * MS);
    for n in 1..=4 {
        assert_eq!(h.node(n).log().entry_at(e.position), Some(&e), "node {n}");
        assert!(!h.node(n).amnesic(), "node {n}");
    }
}
