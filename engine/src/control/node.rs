//! The node: [`Membership`] plus the decisions a node takes about itself — what its service's
//! health means for its share, how it leaves on SIGTERM, and what the operator's requests do —
//! as one sans-IO state machine the control thread feeds and the simulator drives in virtual
//! time.
//!
//! The rules it owns:
//! - **Health.** A failing verdict makes the node refuse new connections (only while some
//!   other node takes new flows: a node alone, or a cluster whose services all fail, answers as
//!   best it can) and drains it; a node whose service never answered yet joins drained. A good
//!   verdict undrains what health drained (never an operator's drain).
//! - **SIGTERM.** The first signal drains the node; it stops once drained (it owns nothing and
//!   the last connection of the buckets it handed over has ended), once it is alone, or at
//!   `drain_deadline` (none: never), whichever comes first.
//! - **Operator requests.** `drain [--deadline D|none]`/`undrain` (this node or relayed to
//!   another: a relayed drain has the target's `control.drain_deadline`), `drain-backend` and
//!   `undrain-backend` (held here and relayed to every peer: see [`super::backends`]), `status`,
//!   `owner-of`, and `reload`'s verdict over the keys that changed (only `node.weight` applies
//!   live; anything else refuses the whole reload).
//!
//! It must never do I/O, read a clock or log: the control thread reads files and sockets, calls
//! it with `now` in nanoseconds, and carries out its [`Output`]s; logs come from its events.

use std::ops::Deref;

use super::membership::{DrainRelay, Event, Membership, Output};
use super::message::{Load, Phase};
use super::service_status;
use super::timeline::Timeline;
use crate::appliance::Services;
use crate::cluster::{Affinity, Bucket, BucketHasher, FlowKey, NodeId, Weight};
use crate::config::RuleMode;
use crate::control::operator::{
    DrainDeadline, DrainReply, NodeState, NodeStatus, OwnerReply, Refused, ReloadReply, Reply,
    Request, Status,
};

/// Keys `reload` applies to a running node; any other change needs a restart.
pub const LIVE_KEYS: &[&str] = &["node.weight"];

/// Appliance mode's services and backends change live (`reload`): backends that stay keep
/// their flows.
fn is_live_services_key(key: &str) -> bool {
    key == "services" || key.starts_with("services.") || key == "unmatched"
}

/// What the node needs beyond the membership's own configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a SIGTERM drain may take before the node stops anyway (ns; None: until the
    /// last connection of the buckets it handed over has ended).
    pub drain_deadline: Option<u64>,
    /// The service's port whose refusals the data path holds back while the node refuses
    /// (None: no health check, the node cannot know whether its service is up).
    pub health_port: Option<u16>,
    /// How `owner-of` maps a flow to its bucket.
    pub hasher: BucketHasher,
    pub affinity: Affinity,
}

/// One verdict of the health checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    /// The service answered at least once since the node started.
    pub came_up: bool,
}

/// What the data path must do about the service's refusals after a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceGuard {
    /// Refuse new connections (send them elsewhere: take no new flow).
    pub refuse_new: bool,
    /// Hold back the service's RSTs on this port (0: none) so that clients retry elsewhere.
    pub hold_refusals_on: u16,
}

/// A node's own decisions around its [`Membership`] (see the module doc).
#[derive(Debug)]
pub struct Node {
    m: Membership,
    settings: Settings,
    /// The last health verdict (None: no health check, or none yet).
    verdict: Option<Verdict>,
    drained_by_health: bool,
    /// When SIGTERM arrived (ns).
    terminating_since: Option<u64>,
    stopping: bool,
}

impl Deref for Node {
    type Target = Membership;

    fn deref(&self) -> &Membership {
        &self.m
    }
}

impl Node {
    pub fn new(m: Membership, settings: Settings) -> Node {
        Node {
            m,
            settings,
            verdict: None,
            drained_by_health: false,
            terminating_since: None,
            stopping: false,
        }
    }

    /// The membership, for inputs that bypass the node's own rules (tests and the simulator).
    #[cfg(test)]
    pub(crate) fn membership_mut(&mut self) -> &mut Membership {
        &mut self.m
    }

    // ------------------------------------------------------------ inputs passed through

    /// A control message received on `path` (see [`Membership::handle_message`]).
    pub fn handle_message(
        &mut self,
        path: super::Path,
        bytes: &[u8],
        now: u64,
        out: &mut Vec<Output>,
    ) {
        self.m.handle_message(path, bytes, now, out);
        if self.m.take_operator_drain() {
            // The operator's drain now (relayed through a peer): a service that recovers does
            // not undo it.
            self.drained_by_health = false;
        }
    }

