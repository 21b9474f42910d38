//! The whole pipeline (parse, classify, flow table, ownership decision, forward) against
//! `dpdk-testpmd` in `io`, `macswap` and `5tswap` modes: same vdevs, same traffic, same run,
//! rounds alternated, medians compared. One row per scenario.
//!
//! 1. Generates a flow mix into a pcap per packet core: `flows` flows, each TCP (SYN, then two
//!    data segments; with one frame per flow, one data segment) or UDP, IPv4 clients from
//!    198.19.0.0/16 and a share of IPv6 clients from 2001:2:0:1::/64, all to the cluster
//!    (02:cc:00:00:00:01, 198.18.0.1, 2001:2::1); plus ARP requests for the cluster address
//!    (after 1 in 64 flow frames), ICMP echo requests (1 in 97) and the two IPv4 fragments of a
//!    UDP datagram (1 in 128). Or a capture (`CC_BENCH_PCAP`), its frames dealt to the packet
//!    cores in turn (2176-byte mbufs then). Generated frames are minimum size (60 bytes +
//!    FCS). With two cores, flow `i` goes to queue `i mod 2` (what RSS does with real NICs).
//! 2. Runs the real binary with the wire port `net_pcap0,rx_pcap=FILE[,rx_pcap=FILE2],
//!    infinite_rx=1` (each file loops from memory) and the host port `net_null1,no-rx=1`. The
//!    engine is node 1 of an N-node cluster with P% of the buckets in handoff (acquire phase):
//!    it assumes that ownership from the first frame (`CLONECLUSTER_BENCH_ASSUME`, read by the
//!    binary). Then testpmd over the same vdevs, queues and cores.
//! 3. Measures two ways: wall-clock Mpps, and CPU cycles per frame = the process's CPU time
//!    (from /proc, so time the core spent running OTHER processes is not counted) x the CPU
//!    clock / frames. The engine's frames are read from its `/metrics` while it runs: its
//!    warm-up (from its first frame until every frame of the files has come once and at least
//!    a second has passed — every flow is new in its first frame, so this is the table-filling
//!    rate) is reported on its own, and the figures and ratios are those of the
//!    `CC_BENCH_SECS` after it; testpmd's first second is left out likewise. Ratios are engine
//!    rate / testpmd rate per CPU second (= testpmd cycles / engine cycles); on a shared
//!    machine they are far steadier than wall-clock ratios.
//! 4. Correctness gate: the shares of wire frames the engine delivered to the host, answered
//!    on the wire, dropped and (appliance rows) forwarded to a backend must match what
//!    [`clonecluster::replay::replay_with`] computes for the same files, ownership, services and
//!    table sizes (within 1 percentage point), and every frame offered to the wire port must
//!    be sent or counted unsent, or the bench exits non-zero.
//! 5. Memory: the flow table's footprint per core at 1 thousand to 10 million flows, the
//!    appliance's per-flow and per-service memory, and the packet pool the run needed. The
//!    table's header names the CPU model.
//!
//! Appliance rows (`delivery=dsr|gue|ipip`, [`appliance`]): the engine gets `node.ip` and a TCP
//! and a UDP service on the cluster addresses, all ports, 8 backends each with static MACs;
//! owned flow frames go to their backend out of the wire port (rewritten, or encapsulated in
//! the mbuf's headroom), and testpmd loops the wire port onto itself to pay the same TX.
//!
//! `net_pcap` in `infinite_rx` mode keeps each file in mbufs and copies every frame into a fresh
//! mbuf on receive (both programs pay that copy; at 100 thousand flows and more the file's mbufs
//! are cold and the copy costs the forwarding core ~100 cycles per frame, which a NIC's DMA
//! does not). So a row can take its input from a generator instead (`input=memif`): testpmd on
//! the other CPU forwards the same files into a memif ring, the forwarder's wire port is the
//! memif client and copies frames out of buffers that were just written, as a NIC leaves them
//! in the cache. Those rows count each forwarder's busy time (polls that received frames: the
//! engine's `core_busy_ns_total`, testpmd's `--record-core-cycles`) rather than its CPU time,
//! since the generator may leave it polling an empty ring; their wall-clock Mpps is bounded by
//! what the generator delivers (testpmd io's Mpps in the same row shows it). One core only.
//!
//! Both programs use 384-byte mbufs (256 bytes of frame room), so 10 million frames fit in
//! ~5.5 GiB without hugepages. The EAL's memory is on hugepages when a hugetlbfs is mounted and
//! enough of its pages are free (the row's label then ends in `huge`; the files go with
//! `--huge-unlink`), else `--no-huge` on 4 KiB pages.
//!
//! Environment (defaults in brackets): `CC_BENCH_FLOWS` [1000], `CC_BENCH_IPV6` (share of flows
//! in percent) [10], `CC_BENCH_NODES` (cluster size) [1], `CC_BENCH_HANDOFF` (percent of
//! buckets moving) [0], `CC_BENCH_CORES` (1 or 2) [1], `CC_BENCH_CAPACITY` (flow-table capacity
//! per core) [the files' flows per core, fragmented datagrams' included, at least 262144],
//! `CC_BENCH_FPF` (frames per flow, 1 or 3) [3, or
//! 1 above a million flows], `CC_BENCH_SCENARIOS` (several rows: `;`-separated lists of
//! `flows=,ipv6=,nodes=,handoff=,cores=,capacity=,fpf=,lanes=,huge=,input=,delivery=`
//! overriding the above, e.g. `flows=1000;flows=10000000;nodes=4,handoff=10;delivery=gue`),
//! `CC_BENCH_DELIVERY` (`local`: server mode, owned frames to the host port; `dsr`, `gue` or
//! `ipip`: appliance mode) [local], `CC_BENCH_LANES` (the engine's
//! `dataplane.hash_lanes`: auto, scalar, avx2, avx512) [auto], `CC_BENCH_SECS` (per run) [3],
//! `CC_BENCH_ROUNDS` [3], `CC_BENCH_CORE` (the forwarding core with one core) [1],
//! `CC_BENCH_TESTPMD` (the testpmd modes to run, e.g. `5tswap`, or none for engine A/B runs)
//! [io,macswap,5tswap],
//! `CC_BENCH_HUGE` (0: `--no-huge` even when hugepages are present; `huge=0|1` in a scenario)
//! [1], `CC_BENCH_INPUT` (`pcap` or `memif`; `input=` in a scenario) [pcap], `CC_BENCH_PCAP`
//! (send this capture instead of the generated mix: its frames must be addressed as above, e.g.
//! `tests/fixtures/lab-mix.pcap`), `CC_BENCH_DIR` (keep the pcaps and configs there instead of
//! a temporary directory, e.g. to `perf record` the engine by hand).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clonecluster::cluster::flow_table::SLOT_BYTES;
use clonecluster::cluster::{FlowTable, NodeId, BUCKETS};
use clonecluster::config::{Config, Delivery};
use clonecluster::pipeline::{learned_capacity, TableSizes};

