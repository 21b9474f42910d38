//! The link between the packet cores and the control thread: the one place they share state.
//!
//! The control thread writes the ownership snapshot (an [`ArcSwap`] the cores pick up between
//! bursts), the service state and the wire control messages to send; the cores write back the
//! wire control frames they received and, each in its own cache-aligned [`CoreLink`], their
//! packet counters and the figures the control thread, the metrics endpoint and the handoff's
//! "done" step read. Everything here is an atomic, a lock-free channel or an `ArcSwap`: neither
//! side ever waits on the other, and nothing a core does per frame allocates, except queueing a
//! received control frame's payload.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::appliance::Services;
use crate::cluster::{Bucket, NodeId, BUCKETS};
use crate::control::{Membership, Snapshot};
use crate::counters::CoreCounters;

/// Wire frames queued between the cores and the control thread, each way. Heartbeats are a few
/// per interval per node: this only bounds a burst of forged ones.
const CHANNEL_DEPTH: usize = 1024;

/// Wire control frames each member's MAC may queue ahead of the rest per control tick (a
/// member sends a heartbeat, and the coordinator a plan, per interval on the wire; a tick is a
/// quarter interval or less). A flood that forges a member's MAC spends that member's
/// allowance, and its frames then queue with everyone else's: it can starve only the member
/// whose MAC it forges, on the wire path only.
pub(crate) const MEMBER_ALLOWANCE: u32 = 8;

/// Frames from strangers the control thread authenticates per loop turn (after every member's):
/// a flood of forged control frames costs the control thread a bounded share of its time.
const STRANGERS_PER_TURN: usize = 256;

/// What the packet cores and the control thread share.
pub struct ControlLink {
    /// The ownership snapshot in force; cores reload it when `version` changes.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    pub(crate) version: AtomicU64,
    /// Control messages to send on the wire port (payload only; core 0 frames and sends them).
    pub(crate) wire_out: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Control frames received on the wire port from a member's MAC, within its allowance
    /// (payload only): the control thread reads these first.
    wire_in_members: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Every other control frame received on the wire port (payload only).
    wire_in: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Wire control frames the cores could not queue for the control thread: [members, others].
    pub(crate) wire_in_dropped: [AtomicU64; 2],
    /// The node MAC of each live member (index `id - 1`; 0 = none), as its authenticated
    /// heartbeats give it, 48 bits in a u64.
    member_macs: [AtomicU64; 64],
    /// Frames each member's MAC may still queue ahead this tick (refilled by the control
    /// thread to [`MEMBER_ALLOWANCE`]).
    member_allowance: [AtomicU32; 64],
    /// Per packet core, in `dataplane.cores` order: what it publishes.
    pub(crate) cores: Vec<CoreLink>,
    /// Set while the local service fails its health check: cores take no new TCP connection.
    pub(crate) refuse_new: AtomicBool,
    /// Whether the wire port has link, as core 0 last read it.
    pub(crate) wire_link_up: AtomicBool,
    /// Peers that announce a failing service (bit `id - 1`).
    pub(crate) refusing_peers: AtomicU64,
    /// The health-checked TCP port whose refusals cores hold back (0: none).
    pub(crate) hold_refusals_on: AtomicU32,
    /// Mbufs out of the pool, as core 0 last saw.
    pub(crate) mbufs_in_use: AtomicU64,
    /// Appliance mode's services (rules, backend tables, backend MACs); cores reload them when
    /// `services_version` changes.
    pub(crate) services: ArcSwap<Services>,
    pub(crate) services_version: AtomicU64,
    /// Whole frames the control thread sends on the wire port (ARP requests and neighbour
    /// solicitations for backends; core 0 sends them).
    pub(crate) frames_out: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// ARP replies and neighbour advertisements the cores copied for the control thread,
    /// while `wants_neighbours` is set.
    neighbours_in: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    pub(crate) wants_neighbours: AtomicBool,
}

