//! The appliance lab's preconditions, checked on the running lab and reported plainly:
//! - the learning switch never learns the cluster MAC (sampled after every step);
//! - ARP answers for the cluster address come from one appliance, from its node MAC with the
//!   cluster MAC inside (server mode's rule, [`super::checks::judge_arp`]);
//! - backends never answer ARP for the cluster address (they hold it on loopback only);
//! - every appliance forwarded traffic and every backend received some;
//! - where this kernel cannot decapsulate them, every GUE and IP-in-IP frame an appliance sent
//!   to a backend is well formed, and there were some of each ([`encap_failures`]).
//!
//! Which of them apply depends on what stands in front of the backends: a dispatcher answers
//! ARP itself with its own MAC, and a backend alone answers for the address by design.
//! [`arp_answers`] and [`AppChecks::failures`] work on plain data and are unit-tested.

use serde::Serialize;

use super::applab_encap::{EncapStep, GUE_SERVICE_PORT, IPIP_SERVICE_PORT};
use super::appliance::Dispatch;
use super::report::node_list;
use super::topology::{backend_mac, CLUSTER_IP, CLUSTER_MAC};
use clonecluster::wire::{arp, ethernet};

/// What the checks found in one configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AppChecks {
    /// The switch held the cluster MAC after some step.
    pub cluster_mac_learned: bool,
    /// ARP replies for the cluster address the client received.
    pub arp_replies: usize,
    /// Appliances whose ARP replies were seen.
    pub arp_answered_by: Vec<u8>,
    /// Appliance ARP replies that broke server mode's rule, described.
    pub arp_bad: Vec<String>,
    /// Backends that answered ARP for the cluster address.
    pub backends_answering_arp: Vec<u8>,
    /// Appliances that forwarded nothing.
    pub idle_appliances: Vec<u8>,
    /// Backends that received nothing.
    pub idle_backends: Vec<u8>,
    /// Times an engine declared a live peer dead (nobody was killed).
    pub peer_deaths: usize,
}

impl AppChecks {
    /// Each failed precondition that applies to `dispatch`, in words an operator can act on.
    pub fn failures(&self, dispatch: Dispatch) -> Vec<String> {
        let mut f = Vec::new();
        if self.arp_replies == 0 {
            f.push(format!("no ARP reply for {CLUSTER_IP} reached the client"));
        }
        if dispatch == Dispatch::Alone {
            return f;
        }
        if !self.backends_answering_arp.is_empty() {
            f.push(format!(
                "backend(s) {} answered ARP for {CLUSTER_IP}: they must hold it on loopback \
                 with arp_ignore=1 and arp_announce=2, or they take the cluster's traffic",
                node_list(&self.backends_answering_arp)
            ));
        }
        if !self.idle_backends.is_empty() {
            f.push(format!(
                "backend(s) {} received no traffic",
                node_list(&self.idle_backends)
            ));
        }
        if dispatch != Dispatch::Appliances {
            return f;
        }
        if self.cluster_mac_learned {
            f.push(format!(
                "the switch learned the cluster MAC {CLUSTER_MAC} on a port: an appliance sent a \
                 frame from it, and from then on only that port hears the cluster"
            ));
        }
        if self.arp_replies > 0 && self.arp_answered_by.len() != 1 {
            f.push(format!(
                "ARP for {CLUSTER_IP} answered by appliance(s) {}: exactly one must answer",
                node_list(&self.arp_answered_by)
            ));
        }
        for b in &self.arp_bad {
            f.push(format!("bad ARP reply: {b}"));
        }
        if !self.idle_appliances.is_empty() {
            f.push(format!(
                "appliance(s) {} forwarded nothing: the switch does not flood the cluster MAC \
                 to them",
                node_list(&self.idle_appliances)
            ));
        }
        if self.peer_deaths > 0 {
            f.push(format!(
                "an engine declared a live peer dead {} time(s) (a starved control thread on \
                 shared cores, or lost heartbeats)",
                self.peer_deaths
            ));
        }
        f
    }
}

/// What is wrong with the encapsulated frames captured on a backend's port, in words: a
/// malformed frame (the first one's problem), a datagram whose fragments do not join, or no
/// frame of a tunnel at all.
pub fn encap_failures(e: &EncapStep) -> Vec<String> {
    let c = &e.check;
    let mut f = Vec::new();
    if let Some(p) = &c.first_problem {
        f.push(format!(
            "{} of {} encapsulated frame(s) captured on backend {}'s port malformed; the first: {p}",
            c.malformed, c.frames, e.backend
        ));
    }
    if let Some(p) = &c.first_unjoined {
        f.push(format!(
            "{} datagram(s) cut into fragments on the way to backend {} do not join again; the \
             first: {p}",
            c.unjoined, e.backend
        ));
    }
    for (n, what, port) in [
        (c.gue, "GUE", GUE_SERVICE_PORT),
        (c.ipip, "IP-in-IP", IPIP_SERVICE_PORT),
    ] {
        if n == 0 {
            f.push(format!(
                "no {what} frame reached backend {}'s port (requests to port {port} of \
                 {CLUSTER_IP} through appliance {})",
                e.backend, e.appliance
            ));
        }
    }
    f
}

