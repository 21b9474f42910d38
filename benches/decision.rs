//! The per-frame decision in nanoseconds, over a realistic mix: the committed lab capture
//! (ARP, ICMP with fragments, TCP, UDP, IPv6 neighbour discovery) plus synthetic TCP/UDP
//! frames from many clients, decided by one node of a 3-node cluster (a third of the frames
//! are its own, the rest are dropped as not owned, as on a real node). And the same decision
//! at 1 thousand to 10 million flows on one node, without DPDK (`decision/one-node`); what
//! this machine's memory alone costs the flow table's access pattern at those sizes
//! (`decision/memory-floor`); and the bucket hash alone with each SipHash implementation the
//! CPU runs (`decision/hash8`). And appliance mode's decision (`decision/appliance`): one node
//! forwarding every flow to a backend of its service, by DSR or GUE.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use clonecluster::cluster::flow_table::{FlowTable, SLOT_BYTES};
use clonecluster::cluster::siphash::{Lanes, Sip13x8};
use clonecluster::cluster::{Affinity, FlowKey, KeyWords, Member, NodeId, OwnershipTable};
use clonecluster::pipeline::{
    stable_snapshot, FrameBuf, NodeIdentity, Pipeline, Prepared, TableSizes, HEADROOM,
};
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
    use clonecluster::testkit::pcap::{fixture, read_pcap};
    let mut frames = read_pcap(&fixture("lab-mix.pcap"));
    frames.extend((0..4096).map(synthetic));
    frames
}

/// Node `node` of the bench cluster (node MAC 02:00:00:00:00:`node`).
fn identity(node: u8) -> NodeIdentity {
    NodeIdentity {
        node: NodeId::new(node).unwrap(),
        node_mac: EthernetAddress([2, 0, 0, 0, 0, node]),
        cluster_mac: EthernetAddress(CLUSTER_MAC),
        cluster_ip: Ipv4Addr::new(198, 18, 0, 1),
        cluster_ip6: Some("2001:2::1".parse().unwrap()),
        affinity: Affinity::None,
        node_ip: None,
        node_ip6: None,
    }
}

