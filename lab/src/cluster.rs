//! A running lab cluster: the topology, and per node either the engine with nginx behind its
//! tap (`Kind::Engine`) or the kernel-only clone cluster with nginx on `eth0`
//! (`Kind::Kernel`), plus the questions the lab asks it (status, traffic delivered). An engine
//! cluster can run dual-stack ([`Cluster::start_with`]): the cluster's IPv6 address beside the
//! IPv4 one on every node, and on the client.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::services::{
    configure_host_port, configure_host_port6, engine_config, start_engine, start_nginx,
    start_nginx_dual, EngineOptions,
};
use super::topology::{control_ip, Topology};
use super::Programs;
use clonecluster::control::operator::{self, Request, Status};
use clonecluster::control::Phase;

/// What runs on the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The engine with this load policy (`hash` or `by-load`).
    Engine(String),
    /// The nftables clone cluster, no engine.
    Kernel,
    /// One node with `dpdk-testpmd` io instead of the engine: the ports' ceiling; `true`: the
    /// wire port is `net_af_xdp` rather than `net_af_packet`.
    Testpmd(bool),
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Engine(_) => "engine",
            Kind::Kernel => "kernel",
            Kind::Testpmd(_) => "testpmd",
        }
    }
}

/// Size of the file `/big` each nginx serves, in KiB.
const BIG_KIB: usize = 64;

#[derive(Debug)]
pub struct Cluster {
    pub topo: Topology,
    pub kind: Kind,
    /// Every node the cluster may have (engine configs list them all as peers).
    pub all_ids: Vec<u8>,
    /// The cluster's IPv6 address, if it runs dual-stack.
    pub ip6: Option<Ipv6Addr>,
    /// Engine PIDs by node.
    pub engines: Vec<(u8, u32)>,
    /// nginx PIDs by node.
    nginx: Vec<(u8, u32)>,
    /// Engine starts so far, by node (a restart logs to a new file).
    runs: Vec<(u8, u32)>,
    dir: tempfile::TempDir,
    /// Engine logs go to `<log_prefix>-node<ID>.log`.
    log_prefix: PathBuf,
    programs: Programs,
}

impl Cluster {
    /// Builds the topology and starts the nodes in `start` (a subset of `all_ids`; the rest can
    /// join later with [`Cluster::start_node`]).
    pub fn start(
        programs: &Programs,
        prefix: &str,
        kind: Kind,
        all_ids: &[u8],
        start: &[u8],
        log_prefix: PathBuf,
    ) -> Result<Cluster, String> {
        Cluster::start_with(programs, prefix, kind, all_ids, start, log_prefix, None)
    }

