//! The per-frame decision in nanoseconds, over a realistic mix: the committed lab capture
//! (ARP, ICMP with fragments, TCP, UDP, IPv6 neighbour discovery) plus synthetic TCP/UDP
//! frames from many clients, decided by one node of a 3-node cluster (a third of the frames
//! are its own, the rest are dropped as not owned, as on a real node).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use clonecluster::cluster::{Affinity, Member, NodeId, OwnershipTable};
use clonecluster::pipeline::{stable_snapshot, NodeIdentity, Pipeline, Prepared, TableSizes};
use clonecluster::wire::EthernetAddress;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CLUSTER_MAC: [u8; 6] = [2, 0xcc, 0, 0, 0, 1];

fn synthetic(i: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&CLUSTER_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0xaa, 2]);
    f.extend_from_slice(&[8, 0]);
    let udp = i.is_multiple_of(4);
    let l4 = if udp { 8 } else { 20 };
    let total = (20 + l4) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, if udp { 17 } else { 6 }, 0, 0]);
    // Clients spread over 198.19.0.0/16.
    f.extend_from_slice(&Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8).octets());
    f.extend_from_slice(&[198, 18, 0, 1]);
    f.extend_from_slice(&((1024 + (i * 7919) % 60000) as u16).to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    if udp {
        f.extend_from_slice(&8u16.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    } else {
        f.extend_from_slice(&[0; 8]);
        f.push(5 << 4);
        f.push(if i % 16 == 1 { 0x02 } else { 0x10 });
        f.extend_from_slice(&[0; 6]);
    }
    f.resize(60, 0);
    f
}

fn mix() -> Vec<Vec<u8>> {
    let bytes: &[u8] = include_bytes!("../tests/fixtures/lab-mix.pcap");
    let mut r = pcap_file::pcap::PcapReader::new(bytes).expect("pcap");
    let mut frames = Vec::new();
    while let Some(p) = r.next_packet() {
        frames.push(p.expect("packet").data.into_owned());
    }
    frames.extend((0..4096).map(synthetic));
    frames
}

fn decision(c: &mut Criterion) {
    let members: Vec<Member> = (1..=3).map(|i| Member::new(i, 100).unwrap()).collect();
    let table = Arc::new(stable_snapshot(
        &OwnershipTable::build(1, &members).unwrap(),
    ));
    let identity = NodeIdentity {
        node: NodeId::new(2).unwrap(),
        node_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
        cluster_mac: EthernetAddress(CLUSTER_MAC),
        cluster_ip: Ipv4Addr::new(198, 18, 0, 1),
        cluster_ip6: Some("2001:2::1".parse().unwrap()),
        affinity: Affinity::None,
    };
    let mut pipeline = Pipeline::new(
        identity,
        b"bench-secret-0123456789abcdef",
        table,
        TableSizes::default(),
    );
    let frames = mix();
    // Decisions rewrite frames in place (replies): work on copies with room to spare.
    let mut bufs: Vec<(Vec<u8>, usize)> = frames
        .iter()
        .map(|f| {
            let mut b = f.clone();
            b.resize(2048, 0);
            (b, f.len())
        })
        .collect();
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(bufs.len() as u64));
    let mut now = 0u64;
    group.bench_function("from_wire/lab-mix+4096-flows", |b| {
        b.iter(|| {
            for (buf, len) in bufs.iter_mut() {
                now += 100;
                black_box(pipeline.from_wire(black_box(buf), *len, now));
            }
        })
    });
    // The data plane's way: a burst of 32 prepared first (keys hashed four at a time, flow
    // lines prefetched), then decided.
    group.bench_function("burst/lab-mix+4096-flows", |b| {
        let mut prepared = [Prepared::default(); 32];
        b.iter(|| {
            for chunk in bufs.chunks_mut(32) {
                now += 100;
                let views: Vec<Option<&[u8]>> =
                    chunk.iter().map(|(buf, len)| Some(&buf[..*len])).collect();
                pipeline.prepare_burst(black_box(&views), &mut prepared[..chunk.len()]);
                for ((buf, len), p) in chunk.iter_mut().zip(&prepared) {
                    black_box(pipeline.decide(black_box(buf), *len, p, now));
                }
            }
        })
    });
    let mut host: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f[6..12] == CLUSTER_MAC)
        .cloned()
        .collect();
    group.throughput(Throughput::Elements(host.len() as u64));
    group.bench_function("from_host/lab-mix", |b| {
        b.iter(|| {
            for f in host.iter_mut() {
                black_box(pipeline.from_host(black_box(f), 0));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
