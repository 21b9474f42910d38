//! A pipeline's state: construction, what the packet core changes between bursts (snapshot,
//! service health, hash lanes, housekeeping) and read access for its counters.
//!
//! Nothing here runs per frame.

use std::sync::Arc;

use crate::cluster::{
    derive_key, BucketHasher, FlowTable, FragmentTracker, NodeId, OwnershipTable, Role,
};
use crate::control::{Phase, PlanId, Snapshot};

use super::{ApplianceCounts, NodeIdentity, Pipeline, Released, ServiceState, TableSizes};
use crate::appliance::route::Routes;
use crate::appliance::Services;

/// A snapshot in which `table` is in force with nothing moving (a node alone, `replay`).
pub fn stable_snapshot(table: &OwnershipTable) -> Snapshot {
    let proposer = table
        .members()
        .first()
        .map_or(NodeId::new(1).expect("1 is valid"), |m| m.id);
    Snapshot::build(
        PlanId {
            epoch: table.epoch(),
            proposer,
        },
        Phase::Done,
        |b| table.owner(b),
        None,
        table.digest(),
    )
}

/// The nodes that take new flows of some bucket in `snapshot` (bit `id - 1`).
fn serving(snapshot: &Snapshot) -> u64 {
    snapshot.serving()
}

/// The learned-flows table's capacity for a flow table of `flows`.
pub fn learned_capacity(flows: usize) -> usize {
    (flows / 4).max(1024)
}

impl Pipeline {
    pub fn new(
        id: NodeIdentity,
        secret: &[u8],
        snapshot: Arc<Snapshot>,
        sizes: TableSizes,
    ) -> Pipeline {
        let table_key = derive_key(secret, b"clonecluster flow table v1");
        Pipeline {
            hasher: BucketHasher::new(secret),
            flows: FlowTable::new(sizes.flows, sizes.flow_timeouts),
            // Learned flows matter only while buckets move: a quarter of the size suffices.
            learned: FlowTable::new(learned_capacity(sizes.flows), sizes.flow_timeouts),
            fragments: FragmentTracker::new(
                sizes.fragments,
                sizes.fragment_waits,
                sizes.fragment_timeout,
                &table_key,
            ),
            released: None,
            service: ServiceState::default(),
            duplicate_risk: 0,
            serving: 0,
            snapshot,
            services: Services::none(),
            routes: Routes::default(),
            marks: Default::default(),
            pieces: None,
            held: None,
            appliance: ApplianceCounts::default(),
            error_budget: Default::default(),
            id,
        }
    }

    /// Swaps in new services (appliance mode; between bursts).
    pub fn set_services(&mut self, services: Arc<Services>) {
        let max = services
            .backends()
            .map(|(_, b)| usize::from(b.id))
            .max()
            .unwrap_or(0);
        self.appliance.fit(max);
        self.routes = Routes::build(
            &services,
            self.id.node_mac,
            self.id.node_ip,
            self.id.node_ip6,
        );
        if services.has_single() {
            self.serving = serving(&self.snapshot);
        }
        // A freed id that the new file gave another server: the later fragments of a datagram
        // whose first went to the old one must not reach the new one.
        let (old, new) = (&self.services, &services);
        self.fragments
            .refuse_forwarded(|id| old.server(id) != new.server(id));
        if !old.same_matching(new) && !self.flows.is_empty() {
            // The flows' marks may no longer say what the lookup would: cleared before use.
            // (An empty table holds none: a free slot's marks are cleared.)
            self.marks = super::appliance::Marks::Clearing { next: 0 };
        }
        self.services = services;
    }

    /// The services in force.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// What this pipeline sent to each backend.
    pub fn appliance_counts(&self) -> &ApplianceCounts {
        &self.appliance
    }

    /// Frames this node delivered, while acquiring a bucket, as the start of a flow that the
    /// old owner may still be serving: a UDP (or other non-TCP) flow it did not learn — one
    /// idle through the whole learn phase, or forgotten by a full learned-flows table — and a
    /// learned SYN retransmitted that the old owner may have answered. Each such frame may
    /// reach two hosts; 0 in a clean handoff of TCP traffic.
    pub fn duplicate_risk(&self) -> u64 {
        self.duplicate_risk
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.id
    }

    /// The ownership snapshot in force.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The health of the local service and of the peers' (between bursts; see
    /// [`ServiceState`]).
    #[inline]
    pub fn set_service(&mut self, service: ServiceState) {
        self.service = service;
    }

    /// The SipHash implementation that hashes bursts (`dataplane.hash_lanes`); decisions do
    /// not change.
    pub fn set_hash_lanes(&mut self, lanes: crate::cluster::siphash::Lanes) {
        self.hasher.set_lanes(lanes);
    }

    /// Swaps in a new ownership snapshot (between bursts).
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        // A node found dead serves nothing any more: the flows learned as its are forgotten, so
        // that the owner takes their packets and their clients get an RST rather than silence.
        // Likewise for a node whose drain cut the flows it still served in released buckets.
        let gone = |s: &Snapshot| s.dead() | s.cut();
        let newly = gone(&snapshot) & !gone(&self.snapshot);
        if newly != 0 {
            // Only their flows: the ones learned from an old owner that lives on stay (it
            // still serves them; forgotten, they would be taken here as unknown too).
            let (old, me) = (&self.snapshot, self.id.node);
            let lives = |n: NodeId| newly & (1u64 << n.index()) == 0;
            self.learned.retain_buckets(|b| match old.role(b, me) {
                Role::Learning { from } | Role::Acquiring { from } => lives(from),
                // A bucket an earlier owner still serves long flows in (owed).
                Role::Owner => old.owed_to(b).is_some_and(lives),
                _ => false,
            });
        }
        if self.services.has_single() {
            self.serving = serving(&snapshot);
        }
        self.snapshot = snapshot;
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    pub fn learned(&self) -> &FlowTable {
        &self.learned
    }

    pub fn fragments(&self) -> &FragmentTracker {
        &self.fragments
    }

    /// After an action: the first fragment of a held datagram was just decided.
    #[inline]
    pub fn take_released(&mut self) -> Option<Released> {
        self.released.take()
    }

    /// Housekeeping between bursts: expire idle flows, a bounded amount at a time; in
    /// appliance mode, count each backend's flows for [`Pipeline::appliance_counts`], and
    /// clear the flows' checked marks a share at a time after the rules changed.
    pub fn maintain(&mut self, now: u64, budget: usize) -> usize {
        self.learned.expire(now, budget / 4 + 1);
        let expired = self.flows.expire(now, budget);
        if self.services.active() {
            self.appliance.count_flows(&self.flows);
        }
        self.clear_marks();
        expired
    }
}
