//! The node's YAML configuration: parsed with serde (unknown keys refused), typed, validated.
//!
//! Every error names the file, the key and what would fix it, because an operator reads it at
//! 3 a.m. on an appliance. Loading never touches DPDK or the network; it only reads the config
//! file and the cluster secret file.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::cluster::siphash::HashLanes;
pub use crate::cluster::Affinity;
use crate::cluster::{NodeId, Weight};
use crate::wire::EthernetAddress;

mod services;

pub use services::{
    BackendConfig, BackendHealthConfig, Delivery, PortRange, RuleMode, ServiceConfig,
    ServiceProtocol, Unmatched, MAX_BACKENDS,
};

// A MAC as written in YAML: `02:cc:00:00:00:01`.
impl<'de> Deserialize<'de> for EthernetAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not a MAC address; write six hex bytes like 02:cc:00:00:00:01"
            ))
        })
    }
}

impl Serialize for EthernetAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration as written in YAML: `100ms`, `2s`, `1m 30s` (humantime syntax).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Span).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write it like 100ms, 2s or 1m"
            ))
        })
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// A deadline as written in YAML: a duration (`30s`, `2m`) or `none` (no deadline: wait).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Deadline(pub Option<Duration>);

impl<'de> Deserialize<'de> for Deadline {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "none" {
            return Ok(Deadline(None));
        }
        humantime::parse_duration(&s)
            .map(|d| Deadline(Some(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{s}` is neither a duration ({e}) nor `none`; write it like 30s or 2m, \
                     or none to wait for the last connection"
                ))
            })
    }
}

impl Serialize for Deadline {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(d) => s.collect_str(&humantime::format_duration(d)),
            None => s.serialize_str("none"),
        }
    }
}

/// The whole node configuration (one YAML file per node).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub node: NodeConfig,
    #[serde(default)]
    pub control: ControlConfig,
    pub dataplane: DataplaneConfig,
    /// Health check of the local service: failing drains the node, recovering undrains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// Appliance mode's port rules (DESIGN.md, "Two delivery modes"): leave out for server
    /// mode, where the cluster address is delivered to every node's own kernel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceConfig>,
    /// Traffic to a service address that matches no rule.
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// What every node of the cluster shares: the cluster address and the secret.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The shared IPv4 address.
    pub ip: Ipv4Addr,
    /// The shared IPv6 address, if the cluster answers on IPv6 too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The shared cluster MAC: never used as a source address on the wire.
    pub mac: EthernetAddress,
    /// File holding the cluster secret (keys the bucket hash and the control-message MACs).
    pub secret_file: PathBuf,
    #[serde(default)]
    pub affinity: Affinity,
    #[serde(default)]
    pub policy: Policy,
}

/// How buckets are shared among live nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Uniform (the paper's "random").
    #[default]
    Hash,
    /// By the configured node weights.
    Weighted,
    /// Weights follow the load nodes report.
    ByLoad,
}

/// This node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// 1..=64, unique in the cluster.
    pub id: NodeId,
    /// This node's own MAC: the Ethernet source of every frame it sends.
    pub mac: EthernetAddress,
    #[serde(default = "default_weight")]
    pub weight: Weight,
    /// This node's own IPv4 address on the wire: the outer source of encapsulated frames and
    /// the sender of ARP requests for backends (appliance mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// This node's own IPv6 address on the wire, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

fn default_weight() -> Weight {
    Weight::new(100).unwrap_or_else(|| unreachable!("100 is a weight"))
}

/// The side UDP channel for membership.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Where this node listens for control messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The other nodes' control addresses.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    #[serde(default = "default_interval")]
    pub interval: Span,
    /// Heartbeat intervals of silence (on both paths) before a peer is declared dead.
    #[serde(default = "default_dead_after")]
    pub dead_after: u32,
    /// Where `/metrics` (Prometheus) is served: the node's management address and a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// Local control socket for operator commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The only deadline that ends connections: how long a drain (SIGTERM's, or `clonecluster
    /// drain` without `--deadline`) waits for the connections this node still serves in the
    /// buckets it handed over; at the deadline they are cut (SIGTERM: the node stops). `none`:
    /// wait for the last one.
    #[serde(default = "default_drain_deadline")]
    pub drain_deadline: Deadline,
    /// How long a bucket's new owner learns the old owner's flows before the old owner
    /// releases it: at least the SYN retransmit span of your clients.
    #[serde(default = "default_handoff_learn")]
    pub handoff_learn: Span,
    /// How long a plan (join, drain, weight change, by-load step) waits after acquire for the
    /// old owners' connections in the buckets it moves before it completes. It never ends a
    /// connection: those still open stay with their old owner, bucket by bucket, and the next
    /// plan may start. Shorter: plans follow each other sooner.
    #[serde(default = "default_release_deadline")]
    pub release_deadline: Span,
}

fn default_handoff_learn() -> Span {
    Span(Duration::from_secs(3))
}
fn default_release_deadline() -> Span {
    Span(Duration::from_secs(30))
}

fn default_interval() -> Span {
    Span(Duration::from_millis(100))
}
fn default_dead_after() -> u32 {
    3
}
fn default_drain_deadline() -> Deadline {
    Deadline(Some(Duration::from_secs(10)))
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: None,
            peers: Vec::new(),
            interval: default_interval(),
            dead_after: default_dead_after(),
            socket: None,
            metrics: None,
            drain_deadline: default_drain_deadline(),
            handoff_learn: default_handoff_learn(),
            release_deadline: default_release_deadline(),
        }
    }
}

/// Where a port comes from: a virtual device (created by this process) or a PCI NIC.
/// Written as `{ vdev: "net_af_packet0,iface=eth0" }` or `{ pci: "0000:01:00.0" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A DPDK vdev string: `net_af_packet0,iface=eth0`, `net_tap0,iface=cc0`, ...
    Vdev(String),
    /// A PCI address bound to a DPDK-compatible driver: `0000:01:00.0`.
    Pci(String),
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            vdev: Option<String>,
            pci: Option<String>,
        }
        match Raw::deserialize(d)? {
            Raw {
                vdev: Some(v),
                pci: None,
            } => Ok(PortSpec::Vdev(v)),
            Raw {
                vdev: None,
                pci: Some(p),
            } => Ok(PortSpec::Pci(p)),
            _ => Err(serde::de::Error::custom(
                "a port needs exactly one of `vdev` or `pci`; write \
                 `{ vdev: \"net_af_packet0,iface=eth0\" }` or `{ pci: \"0000:01:00.0\" }`",
            )),
        }
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            PortSpec::Vdev(v) => map.serialize_entry("vdev", v)?,
            PortSpec::Pci(p) => map.serialize_entry("pci", p)?,
        }
        map.end()
    }
}

