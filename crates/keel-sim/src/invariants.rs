//! Safety invariants checked after every step of a simulation: at most one
//! leader per term; log matching (same position and term ⇒ same prefix);
//! a newly elected leader holds every committed entry; committed entries
//! never change or disappear; commit never moves back (a snapshot install
//! included); a leader advances its commit only to an entry of its own
//! term; every node applies the same entries at the same positions,
//! contiguously, once, and with non-decreasing leader-stamped time; term
//! and vote never regress; no leader answers a read under its lease once a
//! leader of a later term has been elected; a node is told it was removed
//! (`Body::Removed`), and acts on it, only if the committed log holds a
//! configuration excluding it in force from that position, and (when it
//! acts) none committed after it includes it again; ids are never reused:
//! no configuration a node holds (in its log, committed or not, or its
//! snapshot) includes an id that a committed configuration earlier in that
//! node's log removed.
//!
//! Each node's log is mirrored as a chain of hashes (hash of the previous
//! link and the entry), fed by the same actions the runtime executes, so a
//! prefix comparison is one integer comparison.

use keel_core::{
    Entry, EntryKind, HardState, Membership, Nanos, Node, NodeId, Position, Recovered, Snapshot,
    Term,
};
use std::collections::{btree_map, BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Link {
    start: Position,
    end: Position,
    term: Term,
    chain: u64,
    /// The entry's configuration, if it is a membership entry.
    membership: Option<Arc<Membership>>,
}

#[derive(Default)]
struct Shadow {
    base_pos: Position,
    base_term: Term,
    base_chain: u64,
    links: VecDeque<Link>,
}

impl Shadow {
    fn last(&self) -> (Position, Term, u64) {
        self.links
            .back()
            .map_or((self.base_pos, self.base_term, self.base_chain), |l| {
                (l.end, l.term, l.chain)
            })
    }
    fn chain_at(&self, pos: Position) -> Option<u64> {
        if pos == self.base_pos {
            return Some(self.base_chain);
        }
        let i = self.links.binary_search_by_key(&pos, |l| l.end).ok()?;
        Some(self.links[i].chain)
    }
    fn term_at(&self, pos: Position) -> Option<Term> {
        if pos == self.base_pos {
            return Some(self.base_term);
        }
        let i = self.links.binary_search_by_key(&pos, |l| l.end).ok()?;
        Some(self.links[i].term)
    }
}

fn link_hash(prev: u64, e: &Entry) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prev.hash(&mut h);
    e.term.hash(&mut h);
    e.position.hash(&mut h);
    e.timestamp.hash(&mut h);
    match &e.kind {
        EntryKind::TermStart => 0u8.hash(&mut h),
        EntryKind::Command { client, seq } => (1u8, client, seq).hash(&mut h),
        EntryKind::Timer { id, deadline } => (2u8, id, deadline).hash(&mut h),
        EntryKind::Membership(m) => (3u8, &**m).hash(&mut h),
        EntryKind::SessionClose { client } => (4u8, client).hash(&mut h),
    }
    e.data.hash(&mut h);
    h.finish()
}

/// What the invariants read of a node after each step.
#[derive(Clone, Copy, Debug)]
pub struct NodeView {
    pub id: NodeId,
    /// Counts the node's restarts (commit may move back across one).
    pub incarnation: u64,
    pub append_position: Position,
    pub last_term: Term,
    pub commit: Position,
    /// The node's term if it is the leader.
    pub leading: Option<Term>,
}