/// The ARP replies for the cluster address among `frames`, as (Ethernet source, MAC inside).
pub fn arp_answers(frames: &[Vec<u8>]) -> Vec<([u8; 6], [u8; 6])> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = ethernet::Frame::new_checked(f.as_slice()).ok()?;
            if eth.ethertype() != ethernet::EtherType::Arp {
                return None;
            }
            let a = arp::Packet::new_checked(eth.payload()).ok()?;
            if a.operation() != arp::Operation::Reply || a.source_protocol_addr() != CLUSTER_IP {
                return None;
            }
            Some((eth.src().0, a.source_hardware_addr().0))
        })
        .collect()
}

/// Backends (of `backends`) that sent an ARP reply for the cluster address.
pub fn backends_answering(answers: &[([u8; 6], [u8; 6])], backends: &[u8]) -> Vec<u8> {
    backends
        .iter()
        .copied()
        .filter(|&b| {
            let mac: ethernet::EthernetAddress = backend_mac(b).parse().unwrap_or_default();
            answers.iter().any(|(src, _)| *src == mac.0)
        })
        .collect()
}

/// Ids whose count grew from `before` to `after`'s complement: those that did nothing.
pub fn idle(before: &[(u8, u64)], after: &[(u8, u64)]) -> Vec<u8> {
    after
        .iter()
        .filter(|(id, a)| {
            let b = before.iter().find(|(i, _)| i == id).map_or(0, |x| x.1);
            a.saturating_sub(b) == 0
        })
        .map(|(id, _)| *id)
        .collect()
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
    fn a_backend_answering_arp_is_found() {
        let b2 = [0x02, 0xbb, 0, 0, 0, 2];
        let n1 = [0x02, 0, 0, 0, 0, 1];
        let cluster = [0x02, 0xcc, 0, 0, 0, 1];
        let answers = arp_answers(&[reply(n1, cluster), reply(b2, b2), vec![0; 10]]);
        assert_eq!(answers.len(), 2);
        assert_eq!(backends_answering(&answers, &[1, 2, 3]), vec![2]);
        assert!(backends_answering(&answers[..1], &[1, 2, 3]).is_empty());
    }

    #[test]
    fn failures_depend_on_the_dispatch() {
        let bad = AppChecks {
            arp_replies: 2,
            arp_answered_by: vec![1, 2],
            backends_answering_arp: vec![3],
            idle_appliances: vec![2],
            idle_backends: vec![1],
            cluster_mac_learned: true,
            ..AppChecks::default()
        };
        assert_eq!(bad.failures(Dispatch::Alone).len(), 0);
        assert_eq!(bad.failures(Dispatch::Director).len(), 2);
        let f = bad.failures(Dispatch::Appliances);
        assert_eq!(f.len(), 5, "{f:?}");
        let good = AppChecks {
            arp_replies: 1,
            arp_answered_by: vec![1],
            ..AppChecks::default()
        };
        assert!(good.failures(Dispatch::Appliances).is_empty());
    }

    #[test]
    fn encapsulated_frames_fail_when_malformed_or_missing() {
        let step = |check| EncapStep {
            backend: 1,
            appliance: 1,
            requests_per_service: 2,
            capture: "c.pcap".to_owned(),
            check,
            took_ms: 0,
        };
        let good = crate::encap_check::EncapCheck {
            frames: 4,
            gue: 2,
            ipip: 2,
            ..Default::default()
        };
        assert!(encap_failures(&step(good.clone())).is_empty());
        let bad = crate::encap_check::EncapCheck {
            malformed: 1,
            first_problem: Some("frame 2 (GUE): outer UDP checksum 0x0001 does not verify".into()),
            ipip: 0,
            ..good
        };
        let f = encap_failures(&step(bad));
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            f[0],
            "1 of 4 encapsulated frame(s) captured on backend 1's port malformed; the first: \
             frame 2 (GUE): outer UDP checksum 0x0001 does not verify"
        );
        assert!(
            f[1].starts_with("no IP-in-IP frame reached backend 1's port"),
            "{}",
            f[1]
        );
    }

    #[test]
    fn idle_means_no_growth() {
        assert_eq!(
            idle(&[(1, 5), (2, 5)], &[(1, 9), (2, 5), (3, 0)]),
            vec![2, 3]
        );
    }
}
