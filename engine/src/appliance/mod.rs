//! Appliance mode (DESIGN.md, "Two delivery modes"): the services a cluster answers for, their
//! port rules, and the backend a new flow of a service goes to.
//!
//! [`Services`] is the compiled, immutable form of the configuration's `services` section plus
//! what the control plane learned about the backends (MACs, health): packet cores hold it as an
//! `Arc` and swap it between bursts, as they do the ownership snapshot. It answers three
//! questions per frame: which rule a destination matches ([`Services::lookup`]), which backend
//! a new flow of a rule goes to ([`Services::choose`], a Maglev table per rule: [`maglev`]),
//! and where a backend id the flow table remembers points ([`Services::backend`]).
//! [`encap`] rewrites or encapsulates a frame for its backend; [`fragment`] cuts an IPv4
//! datagram without DF that its tunnel cannot carry whole.
//!
//! Backend ids are small integers (1..=[`crate::config::MAX_BACKENDS`]) that the flow table
//! keeps per flow; a backend keeps its id across reloads ([`Services::compile`] with the
//! previous services), so a flow keeps its backend whatever happens to the pool. Ids are this
//! node's own: what nodes tell each other about backends (the agreed table, reports) names
//! them by their place in the configuration file instead ([`Backend::agreed`]), the same on
//! every node that runs the file, whether it started on it or reloaded to it.
//!
//! Nothing here reads a clock, does I/O or allocates per frame.

use std::net::IpAddr;
use std::sync::Arc;

use crate::cluster::{derive_key, Affinity, BucketHasher, FlowKey, NodeId};
use crate::config::{Config, Delivery, PortRange, RuleMode, Unmatched};
use crate::wire::EthernetAddress;

pub mod encap;
pub mod fragment;
pub mod health;
pub mod maglev;
pub mod neighbours;
pub mod route;

use maglev::{Candidate, Maglev};

/// The HMAC label of the key every node builds backend tables with.
pub const BACKEND_KEY_LABEL: &[u8] = b"clonecluster backend table v1";

/// What a backend is for new flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Takes new flows by its weight.
    Up,
    /// Failed its health checks (as the cluster agreed): no new flows.
    Down,
    /// Drained by the operator: its flows continue, no new ones.
    Drained,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Drained => "drained",
        }
    }
}

/// One backend of a rule.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Stable while the backend stays in its service (see the module doc).
    pub id: u16,
    /// Its number among the nodes: its place in the configuration file (1 for the first
    /// backend of the first service, and on through the services in order), as the agreed
    /// table and the nodes' reports name it (see the module doc).
    pub agreed: u16,
    pub name: String,
    pub ip: IpAddr,
    /// Where its frames go on the wire: configured, or learned by ARP/NDP (`None`: not yet).
    pub mac: Option<EthernetAddress>,
    /// The MAC is the configuration's (else [`neighbours`] learns it).
    pub configured_mac: bool,
    /// The router on the segment its frames go through (encapsulation to another network):
    /// `mac` is this router's, learned by ARP/NDP.
    pub via: Option<IpAddr>,
    pub weight: u32,
    pub state: BackendState,
}

/// One port rule, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// IP protocol number.
    pub proto: u8,
    pub ports: Vec<PortRange>,
    pub mode: RuleMode,
    /// `single` rules: the nodes in order of preference.
    pub priority: Vec<NodeId>,
    pub affinity: Affinity,
    pub delivery: Delivery,
    pub gue_port: u16,
    pub mtu: u16,
    pub backends: Vec<Backend>,
    table: Maglev,
}

impl Rule {
    /// Whether a frame to `dst` with IP protocol `proto` and port `port` is this rule's.
    #[inline]
    fn matches(&self, dst: IpAddr, proto: u8, port: u16) -> bool {
        self.proto == proto
            && self.addresses.contains(&dst)
            && self.ports.iter().any(|p| p.contains(port))
    }

    /// The hash that picks a new flow's backend in this rule's table: with affinity `none` the
    /// flow's pick `pick` ([`crate::cluster::backend_pick`]: a keyed hash of the 5-tuple, the
    /// same on every node), else the
    /// keyed hash of the client's flow key under the rule's affinity, so that every connection
    /// of a client (or of its network) goes to the same backend. The pipeline and `owner-of`
    /// both pick through [`Services::choose_new`], so they cannot disagree.
    #[inline]
    pub fn affinity_hash(
        &self,
        hasher: &BucketHasher,
        pick: u64,
        src: IpAddr,
        src_port: u16,
        proto: u8,
    ) -> u64 {
        match self.affinity {
            Affinity::None => pick,
            a => hasher.hash(&FlowKey::new(a, src, src_port, proto)),
        }
    }

