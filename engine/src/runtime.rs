//! The control thread: it owns the side UDP socket, the timers, the operator's control socket
//! and the membership state machine ([`crate::control::Membership`]), and talks to the packet
//! cores only through [`ControlLink`]: lock-free channels for wire heartbeat frames, an
//! [`ArcSwap`] for the ownership snapshot the cores pick up between bursts, and per-core atomics
//! for the flow counts the handoff's "done" step needs. The packet cores never wait on it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use siphasher::sip::SipHasher13;

use crate::cluster::{Bucket, NodeId, Weight, BUCKETS};
use crate::config::{Loaded, Policy as ConfigPolicy};
use crate::control::{self, Event, Load, Membership, Output, Path, Refusal, Snapshot, Timeline};
use crate::counters::CoreCounters;

/// Wire frames queued between the cores and the control thread, each way. Heartbeats are a few
/// per interval per node: this only bounds a burst of forged ones.
const CHANNEL_DEPTH: usize = 1024;

/// Wire control frames each member's MAC may queue ahead of the rest per control tick (a
/// member sends a heartbeat, and the coordinator a plan, per interval on the wire; a tick is a
/// quarter interval or less). A flood that forges a member's MAC spends that member's
/// allowance, and its frames then queue with everyone else's: it can starve only the member
/// whose MAC it forges, on the wire path only.
pub const MEMBER_ALLOWANCE: u32 = 8;

/// Frames from strangers the control thread authenticates per loop turn (after every member's):
/// a flood of forged control frames costs the control thread a bounded share of its time.
const STRANGERS_PER_TURN: usize = 256;