impl PortSpec {
    /// The ethdev name DPDK gives the port (the vdev name before the first comma, or the PCI
    /// address).
    pub fn device_name(&self) -> &str {
        match self {
            PortSpec::Vdev(s) => s.split(',').next().unwrap_or(s).trim(),
            PortSpec::Pci(s) => s.trim(),
        }
    }
}

/// What a packet core does when its queues are empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleMode {
    /// Poll without pause: lowest latency, one whole core per packet core (production).
    #[default]
    Busy,
    /// Sleep on RX interrupts where the PMD has them (net_tap, most NICs).
    Interrupt,
    /// Back off with short sleeps after empty polls (net_af_packet, shared lab machines).
    Adaptive,
}

impl IdleMode {
    /// The mode as written in the YAML.
    pub fn name(self) -> &'static str {
        match self {
            IdleMode::Busy => "busy",
            IdleMode::Interrupt => "interrupt",
            IdleMode::Adaptive => "adaptive",
        }
    }
}

/// The DPDK side of the node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Extra EAL arguments (`--no-huge`, `-m 512`, `--log-level`...). Cores, ports and the file
    /// prefix come from the keys below; do not repeat them here.
    #[serde(default)]
    pub eal_args: Vec<String>,
    /// EAL `--file-prefix`: unique per process on one machine. Default `clonecluster-node<ID>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_prefix: Option<String>,
    /// The port on the shared segment.
    pub wire_port: PortSpec,
    /// The port into this node's own kernel (or its backends).
    pub host_port: PortSpec,
    /// Logical cores that run packet loops, one RX/TX queue pair per core on each port.
    #[serde(default = "default_cores")]
    pub cores: Vec<u32>,
    #[serde(default)]
    pub idle: IdleMode,
    /// Longest sleep of the `adaptive` idle mode (and epoll timeout of `interrupt`).
    #[serde(default = "default_idle_max_sleep")]
    pub idle_max_sleep: Span,
    /// Flows each packet core can track (the flow table's capacity: 24 bytes of slots each,
    /// plus 256 KiB of per-bucket counts per table).
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: u32,
    /// Number of mbufs in the packet pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Bytes of each mbuf's buffer, the 128-byte headroom included (DPDK's default is 2176:
    /// 2048 of frame). Smaller buffers fit more mbufs in the same memory when frames are
    /// small (a benchmark looping millions of minimum-size frames).
    #[serde(default = "default_mbuf_size")]
    pub mbuf_size: u16,
    #[serde(default = "default_descriptors")]
    pub rx_descriptors: u16,
    #[serde(default = "default_descriptors")]
    pub tx_descriptors: u16,
    /// The bucket hash's implementation (a start error if this CPU lacks it).
    #[serde(default)]
    pub hash_lanes: HashLanes,
}

