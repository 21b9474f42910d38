//! The `services` section: appliance mode's virtual addresses, port rules and backend pools
//! (DESIGN.md, "Two delivery modes"), as written in YAML, and their checks.
//!
//! Owns the shape and the validation of what an operator writes; never compiles tables (that is
//! [`crate::appliance`]) and never touches the network.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{problem, Affinity, Config, ConfigError, Span};
use crate::cluster::NodeId;
use crate::wire::EthernetAddress;

/// One port rule: traffic to `addresses` with `protocol` and a destination port in `ports`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// A short name for status, metrics and logs (letters, digits, `-`, `_`).
    pub name: String,
    /// The virtual addresses (IPv4 and/or IPv6) the cluster answers ARP/NDP for.
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// Single ports and ranges: `[80, 443, "8000-8099"]`.
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub mode: RuleMode,
    /// `single` rules: the nodes in order of preference (default: ascending node id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority: Vec<NodeId>,
    /// Which flows go to the same backend: `none` (each connection on its own), `single` (every
    /// connection of a client address), `network` (every client of a /24 or /64).
    #[serde(default)]
    pub affinity: Affinity,
    #[serde(default)]
    pub delivery: Delivery,
    /// `gue` delivery: the backends' GUE port.
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Encapsulated delivery: the path MTU towards the backends; a client datagram with DF set
    /// (or IPv6) that would exceed it once encapsulated gets "fragmentation needed" / "packet
    /// too big", an IPv4 one without DF is cut into fragments that fit.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    /// How every node checks every backend (leave out: backends are taken as healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_health: Option<BackendHealthConfig>,
}

fn default_gue_port() -> u16 {
    6080
}
fn default_mtu() -> u16 {
    1500
}

/// One backend server of a service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// A short name for status and metrics (default: the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub ip: IpAddr,
    /// The backend's MAC (DSR) or the next hop's (encapsulation); leave out to resolve it by
    /// ARP/NDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<EthernetAddress>,
    /// Encapsulation to a backend on another network: the router on the segment that leads
    /// to it, whose MAC is learned by ARP/NDP (instead of the backend's own). Same IP version
    /// as `ip`; not with `mac` (which would be the router's MAC already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// Relative share of new flows; 0 sends it no new flows (its existing flows continue).
    #[serde(default = "default_backend_weight")]
    pub weight: u32,
}

fn default_backend_weight() -> u32 {
    100
}

impl BackendConfig {
    /// The name status and metrics show.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.ip.to_string())
    }
}

/// How every node checks a service's backends.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHealthConfig {
    /// The port checked on each backend's address.
    pub port: u16,
    /// `GET http_path` must answer `expect_status`; leave out for a TCP connect check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    #[serde(default = "default_expect")]
    pub expect_status: u16,
    #[serde(default = "default_check_interval")]
    pub interval: Span,
    #[serde(default = "default_check_timeout")]
    pub timeout: Span,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_expect() -> u16 {
    200
}
fn default_check_interval() -> Span {
    Span(std::time::Duration::from_millis(500))
}
fn default_check_timeout() -> Span {
    Span(std::time::Duration::from_millis(300))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}

/// The transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    #[default]
    Tcp,
    Udp,
}

impl ServiceProtocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            ServiceProtocol::Tcp => 6,
            ServiceProtocol::Udp => 17,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServiceProtocol::Tcp => "tcp",
            ServiceProtocol::Udp => "udp",
        }
    }
}

/// Windows NLB's filtering modes for a port rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    /// Buckets over the nodes (the default).
    #[default]
    Multiple,
    /// One node, by priority, takes the whole rule; the next takes over when it cannot serve.
    Single,
    /// Dropped and counted.
    Disabled,
}

impl RuleMode {
    pub fn name(self) -> &'static str {
        match self {
            RuleMode::Multiple => "multiple",
            RuleMode::Single => "single",
            RuleMode::Disabled => "disabled",
        }
    }
}

/// Where an owned frame of the rule goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// This node's own kernel (server mode).
    #[default]
    Local,
    /// Direct server return: the frame goes to the backend's MAC unchanged above layer 2.
    Dsr,
    /// IP in IP (IPv4 in IPv4, IPv6 in IPv6) to the backend's address.
    Ipip,
    /// Generic UDP encapsulation to the backend's address and `gue_port`.
    Gue,
}

impl Delivery {
    pub fn name(self) -> &'static str {
        match self {
            Delivery::Local => "local",
            Delivery::Dsr => "dsr",
            Delivery::Ipip => "ipip",
            Delivery::Gue => "gue",
        }
    }

    /// Whether owned frames leave on the wire towards a backend.
    pub fn is_appliance(self) -> bool {
        self != Delivery::Local
    }
}

