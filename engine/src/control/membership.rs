//! The membership and handoff state machine: who is live, which ownership plan is in force,
//! and how buckets move between owners without losing connections.
//!
//! Sans-IO (foca's style): the caller feeds [`Membership::handle_message`] and
//! [`Membership::handle_tick`] (plus operator and data-path inputs) with `now` in nanoseconds
//! and carries out the [`Output`]s in order: send bytes on a path, publish a snapshot to the
//! packet cores, log an event. Nothing here reads a clock, sleeps, or touches a socket.
//!
//! # Protocol
//!
//! - Every node sends a [`Heartbeat`] every `interval` on BOTH paths (side UDP and wire frame).
//!   A peer is dead when both paths have been silent for `dead_after` intervals, checked at
//!   each tick.
//! - The **coordinator** is the lowest live node id among the members of the current plan (or
//!   among all live nodes if none of them is live). It alone creates plans and advances their
//!   phase, and re-sends its current [`Plan`] every tick on both paths.
//! - A plan moves the cluster from the table of `from` members to the table of `to` members.
//!   Nodes adopt any plan newer than theirs ([`PlanId::newer_than`]), rebuild both tables with
//!   `OwnershipTable::build` and check both digests, publish, and acknowledge by sending a
//!   heartbeat carrying the plan and the phase they have published.
//! - Phases: Learn → Release → Acquire → Done. The coordinator moves Learn → Release once every
//!   live member has acknowledged Learn for `learn`; Release → Acquire once every live member
//!   has acknowledged Release (so every old owner has stopped taking new flows before any new
//!   owner starts); Acquire → Done once every live releasing node reports 0 flows left in the
//!   buckets it releases, or `release_deadline` after Acquire.
//! - **Failures move at once**: each node, the moment it declares a member dead, recomputes its
//!   snapshot with the dead nodes substituted: target `t(b) = build(to − dead).owner(b)`,
//!   current owner `f(b) = build(from).owner(b)` unless dead, else `t(b)`. So a dead node's
//!   stable buckets and the buckets it was releasing are owned outright by their next owner,
//!   and buckets that were moving to it move to their next target in the same phase. A node
//!   that has not yet noticed the death never accepts such a bucket (its owner in its view is
//!   the dead node), so no two live nodes accept new flows in one bucket. Once the plan is done
//!   the coordinator formalizes the loss with a new plan `to − dead` (no bucket moves).
//! - Joins, drains, undrains, weight changes and by-load rebalances are new plans from the
//!   effective table to the desired one, one plan at a time, always through the four phases.
//! - **Fencing** (DESIGN.md, "Liveness"): a node whose wire port has no link cannot receive
//!   its share, whatever its control channel says. It fences itself ([`Membership::set_wire_link`]):
//!   its snapshot owns nothing, it coordinates nothing, and its heartbeats say `fenced`, so that
//!   every peer that still hears it treats it as dead for ownership (takes its buckets at once,
//!   leaves it out of the next plan) while it stays a live member for messages. It stays
//!   fenced for `dead_after` intervals after its link comes back, so that it hears the
//!   cluster's current plan before it owns anything again (a node cut off both networks
//!   believes every peer dead; unfenced at once, it would deliver their flows until their plan
//!   reached it). It then rejoins through a normal plan.
//! - **Versions** (rolling upgrades): a node understands its format version and the one before
//!   and speaks the newest that every live peer understands: the lowest of the newest versions
//!   each live peer has sent in its current run. A node that speaks the older version because
//!   of an older peer sends every [`PROBE_EVERY`]-th heartbeat in its newest version, so that
//!   upgraded peers learn it is new (an older peer refuses and counts that one heartbeat as an
//!   unknown version); once the last older node is gone or upgraded, every node speaks the new
//!   version. The first refusal of each unknown version, then one a minute, is an [`Event`].
//!
//! # Failure modes (what is given up)
//!
//! - A partition (both paths cut) is indistinguishable from a failure: each side takes the
//!   other's buckets. After healing, the newer plan wins (ties: the smaller proposer id), the
//!   losing side drops what it took and a join plan rebalances. Connections opened on the
//!   losing side during the partition are lost.
//! - A member that dies while buckets move to it is substituted by the next target in the
//!   current phase; if that happens after Learn, the substitute learned less, and packets of
//!   UDP flows it did not learn may be delivered by both it and the old owner until the old
//!   owner's flows end.
//! - A node without a plan that hears no valid peer never bootstraps a cluster of its own while
//!   it refuses messages for a bad MAC or another config digest (fail closed): a misconfigured
//!   node that joins a running cluster takes no traffic. (Two lone nodes with different
//!   configurations both stay closed: the operator sees the refusal counters.)

use std::sync::Arc;

use crate::cluster::{Bucket, Member, NodeId, OwnershipTable, Weight, BUCKETS};
pub use crate::config::Policy;

use super::message::{
    decode, Body, ControlKey, Heartbeat, Load, Message, Path, Phase, Plan, PlanId, Refusal,
    LEFT_UNKNOWN, PREVIOUS_VERSION, VERSION,
};
use super::snapshot::Snapshot;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

/// The weight every member gets under [`Policy::Hash`].
pub const HASH_WEIGHT: u32 = 100;

/// While speaking an older version, one heartbeat in this many goes out in the newest.
pub const PROBE_EVERY: u64 = 10;

/// An unknown version is logged at most once per this span (after its first refusal).
const VERSION_LOG_EVERY: u64 = 60 * SEC;

