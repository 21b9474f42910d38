//! The pipeline's tests, by topic, over frames of the committed lab capture and frames built
//! here; the frame builders and small clusters they share.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::cluster::{
    Affinity, Bucket, FlowHash, FlowKey, FlowTimeouts, Member, NodeId, OwnershipTable,
};
use crate::control::{Phase, PlanId, Role, Snapshot};
use crate::wire::{parse_l2_l4, EthernetAddress};

mod appliance;
mod cores;
mod handoff;
mod host;
mod known_flows;
mod neighbour;
mod properties;
mod wire_side;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const NODE_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const CLUSTER_MAC: EthernetAddress = EthernetAddress([2, 0xcc, 0, 0, 0, 1]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0xaa, 2]);

fn identity(node: u8) -> NodeIdentity {
    NodeIdentity {
        node: NodeId::new(node).unwrap(),
        node_mac: EthernetAddress([2, 0, 0, 0, 0, node]),
        cluster_mac: CLUSTER_MAC,
        cluster_ip: Ipv4Addr::new(198, 18, 0, 1),
        cluster_ip6: Some("2001:2::1".parse().unwrap()),
        affinity: Affinity::None,
        node_ip: None,
        node_ip6: None,
    }
}

fn small() -> TableSizes {
    TableSizes {
        flows: 1024,
        fragments: 64,
        fragment_waits: 64,
        ..TableSizes::default()
    }
}

/// One pipeline per member, all sharing the same table.
fn cluster(members: &[Member]) -> Vec<Pipeline> {
    let table = OwnershipTable::build(1, members).unwrap();
    let snapshot = Arc::new(stable_snapshot(&table));
    members
        .iter()
        .map(|m| Pipeline::new(identity(m.id.get()), SECRET, Arc::clone(&snapshot), small()))
        .collect()
}

fn alone() -> Pipeline {
    cluster(&[Member::new(1, 100).unwrap()]).remove(0)
}

/// The frames of the committed lab capture.
fn capture() -> Vec<Vec<u8>> {
    let bytes: &[u8] = include_bytes!("../../../../tests/fixtures/lab-mix.pcap");
    let mut r = pcap_file::pcap::PcapReader::new(bytes).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

fn answer(p: &mut Pipeline, frame: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    match p.from_wire(&mut FrameBuf::at_start(&mut buf), frame.len(), 0) {
        Action::Reply { len } => Some(buf[..len as usize].to_vec()),
        _ => None,
    }
}

/// A frame from a client to the cluster: TCP, UDP, ICMP echo, or an ICMP error quoting a
/// TCP/UDP packet the cluster sent to the client.
#[derive(Debug, Clone)]
enum Kind {
    Tcp(u8),
    Udp,
    Echo,
    ErrorQuoting(bool),
}

fn ipv4_frame(src: Ipv4Addr, sport: u16, kind: &Kind) -> Vec<u8> {
    let cluster = [198, 18, 0, 1];
    let mut f = Vec::new();
    f.extend_from_slice(&CLUSTER_MAC.0);
    f.extend_from_slice(&CLIENT_MAC.0);
    f.extend_from_slice(&[8, 0]);
    let (proto, l4): (u8, Vec<u8>) = match kind {
        Kind::Tcp(flags) => {
            let mut t = vec![0u8; 20];
            t[..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&80u16.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = *flags;
            (6, t)
        }
        Kind::Udp => {
            let mut u = vec![0u8; 12];
            u[..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&53u16.to_be_bytes());
            u[4..6].copy_from_slice(&12u16.to_be_bytes());
            (17, u)
        }
        Kind::Echo => (1, vec![8, 0, 0, 0, 0, 1, 0, 1]),
        Kind::ErrorQuoting(tcp) => {
            // Frag needed, quoting cluster -> client.
            let mut e = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
            let mut q = vec![
                0x45,
                0,
                0,
                40,
                0,
                0,
                0x40,
                0,
                64,
                if *tcp { 6 } else { 17 },
                0,
                0,
            ];
            q.extend_from_slice(&cluster);
            q.extend_from_slice(&src.octets());
            q.extend_from_slice(&80u16.to_be_bytes());
            q.extend_from_slice(&sport.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0, 0]);
            e.extend_from_slice(&q);
            (1, e)
        }
    };
    let total = 20 + l4.len();
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&cluster);
    f.extend_from_slice(&l4);
    f
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        any::<u8>().prop_map(Kind::Tcp),
        Just(Kind::Udp),
        Just(Kind::Echo),
        any::<bool>().prop_map(Kind::ErrorQuoting),
    ]
}

fn members() -> impl Strategy<Value = Vec<Member>> {
    (proptest::sample::subsequence((1u8..=64).collect::<Vec<_>>(), 1..=64))
        .prop_flat_map(|ids| {
            let n = ids.len();
            (Just(ids), proptest::collection::vec(1u32..=1000, n))
        })
        .prop_map(|(ids, w)| {
            ids.into_iter()
                .zip(w)
                .map(|(id, w)| Member::new(id, w).unwrap())
                .collect()
        })
}