    /// [`Cluster::start`], dual-stack if `ip6` is given (engine clusters only): the client gets
    /// its IPv6 address ([`Topology::client_ipv6`]), every node's engine `cluster.ip6` and the
    /// IPv6 health check (`health.address6`), its tap the address
    /// ([`configure_host_port6`]) and its nginx a second `listen` on it; the probe sends half
    /// its connections there.
    pub fn start_with(
        programs: &Programs,
        prefix: &str,
        kind: Kind,
        all_ids: &[u8],
        start: &[u8],
        log_prefix: PathBuf,
        ip6: Option<Ipv6Addr>,
    ) -> Result<Cluster, String> {
        if ip6.is_some() && !matches!(kind, Kind::Engine(_)) {
            return Err(format!(
                "only engine clusters run dual-stack, not {}",
                kind.label()
            ));
        }
        let topo = Topology::build(prefix, &[])?;
        if ip6.is_some() {
            topo.client_ipv6()?;
        }
        let dir = tempfile::Builder::new()
            .prefix("cclab")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let mut c = Cluster {
            topo,
            kind,
            all_ids: all_ids.to_vec(),
            ip6,
            engines: Vec::new(),
            nginx: Vec::new(),
            runs: Vec::new(),
            dir,
            log_prefix,
            programs: programs.clone(),
        };
        for &id in start {
            c.start_node(id)?;
        }
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds node `id` to the network and starts what runs on it.
    pub fn start_node(&mut self, id: u8) -> Result<(), String> {
        match self.kind.clone() {
            Kind::Engine(_) => {
                let ns = self.topo.add_node(id)?;
                self.start_engine(id, &ns)?;
            }
            Kind::Kernel => {
                let count = self.all_ids.len() as u8;
                let index = self.all_ids.iter().position(|&i| i == id).unwrap_or(0) as u8;
                let ns = self.topo.add_kernel_node(id, index, count)?;
                let nginx = start_nginx(&ns, self.dir.path(), id, BIG_KIB)
                    .map_err(|e| format!("cannot start nginx on node {id}: {e}"))?;
                self.topo.adopt(nginx);
            }
            Kind::Testpmd(xdp) => {
                let ns = self.topo.add_node(id)?;
                let log = PathBuf::from(format!("{}-testpmd{id}.log", self.log_prefix.display()));
                let testpmd = super::ceiling::start_testpmd(&ns, id, xdp, &log)?;
                self.topo.adopt(testpmd);
                super::ceiling::configure_tap(&ns, Duration::from_secs(30))
                    .map_err(|e| format!("{e} (see {})", log.display()))?;
                let nginx = start_nginx(&ns, self.dir.path(), id, BIG_KIB)
                    .map_err(|e| format!("cannot start nginx on node {id}: {e}"))?;
                self.topo.adopt(nginx);
            }
        }
        Ok(())
    }

    /// Starts node `id`'s engine (again) in its namespace, then nginx behind it (a restart
    /// stops the node's earlier nginx first).
    fn start_engine(&mut self, id: u8, ns: &super::topology::Ns) -> Result<(), String> {
        let Kind::Engine(policy) = self.kind.clone() else {
            return Err("kernel nodes run no engine".into());
        };
        let opts = EngineOptions {
            policy: if policy == "by-load" {
                "by-load"
            } else {
                "hash"
            },
            ip6: self.ip6,
            ..EngineOptions::default()
        };
        let cfg = engine_config(self.dir.path(), id, &self.all_ids, &opts)
            .map_err(|e| format!("cannot write node {id}'s config: {e}"))?;
        let run = match self.runs.iter_mut().find(|(i, _)| *i == id) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.runs.push((id, 1));
                1
            }
        };
        let log = if run == 1 {
            PathBuf::from(format!("{}-node{id}.log", self.log_prefix.display()))
        } else {
            PathBuf::from(format!(
                "{}-node{id}-run{run}.log",
                self.log_prefix.display()
            ))
        };
        let engine = start_engine(&self.programs.engine, ns, &cfg, &log)
            .map_err(|e| format!("cannot start node {id}'s engine: {e}"))?;
        let pid = self.topo.adopt(engine);
        self.engines.retain(|(i, _)| *i != id);
        self.engines.push((id, pid));
        configure_host_port(ns, Duration::from_secs(30))
            .map_err(|e| format!("{e} (see {})", log.display()))?;
        if let Some(ip6) = self.ip6 {
            configure_host_port6(ns, ip6)?;
        }
        if let Some(pos) = self.nginx.iter().position(|(i, _)| *i == id) {
            let (_, old) = self.nginx.remove(pos);
            self.topo.kill(old);
        }
        let nginx = match self.ip6 {
            Some(ip6) => start_nginx_dual(ns, self.dir.path(), id, BIG_KIB, ip6),
            None => start_nginx(ns, self.dir.path(), id, BIG_KIB),
        }
        .map_err(|e| format!("cannot start nginx on node {id}: {e}"))?;
        let pid = self.topo.adopt(nginx);
        self.nginx.push((id, pid));
        Ok(())
    }

    /// Starts node `id`'s engine again after it died, in the same namespace (its counters in
    /// the namespace, such as the lab's nftables ones, survive).
    pub fn restart_engine(&mut self, id: u8) -> Result<(), String> {
        let ns = self
            .topo
            .node(id)
            .cloned()
            .ok_or_else(|| format!("no node {id}"))?;
        self.start_engine(id, &ns)
    }

    /// Kills node `id`'s engine (SIGKILL, no goodbye).
    pub fn kill_engine(&mut self, id: u8) -> Result<(), String> {
        let pid = self
            .engine_pid(id)
            .ok_or_else(|| format!("node {id} runs no engine"))?;
        self.topo.kill(pid);
        self.engines.retain(|(i, _)| *i != id);
        Ok(())
    }

    /// Takes node `id` off both networks (its wire and control links down: a pulled cable), or
    /// puts it back.
    pub fn set_links(&self, id: u8, up: bool) -> Result<(), String> {
        let ns = self.topo.node(id).ok_or_else(|| format!("no node {id}"))?;
        let state = if up { "up" } else { "down" };
        for link in ["eth0", "ctl0"] {
            ns.run(&["ip", "link", "set", link, state])?;
        }
        Ok(())
    }

    /// Takes node `id`'s wire link down (its control network stays up), or puts it back.
    pub fn set_wire(&self, id: u8, up: bool) -> Result<(), String> {
        let ns = self.topo.node(id).ok_or_else(|| format!("no node {id}"))?;
        ns.run(&["ip", "link", "set", "eth0", if up { "up" } else { "down" }])
            .map(|_| ())
    }

    /// Starts the connection probe (`lab-probe`) in the client namespace against the cluster
    /// address (and, dual-stack, its IPv6 address: half the connections) for `duration`,
    /// writing its record to `out`; returns its PID (adopted).
    pub fn start_probe(&mut self, duration: Duration, out: &Path) -> Result<u32, String> {
        let mut args = vec![
            self.programs.probe.to_string_lossy().into_owned(),
            "lab-probe".to_owned(),
            "--target".to_owned(),
            format!("{}:80", super::topology::CLUSTER_IP),
            "--duration-ms".to_owned(),
            duration.as_millis().to_string(),
        ];
        if let Some(ip6) = self.ip6 {
            args.extend(["--target6".to_owned(), format!("[{ip6}]:80")]);
        }
        args.push("--out".to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let probe = self
            .topo
            .client
            .command(&args)
            .arg(out)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the probe: {e}"))?;
        Ok(self.topo.adopt(probe))
    }

    /// Waits (up to `grace`) for the probe started by [`Cluster::start_probe`] to end on its
    /// own; kills it and fails if it does not.
    pub fn finish_probe(
        &mut self,
        pid: u32,
        grace: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        let mut probe = self.topo.release(pid).ok_or("the probe is gone")?;
        let deadline = Instant::now() + grace;
        loop {
            match probe.try_wait() {
                Ok(Some(_)) => return Ok(()),
                _ if Instant::now() > deadline || interrupted() => {
                    let _ = probe.kill();
                    let _ = probe.wait();
                    return Err("the probe did not finish".into());
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Node `id`'s `/metrics` page (empty if it does not answer).
    pub fn metrics(&self, id: u8) -> String {
        let Some(ns) = self.topo.node(id) else {
            return String::new();
        };
        let url = format!("http://{}:9100/metrics", control_ip(id));
        ns.run(&["curl", "-s", "-m", "3", &url]).unwrap_or_default()
    }

    /// Resident memory of node `id`'s engine, KiB (from `/proc`).
    pub fn engine_rss_kib(&self, id: u8) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.engine_pid(id)?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub fn engine_pid(&self, id: u8) -> Option<u32> {
        self.engines.iter().find(|(i, _)| *i == id).map(|(_, p)| *p)
    }

    pub fn socket(&self, id: u8) -> PathBuf {
        self.dir.path().join(format!("node{id}.sock"))
    }

    /// Node `id`'s `status`, if it answers.
    pub fn status(&self, id: u8) -> Option<Status> {
        operator::status(&self.socket(id)).ok()
    }

    /// Drains (`drain`) or undrains node `id` through its own socket.
    pub fn drain(&self, id: u8, drain: bool) -> Result<(), String> {
        let request = Request::Drain {
            node: None,
            drain,
            deadline: None,
        };
        operator::call(&self.socket(id), &request)
            .map(drop)
            .map_err(|e| format!("{request} node {id}: {e}"))
    }

    /// Whether every node in `ids` sees exactly `ids` as members, with nothing moving.
    pub fn formed(&self, ids: &[u8]) -> bool {
        ids.iter().all(|&id| {
            self.status(id).is_some_and(|s| {
                s.phase == Phase::Done
                    && s.moving == 0
                    && s.members.len() == ids.len()
                    && ids.iter().all(|i| s.member_ids().contains(i))
            })
        })
    }

    /// Whether every node in `ask` sees exactly `expect` as members (a draining node has left
    /// them) and sends every new flow to its final owner (the handoff reached Acquire; the old
    /// owners still serve the connections they had, until they end: a plan completes at
    /// `release_deadline` at the latest, leaving the rest to them).
    pub fn moved(&self, ask: &[u8], expect: &[u8]) -> bool {
        ask.iter().all(|&id| {
            self.status(id).is_some_and(|s| {
                let m = s.member_ids();
                m.len() == expect.len()
                    && expect.iter().all(|i| m.contains(i))
                    && s.members
                        .iter()
                        .all(|x| x.accepting_buckets == x.final_buckets)
            })
        })
    }

    /// Waits until [`Cluster::formed`] (kernel clusters have nothing to form).
    pub fn wait_formed(
        &self,
        ids: &[u8],
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        if matches!(self.kind, Kind::Kernel | Kind::Testpmd(_)) {
            return Ok(Duration::ZERO);
        }
        while !self.formed(ids) {
            if interrupted() {
                return Err("interrupted".into());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the cluster of nodes {} did not form within {} s (engine logs: \
                     {}-node*.log)",
                    super::report::node_list(ids),
                    timeout.as_secs(),
                    self.log_prefix.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Traffic each node delivered to its own kernel so far: frames the engine sent to its
    /// host port (from `/metrics`), or, on kernel nodes, TCP segments the kernel accepted.
    pub fn delivered(&self) -> Vec<(u8, u64)> {
        self.topo
            .nodes
            .iter()
            .map(|(id, ns)| {
                let n = match self.kind {
                    Kind::Engine(_) => {
                        let url = format!("http://{}:9100/metrics", control_ip(*id));
                        let out = ns.run(&["curl", "-s", "-m", "3", &url]).unwrap_or_default();
                        out.lines()
                            .filter(|l| l.starts_with("clonecluster_host_tx_frames_total{"))
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                            .sum()
                    }
                    Kind::Kernel | Kind::Testpmd(_) => {
                        let snmp = ns.run(&["cat", "/proc/net/snmp"]).unwrap_or_default();
                        tcp_in_segments(&snmp).unwrap_or(0)
                    }
                };
                (*id, n)
            })
            .collect()
    }
}

impl Cluster {
    /// Every engine log of this cluster (restarts included), as (path, text).
    pub fn logs(&self) -> Vec<(String, String)> {
        let prefix = self.log_prefix.display().to_string();
        let mut logs = Vec::new();
        for (id, runs) in &self.runs {
            for run in 1..=*runs {
                let path = if run == 1 {
                    format!("{prefix}-node{id}.log")
                } else {
                    format!("{prefix}-node{id}-run{run}.log")
                };
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                logs.push((path, text));
            }
        }
        logs
    }

    /// Times an engine declared a peer dead so far (from the engines' JSON logs).
    pub fn peer_deaths(&self) -> usize {
        self.engines
            .iter()
            .map(|(id, _)| {
                let log = format!("{}-node{id}.log", self.log_prefix.display());
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(r#""message":"peer dead""#))
                    .count()
            })
            .sum()
    }
}

/// `InSegs` of the `Tcp:` lines of `/proc/net/snmp`.
pub fn tcp_in_segments(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let i = names.iter().position(|&n| n == "InSegs")?;
    values.get(i)?.parse().ok()
}

/// Shares of `after - before` per node.
pub fn shares(before: &[(u8, u64)], after: &[(u8, u64)]) -> Vec<(u8, f64)> {
    let delta: Vec<(u8, u64)> = after
        .iter()
        .map(|&(id, a)| {
            let b = before.iter().find(|(i, _)| *i == id).map_or(0, |x| x.1);
            (id, a.saturating_sub(b))
        })
        .collect();
    let sum: u64 = delta.iter().map(|(_, d)| d).sum();
    delta
        .iter()
        .map(|&(id, d)| (id, if sum == 0 { 0.0 } else { d as f64 / sum as f64 }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_segments() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin InSegs OutSegs\n\
                    Tcp: 1 200 12345 999\nUdp: InDatagrams\nUdp: 3\n";
        assert_eq!(tcp_in_segments(snmp), Some(12345));
        assert_eq!(tcp_in_segments("nothing"), None);
    }

    #[test]
    fn shares_of_deltas() {
        let s = shares(&[(1, 10), (2, 0)], &[(1, 40), (2, 30), (3, 0)]);
        assert_eq!(s, vec![(1, 0.5), (2, 0.5), (3, 0.0)]);
        assert_eq!(shares(&[], &[(1, 0)]), vec![(1, 0.0)]);
    }
}