    /// The node that takes a `single` rule: the first of its priority list that `serving`
    /// (bit `id - 1`) says can serve.
    pub fn single_owner(&self, serving: u64) -> Option<NodeId> {
        let up = |n: &NodeId| serving & (1u64 << (n.get() - 1)) != 0;
        if self.priority.is_empty() {
            (1..=64u8).filter_map(NodeId::new).find(|n| up(n))
        } else {
            self.priority.iter().copied().find(up)
        }
    }
}

/// What a destination matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Not a service address: the cluster's own traffic (server mode).
    Cluster,
    /// Rule `n` of [`Services::rules`].
    Rule(usize),
    /// A service address, but no rule has this protocol and port.
    NoRule,
}

/// Every rule of the node, compiled (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Services {
    rules: Vec<Rule>,
    /// Every service address, once.
    addresses: Vec<IpAddr>,
    unmatched: Unmatched,
    /// Any rule at all: without, every frame takes server mode's path untouched.
    active: bool,
    /// Any `single` rule: ownership is not by bucket alone.
    has_single: bool,
    /// Backend id -> (rule, backend index), for ids up to the largest.
    by_id: Vec<Option<(u16, u16)>>,
    /// Per service address and IP protocol, which rule every destination port falls under
    /// ([`Dest`], its spans in `spans`), for [`Services::lookup_raw`]; empty when there are
    /// more than [`RAW_ADDRESSES`] addresses (then it takes [`Services::lookup`]'s way).
    dests: Vec<Dest>,
    spans: Vec<Span>,
    /// The agreed backend table's epoch this was built from (0: the configuration's).
    pub epoch: u64,
}

/// Service addresses up to which [`Services::lookup_raw`] has its own table.
const RAW_ADDRESSES: usize = 64;

/// One service address and IP protocol in [`Services::lookup_raw`]'s table: the address as a
/// number (IPv4's 32 bits in the low bits, or IPv6's 128) and its port spans.
#[derive(Debug, Clone)]
struct Dest {
    addr: u128,
    v6: bool,
    proto: u8,
    /// Its spans' indexes in `Services::spans`.
    spans: std::ops::Range<u32>,
}

/// Destination ports `first..=last` fall under rule `rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    first: u16,
    last: u16,
    rule: u32,
}

/// The disjoint port spans of frames to `addr` with IP protocol `proto`, in port order, each
/// with the first of `rules` that takes its ports (as [`Services::lookup`] finds it); ports
/// no rule takes are in none.
fn spans(rules: &[Rule], addr: IpAddr, proto: u8) -> Vec<Span> {
    // Every port where a rule's range starts or ends: between two of them, the same rules
    // match every port.
    let mut edges: Vec<u32> = vec![0, 65536];
    for r in rules
        .iter()
        .filter(|r| r.proto == proto && r.addresses.contains(&addr))
    {
        for p in &r.ports {
            edges.push(u32::from(p.first));
            edges.push(u32::from(p.last) + 1);
        }
    }
    edges.sort_unstable();
    edges.dedup();
    let mut out: Vec<Span> = Vec::new();
    for w in edges.windows(2) {
        // Both edges are at most 65536, the first below it: the ports fit in u16.
        let (first, last) = (w[0] as u16, (w[1] - 1) as u16);
        let Some(i) = rules.iter().position(|r| r.matches(addr, proto, first)) else {
            continue;
        };
        // Services (rules) are far fewer than 2^32: the index fits in u32.
        let rule = i as u32;
        match out.last_mut() {
            Some(s) if s.rule == rule && u32::from(s.last) + 1 == u32::from(first) => s.last = last,
            _ => out.push(Span { first, last, rule }),
        }
    }
    out
}

impl Services {
    /// No service: server mode.
    pub fn none() -> Arc<Services> {
        Arc::new(Services::default())
    }

