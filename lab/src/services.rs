//! What runs inside a lab node besides the engine: the engine itself (from a generated config)
//! and nginx on the cluster address, each node serving files that name it.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::topology::{control_ip, node_mac, Ns, CLUSTER_IP, CLUSTER_MAC};

/// Settings of a lab engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub policy: &'static str,
    pub idle: &'static str,
    pub handoff_learn: &'static str,
    pub release_deadline: &'static str,
    pub drain_deadline: &'static str,
    /// A dual-stack cluster: `cluster.ip6`, and the health check asks the service on it too
    /// (`health.address6`). Off by default.
    pub ip6: Option<Ipv6Addr>,
    /// Packet cores per node (lcores 0..cores): the wire port gets that many af_packet queue
    /// pairs, the tap that many queues. 1 by default.
    pub cores: u8,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            policy: "hash",
            idle: "adaptive",
            handoff_learn: "1s",
            release_deadline: "10s",
            drain_deadline: "20s",
            ip6: None,
            cores: 1,
        }
    }
}

/// Writes node `id`'s engine config into `dir` (with the shared `secret` file next to it) and
/// returns its path. `peers` are the other nodes' ids.
pub fn engine_config(
    dir: &Path,
    id: u8,
    peers: &[u8],
    opts: &EngineOptions,
) -> std::io::Result<PathBuf> {
    let secret = dir.join("secret");
    if !secret.exists() {
        std::fs::write(&secret, b"lab-cluster-secret-0123456789abcdef")?;
    }
    let peers: Vec<String> = peers
        .iter()
        .filter(|&&p| p != id)
        .map(|&p| format!("{}:7946", control_ip(p)))
        .collect();
    let path = dir.join(format!("node{id}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"cluster:
  ip: {CLUSTER_IP}{ip6}
  mac: {CLUSTER_MAC}
  secret_file: secret
  policy: {policy}
node:
  id: {id}
  mac: {mac}
control:
  listen: {listen}:7946
  peers: [{peers}]
  socket: {socket}
  metrics: {listen}:9100
  handoff_learn: {learn}
  release_deadline: {release}
  drain_deadline: {drain}
health:
  address: {CLUSTER_IP}:80{address6}
  http_path: /id
  interval: 400ms
  timeout: 400ms
  rise: 2
  fall: 3
dataplane:
  eal_args: [--no-huge, -m, "160", --log-level=lib.eal:warning]
  file_prefix: cclab-{dirtag}-{id}
  wire_port: {{ vdev: "net_af_packet0,iface=eth0{qpairs}" }}
  host_port: {{ vdev: "net_tap0,iface=cc0" }}
  cores: [{cores}]
  idle: {idle}
  pool_size: 4095
  rx_descriptors: 512
  tx_descriptors: 512
  flow_capacity: 65536
"#,
            policy = opts.policy,
            ip6 = opts
                .ip6
                .map(|a| format!("\n  ip6: {a}"))
                .unwrap_or_default(),
            address6 = opts
                .ip6
                .map(|a| format!("\n  address6: \"[{a}]:80\""))
                .unwrap_or_default(),
            mac = node_mac(id),
            listen = control_ip(id),
            peers = peers.join(", "),
            socket = dir.join(format!("node{id}.sock")).display(),
            learn = opts.handoff_learn,
            release = opts.release_deadline,
            drain = opts.drain_deadline,
            idle = opts.idle,
            qpairs = if opts.cores > 1 {
                format!(",qpairs={}", opts.cores)
            } else {
                String::new()
            },
            cores = (0..opts.cores.max(1))
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dirtag = dir
                .file_name()
                .map(|n| n
                    .to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), ""))
                .unwrap_or_default(),
        ),
    )?;
    Ok(path)
}

