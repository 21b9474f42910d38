//! Helpers shared by the integration tests of the engine crate and of the lab crate: the engine
//! binary, configs and child processes, all cleaned up by guard values (by PID). Frames and pcap
//! files come from `clonecluster::testkit`; namespaces and the lab network from the lab crate's
//! `topology` and `services`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use clonecluster::testkit::build::CLUSTER_MAC;
#[allow(unused_imports)]
pub use clonecluster::testkit::pcap::{fixture, read_pcap, write_pcap};

/// The node MAC of [`node_config`] (node 1).
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// The engine binary. The engine crate's own tests get its path from Cargo; the lab crate's
/// tests, for which Cargo builds no engine, find the one `cargo build --workspace --all-targets`
/// left in the same target directory (and panic saying so if it is missing).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match option_env!("CARGO_BIN_EXE_clonecluster") {
        Some(p) => PathBuf::from(p),
        None => clonecluster::testkit::built_binary("clonecluster"),
    })
}

/// A temporary directory holding a config and a secret.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("secret"),
            b"0123456789abcdef0123456789abcdef",
        )
        .expect("write secret");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

/// A node config with the given ports; `extra_dataplane` lines are appended to `dataplane:`.
pub fn node_config(prefix: &str, wire: &str, host: &str, extra_dataplane: &str) -> String {
    format!(
        r#"cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  eal_args: [--no-huge, -m, "128", --log-level=lib.eal:notice]
  file_prefix: {prefix}
  wire_port: {{ vdev: "{wire}" }}
  host_port: {{ vdev: "{host}" }}
  pool_size: 4095
  rx_descriptors: 512
  tx_descriptors: 512
{extra_dataplane}"#
    )
}

/// Runs the binary to completion.
pub fn run_cmd(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run clonecluster")
}

/// A child process killed (by PID) and reaped when dropped.
pub struct Proc {
    pub child: Option<Child>,
    stderr_lines: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
    stdout: Option<std::process::ChildStdout>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("piped");
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child: Some(child),
            stderr_lines: rx,
            stderr_seen: Vec::new(),
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until a stderr line contains `needle`; panics with everything seen on timeout.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no `{needle}` on stderr within {timeout:?}; saw:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM (by PID) and waits; returns the exit status, stdout and the rest of stderr.
    pub fn terminate(mut self) -> (ExitStatus, String, String) {
        let child = self.child.as_mut().expect("running");
        signal(child.id(), "TERM");
        let status = wait_timeout(child, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("process {} did not stop on SIGTERM", child.id())
        });
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr_seen.push(line);
        }
        self.child = None;
        (status, out, self.stderr_seen.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn require_root() {
    // SAFETY-free check: root is needed for namespaces and DPDK; CI runs as root.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test needs root (network namespaces, DPDK); run it as root"
    );
}

/// The sum of every sample of `clonecluster_NAME` whose labels contain all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("clonecluster_{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