/// What the packet cores and the control thread share.
pub struct ControlLink {
    /// The ownership snapshot in force; cores reload it when `version` changes.
    pub snapshot: ArcSwap<Snapshot>,
    pub version: AtomicU64,
    /// Control messages to send on the wire port (payload only; core 0 frames and sends them).
    pub wire_out: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Control frames received on the wire port from a member's MAC, within its allowance
    /// (payload only): the control thread reads these first.
    pub wire_in_members: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Every other control frame received on the wire port (payload only).
    pub wire_in: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Wire control frames the cores could not queue for the control thread: [members, others].
    pub wire_in_dropped: [AtomicU64; 2],
    /// The node MAC of each live member (index `id - 1`; 0 = none), as its authenticated
    /// heartbeats give it, 48 bits in a u64.
    pub member_macs: [AtomicU64; 64],
    /// Frames each member's MAC may still queue ahead this tick (refilled by the control
    /// thread to [`MEMBER_ALLOWANCE`]).
    pub member_allowance: [AtomicU32; 64],
    /// Per core: live flows per bucket, written for the buckets this node is releasing.
    pub bucket_flows: Vec<Box<[AtomicU32]>>,
    /// Per core: the snapshot version `bucket_flows` was last computed for.
    pub bucket_flows_version: Vec<AtomicU64>,
    /// Per core: flows in its flow table.
    pub core_flows: Vec<AtomicU64>,
    /// Per core: nanoseconds spent on polls that received frames, from its start (the rest of
    /// its time it polled empty queues or slept).
    pub core_busy_ns: Vec<AtomicU64>,
    /// Per core: its packet counters.
    pub counters: Vec<CoreCounters>,
    /// Set while the local service fails its health check: cores take no new TCP connection.
    pub refuse_new: AtomicBool,
    /// Whether the wire port has link, as core 0 last read it.
    pub wire_link_up: AtomicBool,
    /// Peers that announce a failing service (bit `id - 1`).
    pub refusing_peers: AtomicU64,
    /// The health-checked TCP port whose refusals cores hold back (0: none).
    pub hold_refusals_on: AtomicU32,
    /// Per core: live flows (not half-open) its flow table had to forget to make room.
    pub core_evictions: Vec<AtomicU64>,
    /// Per core: half-open flows its flow tables (own and learned) forgot or never tracked,
    /// their half-open share being full (see `FlowTable`'s admission).
    pub core_half_open_dropped: Vec<AtomicU64>,
    /// Per core: [`crate::pipeline::Pipeline::duplicate_risk`].
    pub core_duplicate_risk: Vec<AtomicU64>,
    /// Mbufs out of the pool, as core 0 last saw.
    pub mbufs_in_use: AtomicU64,
    /// Per core: burst processing time over the last second, ns: p50, p99, p99.9, max.
    pub burst_latency_ns: Vec<[AtomicU64; 4]>,
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
            bucket_flows: (0..cores)
                .map(|_| (0..BUCKETS).map(|_| AtomicU32::new(0)).collect())
                .collect(),
            bucket_flows_version: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            core_flows: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            core_busy_ns: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            counters: (0..cores).map(|_| CoreCounters::default()).collect(),
            mbufs_in_use: AtomicU64::new(0),
            core_evictions: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            core_half_open_dropped: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            core_duplicate_risk: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            refuse_new: AtomicBool::new(false),
            wire_link_up: AtomicBool::new(true),
            refusing_peers: AtomicU64::new(0),
            hold_refusals_on: AtomicU32::new(0),
            burst_latency_ns: (0..cores).map(|_| Default::default()).collect(),
        }
    }

    /// The service state the cores apply, read between bursts.
    #[inline]
    pub fn service(&self) -> crate::pipeline::ServiceState {
        let port = self.hold_refusals_on.load(Relaxed);
        crate::pipeline::ServiceState {
            refuse_new: self.refuse_new.load(Relaxed),
            refusing_peers: self.refusing_peers.load(Relaxed),
            hold_refusals_on: u16::try_from(port).ok().filter(|&p| p != 0),
        }
    }

    /// Connections the local service refused whose RST the cores held back, over all cores.
    pub fn service_refusals(&self) -> u64 {
        let i = crate::pipeline::DropReason::ServiceRefused.index();
        self.counters
            .iter()
            .map(|c| c.dropped[i].load(Relaxed))
            .sum()
    }

    /// Makes `snapshot` the cores' current one.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        self.snapshot.store(snapshot);
        self.version.fetch_add(1, Relaxed);
    }

    /// From a core: a control frame (the whole Ethernet frame) arrived on the wire. Queued
    /// ahead if its source is a member's MAC within that member's allowance, else behind;
    /// counted if its queue is full. Never blocks.
    pub fn received_on_wire(&self, frame: &[u8]) {
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
    fn set_members(&self, m: &Membership) {
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
    fn wire_received(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.wire_in_members
            .1
            .try_iter()
            .chain(self.wire_in.1.try_iter().take(STRANGERS_PER_TURN))
    }

    /// Flow counts of `buckets` summed over cores, if every core has counted them for the
    /// current snapshot.
    fn releasing_counts(&self, buckets: &[Bucket]) -> Option<Vec<(Bucket, u32)>> {
        let version = self.version.load(Relaxed);
        if self
            .bucket_flows_version
            .iter()
            .any(|v| v.load(Relaxed) != version)
        {
            return None;
        }
        Some(
            buckets
                .iter()
                .map(|&b| {
                    let n = self
                        .bucket_flows
                        .iter()
                        .map(|c| c[b.index()].load(Relaxed))
                        .sum();
                    (b, n)
                })
                .collect(),
        )
    }
}

/// Wire frames carry a control message behind a 2-byte length, because Ethernet pads short
/// frames and the message's MAC covers its exact bytes.
pub fn wire_payload(frame_payload: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([
        *frame_payload.first()?,
        *frame_payload.get(1)?,
    ]));
    frame_payload.get(2..2 + len)
}

