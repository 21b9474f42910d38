//! The real binary on `net_pcap` vdevs: a committed capture enters on the wire port, the
//! server's side of it enters on the host port (as the node's kernel would send it); what leaves
//! each port is compared byte for byte with what the Clone Cluster rules say.

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

    let mut cmd = Command::new(bin());
    cmd.args(["run", "--json", "--config"]).arg(&config);
    let mut engine = Proc::spawn(cmd);
    engine.wait_stderr("running on cores", Duration::from_secs(30));
    // net_pcap reads its file once, at full speed; give it ample time, then stop.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, stdout, stderr) = engine.terminate();
    assert!(status.success(), "engine failed: {stderr}");

    // Host-bound: this node is alone, so it owns every flow. Frames for the cluster MAC and
    // group frames reach the host unchanged, in order; frames for other MACs do not; the ARP
    // request for the cluster IP is answered by the engine instead.
    let is_arp_request_for_cluster =
        |f: &[u8]| f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == [198, 18, 0, 1];
    let expected_host: Vec<Vec<u8>> = wire_frames
        .iter()
        .filter(|f| (f[..6] == CLUSTER_MAC || f[0] & 1 == 1) && !is_arp_request_for_cluster(f))
        .cloned()
        .collect();
    let arp_requests = wire_frames
        .iter()
        .filter(|f| is_arp_request_for_cluster(f))
        .count();
    assert!(
        arp_requests > 0,
        "the fixture holds an ARP request for the cluster IP"
    );
    let to_host = read_pcap(&host_out);
    assert_eq!(to_host, expected_host, "{stdout}\n{stderr}");

    // Wire-bound: the host's frames with the node MAC as source and nothing else changed, but
    // for the kernel's own ARP reply for the cluster IP (suppressed); plus the engine's ARP
    // replies: node MAC in the header, cluster MAC in the payload.
    let is_arp_reply_from_cluster =
        |f: &[u8]| f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == [198, 18, 0, 1];
    // The engine's membership heartbeats (EtherType 0x88b5) also leave on the wire.
    let (heartbeats, to_wire): (Vec<Vec<u8>>, Vec<Vec<u8>>) = read_pcap(&wire_out)
        .into_iter()
        .partition(|f| f[12..14] == [0x88, 0xb5]);
    assert!(!heartbeats.is_empty(), "a running node sends heartbeats");
    for h in &heartbeats {
        assert_eq!(h[6..12], NODE_MAC, "heartbeats come from the node MAC");
    }
    let (replies, forwarded): (Vec<Vec<u8>>, Vec<Vec<u8>>) = to_wire
        .into_iter()
        .partition(|f| is_arp_reply_from_cluster(f));
    let expected_forwarded: Vec<&Vec<u8>> = host_frames
        .iter()
        .filter(|f| !is_arp_reply_from_cluster(f))
        .collect();
    assert_eq!(
        forwarded.len(),
        expected_forwarded.len(),
        "{stdout}\n{stderr}"
    );
    for (out, sent) in forwarded.iter().zip(&expected_forwarded) {
        assert_eq!(out[6..12], NODE_MAC);
        assert_eq!(out[..6], sent[..6]);
        assert_eq!(out[12..], sent[12..]);
    }
    assert_eq!(replies.len(), arp_requests);
    for r in &replies {
        assert_eq!(r[6..12], NODE_MAC, "ARP reply header source");
        assert_eq!(r[22..28], CLUSTER_MAC, "ARP reply sender hardware address");
    }

    // The counters printed at exit agree with what came out.
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json report");
    let total = &report["total"];
    assert_eq!(total["wire_rx"], wire_frames.len() as u64);
    assert_eq!(total["host_tx"], expected_host.len() as u64);
    assert_eq!(total["host_rx"], host_frames.len() as u64);
    assert_eq!(
        total["wire_tx"],
        (forwarded.len() + replies.len() + heartbeats.len()) as u64
    );
    assert_eq!(total["replies"], replies.len() as u64);
    assert_eq!(total["tx_unsent"], 0);

    // Busy time: counted for the polls that received frames, so some, and, with an adaptive
    // idle core that waits once the files are read, well under the time the loop ran.
    let busy = report["busy_secs"]
        .as_f64()
        .expect("busy_secs in the report");
    let ran = report["elapsed_secs"]
        .as_f64()
        .expect("elapsed_secs in the report");
    assert!(busy > 0.0, "frames were processed: busy time > 0\n{stdout}");
    assert!(
        busy < ran / 2.0,
        "an idle core is not busy: {busy} s of {ran} s\n{stdout}"
    );
}