/// Starts the engine in `ns` with `config`; stderr goes to `log`.
pub fn start_engine(bin: &Path, ns: &Ns, config: &Path, log: &Path) -> std::io::Result<Child> {
    let log = std::fs::File::create(log)?;
    ns.command(&[&bin.to_string_lossy(), "run", "--json", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
}

/// Waits until the engine in `ns` has created its tap, then gives the node's kernel the cluster
/// address on it.
pub fn configure_host_port(ns: &Ns, timeout: std::time::Duration) -> Result<(), String> {
    configure_host_port_as(ns, &format!("{CLUSTER_IP}/24"), timeout)
}

/// Gives the node's kernel the cluster's IPv6 address `ip6` (a /64) on the tap, after
/// [`configure_host_port`]. The namespace's interfaces start without IPv6; the tap gets it with
/// no link-local address (one made from the cluster MAC would be the same on every node) and no
/// duplicate address detection (every node holds the cluster address: each would find the
/// others' and give it up). Loopback gets IPv6 too: the kernel delivers its connections to its
/// own addresses (the health check's) through it.
pub fn configure_host_port6(ns: &Ns, ip6: Ipv6Addr) -> Result<(), String> {
    ns.run(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=0"])?;
    ns.run(&["ip", "link", "set", "cc0", "addrgenmode", "none"])?;
    ns.run(&["sysctl", "-qw", "net.ipv6.conf.cc0.accept_dad=0"])?;
    ns.run(&["sysctl", "-qw", "net.ipv6.conf.cc0.disable_ipv6=0"])?;
    ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "cc0",
        "nodad",
    ])?;
    Ok(())
}

/// [`configure_host_port`] with `addr` (address/prefix) on the tap instead of the cluster
/// address: an appliance's kernel serves nothing and holds the node's own address, the source
/// of its backend checks (a backend holds the cluster address itself, on loopback).
pub fn configure_host_port_as(
    ns: &Ns,
    addr: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    while ns.run(&["ip", "link", "show", "cc0"]).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(format!("{}: the engine created no cc0 tap", ns.0));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The kernel must fill its checksums itself: the engine forwards frames as they are.
    ns.run(&["ethtool", "-K", "cc0", "tx", "off"])?;
    ns.run(&["ip", "addr", "add", addr, "dev", "cc0"])?;
    ns.run(&["ip", "link", "set", "cc0", "up"])?;
    Ok(())
}

/// Starts nginx in `ns` on the cluster address, serving `dir/nodeID/www`: `/id` (the node id),
/// `/` (a small page) and `/big` (`big_kib` KiB, for long downloads). It runs as one process
/// (`master_process off`), so that stopping its PID stops the server: a master killed with
/// SIGKILL would leave its worker serving.
pub fn start_nginx(ns: &Ns, dir: &Path, id: u8, big_kib: usize) -> std::io::Result<Child> {
    start_nginx_on(ns, dir, id, big_kib, &format!("{CLUSTER_IP}:80"))
}

/// [`start_nginx`] listening on `listen` (nginx's `listen` argument: an appliance lab backend
/// listens on port 80 of every address, so that a proxy can reach it at its own address too).
pub fn start_nginx_on(
    ns: &Ns,
    dir: &Path,
    id: u8,
    big_kib: usize,
    listen: &str,
) -> std::io::Result<Child> {
    start_nginx_listening(ns, dir, id, big_kib, &[listen])
}

/// [`start_nginx`] on the cluster's IPv4 address and on `ip6` (a dual-stack node: one server
/// for both, so that stopping its PID stops the node's service on both).
pub fn start_nginx_dual(
    ns: &Ns,
    dir: &Path,
    id: u8,
    big_kib: usize,
    ip6: Ipv6Addr,
) -> std::io::Result<Child> {
    start_nginx_listening(
        ns,
        dir,
        id,
        big_kib,
        &[&format!("{CLUSTER_IP}:80"), &format!("[{ip6}]:80")],
    )
}

/// [`start_nginx`] with one `listen` directive per entry of `listen`.
fn start_nginx_listening(
    ns: &Ns,
    dir: &Path,
    id: u8,
    big_kib: usize,
    listen: &[&str],
) -> std::io::Result<Child> {
    let root = dir.join(format!("node{id}"));
    let www = root.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("id"), format!("{id}\n"))?;
    std::fs::write(
        www.join("index.html"),
        format!("<html>clonecluster node {id}</html>\n"),
    )?;
    std::fs::write(www.join("big"), vec![b'x'; big_kib * 1024])?;
    let conf = root.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    keepalive_requests 1000000;
    server {{
{listen}        root {www};
    }}
}}
"#,
            root = root.display(),
            www = www.display(),
            listen = listen
                .iter()
                .map(|l| format!("        listen {l};\n"))
                .collect::<String>(),
        ),
    )?;
    std::fs::create_dir_all(root.join("tmp"))?;
    ns.command(&["nginx", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
