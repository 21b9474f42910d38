//! A running appliance lab: the topology with M backends (nginx with the cluster address on
//! loopback, serving files that name them: `/id` answers 10 + the backend's index) and, in
//! front of them, what [`Dispatch`] says: nothing (the client talks to one backend alone), the
//! kernel director, HAProxy, or a clone cluster of engine appliances forwarding by DSR. Plus
//! the questions the lab asks it (status, frames forwarded, segments each backend received,
//! which client ports a node owns) and the load it starts (probe, long downloads).
//!
//! It starts processes only in the lab's namespaces and adopts them into the [`Topology`], which
//! stops them by PID and removes the namespaces when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clonecluster::control::operator::{self, Proto, Reply, Request, Status};

use super::cluster::tcp_in_segments;
use super::dispatch::{director_rules, load_nft, start_haproxy};
use super::services::{
    configure_host_port_as, engine_config, start_engine, start_nginx_on, EngineOptions,
};
use super::topology::{backend_ip, backend_mac, control_ip, Ns, Topology, CLIENT_IP, CLUSTER_IP};
use super::Programs;

/// What stands in front of the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Backend 1 alone answers the cluster address itself (it answers ARP for it).
    Alone,
    /// The kernel director (nftables, DSR).
    Director,
    /// HAProxy in TCP mode.
    Haproxy,
    /// A clone cluster of engine appliances (DSR).
    Appliances,
}

impl Dispatch {
    pub fn label(self) -> &'static str {
        match self {
            Dispatch::Alone => "alone",
            Dispatch::Director => "director",
            Dispatch::Haproxy => "haproxy",
            Dispatch::Appliances => "appliances",
        }
    }
}

/// The backends' `/id`: 10 + the backend's index.
pub const fn backend_id(index: u8) -> u8 {
    10 + index
}

/// Size of the `/big` file each backend serves (long downloads), KiB.
pub const BIG_KIB: usize = 2048;

/// Appliance node `id`'s own address (the outer source of encapsulated delivery).
pub fn node_ip(id: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(198, 18, 0, 10 + id)
}

/// The `services:` list of the appliance lab: port 80 of the cluster address forwarded by DSR
/// to `backends`; every backend's MAC configured but the last one's, left to ARP. With `health`,
/// every appliance checks every backend (`GET /id` every 200 ms, 2 failures to fall, 2 successes
/// to rise); without, backends are taken as healthy.
pub fn dsr_service(backends: &[u8], health: bool) -> String {
    let last = backends.last().copied();
    let lines: String = backends
        .iter()
        .map(|&i| {
            if Some(i) == last {
                format!("      - {{ name: b{i}, ip: {} }}\n", backend_ip(i))
            } else {
                format!(
                    "      - {{ name: b{i}, ip: {}, mac: \"{}\" }}\n",
                    backend_ip(i),
                    backend_mac(i)
                )
            }
        })
        .collect();
    let check = if health {
        "    backend_health: { port: 80, http_path: /id, interval: 200ms, timeout: 200ms, \
         rise: 2, fall: 2 }\n"
    } else {
        ""
    };
    format!(
        "services:\n  - name: web\n    addresses: [{CLUSTER_IP}]\n    ports: [80]\n    \
         delivery: dsr\n{check}    backends:\n{lines}"
    )
}

