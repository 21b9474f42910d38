//! The whole pipeline (parse, classify, flow table, ownership decision, forward) on one core
//! against `dpdk-testpmd` in `io`, `macswap` and `5tswap` modes: same vdevs, same traffic, same
//! run, rounds alternated, medians compared.
//!
//! 1. Generates a flow mix into a pcap: `CC_BENCH_FLOWS` flows (default 1000), each TCP (SYN,
//!    then two data segments) or UDP (three datagrams), IPv4 clients from 198.19.0.0/16 and a
//!    share of IPv6 clients from 2001:2:0:1::/64, all to the cluster (02:cc:00:00:00:01,
//!    198.18.0.1, 2001:2::1); plus ARP requests for the cluster address and ICMP echo requests.
//!    Frames are minimum size (60 bytes + FCS).
//! 2. Runs the real binary with the wire port `net_pcap0,rx_pcap=FILE,infinite_rx=1` (the file
//!    loops from memory) and the host port `net_null1,no-rx=1` on one core; rate = wire_rx /
//!    elapsed. Then testpmd over the same two vdevs; its rate is port 0's Rx-pps.
//! 3. Correctness gate: the share of wire frames the engine delivered to the host and answered
//!    on the wire must match what [`clonecluster::replay::replay`] computes for the same file
//!    with one node (within 1 percentage point), or the bench exits non-zero.
//! 4. Memory: the flow table's footprint at 10 million flows, from `FlowTable::slot_count`.
//!
//! The engine runs as a lone node: with no peers it owns every bucket, so every frame takes the
//! full path (flow lookup/insert, owner lookup, forward); a node of an N-node cluster drops
//! (N-1)/N of the flows after the same work and forwards fewer.
//!
//! `net_pcap` in `infinite_rx` mode keeps the whole file in mbufs and copies each frame into a
//! fresh mbuf on receive (both programs pay that copy). The pool is sized to the file, so the
//! flow count is bounded by memory: ~2.3 KiB per frame, ~2.5 frames per flow.
//!
//! Environment: `CC_BENCH_FLOWS` (default 1000), `CC_BENCH_IPV6` (share of flows in percent,
//! default 10), `CC_BENCH_SECS` (per run, default 3), `CC_BENCH_ROUNDS` (default 3),
//! `CC_BENCH_CORE` (forwarding core, default 1), `CC_BENCH_DIR` (keep the pcap and config there
//! instead of a temporary directory, e.g. to `perf record` the engine by hand).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clonecluster::cluster::{FlowTable, FlowTimeouts, BUCKETS};
use clonecluster::config::Config;

mod common;

use common::{core, env_or, median, secs};

const ENGINE: &str = env!("CARGO_BIN_EXE_clonecluster");
const CLUSTER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 1];
const CLUSTER_IP: [u8; 4] = [198, 18, 0, 1];
const CLUSTER_IP6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Bytes of one flow-table slot (see `cluster::flow_table`'s module doc).
const SLOT_BYTES: usize = 56;
/// Allowed difference between the engine's and replay's shares, in percentage points.
const TOLERANCE_PCT: f64 = 1.0;

// ---- traffic ------------------------------------------------------------------------------

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = chunks.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(80);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet + IPv4 (+ the L4 header and payload `l4`, whose checksum at `csum_at` is filled in).
fn ipv4(mac: [u8; 6], src: [u8; 4], proto: u8, l4: &mut [u8], csum_at: Option<usize>) -> Vec<u8> {
    let mut f = ethernet(mac, CLUSTER_MAC, 0x0800);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&CLUSTER_IP);
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    if let Some(at) = csum_at {
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src);
        pseudo[4..8].copy_from_slice(&CLUSTER_IP);
        pseudo[9] = proto;
        pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        let c = checksum(&[&pseudo, l4]);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

fn ipv6(mac: [u8; 6], src: [u8; 16], proto: u8, l4: &mut [u8], csum_at: usize) -> Vec<u8> {
    let mut f = ethernet(mac, CLUSTER_MAC, 0x86dd);
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    ip[6] = proto;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&CLUSTER_IP6);
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src);
    pseudo[16..32].copy_from_slice(&CLUSTER_IP6);
    pseudo[32..36].copy_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo[39] = proto;
    let c = checksum(&[&pseudo, l4]);
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

