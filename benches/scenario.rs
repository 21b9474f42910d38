//! The pipeline bench's scenarios (the rows of its table, from the environment) and the
//! traffic each sends: the generated flow mix or a capture, written into one pcap per packet
//! core.
//!
//! Owns what a row is and which frames it sends; never starts a program or measures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clonecluster::config::Delivery;
use clonecluster::testkit::build::{
    arp_request, icmp_echo, ipv4, ipv6, tcp, udp, udp_fragments, PSH_ACK, SYN,
};

use crate::appliance;
use crate::common::env_or;

/// Buffer bytes per mbuf (headroom included) for both programs: minimum-size frames fit.
pub const MBUF_SIZE: u32 = 384;
/// The same for a capture given with `CC_BENCH_PCAP` (frames up to 2048 bytes).
pub const MBUF_SIZE_PCAP: u32 = 2048 + 128;
/// Bytes an mbuf takes in the pool besides its buffer (rte_mbuf header, mempool header).
pub const MBUF_OVERHEAD: u64 = 128 + 64;

/// One scenario: a row of the table.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub flows: u32,
    pub ipv6_pct: u32,
    pub nodes: u8,
    pub handoff_pct: u8,
    pub cores: usize,
    /// Flow-table capacity per core.
    pub capacity: u32,
    /// Frames per flow: 3 (TCP: SYN and two data segments) or 1 (one data segment).
    pub fpf: u32,
    /// A capture to send instead of the generated mix (`CC_BENCH_PCAP`).
    pub pcap: Option<PathBuf>,
    /// `dataplane.hash_lanes` of the engine: auto, scalar, avx2 or avx512.
    pub lanes: String,
    /// Use hugepages when present (`huge=0` / `CC_BENCH_HUGE=0`: `--no-huge` regardless).
    pub huge: bool,
    /// Where the forwarder's wire frames come from.
    pub input: Input,
    /// Where owned flow frames go: the host (`local`, server mode) or a backend out of the
    /// wire port (`dsr`, `gue`, `ipip`: see the `appliance` module).
    pub delivery: Delivery,
}

/// The wire port's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `net_pcap` with `infinite_rx`: the forwarder's own core copies each frame out of the
    /// file's mbufs (cold at 100 thousand flows and more).
    Pcap,
    /// `net_memif` (client) fed by a generator on the other CPU: testpmd forwarding the same
    /// files into the memif server with TX retry. The forwarder copies each frame out of a ring
    /// the generator just wrote, as a NIC's DMA leaves frames in the cache.
    Memif,
}

impl Input {
    pub fn parse(v: &str) -> Input {
        match v {
            "pcap" => Input::Pcap,
            "memif" => Input::Memif,
            _ => panic!("input: `{v}` is not pcap or memif"),
        }
    }
}

impl Scenario {
    pub fn from_env() -> Scenario {
        let mut s = Scenario {
            flows: env_or("CC_BENCH_FLOWS", 1000),
            ipv6_pct: env_or("CC_BENCH_IPV6", 10),
            nodes: env_or("CC_BENCH_NODES", 1),
            handoff_pct: env_or("CC_BENCH_HANDOFF", 0),
            cores: env_or("CC_BENCH_CORES", 1),
            capacity: 0,
            fpf: 0,
            pcap: std::env::var_os("CC_BENCH_PCAP").map(PathBuf::from),
            lanes: std::env::var("CC_BENCH_LANES").unwrap_or_else(|_| "auto".into()),
            huge: env_or("CC_BENCH_HUGE", 1) != 0,
            input: Input::parse(&std::env::var("CC_BENCH_INPUT").unwrap_or_else(|_| "pcap".into())),
            delivery: appliance::parse(
                &std::env::var("CC_BENCH_DELIVERY").unwrap_or_else(|_| "local".into()),
            ),
        };
        s.capacity = env_or("CC_BENCH_CAPACITY", 0);
        s.fpf = env_or("CC_BENCH_FPF", 0);
        s
    }

