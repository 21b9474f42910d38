//! `clonecluster lab`, short: a 1-node baseline and a 2-node `hash` cluster under two wrk steps.
//! Every request succeeds, both nodes serve a fair share, and the learning switch never holds the
//! cluster MAC.

mod common;

use common::*;

#[test]
fn a_short_lab_run() {
    require_root();
    let out = tempfile::tempdir().unwrap();
    let run = run_cmd(&[
        "lab",
        "--nodes",
        "2",
        "--policy",
        "hash",
        "--clients",
        "8,16",
        "--duration",
        "2",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 2, "baseline and 2 nodes hash");
    for r in results {
        assert_eq!(r["cluster_mac_learned"], false, "{r}");
        for s in r["steps"].as_array().unwrap() {
            assert_eq!(s["errors"], 0, "{r}");
            assert!(s["rps"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    let two = &results[1];
    for share in two["node_shares"].as_array().unwrap() {
        let share = share[1].as_f64().unwrap();
        assert!(share >= 0.30, "unfair share {share}: {two}");
    }
    for f in [
        "report.md",
        "throughput.svg",
        "response_time.svg",
        "1-node.csv",
        "2-nodes-hash.csv",
    ] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.path().join("2-nodes-hash.csv")).unwrap();
    assert!(csv.starts_with("step,clients,rps,transfer_mib_s,mean_ms,p99_ms,errors\n"));
    assert_eq!(csv.lines().count(), 3);
}
