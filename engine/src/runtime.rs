//! The control thread: it owns the side UDP socket, the timers, the operator's control socket
//! and the membership state machine ([`crate::control::Membership`]), and talks to the packet
//! cores only through [`ControlLink`]: lock-free channels for wire heartbeat frames, an
//! [`ArcSwap`] for the ownership snapshot the cores pick up between bursts, and per-core atomics
//! for the flow counts the handoff's "done" step needs. The packet cores never wait on it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use arc_swap::ArcSwap;
use siphasher::sip::SipHasher13;

use crate::appliance::health::{spawn_checker, LocalVerdicts, Report};
use crate::appliance::neighbours::Neighbours;
use crate::appliance::Services;
use crate::cluster::{Bucket, NodeId};
use crate::config::{Loaded, Policy as ConfigPolicy};
use crate::control::operator::{Refused, Reply, Request};
use crate::control::service_status::{self, SingleRuleChange, UnservedRules};
use crate::control::{
    self, Event, Load, Membership, Node, Output, Path, Refusal, Timeline, Verdict,
};
use crate::dataplane::{wire_payload, ControlLink};
use crate::metrics::{ControlView, PeerView};

/// What every node of a cluster must agree on, hashed: nodes with another digest are refused.
pub(crate) fn config_digest(loaded: &Loaded) -> u64 {
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

/// What every node's services must agree on (appliance mode), hashed: the rules and their
/// backends as configured, in order (the agreed table names a backend by its place in them:
/// [`crate::appliance::Backend::agreed`]); 0 without any backend (then no backend messages are
/// sent).
pub(crate) fn services_digest(config: &crate::config::Config) -> u64 {
    if config.services.iter().all(|s| s.backends.is_empty()) {
        return 0;
    }
    let canonical = serde_json::to_string(&config.services).unwrap_or_default();
    let mut h = SipHasher13::new_with_keys(0x7365727669636573, 0x6261636b656e6473);
    std::hash::Hasher::write(&mut h, canonical.as_bytes());
    std::hash::Hasher::finish(&h).max(1)
}

/// The membership configuration a node's YAML describes.
pub(crate) fn membership_config(loaded: &Loaded, incarnation: u64) -> control::Config {
    let c = &loaded.config;
    let me = c.node.id;
    let mut m = control::Config::new(
        me,
        incarnation,
        c.node.mac.0,
        &loaded.secret,
        config_digest(loaded),
    );
    m.weight = c.node.weight;
    m.services_digest = services_digest(&loaded.config);
    m.policy = match c.cluster.policy {
        ConfigPolicy::Hash => control::Policy::Hash,
        ConfigPolicy::Weighted => control::Policy::Weighted,
        ConfigPolicy::ByLoad => control::Policy::ByLoad,
    };
    m.interval = c.control.interval.0.as_nanos() as u64;
    m.dead_after = c.control.dead_after;
    m.learn = c.control.handoff_learn.0.as_nanos() as u64;
    m.release_deadline = c.control.release_deadline.0.as_nanos() as u64;
    m.drain_deadline = c.control.drain_deadline.0.map(|d| d.as_nanos() as u64);
    m
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
        fence_reasons: m.fence_reasons(),
        wire_peers_heard: u64::from(m.wire_heard().count_ones()),
        released_flows: m.released_flows(),
        held_buckets: m.held_buckets(),
        owed_buckets: m.owed_buckets(),
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
///
/// It only moves bytes and verdicts: every decision is the [`Node`]'s.
pub fn control_thread(
    loaded: Loaded,
    link: Arc<ControlLink>,
    requests: Arc<Requests>,
    stop_cores: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let cfg = &loaded.config;
    let start = Instant::now();
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let me = cfg.node.id;
    let mut node = Node::new(
        Membership::new(membership_config(&loaded, incarnation)),
        control::Settings {
            drain_deadline: cfg.control.drain_deadline.0.map(|d| d.as_nanos() as u64),
            health_port: cfg.health.as_ref().map(|h| h.address.port()),
            hasher: crate::cluster::BucketHasher::new(&loaded.secret),
            affinity: cfg.cluster.affinity,
        },
    );
    let interval = cfg.control.interval.0;
    // Ticks more often than the interval: the state machine sends heartbeats on its own clock.
    let tick = (interval / 4).max(Duration::from_millis(5));
    let io = ControlIo::open(&loaded, &link, tick)?;
    let health = match &cfg.health {
        Some(h) => Some(
            crate::health::spawn(me.get(), h.clone()).context("cannot start the health checker")?,
        ),
        None => None,
    };
    if health.is_none() {
        tracing::info!(
            node = me.get(),
            "no health section: this node cannot know whether its service is up; it takes its \
             share as soon as it joins"
        );
    }
    let mut watch = HealthWatch::new(cfg);
    let mut cores = CoreWatch::new(link.cores.len(), interval * cfg.control.dead_after);
    let mut backends = BackendWatch::new(&loaded, &link);
    let mut wire_dropped_seen = (0u64, 0u64);
    // Peers whose services differ from this node's (bit `id - 1`), as last logged.
    let mut services_differ = 0u64;
    // Backends the agreed table this node made could not list, as last logged.
    let mut backends_left_out = 0usize;
    let mut single_rules = SingleRuleWatch::default();
    let mut current = loaded.clone();
    let mut busy = BusyShare::new(start);
    let mut out = Vec::new();
    let mut timeline = Timeline::default();
    let mut buf = [0u8; 2048];
    let mut next_tick = start;
    let mut next_report = start;
    let now_ns = || start.elapsed().as_nanos() as u64;

    node.handle_tick(now_ns(), &mut out);
    loop {
        // Side channel, then the wire heartbeats the cores received. A payload without a whole
        // length-prefixed message is malformed like any other.
        match &io.socket {
            Some(s) => {
                if let Ok((n, _from)) = s.recv_from(&mut buf) {
                    node.handle_message(Path::Udp, &buf[..n], now_ns(), &mut out);
                }
            }
            None => std::thread::sleep(tick),
        }
        for payload in link.wire_received() {
            let msg = wire_payload(&payload).unwrap_or_default();
            node.handle_message(Path::Wire, msg, now_ns(), &mut out);
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + tick;
            let busy_ns: u64 = link.cores.iter().map(|c| c.busy_ns.load(Relaxed)).sum();
            let flows: u64 = link.cores.iter().map(|c| c.flows.load(Relaxed)).sum();
            node.set_load(Load {
                active_flows: flows.min(u64::from(u32::MAX)) as u32,
                busy_permille: busy.permille(now, busy_ns, link.cores.len()),
            });
            if let Some(h) = &health {
                let guard = node.health(watch.verdict(h, &link, me), now_ns(), &mut out);
                link.refuse_new.store(guard.refuse_new, Relaxed);
                link.hold_refusals_on
                    .store(u32::from(guard.hold_refusals_on), Relaxed);
            }
            link.refusing_peers.store(node.refusing_peers(), Relaxed);
            // Control frames the cores could not queue, or a receive queue backed up (whole
            // bursts: frames may be lost before the cores see them, an af_packet ring or a NIC
            // does not say which): a flood or a saturated wire, not a dead one.
            let dropped: u64 = link.wire_in_dropped.iter().map(|d| d.load(Relaxed)).sum();
            let full: u64 = link
                .cores
                .iter()
                .map(|c| c.wire_full_bursts.load(Relaxed))
                .sum();
            if (dropped, full) != wire_dropped_seen {
                wire_dropped_seen = (dropped, full);
                node.note_wire_noise(now_ns());
            }
            node.set_wire_link(link.wire_link_up.load(Relaxed), now_ns(), &mut out);
            node.set_cores_running(cores.running(&link, now, me), now_ns(), &mut out);
            // The backends first: after a reload, the checks follow the new services and the
            // report names their places before the tick's heartbeat carries it.
            backends.tick(&current.config, &link, now_ns());
            single_rules.tick(&link, me.get());
            node.set_backend_report(backends.report(&link.services()));
            node.handle_tick(now_ns(), &mut out);
            let left_out = node.backends().left_out();
            if left_out != backends_left_out {
                backends_left_out = left_out;
                if left_out > 0 {
                    tracing::warn!(
                        backends = left_out,
                        limit = crate::control::backends::MAX_IDS,
                        "more backends down or drained at once than the agreed table lists: \
                         these count as up on every node"
                    );
                }
            }
            let differ = node.backends().mismatched();
            if differ != services_differ {
                services_differ = differ;
                if differ == 0 {
                    tracing::info!("every peer runs this node's services again");
                } else {
                    tracing::warn!(
                        nodes = %crate::control::node::ids_text(&crate::control::node::ids_of(differ)),
                        "peers run other services than this node (or another version): their \
                         backend checks are not counted and they may send a flow to another \
                         backend; reload every node to the same file"
                    );
                }
            }
            link.set_members(&node);
            let mut v = control_view(&node, me, now_ns());
            if let Some(h) = &health {
                v.healthy = Some(h.healthy());
                v.health_checks = h.checks();
            }
            io.view.store(Arc::new(v));
        }
        // Flow counts of the buckets this node releases or still holds (the "done" step).
        if now >= next_report {
            next_report = now + interval;
            let snapshot = link.snapshot.load();
            let releasing: Vec<Bucket> = snapshot.counted(me).collect();
            if !releasing.is_empty() {
                if let Some(counts) = link.releasing_counts(&releasing) {
                    node.report_flows(&counts, now_ns(), &mut out);
                }
            }
        }
        if let Some(op) = &io.operator {
            op.serve(
                &mut node,
                &mut current,
                &timeline,
                &link,
                now_ns(),
                &mut out,
            );
        }
        if requests.terminate.load(Relaxed) {
            node.terminate(now_ns(), &mut out);
        }
        if node.stopping() {
            stop_cores.store(true, Relaxed);
        }
        io.carry_out(&mut out, &link, &mut timeline, me.get());
        crate::logging::set_epoch(node.epoch());
        if stop_cores.load(Relaxed) {
            return Ok(());
        }
    }
}

/// The `single` rules that no node takes (none of their priority list serves), logged when
/// that set changes: after a new ownership snapshot or new services (a `reload`).
struct SingleRuleWatch {
    /// The snapshot and services versions last looked at (none yet: `u64::MAX`).
    seen: (u64, u64),
    /// The unserved rules as last logged.
    unserved: UnservedRules,
}

impl Default for SingleRuleWatch {
    fn default() -> SingleRuleWatch {
        SingleRuleWatch {
            seen: (u64::MAX, u64::MAX),
            unserved: UnservedRules::default(),
        }
    }
}

impl SingleRuleWatch {
    fn tick(&mut self, link: &ControlLink, me: u8) {
        let versions = (link.current_version(), link.services_version.load(Relaxed));
        if versions == self.seen {
            return;
        }
        self.seen = versions;
        let services = link.services();
        if !services.has_single() {
            self.unserved = UnservedRules::default();
            return;
        }
        let serving = link.snapshot.load().serving();
        for change in self.unserved.changes(&services, serving) {
            match change {
                SingleRuleChange::Unserved {
                    name,
                    priority,
                    serving,
                } => tracing::warn!(
                    node = me,
                    service = %name,
                    priority = %crate::control::node::ids_text(&priority),
                    serving = %crate::control::node::ids_text(&serving),
                    "single rule taken by no node: none of its priority list serves now (down, \
                     fenced, drained or not in the cluster), so every node drops its frames; \
                     list a serving node in its priority and reload"
                ),
                SingleRuleChange::Taken { name, node } => tracing::info!(
                    node = me,
                    service = %name,
                    taken_by = node,
                    "single rule taken by a node again"
                ),
            }
        }
    }
}

/// The control thread's sockets: the side channel, the operator's socket and the metrics view.
struct ControlIo {
    /// How long to wait for the cores to follow a snapshot (see [`ADOPTION_SHARE_OF_BUDGET`]).
    adoption_patience: Duration,
    socket: Option<UdpSocket>,
    peers: Vec<SocketAddr>,
    operator: Option<OperatorSocket>,
    view: Arc<ArcSwap<ControlView>>,
    /// Keys the backend tables of an agreed backend table's services.
    secret: Vec<u8>,
}

impl ControlIo {
    fn open(loaded: &Loaded, link: &Arc<ControlLink>, tick: Duration) -> anyhow::Result<ControlIo> {
        let cfg = &loaded.config;
        let socket = match cfg.control.listen {
            Some(addr) => {
                let s = UdpSocket::bind(addr).map_err(|e| {
                    anyhow!(
                        "`control.listen`: cannot bind {addr}: {e}\n  fix: use an address of this \
                         node's control network (or leave the key out to use the wire path only)"
                    )
                })?;
                s.set_read_timeout(Some(tick)).with_context(|| {
                    format!("`control.listen`: cannot set a read timeout on {addr}")
                })?;
                Some(s)
            }
            None => None,
        };
        let operator = match &cfg.control.socket {
            Some(path) => Some(OperatorSocket::bind(path.clone())?),
            None => None,
        };
        let view = Arc::new(ArcSwap::from_pointee(ControlView::default()));
        if let Some(addr) = cfg.control.metrics {
            crate::metrics::serve(addr, cfg.node.id.get(), Arc::clone(link), Arc::clone(&view))?;
        }
        let budget = cfg.control.interval.0 * cfg.control.dead_after;
        Ok(ControlIo {
            secret: loaded.secret.clone(),
            adoption_patience: (budget / ADOPTION_SHARE_OF_BUDGET).max(Duration::from_millis(10)),
            socket,
            peers: cfg.control.peers.clone(),
            operator,
            view,
        })
    }

    /// Carries out the node's outputs in order: sends, snapshots to the cores, log lines.
    ///
    /// Log lines carry the epoch in force when what they report happened: events queued before
    /// a new plan keep the old epoch, the plan's adoption and what follows the new one (the
    /// outputs are in the order the state machine produced them).
    fn carry_out(
        &self,
        out: &mut Vec<Output>,
        link: &ControlLink,
        timeline: &mut Timeline,
        me: u8,
    ) {
        for o in out.drain(..) {
            if let Output::Event(Event::PlanAdopted { plan, .. }) = &o {
                crate::logging::set_epoch(plan.epoch);
            }
            match o {
                Output::Send {
                    path: Path::Udp,
                    bytes,
                } => {
                    if let Some(s) = &self.socket {
                        for p in &self.peers {
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
                Output::Publish(snapshot) => {
                    // What follows in this batch (a phase reached, a plan acknowledged)
                    // announces that this node acts on the snapshot: only once every packet
                    // core does.
                    let version = link.publish(snapshot);
                    let late = link.await_adoption(version, self.adoption_patience);
                    if !late.is_empty() {
                        tracing::error!(
                            node = me,
                            cores = late
                                .iter()
                                .map(usize::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                            "packet cores did not take up the new ownership snapshot in time: \
                             announcing it anyway"
                        );
                    }
                }
                Output::Event(e) => {
                    timeline.record(unix_ms(), &e);
                    log_event(me, crate::logging::context().1, &e, &link.services());
                }
                Output::Backends(table) => {
                    let services = link.services().with_table(&self.secret, &table);
                    tracing::info!(
                        node = me,
                        backend_epoch = table.epoch,
                        down = %backend_names(&services, &table.down),
                        drained = %backend_names(&services, &table.drained),
                        "agreed backend table applied"
                    );
                    link.publish_services(Arc::new(services));
                }
            }
        }
    }
}

/// The share of the failover budget (`dead_after` intervals) the control thread may wait for
/// the packet cores to follow a new ownership snapshot before it announces it anyway (an awake
/// core takes it up within 16 loop turns; a sleeping one counts as having it). It sends nothing
/// meanwhile, heartbeats included: a longer wait would make its peers find it dead.
const ADOPTION_SHARE_OF_BUDGET: u32 = 3;

/// Watches the packet cores' loop counts: a core that stops looping while awake for longer
/// than the failover budget has stalled, and the node must fence itself.
struct CoreWatch {
    /// Per core: its last loop count and when it last changed (or the core was asleep).
    seen: Vec<(u64, Instant)>,
    budget: Duration,
    stalled: bool,
}

impl CoreWatch {
    fn new(cores: usize, budget: Duration) -> CoreWatch {
        let now = Instant::now();
        CoreWatch {
            seen: vec![(0, now); cores],
            budget: budget.max(Duration::from_millis(250)),
            stalled: false,
        }
    }

    /// Whether every core loops (or sleeps); logs when a core stalls and when all run again.
    fn running(&mut self, link: &ControlLink, now: Instant, me: NodeId) -> bool {
        let mut stalled = Vec::new();
        for (i, (c, (loops, since))) in link.cores.iter().zip(&mut self.seen).enumerate() {
            let asleep = c.asleep();
            let l = c.loops.load(Relaxed);
            if l != *loops || asleep {
                *loops = l;
                *since = now;
            } else if now.saturating_duration_since(*since) > self.budget {
                stalled.push(i.to_string());
            }
        }
        let was = self.stalled;
        self.stalled = !stalled.is_empty();
        if self.stalled && !was {
            tracing::error!(
                node = me.get(),
                cores = stalled.join(", "),
                "packet core stalled: fencing this node until every core loops again"
            );
        } else if was && !self.stalled {
            tracing::info!(node = me.get(), "every packet core loops again");
        }
        !self.stalled
    }
}

/// Reads the health checker for the node: its verdict, a check at once when the service
/// refused a connection (evidence), and a warning if the checker stopped running.
struct HealthWatch {
    refusals_seen: u64,
    watchdog_span: Duration,
    watchdog_warned: bool,
}

impl HealthWatch {
    fn new(cfg: &crate::config::Config) -> HealthWatch {
        HealthWatch {
            refusals_seen: 0,
            watchdog_span: cfg
                .health
                .as_ref()
                .map(|h| (h.interval.0 + h.timeout.0) * 3)
                .unwrap_or_default(),
            watchdog_warned: false,
        }
    }

    fn verdict(&mut self, h: &crate::health::Health, link: &ControlLink, me: NodeId) -> Verdict {
        let refusals = link.service_refusals();
        if refusals != self.refusals_seen {
            self.refusals_seen = refusals;
            h.check_now();
        }
        let stalled = h.since_last_check() > self.watchdog_span;
        if stalled && !self.watchdog_warned {
            tracing::error!(
                node = me.get(),
                "watchdog: the health checker stopped running"
            );
        }
        self.watchdog_warned = stalled;
        Verdict {
            healthy: h.healthy(),
            came_up: h.came_up(),
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

/// The names of the backends at `places` in `services` (`none` for none).
fn backend_names(services: &Services, places: &std::collections::BTreeSet<u16>) -> String {
    let v: Vec<String> = services
        .backends()
        .filter(|(_, b)| places.contains(&b.agreed))
        .map(|(_, b)| b.name.clone())
        .collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// `services`: the ones in force, which name the backends of appliance mode's events.
fn log_event(node: u8, epoch: u64, e: &Event, services: &Services) {
    match e {
        Event::PeerUp { node: peer, .. } => tracing::info!(node, epoch, peer = %peer, "peer up"),
        Event::PeerRejoined {
            node: peer,
            incarnation,
        } => {
            tracing::info!(node, epoch, peer = %peer, incarnation, "peer rejoined")
        }
        Event::IncarnationRaised { by, incarnation } => tracing::warn!(
            node,
            epoch,
            peer = %by,
            incarnation,
            "a peer holds a later run of this node and refused its messages (the clock was \
             stepped back since that run, or another machine ran with this node id): this node \
             goes on with a larger incarnation and rejoins; check the clock's source and the \
             node ids"
        ),
        Event::DuplicateId {
            incarnation,
            path,
            later,
        } => {
            let path = path.name();
            if *later {
                tracing::error!(
                    node,
                    epoch,
                    other_incarnation = incarnation,
                    path,
                    "another process runs with this node id and started later (or a message of \
                     a later run of this node was replayed): the peers follow it and refuse this \
                     node's messages, and this one fences itself (it serves nothing) until the \
                     other has been silent for dead_after intervals; give every node its own id"
                )
            } else {
                tracing::error!(
                    node,
                    epoch,
                    other_incarnation = incarnation,
                    path,
                    "another process runs with this node id and started earlier (or a message \
                     of an earlier run of this node was replayed): the peers follow this one and \
                     refuse the other, which fences itself while it hears this one; give every \
                     node its own id"
                )
            }
        }
        Event::PeerDead { node: peer } => tracing::warn!(node, epoch, peer = %peer, "peer dead"),
        Event::TakeOver { dead } => {
            tracing::warn!(
                node,
                epoch,
                dead = (0..64u8)
                    .filter(|i| dead >> i & 1 == 1)
                    .map(|i| format!("node {}", i + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
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
            phase = phase.name(),
            members = %members
                .iter()
                .map(|m| m.id.get().to_string())
                .collect::<Vec<_>>()
                .join(","),
            moving,
            "ownership plan adopted"
        ),
        Event::PhaseChanged { plan, phase } => {
            tracing::info!(
                node,
                epoch,
                plan_epoch = plan.epoch,
                phase = phase.name(),
                "handoff phase"
            )
        }
        Event::Drained => tracing::info!(
            node,
            epoch,
            "drained: this node owns no bucket and serves no flow of one it released"
        ),
        Event::DrainCut => tracing::warn!(
            node,
            epoch,
            "drain deadline: the flows still served in released buckets were cut"
        ),
        Event::Fenced {
            fenced: true,
            reasons,
        } => tracing::warn!(
            node,
            epoch,
            reasons = %reasons.iter().map(|r| r.label()).collect::<Vec<_>>().join(","),
            "fenced: {}; this node owns nothing until it is back",
            reasons.words()
        ),
        Event::Fenced { fenced: false, .. } => tracing::info!(
            node,
            epoch,
            "fence lifted: the data path serves again and the cluster's plan heard"
        ),
        Event::ServiceDown { came_up: true } => {
            tracing::warn!(node, epoch, "service unhealthy: draining")
        }
        Event::ServiceDown { came_up: false } => tracing::info!(
            node,
            epoch,
            "service not up yet: joining drained until it answers"
        ),
        Event::ServiceUp => tracing::info!(node, epoch, "service healthy: undraining"),
        Event::Terminating => tracing::info!(node, epoch, "SIGTERM: draining"),
        Event::Stopping { drained } => tracing::info!(node, epoch, drained, "stopping"),
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
        Event::BackendDrainRelayed {
            node: peer,
            drain,
            places,
        } => tracing::info!(
            node,
            epoch,
            peer = %peer,
            backends = %backend_names(services, places),
            "operator's {} relayed by node {peer}: this node holds it too",
            if *drain { "drain-backend" } else { "undrain-backend" }
        ),
        Event::BackendDrainsAdopted { places } => tracing::info!(
            node,
            epoch,
            backends = %backend_names(services, places),
            "holds the backend drains of the agreed table, as every node does: they outlive \
             the node that took them"
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
    fn bind(path: PathBuf) -> anyhow::Result<OperatorSocket> {
        // A socket file left by a crashed run is stale: nobody can be listening on it.
        if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            anyhow!(
                "`control.socket`: cannot bind {}: {e}\n  fix: choose a path in a writable \
                 directory that no other node uses",
                path.display()
            )
        })?;
        listener.set_nonblocking(true).with_context(|| {
            format!(
                "`control.socket`: cannot make {} non-blocking",
                path.display()
            )
        })?;
        Ok(OperatorSocket { listener, path })
    }

    /// Answers one pending request, if any: the [`Node`] decides, this only reads the line
    /// (and, for `reload`, the node's file) and writes the reply.
    fn serve(
        &self,
        node: &mut Node,
        current: &mut Loaded,
        timeline: &Timeline,
        link: &ControlLink,
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
        let reply = match Request::parse(&line) {
            Err(error) => Reply::Refused(Refused::new(error)),
            Ok(Request::Reload) => reload(current, node, link, now, out),
            Ok(Request::DrainBackend { name, drain }) => {
                let reply = node.drain_backend(&name, drain, &link.services(), out);
                if let Reply::DrainBackend(r) = &reply {
                    tracing::info!(
                        backends = %r.backends.join(", "),
                        drained = drain,
                        "operator: {r}"
                    );
                }
                reply
            }
            Ok(request) => {
                let mut reply = node.request(&request, timeline, now, out);
                node.describe_services(&request, &mut reply, &link.services());
                if let Reply::Status(s) = &mut reply {
                    service_status::add_flows(&mut s.services, |id| link.backend_counts(id).flows);
                }
                reply
            }
        };
        let mut w = &stream;
        let _ = writeln!(w, "{}", reply.to_line());
    }
}

impl Drop for OperatorSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Appliance mode's backends as the control thread keeps them: their MACs learned by ARP and
/// neighbour discovery ([`Neighbours`] decides; this sends its requests through core 0, feeds it
/// the answers the cores copied, and publishes what it learns to the cores).
struct BackendWatch {
    neighbours: Neighbours,
    /// The backend checker's verdicts (None: no service checks its backends).
    checks: Option<Arc<LocalVerdicts>>,
    secret: Vec<u8>,
    /// The services version last seen (a reload changes the backends to resolve).
    seen: u64,
}

impl BackendWatch {
    fn new(loaded: &Loaded, link: &ControlLink) -> BackendWatch {
        let c = &loaded.config;
        let checks = match spawn_checker(c, &link.services()) {
            Ok(checks) => checks,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the backend checker: backends count as up");
                None
            }
        };
        BackendWatch {
            checks,
            neighbours: Neighbours::new(
                &link.services(),
                c.node.mac,
                c.cluster.mac,
                c.node.ip,
                c.node.ip6,
            ),
            secret: loaded.secret.clone(),
            seen: link.services_version.load(Relaxed),
        }
    }

    /// This node's checker's verdicts, as the nodes name the backends (places in `services`,
    /// this node's in force; none down without checks). The drains it holds are the backend
    /// agreement's (it adds them).
    fn report(&self, services: &Services) -> Option<Report> {
        let mine = match &self.checks {
            Some(c) => c.report(),
            None => Some(Report::default()),
        };
        mine.map(|r| services.agreed_report(&r))
    }

    /// `config`: the node's configuration in force (the last `reload`'s).
    fn tick(&mut self, config: &crate::config::Config, link: &ControlLink, now: u64) {
        let version = link.services_version.load(Relaxed);
        if version != self.seen {
            self.seen = version;
            let mut services = link.services();
            let known = self.neighbours.update(&services);
            if !known.is_empty() {
                services = self.publish_macs(link, services, &known);
            }
            // The checks follow the services: backends added by a reload are checked (their
            // verdicts start down until they answer), removed ones are forgotten.
            match &self.checks {
                Some(checks) => checks.retarget(config, &services),
                None => match spawn_checker(config, &services) {
                    Ok(checks) => self.checks = checks,
                    Err(e) => tracing::error!(
                        error = %e,
                        "cannot start the backend checker: backends count as up"
                    ),
                },
            }
        }
        link.wants_neighbours
            .store(self.neighbours.wants_answers(), Relaxed);
        // The answers first: a request is due again only if its answer did not come.
        for frame in link.neighbour_answers() {
            let Some((mac, ids)) = self.neighbours.received(&frame) else {
                continue;
            };
            let learned: Vec<(u16, crate::wire::EthernetAddress)> =
                ids.iter().map(|&id| (id, mac)).collect();
            let services = link.services();
            for &(id, _) in &learned {
                if let Some((_, b)) = services.by_id(id) {
                    match b.via {
                        Some(via) => tracing::info!(
                            backend = %b.name,
                            address = %b.ip,
                            via = %via,
                            mac = %mac,
                            "backend next hop MAC learned"
                        ),
                        None => tracing::info!(
                            backend = %b.name,
                            address = %b.ip,
                            mac = %mac,
                            "backend MAC learned"
                        ),
                    }
                }
            }
            self.publish_macs(link, services, &learned);
        }
        for frame in self.neighbours.tick(now) {
            link.send_frame(frame);
        }
    }

    /// Publishes `services` with the MACs of `macs` (backend id, MAC) to the cores, and
    /// returns them (this publication is not news to the next tick).
    fn publish_macs(
        &mut self,
        link: &ControlLink,
        mut services: Arc<Services>,
        macs: &[(u16, crate::wire::EthernetAddress)],
    ) -> Arc<Services> {
        for &(id, mac) in macs {
            services = Arc::new(services.with_backend(&self.secret, id, |b| b.mac = Some(mac)));
        }
        link.publish_services(Arc::clone(&services));
        self.seen = link.services_version.load(Relaxed);
        services
    }
}

/// `reload`: re-reads the node's YAML and lets the [`Node`] decide over the keys that changed;
/// a broken file changes nothing.
fn reload(
    current: &mut Loaded,
    node: &mut Node,
    link: &ControlLink,
    now: u64,
    out: &mut Vec<Output>,
) -> Reply {
    let next = match crate::config::Config::load(&current.path) {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "reload refused: nothing changed");
            return Reply::Refused(Refused {
                error: e.to_string(),
                changed: Some(Vec::new()),
            });
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
    let weight =
        (next.config.node.weight != current.config.node.weight).then_some(next.config.node.weight);
    let services_changed = changed
        .iter()
        .any(|k| k == "services" || k.starts_with("services.") || k == "unmatched");
    // Backends that stay keep their ids, learned MACs and states. The agreed table in force
    // applies at once, renumbered for the new file (it names backends by their place in it):
    // a backend that stays keeps its state, a new one is down until its checks say otherwise
    // (up if its service checks nothing), which this node's reports and the next table then
    // carry.
    let compiled = services_changed.then(|| {
        let before = link.services();
        let fresh = Services::compile(&next.config, &next.secret, Some(&before));
        let checked = |ri: usize| {
            next.config
                .services
                .get(ri)
                .is_some_and(|s| s.backend_health.is_some())
        };
        let table = before.renumbered(node.backends().table(), &fresh, checked);
        let services = fresh.with_table(&next.secret, &table);
        (before, services, table)
    });
    let digest = services_changed.then(|| services_digest(&next.config));
    let reply = node.reload(changed, weight, digest, now, out);
    match &reply {
        Reply::Refused(r) => tracing::warn!(error = %r.error, "reload refused"),
        _ => {
            if weight.is_some() {
                tracing::info!(
                    from = current.config.node.weight.get(),
                    to = next.config.node.weight.get(),
                    epoch = node.epoch(),
                    "reload: weight changed"
                );
            }
            if let Some((before, services, table)) = compiled {
                // A table this pass queued (a message or a tick before the operator's request)
                // names the old file's places; the renumbered one holds it already.
                out.retain(|o| !matches!(o, Output::Backends(_)));
                // A drain is of a server: it ends when its id leaves or names another one.
                node.renumber_backends(table, |place| before.moved_place(place, &services));
                tracing::info!(
                    services = services.rules().len(),
                    backends = services.backends().count(),
                    "reload: services changed"
                );
                link.publish_services(Arc::new(services));
            }
            *current = next;
        }
    }
    reply
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
    /// (the cores publish their totals every 1024 loops and at least every 10 ms, so one
    /// reading can overshoot).
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

    /// A `single` rule whose priority list names no node that serves is noticed once other
    /// nodes serve, again under another list, and said taken once a `reload` names a serving
    /// node; not while no node serves at all, nor for a rule a reload removed; and the watch
    /// looks again only after a new snapshot or new services.
    #[test]
    fn a_single_rule_nobody_takes_is_noticed_and_said_taken_again() {
        use crate::cluster::{Member, OwnershipTable};
        use crate::control::Snapshot;
        use SingleRuleChange::{Taken, Unserved};
        let services = |name: &str, priority: &str| {
            let text = crate::config::tests::LAB.replace(
                "  mac: 02:00:00:00:00:01\n",
                "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
            ) + &format!(
                "services:\n  - name: {name}\n    addresses: [198.18.0.100]\n    protocol: \
                 udp\n    ports: [53]\n    mode: single\n    priority: [{priority}]\n    \
                 delivery: dsr\n    backends:\n      - {{ ip: 198.18.0.31, mac: \
                 02:bb:00:00:00:31 }}\n"
            );
            let c = crate::config::Config::parse(&text, "t.yaml").unwrap();
            c.validate("t.yaml").unwrap();
            Services::compile(&c, b"secret", None)
        };
        let unserved = |priority: &[u8]| Unserved {
            name: "dns".to_owned(),
            priority: priority.to_vec(),
            serving: vec![1, 2],
        };
        let (one_two, nobody) = (0b11, 0);
        let mut watch = UnservedRules::default();
        assert_eq!(watch.changes(&services("dns", "3"), nobody), []);
        assert_eq!(
            watch.changes(&services("dns", "3"), one_two),
            [unserved(&[3])]
        );
        assert_eq!(watch.changes(&services("dns", "3"), one_two), []);
        // Every node gone: nothing said, nothing forgotten.
        assert_eq!(watch.changes(&services("dns", "3"), nobody), []);
        assert_eq!(watch.changes(&services("dns", "3"), one_two), []);
        // Another list nobody serves either: said again.
        assert_eq!(
            watch.changes(&services("dns", "4"), one_two),
            [unserved(&[4])]
        );
        assert_eq!(
            watch.changes(&services("dns", "4, 2"), one_two),
            [Taken {
                name: "dns".to_owned(),
                node: 2
            }]
        );
        // A rule a reload took away is not said taken.
        assert_eq!(
            watch.changes(&services("dns", "3"), one_two),
            [unserved(&[3])]
        );
        assert_eq!(watch.changes(&services("ntp", "1"), one_two), []);

        // The link: looked at after a new snapshot or new services only.
        let link = ControlLink::new(1, Arc::new(Snapshot::empty()));
        link.publish_services(Arc::new(services("dns", "3")));
        let mut watch = SingleRuleWatch::default();
        watch.tick(&link, 1);
        assert!(watch.unserved.rules.is_empty(), "nobody serves at all yet");
        let members = [Member::new(1, 100).unwrap(), Member::new(2, 100).unwrap()];
        let table = OwnershipTable::build(2, &members).unwrap();
        let serving = Arc::new(crate::pipeline::stable_snapshot(&table));
        // Stored without a new version: not looked at.
        link.snapshot.store(Arc::clone(&serving));
        watch.tick(&link, 1);
        assert!(watch.unserved.rules.is_empty());
        link.publish(serving);
        watch.tick(&link, 1);
        assert_eq!(watch.unserved.rules, [("dns".to_owned(), vec![3])]);
        link.publish_services(Arc::new(services("dns", "3, 2")));
        watch.tick(&link, 1);
        assert!(watch.unserved.rules.is_empty());
    }

    /// A node that reloaded to a file keeps its backends' ids where a node started on it numbers
    /// them afresh; both name them alike to each other (their places in the file), so they have
    /// the same digest and a table of one marks the same servers on the other. At the reload,
    /// the table in force follows the backends to their new places.
    #[test]
    fn nodes_name_backends_by_their_place_in_the_file() {
        use crate::appliance::health::BackendTable;
        use crate::appliance::BackendState;
        let text = |backends: &str| {
            crate::config::tests::LAB.replace(
                "  mac: 02:00:00:00:00:01\n",
                "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
            ) + &format!(
                "services:\n  - name: web\n    addresses: [198.18.0.100]\n    ports: [80]\n    \
                 delivery: dsr\n    backends:\n{backends}"
            )
        };
        let b = |last: u8| {
            format!("      - {{ ip: 198.18.0.{last}, mac: 02:bb:00:00:00:{last:02} }}\n")
        };
        let config = |t: &str| {
            let c = crate::config::Config::parse(t, "t.yaml").unwrap();
            c.validate("t.yaml").unwrap();
            c
        };
        let first = config(&text(&[b(21), b(22), b(23)].concat()));
        let second = config(&text(&[b(22), b(23), b(24)].concat()));
        assert_ne!(
            services_digest(&first),
            services_digest(&second),
            "another file"
        );
        // Reloaded from `first`: 22 and 23 keep ids 2 and 3, 24 takes the freed 1; started on
        // `second`, they are 1, 2, 3. Both place them 1, 2, 3.
        let before = Services::compile(&first, b"secret", None);
        let reloaded = Services::compile(&second, b"secret", Some(&before));
        let started = Services::compile(&second, b"secret", None);
        let ids = |s: &Services| -> Vec<(u16, u16)> {
            s.backends().map(|(_, b)| (b.id, b.agreed)).collect()
        };
        assert_eq!(ids(&reloaded), [(2, 1), (3, 2), (1, 3)]);
        assert_eq!(ids(&started), [(1, 1), (2, 2), (3, 3)]);
        // The started node's checks see 198.18.0.23 down and its operator drained .24: its
        // report, and a table of it, mark the same servers on the reloaded node.
        let report = started.agreed_report(&crate::appliance::health::Report {
            down: [2].into(),
            drained: [3].into(),
        });
        let table = BackendTable {
            epoch: 7,
            down: report.down,
            drained: report.drained,
        };
        let states = |s: &Services| -> Vec<(String, &'static str)> {
            s.with_table(b"secret", &table)
                .backends()
                .map(|(_, b)| (b.ip.to_string(), b.state.name()))
                .collect()
        };
        assert_eq!(states(&reloaded), states(&started));
        assert_eq!(states(&reloaded)[1], ("198.18.0.23".to_owned(), "down"));
        // At the reload: `first`'s table had .21 down and .23 drained (places 1 and 3); under
        // `second`, .21 is gone, .23 is drained at its new place 2, .24 (new) is up.
        let old_table = BackendTable {
            epoch: 5,
            down: [1].into(),
            drained: [3].into(),
        };
        let renumbered = before.renumbered(&old_table, &reloaded, |_| false);
        // A drain this node holds moves the same way (.23 from place 3 to 2; .21 is gone).
        assert_eq!(before.moved_place(3, &reloaded), Some(2));
        assert_eq!(before.moved_place(1, &reloaded), None);
        assert_eq!(
            (
                renumbered.epoch,
                renumbered.down.len(),
                renumbered.drained.clone()
            ),
            (5, 0, [2].into())
        );
        let after = reloaded.with_table(b"secret", &renumbered);
        let state = |ip: &str| {
            after
                .backends()
                .find(|(_, b)| b.ip.to_string() == ip)
                .map(|(_, b)| b.state)
        };
        assert_eq!(state("198.18.0.22"), Some(BackendState::Up));
        assert_eq!(state("198.18.0.23"), Some(BackendState::Drained));
        assert_eq!(
            state("198.18.0.24"),
            Some(BackendState::Up),
            "a new server on a freed id, of a service that checks nothing"
        );
        let checked = before.renumbered(&old_table, &reloaded, |_| true);
        assert_eq!(
            checked.down,
            [3].into(),
            "checked, the new server (place 3) is down until it answers"
        );
        let none = config(&crate::config::tests::LAB.replace(
            "  mac: 02:00:00:00:00:01\n",
            "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
        ));
        assert_eq!(services_digest(&none), 0, "no backends: no digest");
    }
}