/// A whole Ethernet frame carrying `message` from `node_mac` to everyone.
pub fn wire_frame(node_mac: [u8; 6], message: &[u8]) -> Vec<u8> {
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

/// What every node of a cluster must agree on, hashed: nodes with another digest are refused.
pub fn config_digest(loaded: &Loaded) -> u64 {
    let c = &loaded.config;
    let canonical = format!(
        "v1 ip={} ip6={:?} mac={} affinity={:?} policy={:?} interval={:?} dead_after={} learn={:?}",
        c.cluster.ip,
        c.cluster.ip6,
        c.cluster.mac,
        c.cluster.affinity,
        c.cluster.policy,
        c.control.interval.0,
        c.control.dead_after,
        c.control.handoff_learn.0,
    );
    let mut h = SipHasher13::new_with_keys(0x636c6f6e65, 0x636c7573746572);
    std::hash::Hasher::write(&mut h, canonical.as_bytes());
    std::hash::Hasher::finish(&h)
}

/// The membership configuration a node's YAML describes.
pub fn membership_config(loaded: &Loaded, incarnation: u64) -> control::Config {
    let c = &loaded.config;
    let me = NodeId::new(c.node.id).expect("validated");
    let mut m = control::Config::new(
        me,
        incarnation,
        c.node.mac.0,
        &loaded.secret,
        config_digest(loaded),
    );
    m.weight = Weight::new(c.node.weight).expect("validated: nonzero");
    m.policy = match c.cluster.policy {
        ConfigPolicy::Hash => control::Policy::Hash,
        ConfigPolicy::Weighted => control::Policy::Weighted,
        ConfigPolicy::ByLoad => control::Policy::ByLoad,
    };
    m.interval = c.control.interval.0.as_nanos() as u64;
    m.dead_after = c.control.dead_after;
    m.learn = c.control.handoff_learn.0.as_nanos() as u64;
    m.release_deadline = c.control.release_deadline.0.as_nanos() as u64;
    m
}

/// What the control thread last knew, for the metrics endpoint (published every tick).
#[derive(Debug, Clone, Default)]
pub struct ControlView {
    pub epoch: u64,
    /// The control message format version this node speaks.
    pub protocol_version: u8,
    /// Buckets in which this node takes new flows.
    pub accepting: u32,
    pub moving: u32,
    pub draining: bool,
    /// The health checker's verdict (None: no health check configured), whether this node
    /// refuses new connections, and its checks so far (all, failed).
    pub healthy: Option<bool>,
    pub refusing: bool,
    pub health_checks: (u64, u64),
    /// Live members: (id, weight).
    pub members: Vec<(u8, u32)>,
    pub peers: Vec<PeerView>,
    /// Refused control messages by [path][reason].
    pub refused: [[u64; Refusal::ALL.len()]; 2],
    /// Accepted control messages by path.
    pub accepted: [u64; 2],
}

/// One peer in [`ControlView`].
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    pub node: u8,
    pub alive: bool,
    /// Milliseconds since its last accepted message, per path (UDP, wire).
    pub last_seen_ms_ago: [Option<u64>; 2],
    /// Heartbeats expected but not heard, and messages lost (sequence gaps), per path.
    pub missed: [u64; 2],
    pub lost: [u64; 2],
    /// It announces a failing service.
    pub refusing: bool,
}

fn control_view(m: &Membership, me: NodeId, now: u64) -> ControlView {
    let snapshot = m.snapshot();
    let mut refused = [[0u64; Refusal::ALL.len()]; 2];
    for path in Path::ALL {
        for reason in Refusal::ALL {
            refused[path.index()][reason.index()] = m.refused(path, reason);
        }
    }
    ControlView {
        accepted: Path::ALL.map(|p| m.accepted(p)),
        epoch: m.epoch(),
        protocol_version: m.speaks(),
        accepting: snapshot.accepting_count(me),
        moving: snapshot.moving_count(),
        draining: m.draining(),
        healthy: None,
        refusing: m.refusing(),
        health_checks: (0, 0),
        members: m
            .live_members()
            .iter()
            .map(|mem| (mem.id.get(), mem.weight.get()))
            .collect(),
        peers: (1..=64u8)
            .filter_map(|id| {
                let node = NodeId::new(id)?;
                let p = m.peer(node)?;
                Some(PeerView {
                    node: id,
                    alive: p.alive,
                    last_seen_ms_ago: p
                        .last_seen
                        .map(|t| t.map(|t| now.saturating_sub(t) / 1_000_000)),
                    missed: p.missed,
                    lost: p.lost,
                    refusing: p.heartbeat.is_some_and(|h| h.refusing),
                })
            })
            .collect(),
        refused,
    }
}

/// Requests to the control thread from outside (signals, the operator's socket).
#[derive(Debug, Default)]
pub struct Requests {
    /// SIGTERM / Ctrl-C: drain (up to the deadline), then stop.
    pub terminate: AtomicBool,
}