#[derive(Default)]
pub struct Invariants {
    shadows: HashMap<NodeId, Shadow>,
    /// (end position, term) → chain: log matching across all nodes, ever.
    boundaries: HashMap<(Position, Term), u64>,
    /// Every committed boundary → chain.
    committed: BTreeMap<Position, u64>,
    /// Every committed boundary → the term it was committed in: the term
    /// of the leader seen committing it (the first node seen with it
    /// committed; the newest leader's term if that was not a leader).
    committed_in: BTreeMap<Position, Term>,
    leaders: HashMap<Term, NodeId>,
    /// The latest term any node was elected leader of, and that node.
    newest_leader: (Term, NodeId),
    /// A lease read after a later leader was elected has been reported
    /// (once per run, so the run goes on to its linearizability check).
    stale_lease_reported: bool,
    /// End position → chain of every applied entry, across nodes.
    applied: HashMap<Position, u64>,
    last_commit: HashMap<NodeId, (u64, Position)>,
    last_applied_ts: HashMap<NodeId, Nanos>,
    /// The cluster's first configuration (in force from position 0).
    initial: Membership,
    /// Every committed membership entry by start position: its end, the
    /// configuration, and when (true time) it was first seen committed.
    committed_configs: BTreeMap<Position, (Position, Arc<Membership>, Nanos)>,
    /// Every id a committed configuration removed (the committed
    /// configuration before it, or the initial one, includes it; it does
    /// not), with the end of the first such configuration's entry: worked
    /// out from the configurations themselves, not from what the core
    /// records in `Membership::removed`.
    removed_ids: BTreeMap<NodeId, Position>,
    /// (node, id) pairs reported for holding a removed id (once each).
    reuse_reported: HashSet<(NodeId, NodeId)>,
    /// True time, for `committed_configs` (set by the simulator).
    pub now: Nanos,
}

impl Invariants {
    pub fn new() -> Self {
        let mut inv = Invariants::default();
        inv.committed.insert(0, 0);
        inv
    }

    /// The configuration the cluster started with.
    pub fn set_initial_membership(&mut self, m: Membership) {
        self.initial = m;
    }

    /// The committed configuration in force from `position` on (the
    /// latest committed membership entry starting before it, or the
    /// initial one), or `None` if the log is not committed up to there.
    fn committed_config_at(&self, position: Position) -> Option<&Membership> {
        if position > self.committed_upto() {
            return None;
        }
        Some(
            self.committed_configs
                .range(..position)
                .next_back()
                .map_or(&self.initial, |(_, (_, m, _))| &**m),
        )
    }

    /// Where the first committed configuration that removed `id` ends, if
    /// one did.
    pub fn removed_by(&self, id: NodeId) -> Option<Position> {
        self.removed_ids.get(&id).copied()
    }

    /// Whether a configuration first seen committed at or after `since`
    /// (true time) includes `id`.
    pub fn committed_member_since(&self, id: NodeId, since: Nanos) -> bool {
        self.committed_configs
            .values()
            .any(|(_, m, at)| *at >= since && m.contains(id))
    }

    /// Whether `shadow`'s log holds the committed entry ending at `end`
    /// (a snapshot past it counts: what a snapshot covers is committed).
    fn holds_committed(&self, shadow: &Shadow, end: Position) -> bool {
        end < shadow.base_pos
            || (shadow.chain_at(end).is_some()
                && shadow.chain_at(end) == self.committed.get(&end).copied())
    }

    /// Node `id` holds configuration `m` at `at` (an entry starting there,
    /// or a snapshot there) in a log that holds the committed log up to
    /// `at`'s removals: none of them may be included again.
    fn check_held_config(
        &mut self,
        id: NodeId,
        at: Position,
        m: &Membership,
        what: &str,
        v: &mut Vec<String>,
    ) {
        for n in m.voters.iter().chain(m.learners.iter()) {
            let Some(&end) = self.removed_ids.get(n) else {
                continue;
            };
            let held = end <= at
                && self
                    .shadows
                    .get(&id)
                    .is_some_and(|s| self.holds_committed(s, end));
            if held && self.reuse_reported.insert((id, *n)) {
                v.push(format!(
                    "removed id reused: node {id} holds {what} at {at} ({m:?}) that includes \
                     node {n}, which the committed configuration ending at {end}, earlier in \
                     its log, removed"
                ));
            }
        }
    }

    /// A configuration ending at `end` just committed and removed `n`: no
    /// configuration any node holds after it, in a log that holds it, may
    /// include `n`.
    fn check_removal_committed(&mut self, n: NodeId, end: Position, v: &mut Vec<String>) {
        let mut found = Vec::new();
        for (&id, shadow) in &self.shadows {
            if !self.holds_committed(shadow, end) {
                continue;
            }
            for l in shadow.links.iter().filter(|l| l.start >= end) {
                if let Some(m) = l.membership.as_ref().filter(|m| m.contains(n)) {
                    found.push((id, l.start, m.clone()));
                }
            }
        }
        found.sort_by_key(|f| (f.0, f.1));
        for (id, at, m) in found {
            self.check_held_config(id, at, &m, "a configuration", v);
        }
    }