    /// Time passed: the membership's tick, then the SIGTERM drain's end.
    pub fn handle_tick(&mut self, now: u64, out: &mut Vec<Output>) {
        self.m.handle_tick(now, out);
        self.check_stop(now, out);
    }

    /// After SIGTERM: stop once drained, alone, or at the deadline.
    fn check_stop(&mut self, now: u64, out: &mut Vec<Output>) {
        let Some(since) = self.terminating_since else {
            return;
        };
        // Alone: no other node is alive to take over (not "alone in the target table": a
        // drain's plan leaves this node out of it at once, long before it is drained).
        let alone = self.m.live_bits().count_ones() <= 1;
        let late = self
            .settings
            .drain_deadline
            .is_some_and(|d| now.saturating_sub(since) >= d);
        if !self.stopping && (self.m.is_drained() || alone || late) {
            self.stopping = true;
            out.push(Output::Event(Event::Stopping {
                drained: self.m.is_drained(),
            }));
        }
    }

    /// The data path's load (see [`Membership::set_load`]).
    pub fn set_load(&mut self, load: Load) {
        self.m.set_load(load);
    }

    /// The wire brought control frames the data path could not queue, or a backed-up receive
    /// queue (see [`Membership::note_wire_noise`]).
    pub fn note_wire_noise(&mut self, now: u64) {
        self.m.note_wire_noise(now);
    }

    /// This node's backend report (see [`Membership::set_backend_report`]).
    pub fn set_backend_report(&mut self, report: Option<crate::appliance::health::Report>) {
        self.m.set_backend_report(report);
    }

    /// The backend agreement (appliance mode).
    pub fn backends(&self) -> &crate::control::backends::BackendAgreement {
        self.m.backends()
    }

    /// `drain-backend NAME` / `undrain-backend NAME` against `services` (this node's, in
    /// force): NAME is a backend's name (every service's backend of that name) or
    /// `SERVICE/NAME`. This node holds it and relays it to its peers
    /// ([`Membership::drain_backends`]); the coordinator's next backend table applies it. The
    /// reply says where it holds, and whether it counts here yet.
    pub fn drain_backend(
        &mut self,
        name: &str,
        drain: bool,
        services: &crate::appliance::Services,
        out: &mut Vec<Output>,
    ) -> Reply {
        let (service, backend) = match name.split_once('/') {
            Some((s, b)) => (Some(s), b),
            None => (None, name),
        };
        // By place: the name every node with these services gives the backend.
        let matched: Vec<(u16, String)> = services
            .rules()
            .iter()
            .filter(|r| service.is_none_or(|s| s == r.name))
            .flat_map(|r| {
                r.backends
                    .iter()
                    .filter(|b| b.name == backend || b.ip.to_string() == backend)
                    .map(move |b| (b.agreed, format!("{}/{}", r.name, b.name)))
            })
            .collect();
        if matched.is_empty() {
            return Reply::Refused(Refused::new(format!(
                "no backend `{name}`; `status` lists the services and their backends"
            )));
        }
        if matched.len() > crate::control::backends::MAX_IDS {
            // One relayed request names at most that many: refused whole rather than sent
            // in part.
            return Reply::Refused(Refused::new(format!(
                "`{name}` names {} backends, more than {} at once; name them by                  SERVICE/NAME",
                matched.len(),
                crate::control::backends::MAX_IDS
            )));
        }
        let places = matched.iter().map(|&(place, _)| place).collect();
        let DrainRelay::Relayed { peers, differ } = self.m.drain_backends(&places, drain, out);
        Reply::DrainBackend(super::operator::BackendReply {
            backends: matched.into_iter().map(|(_, n)| n).collect(),
            drained: drain,
            relayed_to: Some(ids_of(peers)),
            // Every peer this release understands reads a relayed drain (version 4 and on);
            // an older daemon's reply may still name some.
            older_peers: Vec::new(),
            services_differ: ids_of(differ),
            unsettled: self.m.backends().own().is_none(),
        })
    }

    /// The wire port's link (see [`Membership::set_wire_link`]).
    pub fn set_wire_link(&mut self, up: bool, now: u64, out: &mut Vec<Output>) {
        self.m.set_wire_link(up, now, out);
    }

