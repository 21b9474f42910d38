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
//!   each tick. (A peer silent on the wire alone is not dead: see "Liveness by the data path".)
//! - Each run of a node has an incarnation (its start time); a message of a smaller one than
//!   the peer holds is refused as stale. Once the run held is dead, the refusing peer tells the
//!   sender the incarnation it holds (a [`StaleNotice`], version 5), and the sender goes on
//!   above it: a node whose clock was stepped back between two runs rejoins rather than stays
//!   out (`receive.rs`). Two live runs of one id (a configuration error): the peers follow
//!   the later-started one, and the other, hearing it, fences itself (`superseded`).
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
//!   buckets it releases (and in those it still holds from earlier plans), or
//!   `release_deadline` after Acquire. Completing a plan never ends a connection: the buckets
//!   that still hold flows stay per-bucket obligations (`linger.rs`): the old owner keeps
//!   serving its flows in them, and whoever owns such a bucket keeps acquiring it (it never
//!   takes a TCP packet of a flow it does not know) until the old owner holds nothing. Only a
//!   drain's deadline (`drain --deadline`, `control.drain_deadline`) cuts those flows.
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
//! - **Appliance mode** ([`super::backends`]): every node sends its backend report (and the
//!   table it holds) once per heartbeat, and the coordinator its agreed backend table; an
//!   operator's backend drain is held by the node it was given to and relayed on both paths to
//!   every peer, like a request for another node ([`Membership::drain_backends`]).
//! - **Fencing** (DESIGN.md, "Liveness"): a node that cannot serve its share, whatever its
//!   control channel says, fences itself: its snapshot owns nothing, it coordinates nothing,
//!   and its heartbeats say `fenced`, so that every peer that still hears it treats it as dead
//!   for ownership (takes its buckets at once, leaves it out of the next plan) while it stays a
//!   live member for messages. The reasons ([`FenceReasons`], see "Liveness by the data path"
//!   below): its wire port has no link ([`Membership::set_wire_link`]), a packet core stalled
//!   ([`Membership::set_cores_running`]), it hears no peer on the wire, or no peer hears it
//!   there. After a data path outage (link, cores) it stays fenced for `dead_after` intervals,
//!   so that it hears the cluster's current plan before it owns anything again (a node cut off
//!   both networks believes every peer dead; unfenced at once, it would deliver their flows
//!   until their plan reached it). It then rejoins through a normal plan. After such an outage,
//!   while a peer stood in for it, its own flows are the stand-ins' until that plan is past its
//!   learning phase: its snapshot cuts them, each forgotten when seen (a quiet one stays its
//!   own). A fence over what the wire carries leaves its flows its own: it may be short.
//! - **Withholding**: a node owns nothing while a live peer's newest heartbeat leaves it out
//!   of that peer's `serving` set (the peer finds it dead or fenced, so it may stand in for
//!   it). A fenced node lifts its fence only once every live peer's newest heartbeat leaves it
//!   out (they heard the fence); so the next one that counts it in was sent after the peer
//!   heard the lift, and after the peer published the snapshot that stops standing in (a
//!   heartbeat follows the publish it acknowledges). Heartbeats are taken in sequence order
//!   over both paths. So ownership moves away from a node only on its own word (its fence) or
//!   its death, and back to it only on every peer's word: never to two nodes at once.
//! - **Versions** (rolling upgrades): a node understands its format version and the one before
//!   and speaks the newest that every live peer understands: the lowest of the newest versions
//!   each live peer has sent in its current run. A node that speaks the older version because
//!   of an older peer sends every [`PROBE_EVERY`]-th heartbeat in its newest version, so that
//!   upgraded peers learn it is new (an older peer refuses and counts that one heartbeat as an
//!   unknown version); once the last older node is gone or upgraded, every node speaks the new
//!   version. The first refusal of each unknown version, then one a minute, is an [`Event`].
//!
//! # Liveness by the data path
//!
//! A node counts as alive for ownership only while its wire port has link, its packet cores
//! loop, and the wire carries its heartbeats. Heartbeats go on both paths and carry the
//! sender's wire report: `wire_heard` (the peers it hears on the wire), `wire_deaf` (its link
//! and cores are up, peers are live, and it hears none of them on the wire) and `serving` (the
//! nodes it lets own buckets). A live peer is **silent on the wire** once one of its UDP
//! messages arrives `dead_after` intervals after its last wire message (or after it came up),
//! unless the wire brought noise meanwhile (see `fence.rs`); a stopped peer, silent on both
//! paths, is found dead instead. The wire rules:
//!
//! - **Deaf**: a node with live peers that hears none of them on the wire fences itself
//!   (`hears-no-peer-on-wire`), unless no live peer can serve instead of it: every live peer
//!   is fenced or deaf too, and none of the deaf ones has a lower id. So when nobody hears
//!   anybody on the wire (two nodes whose wire path is silent both ways, or a switch that
//!   drops every control frame), exactly one node, the lowest id, keeps serving: the nodes
//!   cannot tell whose wire is broken, and fencing them all would serve nothing.
//! - **Unheard**: a node fences itself (`unheard-on-wire`) when some live, unfenced, not-deaf
//!   peer reports its wire (a witness: it hears some peer on the wire) and no such witness
//!   hears this node there: its own sending side is the broken one. One peer that does not
//!   hear it while another does fences nobody (a broken path between two ports, both serve).
//! - Peers never take the buckets of a node that is only silent on the wire: they take them
//!   when its heartbeat says `fenced`, which it says from the reports they send it (on UDP as
//!   well as the wire). So a bucket moves only after its owner stopped accepting new flows in
//!   it, and a node cut off on the wire alone is substituted within the failover budget:
//!   `dead_after` intervals, the heartbeat that reveals it, and one message each way.
//!
//! The rule for every state of one node's two paths to its peers (the others' paths up), as
//! `sim::liveness` simulates it in two- and three-node clusters, checking at every instant
//! that no bucket is taken by two nodes and none, once the budget has passed, by a node that
//! cannot serve:
//!
//! ```text
//! wire path of N           UDP   outcome
//! up                       up    nothing changes
//! up                       down  nothing changes: heard on the wire, no death, no fence
//! link down                up    N fences at once (link-down); peers take on its heartbeat
//! link down                down  N fences at once; peers find it dead after dead_after
//! silent both ways         up    N hears nobody: fences (hears-no-peer-on-wire) unless kept
//!   (link up, filtered)          as the lowest of the deaf; 3+ nodes: N fences, peers take;
//!                                2 nodes: both are deaf, node 2 fences, node 1 takes all
//! N's frames lost          up    3+ nodes: the witnesses hear each other, not N: N fences
//!                                (unheard-on-wire); 2 nodes: the peer hears nobody and is
//!                                not kept (N hears it): the peer fences, N takes all
//! peers' frames lost       up    N hears nobody and is not kept (peers hear it): N fences
//! silent both ways         down  a partition (see Failure modes): each side takes all
//! N's frames lost          down  one-way partition: peers find N dead and take its buckets;
//!                                N hears them say so (`serving`) and withholds one message
//!                                later (N can serve nothing: nobody hears it)
//! peers' frames lost       down  one-way partition: N hears nobody, finds them dead and
//!                                takes all; peers hear it say so and withhold one message
//!                                later (the cluster then rests on N)
//! ```
//!
//! When the path comes back the rule that fenced lifts, after settling for a link or a core;
//! the node withholds until every live peer counts it as serving, then rejoins through a plan.
//!
//! # Failure modes (what is given up)
//!
//! - A partition (both paths cut) is indistinguishable from a failure: each side takes the
//!   other's buckets (one-way on the wire with UDP cut too: see the table above, where the
//!   overlap lasts one message). After healing, the newer plan wins (ties: the smaller proposer id), the
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
//! - Two nodes cannot tell a node's broken receive side from its peer's broken send side: the
//!   node that hears nobody fences. If it was the sender that broke, nobody serves until it is
//!   repaired or a third node joins.

