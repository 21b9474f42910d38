//! The bare forwarding loop against `dpdk-testpmd --forward-mode=io`, same vdevs, same run.
//!
//! Both programs forward between two `net_null` ports (no I/O cost: the floor of what a loop
//! costs) on one forwarding core for the same time; the figure that matters is the ratio.
//! `CC_BENCH_SECS` sets the time per run (default 3), `CC_BENCH_ROUNDS` the rounds (default 3), `CC_BENCH_CORE` the forwarding core.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{core, median, rounds, secs};

const ENGINE: &str = env!("CARGO_BIN_EXE_clonecluster");

/// Frames per second the engine handles (received on both ports; each one forwarded or, for
/// net_null's all-zero frames arriving on the wire port, decided and dropped as not addressed
/// to the cluster — both end with the mbuf given back).
fn engine_rate(dir: &std::path::Path) -> f64 {
    std::fs::write(dir.join("secret"), b"bench-secret-0123456789abcdef").unwrap();
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            r#"cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  eal_args: [--no-huge, -m, "512", --log-level=lib.eal:warning]
  file_prefix: cc-bench-engine-{pid}
  wire_port: {{ vdev: "net_null0" }}
  host_port: {{ vdev: "net_null1" }}
  cores: [{core}]
  idle: busy
  pool_size: 8191
"#,
            pid = std::process::id(),
            core = core()
        ),
    )
    .unwrap();
    let child = Command::new(ENGINE)
        .args(["run", "--json", "--config"])
        .arg(&config)
        .env("CLONECLUSTER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the engine");
    std::thread::sleep(Duration::from_secs(secs()) + Duration::from_millis(300));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().expect("engine output");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("engine JSON report");
    let total = &report["total"];
    let frames = total["wire_rx"].as_u64().unwrap() + total["host_rx"].as_u64().unwrap();
    frames as f64 / report["elapsed_secs"].as_f64().unwrap()
}

/// Frames per second forwarded by testpmd in `mode` (both ports together), from its per-second
/// Rx-pps readings, the first one (warm-up) left out.
fn testpmd_rate(mode: &str) -> Option<f64> {
    let core = core();
    let main = if core == 0 { 1 } else { 0 };
    let mut child = Command::new("dpdk-testpmd")
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "--log-level=lib.eal:warning",
            &format!("--file-prefix=cc-bench-testpmd-{}", std::process::id()),
            "--vdev=net_null0",
            "--vdev=net_null1",
            "-l",
            &format!("{main},{core}"),
            "--main-lcore",
            &main.to_string(),
            "--",
            "--total-num-mbufs=8192",
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
    let deadline = Instant::now() + Duration::from_secs(secs() + 1);
    let mut readings: Vec<f64> = Vec::new();
    let mut current = 0.0;
    let mut ports_seen = 0;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(rest) = line.trim().strip_prefix("Rx-pps:") {
            let pps: f64 = rest.split_whitespace().next()?.parse().ok()?;
            current += pps;
            ports_seen += 1;
            if ports_seen == 2 {
                readings.push(current);
                current = 0.0;
                ports_seen = 0;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    common::stop_and_average(&mut child, &readings)
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The machine is shared and noisy: alternate the programs round by round and compare
    // medians, so a burst of outside load hits both alike.
    let modes = ["io", "mac"];
    let mut engine = Vec::new();
    let mut testpmd: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 1..=rounds() {
        let rate = engine_rate(dir.path());
        eprintln!("round {round}: clonecluster {:.2} Mpps", rate / 1e6);
        engine.push(rate);
        for (i, mode) in modes.iter().enumerate() {
            if let Some(rate) = testpmd_rate(mode) {
                eprintln!("round {round}: testpmd {mode} {:.2} Mpps", rate / 1e6);
                testpmd[i].push(rate);
            }
        }
    }
    let engine = median(engine);
    println!(
        "forwarding loop, net_null0 <-> net_null1, one core, {} s per run, median of {} rounds",
        secs(),
        rounds()
    );
    println!("{:<28} {:>10}", "program", "Mpps");
    println!("{:<28} {:>10.2}", "clonecluster", engine / 1e6);
    // io moves mbufs without touching frames; mac also rewrites both Ethernet addresses of every
    // frame, which is closer to what the engine's host direction must do (source MAC rewrite).
    for (mode, rates) in modes.iter().zip(testpmd) {
        if rates.is_empty() {
            println!("dpdk-testpmd {mode} did not run (apt-get install dpdk): no ratio");
            continue;
        }
        let rate = median(rates);
        println!(
            "{:<28} {:>10.2}",
            format!("dpdk-testpmd {mode}"),
            rate / 1e6
        );
        println!("ratio engine / testpmd {mode}: {:.3}", engine / rate);
    }
}