/// Writes appliance node `id`'s config into `dir`: the lab's engine config without its local
/// health check (the node's kernel serves nothing), with the node's own address and `services`.
pub fn appliance_config(dir: &Path, id: u8, ids: &[u8], services: &str) -> Result<PathBuf, String> {
    let path = engine_config(dir, id, ids, &EngineOptions::default())
        .map_err(|e| format!("cannot write node {id}'s config: {e}"))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (Some(h0), Some(h1)) = (text.find("health:\n"), text.find("dataplane:\n")) else {
        return Err("the lab's engine config has no health: block before dataplane:".into());
    };
    let mut text = format!("{}{}", &text[..h0], &text[h1..]);
    text = text.replace(
        &format!("  id: {id}\n"),
        &format!("  id: {id}\n  ip: {}\n", node_ip(id)),
    );
    text.push_str(services);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Takes the PID of `id` out of a list of (id, PID).
fn take_pid(pids: &mut Vec<(u8, u32)>, id: u8) -> Option<u32> {
    let pos = pids.iter().position(|(i, _)| *i == id)?;
    Some(pids.remove(pos).1)
}

#[derive(Debug)]
pub struct ApplianceLab {
    pub topo: Topology,
    pub dispatch: Dispatch,
    /// Backend indexes.
    pub backends: Vec<u8>,
    /// Every appliance the cluster may have.
    pub all_ids: Vec<u8>,
    /// Engine PIDs by appliance.
    pub engines: Vec<(u8, u32)>,
    /// nginx PIDs by backend.
    nginx: Vec<(u8, u32)>,
    /// The appliances check the backends' health (`GET /id` every 200 ms, fall and rise 2).
    health: bool,
    /// More entries of the `services:` list (YAML list items), after the DSR web service, for
    /// the appliances started from now on (the encapsulation step's `gue` and `ipip`).
    pub extra_services: String,
    /// The dispatcher's namespace and (HAProxy) process.
    pub dispatcher: Option<Ns>,
    haproxy: Option<u32>,
    dir: tempfile::TempDir,
    /// Logs go to `<log_prefix>-node<ID>.log` (and `-haproxy.log`).
    log_prefix: PathBuf,
    programs: Programs,
}

/// What an [`ApplianceLab`] starts with.
#[derive(Debug, Clone, Copy)]
pub struct LabPlan<'a> {
    pub dispatch: Dispatch,
    /// Backends (one when the backend stands alone).
    pub backends: u8,
    /// Every appliance the cluster may have.
    pub all_ids: &'a [u8],
    /// The appliances started at once (a subset of `all_ids`; the rest can join with
    /// `start_node`).
    pub start: &'a [u8],
    /// The appliances check the backends' health.
    pub health: bool,
}

impl ApplianceLab {
    /// Builds the topology of `plan`, then starts its dispatcher or the appliances it starts
    /// with.
    pub fn start(
        programs: &Programs,
        prefix: &str,
        plan: LabPlan<'_>,
        log_prefix: PathBuf,
    ) -> Result<ApplianceLab, String> {
        let LabPlan {
            dispatch,
            backends,
            all_ids,
            start,
            health,
        } = plan;
        let topo = Topology::build(prefix, &[])?;
        let dir = tempfile::Builder::new()
            .prefix("ccapplab")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let mut lab = ApplianceLab {
            topo,
            dispatch,
            backends: (1..=backends).collect(),
            all_ids: all_ids.to_vec(),
            engines: Vec::new(),
            nginx: Vec::new(),
            health,
            extra_services: String::new(),
            dispatcher: None,
            haproxy: None,
            dir,
            log_prefix,
            programs: programs.clone(),
        };
        let count = if dispatch == Dispatch::Alone {
            1
        } else {
            backends
        };
        lab.backends = (1..=count).collect();
        for i in lab.backends.clone() {
            let ns = lab.topo.add_backend(i)?;
            let nginx = start_nginx_on(&ns, lab.dir.path(), backend_id(i), BIG_KIB, "80")
                .map_err(|e| format!("cannot start nginx on backend {i}: {e}"))?;
            let pid = lab.topo.adopt(nginx);
            lab.nginx.push((i, pid));
        }
        match dispatch {
            Dispatch::Alone => {
                // The backend itself answers ARP for the cluster address.
                let ns = lab.topo.backend(1).cloned().ok_or("no backend 1")?;
                for dev in ["all", "eth0"] {
                    ns.run(&[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv4.conf.{dev}.arp_ignore=0"),
                    ])?;
                }
            }
            Dispatch::Director => {
                let ns = lab.topo.add_dispatcher()?;
                load_nft(&ns, &director_rules(&lab.backends))?;
                lab.dispatcher = Some(ns);
            }
            Dispatch::Haproxy => {
                let ns = lab.topo.add_dispatcher()?;
                let log = PathBuf::from(format!("{}-haproxy.log", lab.log_prefix.display()));
                let child = start_haproxy(&ns, lab.dir.path(), &lab.backends, &log)?;
                lab.haproxy = Some(lab.topo.adopt(child));
                lab.dispatcher = Some(ns);
            }
            Dispatch::Appliances => {
                for &id in start {
                    lab.start_node(id)?;
                }
            }
        }
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, id: u8) -> PathBuf {
        PathBuf::from(format!("{}-node{id}.log", self.log_prefix.display()))
    }