use std::sync::Arc;

use crate::cluster::{Bucket, Member, NodeId, OwnershipTable, Weight, BUCKETS};
pub use crate::config::Policy;

use super::backends::{BackendAgreement, BackendDrain};
use super::message::{
    decode, Body, ControlKey, Heartbeat, Load, Message, Path, Phase, Plan, PlanId, Refusal,
    StaleNotice, LEFT_UNKNOWN, PREVIOUS_VERSION, STALE_NOTICE_VERSION, VERSION,
};
use super::snapshot::Snapshot;

mod fence;
mod linger;
mod plan;
mod receive;

pub use fence::FenceReasons;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

/// The weight every member gets under [`Policy::Hash`].
pub const HASH_WEIGHT: u32 = 100;

/// While speaking an older version, one heartbeat in this many goes out in the newest.
pub const PROBE_EVERY: u64 = 10;

/// An unknown version, or another run of this node id, is said at most once per this span
/// (after the first).
const LOG_EVERY: u64 = 60 * SEC;

/// The incarnations a run remembers having had before raising its own (each raise needs a
/// stale notice, at most one per interval; older frames of its own are long gone).
const OWN_PAST_KEPT: usize = 4;

/// What the state machine needs to know about this node and the cluster. Build it with
/// [`Config::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    pub me: NodeId,
    /// This run of the node; a restart must use a larger one (e.g. start time in ns). Raised
    /// at run time when peers hold a larger one for this node (a stale notice).
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
    /// How long a plan waits after acquire for the old owners' flows in the buckets it moves
    /// before it completes, ns (default 10 s). It ends no connection: the flows left stay with
    /// their old owner (see `linger.rs`).
    pub release_deadline: u64,
    /// When an operator's drain (without a deadline of its own, or relayed from another node)
    /// ends the flows this node still serves in buckets it released, ns after the drain; None:
    /// it waits for the last one.
    pub drain_deadline: Option<u64>,
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
    /// Digest of the configured services and backends (appliance mode; 0: none, and no
    /// backend messages are sent).
    pub services_digest: u64,
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
            drain_deadline: None,
            rebalance_every: 5 * SEC,
            rebalance_hysteresis_permille: 150,
            rebalance_max_moved_permille: 62,
            config_digest,
            key: ControlKey::from_secret(cluster_secret),
            newest_version: VERSION,
            services_digest: 0,
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
    /// Appliance mode: a new agreed backend table to apply to the services.
    Backends(crate::appliance::health::BackendTable),
}