    /// Whether every packet core loops (see [`Membership::set_cores_running`]).
    pub fn set_cores_running(&mut self, up: bool, now: u64, out: &mut Vec<Output>) {
        self.m.set_cores_running(up, now, out);
    }

    /// Flows left in released buckets (see [`Membership::report_flows`]).
    pub fn report_flows(&mut self, flows: &[(Bucket, u32)], now: u64, out: &mut Vec<Output>) {
        self.m.report_flows(flows, now, out);
    }

    // ------------------------------------------------------------ the node's own rules

    /// The health checker's verdict (see the module doc): returns what the data path must do
    /// with the service's refusals.
    pub fn health(&mut self, verdict: Verdict, now: u64, out: &mut Vec<Output>) -> ServiceGuard {
        self.verdict = Some(verdict);
        let others = self.m.others_serve();
        self.m.set_refusing(!verdict.healthy && others, now, out);
        if !verdict.healthy && !self.drained_by_health && !self.m.draining() {
            out.push(Output::Event(Event::ServiceDown {
                came_up: verdict.came_up,
            }));
            self.m.drain(now, out);
            self.drained_by_health = true;
        } else if verdict.healthy && self.drained_by_health {
            out.push(Output::Event(Event::ServiceUp));
            self.m.undrain(now, out);
            self.drained_by_health = false;
        }
        ServiceGuard {
            refuse_new: self.m.refusing(),
            hold_refusals_on: if others {
                self.settings.health_port.unwrap_or(0)
            } else {
                0
            },
        }
    }

    /// SIGTERM: drain now; [`Node::stopping`] says when to stop.
    pub fn terminate(&mut self, now: u64, out: &mut Vec<Output>) {
        if self.terminating_since.is_none() {
            self.terminating_since = Some(now);
            out.push(Output::Event(Event::Terminating));
            // The drain is the stop's now: a service that recovers does not undo it.
            self.drained_by_health = false;
            self.m.drain(now, out);
            self.check_stop(now, out);
        }
    }

    /// Whether the node should stop its packet cores (after a SIGTERM, see the module doc).
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// The last health verdict's `healthy` (None: no health check, or none yet).
    pub fn healthy(&self) -> Option<bool> {
        self.verdict.map(|v| v.healthy)
    }

    /// An operator's request. `Reload` is answered by [`Node::reload`], which needs the file
    /// read; here it is refused.
    pub fn request(
        &mut self,
        request: &Request,
        timeline: &Timeline,
        now: u64,
        out: &mut Vec<Output>,
    ) -> Reply {
        match request {
            Request::Status => Reply::Status(Box::new(self.status(timeline))),
            Request::Drain {
                node,
                drain,
                deadline,
            } => {
                let me = self.m.config().me;
                let target = node.unwrap_or(me);
                if target == me && *drain {
                    // The operator's drain now: a service that recovers does not undo it.
                    self.drained_by_health = false;
                }
                match deadline {
                    Some(d) if target == me && *drain => {
                        let at = match d {
                            DrainDeadline::After(d) => {
                                Some(now.saturating_add(d.as_nanos() as u64))
                            }
                            DrainDeadline::Wait => None,
                        };
                        self.m.drain_until(at, now, out);
                    }
                    _ => self.m.request(target, *drain, now, out),
                }
                Reply::Drain(DrainReply {
                    node: target.get(),
                    draining: *drain,
                    relayed: target != me,
                })
            }
            Request::OwnerOf { src, dst, proto } => {
                let key =
                    FlowKey::new(self.settings.affinity, src.ip(), src.port(), proto.number());
                let bucket = self.settings.hasher.bucket(&key);
                let snapshot = self.m.snapshot();
                Reply::OwnerOf(OwnerReply {
                    flow: format!("{src} -> {dst} {proto}"),
                    affinity: self.settings.affinity,
                    bucket: u32::from(bucket.0),
                    epoch: snapshot.epoch(),
                    phase: snapshot.phase(),
                    new_flows_owner: snapshot.new_flow_owner(bucket).map(NodeId::get),
                    owner_when_settled: snapshot.final_owner(bucket).map(NodeId::get),
                    role_of_this_node: snapshot.role(bucket, self.m.config().me).to_string(),
                    service: None,
                })
            }
            Request::Reload => Reply::Refused(Refused::new("reload needs the node's file")),
            Request::DrainBackend { .. } => {
                Reply::Refused(Refused::new("drain-backend needs the node's services"))
            }
        }
    }

