//! The immutable ownership snapshot that packet cores consume between bursts.
//!
//! A [`Snapshot`] is built by [`super::Membership`] and published as `Arc<Snapshot>`; a core
//! swaps its pointer between bursts and then asks [`Snapshot::role`] per frame. It never
//! changes after it is built, and its accessors never allocate or lock.
//!
//! Storage: two 64 KiB arrays of node ids (0 = nobody): `owners[b]`, the node that owns the
//! bucket now (for a moving bucket: the old owner, A) and, while a plan is in progress,
//! `targets[b]`, the owner the bucket moves to (B). A bucket moves iff `owners[b] !=
//! targets[b]`; one phase applies to every moving bucket of the snapshot.
//!
//! Long-lived flows (DESIGN.md, "Long-lived flows"): a bucket whose earlier owner still serves
//! flows after its plan completed is *owed* to that node (`owed[b]`, 0 = nobody): its owner
//! plays [`Role::Acquiring`] for it rather than [`Role::Owner`] (it takes new flows, never a
//! TCP packet of a flow it does not know, which is the old owner's), and the old owner counts
//! its flows in the buckets it released ([`Snapshot::counted`]). A node whose drain reached its
//! deadline serves none of those flows any more ([`Snapshot::cut`]).

use std::fmt;

use crate::cluster::{Bucket, NodeId, BUCKETS};

use super::message::{Phase, PlanId};

/// What node `me` does with a frame of bucket `b`: defined with the handoff rule it drives.
pub use crate::cluster::Role;

/// One ownership state of the cluster as this node sees it: what packet cores read.
#[derive(Clone)]
pub struct Snapshot {
    plan: Option<PlanId>,
    phase: Phase,
    owners: Box<[u8; BUCKETS]>,
    targets: Option<Box<[u8; BUCKETS]>>,
    moving: u32,
    releasers: u64,
    digest: u64,
    /// Members of the plan this node found dead (bit `id - 1`) when it built the snapshot.
    dead: u64,
    /// Per bucket, an earlier owner that still serves flows in it (0: none).
    owed: Option<Box<[u8; BUCKETS]>>,
    /// Buckets this node released in an earlier plan and still serves flows in.
    held: Vec<Bucket>,
    /// Nodes whose released flows ended by a drain's deadline (bit `id - 1`), this node
    /// included: it serves none of them any more, and the others forget what they learned.
    /// This node's own bit also while its peers stand in for it after an outage of its data
    /// path (see `Membership`'s "Fencing"): the flows of its table are theirs then.
    cut: u64,
}

impl Snapshot {
    /// The snapshot before any plan: nobody owns anything.
    pub fn empty() -> Snapshot {
        Snapshot {
            plan: None,
            phase: Phase::Done,
            owners: zeroed(),
            targets: None,
            moving: 0,
            releasers: 0,
            digest: 0,
            dead: 0,
            owed: None,
            held: Vec::new(),
            cut: 0,
        }
    }

    /// Builds a snapshot from a current-owner function and, while a plan is in progress, a
    /// target-owner function. `digest` labels the target table.
    pub(crate) fn build(
        plan: PlanId,
        phase: Phase,
        owner: impl Fn(Bucket) -> NodeId,
        target: Option<&dyn Fn(Bucket) -> NodeId>,
        digest: u64,
    ) -> Snapshot {
        let mut owners = zeroed();
        for b in Bucket::all() {
            owners[b.index()] = owner(b).get();
        }
        let mut moving = 0;
        let mut releasers = 0u64;
        let targets = match (phase, target) {
            (Phase::Done, _) | (_, None) => None,
            (_, Some(target)) => {
                let mut t = zeroed();
                for b in Bucket::all() {
                    let (o, n) = (owners[b.index()], target(b).get());
                    t[b.index()] = n;
                    if o != n {
                        moving += 1;
                        releasers |= 1u64.checked_shl(u32::from(o).wrapping_sub(1)).unwrap_or(0);
                    }
                }
                Some(t)
            }
        };
        Snapshot {
            plan: Some(plan),
            phase: if targets.is_some() {
                phase
            } else {
                Phase::Done
            },
            owners,
            targets,
            moving,
            releasers,
            digest,
            dead: 0,
            owed: None,
            held: Vec::new(),
            cut: 0,
        }
    }