/// Log-worthy changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// First message from a node, or from one we had declared dead.
    PeerUp { node: NodeId, incarnation: u64 },
    /// A node restarted: a message with a larger incarnation.
    PeerRejoined { node: NodeId, incarnation: u64 },
    /// Peer `by` held a larger incarnation for this node than its own (a run before this one
    /// started later by its clock: the clock was stepped back) and refused its messages: this
    /// node goes on as `incarnation`, above it.
    IncarnationRaised { by: NodeId, incarnation: u64 },
    /// An authenticated message carries this node's id and another incarnation (`incarnation`,
    /// heard on `path`): another process runs with this node id, or a message of another run
    /// of this node was replayed. `later`: it started later by its clock, so the peers follow
    /// it and refuse this node's messages. Said for the first, then at most once a minute.
    DuplicateId {
        incarnation: u64,
        path: Path,
        later: bool,
    },
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
    /// This node drains, owns nothing and serves no flow of a bucket it released: it may stop.
    Drained,
    /// This node's drain reached its deadline: it stopped serving the flows of the buckets it
    /// released (their clients get an RST from the new owners).
    DrainCut,
    /// This node fenced itself (`reasons`: why), or lifted its fence.
    Fenced { fenced: bool, reasons: FenceReasons },
    /// The node's service failed (`came_up`: it had answered before; otherwise it never has):
    /// it drains ([`super::Node::health`]).
    ServiceDown { came_up: bool },
    /// The service answers again: the node undrains what its health drained.
    ServiceUp,
    /// SIGTERM: the node drains before it stops.
    Terminating,
    /// The node stops its packet cores (`drained`: it had handed every bucket over).
    Stopping { drained: bool },
    /// A control message in a format version this node does not speak was refused (its
    /// header claims `node`, unauthenticated). Emitted for the first such message of each
    /// version, then at most once a minute per version.
    VersionRefused {
        version: u8,
        node: u8,
        /// The versions this node understands.
        understood: (u8, u8),
    },
    /// Appliance mode: this node holds an operator's backend drain (`drain`) or undrain that
    /// peer `node` relayed, of the backends at these places.
    BackendDrainRelayed {
        node: NodeId,
        drain: bool,
        places: std::collections::BTreeSet<u16>,
    },
    /// Appliance mode: this node started and holds the drains of the first agreed table it
    /// applied or made, of the backends at these places (see [`super::backends`]).
    BackendDrainsAdopted {
        places: std::collections::BTreeSet<u16>,
    },
}