fn tcp(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

fn arp_request(mac: [u8; 6], src: [u8; 4]) -> Vec<u8> {
    let mut f = ethernet(mac, [0xff; 6], 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&CLUSTER_IP);
    f
}

fn icmp_echo(mac: [u8; 6], src: [u8; 4], seq: u16) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0, 0x12, 0x34];
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(b"clonecluster-ping");
    let c = checksum(&[&i]);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(mac, src, 1, &mut i, None)
}

/// The frames of the flow mix, in the order they are written.
fn traffic(flows: u32, ipv6_pct: u32) -> Vec<Vec<u8>> {
    const SYN: u8 = 0x02;
    const PSH_ACK: u8 = 0x18;
    // Frame `round` (0..3) of flow `i`.
    let frame = |i: u32, round: u32| -> Vec<u8> {
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
    };
    let mut out = Vec::with_capacity(flows as usize * 3 + flows as usize / 16);
    for round in 0..3 {
        for i in 0..flows {
            out.push(frame(i, round));
            let n = out.len() as u32;
            let client = i % 65536;
            let mac = [0x02, 0xc1, 0, (client >> 8) as u8, client as u8, 0];
            let v4 = [198, 19, (client >> 8) as u8, client as u8];
            if n.is_multiple_of(64) {
                out.push(arp_request(mac, v4));
            }
            if n.is_multiple_of(97) {
                let mut f = icmp_echo(mac, v4, n as u16);
                f.resize(f.len().max(60), 0);
                out.push(f);
            }
        }
    }
    out
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = PcapWriter::with_header(file, PcapHeader::default()).unwrap();
    for (n, f) in frames.iter().enumerate() {
        let ts = Duration::from_micros(n as u64);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

// ---- programs -------------------------------------------------------------------------------

struct Setup {
    dir: PathBuf,
    pcap: PathBuf,
    /// Flow-table capacity per core: the flow count, at least the engine's default.
    flow_capacity: u32,
    /// Mbufs: the whole file plus room for the rings.
    mbufs: u32,
    /// EAL memory in MiB.
    mem_mb: u32,
}

impl Setup {
    fn wire_vdev(&self) -> String {
        format!("net_pcap0,rx_pcap={},infinite_rx=1", self.pcap.display())
    }

    fn config(&self) -> PathBuf {
        let config = self.dir.join("bench.yaml");
        {
            std::fs::write(self.dir.join("secret"), b"bench-secret-0123456789abcdef").unwrap();
            std::fs::write(
                &config,
                format!(
                    r#"cluster:
  ip: 198.18.0.1
  ip6: 2001:2::1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  eal_args: [--no-huge, -m, "{mem}", --log-level=lib.eal:warning]
  file_prefix: cc-bench-pipeline-{pid}
  wire_port: {{ vdev: "{wire}" }}
  host_port: {{ vdev: "net_null1,no-rx=1" }}
  cores: [{core}]
  idle: busy
  pool_size: {mbufs}
  flow_capacity: {capacity}
"#,
                    mem = self.mem_mb,
                    pid = std::process::id(),
                    wire = self.wire_vdev(),
                    core = core(),
                    mbufs = self.mbufs,
                    capacity = self.flow_capacity,
                ),
            )
            .unwrap();
        }
        config
    }
}

/// What one engine run reported.
struct EngineRun {
    rate: f64,
    wire_rx: u64,
    host_tx: u64,
    wire_tx: u64,
    not_owned: u64,
}

fn engine_run(setup: &Setup) -> EngineRun {
    let config = setup.config();
    let mut child = Command::new(ENGINE)
        .args(["run", "--json", "--config"])
        .arg(&config)
        .current_dir(&setup.dir)
        .env("CLONECLUSTER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the engine");
    // Start the clock when the packet loops start: loading a large file into mbufs takes
    // seconds. Keep stderr in a file for the failure message.
    let stderr = child.stderr.take().unwrap();
    let log = setup.dir.join("engine.err");
    let (tx, rx) = std::sync::mpsc::channel();
    let copier = std::thread::spawn(move || {
        let mut file = std::fs::File::create(log).unwrap();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(file, "{line}");
            if line.contains("running on cores") {
                let _ = tx.send(());
            }
        }
    });
    let _ = rx.recv_timeout(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(secs()));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().expect("engine output");
    let _ = copier.join();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "engine JSON report: {e}; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(setup.dir.join("engine.err")).unwrap_or_default()
        )
    });
    let total = &report["total"];
    let get = |k: &str| total[k].as_u64().unwrap_or(0);
    let wire_rx = get("wire_rx");
    EngineRun {
        rate: wire_rx as f64 / report["elapsed_secs"].as_f64().unwrap(),
        wire_rx,
        host_tx: get("host_tx"),
        wire_tx: get("wire_tx"),
        not_owned: total["dropped"][0].as_u64().unwrap_or(0),
    }
}