/// What the state machine needs to know about this node and the cluster. Build it with
/// [`Config::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    pub me: NodeId,
    /// This run of the node; a restart must use a larger one (e.g. start time in ns).
    pub incarnation: u64,
    pub node_mac: [u8; 6],
    /// The configured weight (used by `Weighted`; the starting weight under `ByLoad`).
    pub weight: Weight,
    pub policy: Policy,
    /// Heartbeat interval, ns (default 100 ms). Call `handle_tick` at this period.
    pub interval: u64,
    /// Intervals of silence on both paths before a peer is dead (default 3).
    pub dead_after: u32,
    /// How long new owners learn before the old owners release, ns (default 3 s).
    pub learn: u64,
    /// How long an old owner may keep serving released buckets after acquire, ns (default 10 s).
    pub release_deadline: u64,
    /// By-load: how often weights are recomputed, ns (default 5 s).
    pub rebalance_every: u64,
    /// By-load: rebalance only if some node's relative load is off by more than this, ‰
    /// (default 150 = ±15 %).
    pub rebalance_hysteresis_permille: u32,
    /// By-load: at most this share of the buckets moves per rebalance step, ‰ (default 62).
    pub rebalance_max_moved_permille: u32,
    /// Digest of the cluster-wide configuration; peers with another one are refused.
    pub config_digest: u64,
    pub key: ControlKey,
    /// The newest format version this node speaks ([`VERSION`]; tests set the previous one to
    /// play a node of the release before, which also refuses anything newer).
    pub newest_version: u8,
}

impl Config {
    /// Defaults as documented on each field; the key is derived from `cluster_secret`.
    pub fn new(
        me: NodeId,
        incarnation: u64,
        node_mac: [u8; 6],
        cluster_secret: &[u8],
        config_digest: u64,
    ) -> Config {
        Config {
            me,
            incarnation,
            node_mac,
            weight: Weight::new(HASH_WEIGHT).unwrap_or_else(|| unreachable!("nonzero")),
            policy: Policy::Hash,
            interval: 100 * MS,
            dead_after: 3,
            learn: 3 * SEC,
            release_deadline: 10 * SEC,
            rebalance_every: 5 * SEC,
            rebalance_hysteresis_permille: 150,
            rebalance_max_moved_permille: 62,
            config_digest,
            key: ControlKey::from_secret(cluster_secret),
            newest_version: VERSION,
        }
    }

    /// `dead_after × interval`: silence on both paths after which a peer is dead.
    pub fn dead_span(&self) -> u64 {
        self.interval.saturating_mul(u64::from(self.dead_after))
    }
}

/// What the caller must do, in order.
#[derive(Debug, Clone)]
pub enum Output {
    /// Broadcast `bytes` to every peer on `path` (UDP: each configured peer; wire: one
    /// broadcast frame, EtherType [`crate::wire::CONTROL_ETHERTYPE`], source = node MAC).
    Send { path: Path, bytes: Vec<u8> },
    /// Make this snapshot the packet cores' current one. It must be visible to the cores
    /// (stored) before any later `Send` of the same batch goes out: those sends acknowledge it.
    Publish(Arc<Snapshot>),
    /// Something worth a log line.
    Event(Event),
}

/// Log-worthy changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// First message from a node, or from one we had declared dead.
    PeerUp { node: NodeId, incarnation: u64 },
    /// A node restarted: a message with a larger incarnation.
    PeerRejoined { node: NodeId, incarnation: u64 },
    /// Both paths silent for `dead_after` intervals.
    PeerDead { node: NodeId },
    /// The set of dead plan members changed: their buckets were taken at once. `dead` has bit
    /// `id - 1` set per dead member.
    TakeOver { dead: u64 },
    /// A new plan is followed (created here if `proposer` is this node).
    PlanAdopted {
        plan: PlanId,
        phase: Phase,
        members: Vec<Member>,
        moving: u32,
    },
    /// The followed plan reached a new phase.
    PhaseChanged { plan: PlanId, phase: Phase },
    /// This node drains and owns nothing any more: it may stop.
    Drained,
    /// This node fenced itself (its wire port lost link), or lifted its fence.
    Fenced { fenced: bool },
    /// A control message in a format version this node does not speak was refused (its
    /// header claims `node`, unauthenticated). Emitted for the first such message of each
    /// version, then at most once a minute per version.
    VersionRefused {
        version: u8,
        node: u8,
        /// The versions this node understands.
        understood: (u8, u8),
    },
}

/// What is known of a peer (see [`Membership::peer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub incarnation: u64,
    pub alive: bool,
    /// Last accepted message per path, indexed by [`Path::index`].
    pub last_seen: [Option<u64>; 2],
    pub heartbeat: Option<Heartbeat>,
    /// Heartbeats expected but not heard, per path: each whole interval of silence after the
    /// first counts one (a dead or cut-off peer keeps counting).
    pub missed: [u64; 2],
    /// Messages lost in transit, per path: gaps in the sequence numbers of messages received.
    pub lost: [u64; 2],
}

#[derive(Debug, Clone)]
struct Peer {
    incarnation: u64,
    last_seq: [u64; 2],
    last_seen: [Option<u64>; 2],
    /// Named in an adopted plan before we heard it: presumed live from this instant.
    presumed: Option<u64>,
    alive: bool,
    hb: Option<Heartbeat>,
    missed: [u64; 2],
    /// Of `missed`, those counted during the current silence.
    silent: [u64; 2],
    lost: [u64; 2],
    /// The newest format version it sent in its current incarnation (0: none heard yet).
    version: u8,
}

impl Peer {
    fn new(incarnation: u64, presumed: Option<u64>, alive: bool) -> Peer {
        Peer {
            version: 0,
            incarnation,
            last_seq: [0; 2],
            last_seen: [None; 2],
            presumed,
            alive,
            hb: None,
            missed: [0; 2],
            silent: [0; 2],
            lost: [0; 2],
        }
    }

    /// Counts the heartbeats not heard on each path by `now` (one per whole `interval` of
    /// silence after the first).
    fn count_silence(&mut self, now: u64, interval: u64) {
        for (i, seen) in self.last_seen.iter().enumerate() {
            let Some(t) = *seen else { continue };
            let quiet = (now.saturating_sub(t) / interval.max(1)).saturating_sub(1);
            if quiet > self.silent[i] {
                self.missed[i] += quiet - self.silent[i];
                self.silent[i] = quiet;
            }
        }
    }