    /// The rules of `config`, with backend tables keyed by `secret`. Backends that were in
    /// `previous` (same rule name and address) keep their id, MAC and state; a new one is up
    /// (the agreed table, applied over it, says otherwise).
    pub fn compile(config: &Config, secret: &[u8], previous: Option<&Services>) -> Services {
        let key = derive_key(secret, BACKEND_KEY_LABEL);
        let mut used: Vec<bool> = vec![false; crate::config::MAX_BACKENDS + 1];
        used[0] = true;
        let old = |rule: &str, ip: IpAddr| {
            previous.and_then(|p| {
                p.rules
                    .iter()
                    .find(|r| r.name == rule)
                    .and_then(|r| r.backends.iter().find(|b| b.ip == ip))
            })
        };
        // Ids of backends that stay are taken first, so new ones never collide with them.
        for s in &config.services {
            for b in &s.backends {
                if let Some(o) = old(&s.name, b.ip) {
                    used[usize::from(o.id)] = true;
                }
            }
        }
        let mut next_free = 1usize;
        let mut rules = Vec::new();
        let mut place = 0u16;
        for s in &config.services {
            let backends: Vec<Backend> = s
                .backends
                .iter()
                .map(|b| {
                    // At most MAX_BACKENDS (4095) backends: validated, fits in u16.
                    place += 1;
                    let o = old(&s.name, b.ip);
                    let id = match o {
                        Some(o) => o.id,
                        None => {
                            while used[next_free] {
                                next_free += 1;
                            }
                            used[next_free] = true;
                            // At most MAX_BACKENDS (4095) ids: validated, fits in u16.
                            next_free as u16
                        }
                    };
                    Backend {
                        id,
                        agreed: place,
                        name: b.label(),
                        ip: b.ip,
                        // A learned MAC stays with the address it was learned for.
                        mac: b.mac.or(o.filter(|o| o.via == b.via).and_then(|o| o.mac)),
                        configured_mac: b.mac.is_some(),
                        via: b.via,
                        weight: b.weight,
                        state: o.map_or(BackendState::Up, |o| o.state),
                    }
                })
                .collect();
            rules.push(Rule {
                name: s.name.clone(),
                addresses: s.addresses.clone(),
                proto: s.protocol.number(),
                ports: s.ports.clone(),
                mode: s.mode,
                priority: s.priority.clone(),
                affinity: s.affinity,
                delivery: s.delivery,
                gue_port: s.gue_port,
                mtu: s.mtu,
                table: Maglev::build(&candidates(&backends), &key),
                backends,
            });
        }
        let mut services = Services {
            rules,
            unmatched: config.unmatched,
            epoch: previous.map_or(0, |p| p.epoch),
            ..Services::default()
        };
        services.index();
        services
    }

    /// The derived lookups: addresses, flags, ids.
    fn index(&mut self) {
        self.addresses.clear();
        for r in &self.rules {
            for a in &r.addresses {
                if !self.addresses.contains(a) {
                    self.addresses.push(*a);
                }
            }
        }
        self.dests.clear();
        self.spans.clear();
        if self.addresses.len() <= RAW_ADDRESSES {
            for &a in &self.addresses {
                let mut protos: Vec<u8> = self
                    .rules
                    .iter()
                    .filter(|r| r.addresses.contains(&a))
                    .map(|r| r.proto)
                    .collect();
                protos.sort_unstable();
                protos.dedup();
                for proto in protos {
                    let first = self.spans.len();
                    self.spans.extend(spans(&self.rules, a, proto));
                    let (v6, addr) = match a {
                        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
                        IpAddr::V6(v6) => (true, u128::from(v6)),
                    };
                    self.dests.push(Dest {
                        addr,
                        v6,
                        proto,
                        // At most 64 addresses, each rule's ranges bounded by the config:
                        // indexes fit in u32.
                        spans: first as u32..self.spans.len() as u32,
                    });
                }
            }
        }
        self.active = !self.rules.is_empty();
        self.has_single = self.rules.iter().any(|r| r.mode == RuleMode::Single);
        self.by_id.clear();
        for (ri, r) in self.rules.iter().enumerate() {
            for (bi, b) in r.backends.iter().enumerate() {
                let id = usize::from(b.id);
                if self.by_id.len() <= id {
                    self.by_id.resize(id + 1, None);
                }
                // Rules and backends per rule are bounded by MAX_BACKENDS: both fit in u16.
                self.by_id[id] = Some((ri as u16, bi as u16));
            }
        }
    }

    /// The same services with backend `id`'s state (or MAC) changed and the tables rebuilt.
    pub fn with_backend(
        &self,
        secret: &[u8],
        id: u16,
        change: impl FnOnce(&mut Backend),
    ) -> Services {
        let mut s = self.clone();
        if let Some(Some((ri, bi))) = self.by_id.get(usize::from(id)) {
            let rule = &mut s.rules[usize::from(*ri)];
            change(&mut rule.backends[usize::from(*bi)]);
            let key = derive_key(secret, BACKEND_KEY_LABEL);
            rule.table = Maglev::build(&candidates(&rule.backends), &key);
        }
        s
    }