    /// Fills in the defaults that depend on other fields.
    /// A table per core that holds every flow of the files: the flows, and the UDP datagram
    /// after every 128th flow frame (in fragments: a flow of its own). Without the datagrams'
    /// flows, a table of exactly `flows` overflowed at 10 million flows and every pass over the
    /// files evicted and re-inserted flows (a deliberately undersized table is `capacity=`).
    fn default_capacity(&self) -> u32 {
        let datagrams = (u64::from(self.flows) * u64::from(self.fpf)).div_ceil(128);
        let all = u64::from(self.flows) + datagrams;
        let per_core = all.div_ceil(self.cores as u64);
        u32::try_from(per_core).unwrap_or(u32::MAX).max(1 << 18)
    }

    pub fn resolved(mut self) -> Scenario {
        self.cores = self.cores.clamp(1, 2);
        if self.fpf == 0 {
            self.fpf = if self.flows > 1_000_000 { 1 } else { 3 };
        }
        self.fpf = if self.fpf >= 3 { 3 } else { 1 };
        if self.capacity == 0 {
            self.capacity = self.default_capacity();
        }
        self.capacity = self.capacity.clamp(1024, 1 << 26);
        assert!(
            self.input == Input::Pcap || self.cores == 1,
            "input=memif needs the second CPU for its generator: only with cores=1"
        );
        self
    }

    pub fn apply(&mut self, spec: &str) {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .unwrap_or_else(|| panic!("CC_BENCH_SCENARIOS: `{part}` is not key=value"));
            if k == "lanes" {
                self.lanes = v.to_string();
                continue;
            }
            if k == "input" {
                self.input = Input::parse(v);
                continue;
            }
            if k == "delivery" {
                self.delivery = appliance::parse(v);
                continue;
            }
            let n: u64 = v
                .parse()
                .unwrap_or_else(|_| panic!("CC_BENCH_SCENARIOS: `{part}`: not a number"));
            match k {
                "flows" => self.flows = n as u32,
                "ipv6" => self.ipv6_pct = n as u32,
                "nodes" => self.nodes = n as u8,
                "handoff" => self.handoff_pct = n as u8,
                "cores" => self.cores = n as usize,
                "capacity" => self.capacity = n as u32,
                "fpf" => self.fpf = n as u32,
                "huge" => self.huge = n != 0,
                _ => panic!("CC_BENCH_SCENARIOS: unknown key `{k}`"),
            }
        }
    }

    pub fn label(&self) -> String {
        let flows = match self.flows {
            f if f >= 1_000_000 && f % 1_000_000 == 0 => format!("{}M", f / 1_000_000),
            f if f >= 1000 && f % 1000 == 0 => format!("{}k", f / 1000),
            f => f.to_string(),
        };
        let mut l = match &self.pcap {
            Some(p) => format!(
                "pcap {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            ),
            None => format!("{flows} flows"),
        };
        if self.nodes > 1 {
            l += &format!(" N={}", self.nodes);
        }
        if self.handoff_pct > 0 {
            l += &format!(" ho={}%", self.handoff_pct);
        }
        if self.cores > 1 {
            l += &format!(" {}c", self.cores);
        }
        if self.ipv6_pct != 10 {
            l += &format!(" v6={}%", self.ipv6_pct);
        }
        if self.capacity != self.default_capacity() {
            l += &format!(" cap={}", self.capacity);
        }
        if self.input == Input::Memif {
            l += " memif";
        }
        if self.delivery.is_appliance() {
            l += &format!(" {}", self.delivery.name());
        }
        if self.lanes != "auto" {
            l += &format!(" {}", self.lanes);
        }
        l
    }

    /// Buffer bytes per mbuf.
    pub fn mbuf_size(&self) -> u32 {
        if self.pcap.is_some() {
            MBUF_SIZE_PCAP
        } else {
            MBUF_SIZE
        }
    }

    /// Bytes one mbuf takes in the pool.
    pub fn mbuf_footprint(&self) -> u64 {
        u64::from(self.mbuf_size()) + MBUF_OVERHEAD
    }
}

