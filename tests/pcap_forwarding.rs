//! The real binary on `net_pcap` vdevs: a committed capture enters on the wire port, the same
//! frames as the host would send them enter on the host port; what leaves is compared byte for
//! byte.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn frames_cross_the_engine_in_both_directions() {
    require_root();
    let scratch = Scratch::new();
    let wire_in = fixture("lab-mix.pcap");
    let wire_frames = read_pcap(&wire_in);
    assert!(wire_frames.len() > 20, "fixture too small");

    // What the host port receives from the node's kernel: frames from the cluster MAC.
    let host_frames: Vec<Vec<u8>> = wire_frames
        .iter()
        .filter(|f| f[6..12] == CLUSTER_MAC)
        .cloned()
        .collect();
    assert!(!host_frames.is_empty());
    let host_in = scratch.path("host-in.pcap");
    write_pcap(&host_in, &host_frames);

    let wire_out = scratch.path("wire-out.pcap");
    let host_out = scratch.path("host-out.pcap");
    let wire = format!(
        "net_pcap0,rx_pcap={},tx_pcap={}",
        wire_in.display(),
        wire_out.display()
    );
    let host = format!(
        "net_pcap1,rx_pcap={},tx_pcap={}",
        host_in.display(),
        host_out.display()
    );
    let config = scratch.write(
        "node.yaml",
        &node_config(
            &format!("cct-pcap-{}", std::process::id()),
            &wire,
            &host,
            "  idle: adaptive\n",
        ),
    );

    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--json", "--config"]).arg(&config);
    let mut engine = Proc::spawn(cmd);
    engine.wait_stderr("running on cores", Duration::from_secs(30));
    // net_pcap reads its file once, at full speed; give it ample time, then stop.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, stdout, stderr) = engine.terminate();
    assert!(status.success(), "engine failed: {stderr}");

    // Host-bound frames leave unchanged, in order.
    let to_host = read_pcap(&host_out);
    assert_eq!(to_host.len(), wire_frames.len(), "{stdout}\n{stderr}");
    assert_eq!(to_host, wire_frames);

    // Wire-bound frames carry the node MAC as source, and nothing else changed.
    let to_wire = read_pcap(&wire_out);
    assert_eq!(to_wire.len(), host_frames.len(), "{stdout}\n{stderr}");
    for (out, sent) in to_wire.iter().zip(&host_frames) {
        assert_eq!(out[6..12], NODE_MAC);
        assert_eq!(out[..6], sent[..6]);
        assert_eq!(out[12..], sent[12..]);
    }

    // The counters printed at exit agree with what came out.
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json report");
    assert_eq!(report["total"]["wire_rx"], wire_frames.len() as u64);
    assert_eq!(report["total"]["host_tx"], wire_frames.len() as u64);
    assert_eq!(report["total"]["host_rx"], host_frames.len() as u64);
    assert_eq!(report["total"]["wire_tx"], host_frames.len() as u64);
    assert_eq!(report["total"]["tx_unsent"], 0);
}
