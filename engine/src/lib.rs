//! clonecluster: a Clone Cluster packet engine.
//!
//! All nodes of a cluster share one IP and one MAC on a layer-2 segment; every node sees every
//! frame, and each decides on its own which flows it owns. The modules follow
//! `DESIGN.md`'s layout:
//!
//! - [`config`]: the YAML configuration, typed and validated.
//! - [`appliance`]: appliance mode's services, port rules, backend tables and delivery.
//! - [`wire`]: zero-copy packet views and builders (Ethernet/VLAN, ARP, IPv4/IPv6, TCP, UDP,
//!   ICMPv4/ICMPv6 with neighbour discovery) and the one-pass classifier; no DPDK types.
//! - [`cluster`]: flow keys, buckets, the ownership table, flow and fragment tracking (pure logic).
//! - [`pipeline`]: what a packet core does with each frame (pure Rust over byte slices).
//! - [`control`]: membership, failure detection and lossless handoff as a sans-IO state machine.
//! - [`counters`]: per-core packet counters (one writer each).
//! - [`replay`]: N simulated nodes over a pcap: duplicates and orphans, offline.
//! - [`health`]: the application health check that drains a failing node, and how refused
//!   connections are held back meanwhile.
//! - [`logging`]: log lines that carry the node id and the current epoch (text or JSON).
//! - [`metrics`]: Prometheus `/metrics` over HTTP.
//! - [`runtime`]: the control thread: sockets, timers, the state machine, snapshots to cores.
//! - [`dataplane`]: the only code that touches DPDK: EAL, ports, mbufs, the packet cores and
//!   the link they share with the control thread.
//! - `testkit` (unit tests and the `testkit` feature only): captured frames, frame builders,
//!   checksums and pcap files shared by every test and bench.
//!
//! `unsafe` code is denied everywhere but in [`dataplane`] (DPDK's FFI) and in
//! `cluster::siphash` and `cluster::flow_table` (SIMD hashing, the flow table's aligned slots).
#![deny(unsafe_code)]

pub mod appliance;
pub mod cluster;
pub mod config;
pub mod control;
pub mod counters;
#[allow(unsafe_code)]
pub mod dataplane;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod replay;
pub mod runtime;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod wire;
