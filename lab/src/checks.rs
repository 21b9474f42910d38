//! The Clone Cluster's preconditions, checked on the running lab and reported plainly:
//! - the learning switch never learns the cluster MAC on any port (sampled after every step):
//!   if it did, only that port would hear the cluster;
//! - ARP answers for the cluster address carry the cluster MAC in the payload and a node MAC
//!   (never the cluster MAC) as the Ethernet source;
//! - every node received traffic (its share of delivered frames is above zero);
//! - dual-stack (the scenarios): the client's neighbour entry for the cluster's IPv6 address is
//!   the cluster MAC (the engines answered its neighbour solicitations, as they answer ARP).
//!
//! [`judge_arp`] works on captured frames and [`neighbour_is_cluster_mac`] on `ip -6 neigh`'s
//! line; both are unit-tested without a network.

use std::io::{BufRead, BufReader};
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::topology::{node_mac, Ns, Topology, CLUSTER_IP, CLUSTER_MAC};
use clonecluster::wire::{arp, ethernet};

/// What the checks found in one configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Preconditions {
    /// The switch held the cluster MAC after some step.
    pub cluster_mac_learned: bool,
    /// ARP replies for the cluster address the client received.
    pub arp_replies: usize,
    /// Nodes whose ARP replies were seen (by their node MAC as Ethernet source).
    pub arp_answered_by: Vec<u8>,
    /// Replies that broke the rule, described.
    pub arp_bad: Vec<String>,
    /// Nodes that received no traffic.
    pub idle_nodes: Vec<u8>,
    /// Times an engine declared a live peer dead during the run (nobody was killed).
    pub peer_deaths: usize,
}

impl Preconditions {
    /// Each failed precondition, in words an operator can act on.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.cluster_mac_learned {
            f.push(format!(
                "the switch learned the cluster MAC {CLUSTER_MAC} on a port: a node sent a frame \
                 with the cluster MAC as source, and from then on only that port hears the cluster"
            ));
        }
        if self.arp_replies == 0 {
            f.push(format!(
                "no ARP reply for {CLUSTER_IP} reached the client: no node answers ARP"
            ));
        }
        for b in &self.arp_bad {
            f.push(format!("bad ARP reply: {b}"));
        }
        if self.peer_deaths > 0 {
            f.push(format!(
                "an engine declared a live peer dead {} time(s): its heartbeats were silent for \
                 control.dead_after intervals (a starved control thread on shared cores, or lost \
                 frames); raise control.dead_after or give the engines their own cores",
                self.peer_deaths
            ));
        }
        if !self.idle_nodes.is_empty() {
            f.push(format!(
                "node(s) {} received no traffic: the switch does not flood the cluster MAC to them",
                super::report::node_list(&self.idle_nodes)
            ));
        }
        f
    }
}

/// Checks ARP replies among `frames`: payload sender MAC must be the cluster MAC, the Ethernet
/// source one of `node_macs`. Returns (replies, nodes that answered, problems).
pub fn judge_arp(frames: &[Vec<u8>], node_macs: &[(u8, [u8; 6])]) -> (usize, Vec<u8>, Vec<String>) {
    let cluster_mac: ethernet::EthernetAddress = CLUSTER_MAC.parse().unwrap_or_default();
    let mut replies = 0;
    let mut by = Vec::new();
    let mut bad = Vec::new();
    for f in frames {
        let Ok(eth) = ethernet::Frame::new_checked(f.as_slice()) else {
            continue;
        };
        if eth.ethertype() != ethernet::EtherType::Arp {
            continue;
        }
        let Ok(a) = arp::Packet::new_checked(eth.payload()) else {
            continue;
        };
        if a.operation() != arp::Operation::Reply || a.source_protocol_addr() != CLUSTER_IP {
            continue;
        }
        replies += 1;
        let src = eth.src();
        if a.source_hardware_addr() != cluster_mac {
            bad.push(format!(
                "from {src}: the payload says {CLUSTER_IP} is at {}, not the cluster MAC",
                a.source_hardware_addr()
            ));
        }
        match node_macs.iter().find(|(_, m)| *m == src.0) {
            Some((id, _)) => {
                if !by.contains(id) {
                    by.push(*id);
                }
            }
            None if src == cluster_mac => bad.push(format!(
                "sent from the cluster MAC {src}: the switch will learn it"
            )),
            None => bad.push(format!("sent from {src}, which is no node's MAC")),
        }
    }
    by.sort_unstable();
    (replies, by, bad)
}

