//! Server mode's ceiling: a node whose engine is replaced by `dpdk-testpmd` in `io` mode between
//! the same ports (`net_af_packet` on the wire veth, `net_tap` into the node's kernel), so that
//! the report separates what the engine costs from what the lab's ports cost. testpmd forwards
//! every frame as it is, both ways: the node's tap carries the cluster MAC and address, and the
//! switch learns the cluster MAC on that node's port (a plain forwarder cannot keep the Clone
//! Cluster's preconditions: it is a ceiling for one node, not a cluster).
//!
//! It starts testpmd in the namespace it is given and never touches another.

use std::path::Path;
use std::process::{Child, Stdio};

use super::topology::{Ns, CLUSTER_IP, CLUSTER_MAC};

/// The program.
pub const TESTPMD: &str = "dpdk-testpmd";

/// Starts testpmd `io` in `ns` between `eth0` (af_packet, or with `xdp` af_xdp: native XDP on
/// the veth, copy mode, queue 0, no preferred busy polling) and a new tap `cc0`, one
/// forwarding core, statistics every second (without `--stats-period` testpmd exits when its
/// stdin closes); its output goes to `log`.
pub fn start_testpmd(ns: &Ns, id: u8, xdp: bool, log: &Path) -> Result<Child, String> {
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let wire = if xdp {
        "net_af_xdp0,iface=eth0,start_queue=0,queue_count=1,busy_budget=0"
    } else {
        "net_af_packet0,iface=eth0"
    };
    ns.command(&[
        TESTPMD,
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "-l",
        "0,1",
        "--log-level=lib.eal:warning",
        "--file-prefix",
        &format!("cclab-testpmd-{id}-{}", std::process::id()),
        "--vdev",
        wire,
        "--vdev",
        "net_tap0,iface=cc0",
        "--",
        "--total-num-mbufs=8192",
        "--nb-cores=1",
        "--forward-mode=io",
        "--auto-start",
        "--stats-period",
        "1",
    ])
    .stdin(Stdio::null())
    .stdout(log)
    .stderr(Stdio::null())
    .spawn()
    .map_err(|e| format!("cannot start {TESTPMD} (apt package dpdk): {e}"))
}

/// Waits for testpmd's tap and gives it the cluster MAC and address (the node's kernel answers
/// ARP and serves from it; testpmd passes everything through).
pub fn configure_tap(ns: &Ns, timeout: std::time::Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    while ns.run(&["ip", "link", "show", "cc0"]).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(format!("{}: testpmd created no cc0 tap", ns.name()));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ns.run(&["ethtool", "-K", "cc0", "tx", "off"])?;
    ns.run(&["ip", "link", "set", "cc0", "address", CLUSTER_MAC])?;
    ns.run(&[
        "ip",
        "addr",
        "add",
        &format!("{CLUSTER_IP}/24"),
        "dev",
        "cc0",
    ])?;
    ns.run(&["ip", "link", "set", "cc0", "up"])?;
    Ok(())
}