fn default_cores() -> Vec<u32> {
    vec![0]
}
fn default_idle_max_sleep() -> Span {
    Span(Duration::from_micros(500))
}
fn default_flow_capacity() -> u32 {
    1 << 18
}
fn default_pool_size() -> u32 {
    8191
}
fn default_mbuf_size() -> u16 {
    2176
}
fn default_descriptors() -> u16 {
    1024
}

impl DataplaneConfig {
    /// Bytes a received frame (and an answer built in its place) has in one mbuf: its buffer
    /// after DPDK's 128-byte headroom. A longer frame spans several mbufs and is dropped
    /// (`chained`).
    pub fn frame_room(&self) -> usize {
        usize::from(self.mbuf_size).saturating_sub(128)
    }

    /// Bytes one mbuf takes in memory: its buffer (`mbuf_size`), the rte_mbuf header (two
    /// cache lines) and the mempool's per-object header, rounded up.
    pub fn mbuf_footprint(&self) -> u64 {
        u64::from(self.mbuf_size) + 128 + 64
    }

    /// The EAL memory limit from `-m N` / `--socket-mem`, in MiB, if one is given.
    pub fn eal_memory_mib(&self) -> Option<u64> {
        let mut args = self.eal_args.iter();
        while let Some(a) = args.next() {
            if a == "-m" {
                return args.next().and_then(|v| v.parse().ok());
            }
            if let Some(v) = a.strip_prefix("-m") {
                if let Ok(v) = v.trim_start_matches('=').parse() {
                    return Some(v);
                }
            }
        }
        None
    }

    pub fn file_prefix(&self, node: u8) -> String {
        self.file_prefix
            .clone()
            .unwrap_or_else(|| format!("clonecluster-node{node}"))
    }
}

/// A configuration error: which file, which key, what is wrong, what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: `{key}`: {problem}\n  fix: {fix}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

/// A loaded, validated configuration together with the cluster secret it names.
#[derive(Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: Config,
    pub secret: Vec<u8>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Loaded")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .finish()
    }
}

/// The shortest secret accepted: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;

