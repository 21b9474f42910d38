//! Helpers shared by the integration tests: the binary, configs, pcaps, namespaces and child
//! processes, all cleaned up by guard values (by PID, by the name the test created).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_clonecluster");
pub const CLUSTER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 1];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
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
    Command::new(BIN)
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

/// Every frame of a pcap file, in order.
pub fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap header");
    let mut frames = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        frames.push(pkt.expect("pcap packet").data.into_owned());
    }
    frames
}

pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let file = std::fs::File::create(path).expect("create pcap");
    let mut w = pcap_file::pcap::PcapWriter::new(file).expect("pcap writer");
    for (i, f) in frames.iter().enumerate() {
        let pkt =
            pcap_file::pcap::PcapPacket::new(Duration::from_micros(i as u64), f.len() as u32, f);
        w.write_packet(&pkt).expect("write packet");
    }
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

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created by the test and deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("cct-{tag}-{}", std::process::id());
        // A namespace of the same name can only be left from an earlier run of this same PID.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `ip netns exec NAME args...` as a Command.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn sh(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth ends and taps inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
