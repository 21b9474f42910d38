//! `clonecluster replay`: N simulated nodes over every frame of a pcap, to check the cluster's
//! central promise offline: every frame for the cluster is delivered by exactly one node.
//!
//! Each simulated node runs the real [`Pipeline`] (same cluster config, node ids 1..=N, node
//! MACs `02:00:00:00:00:<id>`) with the same ownership table, as every node of a real cluster
//! would. A frame is a *cluster frame* when the decision about it is exclusive (some node
//! delivered, answered, held it or dropped it as not its own); a cluster frame delivered or
//! answered by more than one node is a *duplicate*, by none an *orphan*. Frames every host gets
//! by design (broadcast, multicast, neighbour discovery) are counted as shared.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use crate::appliance::Services;
use crate::cluster::{Bucket, Member, NodeId, OwnershipTable};
use crate::config::{Loaded, Policy};
use crate::control::{Phase, PlanId, Snapshot};
use crate::pipeline::{
    stable_snapshot, Action, DropReason, FragmentHold, FrameBuf, NodeIdentity, Pipeline,
    TableSizes, HEADROOM,
};
use crate::wire::EthernetAddress;

/// What one simulated node did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeCounts {
    pub node: u8,
    /// Cluster frames this node delivered to its host as their one owner.
    pub delivered: u64,
    /// Frames every host gets (broadcast, multicast, neighbour discovery).
    pub shared: u64,
    /// ARP requests / neighbour solicitations this node answered.
    pub answered: u64,
    /// Frames dropped, all reasons.
    pub dropped: u64,
    /// Of those, dropped because another node owns them.
    pub not_owned: u64,
    /// Of those, malformed.
    pub malformed: u64,
    /// Later fragments held until their first fragment came.
    pub held: u64,
    /// Wire heartbeats.
    pub to_control: u64,
    /// Buckets this node owns.
    pub buckets: u32,
    /// Cluster frames this node forwarded to a backend (appliance mode).
    pub forwarded: u64,
}

/// What the simulated nodes together sent to one backend (appliance mode).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BackendCounts {
    pub service: String,
    pub backend: String,
    pub frames: u64,
    pub new_flows: u64,
}

/// The outcome of a replay.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    pub frames: u64,
    pub cluster_frames: u64,
    pub duplicates: u64,
    pub orphans: u64,
    pub nodes: Vec<NodeCounts>,
    /// Per backend of every service, in configuration order (empty in server mode).
    pub backends: Vec<BackendCounts>,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>4} {:>8} {:>9} {:>7} {:>8} {:>8} {:>9} {:>9} {:>5} {:>8}",
            "node",
            "buckets",
            "delivered",
            "shared",
            "answered",
            "dropped",
            "not-owned",
            "malformed",
            "held",
            "control"
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "{:>4} {:>8} {:>9} {:>7} {:>8} {:>8} {:>9} {:>9} {:>5} {:>8}",
                n.node,
                n.buckets,
                n.delivered,
                n.shared,
                n.answered,
                n.dropped,
                n.not_owned,
                n.malformed,
                n.held,
                n.to_control
            )?;
        }
        if !self.backends.is_empty() {
            writeln!(
                f,
                "{:>12} {:>20} {:>9} {:>9}",
                "service", "backend", "frames", "new flows"
            )?;
            for b in &self.backends {
                writeln!(
                    f,
                    "{:>12} {:>20} {:>9} {:>9}",
                    b.service, b.backend, b.frames, b.new_flows
                )?;
            }
            let forwarded: u64 = self.nodes.iter().map(|n| n.forwarded).sum();
            writeln!(f, "forwarded to backends: {forwarded}")?;
        }
        write!(
            f,
            "frames {}, cluster frames {}, duplicates {}, orphans {}",
            self.frames, self.cluster_frames, self.duplicates, self.orphans
        )
    }
}

/// The simulated node `id` of a cluster described by `loaded`.
pub(crate) fn simulated_identity(loaded: &Loaded, id: u8) -> NodeIdentity {
    let mut identity = NodeIdentity::from_config(&loaded.config);
    identity.node = crate::cluster::NodeId::new(id).expect("1..=64");
    identity.node_mac = EthernetAddress([0x02, 0, 0, 0, 0, id]);
    identity
}