mod appliance;
mod common;
mod scenario;

use common::{core, eal_memory, env_or, median, secs, use_hugepages};
use scenario::{traffic, write_pcaps, Input, Scenario};

const ENGINE: &str = env!("CARGO_BIN_EXE_clonecluster");
/// Allowed difference between the engine's and replay's shares, in percentage points.
const TOLERANCE_PCT: f64 = 1.0;
// ---- programs -------------------------------------------------------------------------------

struct Setup {
    dir: PathBuf,
    scenario: Scenario,
    /// One pcap per queue.
    pcaps: Vec<PathBuf>,
    /// The forwarder's mbufs: every file plus room for the rings (pcap input), or room for the
    /// rings (memif input).
    mbufs: u32,
    /// The forwarder's EAL memory arguments (hugepages when present, else `--no-huge`).
    eal_memory: Vec<String>,
    /// Frames in all the files: one pass over them is the warm-up.
    frames: u64,
    /// Where the engine serves `/metrics` on loopback (its counters, read while it runs).
    metrics_port: u16,
}

impl Setup {
    /// The forwarder's wire port (port 0 of either program).
    fn wire_vdev(&self) -> String {
        match self.scenario.input {
            Input::Pcap => self.pcap_vdev(),
            Input::Memif => format!("net_memif0,role=client,socket={}", memif_socket()),
        }
    }

    /// The files, looping from memory.
    fn pcap_vdev(&self) -> String {
        let files: String = self
            .pcaps
            .iter()
            .map(|p| format!("rx_pcap={},", p.display()))
            .collect();
        format!("net_pcap0,{files}infinite_rx=1")
    }

    /// The packet cores (and, for testpmd, the main lcore's CPU).
    fn cores(&self) -> Vec<u32> {
        if self.scenario.cores == 1 {
            vec![core()]
        } else {
            vec![0, 1]
        }
    }

    fn config(&self) -> PathBuf {
        let config = self.dir.join("bench.yaml");
        std::fs::write(self.dir.join("secret"), b"bench-secret-0123456789abcdef").unwrap();
        let cores: Vec<String> = self.cores().iter().map(u32::to_string).collect();
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
{node_ip}dataplane:
  eal_args: [{mem}, --log-level=lib.eal:warning]
  file_prefix: cc-bench-pipeline-{pid}
  wire_port: {{ vdev: "{wire}" }}
  host_port: {{ vdev: "net_null1,no-rx=1" }}
  cores: [{cores}]
  idle: busy
  pool_size: {mbufs}
  mbuf_size: {mbuf_size}
  flow_capacity: {capacity}
  hash_lanes: {lanes}
control:
  metrics: 127.0.0.1:{metrics}
{services}"#,
                mem = self
                    .eal_memory
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                pid = std::process::id(),
                wire = self.wire_vdev(),
                cores = cores.join(", "),
                mbufs = self.mbufs,
                capacity = self.scenario.capacity,
                lanes = self.scenario.lanes,
                mbuf_size = self.scenario.mbuf_size(),
                metrics = self.metrics_port,
                node_ip = appliance::node_lines(self.scenario.delivery),
                services = appliance::services_section(self.scenario.delivery),
            ),
        )
        .unwrap();
        config
    }

    fn assume(&self) -> String {
        format!(
            "nodes={},handoff={}",
            self.scenario.nodes, self.scenario.handoff_pct
        )
    }
}

