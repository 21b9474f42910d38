//! Long-lived flows (DESIGN.md, "Long-lived flows"): what a plan leaves behind when it
//! completes before every connection of the buckets it moved has ended. Part of
//! [`Membership`].
//!
//! A plan completes (Acquire → Done) once its releasing nodes report no flow left in the
//! buckets they release, or at `release_deadline`: that deadline never ends a connection. The
//! buckets that still hold flows become per-bucket obligations that outlive the plan, kept by
//! every node in its own view and carried through every later plan:
//!
//! - **Held** (on the old owner A): the buckets A released that still hold flows of its own
//!   table. A's data path keeps delivering those flows (the handoff rule: a flow a node served
//!   stays its own) and counts them ([`Snapshot::counted`]); a bucket leaves the held set when
//!   its count is 0, or when A takes its new flows again (a later plan moving it back, from
//!   that plan's acquire phase on). A heartbeat's `releasing_left` says how many
//!   buckets A still releases or holds, the current plan's and earlier plans' together.
//! - **Owed** (on every node, for whichever node owns the bucket): bucket b is owed to A when a
//!   plan moved b away from A and A still had flows left when the plan completed. The owner of
//!   an owed bucket plays [`Role::Acquiring`] for it, not `Owner`: it takes new flows but never
//!   a TCP packet of a flow it does not know (the old owner's; as `Owner` its kernel would
//!   answer with RST), and it keeps what it learned. If b moves again, the obligation moves
//!   with the bucket: it is the bucket's, not the owner's. Every bucket owed to A is released
//!   the moment A says it holds nothing (`releasing_left` 0), dies or is fenced (its flows are
//!   lost: the owner takes their packets and its kernel answers with RST).
//! - **Drains.** A draining node is drained once it owns nothing and holds nothing. Only a
//!   drain has a deadline (`drain --deadline D`, `control.drain_deadline`; none: wait for
//!   the last flow): at the deadline the node *cuts*: it stops serving the flows of the buckets
//!   it released ([`Snapshot::cuts`]) and says it holds nothing; the others forget what they
//!   learned, so that their kernels answer those flows' next packets with RST.
//!
//! What is given up (the heartbeat's one count, `releasing_left`, carries no bucket list, so
//! the wire format stays as it is): a plan whose releasing node still holds buckets of an
//! earlier plan completes at `release_deadline`; a plan that completes with flows left makes
//! every bucket it moved from that node owed (not only those still holding flows), and they
//! are all released together when the node holds nothing: until then their owner leaves a
//! stray TCP packet of an unknown connection unanswered instead of answering with RST. A node that
//! joins while obligations are open does not know them (they are kept by nodes that saw the
//! plan complete); if it later becomes the owner of such a bucket it may answer with RST a
//! flow of the old owner that was idle through its whole learn phase.

use std::collections::BTreeMap;

use super::*;

/// The obligations left by completed plans (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Linger {
    /// This node's held buckets with their flow count (`u32::MAX`: not counted yet).
    held: BTreeMap<u16, u32>,
    /// Per current-plan releasing bucket, the last flow count (plan, bucket → flows).
    counts: Option<(PlanId, BTreeMap<u16, u32>)>,
    /// Owed buckets: bit `id - 1` per earlier owner still serving flows in it.
    owed: BTreeMap<u16, u64>,
    /// When this node's drain cuts its held flows (ns); None: it waits for the last one.
    cut_at: Option<u64>,
    /// This node's drain reached its deadline: it serves no released flow any more.
    cut: bool,
    /// Draining peers whose obligations ended (bit `id - 1`): the data path forgets what it
    /// learned once for each.
    forgot: u64,
    /// Bumped whenever the snapshot's obligations change.
    pub(super) generation: u64,
}

impl Membership {
    /// Flows this node still serves in buckets it released in earlier plans (status and
    /// metrics; counted by the data path).
    pub fn held_flows(&self) -> u64 {
        self.linger
            .held
            .values()
            .map(|&n| u64::from(if n == u32::MAX { 0 } else { n }))
            .sum()
    }

    /// Buckets this node released that still hold its flows, this plan's and earlier plans'.
    pub fn held_buckets(&self) -> u32 {
        let now = self
            .linger
            .counts
            .as_ref()
            .filter(|(id, _)| Some(*id) == self.snapshot.plan())
            .map_or(0, |(_, c)| c.values().filter(|&&n| n > 0).count());
        (self.linger.held.len() + now) as u32
    }

