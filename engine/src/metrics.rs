//! Prometheus `/metrics` over HTTP on the node's management address (`control.metrics`).
//!
//! The text exposition format is a handful of `name{labels} value` lines: it is written here
//! directly from the per-core atomics and the control thread's last published view, rather
//! than through a metrics registry, because every value already lives in an atomic or in the
//! view and would otherwise have to be copied into registry objects on every change. The server
//! is a plain blocking `TcpListener` on its own thread: it never touches the packet cores.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::control::{Path, Refusal};
use crate::dataplane::{ControlLink, CoreLink};
use crate::pipeline::DropReason;

/// Renders every metric of the node.
pub(crate) fn render(node: u8, link: &ControlLink, view: &ControlView) -> String {
    let mut out = String::with_capacity(8192);
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP clonecluster_{name} {help}");
        let _ = writeln!(out, "# TYPE clonecluster_{name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(
                out,
                "clonecluster_{name}{{node=\"{node}\"{labels}}} {value}"
            );
        }
    };
    let per_core = |f: &dyn Fn(&crate::counters::CoreStats) -> u64| -> Vec<(String, u64)> {
        link.cores
            .iter()
            .enumerate()
            .map(|(i, c)| (format!(",core=\"{i}\""), f(&c.counters.snapshot())))
            .collect()
    };
    // One sample per core from a figure each core publishes in its `CoreLink`.
    let per_core_figure = |figure: &dyn Fn(&CoreLink) -> &AtomicU64| -> Vec<(String, u64)> {
        link.cores
            .iter()
            .enumerate()
            .map(|(i, c)| (format!(",core=\"{i}\""), figure(c).load(Relaxed)))
            .collect()
    };
    metric(
        "wire_rx_frames_total",
        "counter",
        "Frames received on the wire port.",
        &per_core(&|s| s.wire_rx),
    );
    metric(
        "host_rx_frames_total",
        "counter",
        "Frames received from the host port.",
        &per_core(&|s| s.host_rx),
    );
    metric(
        "host_tx_frames_total",
        "counter",
        "Frames delivered to the host (owned or shared).",
        &per_core(&|s| s.host_tx),
    );
    metric(
        "wire_tx_frames_total",
        "counter",
        "Frames sent on the wire (host frames, answers, heartbeats).",
        &per_core(&|s| s.wire_tx),
    );
    metric(
        "answers_total",
        "counter",
        "ARP and neighbour-discovery answers sent for the cluster address.",
        &per_core(&|s| s.replies),
    );
    metric(
        "tx_unsent_total",
        "counter",
        "Frames a TX queue did not take (freed).",
        &per_core(&|s| s.tx_unsent),
    );
    metric(
        "fragments_held_total",
        "counter",
        "Later IP fragments held until their first fragment.",
        &per_core(&|s| s.held),
    );
    metric(
        "control_frames_total",
        "counter",
        "Wire control frames (EtherType 0x88b5) handed to the control thread.",
        &per_core(&|s| s.to_control),
    );
    metric(
        "control_frames_sent_total",
        "counter",
        "The control thread's messages framed and queued for the wire port. With the other \
         frame counters: wire_rx + host_rx + control_frames_sent = host_tx + wire_tx + \
         tx_unsent + control_frames + dropped_frames, once held fragments are released or \
         expired.",
        &per_core(&|s| s.control_tx),
    );
    let mut dropped = Vec::new();
    for (i, c) in link.cores.iter().enumerate() {
        let s = c.counters.snapshot();
        for (reason, n) in DropReason::all().iter().zip(s.dropped) {
            dropped.push((format!(",core=\"{i}\",reason=\"{}\"", reason.label()), n));
        }
    }
    metric(
        "dropped_frames_total",
        "counter",
        "Frames dropped, by reason (not-owned, malformed-*, ...).",
        &dropped,
    );
    let flows = per_core_figure(&|c| &c.flows);
    metric(
        "flows_tracked",
        "gauge",
        "Flows in the core's flow table.",
        &flows,
    );
    let mut latency = Vec::new();
    for (i, c) in link.cores.iter().enumerate() {
        for (slot, label) in c.burst_latency_ns.iter().zip(["0.5", "0.99", "0.999", "1"]) {
            latency.push((
                format!(",core=\"{i}\",quantile=\"{label}\""),
                slot.load(Relaxed),
            ));
        }
    }
    metric(
        "burst_latency_ns",
        "gauge",
        "Wire burst processing time over the last second (hdrhistogram quantiles; 1 = max).",
        &latency,
    );
    let busy = per_core_figure(&|c| &c.busy_ns);
    metric(
        "core_busy_ns_total",
        "counter",
        "Nanoseconds the core spent on polls that received frames (the rest it polled empty \
         queues or slept): its rate over 1e9 is the core's busy share.",
        &busy,
    );
    let evictions = per_core_figure(&|c| &c.evictions);
    metric(
        "flow_evictions_total",
        "counter",
        "Live flows (not half-open) a full flow table forgot to make room (raise \
         dataplane.flow_capacity).",
        &evictions,
    );
    let half_open = per_core_figure(&|c| &c.half_open_dropped);
    metric(
        "half_open_flows_dropped_total",
        "counter",
        "Half-open TCP flows (SYN, no ACK yet) forgot or never tracked because the flow \
         table's half-open share (half of it) was full: a SYN flood, most likely. Their frames \
         are still delivered by ownership, a completed handshake is tracked as established, \
         and established flows are never evicted for them.",
        &half_open,
    );
    let risk = per_core_figure(&|c| &c.duplicate_risk);
    metric(
        "duplicate_risk_frames_total",
        "counter",
        "Frames delivered while acquiring a bucket as a new flow the old owner may still serve \
         (an unlearned UDP flow, a retransmitted learned SYN): the handoff's duplicate risk.",
        &risk,
    );
    metric(
        "mbufs_in_use",
        "gauge",
        "Mbufs out of the packet pool.",
        &[(String::new(), link.mbufs_in_use.load(Relaxed))],
    );
    metric(
        "wire_control_dropped_total",
        "counter",
        "Wire control frames the control thread had no room for, by queue (members: from a \
         live member's MAC within its allowance; others: the rest).",
        &[
            (
                ",queue=\"members\"".to_owned(),
                link.wire_in_dropped[0].load(Relaxed),
            ),
            (
                ",queue=\"others\"".to_owned(),
                link.wire_in_dropped[1].load(Relaxed),
            ),
        ],
    );
    metric(
        "epoch",
        "gauge",
        "Epoch of the ownership plan in force.",
        &[(String::new(), view.epoch)],
    );
    metric(
        "protocol_version",
        "gauge",
        "Control message format version this node speaks (the newest every live peer understands).",
        &[(String::new(), u64::from(view.protocol_version))],
    );
    metric(
        "buckets_accepting",
        "gauge",
        "Buckets in which this node takes new flows.",
        &[(String::new(), u64::from(view.accepting))],
    );
    metric(
        "buckets_moving",
        "gauge",
        "Buckets in handoff.",
        &[(String::new(), u64::from(view.moving))],
    );
    metric(
        "draining",
        "gauge",
        "1 while this node drains.",
        &[(String::new(), u64::from(view.draining))],
    );
    metric(
        "released_flows",
        "gauge",
        "Connections this node still serves in buckets it handed over (this plan's and earlier \
         plans'): they stay its own until they end, or a drain's deadline cuts them.",
        &[(String::new(), view.released_flows)],
    );
    metric(
        "released_buckets_held",
        "gauge",
        "Buckets this node handed over that still hold connections it serves.",
        &[(String::new(), u64::from(view.held_buckets))],
    );
    metric(
        "buckets_owed",
        "gauge",
        "Buckets whose earlier owner still serves connections in them: their owner takes new \
         flows there but leaves every connection it does not know to the earlier owner.",
        &[(String::new(), u64::from(view.owed_buckets))],
    );
    metric(
        "members_live",
        "gauge",
        "Live members of the cluster.",
        &[(String::new(), view.members.len() as u64)],
    );
    let peers: Vec<(String, u64)> = view
        .peers
        .iter()
        .map(|p| (format!(",peer=\"{}\"", p.node), u64::from(p.alive)))
        .collect();
    metric(
        "peer_alive",
        "gauge",
        "1 if the peer is considered alive.",
        &peers,
    );
    let mut seen = Vec::new();
    for p in &view.peers {
        for path in Path::ALL {
            if let Some(age) = p.last_seen_ms_ago[path.index()] {
                seen.push((format!(",peer=\"{}\",path=\"{path:?}\"", p.node), age));
            }
        }
    }
    metric(
        "peer_last_seen_ms",
        "gauge",
        "Milliseconds since the peer's last accepted message, by path.",
        &seen,
    );
    let per_path = |f: &dyn Fn(&PeerView, usize) -> u64| -> Vec<(String, u64)> {
        let mut rows = Vec::new();
        for p in &view.peers {
            for path in Path::ALL {
                rows.push((
                    format!(",peer=\"{}\",path=\"{path:?}\"", p.node),
                    f(p, path.index()),
                ));
            }
        }
        rows
    };
    metric(
        "peer_heartbeats_missed_total",
        "counter",
        "Heartbeats expected from the peer but not heard, by path (one per whole interval of \
         silence after the first; a dead peer keeps counting).",
        &per_path(&|p, i| p.missed[i]),
    );
    metric(
        "peer_messages_lost_total",
        "counter",
        "Control messages from the peer lost in transit, by path (gaps in its sequence numbers).",
        &per_path(&|p, i| p.lost[i]),
    );
    let refusing_peers: Vec<(String, u64)> = view
        .peers
        .iter()
        .map(|p| (format!(",peer=\"{}\"", p.node), u64::from(p.refusing)))
        .collect();
    metric(
        "peer_refusing",
        "gauge",
        "1 if the peer announces a failing service (it takes no new connection).",
        &refusing_peers,
    );
    if let Some(healthy) = view.healthy {
        metric(
            "service_healthy",
            "gauge",
            "1 while the local service passes its health check.",
            &[(String::new(), u64::from(healthy))],
        );
        metric(
            "health_checks_total",
            "counter",
            "Health checks run, by result.",
            &[
                (
                    ",result=\"ok\"".to_owned(),
                    view.health_checks.0 - view.health_checks.1.min(view.health_checks.0),
                ),
                (",result=\"failed\"".to_owned(), view.health_checks.1),
            ],
        );
    }
    metric(
        "refusing",
        "gauge",
        "1 while this node takes no new connection (its service fails and another node serves).",
        &[(String::new(), u64::from(view.refusing))],
    );
    metric(
        "control_accepted_total",
        "counter",
        "Control messages accepted, by path. On the wire path, with the refused and the \
         dropped: control_frames = accepted + refused + wire_control_dropped once the queues \
         are empty.",
        &Path::ALL
            .iter()
            .map(|p| (format!(",path=\"{p:?}\""), view.accepted[p.index()]))
            .collect::<Vec<_>>(),
    );
    let mut refused = Vec::new();
    for path in Path::ALL {
        for reason in Refusal::ALL {
            refused.push((
                format!(",path=\"{path:?}\",reason=\"{reason:?}\""),
                view.refused[path.index()][reason.index()],
            ));
        }
    }
    metric(
        "control_refused_total",
        "counter",
        "Control messages refused, by path and reason.",
        &refused,
    );
    out
}

