//! What `status`, `owner-of` and `check` say about appliance mode's services (DESIGN.md, "Two
//! delivery modes"): the port rules in force with their backends' state and share of new flows,
//! and for one flow its rule and the backend a new flow of it goes to.
//!
//! It owns these reply types, their building from the compiled [`Services`] and their text for
//! people. The backend a flow gets is the one [`Services::choose_new`] picks, the same call the
//! pipeline makes, so that `owner-of` cannot name another backend than the data path uses. It
//! must never change the services, do I/O or read a clock.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::appliance::maglev::TABLE_SIZE;
use crate::appliance::{Match, Services};
use crate::cluster::{backend_pick, Affinity, BucketHasher, FlowKey, NodeId};
use crate::config::{Delivery, PortRange, RuleMode, Unmatched};
use crate::wire::EthernetAddress;

/// One port rule of appliance mode, as `status` and `check` list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub ports: Vec<PortRange>,
    pub mode: RuleMode,
    pub affinity: Affinity,
    pub delivery: Delivery,
    /// Entries of its backend table: a backend's share of new flows is its `table_entries`
    /// over these.
    pub table_size: u32,
    pub backends: Vec<BackendStatus>,
    /// A `single` rule's priority list (empty: by node id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority: Vec<u8>,
    /// A `single` rule on a running node: who takes it now (`check` knows no cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<Taker>,
}

/// Who takes a `single` rule's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Taker {
    /// That node (by id): the first of the rule's priority list that owns buckets (without a
    /// list, the serving node of the lowest id).
    Node(u8),
    /// No node of its priority list (or none at all, without a list) owns buckets: the rule's
    /// frames are dropped.
    Nobody,
}

impl Taker {
    /// Who takes `rule` (a `single` one) while the nodes `serving` (bit `id - 1`) own buckets.
    pub fn of(rule: &crate::appliance::Rule, serving: u64) -> Taker {
        rule.single_owner(serving)
            .map_or(Taker::Nobody, |n| Taker::Node(n.get()))
    }
}

/// The `single` rules of `services` that no node takes while the nodes `serving` (bit `id -
/// 1`, some) own buckets: a priority list that names no node that serves (a typo, or nodes
/// that left), whose frames every node drops. Empty while no node serves at all (a node alone
/// and not serving yet: nothing is taken, for every rule alike).
pub fn unserved_single_rules(services: &Services, serving: u64) -> Vec<&crate::appliance::Rule> {
    if serving == 0 {
        return Vec::new();
    }
    services
        .rules()
        .iter()
        .filter(|r| r.mode == RuleMode::Single && Taker::of(r, serving) == Taker::Nobody)
        .collect()
}

/// What [`UnservedRules::changes`] finds for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SingleRuleChange {
    /// Rule `name` with priority list `priority` is taken by no node while `serving` serve.
    Unserved {
        name: String,
        priority: Vec<u8>,
        serving: Vec<u8>,
    },
    /// Rule `name`, unserved before, is taken by node `node` now.
    Taken { name: String, node: u8 },
}

/// The `single` rules no node takes, as last logged: each with its priority list (another
/// unserved list is news again).
#[derive(Debug, Clone, Default)]
pub struct UnservedRules {
    pub(crate) rules: Vec<(String, Vec<u8>)>,
}

impl UnservedRules {
    /// What changed since the last call, the nodes `serving` (bit `id - 1`) owning buckets
    /// under `services`. While no node serves at all, nothing: every rule is untaken then,
    /// not for its list, and what was logged stands.
    pub fn changes(&mut self, services: &Services, serving: u64) -> Vec<SingleRuleChange> {
        if serving == 0 {
            return Vec::new();
        }
        let now: Vec<(String, Vec<u8>)> = unserved_single_rules(services, serving)
            .into_iter()
            .map(|r| (r.name.clone(), r.priority.iter().map(|n| n.get()).collect()))
            .collect();
        let mut out = Vec::new();
        for (name, priority) in now.iter().filter(|u| !self.rules.contains(u)) {
            out.push(SingleRuleChange::Unserved {
                name: name.clone(),
                priority: priority.clone(),
                serving: super::node::ids_of(serving),
            });
        }
        // Rules unserved before that a node takes now; not one a reload removed, renamed or
        // made another mode.
        for (name, _) in self.rules.iter().filter(|u| !now.contains(u)) {
            let rule = services
                .rules()
                .iter()
                .find(|r| &r.name == name && r.mode == RuleMode::Single);
            if let Some(Taker::Node(node)) = rule.map(|r| Taker::of(r, serving)) {
                out.push(SingleRuleChange::Taken {
                    name: name.clone(),
                    node,
                });
            }
        }
        self.rules = now;
        out
    }
}

/// Fills in who takes each `single` rule of `status` (the rules of `services`, in order)
/// while the nodes `serving` own buckets.
pub fn add_takers(status: &mut [ServiceStatus], services: &Services, serving: u64) {
    for (s, r) in status.iter_mut().zip(services.rules()) {
        if r.mode == RuleMode::Single {
            s.taken_by = Some(Taker::of(r, serving));
        }
    }
}

