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

use arc_swap::ArcSwap;
use siphasher::sip::SipHasher13;

use crate::cluster::{Bucket, NodeId, Weight};
use crate::config::{Loaded, Policy as ConfigPolicy};
use crate::control::{self, Event, Load, Membership, Output, Path, Refusal, Snapshot, Timeline};
use crate::dataplane::{wire_payload, ControlLink};

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
            let busy_ns: u64 = link.cores.iter().map(|c| c.busy_ns.load(Relaxed)).sum();
            let flows: u64 = link.cores.iter().map(|c| c.flows.load(Relaxed)).sum();
            last_load = Load {
                active_flows: flows.min(u64::from(u32::MAX)) as u32,
                busy_permille: busy.permille(now, busy_ns, link.cores.len()),
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
