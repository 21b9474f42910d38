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

/// Appliance mode: the capture's HTTP connections (to the cluster address's port 80) replayed
/// through a DSR service of three backends: each frame still has exactly one owner, and the
/// report counts what each backend got.
#[test]
fn services_are_replayed_with_per_backend_counts() {
    let s = Scratch::new();
    let base = std::fs::read_to_string(config(&s, "none")).unwrap();
    let text = base.replace(
        "  mac: 02:00:00:00:00:01\n",
        "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
    ) + r#"services:
  - name: web
    addresses: [198.18.0.1]
    ports: [80]
    delivery: dsr
    backends:
      - { name: b1, ip: 198.18.0.21 }
      - { name: b2, ip: 198.18.0.22 }
      - { name: b3, ip: 198.18.0.23 }
unmatched: local
"#;
    let cfg = s.write("appliance.yaml", &text);
    for nodes in [1u8, 3] {
        let r = replay(&cfg, nodes);
        assert_eq!(r["duplicates"], 0, "{r}");
        assert_eq!(r["orphans"], 0, "{r}");
        let backends = r["backends"].as_array().expect("per-backend counts");
        let names: Vec<&str> = backends
            .iter()
            .map(|b| b["backend"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b1", "b2", "b3"], "{r}");
        assert!(backends.iter().all(|b| b["service"] == "web"), "{r}");
        let frames: Vec<u64> = backends
            .iter()
            .map(|b| b["frames"].as_u64().unwrap())
            .collect();
        let flows: u64 = backends
            .iter()
            .map(|b| b["new_flows"].as_u64().unwrap())
            .sum();
        assert!(
            frames.iter().filter(|&&f| f > 0).count() >= 2,
            "the connections spread: {frames:?}"
        );
        assert!(flows >= 10, "the capture's HTTP connections: {flows}");
        assert!(frames.iter().sum::<u64>() > flows, "{frames:?} {flows}");
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