/// Where an operator's backend drain went ([`Membership::drain_backends`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainRelay {
    /// Relayed on both paths: `peers` (bit `id - 1`), the live peers with this node's
    /// services, hold it too; `differ`, the live peers with other services, ignore it.
    Relayed { peers: u64, differ: u64 },
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
    /// The sequence number of the message `hb` came in.
    hb_seq: u64,
    missed: [u64; 2],
    /// Of `missed`, those counted during the current silence.
    silent: [u64; 2],
    lost: [u64; 2],
    /// The newest format version it sent in its current incarnation (0: none heard yet).
    version: u8,
    /// When it last became live (heard, or presumed, after being dead or unknown).
    alive_since: u64,
    /// When it was last told that its messages are stale ([`StaleNotice`]).
    noticed_stale: Option<u64>,
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
            hb_seq: 0,
            missed: [0; 2],
            silent: [0; 2],
            lost: [0; 2],
            alive_since: presumed.unwrap_or(0),
            noticed_stale: None,
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
    /// Appliance mode's agreed backend table ([`super::backends`]).
    backends: BackendAgreement,
    /// When the wire last brought control frames this node could not use (see
    /// `fence.rs`, `wire_silent`).
    last_wire_noise: Option<u64>,
    seq: u64,
    started: Option<u64>,
    last_heartbeat: Option<u64>,
    draining: bool,
    /// An operator's drain of this node came relayed by a peer since
    /// [`Membership::take_operator_drain`] last looked.
    operator_drain: bool,
    /// The local service fails its health check (announced in heartbeats).
    refusing: bool,
    /// The wire port has link (as the data path last said).
    wire_up: bool,
    /// Every packet core loops (as the control thread last saw).
    cores_up: bool,
    /// When the data path (wire link and packet cores) last came back (None: it never went
    /// down); the fence holds for `dead_after` intervals after it.
    data_path_up_since: Option<u64>,
    /// The causes of the fence at the last evaluation (settling aside).
    fence_causes: FenceReasons,
    /// The wire report of the last heartbeat sent ([`Membership::wire_report`]).
    last_wire_report: (u64, bool, u64),
    /// Fenced: this node owns nothing and coordinates nothing (announced in heartbeats).
    fenced: bool,
    /// Peers stand in for this node after an outage of its own data path: from its fence
    /// until the plan that takes it back is past its learning phase (see `refresh`).
    stood_in: bool,
    weight: Weight,
    load: Load,
    peers: Vec<Option<Peer>>,
    cur: Option<Current>,
    max_epoch_seen: u64,
    snapshot: Arc<Snapshot>,
    snap_key: Option<(PlanId, Phase, u64, bool, u64, bool)>,
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
    /// When another run of this node id was last said ([`Event::DuplicateId`]).
    duplicate_logged: Option<u64>,
    /// When a message of a later-started run of this node id was last heard: it fences this
    /// one ([`FenceReasons::SUPERSEDED`]) for `dead_after` intervals.
    superseded_at: Option<u64>,
    /// The incarnations this run had before it raised its own (a stale notice): its messages
    /// sent before a raise may still come back, and are no other run's. The last few only.
    own_past: Vec<u64>,
    /// Obligations left by completed plans (long-lived flows, `linger.rs`).
    linger: linger::Linger,
}

