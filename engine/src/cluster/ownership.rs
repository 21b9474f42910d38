//! The ownership table: bucket → node, a pure function of the live members and their weights.
//!
//! Every node builds the table on its own from the membership it agreed on through the control
//! plane, so the construction is part of the cluster's wire contract: same members (in any
//! order) ⇒ bit-identical table on every node, every CPU, every build. [`OwnershipTable::digest`]
//! lets nodes check that in their heartbeats.
//!
//! # Algorithm: weighted rendezvous hashing (highest random weight)
//!
//! For bucket `b` and member `n` with weight `w`:
//!
//! 1. `h = splitmix64((b << 8) | n)` ([`rendezvous_hash`]), where `splitmix64(x)` is
//!    `z = x + 0x9e3779b97f4a7c15; z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9;
//!    z = (z ^ z >> 27) * 0x94d049bb133111eb; z ^ z >> 31` (all wrapping, u64).
//! 2. `u = ((h >> 11) + 0.5) / 2^53`, uniform in the open interval (0, 1).
//! 3. `cost = -ln(u) / w`: an exponential variable with rate `w`.
//! 4. The owner is the member with the smallest cost (equivalently, the largest `-w / ln(u)`);
//!    on an exact tie, the smaller node id.
//!
//! The minimum of independent exponentials with rates `w_i` is member `i` with probability
//! `w_i / Σw`, so shares follow weights. A bucket's owner only depends on the members' own
//! costs, so removing a node moves only that node's buckets, adding one moves buckets only to
//! it, and changing one weight moves buckets only to or from that node.
//!
//! `ln` is computed by [`neg_ln`] with IEEE-754 `+ − × ÷` only (Rust never fuses them), not
//! `f64::ln`: platform `libm`s may differ in the last bit, and one bit is enough for two nodes
//! to disagree on a near-tie.
//!
//! The digest is FNV-1a 64 over the 65536 owner ids (one byte each, bucket order). It covers the
//! assignment only, not the epoch: nodes compare `(epoch, digest)` pairs.

use std::fmt;

use super::flow_key::{Bucket, BUCKETS};
use super::{ClusterError, Member, NodeId};

/// The per-(bucket, node) rendezvous hash: splitmix64 of `(bucket << 8) | node id`.
#[inline]
pub fn rendezvous_hash(bucket: Bucket, node: NodeId) -> u64 {
    let x = (u64::from(bucket.0) << 8) | u64::from(node.get());
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `-ln(u)` for `u` in (0, 1), deterministic on every IEEE-754 platform.
///
/// `u = 2^e · m` with `m` in [√½, √2); `ln m = 2·atanh(s)` with `s = (m−1)/(m+1)`, `|s| < 0.172`,
/// summed to `s^13`: relative error below 1e-12, far below what shares can see.
#[inline]
fn neg_ln(u: f64) -> f64 {
    const MANTISSA: u64 = (1 << 52) - 1;
    let bits = u.to_bits();
    // `u` is a positive normal number here (at least 2^-54), so the exponent field is exact.
    let mut e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & MANTISSA) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    let ln_m = 2.0 * s * p;
    -(f64::from(e) * std::f64::consts::LN_2 + ln_m)
}

/// Cost of `node` (with `1 / weight` precomputed) for `bucket`: the smallest cost owns it.
#[inline]
fn cost(bucket: Bucket, node: NodeId, inv_weight: f64) -> f64 {
    let h = rendezvous_hash(bucket, node);
    let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    neg_ln(u) * inv_weight
}

/// Bucket → owner for one epoch. Immutable once built; cores share it behind a snapshot.
#[derive(Clone)]
pub struct OwnershipTable {
    owners: Box<[NodeId; BUCKETS]>,
    epoch: u64,
    digest: u64,
    /// Sorted by node id.
    members: Vec<Member>,
    /// Buckets per node, indexed by `NodeId::index`.
    counts: [u32; NodeId::MAX as usize],
}