/// The table N simulated nodes share: ids 1..=N, the configured weight for each under the
/// `weighted` policy, equal weights otherwise.
pub(crate) fn simulated_table(loaded: &Loaded, nodes: u8) -> anyhow::Result<OwnershipTable> {
    let weight = match loaded.config.cluster.policy {
        Policy::Weighted => loaded.config.node.weight.get(),
        _ => 100,
    };
    let members: Vec<Member> = (1..=nodes)
        .map(|id| Member::new(id, weight))
        .collect::<Result<_, _>>()?;
    Ok(OwnershipTable::build(1, &members)?)
}

/// The ownership a benchmark assumes instead of running the membership protocol: nodes
/// `1..=nodes` as in [`simulated_table`], and, when `handoff_pct > 0`, that percentage of the
/// buckets moving in the acquire phase: node `me` takes over the moving buckets of every other
/// node and hands its own moving buckets to the next node id. A lone node has nobody to hand
/// off with, so nothing moves.
pub fn assumed_snapshot(
    loaded: &Loaded,
    nodes: u8,
    handoff_pct: u8,
    me: NodeId,
) -> anyhow::Result<Snapshot> {
    if !(1..=64).contains(&nodes) || me.get() > nodes {
        bail!("a cluster of {nodes} nodes (1 to 64) with {me} in it");
    }
    if handoff_pct > 100 {
        bail!("{handoff_pct}% of the buckets cannot move");
    }
    let table = simulated_table(loaded, nodes)?;
    if handoff_pct == 0 || nodes == 1 {
        return Ok(stable_snapshot(&table));
    }
    let moving = |b: Bucket| b.index() % 100 < usize::from(handoff_pct);
    let next = NodeId::new(me.get() % nodes + 1).expect("1..=nodes");
    let target = |b: Bucket| match table.owner(b) {
        owner if !moving(b) => owner,
        owner if owner == me => next,
        _ => me,
    };
    Ok(Snapshot::build(
        PlanId {
            epoch: table.epoch() + 1,
            proposer: me,
        },
        Phase::Acquire,
        |b| table.owner(b),
        Some(&target),
        table.digest(),
    ))
}

/// Replays `frames` (timestamp in ns, bytes) through `nodes` simulated nodes.
pub fn replay(
    loaded: &Loaded,
    nodes: u8,
    frames: impl IntoIterator<Item = (u64, Vec<u8>)>,
) -> anyhow::Result<ReplayReport> {
    if !(1..=64).contains(&nodes) {
        bail!("--nodes {nodes}: a cluster has 1 to 64 nodes");
    }
    let table = simulated_table(loaded, nodes)?;
    let snapshot = Arc::new(stable_snapshot(&table));
    Ok(replay_with(
        loaded,
        &snapshot,
        1..=nodes,
        TableSizes::default(),
        frames,
    ))
}

/// A later fragment replay holds for its first: its frame number and bytes (a released one is
/// decided again, and may go to a backend).
type Held = (usize, Vec<u8>);