    /// The same snapshot, saying which plan members were found dead (bit `id - 1`).
    pub(crate) fn with_dead(mut self, dead: u64) -> Snapshot {
        self.dead = dead;
        self
    }

    /// Plan members this node had found dead when it built the snapshot (bit `id - 1`): a
    /// data path that sees a node newly dead forgets what it learned as old owners' flows.
    pub fn dead(&self) -> u64 {
        self.dead
    }

    /// The same snapshot with the long-lived flows' obligations: `owed` per bucket (see the
    /// module doc; `None` or 0: nothing owed), the buckets `held` by this node, and the nodes
    /// whose released flows were `cut`.
    pub(crate) fn with_obligations(
        mut self,
        owed: Option<Box<[u8; BUCKETS]>>,
        held: Vec<Bucket>,
        cut: u64,
    ) -> Snapshot {
        self.owed = owed;
        self.held = held;
        self.cut = cut;
        self
    }

    /// Nodes whose flows in released buckets ended by a drain's deadline (bit `id - 1`): a data
    /// path that sees a node newly cut forgets what it learned, like for a dead node.
    pub fn cut(&self) -> u64 {
        self.cut
    }

    /// Whether `me` stopped serving the flows of buckets it released (its drain's deadline).
    #[inline]
    pub fn cuts(&self, me: NodeId) -> bool {
        self.cut & (1 << me.index()) != 0
    }

    /// The earlier owner that still serves flows in `bucket`, if any.
    #[inline]
    pub fn owed_to(&self, bucket: Bucket) -> Option<NodeId> {
        NodeId::new(self.owed.as_ref()?[bucket.index()])
    }

    /// Buckets owed to an earlier owner (see [`Snapshot::owed_to`]).
    pub fn owed_count(&self) -> u32 {
        self.owed
            .as_ref()
            .map_or(0, |o| o.iter().filter(|&&n| n != 0).count() as u32)
    }