    /// Adds appliance mode's part to the reply to `request`: the rules and backends of
    /// `services` (the ones in force) to `status`, and to `owner-of` the flow's rule and the
    /// backend a new flow of it goes to.
    pub fn describe_services(&self, request: &Request, reply: &mut Reply, services: &Services) {
        match (request, reply) {
            (Request::Status, Reply::Status(s)) => {
                s.services = service_status::services_status(services);
                if services.has_single() {
                    let serving = self.m.snapshot().serving();
                    service_status::add_takers(&mut s.services, services, serving);
                }
                s.services_epoch = services.epoch;
                s.services_differ = ids_of(self.m.backends().mismatched());
            }
            (Request::OwnerOf { src, dst, proto }, Reply::OwnerOf(o)) => {
                o.service = service_status::owner_of_service(
                    services,
                    &self.settings.hasher,
                    self.settings.affinity,
                    || self.m.snapshot().serving(),
                    *src,
                    *dst,
                    proto.number(),
                );
                // A `single` rule's flows are its first serving node's, whatever their bucket.
                if let Some(service) = o
                    .service
                    .as_ref()
                    .filter(|s| s.mode == Some(RuleMode::Single))
                {
                    o.new_flows_owner = service.rule_owner;
                    o.owner_when_settled = service.rule_owner;
                }
            }
            _ => {}
        }
    }

    /// After a reload that changed the services: the agreed table in force, renumbered for
    /// them (see [`crate::appliance::Services::renumbered`]), and the backend drains this node
    /// holds, moved to their new places (`moved`: None where a drain ends, its backend gone).
    pub fn renumber_backends(
        &mut self,
        table: crate::appliance::health::BackendTable,
        moved: impl Fn(u16) -> Option<u16>,
    ) {
        self.m.renumber_backends(table, moved);
    }

    /// `reload`'s verdict over the keys whose values differ between the running config and the
    /// file (`weight`: the file's `node.weight`; `services_digest`: the digest of the file's
    /// services if they changed): apply them if all are live keys, else refuse and change
    /// nothing.
    pub fn reload(
        &mut self,
        changed: Vec<String>,
        weight: Option<Weight>,
        services_digest: Option<u64>,
        now: u64,
        out: &mut Vec<Output>,
    ) -> Reply {
        let fixed: Vec<&str> = changed
            .iter()
            .map(String::as_str)
            .filter(|k| !LIVE_KEYS.contains(k) && !is_live_services_key(k))
            .collect();
        if !fixed.is_empty() {
            let error = format!(
                "these keys cannot change while the node runs: {}; nothing was applied (restart \
                 the node, draining it first, to change them)",
                fixed.join(", ")
            );
            return Reply::Refused(Refused {
                error,
                changed: Some(changed),
            });
        }
        if let Some(w) = weight {
            self.m.set_weight(w, now, out);
        }
        if let Some(d) = services_digest {
            self.m.set_services_digest(d);
        }
        Reply::Reload(ReloadReply {
            applied: changed.clone(),
            changed,
        })
    }

    /// The node's view of the cluster (see [`Status`]).
    pub fn status(&self, timeline: &Timeline) -> Status {
        let m = &self.m;
        let snapshot = m.snapshot();
        let me = m.config().me;
        let in_table: u64 = m
            .live_members()
            .iter()
            .fold(0, |bits, mem| bits | 1u64 << mem.id.index());
        let members = m
            .live_members()
            .iter()
            .map(|mem| {
                let mut s = self.node_status(mem.id, false);
                s.weight = Some(mem.weight.get());
                s.final_buckets = Bucket::all()
                    .filter(|&b| snapshot.final_owner(b) == Some(mem.id))
                    .count() as u32;
                s
            })
            .collect();
        let outside = (1..=64u8)
            .filter_map(NodeId::new)
            .filter(|id| m.live_bits() & !in_table & (1u64 << id.index()) != 0)
            .map(|id| self.node_status(id, true))
            .collect();
        Status {
            node: me.get(),
            epoch: m.epoch(),
            phase: snapshot.phase(),
            moving: snapshot.moving_count(),
            draining: m.draining(),
            drained: m.is_drained(),
            drain_cut: m.cut(),
            owed_buckets: m.owed_buckets(),
            refusing: m.refusing(),
            fenced: m.fenced(),
            fence_reasons: m
                .fence_reasons()
                .iter()
                .map(|r| r.label().to_owned())
                .collect(),
            protocol_version: m.speaks(),
            healthy: self.healthy(),
            members,
            outside,
            timeline: timeline.steps().cloned().collect(),
            services: Vec::new(),
            services_epoch: 0,
            services_differ: Vec::new(),
        }
    }