impl OwnershipTable {
    /// Builds the table for `members` (any order) and labels it `epoch`.
    ///
    /// Fails, building nothing, on an empty membership or a node listed twice.
    pub fn build(epoch: u64, members: &[Member]) -> Result<OwnershipTable, ClusterError> {
        let mut members = members.to_vec();
        members.sort_by_key(|m| m.id);
        if members.is_empty() {
            return Err(ClusterError::NoMembers);
        }
        if let Some(pair) = members.windows(2).find(|p| p[0].id == p[1].id) {
            return Err(ClusterError::DuplicateMember(pair[0].id));
        }
        let ranked: Vec<(NodeId, f64)> = members
            .iter()
            .map(|m| (m.id, 1.0 / f64::from(m.weight.get())))
            .collect();

        let mut owners = Vec::with_capacity(BUCKETS);
        let mut counts = [0u32; NodeId::MAX as usize];
        for bucket in Bucket::all() {
            let (mut best, inv) = ranked[0];
            let mut best_cost = cost(bucket, best, inv);
            for &(node, inv) in &ranked[1..] {
                let c = cost(bucket, node, inv);
                // Strict: on a tie the smaller id (earlier in `ranked`) keeps the bucket.
                if c < best_cost {
                    best_cost = c;
                    best = node;
                }
            }
            counts[best.index()] += 1;
            owners.push(best);
        }
        let owners: Box<[NodeId; BUCKETS]> = owners
            .into_boxed_slice()
            .try_into()
            .unwrap_or_else(|_| unreachable!("exactly BUCKETS owners were pushed"));
        let digest = fnv1a64(owners.iter().map(|n| n.get()));
        Ok(OwnershipTable {
            owners,
            epoch,
            digest,
            members,
            counts,
        })
    }

    /// The owner of `bucket`.
    #[inline]
    pub fn owner(&self, bucket: Bucket) -> NodeId {
        self.owners[bucket.index()]
    }

    /// The epoch this table was built for.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The members, sorted by node id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many buckets `node` owns (0 for a non-member).
    pub fn buckets_of(&self, node: NodeId) -> u32 {
        self.counts[node.index()]
    }

    /// Each member's fraction of the buckets, in node id order.
    pub fn shares(&self) -> Vec<(NodeId, f64)> {
        self.members
            .iter()
            .map(|m| (m.id, f64::from(self.buckets_of(m.id)) / BUCKETS as f64))
            .collect()
    }

    /// FNV-1a 64 of the owner ids in bucket order (see the module doc): equal tables, equal
    /// digests, on every node.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Buckets whose owner differs in `next`, as `(bucket, owner here, owner in next)`: the
    /// handoffs needed to move from this table to `next`.
    pub fn moves<'a>(
        &'a self,
        next: &'a OwnershipTable,
    ) -> impl Iterator<Item = (Bucket, NodeId, NodeId)> + 'a {
        Bucket::all().filter_map(move |b| {
            let (from, to) = (self.owner(b), next.owner(b));
            (from != to).then_some((b, from, to))
        })
    }
}

impl PartialEq for OwnershipTable {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch && self.members == other.members && self.owners == other.owners
    }
}

impl Eq for OwnershipTable {}

impl fmt::Debug for OwnershipTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnershipTable")
            .field("epoch", &self.epoch)
            .field("digest", &format_args!("{:#018x}", self.digest))
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