/// Traffic to a service address that matches no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Dropped and counted as `no-rule`.
    #[default]
    Drop,
    /// Delivered to the owning node's own kernel, as server mode does.
    Local,
}

/// A port or an inclusive range of ports: `80` or `"8000-8099"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

/// Takes whatever scalar a port was written as, so that a number out of range, a negative
/// number or a fraction gets the same message and fix as bad text (an untagged enum's error
/// names a Rust type and says nothing of the fix).
struct PortVisitor;

fn not_a_port<E: serde::de::Error>(written: impl fmt::Display) -> E {
    E::custom(format!(
        "`{written}` is not a port or a port range; write 80 or \"8000-8099\" (1-65535)"
    ))
}

impl PortVisitor {
    fn range<E: serde::de::Error>(first: u16, last: u16) -> Result<PortRange, E> {
        if first == 0 || first > last {
            return Err(not_a_port(format_args!("{first}-{last}")));
        }
        Ok(PortRange { first, last })
    }
}

impl Visitor<'_> for PortVisitor {
    type Value = PortRange;

    // After "expected" in serde's own messages (a list or a map where a port should be); the
    // part after "; " becomes the fix.
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port or a port range; write 80 or \"8000-8099\" (1-65535)")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
        let p = u16::try_from(v).map_err(|_| not_a_port(v))?;
        Self::range(p, p)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRange, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(not_a_port(v)),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PortRange, E> {
        Err(not_a_port(v))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortRange, E> {
        let parse = |t: &str| t.trim().parse::<u16>().map_err(|_| not_a_port(s));
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        Self::range(first, last)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            s.serialize_u16(self.first)
        } else {
            s.collect_str(&format_args!("{}-{}", self.first, self.last))
        }
    }
}

/// A service's or a backend's name: letters, digits, `-` and `_` (no whitespace, no `/`: the
/// operator's requests name backends as `SERVICE/NAME` on a line split at whitespace).
fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An address the frames never carry as written: an IPv4-mapped IPv6 address (an IPv4 host is
/// reached, and compared with the other addresses, as plain IPv4) or the IPv4 broadcast
/// address (every host's, no one's). The problem and the fix.
fn mapped_or_broadcast(a: IpAddr) -> Option<(String, String)> {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|v4| {
            (
                format!("{a} is an IPv4-mapped IPv6 address"),
                format!("write the plain IPv4 address {v4}"),
            )
        }),
        IpAddr::V4(v4) if v4.is_broadcast() => Some((
            format!("{a} is the broadcast address"),
            "use a unicast address, e.g. 198.18.0.100".to_owned(),
        )),
        IpAddr::V4(_) => None,
    }
}

/// Most backends in all services together (the flow table keeps a 12-bit backend id).
pub const MAX_BACKENDS: usize = 4095;