/// User + system CPU seconds of a process so far, all its threads.
/// `dpdk-testpmd` over two vdevs (ports 0 and 1) with `mbufs` of the row's size, its main lcore
/// first in `lcores`, forwarding from the start and printing statistics every second; the
/// caller adds its forwarding arguments.
fn testpmd(
    setup: &Setup,
    eal_memory: &[String],
    name: &str,
    ports: [&str; 2],
    lcores: &str,
    mbufs: u32,
) -> Command {
    let mut command = Command::new("dpdk-testpmd");
    command.args(eal_memory).args([
        "--no-pci".to_owned(),
        "--log-level=lib.eal:warning".to_owned(),
        format!("--file-prefix=cc-bench-pl-{name}-{}", std::process::id()),
        format!("--vdev={}", ports[0]),
        format!("--vdev={}", ports[1]),
        format!("--lcores={lcores}"),
        "--main-lcore".to_owned(),
        "0".to_owned(),
        "--".to_owned(),
        format!("--total-num-mbufs={}", mbufs + 1),
        format!("--mbuf-size={}", setup.scenario.mbuf_size()),
        "--auto-start".to_owned(),
        "--stats-period=1".to_owned(),
    ]);
    command
}

/// The memif socket between the generator and the forwarder (abstract namespace: no file).
fn memif_socket() -> String {
    format!("/cc-bench-pipeline-{}.sock", std::process::id())
}

/// The memif input's generator: testpmd on the CPU the forwarder does not use, forwarding the
/// files (`net_pcap`, `infinite_rx`) into the memif server with TX retry, so frames wait for
/// the forwarder instead of being dropped. One per forwarder run, stopped by PID when dropped.
struct Generator {
    child: std::process::Child,
}

impl Generator {
    fn start(setup: &Setup, mbufs: u32, eal_memory: &[String]) -> Generator {
        let spare = if core() == 0 { 1 } else { 0 };
        let commands = setup.dir.join("generator.cmd");
        std::fs::write(
            &commands,
            "set fwd io retry\nset burst tx delay 1 retry 1000\n",
        )
        .unwrap();
        let out = setup.dir.join("generator.out");
        let server = format!("net_memif0,role=server,socket={}", memif_socket());
        let child = testpmd(
            setup,
            eal_memory,
            "gen",
            [&setup.pcap_vdev(), &server],
            &format!("0@{spare},1@{spare}"),
            mbufs,
        )
        .args([
            "--nb-cores=1".to_owned(),
            format!("--cmdline-file={}", commands.display()),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dpdk-testpmd as the memif generator");
        let g = Generator { child };
        // Ready once it forwards (its files are loaded into mbufs when its ports start).
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains("Rx-pps") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the memif generator did not start forwarding: see {}",
                out.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        g
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        common::interrupt(&mut self.child);
    }
}

fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ: 100 on Linux, whatever CONFIG_HZ is).
const USER_HZ: f64 = 100.0;

/// What one program run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    /// Frames per wall-clock second.
    rate: f64,
    /// Frames per CPU second of the process.
    cpu_rate: f64,
    /// Frames per busy second of its packet core(s): time on polls that received frames, as
    /// the engine's `core_busy_ns_total` and testpmd's `--record-core-cycles` count it (memif
    /// rows only, where the generator may leave a forwarder polling an empty ring).
    busy_rate: Option<f64>,
}

impl Run {
    /// Frames per second of the time the row's cycles are counted in.
    fn per_second(&self, input: Input) -> f64 {
        match (input, self.busy_rate) {
            (Input::Memif, Some(busy)) => busy,
            _ => self.cpu_rate,
        }
    }
}

/// What one engine run reported.
struct EngineRun {
    /// From the start until every frame of the files has been received once and at least a
    /// second has passed: every flow is new in its first frame (table inserts), as testpmd's
    /// first, warm-up second is left out of its figures.
    warmup: Run,
    /// The `CC_BENCH_SECS` after the warm-up: flows known.
    run: Run,
    wire_rx: u64,
    host_tx: u64,
    replies: u64,
    dropped: u64,
    tx_unsent: u64,
    /// Frames to backends and wire TX (appliance rows).
    forwarding: appliance::Forwarding,
    /// Frames to backends per wire frame after the warm-up (the per-core
    /// `backend_frames_total` of `/metrics`, summed).
    steady_to_backend: f64,
}