/// Runs the control thread until the node has stopped; sets `stop_cores` when the packet cores
/// must end (after a drain on SIGTERM, or at once on a second signal).
pub fn control_thread(
    loaded: Loaded,
    link: Arc<ControlLink>,
    requests: Arc<Requests>,
    stop_cores: Arc<AtomicBool>,
) -> Result<(), String> {
    let cfg = &loaded.config;
    let start = Instant::now();
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut m = Membership::new(membership_config(&loaded, incarnation));
    let me = NodeId::new(cfg.node.id).expect("validated");
    let interval = cfg.control.interval.0;
    // Ticks more often than the interval: the state machine sends heartbeats on its own clock.
    let tick = (interval / 4).max(Duration::from_millis(5));

    let socket = match cfg.control.listen {
        Some(addr) => {
            let s = UdpSocket::bind(addr).map_err(|e| {
                format!(
                    "`control.listen`: cannot bind {addr}: {e}\n  fix: use an address of this \
                     node's control network (or leave the key out to use the wire path only)"
                )
            })?;
            s.set_read_timeout(Some(tick)).map_err(|e| e.to_string())?;
            Some(s)
        }
        None => None,
    };
    let operator = match &cfg.control.socket {
        Some(path) => Some(OperatorSocket::bind(path.clone())?),
        None => None,
    };
    let peers: Vec<SocketAddr> = cfg.control.peers.clone();
    let view = Arc::new(ArcSwap::from_pointee(ControlView::default()));
    if let Some(addr) = cfg.control.metrics {
        crate::metrics::serve(addr, cfg.node.id, Arc::clone(&link), Arc::clone(&view))?;
    }
    let health = match &cfg.health {
        Some(h) => Some(
            crate::health::spawn(cfg.node.id, h.clone())
                .map_err(|e| format!("cannot start the health checker: {e}"))?,
        ),
        None => None,
    };
    if health.is_none() {
        tracing::info!(
            node = cfg.node.id,
            "no health section: this node cannot know whether its service is up; it takes its \
             share as soon as it joins"
        );
    }
    let watchdog_span = cfg
        .health
        .as_ref()
        .map(|h| (h.interval.0 + h.timeout.0) * 3)
        .unwrap_or_default();
    let mut drained_by_health = false;
    let mut refusals_seen = 0u64;
    let mut current = loaded.clone();
    let mut last_load = Load::default();
    let mut busy = BusyShare::new(start);
    let mut watchdog_warned = false;
    let owners = OwnerLookup {
        hasher: crate::cluster::BucketHasher::new(&loaded.secret),
        affinity: cfg.cluster.affinity,
        me,
    };
    let mut out = Vec::new();
    let mut terminating_since: Option<Instant> = None;
    let mut timeline = Timeline::default();
    let mut buf = [0u8; 2048];
    let mut next_tick = start;
    let mut next_report = start;
    let now_ns = || start.elapsed().as_nanos() as u64;

    m.handle_tick(now_ns(), &mut out);
    loop {
        // Side channel.
        match &socket {
            Some(s) => {
                if let Ok((n, _from)) = s.recv_from(&mut buf) {
                    m.handle_message(Path::Udp, &buf[..n], now_ns(), &mut out);
                }
            }
            None => std::thread::sleep(tick),
        }
        // Wire heartbeats received by the cores. A payload without a whole length-prefixed
        // message is malformed like any other.
        for payload in link.wire_received() {
            let msg = wire_payload(&payload).unwrap_or_default();
            m.handle_message(Path::Wire, msg, now_ns(), &mut out);
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + tick;
            let busy_ns: u64 = link.core_busy_ns.iter().map(|b| b.load(Relaxed)).sum();
            let flows: u64 = link.core_flows.iter().map(|f| f.load(Relaxed)).sum();
            last_load = Load {
                active_flows: flows.min(u64::from(u32::MAX)) as u32,
                busy_permille: busy.permille(now, busy_ns, link.core_busy_ns.len()),
            };
            m.set_load(last_load);
            // The health verdict: failing drains this node, recovering undrains what it drained.
            if let (Some(h), Some(hc)) = (&health, &cfg.health) {
                // A connection the service refused is evidence: check at once.
                let refusals = link.service_refusals();
                if refusals != refusals_seen {
                    refusals_seen = refusals;
                    h.check_now();
                }
                let healthy = h.healthy();
                // Refuse (and hold back refusals) only while someone else takes new flows: a
                // node alone, or a cluster whose services all fail, answers as best it can.
                let others = m.others_serve();
                m.set_refusing(!healthy && others, now_ns(), &mut out);
                link.refuse_new.store(m.refusing(), Relaxed);
                let hold = if others {
                    u32::from(hc.address.port())
                } else {
                    0
                };
                link.hold_refusals_on.store(hold, Relaxed);
                if !healthy && !drained_by_health && !m.draining() {
                    if h.came_up() {
                        tracing::warn!(
                            node = cfg.node.id,
                            epoch = m.epoch(),
                            "service unhealthy: draining"
                        );
                    } else {
                        tracing::info!(
                            node = cfg.node.id,
                            epoch = m.epoch(),
                            "service not up yet: joining drained until it answers"
                        );
                    }
                    m.drain(now_ns(), &mut out);
                    drained_by_health = true;
                } else if healthy && drained_by_health {
                    tracing::info!(
                        node = cfg.node.id,
                        epoch = m.epoch(),
                        "service healthy: undraining"
                    );
                    m.undrain(now_ns(), &mut out);
                    drained_by_health = false;
                }
                let stalled = h.since_last_check() > watchdog_span;
                if stalled && !watchdog_warned {
                    tracing::error!(
                        node = cfg.node.id,
                        epoch = m.epoch(),
                        "watchdog: the health checker stopped running"
                    );
                }
                watchdog_warned = stalled;
            }
            link.refusing_peers.store(m.refusing_peers(), Relaxed);
            m.set_wire_link(link.wire_link_up.load(Relaxed), now_ns(), &mut out);
            m.handle_tick(now_ns(), &mut out);
            link.set_members(&m);
            let mut v = control_view(&m, me, now_ns());
            if let Some(h) = &health {
                v.healthy = Some(h.healthy());
                v.health_checks = h.checks();
            }
            view.store(Arc::new(v));
        }
        // Flow counts of the buckets this node releases, for the "done" step.
        if now >= next_report {
            next_report = now + interval;
            let snapshot = link.snapshot.load();
            let releasing: Vec<Bucket> = snapshot.releasing(me).collect();
            if !releasing.is_empty() {
                if let Some(counts) = link.releasing_counts(&releasing) {
                    m.report_flows(&counts, now_ns(), &mut out);
                }
            }
        }
        if let Some(op) = &operator {
            let healthy = health.as_ref().map(|h| h.healthy());
            op.serve(
                &mut m,
                &owners,
                &mut current,
                Seen {
                    health: healthy,
                    load: last_load,
                    timeline: &timeline,
                },
                now_ns(),
                &mut out,
            );
        }
        // SIGTERM: drain first, stop when drained or at the deadline; a second signal stops now.
        if requests.terminate.load(Relaxed) {
            match terminating_since {
                None => {
                    tracing::info!(node = cfg.node.id, epoch = m.epoch(), "SIGTERM: draining");
                    terminating_since = Some(Instant::now());
                    m.drain(now_ns(), &mut out);
                }
                Some(since) => {
                    let alone = m.live_members().len() <= 1;
                    if m.is_drained() || alone || since.elapsed() >= cfg.control.drain_deadline.0 {
                        tracing::info!(
                            node = cfg.node.id,
                            epoch = m.epoch(),
                            drained = m.is_drained(),
                            "stopping"
                        );
                        stop_cores.store(true, Relaxed);
                    }
                }
            }
        }
        // Log lines carry the epoch in force when what they report happened: events queued
        // before a new plan keep the old epoch, the plan's adoption and what follows the new
        // one (the outputs are in the order the state machine produced them).
        for o in out.drain(..) {
            if let Output::Event(Event::PlanAdopted { plan, .. }) = &o {
                crate::logging::set_epoch(plan.epoch);
            }
            match o {
                Output::Send {
                    path: Path::Udp,
                    bytes,
                } => {
                    if let Some(s) = &socket {
                        for p in &peers {
                            let _ = s.send_to(&bytes, p);
                        }
                    }
                }
                Output::Send {
                    path: Path::Wire,
                    bytes,
                } => {
                    let _ = link.wire_out.0.try_send(bytes);
                }
                Output::Publish(snapshot) => link.publish(snapshot),
                Output::Event(e) => {
                    timeline.record(unix_ms(), &e);
                    log_event(cfg.node.id, crate::logging::context().1, &e);
                }
            }
        }
        crate::logging::set_epoch(m.epoch());
        if stop_cores.load(Relaxed) {
            return Ok(());
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (the timeline's stamps: comparable across the
/// nodes of one machine, as the lab needs, and readable by an operator).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn log_event(node: u8, epoch: u64, e: &Event) {
    match e {
        Event::PeerUp { node: peer, .. } => tracing::info!(node, epoch, peer = %peer, "peer up"),
        Event::PeerRejoined {
            node: peer,
            incarnation,
        } => {
            tracing::info!(node, epoch, peer = %peer, incarnation, "peer rejoined")
        }
        Event::PeerDead { node: peer } => tracing::warn!(node, epoch, peer = %peer, "peer dead"),
        Event::TakeOver { dead } => {
            tracing::warn!(
                node,
                epoch,
                dead = format!("{dead:#x}"),
                "took over dead nodes' buckets"
            )
        }
        Event::PlanAdopted {
            plan,
            phase,
            members,
            moving,
        } => tracing::info!(
            node,
            epoch,
            plan_epoch = plan.epoch,
            proposer = %plan.proposer,
            ?phase,
            members = ?members.iter().map(|m| m.id.get()).collect::<Vec<_>>(),
            moving,
            "ownership plan adopted"
        ),
        Event::PhaseChanged { plan, phase } => {
            tracing::info!(
                node,
                epoch,
                plan_epoch = plan.epoch,
                ?phase,
                "handoff phase"
            )
        }
        Event::Drained => tracing::info!(node, epoch, "drained: this node owns no bucket"),
        Event::Fenced { fenced: true } => tracing::warn!(
            node,
            epoch,
            "fenced: the wire port has no link; this node owns nothing until it is back"
        ),
        Event::Fenced { fenced: false } => tracing::info!(
            node,
            epoch,
            "fence lifted: the wire link is back and the cluster's plan heard"
        ),
        Event::VersionRefused {
            version,
            node: sender,
            understood: (oldest, newest),
        } => tracing::warn!(
            node,
            epoch,
            version,
            claimed_sender = sender,
            "refused a control message in protocol version {version} (its header claims node \
             {sender}): this node understands versions {oldest} to {newest}; upgrade or \
             downgrade one release at a time"
        ),
    }
}

/// The operator's local control socket: one line in (`drain`, `undrain`, `status`), one JSON
/// line out.
struct OperatorSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl OperatorSocket {
    fn bind(path: PathBuf) -> Result<OperatorSocket, String> {
        // A socket file left by a crashed run is stale: nobody can be listening on it.
        if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            format!(
                "`control.socket`: cannot bind {}: {e}\n  fix: choose a path in a writable \
                 directory that no other node uses",
                path.display()
            )
        })?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(OperatorSocket { listener, path })
    }

    fn serve(
        &self,
        m: &mut Membership,
        owners: &OwnerLookup,
        current: &mut Loaded,
        seen: Seen<'_>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        let Ok((stream, _)) = self.listener.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let reply = match line.trim() {
            cmd if cmd == "drain"
                || cmd == "undrain"
                || cmd.starts_with("drain ")
                || cmd.starts_with("undrain ") =>
            {
                let drain = cmd.starts_with("drain");
                let me = m.config().me;
                match cmd
                    .split_whitespace()
                    .nth(1)
                    .map(|n| n.parse::<u8>().ok().and_then(NodeId::new))
                {
                    None => {
                        m.request(me, drain, now, out);
                        serde_json::json!({"ok": true, "node": me.get(), "draining": drain})
                    }
                    Some(Some(target)) => {
                        m.request(target, drain, now, out);
                        serde_json::json!({"ok": true, "node": target.get(), "draining": drain, "relayed": target != me})
                    }
                    Some(None) => serde_json::json!({"ok": false, "error": "a node id is 1..=64"}),
                }
            }
            "status" => status_json(m, &seen),
            "reload" => reload(current, m, now, out),
            cmd if cmd.starts_with("owner-of ") => owners.answer(m.snapshot(), &cmd[9..]),
            other => {
                serde_json::json!({"ok": false, "error": format!("unknown command `{other}`")})
            }
        };
        let mut w = &stream;
        let _ = writeln!(w, "{reply}");
    }
}

