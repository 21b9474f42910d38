//! Bad input: every mistake fails with an error that names the file, the key and the fix, and
//! exits non-zero without a panic or a backtrace.

mod common;

use common::*;

fn assert_clean_failure(out: &std::process::Output, file: &str, key: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(file),
        "error does not name the file {file}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("`{key}`")),
        "error does not name `{key}`: {stderr}"
    );
    assert!(
        stderr.contains("fix:"),
        "error does not say how to fix it: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    stderr
}

fn good(prefix: &str) -> String {
    node_config(prefix, "net_null0", "net_null1", "")
}

#[test]
fn unknown_key() {
    let s = Scratch::new();
    let cfg = s.write(
        "c.yaml",
        &good("x").replace("  id: 1\n", "  id: 1\n  weigth: 5\n"),
    );
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "c.yaml", "node.weigth");
    assert!(
        err.contains("weight"),
        "the fix should list the allowed keys: {err}"
    );
}

#[test]
fn a_drain_deadline_is_a_duration_or_none() {
    let s = Scratch::new();
    let with = |v: &str| {
        good("x").replace(
            "dataplane:\n",
            &format!("control:\n  drain_deadline: {v}\ndataplane:\n"),
        )
    };
    let cfg = s.write("c.yaml", &with("soon"));
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "c.yaml", "control.drain_deadline");
    assert!(err.contains("none"), "the fix should offer none: {err}");
    for ok in ["none", "90s"] {
        let cfg = s.write("c.yaml", &with(ok));
        let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
        assert!(out.status.success(), "{ok}: {out:?}");
    }
}

#[test]
fn bad_mac() {
    let s = Scratch::new();
    let cfg = s.write(
        "c.yaml",
        &good("x").replace("02:00:00:00:00:01", "02:00:00:00:00:zz"),
    );
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_clean_failure(&out, "c.yaml", "node.mac");
}

#[test]
fn missing_secret_file() {
    let s = Scratch::new();
    let cfg = s.write(
        "c.yaml",
        &good("x").replace("secret_file: secret", "secret_file: nope"),
    );
    let out = run_cmd(&["run", "--config", cfg.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "c.yaml", "cluster.secret_file");
    assert!(err.contains("/dev/urandom"), "{err}");
}

#[test]
fn vdev_that_does_not_exist() {
    require_root();
    let s = Scratch::new();
    let prefix = format!("cct-badvdev-{}", std::process::id());
    let cfg = s.write(
        "c.yaml",
        &node_config(&prefix, "net_nosuchdriver0,foo=1", "net_null1", ""),
    );
    let out = run_cmd(&["run", "--config", cfg.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "c.yaml", "dataplane.wire_port");
    assert!(err.contains("net_nosuchdriver0"), "{err}");
}

#[test]
fn af_packet_on_a_missing_interface() {
    require_root();
    let s = Scratch::new();
    let prefix = format!("cct-noif-{}", std::process::id());
    let cfg = s.write(
        "c.yaml",
        &node_config(&prefix, "net_null0", "net_af_packet1,iface=cct-noif0", ""),
    );
    let out = run_cmd(&["run", "--config", cfg.to_str().unwrap()]);
    assert_clean_failure(&out, "c.yaml", "dataplane.host_port");
}

#[test]
fn pool_too_large_for_the_eal_memory() {
    // Caught before DPDK starts: the pool cannot fit in `-m`.
    let s = Scratch::new();
    let cfg = s.write(
        "c.yaml",
        &good("x").replace("pool_size: 4095", "pool_size: 100000"),
    );
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "c.yaml", "dataplane.pool_size");
    assert!(err.contains("-m"), "{err}");
}

#[test]
fn pool_too_large_for_memory_at_start() {
    // Without `-m` the config cannot know the limit; DPDK's refusal is reported the same way.
    require_root();
    let s = Scratch::new();
    let prefix = format!("cct-bigpool-{}", std::process::id());
    let text = good(&prefix)
        .replace(r#"[--no-huge, -m, "128", "#, "[--no-huge, ")
        .replace("pool_size: 4095", "pool_size: 4000000");
    let cfg = s.write("c.yaml", &text);
    let out = run_cmd(&["run", "--config", cfg.to_str().unwrap()]);
    assert_clean_failure(&out, "c.yaml", "dataplane.pool_size");
}

#[test]
fn unreadable_config_file() {
    let out = run_cmd(&["check", "--config", "/nonexistent/cct.yaml"]);
    assert_clean_failure(&out, "/nonexistent/cct.yaml", "(file)");
}

#[test]
fn check_prints_the_effective_config() {
    let s = Scratch::new();
    let cfg = s.write("c.yaml", &good("x"));
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Defaults are filled in.
    assert!(text.contains("interval: 100ms"), "{text}");
    assert!(text.contains("idle: busy"), "{text}");
    assert!(text.contains("weight: 100"), "{text}");
}

#[test]
fn check_summarises_the_appliance_example_services() {
    let s = Scratch::new();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/appliance-node.yaml");
    let text = std::fs::read_to_string(&path).expect("example config");
    let cfg = s.write("appliance-node.yaml", &text);
    let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The example's promises: a DSR and a GUE rule on one address, backends with and without
    // static MACs, backend health, unmatched traffic, the node's own address.
    for want in [
        "# services: 2 rules, 6 backends, unmatched traffic: dropped",
        "service web: 198.18.0.100 tcp port 80,8000-8099 | multiple, delivery dsr",
        "service api: 198.18.0.100 tcp port 443 | multiple, delivery gue",
        "02:bb:00:00:00:21",
        "unresolved",
        "198.19.7.33 via 198.18.0.254",
        "backend_health:",
        "unmatched: drop",
        "  ip: 198.18.0.11",
    ] {
        assert!(stdout.contains(want), "no `{want}` in\n{stdout}");
    }
    let web_3 = stdout
        .lines()
        .find(|l| l.contains("web-3"))
        .expect("web-3 listed");
    assert!(web_3.ends_with("20.0%"), "weight 50 of 250: {web_3}");
    // What check prints is a configuration that checks again (the summary is comments).
    let again = s.write("again.yaml", &stdout);
    let out = run_cmd(&["check", "--config", again.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_configs_are_valid() {
    let s = Scratch::new();
    for name in ["lab-node.yaml", "pci-node.yaml", "appliance-node.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../conf")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("example config");
        // Point the secret at the test's own file; everything else as shipped.
        let text = text.replace("/etc/clonecluster/secret", "secret");
        let cfg = s.write(name, &text);
        let out = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
