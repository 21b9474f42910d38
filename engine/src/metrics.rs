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

use crate::appliance::BackendState;
use crate::config::{Delivery, RuleMode};
use crate::control::{FenceReasons, Path, Refusal};
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
        "backend_frames_total",
        "counter",
        "Frames forwarded to a backend (appliance mode: DSR or encapsulated).",
        &per_core(&|s| s.to_backend),
    );
    for (name, kind, help, rows) in service_metrics(link) {
        metric(name, kind, help, &rows);
    }
    metric(
        "tx_unsent_total",
        "counter",
        "Frames a TX queue did not take (freed).",
        &per_core(&|s| s.tx_unsent),
    );
    metric(
        "frames_passed_total",
        "counter",
        "Frames passed to the packet core that holds their flow's state (several cores).",
        &per_core(&|s| s.passed),
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
         are still decided by ownership, a completed handshake is tracked as established, \
         and established flows are never evicted for them.",
        &half_open,
    );
    let turned_away = per_core_figure(&|c| &c.turned_away);
    metric(
        "flows_turned_away_total",
        "counter",
        "New flows other than SYNs (an ACK or FIN picked up mid-stream, a UDP datagram) not \
         tracked because a flow table (own or learned) was full and this was the first packet \
         of the flow it saw: a flood of spoofed one-packet flows, most likely. Their frames are \
         still decided by ownership, the flow's next packet gets it tracked (unless the table \
         turned away 4096-65536 other flows in between), and settled flows are never evicted \
         for them.",
        &turned_away,
    );
    let full = per_core_figure(&|c| &c.wire_full_bursts);
    metric(
        "wire_full_bursts_total",
        "counter",
        "Wire polls that returned a whole burst: the receive queue was backed up, and frames \
         may have been lost before the core saw them (a flood, or more traffic than the core \
         takes). Meanwhile missing wire heartbeats are not taken as a dead wire path.",
        &full,
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
    let fenced: Vec<(String, u64)> = FenceReasons::ALL
        .iter()
        .map(|r| {
            let on = view.fence_reasons.contains(*r);
            (format!(",reason=\"{}\"", r.label()), u64::from(on))
        })
        .collect();
    metric(
        "fenced",
        "gauge",
        "1 per reason this node is fenced for (it owns nothing): link-down, core-stalled, \
         hears-no-peer-on-wire, unheard-on-wire, settling, superseded.",
        &fenced,
    );
    metric(
        "wire_peers_heard",
        "gauge",
        "Live peers whose heartbeats this node hears on the wire.",
        &[(String::new(), view.wire_peers_heard)],
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
                seen.push((
                    format!(",peer=\"{}\",path=\"{}\"", p.node, path.name()),
                    age,
                ));
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
                    format!(",peer=\"{}\",path=\"{}\"", p.node, path.name()),
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
            .map(|p| (format!(",path=\"{}\"", p.name()), view.accepted[p.index()]))
            .collect::<Vec<_>>(),
    );
    let mut refused = Vec::new();
    for path in Path::ALL {
        for reason in Refusal::ALL {
            refused.push((
                format!(",path=\"{}\",reason=\"{}\"", path.name(), reason.name()),
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

/// One metric: its name (without `clonecluster_`), kind, help and rows (labels after `node`,
/// value).
type Metric = (&'static str, &'static str, &'static str, Vec<(String, u64)>);

/// Appliance mode's metrics, per service (summed over its backends) and per backend (summed
/// over cores), from the services in force: none without services. Per backend, flows are
/// counted as they start (`new_flows`) and as they are now in the cores' flow tables (`flows`,
/// a gauge).
fn service_metrics(link: &ControlLink) -> Vec<Metric> {
    let services = link.services();
    if !services.active() {
        return Vec::new();
    }
    let (mut frames, mut bytes, mut flows) = (Vec::new(), Vec::new(), Vec::new());
    let (mut b_frames, mut b_bytes, mut b_flows) = (Vec::new(), Vec::new(), Vec::new());
    let mut b_current = Vec::new();
    let (mut state, mut weight) = (Vec::new(), Vec::new());
    let (mut current, mut up) = (Vec::new(), Vec::new());
    for rule in services.rules() {
        let service = format!(",service=\"{}\"", escape(&rule.name));
        let mut total = crate::dataplane::BackendCounts::default();
        for b in &rule.backends {
            let n = link.backend_counts(b.id);
            total.frames += n.frames;
            total.bytes += n.bytes;
            total.new_flows += n.new_flows;
            total.flows += n.flows;
            let labels = format!("{service},backend=\"{}\"", escape(&b.name));
            b_frames.push((labels.clone(), n.frames));
            b_bytes.push((labels.clone(), n.bytes));
            b_flows.push((labels.clone(), n.new_flows));
            b_current.push((labels.clone(), n.flows));
            weight.push((labels.clone(), u64::from(b.weight)));
            for s in [BackendState::Up, BackendState::Down, BackendState::Drained] {
                let labels = format!("{labels},state=\"{}\"", s.name());
                state.push((labels, u64::from(b.state == s)));
            }
        }
        frames.push((service.clone(), total.frames));
        bytes.push((service.clone(), total.bytes));
        flows.push((service.clone(), total.new_flows));
        current.push((service.clone(), total.flows));
        // Only a rule that forwards has backends to take its flows: a `local` or disabled one
        // has no row (a 0 would say its new flows are dropped for want of a backend).
        if rule.delivery != Delivery::Local && rule.mode != RuleMode::Disabled {
            let taking = rule
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Up && b.weight > 0 && b.mac.is_some())
                .count();
            up.push((service, taking as u64));
        }
    }
    let per_core = |count: &dyn Fn(&crate::dataplane::BackendFigures) -> u64| {
        link.cores
            .iter()
            .enumerate()
            .map(|(i, c)| (format!(",core=\"{i}\""), count(&c.backends)))
            .collect()
    };
    let too_big = per_core(&|b| b.too_big.load(Relaxed));
    let fragmented = per_core(&|b| b.fragmented.load(Relaxed));
    vec![
        (
            "service_frames_total",
            "counter",
            "Frames forwarded to the service's backends.",
            frames,
        ),
        (
            "service_bytes_total",
            "counter",
            "Bytes forwarded to the service's backends, as sent (encapsulation included).",
            bytes,
        ),
        (
            "service_new_flows_total",
            "counter",
            "New flows the service's backend tables assigned on this node.",
            flows,
        ),
        (
            "service_flows",
            "gauge",
            "Flows in this node's flow tables whose backend is one of the service's.",
            current,
        ),
        (
            "service_backends_up",
            "gauge",
            "The service's backends that take new flows (up, weight above 0, MAC or next hop \
             resolved): 0 means its new flows are dropped (no-backend).",
            up,
        ),
        (
            "service_backend_frames_total",
            "counter",
            "Frames forwarded to the backend.",
            b_frames,
        ),
        (
            "service_backend_bytes_total",
            "counter",
            "Bytes forwarded to the backend, as sent (encapsulation included).",
            b_bytes,
        ),
        (
            "service_backend_new_flows_total",
            "counter",
            "New flows this node sent to the backend (a flow keeps its backend until it ends).",
            b_flows,
        ),
        (
            "service_backend_flows",
            "gauge",
            "Flows in this node's flow tables whose backend is the backend (a flow past its idle \
             timeout counts until the table's sweep removes it).",
            b_current,
        ),
        (
            "service_backend_state",
            "gauge",
            "1 for the backend's state: up (takes new flows), down (failed its health checks), \
             drained (keeps its flows, takes no new ones).",
            state,
        ),
        (
            "service_backend_weight",
            "gauge",
            "The backend's configured weight.",
            weight,
        ),
        (
            "services_epoch",
            "gauge",
            "Epoch of the agreed backend table in force (0: the configuration's).",
            vec![(String::new(), services.epoch)],
        ),
        (
            "too_big_total",
            "counter",
            "Datagrams too big for an encapsulated backend path: answered with ICMP \
             fragmentation needed / packet too big (DF set), or dropped (those cut into \
             fragments instead are in fragmented_total).",
            too_big,
        ),
        (
            "fragmented_total",
            "counter",
            "IPv4 datagrams without DF too big for an encapsulated backend path, cut into \
             fragments that fit it (each fragment counted in the backend's frames).",
            fragmented,
        ),
    ]
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    /// Why this node is fenced (empty: it is not).
    pub fence_reasons: FenceReasons,
    /// Live peers heard on the wire.
    pub wire_peers_heard: u64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::Services;
    use crate::config::Config;
    use crate::control::Snapshot;
    use crate::pipeline::ApplianceCounts;

    /// Two services on one address; backend `b` gets a name that needs escaping.
    const SERVICES: &str = r#"
services:
  - name: web
    addresses: [198.18.0.100]
    ports: [80]
    delivery: dsr
    backends:
      - { name: a, ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { name: b, ip: 198.18.0.22, mac: 02:bb:00:00:00:02 }
  - name: api
    addresses: [198.18.0.100]
    ports: [443]
    delivery: gue
    backends:
      - { name: c, ip: 198.18.1.21, mac: 02:bb:00:00:00:03 }
  - name: admin
    addresses: [198.18.0.100]
    ports: [22]
    delivery: local
"#;

    fn value(text: &str, line_start: &str) -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Label values are words in lower case, as the other labels' are (not Rust's names).
    #[test]
    fn paths_and_refusals_are_labelled_in_words() {
        let link = ControlLink::new(2, Arc::new(Snapshot::empty()));
        let mut view = ControlView::default();
        view.refused[Path::Wire.index()][Refusal::BadMac.index()] = 3;
        view.accepted[Path::Udp.index()] = 5;
        view.peers.push(PeerView {
            node: 2,
            alive: true,
            last_seen_ms_ago: [Some(7), None],
            ..PeerView::default()
        });
        let text = render(1, &link, &view);
        assert_eq!(
            value(
                &text,
                "clonecluster_control_refused_total{node=\"1\",path=\"wire\",reason=\"bad-mac\"}"
            ),
            3
        );
        assert_eq!(
            value(
                &text,
                "clonecluster_control_accepted_total{node=\"1\",path=\"udp\"}"
            ),
            5
        );
        assert_eq!(
            value(
                &text,
                "clonecluster_peer_last_seen_ms{node=\"1\",peer=\"2\",path=\"udp\"}"
            ),
            7
        );
        for l in text.lines().filter(|l| l.contains("path=")) {
            assert!(
                !l.contains("Udp") && !l.contains("Wire") && !l.contains("BadMac"),
                "{l}"
            );
        }
    }

    #[test]
    fn every_service_and_backend_has_its_labelled_rows() {
        let text = crate::config::tests::LAB.replace(
            "  mac: 02:00:00:00:00:01\n",
            "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
        ) + SERVICES;
        let mut config = Config::parse(&text, "t.yaml").unwrap();
        config.validate("t.yaml").unwrap();
        // `check` refuses such a name; the rows escape whatever names they are given.
        config.services[0].backends[1].name = Some("b \"2\"".into());
        let link = ControlLink::new(2, Arc::new(Snapshot::empty()));
        let view = ControlView::default();
        assert!(
            !render(1, &link, &view).contains("clonecluster_service"),
            "server mode: no service rows"
        );
        let mut services = Services::compile(&config, b"0123456789abcdef", None);
        services.epoch = 7;
        let ids: Vec<u16> = services.backends().map(|(_, b)| b.id).collect();
        let b = ids[1];
        let services = services.with_backend(b"0123456789abcdef", b, |b| {
            b.state = crate::appliance::BackendState::Drained
        });
        link.publish_services(Arc::new(services));
        // What two cores' pipelines counted, by backend id.
        let counts = |frames: [u64; 3], too_big| {
            let mut c = ApplianceCounts {
                frames: vec![0; 4],
                bytes: vec![0; 4],
                new_flows: vec![0; 4],
                flows: vec![0; 4],
                too_big,
                fragmented: too_big * 2,
            };
            for (id, n) in ids.iter().zip(frames) {
                let id = usize::from(*id);
                c.frames[id] = n;
                c.bytes[id] = n * 100;
                c.new_flows[id] = n / 2;
                c.flows[id] = n / 10;
            }
            c
        };
        link.cores[0].backends.store(&counts([10, 20, 30], 1));
        link.cores[1].backends.store(&counts([1, 2, 3], 4));
        let text = render(1, &link, &view);
        let row = |name: &str, labels: &str| {
            value(
                &text,
                &format!("clonecluster_{name}{{node=\"1\"{labels}}} "),
            )
        };
        let web_a = ",service=\"web\",backend=\"a\"";
        let web_b = ",service=\"web\",backend=\"b \\\"2\\\"\"";
        let api_c = ",service=\"api\",backend=\"c\"";
        assert_eq!(row("service_backend_frames_total", web_a), 11);
        assert_eq!(row("service_backend_frames_total", web_b), 22);
        assert_eq!(row("service_backend_frames_total", api_c), 33);
        assert_eq!(row("service_backend_bytes_total", api_c), 3300);
        assert_eq!(row("service_backend_new_flows_total", web_b), 11);
        assert_eq!(row("service_backend_flows", web_b), 2);
        assert_eq!(row("service_backend_flows", api_c), 3);
        assert!(
            text.contains("# TYPE clonecluster_service_backend_flows gauge"),
            "{text}"
        );
        assert_eq!(row("service_frames_total", ",service=\"web\""), 33);
        assert_eq!(row("service_bytes_total", ",service=\"web\""), 3300);
        assert_eq!(row("service_new_flows_total", ",service=\"api\""), 16);
        assert_eq!(
            row("service_flows", ",service=\"web\""),
            1 + 2,
            "a's and b's"
        );
        assert_eq!(row("service_flows", ",service=\"api\""), 3);
        assert_eq!(
            row("service_backends_up", ",service=\"web\""),
            1,
            "b is drained"
        );
        assert_eq!(row("service_backends_up", ",service=\"api\""), 1);
        assert!(
            !text.contains("service_backends_up{node=\"1\",service=\"admin\"}"),
            "a local rule has no backends to be up"
        );
        assert_eq!(
            row("service_backend_state", &format!("{web_a},state=\"up\"")),
            1
        );
        assert_eq!(
            row(
                "service_backend_state",
                &format!("{web_a},state=\"drained\"")
            ),
            0
        );
        assert_eq!(
            row(
                "service_backend_state",
                &format!("{web_b},state=\"drained\"")
            ),
            1
        );
        assert_eq!(
            row("service_backend_state", &format!("{web_b},state=\"up\"")),
            0
        );
        assert_eq!(row("service_backend_weight", api_c), 100);
        assert_eq!(row("services_epoch", ""), 7);
        assert_eq!(row("too_big_total", ",core=\"1\""), 4);
        assert_eq!(row("fragmented_total", ",core=\"0\""), 2);
        assert_eq!(row("fragmented_total", ",core=\"1\""), 8);
        assert!(
            text.contains("# TYPE clonecluster_service_backend_state gauge"),
            "{text}"
        );
    }
}