/// What one packet core publishes: its packet counters and its figures. One writer (its core),
/// which stores relaxed; readers (the control thread, the metrics endpoint, the exit report)
/// load relaxed. Cache-aligned so that two cores never share a line. A new per-core figure is
/// one field here, one store in the core, one metric line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct CoreLink {
    /// Its packet counters (stored per burst).
    pub(crate) counters: CoreCounters,
    /// Flows in its flow table.
    pub(crate) flows: AtomicU64,
    /// Nanoseconds spent on polls that received frames, from its start (the rest of its time
    /// it polled empty queues or slept).
    pub(crate) busy_ns: AtomicU64,
    /// Live flows (not half-open) its flow table had to forget to make room.
    pub(crate) evictions: AtomicU64,
    /// Half-open flows its flow tables (own and learned) forgot or never tracked, their
    /// half-open share being full (see `FlowTable`'s admission).
    pub(crate) half_open_dropped: AtomicU64,
    /// Other new flows its flow tables (own and learned) did not track, being full, because
    /// only their first packet was seen (see `FlowTable`'s admission).
    pub(crate) turned_away: AtomicU64,
    /// [`crate::pipeline::Pipeline::duplicate_risk`].
    pub(crate) duplicate_risk: AtomicU64,
    /// Burst processing time over the last second, ns: p50, p99, p99.9, max.
    pub(crate) burst_latency_ns: [AtomicU64; 4],
    /// Live flows per bucket, written for the buckets this node is releasing.
    pub(crate) bucket_flows: BucketFlows,
    /// The snapshot version `bucket_flows` was last computed for.
    pub(crate) bucket_flows_version: AtomicU64,
    /// The snapshot version this core decides under, with [`FOLLOWS_ON_WAKE`] set while it
    /// sleeps (or has not started): it then reads the version before it decides anything, so
    /// it counts as having adopted any snapshot. See [`ControlLink::adopted_by_all`].
    pub(crate) decides_under: AtomicU64,
    /// Wire polls that returned a whole burst: the receive queue was backed up, and frames
    /// (heartbeats among them) may have been lost before the core saw them.
    pub(crate) wire_full_bursts: AtomicU64,
    /// Its loop turns, published every few turns and after every sleep: a count that stops
    /// while the core is awake is a stalled core.
    pub(crate) loops: AtomicU64,
    /// What it sent to each backend (appliance mode), by backend id.
    pub(crate) backends: BackendFigures,
}

/// One core's appliance counts ([`crate::pipeline::ApplianceCounts`]) as the control thread
/// reads them: per backend id (0 unused, up to [`crate::config::MAX_BACKENDS`]), allocated once
/// when the link is made, so that neither a reload nor a frame allocates.
#[derive(Debug)]
pub(crate) struct BackendFigures {
    frames: Box<[AtomicU64]>,
    bytes: Box<[AtomicU64]>,
    new_flows: Box<[AtomicU64]>,
    /// Flows in the core's flow table per backend (a gauge).
    flows: Box<[AtomicU64]>,
    /// Datagrams too big for an encapsulated path.
    pub(crate) too_big: AtomicU64,
    /// Datagrams without DF cut for an encapsulated path.
    pub(crate) fragmented: AtomicU64,
}

impl Default for BackendFigures {
    fn default() -> Self {
        let ids = || {
            (0..=crate::config::MAX_BACKENDS)
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        BackendFigures {
            frames: ids(),
            bytes: ids(),
            new_flows: ids(),
            flows: ids(),
            too_big: AtomicU64::new(0),
            fragmented: AtomicU64::new(0),
        }
    }
}

/// One backend's counts: what one core, or all of them, sent it, and its flows in their flow
/// tables now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BackendCounts {
    pub frames: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub flows: u64,
}

impl BackendFigures {
    /// From its core: its pipeline's counts (relaxed stores; only the ids it has room for,
    /// which are the ids of the services it has seen).
    pub(crate) fn store(&self, counts: &crate::pipeline::ApplianceCounts) {
        for (out, ins) in [
            (&self.frames, &counts.frames),
            (&self.bytes, &counts.bytes),
            (&self.new_flows, &counts.new_flows),
            (&self.flows, &counts.flows),
        ] {
            for (o, &n) in out.iter().zip(ins) {
                o.store(n, Relaxed);
            }
        }
        self.too_big.store(counts.too_big, Relaxed);
        self.fragmented.store(counts.fragmented, Relaxed);
    }