/// Frames per second testpmd receives on the pcap port in `mode`, from its per-second Rx-pps
/// readings, the first one (warm-up) left out.
fn testpmd_rate(setup: &Setup, mode: &str) -> Option<f64> {
    let core = core();
    let main = if core == 0 { 1 } else { 0 };
    let mut child = Command::new("dpdk-testpmd")
        .args([
            "--no-huge",
            "-m",
            &setup.mem_mb.to_string(),
            "--no-pci",
            "--log-level=lib.eal:warning",
            &format!("--file-prefix=cc-bench-pl-testpmd-{}", std::process::id()),
            &format!("--vdev={}", setup.wire_vdev()),
            "--vdev=net_null1,no-rx=1",
            "-l",
            &format!("{main},{core}"),
            "--main-lcore",
            &main.to_string(),
            "--",
            &format!("--total-num-mbufs={}", setup.mbufs + 1),
            &format!("--forward-mode={mode}"),
            "--auto-start",
            "--stats-period=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take().unwrap();
    // The deadline runs from the first reading (loading a large file takes seconds).
    let mut deadline = Instant::now() + Duration::from_secs(120);
    let mut readings: Vec<f64> = Vec::new();
    let mut port: Option<u32> = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let line = line.trim();
        if let Some(rest) = line.split("NIC statistics for port").nth(1) {
            port = rest.split_whitespace().next()?.parse().ok();
        }
        if let Some(rest) = line.strip_prefix("Rx-pps:") {
            if port == Some(0) {
                if readings.is_empty() {
                    deadline = Instant::now() + Duration::from_secs(secs() + 1);
                }
                readings.push(rest.split_whitespace().next()?.parse().ok()?);
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    common::stop_and_average(&mut child, &readings)
}

fn cpu_hz() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some(mhz * 1e6)
}

fn memory_report() {
    let timeouts = FlowTimeouts::default();
    println!(
        "flow table memory (one core; slot {SLOT_BYTES} B + {BUCKETS} x u32 per-bucket counts):"
    );
    for capacity in [1_000usize, 1_000_000, 10_000_000] {
        let t = FlowTable::new(capacity, timeouts, &[7; 16]);
        let bytes = t.slot_count() * SLOT_BYTES + BUCKETS * 4;
        // The pipeline also keeps a learned-flows table of a quarter of the size.
        let learned = FlowTable::new((capacity / 4).max(1024), timeouts, &[7; 16]);
        let learned_bytes = learned.slot_count() * SLOT_BYTES + BUCKETS * 4;
        println!(
            "  {capacity:>10} flows: {:>7} slots, {:>8.1} MiB, {:>5.1} B per tracked flow when full; \
             with the learned table: {:>8.1} MiB",
            t.slot_count(),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / capacity as f64,
            (bytes + learned_bytes) as f64 / (1 << 20) as f64,
        );
    }
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let flows: u32 = env_or("CC_BENCH_FLOWS", 1000);
    let ipv6_pct: u32 = env_or("CC_BENCH_IPV6", 10);
    let rounds: usize = env_or("CC_BENCH_ROUNDS", 3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var("CC_BENCH_DIR") {
        Ok(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        Err(_) => tmp.path().to_path_buf(),
    };

    let frames = traffic(flows, ipv6_pct);
    let pcap = dir.join("traffic.pcap");
    write_pcap(&pcap, &frames);
    let mbufs = ((frames.len() as u32 + 8192) | 1023).max(8191);
    // ~2.3 KiB per mbuf (the EAL's allocator needs some slack above that), plus room for the
    // rest of the EAL and the engine's tables.
    let mem_mb = (mbufs as u64 * 3500 / (1 << 20) + 768) as u32;
    let setup = Setup {
        dir: dir.clone(),
        pcap,
        flow_capacity: flows.next_power_of_two().clamp(1 << 18, 1 << 26),
        mbufs,
        mem_mb,
    };
    eprintln!(
        "{flows} flows ({ipv6_pct}% IPv6), {} frames in {}, pool {mbufs} mbufs, -m {mem_mb}",
        frames.len(),
        setup.pcap.display()
    );

    // What the engine must do with these frames: replay them (two passes, as the engine sees
    // the file loop) through one simulated node.
    let loaded = Config::load(&setup.config()).expect("bench config");
    let twice = frames
        .iter()
        .chain(frames.iter())
        .enumerate()
        .map(|(n, f)| (n as u64 * 1000, f.clone()));
    let expected = clonecluster::replay::replay(&loaded, 1, twice).expect("replay");
    let node = &expected.nodes[0];
    let exp_host = (node.delivered + node.shared) as f64 / expected.frames as f64;
    let exp_wire = node.answered as f64 / expected.frames as f64;

    let modes = ["io", "macswap", "5tswap"];
    let mut engine = Vec::new();
    let mut testpmd: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut wrong = Vec::new();
    for round in 1..=rounds {
        let run = engine_run(&setup);
        // Before the control thread publishes the first snapshot (~0.4 s) the node owns nothing
        // and drops what it receives as not owned; a lone node owns everything after that.
        let decided = run.wire_rx.saturating_sub(run.not_owned).max(1) as f64;
        let host = run.host_tx as f64 / decided;
        let wire = run.wire_tx as f64 / decided;
        eprintln!(
            "round {round}: clonecluster {:.2} Mpps (wire_rx {}, before first snapshot {}, \
             to host {:.2}% vs replay {:.2}%, answered {:.2}% vs replay {:.2}%)",
            run.rate / 1e6,
            run.wire_rx,
            run.not_owned,
            host * 100.0,
            exp_host * 100.0,
            wire * 100.0,
            exp_wire * 100.0
        );
        if (host - exp_host).abs() * 100.0 > TOLERANCE_PCT
            || (wire - exp_wire).abs() * 100.0 > TOLERANCE_PCT
            || run.wire_rx == 0
        {
            wrong.push(round);
        }
        engine.push(run.rate);
        for (i, mode) in modes.iter().enumerate() {
            if let Some(rate) = testpmd_rate(&setup, mode) {
                eprintln!("round {round}: testpmd {mode} {:.2} Mpps", rate / 1e6);
                testpmd[i].push(rate);
            }
        }
    }

    let hz = cpu_hz();
    let cycles = |rate: f64| match hz {
        Some(hz) => format!("{:.0}", hz / rate),
        None => "?".into(),
    };
    let engine = median(engine);
    let rates: Vec<Option<f64>> = testpmd
        .into_iter()
        .map(|r| (!r.is_empty()).then(|| median(r)))
        .collect();
    println!(
        "pipeline, {flows} flows ({ipv6_pct}% IPv6, TCP/UDP 7:3, ARP 1/64, ICMP 1/97), {} frames \
         of 60 B looping from net_pcap0 (infinite_rx) to net_null1, one core, {} s per run, \
         median of {rounds} rounds",
        frames.len(),
        secs(),
    );
    let header: String = modes
        .iter()
        .map(|m| format!(" {:>11}", format!("/ {m}")))
        .collect();
    println!(
        "{:<22} {:>8} {:>14}{header}",
        "program", "Mpps", "cycles/frame*"
    );
    let row = |name: &str, rate: f64| {
        let ratios: String = rates
            .iter()
            .map(|r| match r {
                Some(r) => format!(" {:>11.3}", rate / r),
                None => format!(" {:>11}", "-"),
            })
            .collect();
        println!(
            "{name:<22} {:>8.2} {:>14}{ratios}",
            rate / 1e6,
            cycles(rate)
        );
    };
    row("clonecluster", engine);
    for (mode, rate) in modes.iter().zip(&rates) {
        match rate {
            Some(r) => row(&format!("dpdk-testpmd {mode}"), *r),
            None => println!("dpdk-testpmd {mode} did not run (apt-get install dpdk)"),
        }
    }
    println!(
        "* cycles/frame = cpu MHz from /proc/cpuinfo x 1e6 / rate ({}), not a TSC measurement",
        hz.map_or("unknown".into(), |h| format!("{:.0} MHz", h / 1e6))
    );
    println!(
        "correctness: replay (1 node) to host {:.2}%, answered {:.2}%, dropped {} of {} frames",
        exp_host * 100.0,
        exp_wire * 100.0,
        node.dropped,
        expected.frames
    );
    memory_report();
    if !wrong.is_empty() {
        eprintln!(
            "FAIL: the engine's delivered/answered shares differ from replay's by more than \
             {TOLERANCE_PCT} point(s) in round(s) {wrong:?}"
        );
        std::process::exit(1);
    }
}