    /// One node as this one knows it: itself first hand, a peer from its last heartbeat.
    /// `outside`: not in the table's members (its weight is what it announced).
    fn node_status(&self, id: NodeId, outside: bool) -> NodeStatus {
        let m = &self.m;
        let snapshot = m.snapshot();
        let hb = m.peer(id).and_then(|p| p.heartbeat);
        let (refusing, draining, fenced, load, weight) = if id == m.config().me {
            (m.refusing(), m.draining(), m.fenced(), Some(m.load()), None)
        } else {
            hb.map_or((false, false, false, None, None), |h| {
                (
                    h.refusing,
                    h.draining,
                    h.fenced,
                    Some(h.load),
                    Some(h.weight.get()),
                )
            })
        };
        let (held_buckets, held_flows) = if id == m.config().me {
            (Some(m.held_buckets()), Some(m.released_flows()))
        } else {
            let left = hb.map(|h| h.releasing_left);
            (left.filter(|&n| n != crate::control::LEFT_UNKNOWN), None)
        };
        // A fence first, then a failing service, then a drain. Out of the plan's target table,
        // a node still serves the connections it had until the plan is done and the last of
        // them has ended (or its drain's deadline cut them): draining until then, drained after.
        let holds_nothing = if id == m.config().me {
            m.is_drained()
        } else {
            held_buckets == Some(0)
        };
        let state = match (refusing, draining) {
            _ if fenced => NodeState::Fenced,
            (true, _) => NodeState::Failing,
            (false, true) if outside && snapshot.phase() == Phase::Done && holds_nothing => {
                NodeState::Drained
            }
            (false, true) => NodeState::Draining,
            (false, false) if outside => NodeState::Joining,
            (false, false) => NodeState::Up,
        };
        NodeStatus {
            node: id.get(),
            state,
            weight: if outside { weight } else { None },
            accepting_buckets: snapshot.accepting_count(id),
            final_buckets: 0,
            active_flows: load.map(|l| l.active_flows),
            busy_permille: load.map(|l| l.busy_permille),
            held_buckets,
            held_flows,
        }
    }
}

/// The node ids of a bit set (bit `id - 1`).
pub(crate) fn ids_of(bits: u64) -> Vec<u8> {
    (1..=64u8).filter(|id| bits >> (id - 1) & 1 == 1).collect()
}