impl Drop for OperatorSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Keys `reload` applies to a running node; any other change needs a restart.
const LIVE_KEYS: &[&str] = &["node.weight"];

/// Re-reads the node's YAML: validates it, lists what changed, applies what can change live and
/// refuses, changing nothing, if anything else changed or the file is broken.
fn reload(
    current: &mut Loaded,
    m: &mut Membership,
    now: u64,
    out: &mut Vec<Output>,
) -> serde_json::Value {
    let next = match crate::config::Config::load(&current.path) {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "reload refused: nothing changed");
            return serde_json::json!({"ok": false, "error": e.to_string(), "changed": []});
        }
    };
    let mut changed = Vec::new();
    let (before, after) = (
        serde_json::to_value(&current.config).unwrap_or_default(),
        serde_json::to_value(&next.config).unwrap_or_default(),
    );
    diff_keys("", &before, &after, &mut changed);
    if next.secret != current.secret {
        changed.push("cluster.secret_file (contents)".to_owned());
    }
    let fixed: Vec<&String> = changed
        .iter()
        .filter(|k| !LIVE_KEYS.contains(&k.as_str()))
        .collect();
    if !fixed.is_empty() {
        let error =
            format!(
            "these keys cannot change while the node runs: {}; nothing was applied (restart the \
             node, draining it first, to change them)",
            fixed.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        );
        tracing::warn!(%error, "reload refused");
        return serde_json::json!({"ok": false, "error": error, "changed": changed});
    }
    if next.config.node.weight != current.config.node.weight {
        if let Some(w) = Weight::new(next.config.node.weight) {
            tracing::info!(
                from = current.config.node.weight,
                to = next.config.node.weight,
                epoch = m.epoch(),
                "reload: weight changed"
            );
            m.set_weight(w, now, out);
        }
    }
    *current = next;
    serde_json::json!({"ok": true, "changed": changed, "applied": changed})
}

