//! The real binary on a `net_af_packet` wire port (a veth into a client namespace) and a
//! `net_tap` host port into its own namespace's kernel. A client pings the cluster address
//! through the engine; captures on both sides show the frames crossing unchanged, but for the
//! Ethernet source of frames leaving on the wire, which is the node MAC, and for the ARP request
//! for the cluster IP, which the engine answers itself.

mod common;

use std::process::Stdio;
use std::time::Duration;

use clonecluster_lab::topology::{run, LoneNs, Ns};
use common::*;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x02];

/// tcpdump on `iface` in `ns`, writing every frame to `file` as it arrives.
fn capture(ns: &Ns, iface: &str, file: &std::path::Path) -> Proc {
    let mut cmd = ns.command(&[
        "tcpdump",
        "-Z",
        "root",
        "--immediate-mode",
        "-U",
        "-n",
        "-s",
        "0",
        "-i",
        iface,
        "-w",
    ]);
    cmd.arg(file).stdin(Stdio::null());
    let mut p = Proc::spawn(cmd);
    p.wait_stderr("listening on", Duration::from_secs(10));
    p
}

#[test]
fn ping_crosses_the_engine_and_only_the_source_mac_changes() {
    require_root();
    let scratch = Scratch::new();
    let pid = std::process::id();
    let node = LoneNs::create(&format!("cct-afn-{pid}")).unwrap();
    let client = LoneNs::create(&format!("cct-afc-{pid}")).unwrap();
    let (w, c) = (format!("cctw{pid}"), format!("cctc{pid}"));
    run(&["ip", "link", "add", &w, "type", "veth", "peer", "name", &c]).unwrap();
    run(&["ip", "link", "set", &w, "netns", node.name(), "name", "w0"]).unwrap();
    run(&[
        "ip",
        "link",
        "set",
        &c,
        "netns",
        client.name(),
        "name",
        "c0",
    ])
    .unwrap();
    // Silence: no IPv6 chatter anywhere (new interfaces such as the tap inherit `default`).
    for ns in [&node, &client] {
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .unwrap();
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
            .unwrap();
    }
    // Frames larger than an mbuf (GSO) must not reach af_packet.
    node.run(&[
        "ethtool", "-K", "w0", "tso", "off", "gso", "off", "gro", "off",
    ])
    .unwrap();
    client
        .run(&[
            "ethtool", "-K", "c0", "tso", "off", "gso", "off", "gro", "off",
        ])
        .unwrap();
    client
        .run(&["ip", "link", "set", "c0", "address", "02:00:00:00:aa:02"])
        .unwrap();
    client
        .run(&["ip", "addr", "add", "198.18.0.2/24", "dev", "c0"])
        .unwrap();
    client.run(&["ip", "link", "set", "c0", "up"]).unwrap();
    // The node's kernel must never speak on the wire veth itself: with the cluster IP on cc0 it
    // would otherwise answer ARP for it on w0 too (Linux answers for any local address on any
    // interface), from w0's own MAC, racing the engine.
    node.run(&["ip", "link", "set", "w0", "arp", "off"])
        .unwrap();
    node.run(&["ip", "link", "set", "w0", "up"]).unwrap();

    let config = scratch.write(
        "node.yaml",
        &node_config(
            &format!("cct-af-{pid}"),
            "net_af_packet0,iface=w0",
            "net_tap0,iface=cc0",
            "  idle: interrupt\n  idle_max_sleep: 1ms\n",
        ),
    );
    let mut cmd = node.command(&[&bin().to_string_lossy(), "run", "--json", "--config"]);
    cmd.arg(&config);
    let mut engine = Proc::spawn(cmd);
    engine.wait_stderr("running on cores", Duration::from_secs(30));
    // The engine gave the tap the cluster MAC; the node's kernel serves the cluster IP on it.
    let link = node.run(&["ip", "link", "show", "cc0"]).unwrap();
    assert!(
        link.contains("02:cc:00:00:00:01"),
        "tap MAC is not the cluster MAC: {link}"
    );
    node.run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "cc0"])
        .unwrap();
    node.run(&["ip", "link", "set", "cc0", "up"]).unwrap();

    let client_pcap = scratch.path("client.pcap");
    let host_pcap = scratch.path("host.pcap");
    let cap_client = capture(&client, "c0", &client_pcap);
    let cap_host = capture(&node, "cc0", &host_pcap);

    let ping = client
        .command(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            "1200",
            "198.18.0.1",
        ])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "ping through the engine failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let udp = client
        .command(&["bash", "-c", "echo clonecluster > /dev/udp/198.18.0.1/9"])
        .status()
        .expect("udp");
    assert!(udp.success());
    std::thread::sleep(Duration::from_millis(500));
    cap_client.terminate();
    cap_host.terminate();
    let (status, stdout, stderr) = engine.terminate();
    assert!(status.success(), "{stderr}");

    let at_client = read_pcap(&client_pcap);
    let at_host = read_pcap(&host_pcap);
    // On failure, show both captures the way an operator would read them.
    let show = |p: &std::path::Path| {
        let out = std::process::Command::new("tcpdump")
            .args(["-e", "-n", "-r"])
            .arg(p)
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let context = format!(
        "client side:\n{}\nhost side:\n{}",
        show(&client_pcap),
        show(&host_pcap)
    );
    let from = |frames: &[Vec<u8>], mac: [u8; 6]| -> Vec<Vec<u8>> {
        frames.iter().filter(|f| f[6..12] == mac).cloned().collect()
    };

    let is_arp_request_for_cluster =
        |f: &[u8]| f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == [198, 18, 0, 1];
    let is_engine_arp_reply =
        |f: &[u8]| f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == [198, 18, 0, 1];

    // Host-bound: what the client sent reaches the node's kernel byte for byte, but for its
    // ARP request for the cluster IP, which the engine answers itself.
    let sent = from(&at_client, CLIENT_MAC);
    assert!(sent.len() >= 4, "client sent too little: {context}");
    let expected: Vec<Vec<u8>> = sent
        .iter()
        .filter(|f| !is_arp_request_for_cluster(f))
        .cloned()
        .collect();
    assert!(from(&at_host, CLIENT_MAC) == expected, "{context}");

    // Wire-bound: what the kernel sent (from the cluster MAC) reaches the client with the node
    // MAC as source and nothing else changed; the cluster MAC never appears as a source.
    let replied = from(&at_host, CLUSTER_MAC);
    assert!(
        replied.len() >= 4,
        "kernel replied too little: {}",
        replied.len()
    );
    // The engine's own frames: its ARP answers and its membership heartbeats (EtherType
    // 0x88b5, broadcast); the rest is what the kernel sent.
    let is_heartbeat = |f: &[u8]| f[12..14] == [0x88, 0xb5];
    let (engine_replies, arrived): (Vec<Vec<u8>>, Vec<Vec<u8>>) = from(&at_client, NODE_MAC)
        .into_iter()
        .filter(|f| !is_heartbeat(f))
        .partition(|f| is_engine_arp_reply(f));
    assert!(
        at_client
            .iter()
            .any(|f| is_heartbeat(f) && f[..6] == [0xff; 6]),
        "the engine sends its heartbeats on the wire: {context}"
    );
    assert_eq!(arrived.len(), replied.len(), "{context}");
    for (a, r) in arrived.iter().zip(&replied) {
        assert_eq!(a[..6], r[..6]);
        assert_eq!(a[12..], r[12..]);
    }
    assert!(
        from(&at_client, CLUSTER_MAC).is_empty(),
        "the cluster MAC leaked as a source"
    );
    // The engine answered the ARP request: node MAC in the header, cluster MAC in the payload.
    assert_eq!(engine_replies.len(), 1, "{context}");
    assert_eq!(engine_replies[0][6..12], NODE_MAC);
    assert_eq!(engine_replies[0][22..28], CLUSTER_MAC);
    // Nothing but the engine spoke on the wire: no frame from another source MAC.
    assert!(
        at_client
            .iter()
            .all(|f| f[6..12] == CLIENT_MAC || f[6..12] == NODE_MAC),
        "{context}"
    );

    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json report");
    assert!(report["total"]["wire_rx"].as_u64().unwrap() >= sent.len() as u64);
    assert!(report["total"]["wire_tx"].as_u64().unwrap() >= replied.len() as u64);
}