    /// The buckets whose flows `me`'s data path counts for `Membership::report_flows`: those it
    /// releases now, then those it released earlier and still serves flows in.
    pub fn counted(&self, me: NodeId) -> impl Iterator<Item = Bucket> + '_ {
        self.releasing(me).chain(self.held.iter().copied())
    }

    /// Whether `me`'s data path should count flows ([`Snapshot::counted`] is not empty).
    #[inline]
    pub fn counts(&self, me: NodeId) -> bool {
        self.is_releasing(me) || !self.held.is_empty()
    }

    /// The same snapshot with `me` owning nothing: every bucket it owns or would take is
    /// nobody's here (a fenced node's view; the others take those buckets in theirs).
    pub(crate) fn without(&self, me: NodeId) -> Snapshot {
        let me = me.get();
        let mut s = self.clone();
        for o in s.owners.iter_mut() {
            if *o == me {
                *o = 0;
            }
        }
        if let Some(t) = s.targets.as_mut() {
            for o in t.iter_mut() {
                if *o == me {
                    *o = 0;
                }
            }
        }
        s.releasers &= !(1u64 << (me - 1));
        s
    }

    /// The epoch of the plan this snapshot follows (0 before any plan).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.plan.map_or(0, |p| p.epoch)
    }

    /// The plan this snapshot follows.
    pub fn plan(&self) -> Option<PlanId> {
        self.plan
    }

    /// The handoff phase of the moving buckets (`Done` when nothing moves).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Digest of the target ownership table (the table in force once the plan is done).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// What `me` does with frames of `bucket` (see [`Role`]).
    #[inline]
    pub fn role(&self, bucket: Bucket, me: NodeId) -> Role {
        let me = me.get();
        let owner = self.owners[bucket.index()];
        let Some(targets) = &self.targets else {
            return self.settled(bucket, owner, me);
        };
        let target = targets[bucket.index()];
        if owner == target || (me != owner && me != target) {
            return self.settled(bucket, owner, me);
        }
        // A moving bucket: both ids are valid nodes (0 only appears in the empty snapshot).
        let (Some(from), Some(to)) = (NodeId::new(owner), NodeId::new(target)) else {
            return Role::NotOwner;
        };
        match (me == owner, self.phase) {
            // Still the owner while the target learns: as in a bucket that does not move, an
            // earlier owner's flows (an owed bucket moving again) are not ours to answer.
            (true, Phase::Learn) => self.settled(bucket, owner, me),
            (true, _) => Role::Releasing { to },
            (false, Phase::Acquire) => Role::Acquiring { from },
            (false, _) => Role::Learning { from },
        }
    }

    /// The role in a bucket that does not move: its owner's, acquiring while an earlier owner
    /// still serves flows in it.
    #[inline]
    fn settled(&self, bucket: Bucket, owner: u8, me: u8) -> Role {
        if owner != me {
            return Role::NotOwner;
        }
        match self.owed.as_ref().map(|o| o[bucket.index()]) {
            Some(from) if from != 0 && from != me => match NodeId::new(from) {
                Some(from) => Role::Acquiring { from },
                None => Role::Owner,
            },
            _ => Role::Owner,
        }
    }

    /// The node that takes new flows of `bucket`, if any (none during the release gap).
    #[inline]
    pub fn new_flow_owner(&self, bucket: Bucket) -> Option<NodeId> {
        let owner = NodeId::new(self.owners[bucket.index()]);
        match &self.targets {
            None => owner,
            Some(t) => {
                let target = NodeId::new(t[bucket.index()]);
                if owner == target {
                    return owner;
                }
                match self.phase {
                    Phase::Learn => owner,
                    Phase::Release => None,
                    Phase::Acquire | Phase::Done => target,
                }
            }
        }
    }

    /// The nodes that take new flows of at least one bucket (bit `id - 1`): the ones that
    /// serve. Walks every bucket: call it when a snapshot arrives, not per frame.
    pub fn serving(&self) -> u64 {
        let mut bits = 0u64;
        for b in Bucket::all() {
            if let Some(n) = self.new_flow_owner(b) {
                bits |= 1u64 << (n.get() - 1);
            }
        }
        bits
    }

    /// The owner of `bucket` once every handoff of the snapshot is done.
    #[inline]
    pub fn final_owner(&self, bucket: Bucket) -> Option<NodeId> {
        let t = self.targets.as_ref().unwrap_or(&self.owners);
        NodeId::new(t[bucket.index()])
    }

    /// How many buckets move in this snapshot.
    pub fn moving_count(&self) -> u32 {
        self.moving
    }

    /// The moving buckets as `(bucket, from, to)`, in bucket order.
    pub fn moving(&self) -> impl Iterator<Item = (Bucket, NodeId, NodeId)> + '_ {
        let targets: &[u8] = self.targets.as_deref().map_or(&[], |t| &t[..]);
        targets
            .iter()
            .zip(self.owners.iter())
            .enumerate()
            .filter(|(_, (t, o))| t != o)
            .filter_map(|(i, (&t, &o))| Some((Bucket(i as u16), NodeId::new(o)?, NodeId::new(t)?)))
    }

    /// Whether `me` releases buckets now (past Learn): then the control thread should count
    /// its flows in [`Snapshot::releasing`] and call `Membership::report_flows`.
    #[inline]
    pub fn is_releasing(&self, me: NodeId) -> bool {
        self.releasers & (1 << me.index()) != 0 && self.phase != Phase::Learn
    }

    /// The buckets `me` is releasing: the ones whose flow counts `report_flows` wants.
    pub fn releasing(&self, me: NodeId) -> impl Iterator<Item = Bucket> + '_ {
        let any = self.is_releasing(me);
        self.moving()
            .take_while(move |_| any)
            .filter(move |&(_, from, _)| from == me)
            .map(|(b, _, _)| b)
    }

    /// How many buckets `node` takes new flows in now.
    pub fn accepting_count(&self, node: NodeId) -> u32 {
        Bucket::all()
            .filter(|&b| self.new_flow_owner(b) == Some(node))
            .count() as u32
    }

    /// Bit `id - 1` set for each node that releases at least one bucket in this snapshot.
    pub(crate) fn releasers(&self) -> u64 {
        self.releasers
    }
}

