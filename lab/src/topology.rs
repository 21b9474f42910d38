//! A real layer-2 segment on one machine, in network namespaces (LAB.md has the recipes):
//!
//! ```text
//!   client ns ── eth0 ┐                     ┌ eth0 (wire, engine's af_packet) ── node 1 ns
//!                     ├── br0 (learning) ───┤                                   cc0 (tap, kernel)
//!                     │    in switch ns     └ eth0 ... node N ns
//!   node i ns ── ctl0 ── br1 (control network, 198.19.0.0/24)
//! ```
//!
//! Addresses: the shared segment is 198.18.0.0/24 (cluster 198.18.0.1, client .100), the control
//! network 198.19.0.0/24 (node i is 198.19.0.i). Everything lives in namespaces named
//! `<prefix>-sw`, `<prefix>-c`, `<prefix>-n<i>`; the root namespace is never touched but for
//! creating veth pairs that are moved out at once. [`Topology`] deletes it all on drop, after
//! killing the processes it started (by PID).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};

/// The cluster address used in the lab.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's address on the shared segment.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The cluster's IPv6 address in a dual-stack lab (2001:2::/64 is the segment's prefix).
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// The client's IPv6 address in a dual-stack lab.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);
/// The client's ports that checks pin and the kernel never picks as ephemeral ones.
pub const PINNED_CLIENT_PORTS: std::ops::RangeInclusive<u16> = 41000..=43999;
pub const CLUSTER_MAC: &str = "02:cc:00:00:00:01";

/// The appliance lab's single dispatcher (the kernel director or HAProxy): its MAC and its own
/// address on the segment.
pub const DISPATCHER_MAC: &str = "02:dd:00:00:00:01";
pub const DISPATCHER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

/// Node `id`'s MAC.
pub fn node_mac(id: u8) -> String {
    format!("02:00:00:00:00:{id:02x}")
}

/// Backend `index`'s MAC (appliance mode).
pub fn backend_mac(index: u8) -> String {
    format!("02:bb:00:00:00:{index:02x}")
}

/// Backend `index`'s own address on the segment (appliance mode): 198.18.0.20 + index.
pub fn backend_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 20 + index)
}

/// Node `id`'s address on the control network.
pub fn control_ip(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, id)
}

/// Runs `ip` (or any command) and returns its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace of the topology.
#[derive(Debug, Clone)]
pub struct Ns(pub String);

impl Ns {
    /// `ip netns exec NAME args...` as a Command.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["ip", "netns", "exec", self.0.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A namespace of its own, outside any [`Topology`] (for a check that needs one namespace and a
/// veth rather than the lab network), deleted when dropped: the veth ends and taps inside go
/// with it. The processes started in it are the caller's to stop first, by PID.
#[derive(Debug)]
pub struct LoneNs(Ns);

impl LoneNs {
    /// Creates namespace `name` with its loopback up. A namespace of the same name can only be
    /// left by an earlier run that used the same name: it is removed first.
    pub fn create(name: &str) -> Result<LoneNs, String> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", name])?;
        let ns = LoneNs(Ns(name.to_owned()));
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl std::ops::Deref for LoneNs {
    type Target = Ns;

    fn deref(&self) -> &Ns {
        &self.0
    }
}

impl Drop for LoneNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0 .0])
            .stderr(Stdio::null())
            .status();
    }
}

/// The lab network; torn down on drop.
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    pub switch: Ns,
    pub client: Ns,
    pub nodes: Vec<(u8, Ns)>,
    /// Appliance mode's backend servers (index, namespace).
    pub backends: Vec<(u8, Ns)>,
    children: Vec<Child>,
}