    fn latest(&self) -> Option<u64> {
        [self.last_seen[0], self.last_seen[1], self.presumed]
            .into_iter()
            .flatten()
            .max()
    }
}

/// The plan followed, with its tables.
#[derive(Debug)]
struct Current {
    plan: Plan,
    from_table: Option<Arc<OwnershipTable>>,
    to_table: Arc<OwnershipTable>,
    /// `build(to − dead)` for the dead set it was built for.
    eff: Option<(u64, Arc<OwnershipTable>)>,
}

/// Coordinator-side timers for the current plan and phase.
#[derive(Debug, Clone, Copy)]
struct Coord {
    key: Option<(PlanId, Phase)>,
    phase_started: u64,
    all_acked_at: Option<u64>,
    last_rebalance: u64,
}

/// The membership and handoff state machine of one node (see the module doc).
#[derive(Debug)]
pub struct Membership {
    cfg: Config,
    seq: u64,
    started: Option<u64>,
    last_heartbeat: Option<u64>,
    draining: bool,
    /// The local service fails its health check (announced in heartbeats).
    refusing: bool,
    /// The wire port has link (as the data path last said).
    wire_up: bool,
    /// When the wire link last came back (None: it never went down).
    wire_up_since: Option<u64>,
    /// Fenced: this node owns nothing and coordinates nothing (announced in heartbeats).
    fenced: bool,
    weight: Weight,
    load: Load,
    peers: Vec<Option<Peer>>,
    cur: Option<Current>,
    max_epoch_seen: u64,
    snapshot: Arc<Snapshot>,
    snap_key: Option<(PlanId, Phase, u64, bool)>,
    /// (plan, buckets released with flows left) from the last `report_flows`.
    report: Option<(PlanId, u32)>,
    coord: Coord,
    refused: [[u64; Refusal::ALL.len()]; 2],
    /// Messages accepted, per path.
    accepted: [u64; 2],
    /// Last refusal for a bad MAC or config digest: blocks a lonely bootstrap.
    last_auth_refusal: Option<u64>,
    drained: bool,
    /// Heartbeats sent (for [`PROBE_EVERY`]).
    heartbeats_sent: u64,
    /// When each unknown version was last logged, by version.
    version_logged: Vec<(u8, u64)>,
}

impl Membership {
    /// A node that knows nobody and follows no plan yet: it owns nothing until it adopts a plan
    /// or bootstraps one (alone for `dead_after + 1` intervals, lowest id among plan-less nodes).
    pub fn new(cfg: Config) -> Membership {
        Membership {
            weight: cfg.weight,
            cfg,
            seq: 0,
            started: None,
            last_heartbeat: None,
            draining: false,
            refusing: false,
            wire_up: true,
            wire_up_since: None,
            fenced: false,
            load: Load::default(),
            peers: vec![None; 64],
            cur: None,
            max_epoch_seen: 0,
            snapshot: Arc::new(Snapshot::empty()),
            snap_key: None,
            report: None,
            coord: Coord {
                key: None,
                phase_started: 0,
                all_acked_at: None,
                last_rebalance: 0,
            },
            refused: [[0; Refusal::ALL.len()]; 2],
            accepted: [0; 2],
            last_auth_refusal: None,
            drained: false,
            heartbeats_sent: 0,
            version_logged: Vec::new(),
        }
    }

    // ---------------------------------------------------------------- inputs

    /// A control message arrived on `path`. Refused messages are counted and ignored.
    pub fn handle_message(&mut self, path: Path, bytes: &[u8], now: u64, out: &mut Vec<Output>) {
        self.started.get_or_insert(now);
        let msg = match decode(bytes, &self.cfg.key, path, self.cfg.config_digest) {
            // A node playing an older release refuses what that release could not read.
            Ok(m) if m.version > self.cfg.newest_version => {
                return self.refuse_version(path, bytes, now, out)
            }
            Ok(m) => m,
            Err(Refusal::UnknownVersion) => return self.refuse_version(path, bytes, now, out),
            Err(r) => return self.refuse(path, r, now),
        };
        if let Err(r) = self.accept(&msg, now, out) {
            return self.refuse(path, r, now);
        }
        self.accepted[path.index()] += 1;
        match msg.body {
            Body::Heartbeat(hb) => {
                if let Some((id, _)) = hb.plan {
                    self.max_epoch_seen = self.max_epoch_seen.max(id.epoch);
                }
                if let Some(p) = self.peers[msg.node.index()].as_mut() {
                    p.hb = Some(hb);
                }
            }
            Body::Plan(plan) => {
                if let Err(r) = self.consider_plan(plan, now, out) {
                    // Counted once: refused, not accepted.
                    self.accepted[path.index()] -= 1;
                    self.refuse(path, r, now);
                }
            }
            // Sent on both paths: the first copy acts, the second finds the state already set.
            Body::Request(req) if req.target == self.cfg.me => {
                if req.drain && !self.draining {
                    self.drain(now, out);
                } else if !req.drain && self.draining {
                    self.undrain(now, out);
                }
            }
            Body::Request(_) => {}
        }
        self.refresh(now, out);
    }

    /// An operator asks node `target` (this one or another) to drain or undrain: done here, or
    /// relayed to it in an authenticated message on both paths.
    pub fn request(&mut self, target: NodeId, drain: bool, now: u64, out: &mut Vec<Output>) {
        if target == self.cfg.me {
            if drain {
                self.drain(now, out);
            } else {
                self.undrain(now, out);
            }
        } else {
            self.send(
                Body::Request(super::message::Request { target, drain }),
                out,
            );
        }
    }