    pub fn socket(&self, id: u8) -> PathBuf {
        self.dir.path().join(format!("node{id}.sock"))
    }

    /// Adds appliance `id` to the network and starts its engine.
    pub fn start_node(&mut self, id: u8) -> Result<(), String> {
        let ns = self.topo.add_node(id)?;
        let services = dsr_service(&self.backends, self.health) + &self.extra_services;
        let cfg = appliance_config(self.dir.path(), id, &self.all_ids, &services)?;
        let log = self.log(id);
        let engine = start_engine(&self.programs.engine, &ns, &cfg, &log)
            .map_err(|e| format!("cannot start node {id}'s engine: {e}"))?;
        let pid = self.topo.adopt(engine);
        self.engines.push((id, pid));
        // The engine's tap comes up; the node's kernel serves nothing here: it holds the node's
        // own address, the source of its backend checks.
        configure_host_port_as(&ns, &format!("{}/24", node_ip(id)), Duration::from_secs(30))
            .map_err(|e| format!("{e} (see {})", log.display()))
    }

    /// Kills appliance `id`'s engine (SIGKILL, no goodbye).
    pub fn kill_engine(&mut self, id: u8) -> Result<(), String> {
        let pid = take_pid(&mut self.engines, id)
            .ok_or_else(|| format!("appliance {id} runs no engine"))?;
        self.topo.kill(pid);
        Ok(())
    }

    /// Kills backend `index`'s nginx (SIGKILL): its kernel resets its connections and refuses
    /// new ones.
    pub fn kill_backend(&mut self, index: u8) -> Result<(), String> {
        let pid = take_pid(&mut self.nginx, index)
            .ok_or_else(|| format!("backend {index} runs no nginx"))?;
        self.topo.kill(pid);
        Ok(())
    }

    /// Drains backend `index` through appliance `via`'s operator socket (`drain-backend bN`):
    /// the coordinator publishes the table without it for new flows; its flows stay.
    pub fn drain_backend(&self, via: u8, index: u8) -> Result<(), String> {
        let request = Request::DrainBackend {
            name: format!("b{index}"),
            drain: true,
        };
        operator::call(&self.socket(via), &request)
            .map(drop)
            .map_err(|e| format!("{request} through appliance {via}: {e}"))
    }

    /// Takes appliance `id`'s wire link down (its control network stays up), or puts it back.
    pub fn set_wire(&self, id: u8, up: bool) -> Result<(), String> {
        let ns = self
            .topo
            .node(id)
            .ok_or_else(|| format!("no appliance {id}"))?;
        ns.run(&["ip", "link", "set", "eth0", if up { "up" } else { "down" }])
            .map(drop)
    }

    /// The dispatcher dies: HAProxy is killed (SIGKILL); the kernel director's machine stops
    /// (its port goes down: it neither forwards nor answers ARP any more).
    pub fn kill_dispatcher(&mut self) -> Result<(), String> {
        if let Some(pid) = self.haproxy.take() {
            self.topo.kill(pid);
            return Ok(());
        }
        let ns = self.dispatcher.as_ref().ok_or("no dispatcher")?;
        ns.run(&["ip", "link", "set", "eth0", "down"]).map(drop)
    }

    pub fn status(&self, id: u8) -> Option<Status> {
        operator::status(&self.socket(id)).ok()
    }