    /// The same services under the agreed backend table (which names backends by
    /// [`Backend::agreed`]): its down and drained backends take no new flows, every other one
    /// is up (tables rebuilt, epoch taken).
    pub fn with_table(&self, secret: &[u8], table: &health::BackendTable) -> Services {
        let mut s = self.clone();
        let key = derive_key(secret, BACKEND_KEY_LABEL);
        for rule in s.rules.iter_mut() {
            for b in rule.backends.iter_mut() {
                b.state = if table.drained.contains(&b.agreed) {
                    BackendState::Drained
                } else if table.down.contains(&b.agreed) {
                    BackendState::Down
                } else {
                    BackendState::Up
                };
            }
            rule.table = Maglev::build(&candidates(&rule.backends), &key);
        }
        s.epoch = table.epoch;
        s
    }

    /// A report by this node's ids, as the nodes name the backends ([`Backend::agreed`]);
    /// ids of no backend are left out.
    pub fn agreed_report(&self, report: &health::Report) -> health::Report {
        let agreed = |ids: &std::collections::BTreeSet<u16>| {
            ids.iter()
                .filter_map(|&id| self.by_id(id).map(|(_, b)| b.agreed))
                .collect()
        };
        health::Report {
            down: agreed(&report.down),
            drained: agreed(&report.drained),
        }
    }

    /// An agreed table that names these services' backends by their places, renumbered for
    /// `next` (this node's services after a reload: ids that stay name the same servers):
    /// a backend that stays keeps its state under its new place; one that left is gone from
    /// it; one `next` adds (or puts on a freed id) is down if `checked` says its rule's
    /// backends are checked (by index in `next`): it takes no new flow before it has answered,
    /// as its checks start it down (`health::LocalVerdicts::retarget`), else in neither list.
    pub fn renumbered(
        &self,
        table: &health::BackendTable,
        next: &Services,
        checked: impl Fn(usize) -> bool,
    ) -> health::BackendTable {
        let moved = |places: &std::collections::BTreeSet<u16>| {
            places
                .iter()
                .filter_map(|&p| self.moved_place(p, next))
                .collect()
        };
        let mut down: std::collections::BTreeSet<u16> = moved(&table.down);
        // New to the checks as `health::Checks::retarget` tells: another address on the id.
        down.extend(
            next.backends()
                .filter(|&(ri, b)| checked(ri) && self.by_id(b.id).map(|(_, o)| o.ip) != Some(b.ip))
                .map(|(_, b)| b.agreed),
        );
        health::BackendTable {
            epoch: table.epoch,
            down,
            drained: moved(&table.drained),
        }
    }

    /// The place in `next` (these services after a reload: ids that stay name the same
    /// servers) of the backend at `place` here; None if it left, or its id was reused for
    /// another server.
    pub fn moved_place(&self, place: u16, next: &Services) -> Option<u16> {
        let (_, b) = self.backends().find(|(_, b)| b.agreed == place)?;
        let (_, n) = next.by_id(b.id)?;
        (next.server(b.id) == self.server(b.id)).then_some(n.agreed)
    }

    /// The backend with this node's id `id`, and its rule.
    pub fn by_id(&self, id: u16) -> Option<(&Rule, &Backend)> {
        let (ri, bi) = (*self.by_id.get(usize::from(id))?)?;
        let rule = self.rules.get(usize::from(ri))?;
        Some((rule, rule.backends.get(usize::from(bi))?))
    }

    /// Whether every frame falls under the same rule in `other` as here, and every rule and
    /// backend id means the same (the addresses, protocols, ports and modes of the rules, what
    /// takes unmatched traffic, the rule of every backend id): a reload that changed only
    /// backends' addresses, weights or states, or a health change, keeps it. The pipeline's
    /// checked flows hold while it does (see [`crate::cluster::FlowTable::upsert_checked`]).
    pub fn same_matching(&self, other: &Services) -> bool {
        let rule_of = |s: &Services| -> Vec<Option<u16>> {
            s.by_id.iter().map(|e| e.map(|(ri, _)| ri)).collect()
        };
        let rules_match = self.rules.len() == other.rules.len()
            && self.rules.iter().zip(&other.rules).all(|(a, b)| {
                a.addresses == b.addresses
                    && a.proto == b.proto
                    && a.ports == b.ports
                    && a.mode == b.mode
                    && a.delivery == b.delivery
            });
        rules_match
            && self.active == other.active
            && self.unmatched == other.unmatched
            && self.addresses == other.addresses
            && rule_of(self) == rule_of(other)
    }

    /// The server id `id` names: its rule's name and its address (a freed id that a reload
    /// gave a new backend names another server).
    pub fn server(&self, id: u16) -> Option<(&str, IpAddr)> {
        self.by_id(id).map(|(r, b)| (r.name.as_str(), b.ip))
    }