/// The engine's received wire frames, busy nanoseconds and frames sent to backends so far (all
/// cores), from its `/metrics`.
fn scrape(port: u16) -> Option<(u64, u64, u64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let sum = |name: &str| -> Option<u64> {
        let samples: Vec<u64> = body
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|l| l.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    };
    Some((
        sum("clonecluster_wire_rx_frames_total")?,
        sum("clonecluster_core_busy_ns_total")?,
        sum("clonecluster_backend_frames_total")?,
    ))
}

/// A reading of the engine's counters: wall time, CPU seconds, wire frames, busy time.
#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    cpu: f64,
    rx: u64,
    busy_ns: u64,
    to_backend: u64,
}

impl Reading {
    fn take(pid: u32, port: u16) -> Option<Reading> {
        let (rx, busy_ns, to_backend) = scrape(port)?;
        Some(Reading {
            at: Instant::now(),
            cpu: cpu_secs(pid)?,
            rx,
            busy_ns,
            to_backend,
        })
    }

    /// Rates from `self` to `later`.
    fn to(self, later: Reading) -> Run {
        let frames = later.rx.saturating_sub(self.rx) as f64;
        Run {
            rate: frames / later.at.duration_since(self.at).as_secs_f64().max(1e-3),
            cpu_rate: frames / (later.cpu - self.cpu).max(1e-3),
            busy_rate: Some(
                frames / (later.busy_ns.saturating_sub(self.busy_ns) as f64 / 1e9).max(1e-3),
            ),
        }
    }
}

fn engine_run(setup: &Setup) -> EngineRun {
    let config = setup.config();
    let mut child = Command::new(ENGINE)
        .args(["run", "--json", "--config"])
        .arg(&config)
        .current_dir(&setup.dir)
        // The start line ("running on cores") is logged at info by the data plane.
        .env(
            "CLONECLUSTER_LOG",
            "warn,clonecluster::dataplane::worker=info",
        )
        .env("CLONECLUSTER_BENCH_ASSUME", setup.assume())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the engine");
    // Start the clocks when the packet loops start: loading a large file into mbufs takes
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
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        eprintln!("the engine never logged its start (\"running on cores\"): timing is off");
    }
    let pid = child.id();
    let read = || {
        // The metrics endpoint may come up a little after the packet loops.
        for _ in 0..100 {
            if let Some(r) = Reading::take(pid, setup.metrics_port) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the engine's /metrics on 127.0.0.1:{} could not be read",
            setup.metrics_port
        )
    };
    // Each packet core builds its tables (hundreds of MiB at 10 million flows, zeroed page by
    // page) before its first burst: the warm-up starts at the first frame received.
    let start = loop {
        let r = read();
        if r.rx > 0 {
            break r;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let min_warmup = start.at + Duration::from_secs(1);
    let deadline = start.at + Duration::from_secs(120);
    let warm = loop {
        std::thread::sleep(Duration::from_millis(20));
        let r = read();
        if (r.rx >= setup.frames && r.at >= min_warmup) || r.at >= deadline {
            break r;
        }
    };
    std::thread::sleep(Duration::from_secs(secs()));
    let end = read();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
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
    let dropped = total["dropped"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|v| v.as_u64()).sum());
    EngineRun {
        warmup: start.to(warm),
        run: warm.to(end),
        wire_rx: get("wire_rx"),
        host_tx: get("host_tx"),
        replies: get("replies"),
        dropped,
        tx_unsent: get("tx_unsent"),
        forwarding: appliance::Forwarding {
            to_backend: get("to_backend"),
            wire_tx: get("wire_tx"),
            replies: get("replies"),
            control_tx: get("control_tx"),
            tx_unsent: get("tx_unsent"),
        },
        steady_to_backend: end.to_backend.saturating_sub(warm.to_backend) as f64
            / end.rx.saturating_sub(warm.rx).max(1) as f64,
    }
}