    /// What the core sent backend `id` (zero for an id it never saw).
    pub(crate) fn get(&self, id: u16) -> BackendCounts {
        let at = |v: &[AtomicU64]| v.get(usize::from(id)).map_or(0, |a| a.load(Relaxed));
        BackendCounts {
            frames: at(&self.frames),
            bytes: at(&self.bytes),
            new_flows: at(&self.new_flows),
            flows: at(&self.flows),
        }
    }
}

/// The bit of [`CoreLink::decides_under`] that says the core will read the snapshot version
/// before its next decision (it sleeps, or has not started).
pub(crate) const FOLLOWS_ON_WAKE: u64 = 1 << 63;

impl CoreLink {
    fn new() -> CoreLink {
        CoreLink {
            decides_under: AtomicU64::new(FOLLOWS_ON_WAKE),
            ..CoreLink::default()
        }
    }

    /// From its core: it now decides under snapshot `version` (and is awake).
    ///
    /// Sequentially consistent with [`ControlLink::publish`]'s version bump and
    /// [`ControlLink::adopted_by_all`]'s reads: a core that clears [`FOLLOWS_ON_WAKE`] and then
    /// reads the version either sees the new one, or the control thread sees it awake and waits
    /// for it.
    #[inline]
    pub(crate) fn decide_under(&self, version: u64) {
        self.decides_under.store(version, SeqCst);
    }

    /// From its core: it goes to sleep having decided under `version`.
    #[inline]
    pub(crate) fn sleep_after(&self, version: u64) {
        self.decides_under.store(version | FOLLOWS_ON_WAKE, SeqCst);
    }

    /// Whether the core decides under `version` or newer, or reads it before deciding anything.
    fn has_adopted(&self, version: u64) -> bool {
        let state = self.decides_under.load(SeqCst);
        state & FOLLOWS_ON_WAKE != 0 || state >= version
    }

    /// Whether the core sleeps (or has not started): it loops again when it wakes.
    pub(crate) fn asleep(&self) -> bool {
        self.decides_under.load(Relaxed) & FOLLOWS_ON_WAKE != 0
    }
}

/// One count per bucket (indexed by [`Bucket::index`]).
#[derive(Debug)]
pub(crate) struct BucketFlows(Box<[AtomicU32]>);

impl Default for BucketFlows {
    fn default() -> Self {
        BucketFlows((0..BUCKETS).map(|_| AtomicU32::new(0)).collect())
    }
}

impl std::ops::Index<Bucket> for BucketFlows {
    type Output = AtomicU32;

    #[inline]
    fn index(&self, b: Bucket) -> &AtomicU32 {
        &self.0[b.index()]
    }
}

impl std::fmt::Debug for ControlLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlLink")
            .field("version", &self.version.load(Relaxed))
            .field("epoch", &self.snapshot.load().epoch())
            .finish()
    }
}

impl ControlLink {
    pub fn new(cores: usize, initial: Arc<Snapshot>) -> ControlLink {
        ControlLink {
            snapshot: ArcSwap::new(initial),
            version: AtomicU64::new(1),
            wire_out: crossbeam_channel::bounded(CHANNEL_DEPTH),
            wire_in_members: crossbeam_channel::bounded(CHANNEL_DEPTH),
            wire_in: crossbeam_channel::bounded(CHANNEL_DEPTH),
            wire_in_dropped: Default::default(),
            member_macs: std::array::from_fn(|_| AtomicU64::new(0)),
            member_allowance: std::array::from_fn(|_| AtomicU32::new(0)),
            cores: (0..cores).map(|_| CoreLink::new()).collect(),
            mbufs_in_use: AtomicU64::new(0),
            refuse_new: AtomicBool::new(false),
            wire_link_up: AtomicBool::new(true),
            refusing_peers: AtomicU64::new(0),
            hold_refusals_on: AtomicU32::new(0),
            services: ArcSwap::new(Services::none()),
            services_version: AtomicU64::new(0),
            frames_out: crossbeam_channel::bounded(CHANNEL_DEPTH),
            neighbours_in: crossbeam_channel::bounded(CHANNEL_DEPTH),
            wants_neighbours: AtomicBool::new(false),
        }
    }