impl Membership {
    /// A node that knows nobody and follows no plan yet: it owns nothing until it adopts a plan
    /// or bootstraps one (alone for `dead_after + 1` intervals, lowest id among plan-less nodes).
    pub fn new(cfg: Config) -> Membership {
        Membership {
            weight: cfg.weight,
            backends: BackendAgreement::new(cfg.services_digest),
            last_wire_noise: None,
            cfg,
            seq: 0,
            started: None,
            last_heartbeat: None,
            draining: false,
            operator_drain: false,
            refusing: false,
            wire_up: true,
            cores_up: true,
            data_path_up_since: None,
            fence_causes: FenceReasons::NONE,
            last_wire_report: (0, false, 0),
            fenced: false,
            stood_in: false,
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
            duplicate_logged: None,
            superseded_at: None,
            own_past: Vec::new(),
            linger: linger::Linger::default(),
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
            if r == Refusal::Stale {
                self.notice_stale(&msg, now, out);
            }
            return self.refuse(path, r, now);
        }
        self.accepted[path.index()] += 1;
        match msg.body {
            Body::Heartbeat(hb) => {
                if let Some((id, _)) = hb.plan {
                    self.max_epoch_seen = self.max_epoch_seen.max(id.epoch);
                }
                // The newest heartbeat over both paths: a late copy of an older one on the
                // other path must not bring back what the sender has since changed.
                if let Some(p) = self.peers[msg.node.index()].as_mut() {
                    if msg.seq > p.hb_seq {
                        p.hb = Some(hb);
                        p.hb_seq = msg.seq;
                    }
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
                self.operator_drain |= req.drain;
                if req.drain && !self.draining {
                    self.drain_by_operator(now, out);
                } else if !req.drain && self.draining {
                    self.undrain(now, out);
                }
            }
            Body::Request(_) => {}
            Body::Backends(b) => {
                let from_coordinator = self.coordinator() == Some(msg.node);
                let adopted = self.backends.adopted().is_some();
                if let Some(table) = self.backends.received(msg.node, &b, from_coordinator) {
                    out.push(Output::Backends(table));
                    self.said_adopted(adopted, out);
                }
            }
            // Sent on both paths: the first copy raises the incarnation, the second finds it
            // raised already.
            Body::StaleNotice(notice) => self.noticed_stale(msg.node, notice, now, out),
            // Sent on both paths: the first copy changes what this node holds, the second
            // nothing.
            Body::BackendDrain(d) => {
                if self.backends.relayed(&d) {
                    out.push(Output::Event(Event::BackendDrainRelayed {
                        node: msg.node,
                        drain: d.drain,
                        places: d.places,
                    }));
                }
            }
        }
        self.update_fence(now, out);
        self.refresh(now, out);
    }

    /// An operator asks node `target` (this one or another) to drain or undrain: done here, or
    /// relayed to it in an authenticated message on both paths.
    pub fn request(&mut self, target: NodeId, drain: bool, now: u64, out: &mut Vec<Output>) {
        if target == self.cfg.me {
            if drain {
                self.drain_by_operator(now, out);
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

    /// Operator: drain (or undrain) the backends at `places` (appliance mode). This node holds
    /// it and relays it on both paths (every peer it understands reads it: version
    /// [`super::message::BACKEND_DRAIN_VERSION`] is the oldest it speaks), so that it holds on every node with
    /// the same services, whichever of them stops later.
    pub fn drain_backends(
        &mut self,
        places: &std::collections::BTreeSet<u16>,
        drain: bool,
        out: &mut Vec<Output>,
    ) -> DrainRelay {
        let live = self.live_bits() & !bit(self.cfg.me);
        let msg = BackendDrain {
            digest: self.backends.digest(),
            drain,
            places: places.clone(),
        };
        // As a peer takes it: held here, and as said in every peer's last report.
        self.backends.relayed(&msg);
        self.send(Body::BackendDrain(msg), out);
        let differ = self.backends.mismatched() & live;
        DrainRelay::Relayed {
            peers: live & !differ,
            differ,
        }
    }

    /// Time passed: detect deaths, advance plans (coordinator), send heartbeats. Call every
    /// `interval`.
    pub fn handle_tick(&mut self, now: u64, out: &mut Vec<Output>) {
        self.started.get_or_insert(now);
        let span = self.cfg.dead_span();
        let interval = self.cfg.interval;
        for (i, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot else { continue };
            p.count_silence(now, interval);
            if p.alive && p.latest().is_none_or(|t| now.saturating_sub(t) >= span) {
                p.alive = false;
                let node = node_of(i);
                out.push(Output::Event(Event::PeerDead { node }));
                self.backends.forget(node);
            }
        }
        // After the deaths: a peer silent on both paths is dead, not a sign of a deaf wire.
        self.update_fence(now, out);
        self.review_obligations(now, out);
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
            self.agree_on_backends(out);
        }
    }

    /// Appliance mode, once per heartbeat: the coordinator moves the backend table on, and
    /// every node sends its report and the table it holds.
    fn agree_on_backends(&mut self, out: &mut Vec<Output>) {
        // A node without a plan (just started, say) makes no table even if it is the lowest
        // live id: it has not heard the others' tables yet, and the nodes that follow a plan
        // may still take it as their coordinator.
        if self.backends.active() && self.cur.is_some() && self.is_coordinator() {
            let adopted = self.backends.adopted().is_some();
            if let Some(table) = self.backends.coordinate(self.cfg.me, self.serving_bits()) {
                out.push(Output::Backends(table));
                self.said_adopted(adopted, out);
            }
        }
        if let Some(m) = self.backends.message() {
            self.send(Body::Backends(m), out);
        }
    }

    /// After a table was applied or made: the drains a starting node took from it (`adopted`:
    /// it had taken them before), said once.
    fn said_adopted(&self, adopted: bool, out: &mut Vec<Output>) {
        match self.backends.adopted() {
            Some(places) if !adopted && !places.is_empty() => {
                out.push(Output::Event(Event::BackendDrainsAdopted {
                    places: places.clone(),
                }))
            }
            _ => {}
        }
    }

    /// Flow counts from the data path for the buckets this node releases or still holds
    /// ([`Snapshot::counted`]): released buckets not listed count as 0, held ones not listed
    /// keep their last count (list every counted bucket, zeros included). Call it every tick or
    /// so while there are any; the plan completes when every releasing node reports 0.
    pub fn report_flows(&mut self, flows: &[(Bucket, u32)], now: u64, out: &mut Vec<Output>) {
        let releasing = self.take_counts(flows);
        let Some(id) = self.snapshot.plan() else {
            return;
        };
        if !matches!(self.snapshot.phase(), Phase::Release | Phase::Acquire) || releasing.is_empty()
        {
            return;
        }
        let left = releasing.iter().filter(|&&(_, n)| n > 0).count() as u32;
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
            self.reset_cut();
            self.draining = false;
            self.drained = false;
            self.send_heartbeat(now, out);
        }
    }

    /// Operator: a `reload` changed the services; `digest` is theirs now. Peers are counted in
    /// the backend agreement again once their services match (they reload too).
    pub fn set_services_digest(&mut self, digest: u64) {
        self.cfg.services_digest = digest;
        self.backends.set_digest(digest);
    }

    /// After a reload: the agreed table in force, renumbered for the new services, and the
    /// drains this node holds, moved to their new places (see [`BackendAgreement::renumber`]).
    pub fn renumber_backends(
        &mut self,
        table: crate::appliance::health::BackendTable,
        moved: impl Fn(u16) -> Option<u16>,
    ) {
        self.backends.renumber(table, moved);
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

    /// The load last given by [`Membership::set_load`].
    pub fn load(&self) -> Load {
        self.load
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

    /// The node that coordinates as this one sees it: the lowest serving member of the current
    /// plan (or the lowest serving node without one).
    pub fn coordinator(&self) -> Option<NodeId> {
        let live = self.serving_bits();
        let cands = match &self.cur {
            Some(c) => members_bits(&c.plan) & live,
            None => 0,
        };
        let cands = if cands == 0 { live } else { cands };
        (cands != 0).then(|| node_of(cands.trailing_zeros() as usize))
    }

    /// What this node's checker reports about the backends (`None` while its checks have not
    /// settled); the drains it holds are added to it ([`BackendAgreement`]).
    pub fn set_backend_report(&mut self, report: Option<crate::appliance::health::Report>) {
        self.backends.set_own(report);
    }

    /// The backend agreement (table in force, own report, peers whose services differ).
    pub fn backends(&self) -> &BackendAgreement {
        &self.backends
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

    /// Whether an operator's drain of this node came relayed by a peer since the last call
    /// (the node then drains at its operator's word, whatever its health says later).
    pub fn take_operator_drain(&mut self) -> bool {
        std::mem::take(&mut self.operator_drain)
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