impl Config {
    /// Reads, parses and validates `path`, and reads the secret file it names.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            problem: format!("cannot read the configuration file: {e}"),
            fix: "pass the path of a readable YAML file with --config".into(),
        })?;
        let config = Self::parse(&text, &file)?;
        config.validate(&file)?;
        let secret = config.read_secret(path, &file)?;
        Ok(Loaded {
            path: path.to_owned(),
            config,
            secret,
        })
    }

    /// Parses YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| yaml_error(&e, file))
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        self.validate_addresses(file)?;
        self.validate_control(file)?;
        self.validate_cores_and_ports(file)?;
        self.validate_sizes(file)?;
        self.validate_services(file)
    }

    /// The cluster and node MACs.
    fn validate_addresses(&self, file: &str) -> Result<(), ConfigError> {
        let err = problem(file);
        if !self.cluster.mac.is_unicast() || self.cluster.mac == EthernetAddress::ZERO {
            return Err(err(
                "cluster.mac",
                format!("{} is not a unicast address", self.cluster.mac),
                "use a locally administered unicast MAC such as 02:cc:00:00:00:01",
            ));
        }
        if !self.node.mac.is_unicast() || self.node.mac == EthernetAddress::ZERO {
            return Err(err(
                "node.mac",
                format!("{} is not a unicast address", self.node.mac),
                "use a unique locally administered unicast MAC such as 02:00:00:00:00:01",
            ));
        }
        if self.node.mac == self.cluster.mac {
            return Err(err(
                "node.mac",
                "the node MAC equals the cluster MAC: the switch would learn the cluster MAC on \
                 this node's port and the other nodes would stop hearing the cluster"
                    .into(),
                "give the node its own MAC, different from cluster.mac",
            ));
        }
        Ok(())
    }

    /// The control channel and the health check.
    fn validate_control(&self, file: &str) -> Result<(), ConfigError> {
        let err = problem(file);
        if self.control.dead_after == 0 {
            return Err(err(
                "control.dead_after",
                "0 intervals would declare every peer dead at once".into(),
                "use 3 (the default) or more",
            ));
        }
        if self.control.interval.0.is_zero() {
            return Err(err(
                "control.interval",
                "a zero heartbeat interval".into(),
                "use 100ms (the default)",
            ));
        }
        if let Some(h) = &self.health {
            if h.rise == 0 || h.fall == 0 {
                return Err(err(
                    "health.rise",
                    "rise and fall must be at least 1".into(),
                    "use e.g. rise: 3, fall: 2",
                ));
            }
            if let Some(a6) = h.address6 {
                if !a6.is_ipv6() || a6.port() != h.address.port() {
                    return Err(err(
                        "health.address6",
                        format!(
                            "{a6} is not an IPv6 address on the port of health.address ({})",
                            h.address.port()
                        ),
                        "write the service's IPv6 address in brackets with the same port, like \
                         \"[2001:db8::1]:80\"",
                    ));
                }
            }
            if h.timeout.0 > h.interval.0 {
                return Err(err(
                    "health.timeout",
                    format!(
                        "{} is longer than the interval {}",
                        humantime::format_duration(h.timeout.0),
                        humantime::format_duration(h.interval.0)
                    ),
                    "make the timeout shorter than the interval",
                ));
            }
        }
        Ok(())
    }

    /// The packet cores and the two ports.
    fn validate_cores_and_ports(&self, file: &str) -> Result<(), ConfigError> {
        let err = problem(file);
        let dp = &self.dataplane;
        if dp.cores.is_empty() {
            return Err(err(
                "dataplane.cores",
                "no packet core".into(),
                "list at least one logical core, e.g. [1]",
            ));
        }
        let mut cores = dp.cores.clone();
        cores.sort_unstable();
        cores.dedup();
        if cores.len() != dp.cores.len() {
            return Err(err(
                "dataplane.cores",
                "a core is listed twice".into(),
                "list each logical core once",
            ));
        }
        for (key, spec) in [
            ("dataplane.wire_port", &dp.wire_port),
            ("dataplane.host_port", &dp.host_port),
        ] {
            if spec.device_name().is_empty() {
                return Err(err(
                    key,
                    "empty device name".into(),
                    "write `vdev: net_af_packet0,iface=eth0` or `pci: 0000:01:00.0`",
                ));
            }
        }
        if dp.wire_port.device_name() == dp.host_port.device_name() {
            return Err(err(
                "dataplane.host_port",
                format!(
                    "same device as the wire port ({})",
                    dp.wire_port.device_name()
                ),
                "give each port its own device name, e.g. net_tap0 and net_af_packet1",
            ));
        }
        for (key, arg) in dp.eal_args.iter().map(|a| ("dataplane.eal_args", a)) {
            if [
                "-l",
                "--lcores",
                "-c",
                "--file-prefix",
                "--vdev",
                "-a",
                "--allow",
                "--main-lcore",
            ]
            .contains(&arg.split('=').next().unwrap_or(arg))
            {
                return Err(err(
                    key,
                    format!("`{arg}` is set from other keys"),
                    "set cores with dataplane.cores, ports with wire_port/host_port and the \
                     prefix with dataplane.file_prefix",
                ));
            }
        }
        Ok(())
    }

    /// Table, mbuf and pool sizes, and the EAL memory they need.
    fn validate_sizes(&self, file: &str) -> Result<(), ConfigError> {
        let err = problem(file);
        let dp = &self.dataplane;
        if !(1024..=1 << 26).contains(&dp.flow_capacity) {
            return Err(err(
                "dataplane.flow_capacity",
                format!("{} flows per core is out of range", dp.flow_capacity),
                "use 1024 to 67108864 (262144 is the default)",
            ));
        }
        if !(384..=16384).contains(&dp.mbuf_size) {
            return Err(err(
                "dataplane.mbuf_size",
                format!("{} bytes per mbuf is out of range", dp.mbuf_size),
                "use 384 (frames up to 256 bytes) to 16384; 2176 (the default) holds a \
                 1518-byte frame",
            ));
        }
        if dp.pool_size < 1024 {
            return Err(err(
                "dataplane.pool_size",
                format!("{} mbufs cannot fill the RX rings and bursts", dp.pool_size),
                "use at least 1024 (8191 is the default)",
            ));
        }
        let needed = u64::from(dp.rx_descriptors) * 2 * dp.cores.len() as u64 + 512;
        if u64::from(dp.pool_size) < needed {
            return Err(err(
                "dataplane.pool_size",
                format!(
                    "{} mbufs cannot fill {} RX descriptors on 2 ports x {} cores plus bursts in \
                     flight",
                    dp.pool_size,
                    dp.rx_descriptors,
                    dp.cores.len()
                ),
                &format!("raise pool_size to at least {needed} or lower rx_descriptors"),
            ));
        }
        if let Some(mib) = dp.eal_memory_mib() {
            let pool_mib = (u64::from(dp.pool_size) * dp.mbuf_footprint()).div_ceil(1 << 20);
            // The EAL itself needs some memory besides the pool (rings, ethdev, tap queues).
            let eal_overhead_mib = 64;
            if pool_mib + eal_overhead_mib > mib {
                return Err(err(
                    "dataplane.pool_size",
                    format!(
                        "{} mbufs need about {pool_mib} MiB but the EAL gets only {mib} MiB (-m) \
                         of which ~{eal_overhead_mib} MiB go to the EAL itself",
                        dp.pool_size
                    ),
                    &format!(
                        "lower pool_size to at most {} or raise `-m` in eal_args to {}",
                        (mib.saturating_sub(eal_overhead_mib) << 20) / dp.mbuf_footprint(),
                        pool_mib + eal_overhead_mib
                    ),
                ));
            }
        }
        Ok(())
    }

    fn read_secret(&self, config_path: &Path, file: &str) -> Result<Vec<u8>, ConfigError> {
        // A relative secret path is relative to the config file, like an include.
        let path = if self.cluster.secret_file.is_relative() {
            config_path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&self.cluster.secret_file)
        } else {
            self.cluster.secret_file.clone()
        };
        let err = |problem: String, fix: &str| ConfigError {
            file: file.to_owned(),
            key: "cluster.secret_file".into(),
            problem,
            fix: fix.to_owned(),
        };
        let secret = std::fs::read(&path).map_err(|e| {
            err(
                format!("cannot read {}: {e}", path.display()),
                "create it with `head -c 32 /dev/urandom > FILE; chmod 600 FILE` and copy the \
                 same file to every node",
            )
        })?;
        let secret = trim_ascii(&secret).to_vec();
        if secret.len() < MIN_SECRET_LEN {
            return Err(err(
                format!(
                    "{} holds {} bytes; at least {MIN_SECRET_LEN} are needed",
                    path.display(),
                    secret.len()
                ),
                "fill it with `head -c 32 /dev/urandom > FILE`",
            ));
        }
        Ok(secret)
    }

    /// The effective configuration as YAML (defaults filled in), for `clonecluster check`.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    // A secret written with `echo` ends in a newline that the other nodes' copies may lack.
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &b[..end]
}