/// tcpdump writing what `filter` selects on `ns`'s port `eth0` into `pcap`, packet by packet;
/// its standard error piped (it says "listening on" once it captures).
pub fn tcpdump(ns: &Ns, pcap: &Path, filter: &str) -> std::process::Command {
    let mut c = ns.command(&[
        "tcpdump",
        "-i",
        "eth0",
        "-n",
        "-U",
        "--immediate-mode",
        "-Z",
        "root",
        "-w",
    ]);
    c.arg(pcap)
        .arg(filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Makes the client resolve the cluster address afresh while capturing on its port, and judges
/// the ARP replies it gets.
pub fn check_arp(topo: &Topology, dir: &Path, pre: &mut Preconditions) -> Result<(), String> {
    let frames = capture_arp(topo, dir)?;
    let macs: Vec<(u8, [u8; 6])> = topo
        .nodes
        .iter()
        .filter_map(|(id, _)| {
            let m: ethernet::EthernetAddress = node_mac(*id).parse().ok()?;
            Some((*id, m.0))
        })
        .collect();
    let (replies, by, bad) = judge_arp(&frames, &macs);
    pre.arp_replies = replies;
    pre.arp_answered_by = by;
    pre.arp_bad = bad;
    Ok(())
}

/// Makes the client resolve the cluster address afresh (one request) while capturing ARP on its
/// port; returns the frames captured.
pub fn capture_arp(topo: &Topology, dir: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pcap = dir.join("arp.pcap");
    let mut tcpdump = tcpdump(&topo.client, &pcap, "arp")
        .spawn()
        .map_err(|e| format!("cannot start tcpdump: {e}"))?;
    // tcpdump says "listening on" once it captures.
    let mut ready = false;
    if let Some(err) = tcpdump.stderr.take() {
        let mut lines = BufReader::new(err).lines();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => {
                    ready = true;
                    break;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
    let result = if ready {
        let _ = topo.client.run(&["ip", "neigh", "flush", "dev", "eth0"]);
        // Any request makes the client's kernel ask for the cluster address.
        let _ = topo.client.run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "3",
            &format!("http://{CLUSTER_IP}/id"),
        ]);
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    } else {
        Err("tcpdump did not start capturing in the client namespace".to_owned())
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    result?;
    Ok(clonecluster::replay::read_pcap(&pcap)?
        .into_iter()
        .map(|(_, f)| f)
        .collect())
}

/// The client's neighbour entry for `ip6` (a line of `ip -6 neigh show`, trimmed; empty if it
/// has none).
pub fn client_neighbour6(topo: &Topology, ip6: Ipv6Addr) -> String {
    topo.client
        .run(&["ip", "-6", "neigh", "show", &ip6.to_string(), "dev", "eth0"])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Whether a neighbour entry (`2001:2::1 lladdr 02:cc:00:00:00:01 REACHABLE`) resolves the
/// address to the cluster MAC: a link-layer address, that one, and not a failed resolution.
pub fn neighbour_is_cluster_mac(entry: &str) -> bool {
    let words: Vec<&str> = entry.split_whitespace().collect();
    let lladdr = words
        .windows(2)
        .find(|w| w[0] == "lladdr")
        .map(|w| w[1].to_ascii_lowercase());
    lladdr.as_deref() == Some(CLUSTER_MAC)
        && !words.iter().any(|w| *w == "FAILED" || *w == "INCOMPLETE")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(eth_src: [u8; 6], sha: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0xaa, 0x02];
        f.extend_from_slice(&eth_src);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&sha);
        f.extend_from_slice(&CLUSTER_IP.octets());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0xaa, 0x02, 198, 18, 0, 100]);
        f.resize(60, 0);
        f
    }

    #[test]
    fn arp_replies_are_judged() {
        let cluster = [0x02, 0xcc, 0, 0, 0, 1];
        let n1 = [0x02, 0, 0, 0, 0, 1];
        let n2 = [0x02, 0, 0, 0, 0, 2];
        let macs = [(1, n1), (2, n2)];
        let good = vec![reply(n1, cluster), reply(n2, cluster), vec![1, 2, 3]];
        let (n, by, bad) = judge_arp(&good, &macs);
        assert_eq!((n, by, bad.len()), (2, vec![1, 2], 0));

        let (n, by, bad) = judge_arp(&[reply(cluster, cluster)], &macs);
        assert_eq!((n, by.len()), (1, 0));
        assert!(bad[0].contains("cluster MAC"), "{bad:?}");

        let (_, by, bad) = judge_arp(&[reply(n1, n1)], &macs);
        assert_eq!(by, vec![1]);
        assert!(bad[0].contains("not the cluster MAC"), "{bad:?}");
    }

    #[test]
    fn the_neighbour_entry_must_be_the_cluster_mac() {
        for (entry, ok) in [
            ("2001:2::1 lladdr 02:cc:00:00:00:01 REACHABLE", true),
            ("2001:2::1 lladdr 02:CC:00:00:00:01 STALE", true),
            ("lladdr 02:cc:00:00:00:01 DELAY", true),
            // A node's own MAC: the node's kernel answered, not the engine.
            ("2001:2::1 lladdr 02:00:00:00:00:02 REACHABLE", false),
            ("2001:2::1 INCOMPLETE", false),
            ("2001:2::1 lladdr 02:cc:00:00:00:01 FAILED", false),
            ("", false),
        ] {
            assert_eq!(neighbour_is_cluster_mac(entry), ok, "{entry}");
        }
    }

    #[test]
    fn failures_are_worded() {
        let p = Preconditions {
            arp_replies: 1,
            ..Preconditions::default()
        };
        assert!(p.failures().is_empty());
        let p = Preconditions {
            cluster_mac_learned: true,
            idle_nodes: vec![2],
            peer_deaths: 1,
            ..Preconditions::default()
        };
        let f = p.failures();
        assert_eq!(f.len(), 4, "{f:?}");
    }
}