/// Replays `frames` through the simulated nodes `ids`, all under `snapshot`, each with tables
/// of `sizes` (one simulated node of a larger cluster: `ids = 1..=1`).
pub fn replay_with(
    loaded: &Loaded,
    snapshot: &Arc<Snapshot>,
    ids: std::ops::RangeInclusive<u8>,
    sizes: TableSizes,
    frames: impl IntoIterator<Item = (u64, Vec<u8>)>,
) -> ReplayReport {
    let services = Arc::new(replay_services(loaded));
    let mut sims: Vec<(Pipeline, FragmentHold<Held>, NodeCounts)> = ids
        .map(|id| {
            let mut p = Pipeline::new(
                simulated_identity(loaded, id),
                &loaded.secret,
                Arc::clone(snapshot),
                sizes,
            );
            p.set_services(Arc::clone(&services));
            let me = p.identity().node;
            let counts = NodeCounts {
                node: id,
                buckets: Bucket::all()
                    .filter(|&b| snapshot.new_flow_owner(b) == Some(me))
                    .count() as u32,
                ..NodeCounts::default()
            };
            (p, FragmentHold::new(1024, sizes.fragment_timeout), counts)
        })
        .collect();

    // Per frame: deliveries (as owner or answer), and whether the decision was exclusive.
    let mut delivered_by: Vec<u8> = Vec::new();
    let mut exclusive: Vec<bool> = Vec::new();
    // One mbuf's room, as the data path has it: a longer frame spans several and is dropped
    // there (`chained`), not cut short.
    let room = loaded.config.dataplane.frame_room();
    let mut buf = vec![0u8; HEADROOM + room];
    let mut last_ts = 0;
    for (index, (ts, frame)) in frames.into_iter().enumerate() {
        last_ts = ts;
        delivered_by.push(0);
        exclusive.push(false);
        for (pipeline, hold, counts) in sims.iter_mut() {
            let len = frame.len();
            let action = match buf.get_mut(HEADROOM..HEADROOM + len) {
                Some(room) => {
                    room.copy_from_slice(&frame);
                    pipeline.from_wire(&mut FrameBuf::new(&mut buf, HEADROOM), len, ts)
                }
                None => Action::Drop(DropReason::Chained),
            };
            // The frame decided, from where it started (what a hold keeps and pieces are cut
            // from: neither is rewritten).
            let decided = &buf[HEADROOM..HEADROOM + len.min(room)];
            match action {
                Action::Deliver => {
                    counts.delivered += 1;
                    delivered_by[index] += 1;
                    exclusive[index] = true;
                }
                Action::Reply { .. } => {
                    counts.answered += 1;
                    delivered_by[index] += 1;
                    exclusive[index] = true;
                }
                Action::DeliverShared => counts.shared += 1,
                Action::ToControl => counts.to_control += 1,
                Action::ToWire => {}
                Action::ToBackend | Action::Encapsulated { .. } => {
                    counts.forwarded += 1;
                    delivered_by[index] += 1;
                    exclusive[index] = true;
                }
                Action::ToBackendInPieces { .. } => {
                    counts.forwarded += 1;
                    delivered_by[index] += 1;
                    exclusive[index] = true;
                    if !pieces_written(pipeline, decided) {
                        counts.malformed += 1;
                    }
                }
                Action::Hold => {
                    exclusive[index] = true;
                    let key = pipeline.take_held();
                    let put = key.map(|key| hold.put(key, ts, (index, decided.to_vec())));
                    if put.is_some_and(|put| put.is_ok()) {
                        counts.held += 1;
                    } else {
                        counts.dropped += 1;
                    }
                }
                Action::Drop(reason) => {
                    counts.dropped += 1;
                    match reason {
                        DropReason::NotOwned | DropReason::ReleaseGap => {
                            counts.not_owned += 1;
                            exclusive[index] = true;
                        }
                        DropReason::Malformed(_) => counts.malformed += 1,
                        _ => {}
                    }
                }
            }
            if let Some(released) = pipeline.take_released() {
                hold.release(&released.key, |(held, frame)| {
                    let len = frame.len();
                    let mut fragment = vec![0u8; HEADROOM + room.max(len)];
                    fragment[HEADROOM..HEADROOM + len].copy_from_slice(&frame);
                    match pipeline.released_fragment(
                        &mut FrameBuf::new(&mut fragment, HEADROOM),
                        len,
                        ts,
                    ) {
                        Action::Deliver => {
                            counts.delivered += 1;
                            delivered_by[held] += 1;
                        }
                        Action::ToBackend | Action::Encapsulated { .. } => {
                            counts.forwarded += 1;
                            delivered_by[held] += 1;
                        }
                        Action::ToBackendInPieces { .. } => {
                            counts.forwarded += 1;
                            delivered_by[held] += 1;
                            if !pieces_written(pipeline, &frame) {
                                counts.malformed += 1;
                            }
                        }
                        Action::Drop(DropReason::NotOwned) => {
                            counts.dropped += 1;
                            counts.not_owned += 1;
                        }
                        _ => counts.dropped += 1,
                    }
                });
            }
            hold.expire(ts, |_| counts.dropped += 1);
        }
    }
    let end = last_ts.saturating_add(Duration::from_secs(3600).as_nanos() as u64);
    for (_, hold, counts) in sims.iter_mut() {
        hold.expire(end, |_| counts.dropped += 1);
    }

    let mut report = ReplayReport {
        frames: delivered_by.len() as u64,
        ..ReplayReport::default()
    };
    for (n, excl) in delivered_by.iter().zip(&exclusive) {
        if *excl {
            report.cluster_frames += 1;
            match n {
                0 => report.orphans += 1,
                1 => {}
                _ => report.duplicates += 1,
            }
        }
    }
    for rule in services.rules() {
        for b in &rule.backends {
            let id = usize::from(b.id);
            let sum = |f: &dyn Fn(&crate::pipeline::ApplianceCounts) -> &Vec<u64>| {
                sims.iter()
                    .map(|(p, _, _)| f(p.appliance_counts()).get(id).copied().unwrap_or(0))
                    .sum()
            };
            report.backends.push(BackendCounts {
                service: rule.name.clone(),
                backend: b.name.clone(),
                frames: sum(&|c| &c.frames),
                new_flows: sum(&|c| &c.new_flows),
            });
        }
    }
    report.nodes = sims.into_iter().map(|(_, _, c)| c).collect();
    report
}