/// A [`ConfigError`] maker for one file: `err(key, problem, fix)`.
fn problem(file: &str) -> impl Fn(&str, String, &str) -> ConfigError + '_ {
    move |key, problem, fix| ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        problem,
        fix: fix.to_owned(),
    }
}

/// Turns a serde error into one that names the key and says what to do.
fn yaml_error(e: &serde_path_to_error::Error<serde_norway::Error>, file: &str) -> ConfigError {
    let inner = e.inner();
    let at = inner
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    // serde_norway may prefix the message with the enclosing key and end it with a location;
    // the path and the location are given separately here.
    let mut msg = inner.to_string();
    if let Some((head, _)) = msg.rsplit_once(" at line ") {
        msg = head.to_owned();
    }
    if let Some((head, rest)) = msg.split_once(": ") {
        if !head.contains(' ') {
            msg = rest.to_owned();
        }
    }
    let mut key = e.path().to_string();
    if key == "." {
        key.clear();
    }
    // The lab example has no services: appliance mode's keys are shown in its own example.
    let example = if key.starts_with("services") || key.starts_with("unmatched") {
        "conf/appliance-node.yaml"
    } else {
        "conf/lab-node.yaml"
    };
    let fix = if msg.starts_with("unknown field") {
        let expected = msg
            .split_once("expected ")
            .map(|(_, x)| x.to_owned())
            .unwrap_or_default();
        format!("remove or rename the key; allowed here: {expected}")
    } else if msg.starts_with("missing field") {
        format!("add the key; see {example} for a commented example")
    } else if let Some((_, fix)) = msg.split_once("; ") {
        fix.to_owned()
    } else {
        format!("see {example} for the expected shape and types")
    };
    if msg.starts_with("missing field") || msg.starts_with("unknown field") {
        // The path points at the enclosing map; name the key itself.
        let name = msg.split('`').nth(1).unwrap_or("?");
        if !key.is_empty() && msg.starts_with("unknown field") {
            // serde_path_to_error already appended the unknown key.
        } else if key.is_empty() {
            key = name.to_owned();
        } else {
            key = format!("{key}.{name}");
        }
    }
    if key.is_empty() {
        key = "(top level)".to_owned();
    }
    ConfigError {
        file: file.to_owned(),
        key,
        problem: format!("{msg}{at}"),
        fix,
    }
}