/// testpmd in `mode` over the same vdevs: its rate from the per-second Rx-pps readings of the
/// pcap port (the first, warm-up, left out), and frames per CPU second from its cumulative
/// RX-packets and its CPU time between the first and the last reading.
fn testpmd_run(setup: &Setup, mode: &str) -> Option<Run> {
    let cores = setup.cores();
    let queues = cores.len();
    // The main lcore prints statistics once a second: it shares a CPU with a forwarding lcore.
    let lcores = if queues == 1 {
        let main = if cores[0] == 0 { 1 } else { 0 };
        format!("0@{main},1@{}", cores[0])
    } else {
        "0@0,1@0,2@1".to_owned()
    };
    let mut child = testpmd(
        setup,
        &setup.eal_memory,
        "testpmd",
        [&setup.wire_vdev(), "net_null1,no-rx=1"],
        &lcores,
        setup.mbufs,
    )
    .args([
        format!("--nb-cores={queues}"),
        format!("--rxq={queues}"),
        format!("--txq={queues}"),
        format!("--forward-mode={mode}"),
    ])
    .args(appliance::testpmd_args(setup.scenario.delivery))
    // Busy cycles: those of bursts that received frames, printed when it stops.
    .args((setup.scenario.input == Input::Memif).then_some("--record-core-cycles"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(setup.dir.join(format!("testpmd-{mode}.err"))).ok()?)
    .spawn()
    .ok()?;
    let stdout = child.stdout.take().unwrap();
    // The deadline runs from the first reading (loading a large file takes seconds).
    let mut deadline = Instant::now() + Duration::from_secs(300);
    let mut readings: Vec<f64> = Vec::new();
    let mut port: Option<u32> = None;
    let mut rx_packets: u64 = 0;
    let mut first: Option<(f64, u64)> = None;
    let mut last: Option<(f64, u64)> = None;
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    for line in lines.by_ref() {
        let line = line.trim();
        if let Some(rest) = line.split("NIC statistics for port").nth(1) {
            port = rest.split_whitespace().next()?.parse().ok();
        }
        if port == Some(0) {
            if let Some(rest) = line.strip_prefix("RX-packets:") {
                rx_packets = rest.split_whitespace().next()?.parse().ok()?;
            }
            if let Some(rest) = line.strip_prefix("Rx-pps:") {
                let cpu = cpu_secs(child.id()).unwrap_or(0.0);
                if readings.is_empty() {
                    // On a busy machine the main lcore prints late: count readings, with a
                    // generous time bound.
                    deadline = Instant::now() + Duration::from_secs(4 * secs() + 10);
                } else if first.is_none() {
                    first = Some((cpu, rx_packets));
                } else {
                    last = Some((cpu, rx_packets));
                }
                readings.push(rest.split_whitespace().next()?.parse().ok()?);
            }
        }
        if readings.len() as u64 >= secs() + 2 || Instant::now() > deadline {
            break;
        }
    }
    let rate = common::stop_and_average(&mut child, &readings);
    // "CPU cycles/packet=43.45 (total cycles=... / total io packets=...) at 2600 MHz Clock"
    let busy_rate = lines.find_map(|l| {
        let (cycles, rest) = l
            .trim()
            .strip_prefix("CPU cycles/packet=")?
            .split_once(' ')?;
        let mhz = rest.split(" at ").nth(1)?.split_whitespace().next()?;
        Some(mhz.parse::<f64>().ok()? * 1e6 / cycles.parse::<f64>().ok()?)
    });
    let (Some(rate), Some(first), Some(last)) = (rate, first, last) else {
        eprintln!(
            "testpmd {mode}: no steady readings ({} in all; see {})",
            readings.len(),
            setup.dir.join(format!("testpmd-{mode}.err")).display()
        );
        return None;
    };
    Some(Run {
        rate,
        cpu_rate: (last.1 - first.1) as f64 / (last.0 - first.0).max(1e-3),
        busy_rate,
    })
}

/// The first value of a `/proc/cpuinfo` field.
fn cpuinfo(field: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let value = text
        .lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == field))?
        .split_once(':')?
        .1
        .trim()
        .to_owned();
    Some(value)
}

fn cpu_hz() -> Option<f64> {
    Some(cpuinfo("cpu MHz")?.parse::<f64>().ok()? * 1e6)
}