    /// Waits until every appliance in `ids` sees exactly `ids` as members with nothing moving
    /// (dispatchers have nothing to form).
    pub fn wait_formed(
        &self,
        ids: &[u8],
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        if self.dispatch != Dispatch::Appliances {
            return Ok(Duration::ZERO);
        }
        let formed = |id: u8| {
            self.status(id).is_some_and(|s| {
                let mut m = s.member_ids();
                m.sort_unstable();
                m == ids && s.moving == 0
            })
        };
        while !ids.iter().all(|&id| formed(id)) {
            if interrupted() {
                return Err("interrupted".into());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the appliances {} did not form within {} s (engine logs: {}-node*.log)",
                    super::report::node_list(ids),
                    timeout.as_secs(),
                    self.log_prefix.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Waits until 5 fresh requests in a row are answered by backends (the appliances have
    /// resolved the backends' MACs; the dispatcher is up).
    pub fn wait_serving(
        &self,
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        let mut row = 0;
        while row < 5 {
            if interrupted() {
                return Err("interrupted".into());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the {} lab does not serve http://{CLUSTER_IP}/id within {} s",
                    self.dispatch.label(),
                    timeout.as_secs()
                ));
            }
            let url = format!("http://{CLUSTER_IP}/id");
            let ok = self
                .topo
                .client
                .run(&["curl", "-s", "-m", "2", &url])
                .is_ok_and(|body| body.trim().parse::<u8>().is_ok_and(|id| id > 10));
            row = if ok { row + 1 } else { 0 };
        }
        Ok(())
    }

    /// Frames each appliance forwarded to backends so far (`/metrics`).
    pub fn forwarded(&self) -> Vec<(u8, u64)> {
        self.topo
            .nodes
            .iter()
            .map(|(id, ns)| {
                let url = format!("http://{}:9100/metrics", control_ip(*id));
                let text = ns.run(&["curl", "-s", "-m", "3", &url]).unwrap_or_default();
                let n = text
                    .lines()
                    .filter(|l| l.starts_with("clonecluster_backend_frames_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum();
                (*id, n)
            })
            .collect()
    }

    /// TCP segments each backend's kernel received so far.
    pub fn backend_segments(&self) -> Vec<(u8, u64)> {
        self.topo
            .backends
            .iter()
            .map(|(i, ns)| {
                let snmp = ns.run(&["cat", "/proc/net/snmp"]).unwrap_or_default();
                (*i, tcp_in_segments(&snmp).unwrap_or(0))
            })
            .collect()
    }

    /// Up to `n` client ports (from `first` on, at most 1000 tried) whose new flows appliance
    /// `node` takes now, asked of appliance `ask`.
    pub fn ports_owned_by(&self, ask: u8, node: u8, first: u16, n: usize) -> Vec<u16> {
        (first..first.saturating_add(1000))
            .filter(|&port| {
                let request = Request::OwnerOf {
                    src: std::net::SocketAddr::new(CLIENT_IP.into(), port),
                    dst: std::net::SocketAddr::new(CLUSTER_IP.into(), 80),
                    proto: Proto::Tcp,
                };
                matches!(operator::call(&self.socket(ask), &request),
                    Ok(Reply::OwnerOf(o)) if o.new_flows_owner == Some(node))
            })
            .take(n)
            .collect()
    }

    /// The first `n` client ports from `first` on whose new connections (to port 80 of the
    /// cluster address) go to backend `index`, as appliance `ask` says; `except`: to any other.
    pub fn ports_to_backend(
        &self,
        ask: u8,
        index: u8,
        except: bool,
        first: u16,
        n: usize,
    ) -> Vec<u16> {
        let name = format!("b{index}");
        (first..first.saturating_add(1000))
            .filter(|&port| {
                let request = Request::OwnerOf {
                    src: std::net::SocketAddr::new(CLIENT_IP.into(), port),
                    dst: std::net::SocketAddr::new(CLUSTER_IP.into(), 80),
                    proto: Proto::Tcp,
                };
                let to = match operator::call(&self.socket(ask), &request) {
                    Ok(Reply::OwnerOf(o)) => o.service.and_then(|s| s.backend).map(|b| b.name),
                    _ => None,
                };
                to.is_some_and(|b| (b == name) != except)
            })
            .take(n)
            .collect()
    }

    /// Downloads of the backends' `/big` from the client ports `ports`, read at `kib_s` KiB/s
    /// by a thread of the lab from curl's output (curl 7.88's own `--limit-rate` lets some
    /// transfers through at full speed), started now. A download stalled for 4 s gives up (a
    /// lost connection).
    pub fn downloads(&mut self, ports: &[u16], kib_s: u64) -> Result<Vec<Download>, String> {
        let mut downloads = Vec::new();
        for port in ports {
            let mut child = self
                .topo
                .client
                .command(&[
                    "curl",
                    "-s",
                    "-f",
                    "-m",
                    "60",
                    "--speed-limit",
                    "1",
                    "--speed-time",
                    "4",
                    "--local-port",
                    &port.to_string(),
                    &format!("http://{CLUSTER_IP}/big"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start curl: {e}"))?;
            let out = child.stdout.take().ok_or("curl has no stdout")?;
            let reader = std::thread::spawn(move || read_slowly(out, kib_s));
            downloads.push(Download {
                pid: self.topo.adopt(child),
                reader,
            });
        }
        Ok(downloads)
    }

    /// Waits (until `deadline`) for the downloads; returns how each ended (`complete`, or
    /// curl's exit and the bytes read). One still running at the deadline is killed.
    pub fn finish_downloads(&mut self, downloads: Vec<Download>, deadline: Instant) -> Vec<String> {
        let mut ends = Vec::new();
        for d in downloads {
            let Some(mut child) = self.topo.release(d.pid) else {
                continue;
            };
            let status = wait_until(&mut child, deadline);
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let bytes = d.reader.join().unwrap_or(0);
            ends.push(match status {
                Some(s) if s.success() && bytes == (BIG_KIB * 1024) as u64 => "complete".to_owned(),
                Some(s) => format!("curl {s}, {bytes} bytes"),
                None => format!("still running at the end, {bytes} bytes"),
            });
        }
        ends
    }

    /// Whether a download ended complete ([`ApplianceLab::finish_downloads`]).
    pub fn complete(end: &str) -> bool {
        end == "complete"
    }

    /// Starts the connection probe in the client namespace for `duration` (adopted; its record
    /// goes to `out`).
    pub fn start_probe(&mut self, duration: Duration, out: &Path) -> Result<u32, String> {
        let probe = self
            .topo
            .client
            .command(&[
                &self.programs.probe.to_string_lossy(),
                "lab-probe",
                "--target",
                &format!("{CLUSTER_IP}:80"),
                "--duration-ms",
                &duration.as_millis().to_string(),
                "--out",
            ])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the probe: {e}"))?;
        Ok(self.topo.adopt(probe))
    }

    /// Waits (up to `grace`) for the probe to end on its own.
    pub fn finish_probe(&mut self, pid: u32, grace: Duration) -> Result<(), String> {
        let mut probe = self.topo.release(pid).ok_or("the probe is gone")?;
        if wait_until(&mut probe, Instant::now() + grace).is_some() {
            return Ok(());
        }
        let _ = probe.kill();
        let _ = probe.wait();
        Err("the probe did not finish".into())
    }

    /// Times an engine declared a peer dead so far (from the engines' JSON logs).
    pub fn peer_deaths(&self) -> usize {
        self.all_ids
            .iter()
            .map(|&id| {
                std::fs::read_to_string(self.log(id))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(r#""message":"peer dead""#))
                    .count()
            })
            .sum()
    }
}

/// A long download in progress: curl's PID (adopted) and the thread reading its output.
#[derive(Debug)]
pub struct Download {
    pub pid: u32,
    reader: std::thread::JoinHandle<u64>,
}

/// Reads `out` to its end at `kib_s` KiB/s at most; returns the bytes read.
pub fn read_slowly(mut out: impl std::io::Read, kib_s: u64) -> u64 {
    const CHUNK: usize = 16 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        // Not ahead of the rate: wait until `total` bytes are due.
        let due = Duration::from_secs_f64(total as f64 / (kib_s.max(1) * 1024) as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        match out.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n as u64,
        }
    }
}

/// Waits for `child` to exit until `deadline`; None if it still runs.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_leaves_the_last_backend_to_arp() {
        let s = dsr_service(&[1, 2, 3], false);
        assert!(!s.contains("backend_health"), "{s}");
        assert!(dsr_service(&[1], true).contains("backend_health: { port: 80, http_path: /id"));
        assert!(
            s.contains("ip: 198.18.0.21, mac: \"02:bb:00:00:00:01\""),
            "{s}"
        );
        assert!(s.contains("- { name: b3, ip: 198.18.0.23 }"), "{s}");
        assert!(s.contains("delivery: dsr"), "{s}");
    }

    #[test]
    fn an_appliance_config_has_no_local_health_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = appliance_config(dir.path(), 2, &[1, 2], &dsr_service(&[1], false)).unwrap();
        let text = std::fs::read_to_string(p).unwrap();
        assert!(!text.contains("health:"), "{text}");
        assert!(text.contains("  id: 2\n  ip: 198.18.0.12\n"), "{text}");
        assert!(text.ends_with(&dsr_service(&[1], false)), "{text}");
    }
}