    /// Time passed: detect deaths, advance plans (coordinator), send heartbeats. Call every
    /// `interval`.
    pub fn handle_tick(&mut self, now: u64, out: &mut Vec<Output>) {
        self.started.get_or_insert(now);
        self.update_fence(now, out);
        let span = self.cfg.dead_span();
        let interval = self.cfg.interval;
        for (i, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot else { continue };
            p.count_silence(now, interval);
            if p.alive && p.latest().is_none_or(|t| now.saturating_sub(t) >= span) {
                p.alive = false;
                let node = node_of(i);
                out.push(Output::Event(Event::PeerDead { node }));
            }
        }
        self.refresh(now, out);
        self.coordinate(now, out);
        if self
            .last_heartbeat
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.interval * 3 / 4)
        {
            self.send_heartbeat(now, out);
            if self.is_coordinator() {
                self.send_plan(out);
            }
        }
    }

    /// Flow counts from the data path for the buckets this node releases
    /// ([`Snapshot::releasing`]); buckets not listed count as 0. Call it every tick or so while
    /// releasing; the plan completes when every releasing node reports 0.
    pub fn report_flows(&mut self, flows: &[(Bucket, u32)], now: u64, out: &mut Vec<Output>) {
        let Some(id) = self.snapshot.plan() else {
            return;
        };
        if !matches!(self.snapshot.phase(), Phase::Release | Phase::Acquire) {
            return;
        }
        let me = self.cfg.me;
        let left = flows
            .iter()
            .filter(|&&(b, n)| {
                n > 0 && matches!(self.snapshot.role(b, me), super::Role::Releasing { .. })
            })
            .count() as u32;
        let before = self.report.filter(|r| r.0 == id).map(|r| r.1);
        self.report = Some((id, left));
        if left == 0 && before != Some(0) {
            self.send_heartbeat(now, out);
        }
    }

    /// Operator: hand this node's buckets to the others (losslessly), then emit `Drained`.
    pub fn drain(&mut self, now: u64, out: &mut Vec<Output>) {
        if !self.draining {
            self.draining = true;
            self.drained = false;
            self.send_heartbeat(now, out);
        }
    }

    /// The health checker's verdict: while `refusing`, this node's service takes no new
    /// connection. Announced at once in a heartbeat, so that nodes learning its buckets do not
    /// count the SYNs it refuses as its flows.
    pub fn set_refusing(&mut self, refusing: bool, now: u64, out: &mut Vec<Output>) {
        if self.refusing != refusing {
            self.refusing = refusing;
            self.send_heartbeat(now, out);
        }
    }

    /// Whether this node announces a failing service.
    pub fn refusing(&self) -> bool {
        self.refusing
    }

    /// Live peers that announce a failing service: bit `id - 1` each.
    pub fn refusing_peers(&self) -> u64 {
        let mut bits = 0;
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref()
                .is_some_and(|p| p.alive && p.hb.is_some_and(|h| h.refusing))
            {
                bits |= 1 << i;
            }
        }
        bits
    }

    /// The data path's word on the wire port's link. Down fences this node at once; back up,
    /// it stays fenced for `dead_after` intervals (see the module doc).
    pub fn set_wire_link(&mut self, up: bool, now: u64, out: &mut Vec<Output>) {
        if up != self.wire_up {
            self.wire_up = up;
            if up {
                self.wire_up_since = Some(now);
            }
        }
        self.update_fence(now, out);
    }

    /// Whether this node is fenced (see the module doc).
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    fn update_fence(&mut self, now: u64, out: &mut Vec<Output>) {
        let settling = self
            .wire_up_since
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.dead_span());
        let fenced = !self.wire_up || settling;
        if fenced != self.fenced {
            self.fenced = fenced;
            out.push(Output::Event(Event::Fenced { fenced }));
            self.refresh(now, out);
            self.send_heartbeat(now, out);
        }
    }

    /// Bit `id - 1` per node that may own buckets now: live and not fenced (itself included
    /// unless fenced).
    fn serving_bits(&self) -> u64 {
        let mut bits = if self.fenced { 0 } else { bit(self.cfg.me) };
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref()
                .is_some_and(|p| p.alive && !p.hb.is_some_and(|h| h.fenced))
            {
                bits |= 1 << i;
            }
        }
        bits
    }

    /// Whether some live peer takes new flows (neither draining nor refusing): only then is it
    /// worth holding back this node's refusals for a client to retry elsewhere.
    pub fn others_serve(&self) -> bool {
        self.peers.iter().flatten().any(|p| {
            p.alive
                && p.hb
                    .is_some_and(|h| !h.draining && !h.refusing && !h.fenced)
        })
    }

    /// Operator: take a share of buckets again.
    pub fn undrain(&mut self, now: u64, out: &mut Vec<Output>) {
        if self.draining {
            self.draining = false;
            self.drained = false;
            self.send_heartbeat(now, out);
        }
    }

    /// Operator: a new weight (used by the `Weighted` policy).
    pub fn set_weight(&mut self, weight: Weight, now: u64, out: &mut Vec<Output>) {
        if self.weight != weight {
            self.weight = weight;
            self.send_heartbeat(now, out);
        }
    }

    /// This node's current load, sent with the next heartbeat (used by `ByLoad`).
    pub fn set_load(&mut self, load: Load) {
        self.load = load;
    }

    // ---------------------------------------------------------------- accessors

    /// The snapshot last published.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The epoch of the followed plan (0 before any).
    pub fn epoch(&self) -> u64 {
        self.cur.as_ref().map_or(0, |c| c.plan.id.epoch)
    }

    /// The followed plan and the phase this node has published.
    pub fn plan(&self) -> Option<(PlanId, Phase)> {
        self.cur.as_ref().map(|c| (c.plan.id, c.plan.phase))
    }

    /// The members of the table in force once the current plan is done, minus the dead.
    pub fn live_members(&self) -> Vec<Member> {
        self.cur.as_ref().map_or_else(Vec::new, |c| {
            let live = self.live_bits();
            c.plan
                .to
                .iter()
                .copied()
                .filter(|m| live & bit(m.id) != 0)
                .collect()
        })
    }

    /// Bit `id - 1` set per node this node considers live (itself included).
    pub fn live_bits(&self) -> u64 {
        let mut bits = bit(self.cfg.me);
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref().is_some_and(|p| p.alive) {
                bits |= 1 << i;
            }
        }
        bits
    }

    /// What is known of `node`.
    pub fn peer(&self, node: NodeId) -> Option<PeerInfo> {
        self.peers[node.index()].as_ref().map(|p| PeerInfo {
            incarnation: p.incarnation,
            alive: p.alive,
            last_seen: p.last_seen,
            heartbeat: p.hb,
            missed: p.missed,
            lost: p.lost,
        })
    }

    /// Messages refused on `path` for `reason`.
    /// Messages accepted on `path`: every message handled is either accepted or refused (by
    /// [`Membership::refused`]), once.
    pub fn accepted(&self, path: Path) -> u64 {
        self.accepted[path.index()]
    }

    pub fn refused(&self, path: Path, reason: Refusal) -> u64 {
        self.refused[path.index()][reason.index()]
    }

    /// Messages refused for `reason` on both paths.
    pub fn refused_total(&self, reason: Refusal) -> u64 {
        Path::ALL.iter().map(|&p| self.refused(p, reason)).sum()
    }

    /// Whether this node creates and advances plans now.
    pub fn is_coordinator(&self) -> bool {
        // A fenced node coordinates nothing; the others do without it.
        let live = self.serving_bits();
        if live & bit(self.cfg.me) == 0 {
            return false;
        }
        let cands = match &self.cur {
            Some(c) => members_bits(&c.plan) & live,
            None => 0,
        };
        let cands = if cands == 0 { live } else { cands };
        cands.trailing_zeros() as usize == self.cfg.me.index()
    }

    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether this node drains and owns nothing any more.
    pub fn is_drained(&self) -> bool {
        self.drained
    }

    /// This node's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ---------------------------------------------------------------- receiving

    fn refuse(&mut self, path: Path, r: Refusal, now: u64) {
        self.refused[path.index()][r.index()] += 1;
        if matches!(r, Refusal::BadMac | Refusal::WrongDigest) {
            self.last_auth_refusal = Some(now);
        }
    }

    /// Counts a message of an unknown version, and says so the first time and once a minute.
    fn refuse_version(&mut self, path: Path, bytes: &[u8], now: u64, out: &mut Vec<Output>) {
        self.refuse(path, Refusal::UnknownVersion, now);
        let (version, node) = (bytes[2], bytes[5]);
        let due = match self.version_logged.iter_mut().find(|(v, _)| *v == version) {
            Some((_, at)) if now.saturating_sub(*at) < VERSION_LOG_EVERY => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                // 256 versions at most: the list stays small.
                self.version_logged.push((version, now));
                true
            }
        };
        if due {
            let oldest = self.cfg.newest_version.saturating_sub(1).max(1);
            out.push(Output::Event(Event::VersionRefused {
                version,
                node,
                understood: (oldest, self.cfg.newest_version),
            }));
        }
    }

    /// The format version this node speaks now: the newest every live peer understands (its
    /// own newest when no peer is live, or none has been heard yet).
    pub fn speaks(&self) -> u8 {
        self.peers
            .iter()
            .flatten()
            .filter(|p| p.alive && p.version != 0)
            .map(|p| p.version)
            .fold(self.cfg.newest_version, u8::min)
            .max(PREVIOUS_VERSION)
    }

    /// Replay and incarnation checks; records liveness of an accepted message's sender.
    fn accept(&mut self, msg: &Message, now: u64, out: &mut Vec<Output>) -> Result<(), Refusal> {
        if msg.node == self.cfg.me {
            return Err(Refusal::FromSelf);
        }
        let pi = msg.path.index();
        let slot = &mut self.peers[msg.node.index()];
        let peer = slot.get_or_insert_with(|| Peer::new(msg.incarnation, None, false));
        if msg.incarnation < peer.incarnation {
            return Err(Refusal::Stale);
        }
        if msg.incarnation > peer.incarnation {
            let heard_before = peer.last_seen.iter().any(Option::is_some);
            peer.incarnation = msg.incarnation;
            peer.last_seq = [0; 2];
            peer.hb = None;
            // A restart may be a downgrade: its newest version is learned again.
            peer.version = 0;
            if heard_before {
                out.push(Output::Event(Event::PeerRejoined {
                    node: msg.node,
                    incarnation: msg.incarnation,
                }));
            }
        }
        if msg.seq <= peer.last_seq[pi] {
            return Err(Refusal::Replayed);
        }
        // Each message goes out once per path with its own sequence number: on one path,
        // consecutive messages of a sender differ by the number of paths.
        let step = Path::ALL.len() as u64;
        if peer.last_seq[pi] != 0 {
            let gap = (msg.seq - peer.last_seq[pi]) / step;
            peer.lost[pi] += gap.saturating_sub(1);
        }
        peer.last_seq[pi] = msg.seq;
        peer.version = peer.version.max(msg.version);
        peer.last_seen[pi] = Some(now);
        peer.silent[pi] = 0;
        if !peer.alive {
            peer.alive = true;
            out.push(Output::Event(Event::PeerUp {
                node: msg.node,
                incarnation: msg.incarnation,
            }));
        }
        Ok(())
    }

    fn consider_plan(
        &mut self,
        plan: Plan,
        now: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), Refusal> {
        self.max_epoch_seen = self.max_epoch_seen.max(plan.id.epoch);
        match &mut self.cur {
            Some(c) if c.plan.id == plan.id => {
                if c.plan.from != plan.from || c.plan.to != plan.to {
                    return Err(Refusal::TableMismatch);
                }
                if plan.phase > c.plan.phase {
                    c.plan.phase = plan.phase;
                    out.push(Output::Event(Event::PhaseChanged {
                        plan: plan.id,
                        phase: plan.phase,
                    }));
                    self.refresh(now, out);
                    self.send_heartbeat(now, out);
                }
                Ok(())
            }
            Some(c) if !plan.id.newer_than(c.plan.id) => Ok(()),
            _ => {
                let to_table = OwnershipTable::build(plan.id.epoch, &plan.to)
                    .map_err(|_| Refusal::Malformed)?;
                if to_table.digest() != plan.to_digest {
                    return Err(Refusal::TableMismatch);
                }
                let from_table = if plan.from == plan.to {
                    Some(Arc::new(to_table.clone()))
                } else if plan.from.is_empty() {
                    None
                } else {
                    let t = OwnershipTable::build(plan.id.epoch, &plan.from)
                        .map_err(|_| Refusal::Malformed)?;
                    Some(Arc::new(t))
                };
                if from_table.as_ref().map_or(0, |t| t.digest()) != plan.from_digest
                    && !plan.from.is_empty()
                {
                    return Err(Refusal::TableMismatch);
                }
                self.adopt(plan, from_table, Arc::new(to_table), now, out);
                Ok(())
            }
        }
    }

    fn adopt(
        &mut self,
        plan: Plan,
        from_table: Option<Arc<OwnershipTable>>,
        to_table: Arc<OwnershipTable>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        // Members we never heard are presumed live for `dead_after` intervals from now: taking
        // their buckets at once could take buckets a live node still serves.
        for m in plan.from.iter().chain(&plan.to) {
            if m.id == self.cfg.me {
                continue;
            }
            let slot = &mut self.peers[m.id.index()];
            if slot.is_none() {
                *slot = Some(Peer::new(0, Some(now), true));
            }
        }
        let moving = match &from_table {
            Some(f) => f.moves(&to_table).count() as u32,
            None => 0,
        };
        out.push(Output::Event(Event::PlanAdopted {
            plan: plan.id,
            phase: plan.phase,
            members: plan.to.clone(),
            moving,
        }));
        self.cur = Some(Current {
            plan,
            from_table,
            to_table,
            eff: None,
        });
        self.report = None;
        self.refresh(now, out);
        self.send_heartbeat(now, out);
    }

    // ---------------------------------------------------------------- snapshot

    /// Dead members of the current plan (bit per node), as this node sees them now.
    fn dead_members(&self) -> u64 {
        match &self.cur {
            Some(c) => members_bits(&c.plan) & !self.serving_bits(),
            None => 0,
        }
    }

    /// The members the effective target table is built from: `to − dead`; if none is live, the
    /// live members of `from`; if none, this node alone.
    fn eff_members(&self) -> Vec<Member> {
        let Some(c) = &self.cur else {
            return Vec::new();
        };
        let live = self.serving_bits();
        let alive = |list: &[Member]| -> Vec<Member> {
            list.iter()
                .copied()
                .filter(|m| live & bit(m.id) != 0)
                .collect()
        };
        let v = alive(&c.plan.to);
        if !v.is_empty() {
            return v;
        }
        let v = alive(&c.plan.from);
        if !v.is_empty() {
            return v;
        }
        vec![Member {
            id: self.cfg.me,
            weight: self.weight,
        }]
    }

    /// The effective target table (`build(eff_members)`), cached per dead set.
    fn eff_table(&mut self) -> Option<Arc<OwnershipTable>> {
        let dead = self.dead_members();
        let members = self.eff_members();
        let c = self.cur.as_mut()?;
        if dead & members_list_bits(&c.plan.to) == 0 && members == c.plan.to {
            return Some(c.to_table.clone());
        }
        if let Some((d, t)) = &c.eff {
            if *d == dead {
                return Some(t.clone());
            }
        }
        let t = Arc::new(
            OwnershipTable::build(c.plan.id.epoch, &members)
                .unwrap_or_else(|_| unreachable!("eff_members is never empty nor duplicated")),
        );
        c.eff = Some((dead, t.clone()));
        Some(t)
    }

    /// Rebuilds and publishes the snapshot if the plan, phase or dead set changed.
    fn refresh(&mut self, _now: u64, out: &mut Vec<Output>) {
        let Some(c) = &self.cur else { return };
        let dead = self.dead_members();
        let key = (c.plan.id, c.plan.phase, dead, self.fenced);
        if self.snap_key == Some(key) {
            return;
        }
        let old_dead = self
            .snap_key
            .filter(|k| k.0 == c.plan.id)
            .map_or(0, |k| k.2);
        let Some(eff) = self.eff_table() else { return };
        let Some(c) = &self.cur else { return };
        let (id, phase) = (c.plan.id, c.plan.phase);
        let is_dead = |n: NodeId| dead & bit(n) != 0;
        let snap = match (&c.from_table, phase) {
            (Some(from), Phase::Learn | Phase::Release | Phase::Acquire) => {
                let owner = |b: Bucket| {
                    let f = from.owner(b);
                    if is_dead(f) {
                        eff.owner(b)
                    } else {
                        f
                    }
                };
                let target = |b: Bucket| eff.owner(b);
                Snapshot::build(id, phase, owner, Some(&target), eff.digest())
            }
            _ => Snapshot::build(id, Phase::Done, |b| eff.owner(b), None, eff.digest()),
        };
        if dead != old_dead && dead & !old_dead != 0 {
            out.push(Output::Event(Event::TakeOver { dead }));
        }
        self.snap_key = Some(key);
        let snap = snap.with_dead(dead);
        // Fenced: the same plan and tables, but this node owns nothing in them.
        let snap = if self.fenced {
            snap.without(self.cfg.me)
        } else {
            snap
        };
        self.snapshot = Arc::new(snap);
        out.push(Output::Publish(self.snapshot.clone()));
        let owns_nothing =
            phase == Phase::Done && !eff.members().iter().any(|m| m.id == self.cfg.me);
        if self.draining && owns_nothing && !self.drained {
            self.drained = true;
            out.push(Output::Event(Event::Drained));
        }
    }

    // ---------------------------------------------------------------- sending

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn send(&mut self, body: Body, out: &mut Vec<Output>) {
        let version = self.speaks();
        self.send_as(version, body, out);
    }

    fn send_as(&mut self, version: u8, body: Body, out: &mut Vec<Output>) {
        for path in Path::ALL {
            let msg = Message {
                version,
                node: self.cfg.me,
                incarnation: self.cfg.incarnation,
                seq: self.next_seq(),
                path,
                config_digest: self.cfg.config_digest,
                body: body.clone(),
            };
            out.push(Output::Send {
                path,
                bytes: msg.encode(&self.cfg.key),
            });
        }
    }

    fn send_heartbeat(&mut self, now: u64, out: &mut Vec<Output>) {
        self.last_heartbeat = Some(now);
        let plan = self.plan();
        let releasing = self.snapshot.releasers() & bit(self.cfg.me) != 0;
        let left = match (plan, self.report) {
            _ if !releasing => 0,
            (Some((id, _)), Some((rid, left))) if id == rid => left,
            _ => LEFT_UNKNOWN,
        };
        let hb = Heartbeat {
            node_mac: self.cfg.node_mac,
            weight: self.weight,
            load: self.load,
            draining: self.draining,
            refusing: self.refusing,
            fenced: self.fenced,
            view: self.live_bits(),
            plan,
            table_digest: self.snapshot.digest(),
            releasing_left: left,
        };
        self.heartbeats_sent += 1;
        let version = match self.speaks() {
            // Speaking an older version for an older peer: now and then say what we are.
            v if v < self.cfg.newest_version
                && self.heartbeats_sent.is_multiple_of(PROBE_EVERY) =>
            {
                self.cfg.newest_version
            }
            v => v,
        };
        self.send_as(version, Body::Heartbeat(hb), out);
    }

    fn send_plan(&mut self, out: &mut Vec<Output>) {
        if let Some(c) = &self.cur {
            let plan = c.plan.clone();
            self.send(Body::Plan(plan), out);
        }
    }

    // ---------------------------------------------------------------- coordinating

    fn coordinate(&mut self, now: u64, out: &mut Vec<Output>) {
        if self.cur.is_none() {
            return self.bootstrap(now, out);
        }
        if !self.is_coordinator() {
            self.coord.key = None;
            return;
        }
        let Some((id, phase)) = self.plan() else {
            return;
        };
        if self.coord.key != Some((id, phase)) {
            self.coord.key = Some((id, phase));
            self.coord.phase_started = now;
            self.coord.all_acked_at = None;
        }
        let advance = match phase {
            Phase::Learn => {
                if self.all_acked(id, Phase::Learn) {
                    let since = *self.coord.all_acked_at.get_or_insert(now);
                    now.saturating_sub(since) >= self.cfg.learn
                } else {
                    self.coord.all_acked_at = None;
                    false
                }
            }
            Phase::Release => self.all_acked(id, Phase::Release),
            Phase::Acquire => {
                self.releasers_done(id)
                    || now.saturating_sub(self.coord.phase_started) >= self.cfg.release_deadline
            }
            Phase::Done => {
                if let Some((from, to)) = self.next_plan(now) {
                    self.propose(from, to, now, out);
                }
                false
            }
        };
        if advance {
            if let Some(c) = &mut self.cur {
                c.plan.phase = phase.next();
                out.push(Output::Event(Event::PhaseChanged {
                    plan: id,
                    phase: c.plan.phase,
                }));
            }
            self.refresh(now, out);
            self.send_plan(out);
            self.send_heartbeat(now, out);
        }
    }

    /// Whether every live member of the plan has published `phase` (or later) of plan `id`.
    fn all_acked(&self, id: PlanId, phase: Phase) -> bool {
        let Some(c) = &self.cur else { return false };
        let bits = members_bits(&c.plan) & !bit(self.cfg.me);
        self.peers.iter().enumerate().all(|(i, p)| {
            if bits & (1 << i) == 0 {
                return true;
            }
            match p {
                Some(p) if p.alive => {
                    p.hb.and_then(|h| h.plan)
                        .is_some_and(|(pid, ph)| pid == id && ph >= phase)
                }
                _ => true,
            }
        })
    }

    /// Whether every live releasing node reports 0 flows left for plan `id`.
    fn releasers_done(&self, id: PlanId) -> bool {
        let releasers = self.snapshot.releasers();
        (0..64).all(|i| {
            if releasers & (1 << i) == 0 {
                return true;
            }
            if i == self.cfg.me.index() {
                return self.report == Some((id, 0));
            }
            match &self.peers[i] {
                Some(p) if p.alive => p.hb.is_some_and(|h| {
                    h.releasing_left == 0
                        && h.plan
                            .is_some_and(|(pid, ph)| pid == id && ph >= Phase::Release)
                }),
                _ => true,
            }
        })
    }

    /// The members this node would put in the table now: live, not draining, weighted by
    /// policy. `eff` is the effective table's membership (weights kept under `ByLoad`).
    fn desired_members(&self, eff: &[Member]) -> Vec<Member> {
        let mut v = Vec::new();
        for i in 0..64usize {
            let id = node_of(i);
            let (draining, weight) = if id == self.cfg.me {
                (self.draining || self.fenced, self.weight)
            } else {
                match &self.peers[i] {
                    Some(p) if p.alive => match (&p.hb, eff.iter().find(|m| m.id == id)) {
                        (Some(h), _) => (h.draining || h.fenced, h.weight),
                        (None, Some(m)) => (false, m.weight),
                        (None, None) => continue,
                    },
                    _ => continue,
                }
            };
            if draining {
                continue;
            }
            let weight = match self.cfg.policy {
                Policy::Hash => Weight::new(HASH_WEIGHT).unwrap_or(weight),
                Policy::Weighted => weight,
                Policy::ByLoad => eff.iter().find(|m| m.id == id).map_or(weight, |m| m.weight),
            };
            v.push(Member { id, weight });
        }
        if v.is_empty() {
            // Everybody drains: nobody to hand over to, keep what is.
            return eff.to_vec();
        }
        v
    }

    /// At `Done`: the next plan `(from, to)`, if the cluster should change.
    fn next_plan(&mut self, now: u64) -> Option<(Vec<Member>, Vec<Member>)> {
        let eff = self.eff_members();
        let desired = self.desired_members(&eff);
        let c = self.cur.as_ref()?;
        if desired != eff {
            return Some((eff, desired));
        }
        if eff != c.plan.to || c.plan.from != c.plan.to {
            // Formalize deaths (and a finished plan's table) as a plan with no moves.
            return Some((eff.clone(), eff));
        }
        if self.cfg.policy == Policy::ByLoad {
            if let Some(to) = self.rebalance(now, &eff) {
                return Some((eff, to));
            }
        }
        None
    }

    /// Creates, adopts and sends a plan from `from` to `to`.
    fn propose(&mut self, from: Vec<Member>, to: Vec<Member>, now: u64, out: &mut Vec<Output>) {
        let epoch = self.max_epoch_seen.max(self.epoch()) + 1;
        self.max_epoch_seen = epoch;
        let (Ok(from_t), Ok(to_t)) = (
            OwnershipTable::build(epoch, &from),
            OwnershipTable::build(epoch, &to),
        ) else {
            return;
        };
        let phase = if from_t.digest() == to_t.digest() {
            Phase::Done
        } else {
            Phase::Learn
        };
        let plan = Plan {
            id: PlanId {
                epoch,
                proposer: self.cfg.me,
            },
            phase,
            from_digest: from_t.digest(),
            to_digest: to_t.digest(),
            from,
            to,
        };
        self.adopt(plan, Some(Arc::new(from_t)), Arc::new(to_t), now, out);
        self.send_plan(out);
    }

    /// A plan-less node alone long enough (and lowest among plan-less live nodes) starts the
    /// cluster with the live nodes.
    fn bootstrap(&mut self, now: u64, out: &mut Vec<Output>) {
        let Some(started) = self.started else { return };
        let span = self.cfg.dead_span();
        if now.saturating_sub(started) < span + self.cfg.interval {
            return;
        }
        // Alone but hearing messages we must refuse: we may be the misconfigured one.
        let alone = self.live_bits() == bit(self.cfg.me);
        if alone
            && self
                .last_auth_refusal
                .is_some_and(|t| now.saturating_sub(t) < span)
        {
            return;
        }
        let someone_has_plan = self
            .peers
            .iter()
            .flatten()
            .any(|p| p.alive && p.hb.is_some_and(|h| h.plan.is_some()));
        if someone_has_plan || !self.is_coordinator() {
            return;
        }
        let members = self.desired_members(&[]);
        if members.is_empty() {
            return;
        }
        self.propose(members.clone(), members, now, out);
    }

    /// By-load: new weights if loads are off by more than the hysteresis, scaled down until at
    /// most `rebalance_max_moved_permille` of the buckets move.
    fn rebalance(&mut self, now: u64, eff: &[Member]) -> Option<Vec<Member>> {
        let every = self.cfg.rebalance_every;
        if now.saturating_sub(self.coord.phase_started) < every
            || now.saturating_sub(self.coord.last_rebalance) < every
            || eff.len() < 2
        {
            return None;
        }
        self.coord.last_rebalance = now;
        let loads: Vec<Load> = eff
            .iter()
            .map(|m| {
                if m.id == self.cfg.me {
                    Some(self.load)
                } else {
                    self.peers[m.id.index()]
                        .as_ref()
                        .and_then(|p| p.hb.map(|h| h.load))
                }
            })
            .collect::<Option<_>>()?;
        let rel = relative_loads(&loads)?;
        let hysteresis = f64::from(self.cfg.rebalance_hysteresis_permille) / 1000.0;
        if rel.iter().all(|r| (r - 1.0).abs() <= hysteresis) {
            return None;
        }
        let current = self.eff_table()?;
        let limit = u64::from(self.cfg.rebalance_max_moved_permille) * BUCKETS as u64 / 1000;
        for alpha in [1.0, 0.5, 0.25, 0.125] {
            let next: Vec<Member> = eff
                .iter()
                .zip(&rel)
                .map(|(m, r)| {
                    let f = r.clamp(0.25, 4.0).powf(-alpha);
                    let w = (f64::from(m.weight.get()) * f).round().clamp(1.0, 1e9) as u32;
                    Member {
                        id: m.id,
                        weight: Weight::new(w).unwrap_or(m.weight),
                    }
                })
                .collect();
            if next == eff {
                return None;
            }
            let cand = OwnershipTable::build(0, &next).ok()?;
            let moved = current.moves(&cand).count() as u64;
            if moved <= limit {
                return Some(next);
            }
        }
        None
    }
}

