//! The pipeline bench's appliance rows (`delivery=dsr|gue|ipip`): the engine configuration
//! that turns the generated traffic into service traffic, the correctness gate's forwarded
//! share, and the per-flow memory of appliance mode.
//!
//! The generated flows all go to the cluster address (198.18.0.1, 2001:2::1), TCP to port 80
//! and UDP to port 53, so one TCP and one UDP service on both cluster addresses, every port,
//! cover all of them (ICMP and ARP keep the cluster's own path). Each service has [`BACKENDS`] IPv4 backends with
//! static MACs (a bench has no one to answer ARP), and the node its own address
//! ([`NODE_IP`]) as the outer source of encapsulated frames. Forwarded frames leave on the
//! wire port: `net_pcap` without `tx_pcap` drops what it is given (counted as sent), a memif
//! wire port hands them back to its generator. testpmd then loops its port 0 onto itself
//! (`--port-topology=loop`), so both programs pay the same TX.
//!
//! Owns nothing the engine runs; never measures.

use clonecluster::appliance::maglev::TABLE_SIZE;
use clonecluster::cluster::flow_table::SLOT_BYTES;
use clonecluster::config::Delivery;

/// Backends per service.
pub const BACKENDS: usize = 8;
/// The node's own IPv4 address on the wire (`node.ip`).
pub const NODE_IP: &str = "198.18.0.2";

/// A scenario's `delivery=` value.
pub fn parse(v: &str) -> Delivery {
    match v {
        "local" => Delivery::Local,
        "dsr" => Delivery::Dsr,
        "gue" => Delivery::Gue,
        "ipip" => Delivery::Ipip,
        _ => panic!("delivery: `{v}` is not local, dsr, gue or ipip"),
    }
}

/// Lines to add under `node:` (indented by two spaces), empty in server mode.
pub fn node_lines(delivery: Delivery) -> String {
    if delivery.is_appliance() {
        format!("  ip: {NODE_IP}\n")
    } else {
        String::new()
    }
}

/// The `services:` section, empty in server mode: a TCP and a UDP service on both cluster
/// addresses, all ports, each with [`BACKENDS`] backends at 198.18.1.<n> with static MACs
/// 02:bb:00:00:<service>:<n>.
pub fn services_section(delivery: Delivery) -> String {
    if !delivery.is_appliance() {
        return String::new();
    }
    let mut out = String::from("services:\n");
    for (s, proto) in ["tcp", "udp"].iter().enumerate() {
        out += &format!(
            "  - name: bench-{proto}\n    addresses: [198.18.0.1, \"2001:2::1\"]\n    \
             protocol: {proto}\n    ports: [\"1-65535\"]\n    delivery: {}\n    backends:\n",
            delivery.name()
        );
        for n in 1..=BACKENDS {
            out +=
                &format!("      - {{ ip: 198.18.1.{n}, mac: \"02:bb:00:00:{s:02x}:{n:02x}\" }}\n");
        }
    }
    out
}

/// testpmd's extra arguments for a row: appliance rows loop port 0 (the wire port) onto
/// itself, as the engine sends forwarded frames back out of the wire port.
pub fn testpmd_args(delivery: Delivery) -> Option<&'static str> {
    delivery.is_appliance().then_some("--port-topology=loop")
}

/// What the engine's exit report says about forwarding, as shares of its wire frames.
pub struct Forwarding {
    /// Frames sent to a backend (`to_backend`, the `backend_frames_total` counter per core).
    pub to_backend: u64,
    /// Frames the wire port's TX queues took (forwarded frames, replies, control frames).
    pub wire_tx: u64,
    pub replies: u64,
    pub control_tx: u64,
    /// Frames a TX queue (either port) did not take.
    pub tx_unsent: u64,
}

impl Forwarding {
    /// Why the engine's forwarding is wrong against replay's share of forwarded frames
    /// (`expected`, 0..1) of `wire_rx` received frames, or `None`. `tolerance_pct` in
    /// percentage points.
    pub fn check(&self, wire_rx: u64, expected: f64, tolerance_pct: f64) -> Option<String> {
        let share = self.to_backend as f64 / wire_rx.max(1) as f64;
        if (share - expected).abs() * 100.0 > tolerance_pct {
            return Some(format!(
                "to backends {:.2}% vs replay {:.2}%",
                share * 100.0,
                expected * 100.0
            ));
        }
        // Every frame offered to the wire port is sent or counted as unsent, never lost.
        let offered = self.to_backend + self.replies + self.control_tx;
        if self.wire_tx + self.tx_unsent < offered {
            return Some(format!(
                "wire TX {} + unsent {} < {} forwarded + {} replies + {} control frames",
                self.wire_tx, self.tx_unsent, self.to_backend, self.replies, self.control_tx
            ));
        }
        None
    }
}

/// The appliance part of the memory report: what a tracked flow costs besides its slot.
pub fn memory_note() {
    println!(
        "  appliance mode: a flow's backend id (12 bits) lives in its {SLOT_BYTES}-byte slot: \
         no extra bytes per tracked flow; per service a Maglev table of {TABLE_SIZE} x 2 B = \
         {:.0} KiB, shared by the cores",
        (TABLE_SIZE * 2) as f64 / 1024.0
    );
}