/// Dotted keys whose values differ between two JSON trees.
fn diff_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let null = serde_json::Value::Null;
                diff_keys(
                    &path,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// `owner-of SRC_IP:PORT DST_IP:PORT [tcp|udp]`: which node owns a flow, and why.
struct OwnerLookup {
    hasher: crate::cluster::BucketHasher,
    affinity: crate::cluster::Affinity,
    me: NodeId,
}

impl OwnerLookup {
    fn answer(&self, snapshot: &Snapshot, args: &str) -> serde_json::Value {
        let parts: Vec<&str> = args.split_whitespace().collect();
        let parsed = match parts.as_slice() {
            [src, dst] => Some((*src, *dst, "tcp")),
            [src, dst, proto] => Some((*src, *dst, *proto)),
            _ => None,
        };
        let Some((src, dst, proto)) = parsed else {
            return serde_json::json!({"ok": false, "error": "usage: owner-of SRC_IP:PORT DST_IP:PORT [tcp|udp]"});
        };
        let (Ok(src), Ok(dst)) = (src.parse::<SocketAddr>(), dst.parse::<SocketAddr>()) else {
            return serde_json::json!({"ok": false, "error": "addresses are IP:PORT ([IPv6]:PORT)"});
        };
        let proto_num = match proto {
            "tcp" => 6,
            "udp" => 17,
            other => {
                return serde_json::json!({"ok": false, "error": format!("protocol `{other}`: tcp or udp")})
            }
        };
        let key = crate::cluster::FlowKey::new(self.affinity, src.ip(), src.port(), proto_num);
        let bucket = self.hasher.bucket(&key);
        let role = snapshot.role(bucket, self.me);
        serde_json::json!({
            "ok": true,
            "flow": format!("{src} -> {dst} {proto}"),
            "affinity": format!("{:?}", self.affinity),
            "bucket": bucket.0,
            "epoch": snapshot.epoch(),
            "phase": format!("{:?}", snapshot.phase()),
            "new_flows_owner": snapshot.new_flow_owner(bucket).map(|n| n.get()),
            "owner_when_settled": snapshot.final_owner(bucket).map(|n| n.get()),
            "role_of_this_node": format!("{role:?}"),
        })
    }
}

/// What the control thread knows of this node beyond the state machine, for `status`.
struct Seen<'a> {
    /// The health checker's verdict, if there is a health check.
    health: Option<bool>,
    load: Load,
    timeline: &'a Timeline,
}