    /// What `Body::Removed { position }` from `from` to `to` claims: the
    /// committed configuration in force from `position` excludes `to`.
    pub fn removal_notice_sent(
        &self,
        from: NodeId,
        to: NodeId,
        position: Position,
        v: &mut Vec<String>,
    ) {
        match self.committed_config_at(position) {
            Some(m) if !m.contains(to) && !m.voters.is_empty() => {}
            m => v.push(format!(
                "removal: node {from} told node {to} it was removed by the configuration in \
                 force from {position}, which is {m:?} in the committed log (committed up to {})",
                self.committed_upto()
            )),
        }
    }

    /// Node `id` acted on a removal notice from `by` (itself, for a leader
    /// that committed its own removal) about the configuration in force
    /// from `position`: the claim holds, and no configuration committed
    /// after it includes `id` again (it was not added back meanwhile).
    pub fn acted_on_removal(
        &self,
        id: NodeId,
        by: NodeId,
        position: Position,
        v: &mut Vec<String>,
    ) {
        self.removal_notice_sent(by, id, position, v);
        let again = self
            .committed_configs
            .range(position..)
            .find(|(_, (_, m, _))| m.contains(id));
        if let Some((start, (_, m, at))) = again {
            v.push(format!(
                "removal: node {id} stopped on node {by}'s word that the configuration from \
                 {position} excludes it, but {m:?} at {start}, committed at {} ms, includes it",
                at / 1_000_000,
            ));
        }
    }

    fn shadow(&mut self, id: NodeId) -> &mut Shadow {
        self.shadows.entry(id).or_default()
    }

    /// Whether the entry ending at `end` in `term` is one a node was seen
    /// committing.
    pub fn is_committed(&self, end: Position, term: Term) -> bool {
        self.boundaries
            .get(&(end, term))
            .is_some_and(|chain| self.committed.get(&end) == Some(chain))
    }

