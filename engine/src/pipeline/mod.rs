//! What a packet core does with each frame: pure Rust over byte slices, no DPDK types.
//!
//! The data plane hands every frame from the wire port to [`Pipeline::from_wire`] (or a burst
//! to [`Pipeline::prepare_burst`] then each frame to [`Pipeline::decide`]) and every frame from
//! the host port to [`Pipeline::from_host`], and carries out the returned [`Action`]. The same
//! code runs in `clonecluster replay` over pcaps and in the benchmarks.
//!
//! The decision for a frame from the wire (DESIGN.md, "Data path"):
//! - TCP/UDP to the cluster: the owner of the flow key's bucket delivers it. While a bucket
//!   moves (DESIGN.md, "Changing owners without losing connections"), the role the snapshot
//!   gives this node decides, by the handoff rule ([`crate::cluster::handoff`]): the old owner
//!   serves only its own flow table after release, the new owner records the old owner's flows
//!   while learning and after acquire takes only new flows that are not the old owner's.
//! - ICMP errors: the node that serves the flow they quote (so path-MTU discovery reaches the
//!   node that holds the connection). ICMP echo and other IP protocols: by source address.
//! - Later IP fragments: the node that owned the first fragment; one that arrives before its
//!   first is held briefly ([`Action::Hold`]).
//! - ARP requests and neighbour solicitations for the cluster address: ONE designated node (the
//!   owner of the requester's bucket) answers, from its node MAC, with the cluster MAC inside.
//! - Broadcast, multicast, neighbour discovery, and frames for the node's own MAC: every node's
//!   host gets them. Unicast for any other MAC: dropped.
//!
//! The pipeline owns the per-core state those decisions need: the ownership snapshot in force,
//! this node's flow table, the flows learned as old owners', the fragment tracker and the
//! services' health. It must never panic on a frame, allocate per frame, read a clock (callers
//! pass `now` in nanoseconds), block, or know about mbufs, ports or the control thread; and a
//! frame it sends never carries the cluster MAC as its Ethernet source.
//!
//! - `types`: [`Action`], [`DropReason`], [`NodeIdentity`], [`ServiceState`],
//!   [`TableSizes`].
//! - `frame_buf`: [`FrameBuf`], the frame a decision rewrites in place, with room before and
//!   after it.
//! - `state`: construction, what the core changes between bursts, read access for counters.
//! - `prepare`: burst preparation: parse, hash eight flow keys at a time, prefetch.
//! - `decide`: the decision for a frame from the wire.
//! - `appliance`: frames to a service address: port rule, ownership, backend, delivery.
//! - `neighbour`: answers to ARP requests and neighbour solicitations for the cluster address.
//! - `host`: frames from the node's kernel.
//! - `home`: which packet core decides a frame when a node runs several.
//! - `hold`: IP fragments, and [`FragmentHold`] for later fragments that came first.

use std::sync::Arc;

use crate::appliance::route::Routes;
use crate::appliance::Services;
use crate::cluster::{BucketHasher, FlowTable, FragmentTracker};
use crate::control::Snapshot;

mod appliance;
mod decide;
mod frame_buf;
mod hold;
mod home;
mod host;
mod neighbour;
mod prepare;
mod state;
mod types;

#[cfg(test)]
mod tests;

pub use appliance::{ApplianceCounts, Pieces};
pub use frame_buf::{FrameBuf, HEADROOM};
pub use hold::FragmentHold;
pub use home::{home_core, Side};
pub use prepare::Prepared;
pub use state::{learned_capacity, stable_snapshot};
pub use types::{
    Action, DropReason, NodeIdentity, ReleaseTo, Released, ServiceState, TableSizes, CLOSING_KEPT,
};

/// The EtherType of wire heartbeats (see [`crate::wire::CONTROL_ETHERTYPE`]).
pub use crate::wire::CONTROL_ETHERTYPE as HEARTBEAT_ETHERTYPE;

/// Per-core packet logic and its state.
pub struct Pipeline {
    id: NodeIdentity,
    hasher: BucketHasher,
    snapshot: Arc<Snapshot>,
    /// Flows this node delivers (owns).
    flows: FlowTable,
    /// Flows seen in buckets this node is receiving, recorded as the old owner's.
    learned: FlowTable,
    fragments: FragmentTracker,
    released: Option<Released>,
    /// The local service and the peers' (see [`ServiceState`]).
    service: ServiceState,
    /// See [`Pipeline::duplicate_risk`].
    duplicate_risk: u64,
    /// Appliance mode's rules and backends ([`Services::none`] in server mode).
    services: Arc<Services>,
    /// Nodes that own buckets in the snapshot (bit `id - 1`): who may take a `single` rule.
    serving: u64,
    /// Per backend id, the way to it (built from `services` and `id`).
    routes: Routes,
    /// Whether the flow table's checked marks hold under `services`.
    marks: appliance::Marks,
    /// The datagram of the last [`Action::ToBackendInPieces`], for [`Pipeline::take_pieces`].
    pieces: Option<appliance::Pieces>,
    /// The datagram of the last [`Action::Hold`], for [`Pipeline::take_held`].
    held: Option<crate::cluster::FragmentKey>,
    /// Per backend: frames, bytes, new flows (appliance mode).
    appliance: ApplianceCounts,
    /// The "too big" answers this pipeline may still send.
    error_budget: appliance::ErrorBudget,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("id", &self.id)
            .field("epoch", &self.snapshot.epoch())
            .field("flows", &self.flows.len())
            .field("learned", &self.learned.len())
            .finish()
    }
}