fn status_json(m: &Membership, seen: &Seen<'_>) -> serde_json::Value {
    let Seen {
        health,
        load: self_load,
        timeline,
    } = *seen;
    let snapshot = m.snapshot();
    let me = m.config().me;
    let members: Vec<serde_json::Value> = m
        .live_members()
        .iter()
        .map(|mem| {
            // What each node last said of itself in its heartbeat (this node: its own state).
            let hb = m.peer(mem.id).and_then(|p| p.heartbeat);
            let load = if mem.id == me { Some(self_load) } else { hb.map(|h| h.load) };
            // A failing service (it refuses new connections) first, then a drain.
            let (refusing, draining, fenced) = if mem.id == me {
                (m.refusing(), m.draining(), m.fenced())
            } else {
                hb.map_or((false, false, false), |h| (h.refusing, h.draining, h.fenced))
            };
            let state = match (refusing, draining) {
                _ if fenced => "fenced",
                (true, _) => "failing",
                (false, true) => "draining",
                (false, false) => "up",
            };
            serde_json::json!({
                "node": mem.id.get(),
                "state": state,
                "weight": mem.weight.get(),
                "accepting_buckets": snapshot.accepting_count(mem.id),
                "final_buckets": Bucket::all().filter(|&b| snapshot.final_owner(b) == Some(mem.id)).count(),
                "active_flows": load.map(|l| l.active_flows),
                "busy_permille": load.map(|l| l.busy_permille),
            })
        })
        .collect();
    // Live nodes the table leaves out (drained, or failing and drained): no buckets, but an
    // operator wants to see them and why.
    let in_table: u64 = m
        .live_members()
        .iter()
        .fold(0, |bits, mem| bits | 1u64 << mem.id.index());
    let outside: Vec<serde_json::Value> = (1..=64u8)
        .filter_map(NodeId::new)
        .filter(|id| m.live_bits() & !in_table & (1u64 << id.index()) != 0)
        .map(|id| {
            let hb = m.peer(id).and_then(|p| p.heartbeat);
            let (refusing, draining, weight, load) = if id == me {
                (m.refusing(), m.draining(), None, Some(self_load))
            } else {
                (
                    hb.is_some_and(|h| h.refusing),
                    hb.is_some_and(|h| h.draining),
                    hb.map(|h| h.weight.get()),
                    hb.map(|h| h.load),
                )
            };
            let fenced = if id == me {
                m.fenced()
            } else {
                hb.is_some_and(|h| h.fenced)
            };
            // Out of the plan's target table, but a node still serves the connections it had
            // until the plan is done: draining until then, drained after.
            let state = match (refusing, draining) {
                _ if fenced => "fenced",
                (true, _) => "failing",
                (false, true) if snapshot.phase() == control::Phase::Done => "drained",
                (false, true) => "draining",
                (false, false) => "joining",
            };
            serde_json::json!({
                "node": id.get(),
                "state": state,
                "weight": weight,
                "accepting_buckets": snapshot.accepting_count(id),
                "final_buckets": 0,
                "active_flows": load.map(|l| l.active_flows),
                "busy_permille": load.map(|l| l.busy_permille),
            })
        })
        .collect();
    serde_json::json!({
        "ok": true,
        "epoch": m.epoch(),
        "phase": format!("{:?}", snapshot.phase()),
        "moving": snapshot.moving_count(),
        "node": me.get(),
        "draining": m.draining(),
        "drained": m.is_drained(),
        "refusing": m.refusing(),
        "fenced": m.fenced(),
        "protocol_version": m.speaks(),
        "healthy": health,
        "members": members,
        "outside": outside,
        "timeline": timeline.steps().collect::<Vec<_>>(),
    })
}