    /// The end of the longest prefix of the log any node has committed.
    pub fn committed_upto(&self) -> Position {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// The latest term any node was elected leader of (0: none yet).
    pub fn newest_leader_term(&self) -> Term {
        self.newest_leader.0
    }

    /// The node elected leader of `term`, if any.
    pub fn leader_of(&self, term: Term) -> Option<NodeId> {
        self.leaders.get(&term).copied()
    }

    pub fn leader_elected(&mut self, id: NodeId, term: Term, v: &mut Vec<String>) {
        if let Some(&other) = self.leaders.get(&term) {
            if other != id {
                v.push(format!(
                    "election safety: nodes {other} and {id} both lead term {term}"
                ));
            }
        }
        // Leader completeness: whatever was committed in an earlier term is
        // in the new leader's log (unless its snapshot covers it). Not what
        // a later term committed: a candidate whose votes were granted
        // before a later leader was elected may learn it won only after
        // that leader committed more (a paused candidate reading its
        // backlog), and steps down at once.
        let g = self
            .committed_in
            .iter()
            .rev()
            .find(|&(_, &t)| t < term)
            .map_or(0, |(&p, _)| p);
        if let Some(shadow) = self.shadows.get(&id) {
            if g >= shadow.base_pos && shadow.chain_at(g) != self.committed.get(&g).copied() {
                v.push(format!(
                    "leader completeness: node {id} was elected leader of term {term} \
                     without the committed log up to {g}"
                ));
            }
        }
        self.leaders.insert(term, id);
        self.newest_leader = self.newest_leader.max((term, id));
    }

    /// `id`, leader of `term`, answered a read under its lease. The voters
    /// that echoed its heartbeat hold their votes at least until the lease
    /// ends, and any election needs one of them: no later leader can exist.
    pub fn lease_read(&mut self, id: NodeId, term: Term, v: &mut Vec<String>) {
        let (newest, by) = self.newest_leader;
        if newest > term && !self.stale_lease_reported {
            self.stale_lease_reported = true;
            v.push(format!(
                "lease safety: node {id} answered a read under its lease of term {term} \
                 after node {by} was elected leader of term {newest}"
            ));
        }
    }

    pub fn persist_hard_state(
        &mut self,
        id: NodeId,
        old: &HardState,
        new: &HardState,
        v: &mut Vec<String>,
    ) {
        if new.term < old.term {
            v.push(format!(
                "node {id}: term went back from {} to {}",
                old.term, new.term
            ));
        }
        if new.term == old.term && old.voted_for.is_some() && new.voted_for != old.voted_for {
            v.push(format!(
                "node {id}: changed its vote in term {} from {:?} to {:?}",
                new.term, old.voted_for, new.voted_for
            ));
        }
    }

    pub fn append(&mut self, id: NodeId, entries: &[Entry], _now: Nanos, v: &mut Vec<String>) {
        for e in entries {
            let shadow = self.shadow(id);
            let (last, _, prev) = shadow.last();
            if e.position != last {
                v.push(format!(
                    "node {id}: appended an entry at {} but its log ends at {last}",
                    e.position
                ));
                return;
            }
            let chain = link_hash(prev, e);
            let membership = match &e.kind {
                EntryKind::Membership(m) => Some(m.clone()),
                _ => None,
            };
            shadow.links.push_back(Link {
                start: e.position,
                end: e.end(),
                term: e.term,
                chain,
                membership: membership.clone(),
            });
            if let Some(m) = membership {
                self.check_held_config(id, e.position, &m, "a configuration", v);
            }
            match self.boundaries.get(&(e.end(), e.term)) {
                Some(&c) if c != chain => v.push(format!(
                    "log matching: node {id} holds an entry ending at {} in term {} whose log differs from another node's",
                    e.end(),
                    e.term
                )),
                Some(_) => {}
                None => {
                    self.boundaries.insert((e.end(), e.term), chain);
                }
            }
        }
    }

    pub fn truncate(&mut self, id: NodeId, from: Position, v: &mut Vec<String>) {
        if let Some(&(_, c)) = self.last_commit.get(&id) {
            if from < c {
                v.push(format!(
                    "node {id}: truncated its log at {from}, below its commit position {c}"
                ));
            }
        }
        let shadow = self.shadow(id);
        while shadow.links.back().is_some_and(|l| l.start >= from) {
            shadow.links.pop_back();
        }
    }

    pub fn compact(&mut self, id: NodeId, upto: Position) {
        let shadow = self.shadow(id);
        while let Some(l) = shadow.links.front().cloned() {
            if l.end > upto {
                break;
            }
            shadow.links.pop_front();
            shadow.base_pos = l.end;
            shadow.base_term = l.term;
            shadow.base_chain = l.chain;
        }
    }

    pub fn install_snapshot(&mut self, id: NodeId, s: &Snapshot, v: &mut Vec<String>) {
        let pos = s.meta.position;
        if let Some(&(_, c)) = self.last_commit.get(&id) {
            if pos < c {
                v.push(format!(
                    "node {id}: installed a snapshot at {pos} over its log committed up to {c} \
                     (commit moved back)"
                ));
            }
        }
        let Some(&chain) = self.committed.get(&pos) else {
            v.push(format!(
                "node {id}: installed a snapshot at {pos}, which was never committed"
            ));
            return;
        };
        let shadow = self.shadow(id);
        if shadow.term_at(pos) == Some(s.meta.term) {
            if shadow.chain_at(pos) != Some(chain) {
                v.push(format!(
                    "node {id}: its log differs from the committed log at {pos}"
                ));
            }
            while shadow.links.front().is_some_and(|l| l.end <= pos) {
                shadow.links.pop_front();
            }
        } else {
            shadow.links.clear();
        }
        shadow.base_pos = pos;
        shadow.base_term = s.meta.term;
        shadow.base_chain = chain;
        let inc = self.last_commit.get(&id).map_or(0, |x| x.0);
        self.last_commit.insert(id, (inc, pos));
        self.check_held_config(id, pos, &s.meta.membership, "a snapshot", v);
    }

    pub fn restarted(&mut self, id: NodeId, r: &Recovered, v: &mut Vec<String>) {
        let (pos, term) = r
            .snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.meta.position, s.meta.term));
        let chain = if pos == 0 {
            0
        } else {
            match self.committed.get(&pos) {
                Some(&c) => c,
                None => {
                    v.push(format!(
                        "node {id}: restarted from a snapshot at {pos} that was never committed"
                    ));
                    0
                }
            }
        };
        self.shadows.insert(
            id,
            Shadow {
                base_pos: pos,
                base_term: term,
                base_chain: chain,
                links: VecDeque::new(),
            },
        );
        self.last_commit.remove(&id);
        if let Some(s) = &r.snapshot {
            self.check_held_config(id, pos, &s.meta.membership, "a snapshot", v);
        }
        self.append(id, &r.entries, 0, v);
    }

    pub fn restored(&mut self, id: NodeId, timestamp: Nanos) {
        self.last_applied_ts.insert(id, timestamp);
    }

    pub fn apply(
        &mut self,
        id: NodeId,
        host_applied: Position,
        entries: &[Entry],
        v: &mut Vec<String>,
    ) {
        let mut expected = host_applied;
        for e in entries {
            if e.position < host_applied {
                // The host would skip it, but the core's contract is each
                // committed entry once: a core that re-sends is confused
                // about what it applied.
                v.push(format!(
                    "node {id}: applied the entry at {} again (it had applied up to {host_applied})",
                    e.position
                ));
                return;
            }
            if e.position != expected {
                v.push(format!(
                    "node {id}: applied an entry at {} but had applied up to {expected}",
                    e.position
                ));
                return;
            }
            expected = e.end();
            let Some(chain) = self.shadows.get(&id).and_then(|s| s.chain_at(e.end())) else {
                v.push(format!(
                    "node {id}: applied an entry at {} its log does not hold",
                    e.position
                ));
                return;
            };
            match self.applied.get(&e.end()) {
                Some(&c) if c != chain => v.push(format!(
                    "state machine safety: node {id} applied a different entry ending at {} than another node",
                    e.end()
                )),
                Some(_) => {}
                None => {
                    self.applied.insert(e.end(), chain);
                }
            }
            let ts = self.last_applied_ts.entry(id).or_insert(0);
            if e.timestamp < *ts {
                v.push(format!(
                    "node {id}: log time went back from {} to {} at position {}",
                    *ts, e.timestamp, e.position
                ));
            }
            *ts = e.timestamp;
        }
    }

    pub fn after_step(&mut self, core: &Node, inc: u64, v: &mut Vec<String>) {
        let view = NodeView {
            id: core.id(),
            incarnation: inc,
            append_position: core.append_position(),
            last_term: core.log().last_term(),
            commit: core.commit_position(),
            leading: core.is_leader().then(|| core.term()),
        };
        self.check_node(&view, v);
        // The configuration in force is the latest in the log: if the log
        // holds a committed removal, it is at or after it.
        if !self.removed_ids.is_empty() {
            let at = core.append_position();
            self.check_held_config(view.id, at, core.membership(), "its configuration", v);
        }
    }

    /// `after_step` on what it reads of a core.
    pub fn check_node(&mut self, view: &NodeView, v: &mut Vec<String>) {
        let (id, inc) = (view.id, view.incarnation);
        let shadow = self.shadow(id);
        let (last, last_term, _) = shadow.last();
        if last != view.append_position || last_term != view.last_term {
            v.push(format!(
                "node {id}: its log ({}, term {}) differs from what its actions described ({last}, term {last_term})",
                view.append_position,
                view.last_term
            ));
            return;
        }
        let c = view.commit;
        if c > view.append_position {
            v.push(format!("node {id}: commit {c} beyond its log end {last}"));
        }
        let prev = self.last_commit.get(&id).copied();
        if let Some((pinc, pc)) = prev {
            if pinc == inc && c < pc {
                v.push(format!("node {id}: commit moved back from {pc} to {c}"));
            }
            if pinc == inc && c == pc {
                return;
            }
            // A leader counts replicas only of entries of its own term
            // (Raft §5.4.2): an older entry stored on a majority can still
            // be overwritten.
            let term_c = self.shadows[&id].term_at(c);
            if let Some(term) = view.leading.filter(|_| pinc == inc && c > pc) {
                if term_c != Some(term) {
                    v.push(format!(
                        "node {id}: as leader of term {term} advanced its commit to {c}, an entry of term {term_c:?}"
                    ));
                }
            }
        }
        self.last_commit.insert(id, (inc, c));
        let shadow = &self.shadows[&id];
        let Some(chain_c) = shadow.chain_at(c) else {
            if c >= shadow.base_pos {
                v.push(format!(
                    "node {id}: commit position {c} is not an entry boundary of its log"
                ));
            }
            return;
        };
        let g = self.committed_upto();
        if c <= g {
            match self.committed.get(&c) {
                Some(&k) if k == chain_c => {}
                _ => v.push(format!(
                    "committed entries changed: node {id} committed up to {c}, which differs from the committed log"
                )),
            }
        } else {
            if g >= shadow.base_pos {
                let ok = shadow.chain_at(g).is_some()
                    && shadow.chain_at(g) == self.committed.get(&g).copied();
                if !ok {
                    v.push(format!(
                        "committed entries lost: node {id} commits up to {c} but its log differs from the committed log at {g}"
                    ));
                    return;
                }
            }
            let new: Vec<&Link> = shadow
                .links
                .iter()
                .filter(|l| l.end > g && l.end <= c)
                .collect();
            let now = self.now;
            let term = view.leading.unwrap_or(self.newest_leader.0);
            let mut removals = Vec::new();
            for l in new {
                self.committed.insert(l.end, l.chain);
                self.committed_in.insert(l.end, term);
                if let Some(m) = &l.membership {
                    let before = self
                        .committed_configs
                        .range(..l.start)
                        .next_back()
                        .map_or(&self.initial, |(_, (_, m, _))| &**m);
                    for &n in before.voters.iter().chain(before.learners.iter()) {
                        if !m.contains(n) && !self.removed_ids.contains_key(&n) {
                            removals.push((n, l.end));
                        }
                    }
                    self.committed_configs
                        .insert(l.start, (l.end, m.clone(), now));
                }
            }
            for (n, end) in removals {
                if let btree_map::Entry::Vacant(e) = self.removed_ids.entry(n) {
                    e.insert(end);
                    self.check_removal_committed(n, end, v);
                }
            }
        }
    }

    pub fn final_check(&mut self, leader: &Node, v: &mut Vec<String>) {
        let id = leader.id();
        let g = self.committed_upto();
        let Some(shadow) = self.shadows.get(&id) else {
            return;
        };
        if g < shadow.base_pos {
            return;
        }
        if shadow.chain_at(g) != self.committed.get(&g).copied() {
            v.push(format!(
                "committed entries lost: the final leader {id} does not hold the committed log up to {g}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use keel_core::{Membership, SnapshotMeta};

    /// A log of `terms.len()` entries, the i-th of term `terms[i]`.
    fn log(terms: &[Term]) -> Vec<Entry> {
        let mut pos = 0;
        terms
            .iter()
            .map(|&term| {
                let e = Entry {
                    term,
                    position: pos,
                    timestamp: pos,
                    kind: EntryKind::TermStart,
                    data: Bytes::from_static(b"x"),
                };
                pos = e.end();
                e
            })
            .collect()
    }

    fn view(id: NodeId, entries: &[Entry], commit: Position, leading: Option<Term>) -> NodeView {
        NodeView {
            id,
            incarnation: 0,
            append_position: entries.last().map_or(0, Entry::end),
            last_term: entries.last().map_or(0, |e| e.term),
            commit,
            leading,
        }
    }

    fn check(inv: &mut Invariants, view: NodeView) -> Vec<String> {
        let mut v = Vec::new();
        inv.check_node(&view, &mut v);
        v
    }

    #[test]
    fn a_consistent_history_passes() {
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1, 2]);
        inv.leader_elected(1, 1, &mut v);
        for id in [1, 2] {
            inv.append(id, &es[..2], 0, &mut v);
        }
        assert!(check(&mut inv, view(1, &es[..2], es[1].end(), Some(1))).is_empty());
        inv.leader_elected(2, 2, &mut v);
        inv.append(2, &es[2..], 0, &mut v);
        assert!(check(&mut inv, view(2, &es, es[2].end(), Some(2))).is_empty());
        inv.apply(1, 0, &es[..1], &mut v);
        inv.apply(1, es[0].end(), &es[1..2], &mut v);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_entry_applied_twice_is_caught() {
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1]);
        inv.append(1, &es, 0, &mut v);
        inv.apply(1, 0, &es[..1], &mut v);
        assert!(v.is_empty(), "{v:?}");
        // The host has applied the first entry; the core sends it again.
        inv.apply(1, es[0].end(), &es, &mut v);
        assert!(v.iter().any(|m| m.contains("again")), "{v:?}");
    }

    /// A candidate of term 2 whose votes were granted before node 1 was
    /// elected in term 3 learns it won only after node 1 committed
    /// entries of term 3 (it was paused): it must hold what terms 1 and 2
    /// committed, not what term 3 did.
    #[test]
    fn a_stale_candidate_need_not_hold_what_a_later_term_committed() {
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1, 3, 3]);
        inv.leader_elected(1, 1, &mut v);
        for id in [1, 2, 3] {
            inv.append(id, &es[..2], 0, &mut v);
        }
        assert!(check(&mut inv, view(1, &es[..2], es[0].end(), Some(1))).is_empty());
        inv.leader_elected(1, 3, &mut v);
        inv.append(1, &es[2..], 0, &mut v);
        inv.append(3, &es[2..], 0, &mut v);
        assert!(check(&mut inv, view(1, &es, es[3].end(), Some(3))).is_empty());
        assert!(v.is_empty(), "{v:?}");
        // Node 2 holds what term 1 committed: it may lead term 2.
        inv.leader_elected(2, 2, &mut v);
        assert!(v.is_empty(), "{v:?}");
        // Node 4 holds another first entry: it may not.
        inv.append(4, &log(&[2]), 0, &mut v);
        inv.leader_elected(4, 2, &mut v);
        assert!(
            v.iter().any(|m| m.starts_with("leader completeness")),
            "{v:?}"
        );
    }

    #[test]
    fn a_leader_elected_without_committed_entries_is_caught() {
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1]);
        inv.leader_elected(1, 1, &mut v);
        for id in [1, 2] {
            inv.append(id, &es, 0, &mut v);
        }
        assert!(check(&mut inv, view(1, &es, es[1].end(), Some(1))).is_empty());
        // Node 3 holds only the first entry: it must not lead.
        inv.append(3, &es[..1], 0, &mut v);
        assert!(v.is_empty(), "{v:?}");
        inv.leader_elected(3, 2, &mut v);
        assert!(
            v.iter().any(|m| m.starts_with("leader completeness")),
            "{v:?}"
        );
    }

    #[test]
    fn a_leader_committing_an_entry_of_an_earlier_term_is_caught() {
        // Raft's figure 8: node 1, leader of term 3, counts replicas of its
        // term-1 entry and commits it.
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1, 3]);
        inv.append(1, &es[..2], 0, &mut v);
        assert!(check(&mut inv, view(1, &es[..2], 0, None)).is_empty());
        inv.leader_elected(1, 3, &mut v);
        assert!(check(&mut inv, view(1, &es[..2], 0, Some(3))).is_empty());
        let v = check(&mut inv, view(1, &es[..2], es[1].end(), Some(3)));
        assert!(v.iter().any(|m| m.contains("an entry of term")), "{v:?}");
        // Committing through an entry of its own term is the rule.
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        inv.append(1, &es, 0, &mut v);
        assert!(check(&mut inv, view(1, &es, 0, Some(3))).is_empty());
        assert!(check(&mut inv, view(1, &es, es[2].end(), Some(3))).is_empty());
    }

    #[test]
    fn a_snapshot_installed_below_the_commit_position_is_caught() {
        let mut inv = Invariants::new();
        let mut v = Vec::new();
        let es = log(&[1, 1, 1]);
        inv.append(1, &es, 0, &mut v);
        inv.append(2, &es, 0, &mut v);
        assert!(check(&mut inv, view(1, &es, es[2].end(), Some(1))).is_empty());
        assert!(check(&mut inv, view(2, &es, es[2].end(), None)).is_empty());
        let snapshot = |position| Snapshot {
            meta: SnapshotMeta {
                position,
                term: 1,
                timestamp: 0,
                membership: Membership::new([1, 2, 3]),
            },
            data: Bytes::new(),
        };
        // A (late, duplicated) snapshot of an older, committed position.
        inv.install_snapshot(2, &snapshot(es[0].end()), &mut v);
        assert!(v.iter().any(|m| m.contains("commit moved back")), "{v:?}");
        // One past the commit position is fine.
        let mut v = Vec::new();
        inv.append(3, &es[..1], 0, &mut v);
        assert!(check(&mut inv, view(3, &es[..1], es[0].end(), None)).is_empty());
        inv.install_snapshot(3, &snapshot(es[2].end()), &mut v);
        assert!(v.is_empty(), "{v:?}");
    }

    /// Entries after `from`: a term start of `term`, then one
    /// configuration of `term` per element of `configs`.
    fn configs(from: Position, term: Term, configs: &[Membership]) -> Vec<Entry> {
        let mut pos = from;
        let mut kinds = vec![EntryKind::TermStart];
        kinds.extend(
            configs
                .iter()
                .map(|m| EntryKind::Membership(Arc::new(m.clone()))),
        );
        kinds
            .into_iter()
            .map(|kind| {
                let e = Entry {
                    term,
                    position: pos,
                    timestamp: pos,
                    kind,
                    data: Bytes::new(),
                };
                pos = e.end();
                e
            })
            .collect()
    }

    fn with_learner(m: &Membership, n: NodeId) -> Membership {
        let mut m = m.clone();
        m.learners.insert(n);
        m
    }

    /// Ids are never reused: once a committed configuration removed node
    /// 3, no configuration after it in a log that holds it may include
    /// node 3 (whether the log got it before or after the removal
    /// committed, in an entry or a snapshot); a log that diverged before
    /// the removal (a deposed leader's) may.
    #[test]
    fn a_removed_id_in_a_later_configuration_is_caught() {
        let mut inv = Invariants::new();
        inv.set_initial_membership(Membership::new([1, 2, 3]));
        let mut v = Vec::new();
        // Term 1: node 3 removed (its removal is the second entry), then
        // added back as a learner.
        let removed = Membership::new([1, 2]);
        let es = configs(0, 1, &[removed.clone(), with_learner(&removed, 3)]);
        let removal_end = es[1].end();
        inv.leader_elected(1, 1, &mut v);
        // Node 2 gets all three entries before the removal commits: no
        // finding yet.
        inv.append(2, &es, 0, &mut v);
        inv.append(1, &es[..2], 0, &mut v);
        assert!(v.is_empty(), "{v:?}");
        // Node 4 diverged before the removal (term 2 at the same place)
        // and still includes node 3: not a reuse.
        let other = configs(0, 2, &[with_learner(&Membership::new([1, 2, 3]), 4)]);
        inv.append(4, &other, 0, &mut v);
        assert!(v.is_empty(), "{v:?}");
        // The removal commits: node 2's later configuration is found.
        v = check(&mut inv, view(1, &es[..2], removal_end, Some(1)));
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with("removed id reused: node 2 holds a configuration at"),
            "{v:?}"
        );
        assert_eq!(inv.removed_by(3), Some(removal_end));
        assert_eq!(inv.removed_by(1), None);
        // Node 1 appends it after: found at once.
        v.clear();
        inv.append(1, &es[2..], 0, &mut v);
        assert!(
            v.len() == 1 && v[0].starts_with("removed id reused: node 1 holds"),
            "{v:?}"
        );
        // A snapshot past the removal that includes node 3.
        v.clear();
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                position: removal_end,
                term: 1,
                timestamp: 0,
                membership: Membership::new([1, 2, 3]),
            },
            data: Bytes::new(),
        };
        inv.install_snapshot(5, &snapshot, &mut v);
        assert!(
            v.len() == 1 && v[0].starts_with("removed id reused: node 5 holds a snapshot at"),
            "{v:?}"
        );
        // Node 4, whose log does not hold the removal, is still fine.
        v.clear();
        inv.append(4, &configs(other.last().unwrap().end(), 2, &[]), 0, &mut v);
        assert!(v.is_empty(), "{v:?}");
    }
}