impl Topology {
    /// Namespace names start with `prefix` (keep it short: interface names are made from it).
    pub fn build(prefix: &str, nodes: &[u8]) -> Result<Topology, String> {
        let mut t = Topology {
            prefix: prefix.to_owned(),
            switch: Ns(format!("{prefix}-sw")),
            client: Ns(format!("{prefix}-c")),
            nodes: Vec::new(),
            backends: Vec::new(),
            children: Vec::new(),
        };
        // Leftovers of a crashed run with the same prefix are removed first.
        remove_namespaces(prefix);
        for ns in [&t.switch, &t.client] {
            run(&["ip", "netns", "add", &ns.0])?;
            ns.run(&["ip", "link", "set", "lo", "up"])?;
        }
        let sw = t.switch.clone();
        // br0: the shared segment, a learning switch with default ageing. br1: control network.
        for br in ["br0", "br1"] {
            sw.run(&["ip", "link", "add", br, "type", "bridge"])?;
            sw.run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{br}.disable_ipv6=1"),
            ])?;
            sw.run(&["ip", "link", "set", br, "up"])?;
        }
        t.attach("c", &t.client.clone(), "br0", "eth0")?;
        let client = t.client.clone();
        client.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        // Client ports that checks pin (`curl --local-port`, to pick a flow's owner) are never
        // handed out as ephemeral ports: an earlier connection's TIME_WAIT on one could make the
        // pinned request fail to bind.
        client.run(&[
            "sysctl",
            "-qw",
            &format!(
                "net.ipv4.ip_local_reserved_ports={}-{}",
                PINNED_CLIENT_PORTS.start(),
                PINNED_CLIENT_PORTS.end()
            ),
        ])?;
        client.run(&["ip", "link", "set", "eth0", "address", "02:00:00:00:aa:02"])?;
        client.run(&[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        client.run(&["ip", "link", "set", "eth0", "up"])?;
        for &id in nodes {
            t.add_node(id)?;
        }
        Ok(t)
    }

    /// Makes the lab dual-stack on the client's side: IPv6 on its `eth0` (IPv6 stays off
    /// elsewhere; the nodes' taps get it from `services::configure_host_port6`) with
    /// [`CLIENT_IP6`] (`nodad`: usable at once).
    pub fn client_ipv6(&self) -> Result<(), String> {
        let c = &self.client;
        c.run(&["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"])?;
        c.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        Ok(())
    }

    /// Creates node `id`'s namespace, its silent wire port `eth0` on br0 and its control port
    /// `ctl0` on br1. The engine and the node's services are started separately.
    pub fn add_node(&mut self, id: u8) -> Result<Ns, String> {
        let ns = self.node_namespace(id)?;
        ns.run(&["ip", "link", "set", "eth0", "arp", "off"])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        self.add_control_port(id, &ns)?;
        self.nodes.push((id, ns.clone()));
        Ok(ns)
    }

    /// Creates node `id` of the kernel-only Clone Cluster (the paper's method on today's kernel,
    /// LAB.md): `eth0` carries the cluster MAC and address, and an nftables `netdev` table drops
    /// the TCP flows whose `jhash(saddr . sport) mod count` is not `index` on ingress and writes
    /// the node MAC as Ethernet source on egress. The rules are loaded before the link comes up,
    /// so that no frame ever leaves with the cluster MAC as source.
    pub fn add_kernel_node(&mut self, id: u8, index: u8, count: u8) -> Result<Ns, String> {
        let ns = self.node_namespace(id)?;
        ns.run(&["ip", "link", "set", "eth0", "address", CLUSTER_MAC])?;
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{CLUSTER_IP}/24"),
            "dev",
            "eth0",
        ])?;
        let rules = kernel_clone_rules(index, count, &node_mac(id));
        let mut nft = ns
            .command(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        if let Some(mut stdin) = nft.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(rules.as_bytes())
                .map_err(|e| format!("nft: {e}"))?;
        }
        let out = nft.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{}: nft refused the kernel clone-cluster rules: {}\n{rules}",
                ns.0,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        self.add_control_port(id, &ns)?;
        self.nodes.push((id, ns.clone()));
        Ok(ns)
    }

    /// Creates backend `index`'s namespace for appliance mode: `eth0` on br0 with MAC
    /// [`backend_mac`] and address [`backend_ip`], and the cluster address on loopback, which
    /// it never answers ARP for (`arp_ignore=1`, `arp_announce=2`): the appliances forward
    /// client frames to its MAC (DSR) and it answers the client directly from the cluster
    /// address.
    pub fn add_backend(&mut self, index: u8) -> Result<Ns, String> {
        let ns = Ns(format!("{}-b{index}", self.prefix));
        run(&["ip", "netns", "add", &ns.0])?;
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            for dev in ["all", "default"] {
                ns.run(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{dev}.{key}={value}"),
                ])?;
            }
        }
        self.attach(&format!("b{index}"), &ns, "br0", "eth0")?;
        for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            ns.run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.eth0.{key}={value}"),
            ])?;
        }
        ns.run(&["ip", "link", "set", "eth0", "address", &backend_mac(index)])?;
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", backend_ip(index)),
            "dev",
            "eth0",
        ])?;
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{CLUSTER_IP}/32"),
            "dev",
            "lo",
        ])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        self.backends.push((index, ns.clone()));
        Ok(ns)
    }

    /// Creates the appliance lab's dispatcher namespace `<prefix>-d`: `eth0` on br0 with
    /// [`DISPATCHER_MAC`], its own address [`DISPATCHER_IP`] and the cluster address, which its
    /// kernel answers ARP for (one machine in front of the backends, the design a clone cluster
    /// avoids). What dispatches (nftables or HAProxy) is started separately.
    pub fn add_dispatcher(&mut self) -> Result<Ns, String> {
        let ns = Ns(format!("{}-d", self.prefix));
        run(&["ip", "netns", "add", &ns.0])?;
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        self.attach("d", &ns, "br0", "eth0")?;
        ns.run(&["ip", "link", "set", "eth0", "address", DISPATCHER_MAC])?;
        for addr in [format!("{DISPATCHER_IP}/24"), format!("{CLUSTER_IP}/32")] {
            ns.run(&["ip", "addr", "add", &addr, "dev", "eth0"])?;
        }
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    pub fn backend(&self, index: u8) -> Option<&Ns> {
        self.backends
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, ns)| ns)
    }

    /// A node's namespace with `eth0` on br0, down, and no IPv6 anywhere: nothing the node's
    /// kernel does may reach the wire unplanned (new interfaces such as the tap inherit
    /// `default`).
    fn node_namespace(&self, id: u8) -> Result<Ns, String> {
        let ns = Ns(format!("{}-n{id}", self.prefix));
        run(&["ip", "netns", "add", &ns.0])?;
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        self.attach(&format!("n{id}"), &ns, "br0", "eth0")?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"])?;
        Ok(ns)
    }

    fn add_control_port(&self, id: u8, ns: &Ns) -> Result<(), String> {
        self.attach(&format!("k{id}"), ns, "br1", "ctl0")?;
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", control_ip(id)),
            "dev",
            "ctl0",
        ])?;
        ns.run(&["ip", "link", "set", "ctl0", "up"])?;
        Ok(())
    }

    /// A veth from `ns` (named `inner`) to `bridge` in the switch namespace, offloads off: GSO
    /// would hand af_packet frames larger than an mbuf, and checksum offload would leave TCP
    /// checksums unfilled (CHECKSUM_PARTIAL) in the frames af_packet passes on, which the node's
    /// kernel then drops.
    fn attach(&self, tag: &str, ns: &Ns, bridge: &str, inner: &str) -> Result<(), String> {
        let outer = format!("{}{}", short(&self.prefix), tag);
        let tmp = format!("{outer}x");
        run(&[
            "ip", "link", "add", &tmp, "type", "veth", "peer", "name", &outer,
        ])?;
        run(&["ip", "link", "set", &tmp, "netns", &ns.0, "name", inner])?;
        run(&["ip", "link", "set", &outer, "netns", &self.switch.0])?;
        for (n, i) in [(ns, inner), (&self.switch, outer.as_str())] {
            n.run(&[
                "ethtool", "-K", i, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
            ])?;
        }
        self.switch.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{outer}.disable_ipv6=1"),
        ])?;
        self.switch
            .run(&["ip", "link", "set", &outer, "master", bridge])?;
        self.switch.run(&["ip", "link", "set", &outer, "up"])?;
        Ok(())
    }

    /// The switch-side end (in the switch namespace, on br0) of node `id`'s wire veth.
    pub fn wire_port(&self, id: u8) -> String {
        format!("{}n{id}", short(&self.prefix))
    }

    pub fn node(&self, id: u8) -> Option<&Ns> {
        self.nodes.iter().find(|(i, _)| *i == id).map(|(_, ns)| ns)
    }

    /// Keeps a child process to kill (by PID) at teardown.
    pub fn adopt(&mut self, child: Child) -> u32 {
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills one adopted process now (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Takes an adopted process back (e.g. to stop it gracefully and read its output).
    pub fn release(&mut self, pid: u32) -> Option<Child> {
        let pos = self.children.iter().position(|c| c.id() == pid)?;
        Some(self.children.remove(pos))
    }

    /// MACs the learning switch has learned on its ports (`bridge fdb`, dynamic entries only).
    pub fn learned_macs(&self) -> Result<Vec<String>, String> {
        let out = self.switch.run(&["bridge", "fdb", "show", "br", "br0"])?;
        Ok(out
            .lines()
            .filter(|l| !l.contains("permanent"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // SIGTERM first, so that servers stop their own helpers; SIGKILL what is left.
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        for mut c in self.children.drain(..) {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_namespaces(&self.prefix);
    }
}

/// Stops every process in namespace `name`, by PID.
fn stop_processes_in(name: &str) {
    let pids = |sig: &str| {
        let out = run(&["ip", "netns", "pids", name]).unwrap_or_default();
        let pids: Vec<&str> = out.split_whitespace().collect();
        for pid in &pids {
            let _ = Command::new("kill")
                .args([sig, pid])
                .stderr(Stdio::null())
                .status();
        }
        !pids.is_empty()
    };
    if pids("-TERM") {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline
            && !run(&["ip", "netns", "pids", name])
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        pids("-KILL");
    }
}

/// The kernel-only clone cluster's nftables rules for node `index` of `count` (LAB.md).
pub fn kernel_clone_rules(index: u8, count: u8, node_mac: &str) -> String {
    format!(
        "table netdev clone {{
  chain in {{
    type filter hook ingress device eth0 priority 0;
    ip protocol tcp jhash ip saddr . tcp sport mod {count} seed 0x1234 != {index} drop
  }}
  chain out {{
    type filter hook egress device eth0 priority 0;
    ether saddr set {node_mac}
  }}
}}
"
    )
}

/// Interface names are at most 15 bytes: keep the prefix's last 8 characters.
fn short(prefix: &str) -> String {
    let p: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    p[p.len().saturating_sub(8)..].to_owned()
}

/// Deletes every namespace whose name starts with `prefix-` (veths inside go with them). A
/// process still running in one (left by a crashed run: deleting the name would not stop it)
/// is stopped first, by the PID `ip netns pids` gives: SIGTERM, then SIGKILL.
pub fn remove_namespaces(prefix: &str) -> Vec<String> {
    let list = run(&["ip", "netns", "list"]).unwrap_or_default();
    let mut removed = Vec::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(&format!("{prefix}-")) {
            stop_processes_in(name);
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
            removed.push(name.to_owned());
        }
    }
    removed
}