    /// Flows this node still serves in buckets it released, in this plan or earlier ones.
    pub fn released_flows(&self) -> u64 {
        let now: u64 = self
            .linger
            .counts
            .as_ref()
            .filter(|(id, _)| Some(*id) == self.snapshot.plan())
            .map_or(0, |(_, c)| c.values().map(|&n| u64::from(n)).sum());
        now + self.held_flows()
    }

    /// Held buckets, as the heartbeat's `releasing_left` counts them (none once cut).
    pub(super) fn held_count(&self) -> u32 {
        if self.linger.cut {
            0
        } else {
            self.linger.held.len() as u32
        }
    }

    /// Buckets owed to an earlier owner, as this node sees them.
    pub fn owed_buckets(&self) -> u32 {
        self.linger.owed.len() as u32
    }

    /// Whether this node's drain reached its deadline and cut its released flows.
    pub fn cut(&self) -> bool {
        self.linger.cut
    }

    /// Operator: drain, ending the flows of released buckets at `deadline` (absolute ns; None:
    /// wait for the last flow).
    pub fn drain_until(&mut self, deadline: Option<u64>, now: u64, out: &mut Vec<Output>) {
        self.drain(now, out);
        self.linger.cut_at = deadline;
        self.check_cut(now, out);
    }

    /// The operator's drain with the configured deadline (`Config::drain_deadline`).
    pub(super) fn drain_by_operator(&mut self, now: u64, out: &mut Vec<Output>) {
        let at = self.cfg.drain_deadline.map(|d| now.saturating_add(d));
        self.drain_until(at, now, out);
    }

    /// Undrain: a cut drain serves again what it takes from now on.
    pub(super) fn reset_cut(&mut self) {
        self.linger.cut_at = None;
        if self.linger.cut {
            self.linger.cut = false;
            self.linger.generation += 1;
        }
    }

    /// The per-bucket counts of [`Membership::report_flows`]: those of buckets released in
    /// this plan are returned for the plan's done step; held ones are updated here.
    pub(super) fn take_counts(&mut self, flows: &[(Bucket, u32)]) -> Vec<(Bucket, u32)> {
        let me = self.cfg.me;
        let cut = self.linger.cut;
        let mut releasing = Vec::new();
        for &(b, n) in flows {
            let n = if cut { 0 } else { n };
            if matches!(
                self.snapshot.role(b, me),
                crate::cluster::Role::Releasing { .. }
            ) {
                releasing.push((b, n));
            } else if let Some(h) = self.linger.held.get_mut(&b.0) {
                *h = n;
                if n == 0 {
                    // The data path may keep counting it until the next snapshot: no rebuild
                    // for that alone.
                    self.linger.held.remove(&b.0);
                }
            }
        }
        // Counted under an older snapshot (the data path's lags the plan's by a publish, and
        // held buckets are counted in every phase), a report may name none of the buckets this
        // plan releases: it says nothing of them.
        if let (Some(id), false) = (self.snapshot.plan(), releasing.is_empty()) {
            let map = releasing.iter().map(|&(b, n)| (b.0, n)).collect();
            self.linger.counts = Some((id, map));
        }
        releasing
    }

    /// Before the snapshot `next` replaces the current one: a plan whose buckets moved is
    /// over (done, or replaced by a newer plan), and its unfinished moves become obligations.
    pub(super) fn settle(&mut self, next_plan: PlanId, next_phase: Phase) {
        let prev = self.snapshot.clone();
        let Some(id) = prev.plan() else { return };
        if prev.moving_count() == 0 || (id == next_plan && next_phase != Phase::Done) {
            return;
        }
        let me = self.cfg.me;
        let counts = self.linger.counts.take().filter(|(p, _)| *p == id);
        for (b, from, _) in prev.moving() {
            let left = if from == me {
                let n = counts
                    .as_ref()
                    .map_or(u32::MAX, |(_, c)| c.get(&b.0).copied().unwrap_or(0));
                if n > 0 && !self.linger.cut {
                    self.linger.held.insert(b.0, n);
                }
                n > 0
            } else {
                self.peers[from.index()].as_ref().is_some_and(|p| {
                    p.alive && p.hb.is_none_or(|h| h.releasing_left != 0 && !h.fenced)
                })
            };
            if left {
                *self.linger.owed.entry(b.0).or_insert(0) |= bit(from);
            }
        }
        self.linger.generation += 1;
    }