impl Config {
    /// The services: names, addresses, overlapping rules, backends.
    pub(super) fn validate_services(&self, file: &str) -> Result<(), ConfigError> {
        let err = problem(file);
        let mut names = HashSet::new();
        let mut backends = 0usize;
        let node_addresses: Vec<IpAddr> = self.node_addresses();
        for (i, s) in self.services.iter().enumerate() {
            let at = |key: &str| format!("services[{i}].{key}");
            if !usable_name(&s.name) {
                return Err(err(
                    &at("name"),
                    format!("`{}` is not a usable service name", s.name),
                    "use letters, digits, `-` and `_`, e.g. web-https",
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(err(
                    &at("name"),
                    format!("a second service is named `{}`", s.name),
                    "give every service its own name",
                ));
            }
            if s.addresses.is_empty() {
                return Err(err(
                    &at("addresses"),
                    "no virtual address".into(),
                    "list at least one address, e.g. [198.18.0.100]",
                ));
            }
            for a in &s.addresses {
                if let Some((problem, fix)) = mapped_or_broadcast(*a) {
                    return Err(err(&at("addresses"), problem, &fix));
                }
                if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                    return Err(err(
                        &at("addresses"),
                        format!("{a} cannot be a virtual address"),
                        "use a unicast address of the segment, e.g. 198.18.0.100",
                    ));
                }
                if node_addresses.contains(a) {
                    return Err(err(
                        &at("addresses"),
                        format!("{a} is this node's own address (node.ip / node.ip6)"),
                        "give the service an address no node uses",
                    ));
                }
            }
            if s.ports.is_empty() {
                return Err(err(
                    &at("ports"),
                    "no port".into(),
                    "list ports or ranges, e.g. [80, \"8000-8099\"]",
                ));
            }
            if s.gue_port == 0 {
                return Err(err(
                    &at("gue_port"),
                    "port 0 cannot be sent to".into(),
                    "give the port the backends decapsulate GUE on, 6080 by default",
                ));
            }
            if s.mode == RuleMode::Single {
                let mut seen = HashSet::new();
                if let Some(dup) = s.priority.iter().find(|n| !seen.insert(**n)) {
                    return Err(err(
                        &at("priority"),
                        format!("node {dup} is listed twice"),
                        "list each node once, the preferred first",
                    ));
                }
            } else if !s.priority.is_empty() {
                return Err(err(
                    &at("priority"),
                    format!(
                        "a priority list on a `{}` rule has no effect",
                        s.mode.name()
                    ),
                    "remove it, or set mode: single",
                ));
            }
            self.validate_delivery(file, i, s, &node_addresses)?;
            backends += s.backends.len();
            for (j, earlier) in self.services[..i].iter().enumerate() {
                if earlier.protocol == s.protocol
                    && earlier.addresses.iter().any(|a| s.addresses.contains(a))
                    && earlier
                        .ports
                        .iter()
                        .any(|p| s.ports.iter().any(|q| p.overlaps(q)))
                {
                    return Err(err(
                        &at("ports"),
                        format!(
                            "overlaps service `{}` (services[{j}]): same address, protocol and \
                             port; a frame must match one rule",
                            earlier.name
                        ),
                        "split the port ranges so that no port is in both rules",
                    ));
                }
            }
        }
        if backends > MAX_BACKENDS {
            return Err(err(
                "services",
                format!("{backends} backends in all; at most {MAX_BACKENDS}"),
                "use fewer backends per node configuration",
            ));
        }
        Ok(())
    }

    /// A backend's `via` (its next hop): an encapsulation's, a unicast address of the
    /// backend's IP version that is no node's, service's or the cluster's, without `mac`.
    fn validate_via(
        &self,
        file: &str,
        key: &str,
        s: &ServiceConfig,
        b: &BackendConfig,
        via: IpAddr,
        node_addresses: &[IpAddr],
    ) -> Result<(), ConfigError> {
        let err = problem(file);
        let at = format!("{key}.via");
        if s.delivery == Delivery::Dsr {
            return Err(err(
                &at,
                "DSR reaches its backends on the segment itself, not through a router".into(),
                "remove via, or deliver by ipip or gue",
            ));
        }
        if b.mac.is_some() {
            return Err(err(
                &at,
                "both mac and via: mac is already the next hop's MAC".into(),
                "give the router's address as via (its MAC is learned), or its MAC as mac",
            ));
        }
        if via.is_ipv4() != b.ip.is_ipv4() {
            return Err(err(
                &at,
                format!("{via} is not of the IP version of the backend {}", b.ip),
                "give the router's address of the backend's IP version",
            ));
        }
        let cluster = [
            Some(IpAddr::V4(self.cluster.ip)),
            self.cluster.ip6.map(IpAddr::V6),
        ];
        if via.is_unspecified()
            || via.is_multicast()
            || via.is_loopback()
            || via == b.ip
            || mapped_or_broadcast(via).is_some()
            || node_addresses.contains(&via)
            || cluster.contains(&Some(via))
            || self.services.iter().any(|o| o.addresses.contains(&via))
        {
            return Err(err(
                &at,
                format!("{via} cannot be the next hop to {}", b.ip),
                "give the unicast address of the router on the segment that leads to the backend",
            ));
        }
        Ok(())
    }

    fn validate_delivery(
        &self,
        file: &str,
        i: usize,
        s: &ServiceConfig,
        node_addresses: &[IpAddr],
    ) -> Result<(), ConfigError> {
        let err = problem(file);
        let at = |key: &str| format!("services[{i}].{key}");
        if !s.delivery.is_appliance() {
            if !s.backends.is_empty() || s.backend_health.is_some() {
                return Err(err(
                    &at("backends"),
                    "a `local` service delivers to this node's kernel: backends are unused".into(),
                    "remove the backends, or set delivery: dsr, ipip or gue",
                ));
            }
            return Ok(());
        }
        if s.backends.is_empty() && s.mode != RuleMode::Disabled {
            return Err(err(
                &at("backends"),
                format!(
                    "`{}` delivery needs at least one backend",
                    s.delivery.name()
                ),
                "list the backends, e.g. - { ip: 198.18.0.21 }",
            ));
        }
        let mut seen = HashSet::new();
        let mut names = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let key = format!("services[{i}].backends[{j}]");
            if let Some(name) = &b.name {
                // An operator drains a backend by `NAME` or `SERVICE/NAME` on a line split at
                // whitespace; the metrics tell backends apart by service and name.
                if !usable_name(name) {
                    return Err(err(
                        &format!("{key}.name"),
                        format!("`{}` is not a usable backend name", name.escape_debug()),
                        "use letters, digits, `-` and `_`, e.g. web-1, or leave it out to name \
                         the backend by its address",
                    ));
                }
                if !names.insert(name.as_str()) {
                    return Err(err(
                        &format!("{key}.name"),
                        format!("a second backend of `{}` is named `{name}`", s.name),
                        "give every backend of a service its own name",
                    ));
                }
            }
            if let Some((problem, fix)) = mapped_or_broadcast(b.ip) {
                return Err(err(&format!("{key}.ip"), problem, &fix));
            }
            if !seen.insert(b.ip) {
                return Err(err(
                    &format!("{key}.ip"),
                    format!("{} is listed twice", b.ip),
                    "list each backend once; use weight for a larger share",
                ));
            }
            if s.addresses.contains(&b.ip) || node_addresses.contains(&b.ip) {
                return Err(err(
                    &format!("{key}.ip"),
                    format!("{} is a virtual address or a node's own address", b.ip),
                    "use the backend server's own address",
                ));
            }
            // Frames to another service's address, or to the cluster's, come back to the
            // appliances: a backend there would be a loop.
            let cluster = self.cluster.ip6.map(IpAddr::V6);
            if let Some(other) = self.services.iter().find(|o| o.addresses.contains(&b.ip)) {
                return Err(err(
                    &format!("{key}.ip"),
                    format!("{} is a virtual address of service `{}`", b.ip, other.name),
                    "use the backend server's own address",
                ));
            }
            if b.ip == IpAddr::V4(self.cluster.ip) || Some(b.ip) == cluster {
                return Err(err(
                    &format!("{key}.ip"),
                    format!("{} is the cluster address (cluster.ip / cluster.ip6)", b.ip),
                    "use the backend server's own address",
                ));
            }
            if b.ip.is_unspecified() || b.ip.is_multicast() || b.ip.is_loopback() {
                return Err(err(
                    &format!("{key}.ip"),
                    format!("{} cannot be a backend address", b.ip),
                    "use the backend server's unicast address",
                ));
            }
            if let Some(via) = b.via {
                self.validate_via(file, &key, s, b, via, node_addresses)?;
            }
            if let Some(mac) = b.mac {
                if !mac.is_unicast() || mac == EthernetAddress::ZERO {
                    return Err(err(
                        &format!("{key}.mac"),
                        format!("{mac} is not a unicast MAC"),
                        "write the backend's (or next hop's) own MAC, or leave it out to use ARP",
                    ));
                }
                if mac == self.cluster.mac || mac == self.node.mac {
                    return Err(err(
                        &format!("{key}.mac"),
                        format!("{mac} is the cluster's or this node's MAC"),
                        "write the backend's (or next hop's) own MAC",
                    ));
                }
            }
            if s.delivery == Delivery::Dsr
                && s.addresses.iter().all(|a| a.is_ipv4() != b.ip.is_ipv4())
            {
                return Err(err(
                    &format!("{key}.ip"),
                    "no virtual address of the same IP version".into(),
                    "DSR keeps the packet: give the service an address of the backend's version",
                ));
            }
        }
        let encapsulated = matches!(s.delivery, Delivery::Ipip | Delivery::Gue);
        // The node's own address of a backend's IP version is the outer source of encapsulated
        // frames, and the only sender of the ARP requests / neighbour solicitations that learn
        // a backend's MAC: without it, a backend without `mac` would never get one.
        for (j, b) in s.backends.iter().enumerate() {
            let (key, version, ask) = match b.ip {
                IpAddr::V4(_) if self.node.ip.is_none() => ("node.ip", "IPv4", "ARP"),
                IpAddr::V6(_) if self.node.ip6.is_none() => ("node.ip6", "IPv6", "NDP"),
                _ => continue,
            };
            let fix = format!("set {key} to this node's {version} address on the wire");
            if encapsulated {
                return Err(err(
                    key,
                    format!(
                        "service `{}` encapsulates to {}: the node needs its own {version} \
                         address as the outer source",
                        s.name, b.ip
                    ),
                    &fix,
                ));
            }
            if b.mac.is_none() {
                return Err(err(
                    key,
                    format!(
                        "backend {} of service `{}` has no mac: the node learns it by {ask} \
                         from its own {version} address",
                        b.ip, s.name
                    ),
                    &format!("{fix}, or give the backend's MAC in services[{i}].backends[{j}].mac"),
                ));
            }
        }
        if encapsulated {
            if s.mtu < 1280 {
                return Err(err(
                    &at("mtu"),
                    format!("{} is below the IPv6 minimum", s.mtu),
                    "use the backend path's MTU, 1500 on most networks",
                ));
            }
            // IPv6 clients never send less than 1280 bytes a packet, and the node does not
            // fragment the outer packet: the tunnel must carry 1280 bytes inside, or a
            // full-size packet would be answered "too big" with an MTU the client cannot use.
            let outer = |b: &BackendConfig| {
                let ip = if b.ip.is_ipv6() { 40 } else { 20 };
                ip + if s.delivery == Delivery::Gue {
                    8 + 4
                } else {
                    0
                }
            };
            let overhead = s.backends.iter().map(outer).max().unwrap_or(0);
            if s.addresses.iter().any(IpAddr::is_ipv6) && usize::from(s.mtu) < 1280 + overhead {
                return Err(err(
                    &at("mtu"),
                    format!(
                        "{} leaves IPv6 clients' packets {} bytes inside the tunnel, below IPv6's \
                         minimum of 1280 (the node does not fragment the outer packet)",
                        s.mtu,
                        usize::from(s.mtu) - overhead
                    ),
                    &format!(
                        "use a backend path MTU of at least {} (1280 and {overhead} bytes of \
                         outer headers), or IPv4 addresses only for this service",
                        1280 + overhead
                    ),
                ));
            }
        }
        if s.backends.iter().all(|b| b.weight == 0) && !s.backends.is_empty() {
            return Err(err(
                &at("backends"),
                "every backend has weight 0: no new flow could be served".into(),
                "give at least one backend a weight above 0",
            ));
        }
        if let Some(h) = &s.backend_health {
            if h.rise == 0 || h.fall == 0 || h.interval.0.is_zero() || h.timeout.0.is_zero() {
                return Err(err(
                    &at("backend_health"),
                    "rise, fall, interval and timeout must all be above 0".into(),
                    "use e.g. interval: 500ms, timeout: 300ms, rise: 2, fall: 2",
                ));
            }
            // Each of these would fail every check: every backend down, the service served by
            // none.
            if h.port == 0 {
                return Err(err(
                    &at("backend_health.port"),
                    "port 0 cannot be connected to".into(),
                    "give the port the backends serve the check on, e.g. 80",
                ));
            }
            if !(100..=599).contains(&h.expect_status) {
                return Err(err(
                    &at("backend_health.expect_status"),
                    format!("{} is not an HTTP status", h.expect_status),
                    "give the status a healthy backend answers, e.g. 200",
                ));
            }
            if let Some(path) = &h.http_path {
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(err(
                        &at("backend_health.http_path"),
                        format!(
                            "`{}` cannot be sent as the path of a request line",
                            path.escape_debug()
                        ),
                        "write a path that starts with / and has no spaces, e.g. /healthz",
                    ));
                }
            }
            if h.timeout.0 > h.interval.0 {
                return Err(err(
                    &at("backend_health.timeout"),
                    format!(
                        "{} is longer than the interval {}",
                        humantime::format_duration(h.timeout.0),
                        humantime::format_duration(h.interval.0)
                    ),
                    "make the timeout no longer than the interval",
                ));
            }
        }
        Ok(())
    }

    /// This node's own addresses on the wire.
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        let mut v = Vec::new();
        if let Some(a) = self.node.ip {
            v.push(IpAddr::V4(a));
        }
        if let Some(a) = self.node.ip6 {
            v.push(IpAddr::V6(a));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::LAB;
    use super::*;

    const APPLIANCE: &str = r#"
services:
  - name: web
    addresses: [198.18.0.100]
    ports: [80, "8000-8001"]
    delivery: dsr
    backends:
      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { ip: 198.18.0.22, weight: 50 }
  - name: api
    addresses: [198.18.0.100]
    ports: [443]
    mode: single
    priority: [2, 1]
    delivery: gue
    backends:
      - { name: far, ip: 198.18.1.21 }
"#;

    fn with(services: &str) -> String {
        LAB.replace(
            "  mac: 02:00:00:00:00:01\n",
            "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
        ) + services
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(text, "t.yaml")?;
        c.validate("t.yaml")?;
        Ok(c)
    }

    #[test]
    fn appliance_example_parses_and_round_trips() {
        let c = parse(&with(APPLIANCE)).unwrap();
        assert_eq!(c.services.len(), 2);
        let web = &c.services[0];
        assert_eq!(
            web.ports[1],
            PortRange {
                first: 8000,
                last: 8001
            }
        );
        assert_eq!(web.backends[1].weight, 50);
        assert_eq!(c.services[1].delivery, Delivery::Gue);
        assert_eq!(c.services[1].gue_port, 6080);
        let again = parse(&c.to_yaml()).unwrap();
        assert_eq!(again.to_yaml(), c.to_yaml());
    }

    #[test]
    fn every_kind_of_mistake_names_key_and_fix() {
        let cases: &[(&str, &str, &str)] = &[
            ("8000-8001", "8001-8000", "services[0].ports[1]"),
            ("[80, ", "[0, ", "services[0].ports[0]"),
            ("name: api", "name: web", "services[1].name"),
            ("[443]", "[80]", "services[1].ports"),
            (
                "02:bb:00:00:00:01",
                "01:00:5e:00:00:01",
                "services[0].backends[0].mac",
            ),
            (
                "02:bb:00:00:00:01",
                "02:cc:00:00:00:01",
                "services[0].backends[0].mac",
            ),
            (
                "198.18.0.22, weight",
                "198.18.0.100, weight",
                "services[0].backends[1].ip",
            ),
            (
                "198.18.0.22, weight",
                "198.18.0.21, weight",
                "services[0].backends[1].ip",
            ),
            (
                "addresses: [198.18.0.100]\n    ports: [80",
                "addresses: [198.18.0.11]\n    ports: [80",
                "services[0].addresses",
            ),
            (
                "priority: [2, 1]",
                "priority: [2, 2]",
                "services[1].priority",
            ),
            (
                "delivery: dsr",
                "delivery: dsr\n    priority: [1]",
                "services[0].priority",
            ),
            (
                "delivery: gue",
                "delivery: gue\n    mtu: 500",
                "services[1].mtu",
            ),
            ("delivery: dsr", "delivery: tunnel", "services[0].delivery"),
            ("name: web", "name: web site", "services[0].name"),
        ];
        for (from, to, key) in cases {
            let text = with(APPLIANCE).replacen(from, to, 1);
            assert_ne!(text, with(APPLIANCE), "{from} not found");
            let e = parse(&text).expect_err(to);
            assert_eq!(&e.key, key, "{to}: {e}");
            assert_eq!(e.file, "t.yaml");
            assert!(!e.fix.is_empty(), "{e}");
        }
        // A tunnel that cannot carry IPv6's 1280 bytes for IPv6 clients: GUE over IPv4 adds
        // 32 bytes, so 1311 is one short and 1312 enough; IPv4 clients alone need no more.
        let v6 = with(APPLIANCE).replace(
            "addresses: [198.18.0.100]\n    ports: [443]",
            "addresses: [198.18.0.100, \"2001:2::100\"]\n    ports: [443]",
        );
        let e = parse(&v6.replace("delivery: gue", "delivery: gue\n    mtu: 1311")).unwrap_err();
        assert_eq!(e.key, "services[1].mtu", "{e}");
        assert!(
            e.problem.contains("1279 bytes") && e.fix.contains("1312"),
            "{e}"
        );
        parse(&v6.replace("delivery: gue", "delivery: gue\n    mtu: 1312")).unwrap();
        // IP-in-IP over IPv4 adds 20; GUE over IPv6 52.
        let ipip = v6.replace("delivery: gue", "delivery: ipip");
        for (mtu, ok) in [(1299, false), (1300, true)] {
            let text = ipip.replace("delivery: ipip", &format!("delivery: ipip\n    mtu: {mtu}"));
            assert_eq!(parse(&text).is_ok(), ok, "ipip over IPv4, mtu {mtu}");
        }
        let gue6 = v6
            .replace(
                "  ip: 198.18.0.11\n",
                "  ip: 198.18.0.11\n  ip6: \"2001:2::11\"\n",
            )
            .replace(
                "{ name: far, ip: 198.18.1.21 }",
                "{ name: far, ip: \"2001:2:1::21\" }",
            );
        for (mtu, ok) in [(1331, false), (1332, true)] {
            let text = gue6.replace("delivery: gue", &format!("delivery: gue\n    mtu: {mtu}"));
            assert_eq!(parse(&text).is_ok(), ok, "gue over IPv6, mtu {mtu}");
        }
        parse(&with(APPLIANCE).replace("delivery: gue", "delivery: gue\n    mtu: 1280")).unwrap();
        // Encapsulation needs the node's own address as the outer source.
        let e = parse(&(LAB.to_owned() + APPLIANCE)).unwrap_err();
        assert_eq!(e.key, "node.ip", "{e}");
        // A local service with backends, and weights that serve nobody.
        let e = parse(&with(
            &APPLIANCE.replace("delivery: dsr", "delivery: local"),
        ))
        .unwrap_err();
        assert_eq!(e.key, "services[0].backends", "{e}");
        let e = parse(&with(&APPLIANCE.replace(
            "{ name: far, ip: 198.18.1.21 }",
            "{ ip: 198.18.1.21, weight: 0 }",
        )))
        .unwrap_err();
        assert_eq!(e.key, "services[1].backends", "{e}");
        // A backend at another service's virtual address, or at the cluster address: frames to
        // it would come back to the appliances.
        let text = with(APPLIANCE)
            .replace(
                "addresses: [198.18.0.100]\n    ports: [443]",
                "addresses: [198.18.0.102]\n    ports: [443]",
            )
            .replace("198.18.0.22, weight", "198.18.0.102, weight");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "services[0].backends[1].ip", "{e}");
        assert!(e.problem.contains("service `api`"), "{e}");
        let cluster_ip = parse(&with(APPLIANCE)).unwrap().cluster.ip;
        let e = parse(
            &with(APPLIANCE).replace("198.18.0.22, weight", &format!("{cluster_ip}, weight")),
        )
        .unwrap_err();
        assert_eq!(e.key, "services[0].backends[1].ip", "{e}");
        assert!(e.problem.contains("cluster address"), "{e}");
        // A next hop (`via`): encapsulation only, without `mac`, of the backend's version, and
        // a router's address.
        let far = "{ name: far, ip: 198.18.1.21 }";
        for (backend, service_change, problem) in [
            ("{ ip: 198.19.1.21, via: 198.18.0.254 }", None, None),
            (
                "{ ip: 198.19.1.21, via: 198.18.0.254 }",
                Some(("delivery: gue", "delivery: dsr")),
                Some("router"),
            ),
            (
                "{ ip: 198.19.1.21, via: 198.18.0.254, mac: 02:bb:00:00:00:09 }",
                None,
                Some("both mac and via"),
            ),
            (
                "{ ip: 198.19.1.21, via: \"2001:2::fe\" }",
                None,
                Some("IP version"),
            ),
            (
                "{ ip: 198.19.1.21, via: 198.18.0.11 }",
                None,
                Some("next hop"),
            ),
        ] {
            let mut text = with(APPLIANCE).replace(far, backend);
            if let Some((from, to)) = service_change {
                text = text.replace(from, to);
            }
            match (parse(&text), problem) {
                (Ok(c), None) => {
                    let via = c.services[1].backends[0].via;
                    assert_eq!(via, Some("198.18.0.254".parse().unwrap()));
                    assert_eq!(parse(&c.to_yaml()).unwrap().to_yaml(), c.to_yaml());
                }
                (Err(e), Some(p)) => {
                    assert_eq!(e.key, "services[1].backends[0].via", "{e}");
                    assert!(e.problem.contains(p), "{backend}: {e}");
                }
                (r, p) => panic!("{backend}: {r:?}, expected {p:?}"),
            }
        }
    }

    /// An error's key, and its problem and fix together (for `contains`).
    fn refused(text: &str) -> (String, String) {
        let e = parse(text).expect_err(text);
        assert_eq!(e.file, "t.yaml");
        assert!(!e.fix.is_empty(), "{e}");
        (e.key.clone(), format!("{} / {}", e.problem, e.fix))
    }

    #[test]
    fn a_backend_without_mac_needs_the_node_address_of_its_version() {
        let dsr = |backend: &str| {
            format!(
                "services:\n  - name: web\n    addresses: [198.18.0.100, \"2001:2::100\"]\n    \
                 ports: [80]\n    delivery: dsr\n    backends:\n      - {backend}\n"
            )
        };
        // DSR too: without node.ip no ARP request is ever sent for 198.18.0.22.
        let (key, text) = refused(&(LAB.to_owned() + &dsr("{ ip: 198.18.0.22 }")));
        assert_eq!(key, "node.ip", "{text}");
        assert!(
            text.contains("ARP") && text.contains("services[0].backends[0].mac"),
            "{text}"
        );
        parse(&(LAB.to_owned() + &dsr("{ ip: 198.18.0.22, mac: 02:bb:00:00:00:01 }"))).unwrap();
        // An IPv6 backend needs node.ip6, whatever node.ip says.
        let (key, text) = refused(&with(&dsr("{ ip: \"2001:2::22\" }")));
        assert_eq!(key, "node.ip6", "{text}");
        assert!(text.contains("NDP"), "{text}");
        parse(&with(&dsr(
            "{ ip: \"2001:2::22\", mac: 02:bb:00:00:00:01 }",
        )))
        .unwrap();
        let with6 = |services: &str| {
            with(services).replace(
                "  ip: 198.18.0.11\n",
                "  ip: 198.18.0.11\n  ip6: \"2001:2::11\"\n",
            )
        };
        parse(&with6(&dsr("{ ip: \"2001:2::22\" }"))).unwrap();
        // Encapsulation to an IPv6 backend names node.ip6 even with a static MAC.
        let gue6 = dsr("{ ip: \"2001:2::22\", mac: 02:bb:00:00:00:01 }")
            .replace("delivery: dsr", "delivery: gue");
        let (key, text) = refused(&with(&gue6));
        assert_eq!(key, "node.ip6", "{text}");
        assert!(text.contains("outer source"), "{text}");
        parse(&with6(&gue6)).unwrap();
    }

    #[test]
    fn backend_checks_that_would_always_fail_are_refused() {
        let checked = with(APPLIANCE).replace(
            "delivery: dsr",
            "delivery: dsr\n    backend_health: { port: 80, http_path: /healthz, interval: 1s, \
             timeout: 1s }",
        );
        parse(&checked).unwrap();
        for (from, to, key) in [
            ("port: 80,", "port: 0,", "backend_health.port"),
            (
                "port: 80,",
                "port: 80, expect_status: 99,",
                "backend_health.expect_status",
            ),
            (
                "port: 80,",
                "port: 80, expect_status: 600,",
                "backend_health.expect_status",
            ),
            ("/healthz", "healthz", "backend_health.http_path"),
            ("/healthz", "\"/health z\"", "backend_health.http_path"),
            ("/healthz", "\"/health\\rz\"", "backend_health.http_path"),
            ("timeout: 1s", "timeout: 1001ms", "backend_health.timeout"),
        ] {
            let text = checked.replace(from, to);
            assert_ne!(text, checked, "{from} not found");
            let (k, problem) = refused(&text);
            assert_eq!(k, format!("services[0].{key}"), "{to}: {problem}");
            assert!(!problem.contains('\r'), "{problem}");
        }
        let (key, text) =
            refused(&checked.replace("delivery: gue", "delivery: gue\n    gue_port: 0"));
        assert_eq!(key, "services[1].gue_port", "{text}");
    }

    #[test]
    fn backend_names_can_be_drained_and_told_apart() {
        let named = |a: &str, b: &str| {
            with(APPLIANCE)
                .replace(
                    "{ ip: 198.18.0.21,",
                    &format!("{{ name: {a}, ip: 198.18.0.21,"),
                )
                .replace(
                    "{ ip: 198.18.0.22,",
                    &format!("{{ name: {b}, ip: 198.18.0.22,"),
                )
        };
        let c = parse(&named("web-1", "web_2")).unwrap();
        assert_eq!(c.services[0].backends[1].label(), "web_2");
        // One name in two services is two backends a drain can tell apart (`web/far`).
        parse(&named("web-1", "far")).unwrap();
        for (a, b, key) in [
            ("\"web 1\"", "web-2", "services[0].backends[0].name"),
            ("web-1", "web/2", "services[0].backends[1].name"),
            ("web-1", "\"\"", "services[0].backends[1].name"),
            ("web-1", "web-1", "services[0].backends[1].name"),
        ] {
            let (k, text) = refused(&named(a, b));
            assert_eq!(k, key, "{a}, {b}: {text}");
        }
    }

    #[test]
    fn a_port_out_of_range_says_how_to_write_a_port() {
        for bad in [
            "70000",
            "-1",
            "80.5",
            "\"70000\"",
            "\"0-80\"",
            "true",
            "[80]",
        ] {
            let text = with(APPLIANCE).replacen("[80, ", &format!("[{bad}, "), 1);
            let e = parse(&text).expect_err(bad);
            assert_eq!(e.key, "services[0].ports[0]", "{bad}: {e}");
            let shown = e.to_string();
            assert!(
                !shown.contains("Raw") && !shown.contains("enum") && e.fix.contains("8000-8099"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn shape_errors_in_services_point_at_the_appliance_example() {
        for (from, to, key) in [
            ("delivery: dsr", "delivery: tunnel", "services[0].delivery"),
            (
                "{ name: far, ip: 198.18.1.21 }",
                "{ name: far }",
                "services[1].backends[0].ip",
            ),
        ] {
            let e = parse(&with(APPLIANCE).replace(from, to)).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.fix.contains("conf/appliance-node.yaml"), "{e}");
        }
        let e = parse(&with(&format!("{APPLIANCE}unmatched: bounce\n"))).unwrap_err();
        assert_eq!(e.key, "unmatched", "{e}");
        assert!(e.fix.contains("conf/appliance-node.yaml"), "{e}");
    }

    #[test]
    fn mapped_and_broadcast_addresses_are_refused() {
        for (from, to, key, fix) in [
            (
                "addresses: [198.18.0.100]\n    ports: [80",
                "addresses: [\"::ffff:198.18.0.100\"]\n    ports: [80",
                "services[0].addresses",
                "198.18.0.100",
            ),
            (
                "addresses: [198.18.0.100]\n    ports: [80",
                "addresses: [255.255.255.255]\n    ports: [80",
                "services[0].addresses",
                "unicast",
            ),
            // The same server as backends[0], and the service's own address, in disguise.
            (
                "198.18.0.22, weight",
                "\"::ffff:198.18.0.21\", weight",
                "services[0].backends[1].ip",
                "198.18.0.21",
            ),
            (
                "{ name: far, ip: 198.18.1.21 }",
                "{ name: far, ip: \"::ffff:198.18.0.100\" }",
                "services[1].backends[0].ip",
                "198.18.0.100",
            ),
            (
                "198.18.0.22, weight",
                "255.255.255.255, weight",
                "services[0].backends[1].ip",
                "unicast",
            ),
        ] {
            let text = with(APPLIANCE).replacen(from, to, 1);
            assert_ne!(text, with(APPLIANCE), "{from} not found");
            let e = parse(&text).expect_err(to);
            assert_eq!(e.key, key, "{to}: {e}");
            assert!(e.fix.contains(fix), "{to}: {e}");
        }
    }
}