    /// Whether there is any rule (else server mode's path, untouched).
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active
    }

    /// Whether any rule is `single`: its frames are not owned by bucket.
    #[inline(always)]
    pub fn has_single(&self) -> bool {
        self.has_single
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every service address.
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// Whether `ip` is a service address (answered by ARP/NDP like the cluster address).
    #[inline]
    pub fn is_address(&self, ip: IpAddr) -> bool {
        self.addresses.contains(&ip)
    }

    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// The rule a frame to `dst` (IP protocol `proto`, destination port `port`) falls under.
    #[inline]
    pub fn lookup(&self, dst: IpAddr, proto: u8, port: u16) -> Match {
        if !self.addresses.contains(&dst) {
            return Match::Cluster;
        }
        match self.rules.iter().position(|r| r.matches(dst, proto, port)) {
            Some(i) => Match::Rule(i),
            None => Match::NoRule,
        }
    }

    /// [`Services::lookup`] of a destination given as a number: IPv4's 32 bits (in the low
    /// bits, `v6` false) or IPv6's 128. The same answer, without building, copying and
    /// comparing `IpAddr`s or trying rule after rule: the addresses are numbers, and each
    /// address and protocol has its ports' rules resolved already (disjoint spans).
    #[inline]
    pub fn lookup_raw(&self, v6: bool, dst: u128, proto: u8, port: u16) -> Match {
        if self.dests.is_empty() && !self.addresses.is_empty() {
            let ip = if v6 {
                IpAddr::V6(dst.into())
            } else {
                // IPv4 keeps its 32 bits in the low bits: the truncation is exact.
                IpAddr::V4((dst as u32).into())
            };
            return self.lookup(ip, proto, port);
        }
        let mut known = false;
        for d in &self.dests {
            if d.addr != dst || d.v6 != v6 {
                continue;
            }
            if d.proto != proto {
                known = true;
                continue;
            }
            let spans = self
                .spans
                .get(d.spans.start as usize..d.spans.end as usize)
                .unwrap_or_default();
            return match spans.iter().find(|s| s.first <= port && port <= s.last) {
                Some(s) => Match::Rule(s.rule as usize),
                None => Match::NoRule,
            };
        }
        if known {
            Match::NoRule
        } else {
            Match::Cluster
        }
    }

    /// The backend a new flow of rule `rule` with affinity hash `h` goes to.
    #[inline]
    pub fn choose(&self, rule: usize, h: u64) -> Option<&Backend> {
        let r = self.rules.get(rule)?;
        r.table.lookup(h).map(|i| &r.backends[i])
    }

    /// The backend a new flow of rule `rule` goes to: the flow `src:src_port` (IP protocol
    /// `proto`) whose pick is `pick` ([`crate::cluster::backend_pick`]), at its
    /// [`Rule::affinity_hash`].
    #[inline]
    pub fn choose_new(
        &self,
        rule: usize,
        hasher: &BucketHasher,
        pick: u64,
        src: IpAddr,
        src_port: u16,
        proto: u8,
    ) -> Option<&Backend> {
        let h = self
            .rules
            .get(rule)?
            .affinity_hash(hasher, pick, src, src_port, proto);
        self.choose(rule, h)
    }

    /// The backend with id `id`, if it is still rule `rule`'s.
    #[inline]
    pub fn backend(&self, rule: usize, id: u16) -> Option<&Backend> {
        match self.by_id.get(usize::from(id)) {
            Some(Some((ri, bi))) if usize::from(*ri) == rule => {
                Some(&self.rules[rule].backends[usize::from(*bi)])
            }
            _ => None,
        }
    }

    /// Every backend, with its rule's index.
    pub fn backends(&self) -> impl Iterator<Item = (usize, &Backend)> {
        self.rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.backends.iter().map(move |b| (i, b)))
    }

    /// Entries of rule `rule`'s table per backend (its share of new flows), in backend order.
    pub fn shares(&self, rule: usize) -> Vec<usize> {
        self.rules
            .get(rule)
            .map(|r| r.table.shares(r.backends.len()))
            .unwrap_or_default()
    }
}

/// What a rule's table is built from: up backends with their weight, the rest with none.
fn candidates(backends: &[Backend]) -> Vec<Candidate> {
    backends
        .iter()
        .map(|b| Candidate {
            ip: b.ip,
            weight: if b.state == BackendState::Up {
                b.weight
            } else {
                0
            },
        })
        .collect()
}

#[cfg(test)]
mod tests;