/// The clock this core really runs at while busy (turbo included), which `/proc/cpuinfo`'s
/// nominal figure may not be: a chain of dependent 64-bit multiplies, 3 cycles each on current
/// x86 cores (Intel since Nehalem, AMD since Zen), timed. Best of three.
fn effective_hz() -> f64 {
    const N: u64 = 30_000_000;
    let m = std::hint::black_box(0x9e37_79b9_7f4a_7c15u64);
    (0..3)
        .map(|_| {
            let mut x = std::hint::black_box(1u64);
            let start = Instant::now();
            for _ in 0..N {
                x = std::hint::black_box(x.wrapping_mul(m));
            }
            std::hint::black_box(x);
            3.0 * N as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn memory_report() {
    println!(
        "flow table memory (one core; slot {SLOT_BYTES} B + {BUCKETS} x u32 per-bucket and \
         4096 x u32 per-backend counts + a doorkeeper of 4096-65536 x u64):"
    );
    for capacity in [1_000usize, 1_000_000, 10_000_000] {
        let bytes = FlowTable::footprint(capacity);
        // The pipeline also keeps a learned-flows table of a quarter of the size.
        let learned_bytes = FlowTable::footprint(learned_capacity(capacity));
        println!(
            "  {capacity:>10} flows: {:>8} slots, {:>8.1} MiB, {:>5.1} B per tracked flow when full; \
             with the learned table: {:>8.1} MiB",
            FlowTable::slots_for(capacity),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / capacity as f64,
            (bytes + learned_bytes) as f64 / (1 << 20) as f64,
        );
    }
    appliance::memory_note();
}

/// What the engine must do with the scenario's frames.
struct Expected {
    host: f64,
    answered: f64,
    dropped: f64,
    /// To a backend (appliance rows).
    forwarded: f64,
    /// Backend choices (flows new to the flow table) per frame to a backend, over both passes.
    choices: f64,
}

/// Replays each queue's file twice (as the engine sees it loop) through one simulated node 1
/// with the engine's ownership and table sizes, and sums the queues.
fn expected(setup: &Setup) -> Expected {
    let s = &setup.scenario;
    let loaded = Config::load(&setup.config()).expect("bench config");
    let me = NodeId::new(1).unwrap();
    let snapshot = Arc::new(
        clonecluster::replay::assumed_snapshot(&loaded, s.nodes, s.handoff_pct, me)
            .expect("assumed ownership"),
    );
    let sizes = TableSizes::from_config(&loaded.config);
    let (mut frames, mut host, mut answered, mut dropped, mut forwarded) = (0u64, 0, 0, 0, 0);
    let mut choices = 0u64;
    for queue in 0..s.cores {
        let pass = || traffic(s).filter(move |(q, _)| *q == queue).map(|(_, f)| f);
        let twice = pass()
            .chain(pass())
            .enumerate()
            .map(|(n, f)| (n as u64 * 100, f));
        let report = clonecluster::replay::replay_with(&loaded, &snapshot, 1..=1, sizes, twice);
        let node = &report.nodes[0];
        frames += report.frames;
        host += node.delivered + node.shared;
        answered += node.answered;
        dropped += node.dropped;
        forwarded += node.forwarded;
        choices += report.backends.iter().map(|b| b.new_flows).sum::<u64>();
    }
    let f = frames.max(1) as f64;
    Expected {
        host: host as f64 / f,
        answered: answered as f64 / f,
        dropped: dropped as f64 / f,
        forwarded: forwarded as f64 / f,
        choices: choices as f64 / forwarded.max(1) as f64,
    }
}

/// One row of the table.
struct Row {
    label: String,
    frames: u64,
    pool_mib: u64,
    mbuf_bytes: u64,
    engine: Run,
    /// The engine's warm-up (see [`EngineRun::warmup`]).
    warmup: Run,
    testpmd: [Option<Run>; 3],
    ok: bool,
    input: Input,
    /// The engine's frames a TX queue did not take, per wire frame (median).
    unsent: f64,
}

/// Prints one engine run's figures and shares against replay's; whether they match.
fn check_round(round: usize, r: &EngineRun, exp: &Expected, delivery: Delivery) -> bool {
    let mut ok = true;
    let rx = r.wire_rx.max(1) as f64;
    let (host, answered, dropped) = (
        r.host_tx as f64 / rx,
        r.replies as f64 / rx,
        r.dropped as f64 / rx,
    );
    eprintln!(
        "round {round}: clonecluster {:.2} Mpps, {:.2} M frames per CPU second, {:.2} M per \
         busy second (warm-up, every flow new at first: {:.2} M per CPU second; wire_rx {}, \
         to host {:.2}% vs replay {:.2}%, answered {:.2}% vs {:.2}%, dropped {:.2}% vs \
         {:.2}%, tx unsent {})",
        r.run.rate / 1e6,
        r.run.cpu_rate / 1e6,
        r.run.busy_rate.unwrap_or(0.0) / 1e6,
        r.warmup.cpu_rate / 1e6,
        r.wire_rx,
        host * 100.0,
        exp.host * 100.0,
        answered * 100.0,
        exp.answered * 100.0,
        dropped * 100.0,
        exp.dropped * 100.0,
        r.tx_unsent,
    );
    let forwarding = delivery.is_appliance().then(|| {
        let f = &r.forwarding;
        eprintln!(
            "round {round}: to backends {:.2}% vs replay {:.2}% (after the warm-up, from \
             /metrics: {:.2}%), wire tx {}, replies {}, control frames {}",
            f.to_backend as f64 / rx * 100.0,
            exp.forwarded * 100.0,
            r.steady_to_backend * 100.0,
            f.wire_tx,
            f.replies,
            f.control_tx,
        );
        f.check(r.wire_rx, exp.forwarded, TOLERANCE_PCT)
    });
    let off = |a: f64, b: f64| (a - b).abs() * 100.0 > TOLERANCE_PCT;
    if r.wire_rx == 0
        || off(host, exp.host)
        || off(answered, exp.answered)
        || off(dropped, exp.dropped)
    {
        eprintln!("round {round}: WRONG: the engine's shares differ from replay's");
        ok = false;
    }
    if let Some(Some(why)) = forwarding {
        eprintln!("round {round}: WRONG: forwarding: {why}");
        ok = false;
    }
    ok
}

const MODES: [&str; 3] = ["io", "macswap", "5tswap"];

fn run_scenario(scenario: Scenario, dir: &Path, rounds: usize) -> Row {
    let s = scenario;
    let pcaps: Vec<PathBuf> = (0..s.cores)
        .map(|q| dir.join(format!("traffic-{q}.pcap")))
        .collect();
    let counts = write_pcaps(&pcaps, traffic(&s));
    let frames: u64 = counts.iter().sum();
    // Whoever reads the files holds them all in mbufs, plus room for the rings.
    let file_mbufs = ((frames + 8192 * s.cores as u64) | 1023).max(8191) as u32;
    let ring_mbufs = 16383;
    let mib = |mbufs: u32| (u64::from(mbufs) * s.mbuf_footprint()).div_ceil(1 << 20);
    // The EAL's own needs besides the pool, with slack for its allocator.
    let eal_mb = |mbufs: u32| (mib(mbufs) + mib(mbufs) / 8 + 256) as u32;
    let (mbufs, generator_mb) = match s.input {
        Input::Pcap => (file_mbufs, 0),
        Input::Memif => (ring_mbufs, eal_mb(file_mbufs)),
    };
    let pool_mib = mib(mbufs);
    // The generator holds its pages while the forwarders run: hugepages only for both.
    let huge = use_hugepages(eal_mb(mbufs) + generator_mb, s.huge);
    let setup = Setup {
        dir: dir.to_path_buf(),
        scenario: s.clone(),
        pcaps,
        mbufs,
        eal_memory: eal_memory(eal_mb(mbufs), huge),
        frames,
        metrics_port: std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port(),
    };
    let mut label = s.label();
    if huge {
        label += " huge";
    }
    let source = match &s.pcap {
        Some(p) => format!("from {}", p.display()),
        None => format!("{} per flow, {}% IPv6", s.fpf, s.ipv6_pct),
    };
    eprintln!(
        "== {label}: {frames} frames ({source}) in {} file(s), pool {mbufs} mbufs \
         ({pool_mib} MiB), flow capacity {} per core, EAL memory: {}",
        s.cores,
        s.capacity,
        setup.eal_memory.join(" ")
    );
    let exp = expected(&setup);
    if s.delivery.is_appliance() {
        eprintln!(
            "replay (two passes over the files): {:.2}% of frames to backends, {:.3} backend \
             choices (new flows) per frame to a backend",
            exp.forwarded * 100.0,
            exp.choices
        );
    }
    let testpmd_modes = std::env::var("CC_BENCH_TESTPMD").unwrap_or_else(|_| MODES.join(","));
    if s.input == Input::Memif {
        eprintln!(
            "memif input: a generator per run, pool {file_mbufs} mbufs ({} MiB)",
            mib(file_mbufs)
        );
    }
    // DPDK 22.11's memif server accepts no second client after the first leaves: a fresh
    // generator (the server) for each forwarder run.
    let generator = || {
        (s.input == Input::Memif)
            .then(|| Generator::start(&setup, file_mbufs, &eal_memory(generator_mb, huge)))
    };
    let mut engine = Vec::new();
    let mut warmup = Vec::new();
    let mut testpmd: Vec<Vec<Run>> = vec![Vec::new(); MODES.len()];
    let mut ok = true;
    let mut unsent = Vec::new();
    for round in 1..=rounds {
        let input = generator();
        let r = engine_run(&setup);
        drop(input);
        ok &= check_round(round, &r, &exp, s.delivery);
        unsent.push(r.tx_unsent as f64 / r.wire_rx.max(1) as f64);
        engine.push(r.run);
        warmup.push(r.warmup);
        for (i, mode) in MODES.iter().enumerate() {
            if !testpmd_modes.split(',').any(|m| m.trim() == *mode) {
                continue;
            }
            let input = generator();
            let run = testpmd_run(&setup, mode);
            drop(input);
            if let Some(run) = run {
                eprintln!(
                    "round {round}: testpmd {mode} {:.2} Mpps, {:.2} M frames per CPU second{}",
                    run.rate / 1e6,
                    run.cpu_rate / 1e6,
                    run.busy_rate.map_or(String::new(), |b| format!(
                        ", {:.2} M per busy second",
                        b / 1e6
                    ))
                );
                testpmd[i].push(run);
            }
        }
    }
    let med = |runs: &[Run]| -> Option<Run> {
        (!runs.is_empty()).then(|| Run {
            rate: median(runs.iter().map(|r| r.rate).collect()),
            cpu_rate: median(runs.iter().map(|r| r.cpu_rate).collect()),
            busy_rate: runs
                .iter()
                .map(|r| r.busy_rate)
                .collect::<Option<Vec<f64>>>()
                .map(median),
        })
    };
    Row {
        label,
        frames,
        pool_mib,
        mbuf_bytes: s.mbuf_footprint(),
        engine: med(&engine).unwrap(),
        warmup: med(&warmup).unwrap(),
        testpmd: [med(&testpmd[0]), med(&testpmd[1]), med(&testpmd[2])],
        ok,
        input: s.input,
        unsent: median(unsent),
    }
}

fn print_table(rows: &[Row], rounds: usize) {
    let hz = cpu_hz().unwrap_or(0.0);
    let cyc = |r: f64| {
        if hz > 0.0 {
            format!("{:.0}", hz / r)
        } else {
            "?".into()
        }
    };
    let field = |f: &str| cpuinfo(f).unwrap_or_else(|| "?".into());
    println!(
        "\nCPU: {} (family {}, model {}, stepping {}; a VM may name it vaguely)",
        field("model name"),
        field("cpu family"),
        field("model"),
        field("stepping")
    );
    let real = effective_hz();
    println!(
        "clock: cycles below are CPU time x the nominal {:.0} MHz of /proc/cpuinfo; this core ran \
         a chain of dependent multiplies at {:.2} GHz (turbo), so real cycles are {:.2} x those \
         (ratios are unaffected)",
        hz / 1e6,
        real / 1e9,
        if hz > 0.0 { real / hz } else { 0.0 }
    );
    println!(
        "pipeline vs dpdk-testpmd: 60-byte frames looping from net_pcap0 (infinite_rx) to \
         net_null1, {} s per run after a warm-up, median of {rounds} round(s); cycles/frame = \
         CPU time x {:.0} MHz / frames; ratios = engine / testpmd frames per CPU second \
         (wall-clock ratios in brackets); warm = the engine's cycles/frame in its warm-up (the \
         first pass over the files, at least 1 s: every flow new in its first frame). Rows \
         marked memif: the wire port is a memif ring a generator on the other CPU fills (testpmd \
         forwarding the same files, TX retry), and cycles and ratios count the busy time of \
         each forwarder's core (polls that received frames) instead of its CPU time. Rows \
         marked dsr, gue or ipip: the engine is an appliance and forwards owned flows to \
         backends out of the wire port, and testpmd loops the wire port onto itself \
         (--port-topology=loop) likewise",
        secs(),
        hz / 1e6
    );
    println!(
        "{:<28} {:>9} {:>7} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>14} {:>14} {:>14} | {:>7}",
        "scenario",
        "frames",
        "Mpps",
        "cyc/f",
        "warm",
        "io",
        "mac",
        "5t",
        "/ io",
        "/ macswap",
        "/ 5tswap",
        "replay"
    );
    for r in rows {
        let t_cyc: Vec<String> = r
            .testpmd
            .iter()
            .map(|t| t.map_or("-".into(), |t| cyc(t.per_second(r.input))))
            .collect();
        let ratios: Vec<String> = r
            .testpmd
            .iter()
            .map(|t| {
                t.map_or("-".into(), |t| {
                    format!(
                        "{:.3} ({:.3})",
                        r.engine.per_second(r.input) / t.per_second(r.input),
                        r.engine.rate / t.rate
                    )
                })
            })
            .collect();
        println!(
            "{:<28} {:>9} {:>7.2} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>14} {:>14} {:>14} | {:>7}",
            r.label,
            r.frames,
            r.engine.rate / 1e6,
            cyc(r.engine.per_second(r.input)),
            cyc(r.warmup.per_second(r.input)),
            t_cyc[0],
            t_cyc[1],
            t_cyc[2],
            ratios[0],
            ratios[1],
            ratios[2],
            if r.ok { "ok" } else { "WRONG" }
        );
    }
    for r in rows {
        println!(
            "  {}: packet pool {} MiB ({} B per mbuf), engine TX unsent {:.3}% of its wire \
             frames",
            r.label,
            r.pool_mib,
            r.mbuf_bytes,
            r.unsent * 100.0
        );
    }
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds: usize = env_or("CC_BENCH_ROUNDS", 3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var("CC_BENCH_DIR") {
        Ok(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        Err(_) => tmp.path().to_path_buf(),
    };
    let base = Scenario::from_env();
    let scenarios: Vec<Scenario> = match std::env::var("CC_BENCH_SCENARIOS") {
        Ok(list) => list
            .split(';')
            .map(|spec| {
                let mut s = base.clone();
                s.apply(spec);
                s.resolved()
            })
            .collect(),
        Err(_) => vec![base.resolved()],
    };
    let mut rows = Vec::new();
    for s in scenarios {
        rows.push(run_scenario(s, &dir, rounds));
        // Each scenario's files can be large (10 million flows: ~800 MB): keep only the last.
    }
    print_table(&rows, rounds);
    memory_report();
    let wrong: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.label.as_str())
        .collect();
    if !wrong.is_empty() {
        eprintln!(
            "FAIL: the engine's delivered/answered/dropped/forwarded shares differ from replay's by more \
             than {TOLERANCE_PCT} point(s) in: {wrong:?}"
        );
        std::process::exit(1);
    }
}