/// Each node's load relative to the mean: the average of its busy ratio and its flow ratio,
/// leaving out a measure every node reports as 0. `None` if there is no load at all.
fn relative_loads(loads: &[Load]) -> Option<Vec<f64>> {
    let n = loads.len() as f64;
    let busy: f64 = loads.iter().map(|l| f64::from(l.busy_permille)).sum();
    let flows: f64 = loads.iter().map(|l| f64::from(l.active_flows)).sum();
    if busy == 0.0 && flows == 0.0 {
        return None;
    }
    Some(
        loads
            .iter()
            .map(|l| {
                let mut parts = Vec::with_capacity(2);
                if busy > 0.0 {
                    parts.push(f64::from(l.busy_permille) * n / busy);
                }
                if flows > 0.0 {
                    parts.push(f64::from(l.active_flows) * n / flows);
                }
                parts.iter().sum::<f64>() / parts.len() as f64
            })
            .collect(),
    )
}

fn bit(n: NodeId) -> u64 {
    1 << n.index()
}

fn node_of(index: usize) -> NodeId {
    NodeId::new(index as u8 + 1).unwrap_or_else(|| unreachable!("index < 64"))
}

fn members_list_bits(list: &[Member]) -> u64 {
    list.iter().fold(0, |b, m| b | bit(m.id))
}

fn members_bits(plan: &Plan) -> u64 {
    members_list_bits(&plan.from) | members_list_bits(&plan.to)
}
