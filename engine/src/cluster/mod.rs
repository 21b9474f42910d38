//! The cluster's pure decision logic: flow keys, buckets, the ownership table, the flow table
//! and the fragment tracker.
//!
//! Every node of a Clone Cluster sees every frame and decides on its own whether it owns it
//! (DESIGN.md, "Data path"). The decision is `owner(bucket(flow key))`, and it is only correct
//! if every node computes exactly the same bucket and the same owner: the bucket hash
//! ([`BucketHasher`]) and the table construction ([`OwnershipTable::build`]) are therefore part
//! of the cluster's wire contract and are pinned by tests against fixed vectors.
//!
//! This module must never do I/O, read a clock (callers pass `now` in nanoseconds), touch DPDK,
//! or allocate on the per-packet path: tables are preallocated when they are built.
//!
//! - [`flow_key`]: [`FlowKey`] by [`Affinity`], and the keyed [`BucketHasher`].
//! - [`ownership`]: [`OwnershipTable`], bucket → node by weighted rendezvous hashing.
//! - [`flow_table`]: [`FlowTable`], the bounded table of flows this node owns.
//! - [`fragments`]: [`FragmentTracker`], which later IP fragments belong to this node.
//! - [`handoff`]: the handoff rule, what a node does with a packet of a bucket it has a
//!   [`Role`] for (owner, old or new owner of a moving bucket), as a pure function.
//! - [`siphash`]: SipHash-1-3 of fixed-size messages, scalar and in x86 vector lanes.

use std::fmt;
use std::num::NonZeroU8;

use serde::{Deserialize, Serialize};

pub mod flow_key;
#[allow(unsafe_code)] // aligned slot allocation
pub mod flow_table;
pub mod fragments;
pub mod handoff;
pub mod ownership;
#[allow(unsafe_code)] // SIMD intrinsics
pub mod siphash;

pub use flow_key::{
    derive_key, Bucket, BucketHasher, FlowKey, KeyWords, BUCKETS, BUCKET_KEY_LABEL,
};
pub use flow_table::{
    backend_pick, FlowEntry, FlowHash, FlowRest, FlowState, FlowTable, FlowTableStats,
    FlowTimeouts, TcpFlags, Upsert,
};
pub use fragments::{FirstFragment, FragmentKey, FragmentStats, FragmentTracker, FragmentVerdict};
pub use handoff::Role;
pub use ownership::OwnershipTable;

/// A node's id in the cluster: 1..=64, unique among members.
///
/// Stored as a `NonZeroU8`, so `Option<NodeId>` is one byte.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct NodeId(NonZeroU8);

impl NodeId {
    /// The smallest valid id.
    pub const MIN: u8 = 1;
    /// The largest valid id (and so the largest cluster).
    pub const MAX: u8 = 64;

    /// `None` unless `1 <= id <= 64`.
    pub const fn new(id: u8) -> Option<NodeId> {
        if id < Self::MIN || id > Self::MAX {
            return None;
        }
        match NonZeroU8::new(id) {
            Some(id) => Some(NodeId(id)),
            None => None,
        }
    }

    /// The id as a number, 1..=64.
    pub const fn get(self) -> u8 {
        self.0.get()
    }

    /// 0..=63, for indexing per-node arrays.
    pub const fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

impl TryFrom<u8> for NodeId {
    type Error = ClusterError;
    fn try_from(id: u8) -> Result<Self, Self::Error> {
        NodeId::new(id).ok_or(ClusterError::InvalidNodeId(id))
    }
}

impl From<NodeId> for u8 {
    fn from(id: NodeId) -> u8 {
        id.get()
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.get())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.get())
    }
}

/// What a flow key keeps of the client (DESIGN.md, "Words").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// Per connection: (src IP, src port, protocol).
    #[default]
    None,
    /// Per client: src IP.
    Single,
    /// Per client network: src /24 (IPv4) or /64 (IPv6).
    Network,
}

impl Affinity {
    /// The affinity as the YAML names it.
    pub fn name(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Single => "single",
            Affinity::Network => "network",
        }
    }
}

/// A node's share weight: its expected share of buckets is `weight / sum(weights)`.
///
/// Never zero: a node that should take no new buckets leaves the membership (or drains)
/// instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Weight(u32);

impl Weight {
    /// `None` for 0.
    pub const fn new(weight: u32) -> Option<Weight> {
        if weight == 0 {
            None
        } else {
            Some(Weight(weight))
        }
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Weight {
    type Error = ClusterError;
    fn try_from(weight: u32) -> Result<Self, Self::Error> {
        Weight::new(weight).ok_or(ClusterError::ZeroWeight)
    }
}

impl From<Weight> for u32 {
    fn from(weight: Weight) -> u32 {
        weight.get()
    }
}

/// One live member of the cluster, as the ownership table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub weight: Weight,
}

impl Member {
    /// A member from raw numbers, checked (id 1..=64, weight > 0).
    pub fn new(id: u8, weight: u32) -> Result<Member, ClusterError> {
        Ok(Member {
            id: NodeId::try_from(id)?,
            weight: Weight::try_from(weight)?,
        })
    }
}

/// Why cluster state could not be built. Nothing is changed when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("node id {0} is out of range 1..=64; give each node a unique id from 1 to 64")]
    InvalidNodeId(u8),
    #[error("a weight of 0 would give this node no buckets; use a positive weight (100 is the default); to take a node out, drain it")]
    ZeroWeight,
    #[error("an ownership table needs at least one member")]
    NoMembers,
    #[error("{0} is listed twice in the membership")]
    DuplicateMember(NodeId),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_1_to_64() {
        assert_eq!(NodeId::new(0), None);
        assert_eq!(NodeId::new(65), None);
        assert_eq!(NodeId::new(1).map(NodeId::index), Some(0));
        assert_eq!(NodeId::new(64).map(NodeId::get), Some(64));
        assert_eq!(std::mem::size_of::<Option<NodeId>>(), 1);
        assert_eq!(NodeId::try_from(65), Err(ClusterError::InvalidNodeId(65)));
    }

    #[test]
    fn serde_forms() {
        let a: Vec<Affinity> = serde_json::from_str(r#"["none", "single", "network"]"#).unwrap();
        assert_eq!(a, [Affinity::None, Affinity::Single, Affinity::Network]);
        assert_eq!(
            serde_json::to_string(&Affinity::Network).unwrap(),
            r#""network""#
        );
        assert!(serde_json::from_str::<Affinity>(r#""per-ip""#).is_err());

        let m: Member = serde_json::from_str(r#"{"id": 3, "weight": 100}"#).unwrap();
        assert_eq!(m, Member::new(3, 100).unwrap());
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"id":3,"weight":100}"#
        );
        assert!(serde_json::from_str::<Member>(r#"{"id": 0, "weight": 1}"#).is_err());
        assert!(serde_json::from_str::<Member>(r#"{"id": 1, "weight": 0}"#).is_err());
    }
}