    /// From the control thread: a whole frame for core 0 to send on the wire (dropped if the
    /// queue is full: requests are repeated).
    pub fn send_frame(&self, frame: Vec<u8>) {
        let _ = self.frames_out.0.try_send(frame);
    }

    /// From a core: a neighbour answer to the node's MAC, for the control thread (only while
    /// it wants them; dropped if the queue is full: requests are repeated).
    #[inline]
    pub(crate) fn neighbour_answer(&self, frame: &[u8]) {
        if self.wants_neighbours.load(Relaxed) && crate::appliance::neighbours::is_answer(frame) {
            let _ = self.neighbours_in.0.try_send(frame.to_vec());
        }
    }

    /// The neighbour answers the cores copied since the last call.
    pub fn neighbour_answers(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.neighbours_in.1.try_iter()
    }

    /// New services for the cores (at start, after a reload, a learned backend MAC or an
    /// agreed change of backend health); they adopt them between bursts.
    pub fn publish_services(&self, services: Arc<Services>) {
        self.services.store(services);
        self.services_version.fetch_add(1, SeqCst);
    }

    /// The services in force.
    pub fn services(&self) -> Arc<Services> {
        self.services.load_full()
    }

    /// The service state the cores apply, read between bursts.
    #[inline]
    pub(crate) fn service(&self) -> crate::pipeline::ServiceState {
        let port = self.hold_refusals_on.load(Relaxed);
        crate::pipeline::ServiceState {
            refuse_new: self.refuse_new.load(Relaxed),
            refusing_peers: self.refusing_peers.load(Relaxed),
            hold_refusals_on: u16::try_from(port).ok().filter(|&p| p != 0),
        }
    }

    /// Connections the local service refused whose RST the cores held back, over all cores.
    pub(crate) fn service_refusals(&self) -> u64 {
        let i = crate::pipeline::DropReason::ServiceRefused.index();
        self.cores
            .iter()
            .map(|c| c.counters.dropped[i].load(Relaxed))
            .sum()
    }

    /// Makes `snapshot` the cores' current one; returns its version.
    pub(crate) fn publish(&self, snapshot: Arc<Snapshot>) -> u64 {
        self.snapshot.store(snapshot);
        self.version.fetch_add(1, SeqCst) + 1
    }

    /// The snapshot version the cores must follow (read before deciding after a sleep).
    #[inline]
    pub(crate) fn current_version(&self) -> u64 {
        self.version.load(SeqCst)
    }

    /// Whether every core decides under snapshot `version` (or newer), or will read it before
    /// its next decision: only then may the node announce what the snapshot says (a phase it
    /// reached acknowledges that it acts on it).
    pub(crate) fn adopted_by_all(&self, version: u64) -> bool {
        self.cores.iter().all(|c| c.has_adopted(version))
    }