fn zeroed() -> Box<[u8; BUCKETS]> {
    vec![0u8; BUCKETS]
        .into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| unreachable!("exactly BUCKETS bytes"))
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("plan", &self.plan)
            .field("phase", &self.phase)
            .field("moving", &self.moving)
            .field("held", &self.held.len())
            .field("digest", &format_args!("{:#018x}", self.digest))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn roles_per_phase() {
        let id = PlanId {
            epoch: 2,
            proposer: n(1),
        };
        // Bucket 0 moves 1 → 2, bucket 1 stays with 1, bucket 2 stays with 3.
        let owner = |b: Bucket| n([1, 1, 3][b.index() % 3]);
        let target = |b: Bucket| n([2, 1, 3][b.index() % 3]);
        let want = [
            (Phase::Learn, Role::Owner, Role::Learning { from: n(1) }),
            (
                Phase::Release,
                Role::Releasing { to: n(2) },
                Role::Learning { from: n(1) },
            ),
            (
                Phase::Acquire,
                Role::Releasing { to: n(2) },
                Role::Acquiring { from: n(1) },
            ),
            (Phase::Done, Role::NotOwner, Role::Owner),
        ];
        for (phase, a, b) in want {
            let s = Snapshot::build(id, phase, owner, Some(&target), 0);
            let (r1, r2) = if phase == Phase::Done {
                let s = Snapshot::build(id, phase, target, None, 0);
                (s.role(Bucket(0), n(1)), s.role(Bucket(0), n(2)))
            } else {
                (s.role(Bucket(0), n(1)), s.role(Bucket(0), n(2)))
            };
            assert_eq!((r1, r2), (a, b), "{phase:?}");
            assert_eq!(s.role(Bucket(0), n(3)), Role::NotOwner);
            assert_eq!(s.role(Bucket(1), n(1)), Role::Owner);
            assert_eq!(s.role(Bucket(2), n(3)), Role::Owner);
            assert_eq!(s.role(Bucket(2), n(1)), Role::NotOwner);
        }
        let s = Snapshot::build(id, Phase::Release, owner, Some(&target), 0);
        assert_eq!(s.new_flow_owner(Bucket(0)), None);
        assert_eq!(s.final_owner(Bucket(0)), Some(n(2)));
        assert_eq!(s.moving_count(), 21846);
        assert_eq!(s.releasing(n(1)).count(), 21846);
        assert_eq!(s.releasers(), 1);
        assert!(Snapshot::empty().role(Bucket(9), n(1)) == Role::NotOwner);
    }

    /// A bucket owed to node 1 (it moved 1 → 2 and node 1 still serves a flow in it) moves again
    /// in a later plan: while the target learns, node 2 is still the bucket's owner but must
    /// not take node 1's flows (as `Owner`, its kernel would answer them with RST).
    #[test]
    fn an_owed_bucket_that_moves_again_stays_owed_in_learn() {
        let id = PlanId {
            epoch: 6,
            proposer: n(1),
        };
        let owed = || {
            let mut a: Box<[u8; BUCKETS]> = vec![0u8; BUCKETS]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!());
            a[0] = 1;
            Some(a)
        };
        // Bucket 0: owned by 2, owed to 1, moving 2 → 1 (back) or 2 → 3.
        for to in [1, 3] {
            let target = |b: Bucket| n(if b.index() == 0 { to } else { 2 });
            let role = |phase| {
                Snapshot::build(id, phase, |_| n(2), Some(&target), 0)
                    .with_obligations(owed(), Vec::new(), 0)
                    .role(Bucket(0), n(2))
            };
            assert_eq!(
                role(Phase::Learn),
                Role::Acquiring { from: n(1) },
                "to {to}"
            );
            assert_eq!(role(Phase::Release), Role::Releasing { to: n(to) });
            // A bucket nobody owed moves as before.
            let plain = Snapshot::build(id, Phase::Learn, |_| n(2), Some(&target), 0);
            assert_eq!(plain.role(Bucket(0), n(2)), Role::Owner);
        }
    }
}