    /// Every tick: obligations end for nodes that hold nothing any more, are dead or fenced;
    /// held buckets this node owns again are its own; a drain past its deadline cuts.
    pub(super) fn review_obligations(&mut self, now: u64, out: &mut Vec<Output>) {
        self.check_cut(now, out);
        let mut done = 0u64;
        let mut gone_draining = 0u64;
        for i in 0..64usize {
            let id = node_of(i);
            let ended = if id == self.cfg.me {
                self.linger.held.is_empty() && !self.snapshot.is_releasing(id)
            } else {
                match &self.peers[i] {
                    Some(p) if p.alive => p.hb.is_some_and(|h| {
                        let over = h.releasing_left == 0 || h.fenced;
                        if over && h.draining {
                            gone_draining |= 1 << i;
                        }
                        over
                    }),
                    _ => true,
                }
            };
            if ended {
                done |= 1 << i;
            }
        }
        let before = self.linger.owed.len();
        let owed_to = self.linger.owed.values().fold(0, |a, &b| a | b);
        let mut changed = false;
        self.linger.owed.retain(|_, bits| {
            let kept = *bits & !done;
            changed |= kept != *bits;
            *bits = kept;
            kept != 0
        });
        let snapshot = &self.snapshot;
        let me = self.cfg.me;
        // A held bucket moving back to this node stays held until this node takes its new
        // flows (acquire): until then its current owner must keep leaving this node's flows
        // alone, which it does only while this node says it holds something.
        self.linger
            .held
            .retain(|&b, _| snapshot.new_flow_owner(Bucket(b)) != Some(me));
        // A draining peer whose obligations ended (its flows did, or its drain cut them): what
        // was learned of its flows is forgotten once, until it undrains.
        let newly = gone_draining & owed_to & !self.linger.forgot;
        let undrained = self.linger.forgot & !self.draining_peers();
        self.linger.forgot = (self.linger.forgot | newly) & !undrained;
        // A new snapshot only when what the packet cores decide by changes (a bucket no longer
        // owed, a node forgotten); held buckets that emptied are dropped from the next one.
        if changed || before != self.linger.owed.len() || newly != 0 || undrained != 0 {
            self.linger.generation += 1;
        }
        self.refresh(now, out);
        self.check_drained(out);
    }

    fn draining_peers(&self) -> u64 {
        let mut bits = 0;
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref()
                .is_some_and(|p| p.alive && p.hb.is_some_and(|h| h.draining))
            {
                bits |= 1 << i;
            }
        }
        bits
    }

    fn check_cut(&mut self, now: u64, out: &mut Vec<Output>) {
        let due = self.linger.cut_at.is_some_and(|t| now >= t);
        if self.draining && due && !self.linger.cut {
            self.linger.cut = true;
            self.linger.held.clear();
            if let Some((_, c)) = self.linger.counts.as_mut() {
                c.values_mut().for_each(|n| *n = 0);
            }
            self.linger.generation += 1;
            out.push(Output::Event(Event::DrainCut));
            self.refresh(now, out);
            self.send_heartbeat(now, out);
        }
    }

    /// A draining node that owns nothing once its plan is done is drained when it holds no
    /// flow either.
    pub(super) fn check_drained(&mut self, out: &mut Vec<Output>) {
        let me = self.cfg.me;
        let owns_nothing = self.snapshot.phase() == Phase::Done
            && self.cur.is_some()
            && !self.eff_members().iter().any(|m| m.id == me);
        let holds_nothing = self.linger.held.is_empty() || self.linger.cut;
        if self.draining && owns_nothing && holds_nothing && !self.drained {
            self.drained = true;
            out.push(Output::Event(Event::Drained));
        }
    }

    /// The snapshot's obligations: owed buckets (not to this node), held buckets, cut nodes.
    pub(super) fn obligations(&self, snap: Snapshot) -> Snapshot {
        let owed = if self.linger.owed.is_empty() {
            None
        } else {
            let mut a: Box<[u8; BUCKETS]> = vec![0u8; BUCKETS]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("exactly BUCKETS bytes"));
            for (&b, &bits) in &self.linger.owed {
                a[usize::from(b)] = bits.trailing_zeros() as u8 + 1;
            }
            Some(a)
        };
        let held = if self.linger.cut {
            Vec::new()
        } else {
            self.linger.held.keys().map(|&b| Bucket(b)).collect()
        };
        // This node's own flows end at its drain's deadline; and while its peers stand in for
        // it after an outage of its data path, its flows are theirs: each is forgotten when
        // seen (its packet, which the peers deliver, is not delivered again here), and one
        // that stays quiet until the plan that takes it back releases buckets to it is still
        // its own then.
        let mine = self.linger.cut || self.stood_in;
        let cut = self.linger.forgot | if mine { bit(self.cfg.me) } else { 0 };
        snap.with_obligations(owed, held, cut)
    }
}
