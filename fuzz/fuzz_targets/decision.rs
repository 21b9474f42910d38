//! The whole per-frame decision, both directions, on a node of a 3-node cluster: never a
//! panic, whatever the frame. The first bytes are steered towards the cluster MAC so that the
//! deep paths (ownership, fragments, ARP and ND answers) are reached. With bit 6 of the mode
//! byte the node is an appliance (DSR, GUE and IP-in-IP services, a disabled rule, v4 and v6
//! virtual addresses, the smallest MTU): the forwarding and too-big paths are reached too.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use clonecluster::appliance::Services;
use clonecluster::cluster::{Affinity, Member, NodeId, OwnershipTable};
use clonecluster::config::Config;
use clonecluster::control::Snapshot;
use clonecluster::pipeline::{
    stable_snapshot, Action, FrameBuf, NodeIdentity, Pipeline, TableSizes, HEADROOM,
};
use clonecluster::wire::EthernetAddress;
use libfuzzer_sys::fuzz_target;

const CLUSTER_MAC: [u8; 6] = [2, 0xcc, 0, 0, 0, 1];

fn table() -> Arc<Snapshot> {
    static TABLE: OnceLock<Arc<Snapshot>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let members: Vec<Member> = (1..=3).map(|i| Member::new(i, 100).unwrap()).collect();
            Arc::new(stable_snapshot(&OwnershipTable::build(1, &members).unwrap()))
        })
        .clone()
}

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef";

const SERVICES: &str = r#"
cluster:
  ip: 198.18.0.1
  ip6: "2001:2::1"
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
  ip: 198.18.0.11
  ip6: "2001:2::11"
dataplane:
  eal_args: [--no-huge]
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
services:
  - name: web
    addresses: [198.18.0.1, "2001:2::1"]
    ports: [80, 8000-8100]
    delivery: dsr
    backends:
      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { ip: 198.18.0.22, mac: 02:bb:00:00:00:02, weight: 3 }
  - name: tunnel
    addresses: [198.18.0.2]
    protocol: udp
    ports: [53]
    delivery: gue
    mtu: 1280
    backends:
      - { ip: 198.18.0.31, mac: 02:bb:00:00:00:03 }
  - name: tunnel6
    addresses: ["2001:2::2"]
    ports: [443]
    delivery: ipip
    mtu: 1320
    backends:
      - { ip: "2001:2::31", mac: 02:bb:00:00:00:04 }
  - name: ssh
    addresses: [198.18.0.1]
    ports: [22]
    mode: disabled
"#;

fn services() -> Arc<Services> {
    static SERVICES_: OnceLock<Arc<Services>> = OnceLock::new();
    SERVICES_
        .get_or_init(|| {
            let c = Config::parse(SERVICES, "fuzz.yaml").expect("the fuzz services parse");
            c.validate("fuzz.yaml").expect("the fuzz services are valid");
            Arc::new(Services::compile(&c, SECRET, None))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let identity = NodeIdentity {
        node: NodeId::new(1 + mode % 3).unwrap(),
        node_mac: EthernetAddress([2, 0, 0, 0, 0, 1 + mode % 3]),
        cluster_mac: EthernetAddress(CLUSTER_MAC),
        cluster_ip: Ipv4Addr::new(198, 18, 0, 1),
        cluster_ip6: Some("2001:2::1".parse().unwrap()),
        node_ip: Some(Ipv4Addr::new(198, 18, 0, 10 + mode % 3)),
        node_ip6: Some("2001:2::11".parse().unwrap()),
        affinity: [Affinity::None, Affinity::Single, Affinity::Network][(mode as usize / 3) % 3],
    };
    let sizes = TableSizes {
        flows: 64,
        fragments: 16,
        fragment_waits: 16,
        ..TableSizes::default()
    };
    let mut p = Pipeline::new(identity, SECRET, table(), sizes);
    if mode & 0x40 != 0 {
        p.set_services(services());
    }
    // The frame after an mbuf's headroom, where an encapsulation's outer headers go.
    let mut buf = vec![0u8; HEADROOM + 2048];
    let len = bytes.len().min(2048);
    let frame = &mut buf[HEADROOM..];
    frame[..len].copy_from_slice(&bytes[..len]);
    if mode & 0x80 != 0 && len >= 6 {
        frame[..6].copy_from_slice(&CLUSTER_MAC);
    }
    // What a core does after the decision writes the frames a backend gets: each piece of a
    // datagram cut for its tunnel (an encapsulation's outer headers are written in place).
    let action = p.from_wire(&mut FrameBuf::new(&mut buf, HEADROOM), len, u64::from(mode));
    match action {
        Action::Encapsulated { push, len } => {
            // The frame as sent lies in the buffer.
            let start = HEADROOM.checked_sub(usize::from(push));
            assert!(
                start.is_some_and(|s| s + usize::from(len) <= buf.len()),
                "{action:?}"
            );
        }
        Action::ToBackendInPieces { .. } => {
            if let Some(pieces) = p.take_pieces() {
                let mut out = vec![0u8; 2048];
                for k in 0..pieces.count() {
                    let _ = pieces.write(&buf[HEADROOM..HEADROOM + len], k, &mut out);
                }
            }
        }
        _ => {}
    }
    let _ = p.take_released();
    let mut host = bytes.to_vec();
    let _ = p.from_host(&mut host, u64::from(mode));
});