fn fnv1a64(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn member(id: u8, weight: u32) -> Member {
        Member::new(id, weight).unwrap()
    }

    fn node(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn assert_shares_match_weights(table: &OwnershipTable) {
        let total: f64 = table
            .members()
            .iter()
            .map(|m| f64::from(m.weight.get()))
            .sum();
        for (m, (id, share)) in table.members().iter().zip(table.shares()) {
            assert_eq!(m.id, id);
            let want = f64::from(m.weight.get()) / total;
            assert!(
                (share - want).abs() <= 0.01,
                "{id}: share {share:.4}, weight share {want:.4}"
            );
        }
    }

    #[test]
    fn neg_ln_matches_libm() {
        let mut worst = 0.0f64;
        for i in 1..100_000u64 {
            let h = rendezvous_hash(Bucket(i as u16), node((i % 64) as u8 + 1)) ^ (i << 40);
            let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            let rel = (neg_ln(u) - (-u.ln())).abs() / (-u.ln());
            worst = worst.max(rel);
        }
        for u in [
            f64::EPSILON / 4.0,
            0.5,
            0.999_999_999,
            1e-9,
            0.7,
            0.71,
            1.0 - f64::EPSILON,
        ] {
            let rel = (neg_ln(u) - (-u.ln())).abs() / (-u.ln());
            worst = worst.max(rel);
        }
        assert!(worst < 1e-11, "relative error {worst:e}");
    }

    #[test]
    fn refuses_bad_memberships() {
        assert_eq!(OwnershipTable::build(1, &[]), Err(ClusterError::NoMembers));
        assert_eq!(
            OwnershipTable::build(1, &[member(3, 1), member(5, 1), member(3, 2)]),
            Err(ClusterError::DuplicateMember(node(3)))
        );
        assert_eq!(Member::new(0, 1), Err(ClusterError::InvalidNodeId(0)));
        assert_eq!(Member::new(65, 1), Err(ClusterError::InvalidNodeId(65)));
        assert_eq!(Member::new(1, 0), Err(ClusterError::ZeroWeight));
    }

    #[test]
    fn single_member_owns_everything() {
        let t = OwnershipTable::build(7, &[member(42, 5)]).unwrap();
        assert!(Bucket::all().all(|b| t.owner(b) == node(42)));
        assert_eq!(t.buckets_of(node(42)), BUCKETS as u32);
        assert_eq!(t.buckets_of(node(1)), 0);
        assert_eq!(t.epoch(), 7);
        assert_eq!(t.shares(), vec![(node(42), 1.0)]);
    }

    #[test]
    fn equal_weights_share_evenly() {
        // Every size in release; a spread of sizes in (slow) debug builds.
        let sizes: Vec<u8> = if cfg!(debug_assertions) {
            vec![1, 2, 3, 4, 5, 7, 10, 16, 31, 33, 64]
        } else {
            (1..=64).collect()
        };
        for n in sizes {
            let members: Vec<Member> = (1..=n).map(|id| member(id, 100)).collect();
            assert_shares_match_weights(&OwnershipTable::build(1, &members).unwrap());
        }
    }

    #[test]
    fn moves_lists_exactly_the_changed_buckets() {
        let a = OwnershipTable::build(1, &[member(1, 1), member(2, 1)]).unwrap();
        let b = OwnershipTable::build(2, &[member(1, 1), member(2, 1), member(3, 1)]).unwrap();
        let moves: Vec<_> = a.moves(&b).collect();
        assert_eq!(moves.len() as u32, b.buckets_of(node(3)));
        assert!(moves
            .iter()
            .all(|&(bk, from, to)| to == node(3) && a.owner(bk) == from));
    }

    /// PINNED VECTORS: the table construction is the cluster's wire contract (every node must
    /// compute the same owners). These were computed once with this implementation and must
    /// NEVER change without a protocol version bump in the heartbeat. If this fails, the change
    /// is wrong, not the vectors.
    #[test]
    fn pinned_table_vectors() {
        assert_eq!(rendezvous_hash(Bucket(0), node(1)), 0x910a_2dec_8902_5cc1);
        assert_eq!(
            rendezvous_hash(Bucket(65535), node(64)),
            0x2bd2_f5fa_14b1_dad2
        );

        let t = OwnershipTable::build(
            1,
            &[member(1, 100), member(2, 100), member(3, 50), member(9, 10)],
        )
        .unwrap();
        let owners: Vec<u8> = (0..16).map(|b| t.owner(Bucket(b)).get()).collect();
        assert_eq!(owners, [2, 3, 2, 2, 3, 2, 2, 3, 3, 2, 1, 2, 2, 2, 1, 1]);
        assert_eq!(t.digest(), 0xae9a_55d8_22e3_ef4f);
        let counts: Vec<u32> = t.members().iter().map(|m| t.buckets_of(m.id)).collect();
        assert_eq!(counts, [25083, 25350, 12641, 2462]);

        let all: Vec<Member> = (1..=64).map(|id| member(id, u32::from(id))).collect();
        assert_eq!(
            OwnershipTable::build(1, &all).unwrap().digest(),
            0x5094_3ba2_a380_62a3
        );
    }

    /// Timing sanity print, not an assertion: `cargo test --release -- --nocapture build_speed`.
    #[test]
    fn build_speed() {
        let all: Vec<Member> = (1..=64).map(|id| member(id, 100)).collect();
        let start = std::time::Instant::now();
        let t = OwnershipTable::build(1, &all).unwrap();
        println!(
            "ownership table build, 64 nodes: {:?} (digest {:#x})",
            start.elapsed(),
            t.digest()
        );
    }

    /// 1..=64 distinct node ids with weights 1..=100, in random order.
    fn memberships() -> impl Strategy<Value = Vec<Member>> {
        (
            proptest::sample::subsequence((1..=64u8).collect::<Vec<_>>(), 1..=64),
            proptest::collection::vec(1..=100u32, 64),
        )
            .prop_map(|(ids, weights)| {
                ids.iter()
                    .zip(weights)
                    .map(|(&id, w)| member(id, w))
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
    }

    proptest! {
        // Each case builds up to three 64-node tables; keep debug runs short.
        #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 8 } else { 256 }))]

        #[test]
        fn every_bucket_has_one_member_owner(members in memberships()) {
            let t = OwnershipTable::build(1, &members).unwrap();
            let ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
            prop_assert!(Bucket::all().all(|b| ids.contains(&t.owner(b))));
            let total: u32 = ids.iter().map(|&id| t.buckets_of(id)).sum();
            prop_assert_eq!(total, BUCKETS as u32);
        }

        #[test]
        fn shares_follow_weights(members in memberships()) {
            assert_shares_match_weights(&OwnershipTable::build(1, &members).unwrap());
        }

        #[test]
        fn removing_a_node_moves_only_its_buckets(
            members in memberships().prop_filter("two or more", |m| m.len() >= 2),
            pick in any::<prop::sample::Index>(),
        ) {
            let before = OwnershipTable::build(1, &members).unwrap();
            let gone = members[pick.index(members.len())].id;
            let rest: Vec<Member> = members.iter().copied().filter(|m| m.id != gone).collect();
            let after = OwnershipTable::build(2, &rest).unwrap();
            for b in Bucket::all() {
                if before.owner(b) != gone {
                    prop_assert_eq!(before.owner(b), after.owner(b));
                }
            }
            prop_assert_eq!(after.buckets_of(gone), 0);
            prop_assert!(before.moves(&after).all(|(_, from, _)| from == gone));
        }

        #[test]
        fn changing_a_weight_moves_only_to_or_from_that_node(
            members in memberships(),
            pick in any::<prop::sample::Index>(),
            weight in 1..=100u32,
        ) {
            let before = OwnershipTable::build(1, &members).unwrap();
            let mut changed = members.clone();
            let i = pick.index(changed.len());
            changed[i] = member(changed[i].id.get(), weight);
            let after = OwnershipTable::build(2, &changed).unwrap();
            let n = changed[i].id;
            prop_assert!(before.moves(&after).all(|(_, from, to)| from == n || to == n));
        }

        #[test]
        fn member_order_does_not_matter(members in memberships()) {
            let a = OwnershipTable::build(1, &members).unwrap();
            let mut reversed = members.clone();
            reversed.reverse();
            let b = OwnershipTable::build(1, &reversed).unwrap();
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert!(a == b);
        }
    }
}