/// After [`crate::pipeline::Action::ToBackendInPieces`] for `frame`: whether every piece is
/// written (into a scratch frame, as a core writes each into an mbuf).
fn pieces_written(pipeline: &mut Pipeline, frame: &[u8]) -> bool {
    let Some(pieces) = pipeline.take_pieces() else {
        return false;
    };
    let mut out = vec![0u8; frame.len() + 128];
    (0..pieces.count()).all(|k| pieces.write(frame, k, &mut out).is_some())
}

/// The configuration's services for an offline replay: a backend whose MAC the nodes would
/// learn by ARP/NDP gets a stand-in (02:ba:00:00:<id>), so that its frames are counted.
fn replay_services(loaded: &Loaded) -> Services {
    let mut services = Services::compile(&loaded.config, &loaded.secret, None);
    let unresolved: Vec<u16> = services
        .backends()
        .filter(|(_, b)| b.mac.is_none())
        .map(|(_, b)| b.id)
        .collect();
    for id in unresolved {
        let [hi, lo] = id.to_be_bytes();
        services = services.with_backend(&loaded.secret, id, |b| {
            b.mac = Some(EthernetAddress([0x02, 0xba, 0, 0, hi, lo]));
        });
    }
    services
}

/// Every frame of a pcap file with its timestamp in nanoseconds.
pub fn read_pcap(path: &Path) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = pcap_file::pcap::PcapReader::new(file)
        .map_err(|e| format!("{}: not a pcap file: {e}", path.display()))?;
    let mut frames = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.map_err(|e| format!("{}: {e}", path.display()))?;
        frames.push((pkt.timestamp.as_nanos() as u64, pkt.data.into_owned()));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame longer than one mbuf's room is dropped as the data path drops it (it spans
    /// several mbufs), not cut short and counted as malformed; one that fits is decided.
    #[test]
    fn a_frame_longer_than_an_mbuf_is_dropped_not_malformed() {
        let config = crate::config::Config::parse(crate::config::tests::LAB, "t.yaml").unwrap();
        let loaded = Loaded {
            path: "t.yaml".into(),
            config,
            secret: b"0123456789abcdef".to_vec(),
        };
        let room = loaded.config.dataplane.frame_room();
        assert_eq!(room, 2048);
        let frame = |payload: usize| {
            let mut t = crate::testkit::build::tcp(40000, 1, 1, 0x18, &vec![0u8; payload]);
            crate::testkit::build::ipv4(
                [2, 0, 0, 0, 0, 0x64],
                [198, 18, 0, 100],
                6,
                &mut t,
                Some(16),
            )
        };
        let fits = frame(room - 54);
        let jumbo = frame(3000);
        assert_eq!(fits.len(), room);
        let report = replay(&loaded, 1, [(1, fits), (2, jumbo)]).unwrap();
        let n = &report.nodes[0];
        assert_eq!((n.delivered, n.dropped, n.malformed), (1, 1, 0));
    }
}