/// One backend of a [`ServiceStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Stable while the backend stays in its service (the flow table remembers it per flow).
    pub id: u16,
    pub name: String,
    pub address: IpAddr,
    /// The router its frames go through (encapsulation to another network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// Its MAC (DSR) or its next hop's (encapsulation); None: not resolved yet.
    pub mac: Option<EthernetAddress>,
    pub weight: u32,
    /// `up` (takes new flows), `down` (failed its health checks) or `drained` (keeps its flows,
    /// takes no new ones).
    pub state: String,
    /// Entries of the rule's table that are this backend's.
    pub table_entries: u32,
    /// Flows in the node's flow tables whose backend this is (`status` of a running node;
    /// None elsewhere, as in `check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
}

impl BackendStatus {
    /// Its share of the rule's new flows, in percent.
    pub fn share_percent(&self, table_size: u32) -> f64 {
        f64::from(self.table_entries) * 100.0 / f64::from(table_size.max(1))
    }
}

/// What `owner-of` adds for a flow to a service address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerService {
    /// The port rule the flow falls under (None: a service address, but no rule has this
    /// protocol and port).
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RuleMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// A `single` rule: the node that takes every flow of the rule (None: no node can serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_owner: Option<u8>,
    /// The backend a new flow goes to (a flow already running keeps the one it has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<OwnerBackend>,
    /// What becomes of a new flow's frames, in words.
    pub outcome: String,
}

/// The backend of [`OwnerService`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerBackend {
    pub id: u16,
    pub name: String,
    pub address: IpAddr,
}

/// Every rule of `services` with its backends, in configuration order.
pub fn services_status(services: &Services) -> Vec<ServiceStatus> {
    services
        .rules()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let shares = services.shares(i);
            ServiceStatus {
                name: r.name.clone(),
                addresses: r.addresses.clone(),
                protocol: protocol_name(r.proto),
                ports: r.ports.clone(),
                mode: r.mode,
                affinity: r.affinity,
                delivery: r.delivery,
                table_size: TABLE_SIZE as u32,
                backends: r
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(j, b)| BackendStatus {
                        id: b.id,
                        name: b.name.clone(),
                        address: b.ip,
                        via: b.via,
                        mac: b.mac,
                        weight: b.weight,
                        state: b.state.name().to_owned(),
                        table_entries: shares.get(j).map_or(0, |&n| n as u32),
                        flows: None,
                    })
                    .collect(),
                priority: r.priority.iter().map(|n| n.get()).collect(),
                taken_by: None,
            }
        })
        .collect()
}

fn protocol_name(proto: u8) -> String {
    match proto {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        n => format!("protocol {n}"),
    }
}

/// The flow `src -> dst` (IP protocol `proto`) as appliance mode sees it: None if `dst` is no
/// service address. `hasher` and `affinity` are the cluster's (the bucket hash's), as the
/// pipeline computes the flow's fingerprint; `serving` says which nodes serve (bit `id - 1`),
/// asked only for a `single` rule ([`crate::control::Snapshot::serving`] walks every bucket).
pub fn owner_of_service(
    services: &Services,
    hasher: &BucketHasher,
    affinity: Affinity,
    serving: impl FnOnce() -> u64,
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
) -> Option<OwnerService> {
    let mut answer = OwnerService {
        rule: None,
        mode: None,
        delivery: None,
        rule_owner: None,
        backend: None,
        outcome: String::new(),
    };
    let r = match services.lookup(dst.ip(), proto, dst.port()) {
        Match::Cluster => return None,
        Match::NoRule => {
            answer.outcome = match services.unmatched() {
                Unmatched::Drop => "dropped: no rule has this protocol and port (unmatched: drop)",
                Unmatched::Local => {
                    "delivered to the owner's own kernel: no rule has this protocol and port \
                     (unmatched: local)"
                }
            }
            .to_owned();
            return Some(answer);
        }
        Match::Rule(r) => r,
    };
    let rule = &services.rules()[r];
    answer.rule = Some(rule.name.clone());
    answer.mode = Some(rule.mode);
    answer.delivery = Some(rule.delivery);
    match rule.mode {
        RuleMode::Disabled => {
            answer.outcome = "dropped: the rule is disabled".to_owned();
            return Some(answer);
        }
        RuleMode::Single => {
            answer.rule_owner = rule.single_owner(serving()).map(NodeId::get);
            if answer.rule_owner.is_none() {
                answer.outcome = "dropped: no node can take this single rule".to_owned();
                return Some(answer);
            }
        }
        RuleMode::Multiple => {}
    }
    if rule.delivery == Delivery::Local {
        answer.outcome = "delivered to the owner's own kernel (delivery: local)".to_owned();
        return Some(answer);
    }
    // The pick the pipeline computes for the flow (`flow_backend`), then its choice.
    let key = FlowKey::new(affinity, src.ip(), src.port(), proto);
    let pick = backend_pick(hasher.hash(&key), dst.ip(), src.port(), dst.port(), proto);
    let Some(b) = services.choose_new(r, hasher, pick, src.ip(), src.port(), proto) else {
        answer.outcome =
            "dropped: no backend takes new flows (all down, drained or of weight 0)".to_owned();
        return Some(answer);
    };
    answer.outcome = match b.mac {
        Some(_) => format!(
            "forwarded to backend {} ({}) by {}",
            b.name,
            b.ip,
            rule.delivery.name()
        ),
        None => format!(
            "dropped until backend {}'s MAC (or its next hop's) is resolved",
            b.name
        ),
    };
    answer.backend = Some(OwnerBackend {
        id: b.id,
        name: b.name.clone(),
        address: b.ip,
    });
    Some(answer)
}