/// Node ids as a person reads them: `2, 3`.
pub fn ids_text(ids: &[u8]) -> String {
    ids.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Config;

    fn node() -> Node {
        let me = NodeId::new(1).unwrap();
        let m = Membership::new(Config::new(me, 1, [2, 0, 0, 0, 0, 1], b"secret", 7));
        Node::new(
            m,
            Settings {
                drain_deadline: Some(1_000_000_000),
                health_port: None,
                hasher: BucketHasher::new(b"secret"),
                affinity: Affinity::None,
            },
        )
    }

    #[test]
    fn reload_applies_live_keys_and_refuses_the_rest_whole() {
        let mut n = node();
        let mut out = Vec::new();
        let w = Weight::new(300);
        let reply = n.reload(vec!["node.weight".to_owned()], w, None, 0, &mut out);
        assert_eq!(
            reply,
            Reply::Reload(ReloadReply {
                changed: vec!["node.weight".to_owned()],
                applied: vec!["node.weight".to_owned()],
            })
        );
        assert_eq!(n.config().me.get(), 1);
        let keys = vec!["node.weight".to_owned(), "control.interval".to_owned()];
        let Reply::Refused(r) = n.reload(keys.clone(), Weight::new(5), Some(9), 0, &mut out) else {
            panic!("a fixed key was applied");
        };
        assert_eq!(
            n.backends().digest(),
            0,
            "a refused reload changes no digest"
        );
        assert!(r.error.contains("control.interval") && !r.error.contains("node.weight,"));
        assert_eq!(r.changed, Some(keys));
        assert_eq!(
            n.reload(Vec::new(), None, None, 0, &mut out),
            Reply::Reload(ReloadReply {
                changed: Vec::new(),
                applied: Vec::new()
            })
        );
        // Changed services: the backend agreement takes their digest.
        let keys = vec!["services.0.backends".to_owned()];
        assert!(matches!(
            n.reload(keys, None, Some(7), 0, &mut out),
            Reply::Reload(_)
        ));
        assert_eq!(n.backends().digest(), 7);
    }

    #[test]
    fn owner_of_names_the_bucket_and_this_nodes_role_in_words() {
        let mut n = node();
        let mut out = Vec::new();
        n.handle_tick(0, &mut out);
        let request = Request::parse("owner-of 198.18.0.100:40000 198.18.0.1:80").unwrap();
        let Reply::OwnerOf(o) = n.request(&request, &Timeline::default(), 0, &mut out) else {
            panic!("no owner-of reply");
        };
        assert_eq!(o.flow, "198.18.0.100:40000 -> 198.18.0.1:80 tcp");
        assert!(
            !o.role_of_this_node.contains('{'),
            "{}",
            o.role_of_this_node
        );
    }

    /// A `single` rule's flows go to its first serving node, not to their bucket's owner:
    /// `owner-of` says so (here node 2, first in the list, is not serving: nobody takes them).
    #[test]
    fn owner_of_names_a_single_rules_node() {
        let mut n = node();
        let mut out = Vec::new();
        n.handle_tick(0, &mut out);
        let text = crate::config::tests::LAB.to_owned()
            + "services:\n  - name: web\n    addresses: [198.18.0.100]\n    ports: [80]\n    \
               delivery: local\n  - name: dns\n    addresses: [198.18.0.100]\n    \
               protocol: udp\n    ports: [53]\n    mode: single\n    priority: [2]\n    \
               delivery: local\n";
        let c = crate::config::Config::parse(&text, "t.yaml").unwrap();
        c.validate("t.yaml").unwrap();
        let services = Services::compile(&c, b"secret", None);
        let ask = |n: &mut Node, line: &str| {
            let request = Request::parse(line).unwrap();
            let mut out = Vec::new();
            let mut reply = n.request(&request, &Timeline::default(), 0, &mut out);
            n.describe_services(&request, &mut reply, &services);
            let Reply::OwnerOf(o) = reply else {
                panic!("no owner-of reply");
            };
            o
        };
        // Alone, the node comes to own every bucket.
        let mut t = 0;
        while n.m.snapshot().new_flow_owner(Bucket(0)).is_none() && t < 100_000_000_000 {
            t += 100_000_000;
            n.handle_tick(t, &mut out);
        }
        let web = ask(&mut n, "owner-of 198.18.0.7:40000 198.18.0.100:80");
        assert_eq!(web.new_flows_owner, Some(1), "its bucket's owner");
        let dns = ask(&mut n, "owner-of 198.18.0.7:40000 198.18.0.100:53 udp");
        assert_eq!(dns.service.as_ref().and_then(|s| s.rule_owner), None);
        assert_eq!(
            (dns.new_flows_owner, dns.owner_when_settled),
            (None, None),
            "not the bucket's owner: nobody serves the rule"
        );
    }

    /// A node drained because its service failed, then stopped (SIGTERM) or drained by its
    /// operator: the service coming back does not undrain it.
    #[test]
    fn a_recovered_service_does_not_undo_a_stop_or_an_operators_drain() {
        let down = Verdict {
            healthy: false,
            came_up: true,
        };
        let up = Verdict {
            healthy: true,
            came_up: true,
        };
        for how in ["terminate", "operator"] {
            let mut n = node();
            let mut out = Vec::new();
            n.handle_tick(0, &mut out);
            n.health(down, 1, &mut out);
            assert!(n.m.draining(), "{how}: drained by its health");
            match how {
                "terminate" => n.terminate(2, &mut out),
                _ => {
                    let drain = Request::Drain {
                        node: None,
                        drain: true,
                        deadline: None,
                    };
                    let _ = n.request(&drain, &Timeline::default(), 2, &mut out);
                }
            }
            n.health(up, 3, &mut out);
            assert!(n.m.draining(), "{how}: still draining");
        }
    }

    #[test]
    fn status_names_this_node_and_its_state() {
        let mut n = node();
        let mut out = Vec::new();
        n.handle_tick(0, &mut out);
        let s = n.status(&Timeline::default());
        assert_eq!(s.node, 1);
        assert_eq!(s.healthy, None);
        let me = s.node(1).expect("this node is alive");
        assert!(
            matches!(me.state, NodeState::Up | NodeState::Joining),
            "{me:?}"
        );
        let _ = n.request(
            &Request::Drain {
                node: None,
                drain: true,
                deadline: None,
            },
            &Timeline::default(),
            0,
            &mut out,
        );
        assert!(n.status(&Timeline::default()).draining);
    }
}
