//! `clonecluster-lab lab`, short: a 1-node baseline and a 2-node `hash` cluster under two wrk
//! steps, then the failover scenario. Every request of the ramp succeeds, both nodes serve a fair
//! share, the learning switch never holds the cluster MAC, ARP answers come from a node MAC with
//! the cluster MAC inside, and after a kill -9 only the dead node's connections are lost and
//! every new connection after the takeover succeeds, over IPv4 and IPv6 (the scenario runs
//! dual-stack). Appliance mode's headline: a killed appliance loses no connection, a killed
//! director all of its own.

mod common;

use common::*;

/// Runs the lab binary to completion. It finds the engine next to itself, where
/// `cargo build --workspace --all-targets` puts both.
fn run_lab(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_clonecluster-lab"))
        .args(args)
        .output()
        .expect("run clonecluster-lab")
}

/// One lab at a time: two cores do not carry two.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_short_lab_run_with_failover() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let run = run_lab(&[
        "lab",
        "--nodes",
        "2",
        "--policy",
        "hash",
        "--clients",
        // Shares are decided per connection (wrk keeps its connections open): with 96 of them
        // a node's share has a standard deviation of ~0.05, so the 0.30 floor below is ~4 of
        // them away (with 8 + 16 connections it was 2 and failed about one run in twenty).
        "32,64",
        "--duration",
        "2",
        "--scenario",
        "ramp,failover",
        "--scenario-clients",
        "8",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let configs = results["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2, "baseline and 2 nodes hash");
    for r in configs {
        let pre = &r["preconditions"];
        assert_eq!(pre["cluster_mac_learned"], false, "{r}");
        assert!(pre["arp_replies"].as_u64().unwrap() >= 1, "{r}");
        assert_eq!(pre["arp_bad"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(pre["idle_nodes"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["steps"].as_array().unwrap().len(), 2, "{r}");
        for s in r["steps"].as_array().unwrap() {
            assert_eq!(s["errors"], 0, "{r}");
            assert!(s["rps"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    let two = &configs[1];
    for share in two["node_shares"].as_array().unwrap() {
        let share = share[1].as_f64().unwrap();
        assert!(share >= 0.30, "unfair share {share}: {two}");
    }

    let scenarios = results["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1);
    let f = &scenarios[0];
    assert_eq!(f["scenario"], "failover");
    assert_eq!(f["node"], 2, "the last node is killed");
    assert!(f["detected_ms"].is_u64() && f["moved_ms"].is_u64(), "{f}");
    let probe = &f["probe"];
    // Only the dead node's connections may be lost.
    for (node, _) in probe["lost_by_node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l[0].as_u64().unwrap(), l[1].as_u64().unwrap()))
    {
        assert_eq!(node, 2, "a live node's connection was lost: {f}");
    }
    // After the takeover every new connection succeeded, all on the survivor.
    assert!(probe["new_after_settled"].as_u64().unwrap() > 0, "{f}");
    assert_eq!(probe["new_failed_after_settled"], 0, "{f}");
    assert_eq!(probe["nodes_after_settled"], serde_json::json!([1]), "{f}");
    // The scenario ran dual-stack: IPv6 connections too, none failing after the takeover, and
    // the client resolved the cluster's IPv6 address to the cluster MAC (NDP by the engines).
    let v6 = &probe["ipv6"];
    assert!(v6["new_after_settled"].as_u64().unwrap() > 0, "{f}");
    assert_eq!(v6["new_failed_after_settled"], 0, "{f}");
    assert!(
        v6["requests"].as_u64().unwrap() > v6["new"].as_u64().unwrap(),
        "IPv6 keep-alive requests too: {f}"
    );
    assert_eq!(f["ipv6_neighbour_is_cluster_mac"], true, "{f}");
    assert_eq!(f["cluster_mac_learned"], false, "{f}");
    assert_eq!(f["passed"], true, "{f}");

    for file in [
        "report.md",
        "throughput.svg",
        "response_time.svg",
        "1-node.csv",
        "2-nodes-hash.csv",
        "scenario-failover-probe.jsonl",
    ] {
        assert!(out.path().join(file).exists(), "{file} missing");
    }
    let csv = std::fs::read_to_string(out.path().join("2-nodes-hash.csv")).unwrap();
    assert!(csv.starts_with("step,clients,rps,transfer_mib_s,mean_ms,p99_ms,errors,timeouts\n"));
    assert_eq!(csv.lines().count(), 3);
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        report.contains("## Scenarios")
            && report.contains("failover")
            && report.contains("dual-stack")
            && report.contains("IPv6 new conn. (failed)"),
        "{report}"
    );
    // Nothing is left behind.
    no_namespaces_left("cclab-");
}

/// Nothing is left behind: no namespace whose name starts with `prefix`.
fn no_namespaces_left(prefix: &str) {
    let netns = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!netns.contains(prefix), "namespaces left: {netns}");
}

/// Appliance mode's headline, through the lab: killing an appliance (kill -9) under load with
/// long downloads running (half of them through it) loses no connection, and every new
/// connection after the takeover succeeds; killing the kernel director, the single dispatcher,
/// loses every connection through it, and nothing is served afterwards.
#[test]
fn a_killed_appliance_loses_nothing_and_a_killed_director_loses_everything() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let run = run_lab(&[
        "lab",
        "--mode",
        "appliance",
        "--scenario",
        "appliance-kill,director-kill",
        "--scenario-clients",
        "8",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    let scenarios = results["scenarios"].as_array().cloned().unwrap_or_default();
    assert_eq!(scenarios.len(), 2, "{stderr}");
    let (kill, director) = (&scenarios[0], &scenarios[1]);
    let lost = |s: &serde_json::Value| -> u64 {
        s["probe"]["lost_by_node"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[1].as_u64().unwrap())
            .sum()
    };

    assert_eq!(kill["scenario"], "appliance-kill");
    assert_eq!(kill["downloads"], 8, "{kill}");
    assert_eq!(kill["downloads_through_node"], 4, "{kill}");
    assert_eq!(
        kill["downloads_complete"], 8,
        "every download survives: {kill}"
    );
    assert_eq!(lost(kill), 0, "no probe connection lost: {kill}");
    assert!(kill["moved_ms"].is_u64(), "the takeover happened: {kill}");
    assert!(
        kill["probe"]["new_after_settled"].as_u64().unwrap() > 0,
        "{kill}"
    );
    assert_eq!(kill["probe"]["new_failed_after_settled"], 0, "{kill}");
    assert_eq!(kill["passed"], true, "{kill}");

    assert_eq!(director["scenario"], "director-kill");
    assert_eq!(director["downloads"], 8, "{director}");
    assert_eq!(director["downloads_complete"], 0, "{director}");
    // The probe keeps 8 keep-alive connections open: every one is lost.
    assert_eq!(lost(director), 8, "{director}");
    assert!(director["served_again_ms"].is_null(), "{director}");
    assert!(run.status.success(), "{stderr}");
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("| appliance-kill |") && report.contains("| director-kill |"));
    no_namespaces_left("cclab-");
}

#[test]
fn a_broken_lab_request_is_refused_plainly() {
    for (args, needle) in [
        (&["lab", "--scenario", "chaos"][..], "--scenario chaos"),
        (
            &["lab", "--baseline", "iptables"][..],
            "--baseline iptables",
        ),
        (&["lab", "--nodes", "1"][..], "--nodes 1"),
        (&["lab", "--mode", "cloud"][..], "--mode cloud"),
        (
            &["lab", "--mode", "appliance", "--scenario", "failover"][..],
            "--scenario failover",
        ),
        (
            &[
                "lab",
                "--mode",
                "appliance",
                "--nodes",
                "1",
                "--scenario",
                "appliance-kill",
            ][..],
            "needs --nodes 2",
        ),
    ] {
        let run = run_lab(args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// One minute of `clonecluster-lab soak`: kill -9 and restart, a cut of both networks and its
/// healing, a wire cut and its mending, under load. It fails on a leak (mbufs not back to
/// their baseline, memory growing), a packet delivered twice, a connection lost that the
/// crashed node did not hold, or a move that did not settle.
#[test]
fn a_one_minute_soak_leaks_nothing_and_loses_only_what_crashed() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let run = run_lab(&[
        "soak",
        "--minutes",
        "1",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let report = std::fs::read_to_string(out.path().join("soak.md")).unwrap_or_default();
    assert!(run.status.success(), "{stderr}\n{report}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("soak.json")).unwrap())
            .unwrap();
    let checks = r["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 6, "{report}");
    assert!(checks.iter().all(|c| c["held"] == true), "{report}");
    let events: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in ["kill", "restart", "cut", "restore"] {
        assert!(events.contains(&want), "{events:?}");
    }
    // Samples of every node from the start to the end, mbufs among them.
    let samples = r["samples"].as_array().unwrap();
    assert!(samples.len() >= 2 * 8, "{report}");
    assert!(samples.iter().all(|s| s["node"] == 1 || s["node"] == 2));
    assert!(out.path().join("soak-rss.svg").exists() && out.path().join("soak.csv").exists());
    no_namespaces_left("ccsoak-");
}
