//! `clonecluster replay` over the committed capture of real lab traffic (ARP, ping with IPv4 and
//! IPv6 fragments, curl, wrk, UDP, neighbour discovery): with 1, 2, 3 and 5 simulated nodes,
//! every cluster frame is delivered or answered by exactly one node.

mod common;

use common::*;

fn config(s: &Scratch, affinity: &str) -> std::path::PathBuf {
    s.write(
        "replay.yaml",
        &format!(
            r#"cluster:
  ip: 198.18.0.1
  ip6: 2001:2::1
  mac: 02:cc:00:00:00:01
  secret_file: secret
  affinity: {affinity}
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  wire_port: {{ vdev: "net_null0" }}
  host_port: {{ vdev: "net_null1" }}
"#
        ),
    )
}

fn replay(cfg: &std::path::Path, nodes: u8) -> serde_json::Value {
    let pcap = fixture("lab-mix.pcap");
    let out = run_cmd(&[
        "replay",
        "--json",
        "--nodes",
        &nodes.to_string(),
        "--config",
        cfg.to_str().unwrap(),
        pcap.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

#[test]
fn every_cluster_frame_has_exactly_one_owner() {
    let s = Scratch::new();
    for affinity in ["none", "single", "network"] {
        let cfg = config(&s, affinity);
        for nodes in [1u8, 2, 3, 5] {
            let r = replay(&cfg, nodes);
            let ctx = format!("affinity {affinity}, {nodes} nodes: {r}");
            assert_eq!(r["duplicates"], 0, "{ctx}");
            assert_eq!(r["orphans"], 0, "{ctx}");
            let cluster_frames = r["cluster_frames"].as_u64().unwrap();
            assert!(cluster_frames > 500, "{ctx}");
            let per_node = r["nodes"].as_array().unwrap();
            assert_eq!(per_node.len(), nodes as usize);
            let delivered: u64 = per_node
                .iter()
                .map(|n| n["delivered"].as_u64().unwrap() + n["answered"].as_u64().unwrap())
                .sum();
            assert_eq!(delivered, cluster_frames, "{ctx}");
            // The capture holds one ARP request and one neighbour solicitation for the
            // cluster address: each answered once in the whole cluster.
            let answered: u64 = per_node
                .iter()
                .map(|n| n["answered"].as_u64().unwrap())
                .sum();
            assert_eq!(answered, 2, "{ctx}");
            let buckets: u64 = per_node
                .iter()
                .map(|n| n["buckets"].as_u64().unwrap())
                .sum();
            assert_eq!(buckets, 65536, "{ctx}");
            let malformed: u64 = per_node
                .iter()
                .map(|n| n["malformed"].as_u64().unwrap())
                .sum();
            assert_eq!(malformed, 0, "{ctx}");
        }
    }
}

#[test]
fn flows_spread_over_nodes() {
    // Per-connection affinity spreads the capture's ~30 TCP connections over the nodes.
    let s = Scratch::new();
    let r = replay(&config(&s, "none"), 2);
    for n in r["nodes"].as_array().unwrap() {
        assert!(n["delivered"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn a_missing_pcap_is_a_clear_error() {
    let s = Scratch::new();
    let cfg = config(&s, "none");
    let out = run_cmd(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "/nonexistent.pcap",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.pcap"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