    /// Waits until [`ControlLink::adopted_by_all`] (`version`), at most `patience`; returns
    /// the indexes of the cores that had not adopted it by then (empty: all had).
    pub(crate) fn await_adoption(&self, version: u64, patience: std::time::Duration) -> Vec<usize> {
        let start = std::time::Instant::now();
        loop {
            if self.adopted_by_all(version) {
                return Vec::new();
            }
            if start.elapsed() >= patience {
                return (0..self.cores.len())
                    .filter(|&i| !self.cores[i].has_adopted(version))
                    .collect();
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// From a core: a control frame (the whole Ethernet frame) arrived on the wire. Queued
    /// ahead if its source is a member's MAC within that member's allowance, else behind;
    /// counted if its queue is full. Never blocks.
    pub(crate) fn received_on_wire(&self, frame: &[u8]) {
        let payload = frame.get(14..).unwrap_or_default();
        let queue = usize::from(
            frame
                .get(6..12)
                .is_some_and(|src| self.member_may_queue(src)),
        );
        let (tx, dropped) = match queue {
            0 => (&self.wire_in.0, &self.wire_in_dropped[1]),
            _ => (&self.wire_in_members.0, &self.wire_in_dropped[0]),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            tx.try_send(payload.to_vec())
        {
            dropped.fetch_add(1, Relaxed);
        }
    }

    /// Whether `src` is a live member's MAC with allowance left this tick (spending one).
    fn member_may_queue(&self, src: &[u8]) -> bool {
        let mut mac = [0u8; 8];
        mac[2..].copy_from_slice(src);
        let mac = u64::from_be_bytes(mac);
        if mac == 0 {
            return false;
        }
        self.member_macs
            .iter()
            .position(|m| m.load(Relaxed) == mac)
            .is_some_and(|i| {
                self.member_allowance[i]
                    .fetch_update(Relaxed, Relaxed, |a| a.checked_sub(1))
                    .is_ok()
            })
    }

    /// From the control thread, every tick: the live members' MACs, and a fresh allowance.
    pub(crate) fn set_members(&self, m: &Membership) {
        for (i, (mac, allowance)) in self
            .member_macs
            .iter()
            .zip(&self.member_allowance)
            .enumerate()
        {
            let known = NodeId::new(i as u8 + 1)
                .and_then(|id| m.peer(id))
                .filter(|p| p.alive)
                .and_then(|p| p.heartbeat)
                .map_or(0, |hb| {
                    let mut b = [0u8; 8];
                    b[2..].copy_from_slice(&hb.node_mac);
                    u64::from_be_bytes(b)
                });
            mac.store(known, Relaxed);
            allowance.store(if known == 0 { 0 } else { MEMBER_ALLOWANCE }, Relaxed);
        }
    }

    /// From the control thread: the next wire control payloads to authenticate, members' first
    /// (all of them), then at most [`STRANGERS_PER_TURN`] others.
    pub(crate) fn wire_received(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.wire_in_members
            .1
            .try_iter()
            .chain(self.wire_in.1.try_iter().take(STRANGERS_PER_TURN))
    }

    /// What every core together sent backend `id`.
    pub(crate) fn backend_counts(&self, id: u16) -> BackendCounts {
        self.cores.iter().fold(BackendCounts::default(), |t, c| {
            let n = c.backends.get(id);
            BackendCounts {
                frames: t.frames + n.frames,
                bytes: t.bytes + n.bytes,
                new_flows: t.new_flows + n.new_flows,
                flows: t.flows + n.flows,
            }
        })
    }

    /// Flow counts of `buckets` summed over cores, if every core has counted them for the
    /// current snapshot.
    pub(crate) fn releasing_counts(&self, buckets: &[Bucket]) -> Option<Vec<(Bucket, u32)>> {
        let version = self.version.load(Relaxed);
        if self
            .cores
            .iter()
            .any(|c| c.bucket_flows_version.load(Relaxed) != version)
        {
            return None;
        }
        Some(
            buckets
                .iter()
                .map(|&b| {
                    let n = self
                        .cores
                        .iter()
                        .map(|c| c.bucket_flows[b].load(Relaxed))
                        .sum();
                    (b, n)
                })
                .collect(),
        )
    }
}

/// Wire frames carry a control message behind a 2-byte length, because Ethernet pads short
/// frames and the message's MAC covers its exact bytes.
pub(crate) fn wire_payload(frame_payload: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([
        *frame_payload.first()?,
        *frame_payload.get(1)?,
    ]));
    frame_payload.get(2..2 + len)
}

/// A whole Ethernet frame carrying `message` from `node_mac` to everyone.
pub(crate) fn wire_frame(node_mac: [u8; 6], message: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + message.len());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&node_mac);
    f.extend_from_slice(&crate::wire::CONTROL_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&(message.len() as u16).to_be_bytes());
    f.extend_from_slice(message);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&crate::wire::CONTROL_ETHERTYPE.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn snapshot() -> Arc<Snapshot> {
        let me = crate::cluster::Member {
            id: NodeId::new(1).unwrap(),
            weight: crate::cluster::Weight::new(100).unwrap(),
        };
        let table = crate::cluster::OwnershipTable::build(1, &[me]).unwrap();
        Arc::new(crate::pipeline::stable_snapshot(&table))
    }

    #[test]
    fn a_snapshot_is_adopted_when_every_awake_core_decides_under_it() {
        let link = ControlLink::new(2, snapshot());
        // Cores that have not started read the version before deciding anything.
        assert!(link.adopted_by_all(link.current_version()));
        link.cores[0].decide_under(1);
        link.cores[1].decide_under(1);
        let v = link.publish(snapshot());
        assert_eq!(v, 2);
        assert!(!link.adopted_by_all(v), "both cores still decide under 1");
        link.cores[0].decide_under(v);
        assert!(!link.adopted_by_all(v));
        assert_eq!(
            link.await_adoption(v, std::time::Duration::from_millis(5)),
            vec![1],
            "core 1 is late"
        );
        // Asleep, core 1 reads the version before its next decision: it counts.
        link.cores[1].sleep_after(1);
        assert!(link.adopted_by_all(v));
        // Awake again under the old version (it has not looked yet): not any more.
        link.cores[1].decide_under(1);
        assert!(!link.adopted_by_all(v));
        link.cores[1].decide_under(v);
        assert!(link.await_adoption(v, std::time::Duration::ZERO).is_empty());
    }

    #[test]
    fn a_core_that_wakes_sees_every_snapshot_published_while_it_slept() {
        // A core marks itself awake, then reads the version; the control thread publishes,
        // then reads the marks: whatever the interleaving, either the core reads the new
        // version or the control thread sees it awake under the old one.
        for _ in 0..200 {
            let link = Arc::new(ControlLink::new(1, snapshot()));
            link.cores[0].sleep_after(1);
            let core = {
                let link = Arc::clone(&link);
                std::thread::spawn(move || {
                    link.cores[0].decide_under(1);
                    link.current_version()
                })
            };
            let v = link.publish(snapshot());
            let control_sees_adopted = link.adopted_by_all(v);
            let core_read = core.join().unwrap();
            assert!(
                core_read == v || !control_sees_adopted,
                "the core decides under {core_read} while the control thread announced {v}"
            );
        }
    }

    #[test]
    fn members_frames_queue_ahead_of_a_flood_within_their_allowance() {
        let link = ControlLink::new(1, Arc::new(Snapshot::empty()));
        let member = [2, 0xcc, 0, 0, 0, 2];
        link.member_macs[1].store(0x02cc_0000_0002, Relaxed);
        link.member_allowance[1].store(2, Relaxed);
        // A flood from strangers (and from nobody: a zero MAC is nobody's) fills their queue.
        for i in 0..CHANNEL_DEPTH + 5 {
            let src = if i == 0 {
                [0; 6]
            } else {
                [2, 0, 0, 0, 0, (i % 250) as u8]
            };
            link.received_on_wire(&frame(src, b"forged"));
        }
        assert_eq!(
            link.wire_in_dropped[1].load(Relaxed),
            5,
            "every drop counted"
        );
        // The member's frames still get through, ahead, within its allowance; past it they
        // queue with the strangers' (full: counted).
        for n in 0..3u8 {
            link.received_on_wire(&frame(member, &[n]));
        }
        assert_eq!(link.wire_in_dropped[1].load(Relaxed), 6);
        assert_eq!(link.wire_in_dropped[0].load(Relaxed), 0);
        let turn: Vec<Vec<u8>> = link.wire_received().collect();
        assert_eq!(&turn[..2], &[vec![0], vec![1]], "members first");
        assert_eq!(
            turn.len(),
            2 + STRANGERS_PER_TURN,
            "then a bounded share of the rest"
        );
        // A frame too short for a header reaches the control thread as an empty payload (and
        // is refused there as malformed), not lost on the way.
        while link.wire_received().next().is_some() {}
        link.received_on_wire(&[0xff; 10]);
        assert_eq!(
            link.wire_received().collect::<Vec<_>>(),
            vec![Vec::<u8>::new()]
        );
    }

    #[test]
    fn a_core_link_has_cache_lines_of_its_own() {
        assert_eq!(std::mem::align_of::<CoreLink>(), 64);
        assert_eq!(std::mem::size_of::<CoreLink>() % 64, 0);
    }
}