/// Sends one command to a node's control socket and returns its JSON reply.
pub fn operator_command(socket: &std::path::Path, command: &str) -> Result<String, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the node at {}: {e} (is it running, and is control.socket this path?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{command}").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply from {}: {e}", socket.display()))?;
    Ok(reply.trim().to_owned())
}

/// The packet cores' busy share between two control ticks, from their busy-time totals.
#[derive(Debug)]
struct BusyShare {
    at: Instant,
    busy_ns: u64,
}

impl BusyShare {
    fn new(at: Instant) -> BusyShare {
        BusyShare { at, busy_ns: 0 }
    }

    /// Busy time per core since the last call over the wall time between them, in 0..=1000
    /// (the cores publish their totals every ~1000 polls, so one reading can overshoot).
    fn permille(&mut self, now: Instant, busy_ns: u64, cores: usize) -> u16 {
        let wall = now.saturating_duration_since(self.at).as_nanos() as u64 * cores as u64;
        let busy = busy_ns.saturating_sub(self.busy_ns);
        self.at = now;
        self.busy_ns = busy_ns;
        (busy.saturating_mul(1000))
            .checked_div(wall)
            .map_or(0, |p| p.min(1000) as u16)
    }
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
    fn busy_share_is_busy_time_over_wall_time_per_core() {
        let t0 = Instant::now();
        let mut b = BusyShare::new(t0);
        // Two cores over one second: 0.5 s + 0.25 s busy.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.permille(t1, 750_000_000, 2), 375);
        // Nothing new: idle.
        assert_eq!(b.permille(t1 + Duration::from_secs(1), 750_000_000, 2), 0);
        // A late publication cannot read as more than fully busy.
        let t3 = t1 + Duration::from_secs(2);
        assert_eq!(b.permille(t3, 750_000_000 + 5_000_000_000, 2), 1000);
        // No time passed: no figure rather than a division by zero.
        assert_eq!(b.permille(t3, 9_000_000_000, 2), 0);
    }
}
