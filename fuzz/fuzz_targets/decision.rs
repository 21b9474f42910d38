//! The whole per-frame decision, both directions, on a node of a 3-node cluster: never a
//! panic, whatever the frame. The first bytes are steered towards the cluster MAC so that the
//! deep paths (ownership, fragments, ARP and ND answers) are reached.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use clonecluster::cluster::{Affinity, Member, NodeId, OwnershipTable};
use clonecluster::control::Snapshot;
use clonecluster::pipeline::{stable_snapshot, NodeIdentity, Pipeline, TableSizes};
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
        affinity: [Affinity::None, Affinity::Single, Affinity::Network][(mode as usize / 3) % 3],
    };
    let sizes = TableSizes {
        flows: 64,
        fragments: 16,
        fragment_waits: 16,
        ..TableSizes::default()
    };
    let mut p = Pipeline::new(identity, b"fuzz-secret-0123456789abcdef", table(), sizes);
    let mut buf = vec![0u8; 2048];
    let len = bytes.len().min(buf.len());
    buf[..len].copy_from_slice(&bytes[..len]);
    if mode & 0x80 != 0 && len >= 6 {
        buf[..6].copy_from_slice(&CLUSTER_MAC);
    }
    let _ = p.from_wire(&mut buf, len, u64::from(mode));
    let _ = p.take_released();
    let mut host = bytes.to_vec();
    let _ = p.from_host(&mut host, u64::from(mode));
});