/// Sets each backend's current flows in `services` from `flows` (by backend id): what the
/// running node's flow tables hold.
pub fn add_flows(services: &mut [ServiceStatus], flows: impl Fn(u16) -> u64) {
    for b in services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        b.flows = Some(flows(b.id));
    }
}

/// The services as a table for people (`status`, `check`); empty without services.
pub fn services_table(services: &[ServiceStatus]) -> String {
    let mut out = String::new();
    for s in services {
        let list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
        let priority = match s.priority.as_slice() {
            [] => String::new(),
            p => format!(" (priority {})", list(&mut p.iter().map(u8::to_string))),
        };
        let taken = match s.taken_by {
            None => String::new(),
            Some(Taker::Node(n)) => format!(", taken by node {n}"),
            Some(Taker::Nobody) if s.priority.is_empty() => {
                ", taken by NOBODY: no node serves, its frames are dropped".to_owned()
            }
            Some(Taker::Nobody) => ", taken by NOBODY: no node of its priority list serves \
                                    now, its frames are dropped"
                .to_owned(),
        };
        let _ = writeln!(
            out,
            "service {}: {} {} port {} | {}{priority}{taken}, delivery {}, affinity {}",
            s.name,
            list(&mut s.addresses.iter().map(IpAddr::to_string)),
            s.protocol,
            list(&mut s.ports.iter().map(|p| PortText(*p).to_string())),
            s.mode.name(),
            s.delivery.name(),
            s.affinity.name(),
        );
        if s.backends.is_empty() {
            continue;
        }
        let name_w = s.backends.iter().map(|b| b.name.len()).fold(7, usize::max);
        let addr_w = s
            .backends
            .iter()
            .map(|b| address_text(b).len())
            .fold(7, usize::max);
        // Flows only where the node counted them (`status`, not `check`).
        let counted = s.backends.iter().any(|b| b.flows.is_some());
        let mut header = format!(
            "  {:<name_w$} {:<addr_w$} {:<17} {:>6}  {:<8} {:>6}",
            "backend", "address", "mac", "weight", "state", "share"
        );
        if counted {
            let _ = write!(header, " {:>9}", "flows");
        }
        let _ = writeln!(out, "{header}");
        for b in &s.backends {
            let _ = write!(
                out,
                "  {:<name_w$} {:<addr_w$} {:<17} {:>6}  {:<8} {:>5.1}%",
                b.name,
                address_text(b),
                b.mac.map_or("unresolved".to_owned(), |m| m.to_string()),
                b.weight,
                b.state,
                b.share_percent(s.table_size),
            );
            if counted {
                let _ = write!(out, " {:>9}", b.flows.unwrap_or(0));
            }
            let _ = writeln!(out);
        }
    }
    out
}

/// A backend's address as the table shows it: `198.19.7.33 via 198.18.0.254` behind a router.
fn address_text(b: &BackendStatus) -> String {
    match b.via {
        Some(via) => format!("{} via {via}", b.address),
        None => b.address.to_string(),
    }
}

/// A port or a range as an operator writes it: `80`, `8000-8099`.
struct PortText(PortRange);

impl fmt::Display for PortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            PortRange { first, last } if first == last => write!(f, "{first}"),
            PortRange { first, last } => write!(f, "{first}-{last}"),
        }
    }
}

impl fmt::Display for OwnerService {
    /// The lines `owner-of` adds for a service flow.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.rule, self.mode, self.delivery) {
            (Some(rule), Some(mode), Some(delivery)) => writeln!(
                f,
                "rule                {rule} ({}, delivery {})",
                mode.name(),
                delivery.name()
            )?,
            _ => writeln!(f, "rule                none")?,
        }
        if let Some(n) = self.rule_owner {
            writeln!(f, "rule taken by       node {n} (single rule: by priority)")?;
        }
        if let Some(b) = &self.backend {
            writeln!(
                f,
                "backend (new flow)  {} {} (id {})",
                b.name, b.address, b.id
            )?;
        }
        writeln!(f, "outcome             {}", self.outcome)
    }
}

#[cfg(test)]
mod tests;