/// Serves `/metrics` on `addr` until the process ends.
pub(crate) fn serve(
    addr: SocketAddr,
    node: u8,
    link: Arc<ControlLink>,
    view: Arc<arc_swap::ArcSwap<ControlView>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "`control.metrics`: cannot bind {addr}: {e}\n  fix: use a free port on this node's \
             management address"
        )
    })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let (status, body) = if line.starts_with("GET /metrics") {
                    ("200 OK", render(node, &link, &view.load()))
                } else {
                    ("404 Not Found", "try /metrics\n".to_owned())
                };
                let mut w = &stream;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}

/// What the control thread last knew, for the metrics endpoint (published every tick).
#[derive(Debug, Clone, Default)]
pub(crate) struct ControlView {
    pub epoch: u64,
    /// The control message format version this node speaks.
    pub protocol_version: u8,
    /// Buckets in which this node takes new flows.
    pub accepting: u32,
    pub moving: u32,
    pub draining: bool,
    /// Connections still served in buckets handed over, the buckets holding them, and the
    /// buckets owed to an earlier owner (DESIGN.md, "Long-lived flows").
    pub released_flows: u64,
    pub held_buckets: u32,
    pub owed_buckets: u32,
    /// The health checker's verdict (None: no health check configured), whether this node
    /// refuses new connections, and its checks so far (all, failed).
    pub healthy: Option<bool>,
    pub refusing: bool,
    pub health_checks: (u64, u64),
    /// Live members: (id, weight).
    pub members: Vec<(u8, u32)>,
    pub peers: Vec<PeerView>,
    /// Refused control messages by [path][reason].
    pub refused: [[u64; Refusal::ALL.len()]; 2],
    /// Accepted control messages by path.
    pub accepted: [u64; 2],
}

/// One peer in [`ControlView`].
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerView {
    pub node: u8,
    pub alive: bool,
    /// Milliseconds since its last accepted message, per path (UDP, wire).
    pub last_seen_ms_ago: [Option<u64>; 2],
    /// Heartbeats expected but not heard, and messages lost (sequence gaps), per path.
    pub missed: [u64; 2],
    pub lost: [u64; 2],
    /// It announces a failing service.
    pub refusing: bool,
}