/// Frame `round` (0..3) of flow `i`: TCP SYN then data, or UDP; with one frame per flow, the
/// data segment.
pub fn flow_frame(i: u32, round: u32, ipv6_pct: u32) -> Vec<u8> {
    let client = i % 65536;
    let sport = 1024 + ((i / 65536) % 64000) as u16 + (i % 7) as u16 * 1000;
    let mac = [0x02, 0xc1, 0, (client >> 8) as u8, client as u8, 0];
    let v4 = [198, 19, (client >> 8) as u8, client as u8];
    let mut v6 = [0u8; 16];
    v6[..8].copy_from_slice(&[0x20, 0x01, 0, 2, 0, 1, 0, 0]);
    v6[12..].copy_from_slice(&i.to_be_bytes());
    let is_v6 = (i.wrapping_mul(2654435761) % 100) < ipv6_pct;
    let is_tcp = i % 10 < 7;
    let (mut l4, proto, csum_at) = if is_tcp {
        let (flags, payload): (u8, &[u8]) = if round == 0 {
            (SYN, b"")
        } else {
            (PSH_ACK, b"GET / HTTP/1.1\r\n")
        };
        let seq = 1000 + round * 16;
        (tcp(sport, seq, 5000, flags, payload), 6, 16)
    } else {
        (udp(sport, b"query-0123456789"), 17, 6)
    };
    let mut f = if is_v6 {
        ipv6(mac, v6, proto, &mut l4, csum_at)
    } else {
        ipv4(mac, v4, proto, &mut l4, Some(csum_at))
    };
    f.resize(f.len().max(60), 0);
    f
}

/// The frames of the scenario, in file order, each with its queue (packet core): the frames of
/// `CC_BENCH_PCAP` dealt round-robin, or the generated flow mix.
pub fn traffic(s: &Scenario) -> Box<dyn Iterator<Item = (usize, Vec<u8>)> + '_> {
    match &s.pcap {
        Some(path) => Box::new(capture(path, s.cores)),
        None => Box::new(flow_mix(s)),
    }
}

/// The frames of a capture, frame `n` to queue `n mod cores`.
pub fn capture(path: &Path, cores: usize) -> impl Iterator<Item = (usize, Vec<u8>)> {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("CC_BENCH_PCAP {}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("CC_BENCH_PCAP {}: not a pcap file: {e}", path.display()));
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet.unwrap_or_else(|e| panic!("CC_BENCH_PCAP {}: {e}", path.display()));
        frames.push(packet.data.into_owned());
    }
    frames
        .into_iter()
        .enumerate()
        .map(move |(n, f)| (n % cores, f))
}

/// The generated flow mix: flow frames, and after every 64th an ARP request, every 97th an
/// ICMP echo request, every 128th the two fragments of a UDP datagram.
pub fn flow_mix(s: &Scenario) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
    let rounds: &'static [u32] = if s.fpf == 1 { &[1] } else { &[0, 1, 2] };
    rounds.iter().enumerate().flat_map(move |(r, &round)| {
        (0..s.flows).flat_map(move |i| {
            let queue = i as usize % s.cores;
            let mut out = Vec::with_capacity(3);
            out.push((queue, flow_frame(i, round, s.ipv6_pct)));
            // Flow frames so far.
            let n = (r as u32).wrapping_mul(s.flows).wrapping_add(i + 1);
            let client = i % 65536;
            let mac = [0x02, 0xc1, 0, (client >> 8) as u8, client as u8, 0];
            let v4 = [198, 19, (client >> 8) as u8, client as u8];
            if n.is_multiple_of(64) {
                out.push((queue, arp_request(mac, v4)));
            }
            if n.is_multiple_of(97) {
                let mut f = icmp_echo(mac, v4, n as u16);
                f.resize(f.len().max(60), 0);
                out.push((queue, f));
            }
            if n.is_multiple_of(128) {
                let sport = 40_000 + (n / 128 % 20_000) as u16;
                for f in udp_fragments(mac, v4, sport, n as u16) {
                    out.push((queue, f));
                }
            }
            out
        })
    })
}

/// Writes one pcap per queue; returns the frame count of each.
pub fn write_pcaps(paths: &[PathBuf], frames: impl Iterator<Item = (usize, Vec<u8>)>) -> Vec<u64> {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let mut writers: Vec<_> = paths
        .iter()
        .map(|p| {
            let file =
                std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(p).unwrap());
            PcapWriter::with_header(file, PcapHeader::default()).unwrap()
        })
        .collect();
    let mut counts = vec![0u64; paths.len()];
    for (queue, f) in frames {
        let ts = Duration::from_micros(counts[queue]);
        writers[queue]
            .write_packet(&PcapPacket::new(ts, f.len() as u32, &f))
            .unwrap();
        counts[queue] += 1;
    }
    counts
}