fn decision(c: &mut Criterion) {
    let members: Vec<Member> = (1..=3).map(|i| Member::new(i, 100).unwrap()).collect();
    let table = Arc::new(stable_snapshot(
        &OwnershipTable::build(1, &members).unwrap(),
    ));
    let mut pipeline = Pipeline::new(
        identity(2),
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
                black_box(pipeline.from_wire(&mut FrameBuf::at_start(black_box(buf)), *len, now));
            }
        })
    });
    // The data plane's way: a burst of 32 prepared first (keys hashed eight at a time, flow
    // lines prefetched, other nodes' frames marked), then the rest decided.
    group.bench_function("burst/lab-mix+4096-flows", |b| {
        let mut prepared = [Prepared::default(); 32];
        b.iter(|| {
            for chunk in bufs.chunks_mut(32) {
                now += 100;
                let views: Vec<Option<&[u8]>> =
                    chunk.iter().map(|(buf, len)| Some(&buf[..*len])).collect();
                let others =
                    pipeline.prepare_burst(black_box(&views), &mut prepared[..chunk.len()]);
                black_box(others.count_ones());
                let mut rest = !others & ((1u64 << chunk.len()) - 1);
                while rest != 0 {
                    let i = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    let (buf, len) = &mut chunk[i];
                    black_box(pipeline.decide(
                        &mut FrameBuf::at_start(black_box(buf)),
                        *len,
                        &prepared[i],
                        now,
                    ));
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

/// A 60-byte IPv4 TCP (ACK) or UDP frame of flow `i` to the cluster: client 198.19.x.y
/// (`i` mod 65536), source port from `i` / 65536, so up to ~4 billion distinct flows.
fn write_flow_frame(f: &mut [u8], i: u32) {
    let udp = i.is_multiple_of(4);
    f[23] = if udp { 17 } else { 6 };
    f[26..30].copy_from_slice(&[198, 19, (i >> 8) as u8, i as u8]);
    f[34..36].copy_from_slice(&((1024 + (i >> 16)) as u16).to_be_bytes());
    // The TCP data offset and flags, or UDP's length and checksum.
    if udp {
        f[38..42].copy_from_slice(&[0, 8, 0, 0]);
    } else {
        f[38..42].copy_from_slice(&[0; 4]);
        f[46] = 5 << 4;
        f[47] = 0x10;
    }
    let total: u16 = if udp { 28 } else { 40 };
    f[16..18].copy_from_slice(&total.to_be_bytes());
}

/// The decision alone (no DPDK, no frame copies) at 1 thousand and 10 million flows, one node
/// owning every bucket (the pipeline bench's 1-node rows): each burst's 32 frames are written
/// into the same 32 buffers first, as a NIC's DMA would leave them in cache (that writing is
/// counted), then prepared and decided as the data plane does. The flows come round in order,
/// so at 10 million flows every frame's flow-table line is cold, as in the pipeline bench.
fn flows(c: &mut Criterion) {
    let members = [Member::new(1, 100).unwrap()];
    let snapshot = Arc::new(stable_snapshot(
        &OwnershipTable::build(1, &members).unwrap(),
    ));
    let mut group = c.benchmark_group("decision/one-node");
    group.throughput(Throughput::Elements(32));
    for flows in FLOW_COUNTS {
        let mut pipeline = Pipeline::new(
            identity(1),
            b"bench-secret-0123456789abcdef",
            Arc::clone(&snapshot),
            TableSizes {
                flows: flows as usize,
                ..TableSizes::default()
            },
        );
        let template = synthetic(1);
        let mut ring: Vec<Vec<u8>> = (0..32).map(|_| template.clone()).collect();
        let mut prepared = [Prepared::default(); 32];
        let mut next = 0u32;
        // 50 ns per frame: about what the data plane takes, for the idle timeouts.
        let mut now = 0u64;
        let label = format!("burst/{}", flows_label(flows));
        let (mut frames, mut delivered) = (0u64, 0u64);
        group.bench_function(label, |b| {
            b.iter(|| {
                for f in ring.iter_mut() {
                    write_flow_frame(f, next);
                    next = if next + 1 == flows { 0 } else { next + 1 };
                }
                now += 32 * 50;
                let views: [Option<&[u8]>; 32] = std::array::from_fn(|i| Some(&ring[i][..60]));
                // One node: nothing is another node's.
                assert_eq!(pipeline.prepare_burst(black_box(&views), &mut prepared), 0);
                for (f, p) in ring.iter_mut().zip(&prepared) {
                    let action = pipeline.decide(&mut FrameBuf::at_start(f), 60, p, now);
                    delivered += u64::from(action.is_delivery());
                }
                frames += 32;
            })
        });
        // One node owns everything: every frame is delivered, or the figure means nothing.
        assert_eq!(delivered, frames, "{flows} flows: frames not delivered");
        assert_eq!(pipeline.flows().len(), flows.min(frames as u32) as usize);
    }
    group.finish();
}

/// Flow counts of the `decision/one-node` and `decision/memory-floor` rows.
const FLOW_COUNTS: [u32; 4] = [1_000, 100_000, 1_000_000, 10_000_000];

fn flows_label(flows: u32) -> String {
    if flows >= 1_000_000 {
        format!("{}M-flows", flows / 1_000_000)
    } else {
        format!("{}k-flows", flows / 1_000)
    }
}

/// A zeroed, cache-line-aligned array of `bytes`, advised onto huge pages like the flow
/// table's slots when at least 2 MiB, freed on drop.
struct Lines {
    ptr: *mut u64,
    layout: std::alloc::Layout,
}

impl Lines {
    fn new(bytes: usize) -> Lines {
        const HUGE: usize = 2 << 20;
        let align = if bytes >= HUGE { HUGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(bytes, align).expect("a valid layout");
        // SAFETY: the layout has a non-zero size (at least one table line).
        let raw = unsafe { std::alloc::alloc(layout) };
        assert!(!raw.is_null(), "{bytes} bytes for the memory floor");
        if align == HUGE {
            // SAFETY: our own fresh, 2 MiB-aligned allocation; advice only (may be refused).
            unsafe { libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `raw` is valid for `bytes` bytes of writes; touching them all now keeps page
        // faults out of the measurement.
        unsafe { std::ptr::write_bytes(raw, 0, bytes) };
        Lines {
            ptr: raw.cast(),
            layout,
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.cast(), self.layout) };
    }
}

/// The flow table's memory traffic without the engine: per frame one random 64-byte line of
/// an array as large as the engine's table at that flow count, 32 frames at a time, each
/// frame's line and the next one prefetched first (as `prepare_burst` does), then each line
/// read and written (as a known flow's update does). `decision/one-node` at 10 million flows
/// minus 1 thousand is what the engine pays for its table; the same difference here is what
/// the access pattern alone costs on this machine, with nothing else for the core to do.
fn memory_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision/memory-floor");
    group.throughput(Throughput::Elements(32));
    for flows in FLOW_COUNTS {
        let bytes = FlowTable::slots_for(flows as usize) * SLOT_BYTES;
        let lines = Lines::new(bytes);
        let words = bytes / 8;
        // Tables are whole lines, not a power of two: a line by multiply-shift, as the table's
        // homes are.
        let line_count = (bytes / 64) as u64;
        let mut next = 0u64;
        group.bench_function(format!("burst/{}", flows_label(flows)), |b| {
            b.iter(|| {
                let mut at = [0usize; 32];
                for a in at.iter_mut() {
                    next = if next + 1 == u64::from(flows) {
                        0
                    } else {
                        next + 1
                    };
                    // A random line, the same for the same flow (as a fingerprint's home).
                    let h = next.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
                    let line = ((h * line_count) >> 32) as usize;
                    *a = line * 8;
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: a prefetch never faults; both addresses are inside the array.
                    unsafe {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        _mm_prefetch::<_MM_HINT_T0>(lines.ptr.add(*a).cast());
                        _mm_prefetch::<_MM_HINT_T0>(lines.ptr.add((*a + 8) % words).cast());
                    }
                }
                for &a in &at {
                    // SAFETY: `a + 1 < words`: `a` is a line's first word.
                    unsafe {
                        let seen = lines.ptr.add(a).read_volatile();
                        lines.ptr.add(a + 1).write_volatile(seen.wrapping_add(next));
                    }
                }
            })
        });
    }
    group.finish();
}

/// What one load costs when it depends on the one before (a pointer chase through a random
/// cycle of 64-byte lines), by working-set size (`decision/latency/<size>`): each level of
/// this machine's caches, then its memory, as the engine meets them when its lines, the
/// packet input's and the table's do not fit the level below. No prefetch can help a chase,
/// so this is the latency itself (ns per element).
fn latency(c: &mut Criterion) {
    const CHASE: u64 = 4096;
    let mut group = c.benchmark_group("decision/latency");
    group.throughput(Throughput::Elements(CHASE));
    for (label, bytes) in [
        ("32KiB", 32usize << 10),
        ("1MiB", 1 << 20),
        ("4MiB", 4 << 20),
        ("32MiB", 32 << 20),
        ("256MiB", 256 << 20),
    ] {
        let lines = Lines::new(bytes);
        let n = bytes / 64;
        // A random cyclic order of the lines (Sattolo's shuffle: one cycle through all).
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % i as u64) as usize);
        }
        for (i, &from) in order.iter().enumerate() {
            let to = order[(i + 1) % n];
            // SAFETY: both are line starts inside the array (`from * 8 < bytes / 8`).
            unsafe { lines.ptr.add(from * 8).write((to * 8) as u64) };
        }
        let mut at = 0usize;
        group.bench_function(label, |b| {
            b.iter(|| {
                for _ in 0..CHASE {
                    // SAFETY: every stored value is a line start inside the array.
                    at = unsafe { lines.ptr.add(at).read_volatile() } as usize;
                }
                black_box(at)
            })
        });
    }
    group.finish();
}

/// The bucket hash of eight flow keys at once, with each implementation this CPU runs
/// (`decision/hash8/Scalar`, `Avx2`, `Avx512`): the part of the decision that vector
/// registers speed up.
fn hash8(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision/hash8");
    group.throughput(Throughput::Elements(8 * 128));
    let keys: Vec<[KeyWords; 8]> = (0..128u32)
        .map(|i| {
            std::array::from_fn(|j| {
                let ip = Ipv4Addr::from(0xc613_0000 + i * 8 + j as u32);
                *FlowKey::new(Affinity::None, ip.into(), 1024 + i as u16, 6).words()
            })
        })
        .collect();
    for lanes in Lanes::available() {
        let h = Sip13x8::with(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210, lanes);
        group.bench_function(format!("{lanes:?}"), |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for k in black_box(&keys) {
                    acc ^= h.hash(k).iter().fold(0, |a, h| a ^ h);
                }
                acc
            })
        });
    }
    group.finish();
}

/// The appliance group's 4096 frames of the synthetic mix, each in its own 2 KiB buffer as in
/// an mbuf, with its length.
fn mbuf_like_frames() -> Vec<(Vec<u8>, usize, [u8; 14])> {
    (0..4096)
        .map(|i| {
            let frame = synthetic(i);
            let mut b = vec![0u8; HEADROOM + 2048];
            b[HEADROOM..HEADROOM + frame.len()].copy_from_slice(&frame);
            let ethernet = frame[..14].try_into().unwrap();
            (b, frame.len(), ethernet)
        })
        .collect()
}

/// Appliance mode (`decision/appliance/<delivery>/...`), with `server/burst` for reference (the
/// same frames, no service: each delivered to the host): one node that owns every bucket, a TCP
/// and a UDP service on the cluster address (all ports, 8 backends with static MACs each), and
/// 4096 flows of the synthetic mix, every frame forwarded to its backend. `from_wire` decides
/// frame by frame; `burst` prepares 32 first, as the data plane does. Each frame lies after
/// an mbuf's headroom, where GUE's outer headers are written. Each frame's Ethernet header is
/// restored before its decision (DSR rewrote it the round before, GUE wrote over it), as a
/// NIC would hand over a fresh frame: that copy is counted.
fn appliance(c: &mut Criterion) {
    use clonecluster::appliance::Services;
    use clonecluster::config::Config;
    use clonecluster::pipeline::Action;
    const SECRET: &[u8] = b"bench-secret-0123456789abcdef";
    let members = [Member::new(1, 100).unwrap()];
    let snapshot = Arc::new(stable_snapshot(
        &OwnershipTable::build(1, &members).unwrap(),
    ));
    let mut group = c.benchmark_group("decision/appliance");
    // The reference: the same frames in server mode (no service), each delivered to the host.
    {
        let mut pipeline = Pipeline::new(
            identity(1),
            SECRET,
            Arc::clone(&snapshot),
            TableSizes::default(),
        );
        let mut bufs = mbuf_like_frames();
        let mut prepared = [Prepared::default(); 32];
        let mut now = 0u64;
        group.throughput(Throughput::Elements(bufs.len() as u64));
        group.bench_function("server/burst", |b| {
            b.iter(|| {
                for chunk in bufs.chunks_mut(32) {
                    now += 32 * 50;
                    let views: [Option<&[u8]>; 32] = std::array::from_fn(|i| {
                        chunk
                            .get(i)
                            .map(|(b, len, _)| &b[HEADROOM..HEADROOM + *len])
                    });
                    pipeline.prepare_burst(black_box(&views[..chunk.len()]), &mut prepared);
                    for ((buf, len, _), p) in chunk.iter_mut().zip(&prepared) {
                        let mut buf = FrameBuf::new(black_box(buf), HEADROOM);
                        black_box(pipeline.decide(&mut buf, *len, p, now));
                    }
                }
            })
        });
    }
    for delivery in ["dsr", "gue"] {
        let mut text = String::from(
            "cluster:\n  ip: 198.18.0.1\n  mac: 02:cc:00:00:00:01\n  secret_file: secret\n\
             node:\n  id: 1\n  mac: 02:00:00:00:00:01\n  ip: 198.18.0.2\n\
             dataplane:\n  eal_args: [--no-huge]\n\
             \x20 wire_port: { vdev: \"net_null0\" }\n  host_port: { vdev: \"net_null1\" }\n\
             services:\n",
        );
        for (s, proto) in ["tcp", "udp"].iter().enumerate() {
            text += &format!(
                "  - name: bench-{proto}\n    addresses: [198.18.0.1]\n    protocol: {proto}\n    \
                 ports: [\"1-65535\"]\n    delivery: {delivery}\n    backends:\n"
            );
            for n in 1..=8 {
                text += &format!(
                    "      - {{ ip: 198.18.1.{n}, mac: \"02:bb:00:00:{s:02x}:{n:02x}\" }}\n"
                );
            }
        }
        let config = Config::parse(&text, "bench.yaml").expect("bench config");
        config.validate("bench.yaml").expect("bench config");
        let mut id = identity(1);
        id.node_ip = Some(Ipv4Addr::new(198, 18, 0, 2));
        let mut pipeline = Pipeline::new(id, SECRET, Arc::clone(&snapshot), TableSizes::default());
        pipeline.set_services(Arc::new(Services::compile(&config, SECRET, None)));
        let mut bufs = mbuf_like_frames();
        let mut now = 0u64;
        let (mut decided, mut forwarded) = (0u64, 0u64);
        let mut carry_out = |action: Action| match action {
            Action::ToBackend | Action::Encapsulated { .. } => forwarded += 1,
            other => {
                black_box(other);
            }
        };
        group.throughput(Throughput::Elements(bufs.len() as u64));
        group.bench_function(format!("{delivery}/from_wire"), |b| {
            b.iter(|| {
                for (buf, len, ethernet) in bufs.iter_mut() {
                    now += 50;
                    // The last round rewrote the Ethernet header: a fresh frame from the NIC.
                    buf[HEADROOM..HEADROOM + 14].copy_from_slice(ethernet);
                    let mut buf = FrameBuf::new(black_box(buf), HEADROOM);
                    carry_out(pipeline.from_wire(&mut buf, *len, now));
                    decided += 1;
                }
            })
        });
        let mut prepared = [Prepared::default(); 32];
        group.bench_function(format!("{delivery}/burst"), |b| {
            b.iter(|| {
                for chunk in bufs.chunks_mut(32) {
                    now += 32 * 50;
                    for (buf, _, ethernet) in chunk.iter_mut() {
                        buf[HEADROOM..HEADROOM + 14].copy_from_slice(ethernet);
                    }
                    let views: [Option<&[u8]>; 32] = std::array::from_fn(|i| {
                        chunk
                            .get(i)
                            .map(|(b, len, _)| &b[HEADROOM..HEADROOM + *len])
                    });
                    // One node: nothing is another node's.
                    pipeline.prepare_burst(black_box(&views[..chunk.len()]), &mut prepared);
                    for ((buf, len, _), p) in chunk.iter_mut().zip(&prepared) {
                        let mut buf = FrameBuf::new(black_box(buf), HEADROOM);
                        carry_out(pipeline.decide(&mut buf, *len, p, now));
                        decided += 1;
                    }
                }
            })
        });
        // Every frame went to a backend, or the figure means nothing (nothing ran: `--list`).
        assert_eq!(forwarded, decided, "{delivery}: frames not forwarded");
        let sent: u64 = pipeline.appliance_counts().frames.iter().sum();
        assert_eq!(sent, forwarded, "{delivery}: frames not counted");
    }
    group.finish();
}

criterion_group!(
    benches,
    decision,
    flows,
    memory_floor,
    latency,
    hash8,
    appliance
);
criterion_main!(benches);