/// The `health` section of a node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `GET path` on `address` must answer with `expect_status`. Leave out `http_path` for a
    /// plain TCP connect check.
    pub address: SocketAddr,
    /// A dual-stack service (`cluster.ip6`): the same check on its IPv6 address too, on the
    /// same port (`"[2001:db8::1]:80"`). The service counts as answering only when both
    /// addresses answer, and refusals are held back on IPv6 as on IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    #[serde(default = "health_status")]
    pub expect_status: u16,
    #[serde(default = "health_interval")]
    pub interval: Span,
    /// The interval while a verdict is changing (after a first failure or success, or a
    /// refused connection seen on the data path). Default: a quarter of `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_interval: Option<Span>,
    #[serde(default = "health_timeout")]
    pub timeout: Span,
    /// Consecutive successes that make a failing service healthy again.
    #[serde(default = "health_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy service failing.
    #[serde(default = "health_fall")]
    pub fall: u32,
}

fn health_status() -> u16 {
    200
}
fn health_interval() -> Span {
    Span(Duration::from_millis(500))
}
fn health_timeout() -> Span {
    Span(Duration::from_millis(300))
}
fn health_rise() -> u32 {
    3
}
fn health_fall() -> u32 {
    2
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const LAB: &str = r#"
cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  eal_args: [--no-huge, -m, "256"]
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
  idle: adaptive
  pool_size: 4095
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(text, "t.yaml")?;
        c.validate("t.yaml")?;
        Ok(c)
    }

    #[test]
    fn lab_config_parses_with_defaults() {
        let c = parse(LAB).unwrap();
        assert_eq!(c.cluster.ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(c.cluster.mac.0, [2, 0xcc, 0, 0, 0, 1]);
        assert_eq!(c.node.weight.get(), 100);
        assert_eq!(c.control.interval.0, Duration::from_millis(100));
        assert_eq!(c.dataplane.idle, IdleMode::Adaptive);
        assert_eq!(c.dataplane.wire_port.device_name(), "net_af_packet0");
        assert_eq!(c.dataplane.eal_memory_mib(), Some(256));
        assert_eq!(c.dataplane.file_prefix(1), "clonecluster-node1");
        // The effective config round-trips.
        let again = parse(&c.to_yaml()).unwrap();
        assert_eq!(again.to_yaml(), c.to_yaml());
    }

    /// A new check must not refuse what the examples show (the secret is not read here).
    #[test]
    fn the_example_configs_pass_the_checks() {
        for (name, text) in [
            ("lab-node.yaml", include_str!("../../../conf/lab-node.yaml")),
            ("pci-node.yaml", include_str!("../../../conf/pci-node.yaml")),
            (
                "appliance-node.yaml",
                include_str!("../../../conf/appliance-node.yaml"),
            ),
        ] {
            if let Err(e) = Config::parse(text, name).and_then(|c| c.validate(name)) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn unknown_key_is_named_with_allowed_keys() {
        let e = parse(&LAB.replace("  id: 1", "  id: 1\n  colour: blue")).unwrap_err();
        assert_eq!(e.key, "node.colour");
        assert!(e.fix.contains("mac"), "{e}");
    }

    #[test]
    fn hash_lanes_default_and_choices() {
        let c = parse(LAB).unwrap();
        assert_eq!(c.dataplane.hash_lanes, HashLanes::Auto);
        let c = parse(&LAB.replace("  idle: adaptive", "  idle: adaptive\n  hash_lanes: avx512"))
            .unwrap();
        assert_eq!(c.dataplane.hash_lanes, HashLanes::Avx512);
        let e = parse(&LAB.replace("  idle: adaptive", "  idle: adaptive\n  hash_lanes: sse9"))
            .unwrap_err();
        assert_eq!(e.key, "dataplane.hash_lanes", "{e}");
        assert!(
            e.problem.contains("`scalar`") && e.fix.contains("lab-node.yaml"),
            "{e}"
        );
    }

    #[test]
    fn bad_mac_names_key_and_shape() {
        let e = parse(&LAB.replace("02:00:00:00:00:01", "02:00:00:00:01")).unwrap_err();
        assert_eq!(e.key, "node.mac", "{e}");
        assert!(e.fix.contains("02:cc:00:00:00:01"), "{e}");
    }

    #[test]
    fn bad_duration_and_missing_key() {
        let e = parse(&format!("{LAB}control:\n  interval: fast\n")).unwrap_err();
        assert_eq!(e.key, "control.interval", "{e}");
        let e = parse(&LAB.replace("  mac: 02:cc:00:00:00:01\n", "")).unwrap_err();
        assert_eq!(e.key, "cluster.mac", "{e}");
    }

    #[test]
    fn semantic_errors() {
        let e = parse(&LAB.replace("id: 1", "id: 65")).unwrap_err();
        assert_eq!(e.key, "node.id");
        let e = parse(&LAB.replace("02:00:00:00:00:01", "02:cc:00:00:00:01")).unwrap_err();
        assert_eq!(e.key, "node.mac");
        let e = parse(&LAB.replace("pool_size: 4095", "pool_size: 200000")).unwrap_err();
        assert_eq!(e.key, "dataplane.pool_size");
        assert!(e.fix.contains("-m"), "{e}");
        let e = parse(&LAB.replace("[--no-huge,", "[--no-huge, -l, \"0\",")).unwrap_err();
        assert_eq!(e.key, "dataplane.eal_args");
    }

    #[test]
    fn health_checks_an_ipv6_address_on_the_same_port() {
        let health = |a6: &str| {
            format!(
                "{LAB}health:\n  address: 198.18.0.1:80\n  address6: \"{a6}\"\n  http_path: /\n"
            )
        };
        let c = parse(&health("[2001:2::1]:80")).unwrap();
        let h = c.health.as_ref().unwrap();
        assert_eq!(h.address6, Some("[2001:2::1]:80".parse().unwrap()));
        assert_eq!(
            h.addresses().collect::<Vec<_>>(),
            ["198.18.0.1:80".parse().unwrap(), h.address6.unwrap()]
        );
        // It round-trips; without it, nothing is written.
        let again = parse(&c.to_yaml()).unwrap();
        assert_eq!(again.to_yaml(), c.to_yaml());
        assert!(!parse(LAB).unwrap().to_yaml().contains("address6"));
        for bad in ["[2001:2::1]:8080", "198.18.0.2:80"] {
            let e = parse(&health(bad)).unwrap_err();
            assert_eq!(e.key, "health.address6", "{bad}: {e}");
        }
    }

    #[test]
    fn mac_parse() {
        assert_eq!(
            "02:CC:00:00:00:0a".parse::<EthernetAddress>().unwrap().0[5],
            10
        );
        assert!("02:cc:00:00:00".parse::<EthernetAddress>().is_err());
        assert!("02:cc:00:00:00:00:00".parse::<EthernetAddress>().is_err());
        assert!("02:cc:00:00:00:0g".parse::<EthernetAddress>().is_err());
    }
}
