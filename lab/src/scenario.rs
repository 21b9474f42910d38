//! The lab's scenarios: an event in the middle of steady load, and what it did.
//! - `failover`: the last node's engine is killed (SIGKILL, no goodbye). The others must detect
//!   it and take its buckets; only the dead node's connections may be lost, and every new
//!   connection after the takeover must succeed.
//! - `wire-cut`: the last node's wire port goes down (`ip link set eth0 down` in its namespace)
//!   while its control network stays up. The node must fence itself and the others take its
//!   buckets as for a kill (DESIGN.md, "Liveness"); the same promises as `failover`, and the
//!   cut node must say in its status that it is fenced.
//! - `join`: the last node starts mid-load and joins; no request may fail, and it must serve.
//! - `drain`: the last node is drained through the operator socket; no request may fail, and
//!   after the drain it takes no new connection.
//!
//! Load is `wrk` (totals) plus the connection probe (per connection, which node answered).
//!
//! The scenario clusters run dual-stack: every node holds the cluster's IPv6 address
//! (`cluster.ip6`, [`CLUSTER_IP6`]) beside the IPv4 one, checks its service on both, and the
//! engines answer the client's neighbour solicitations as they answer ARP. `wrk` stays on IPv4;
//! the probe sends every other keep-alive slot and fresh connection over IPv6. The promises
//! hold for both families (the probe's totals cover both; a scenario needs IPv6 connections
//! after the move, and the client's neighbour entry for the IPv6 address must be the cluster
//! MAC).

use std::path::Path;
use std::time::{Duration, Instant};

use super::checks::{client_neighbour6, neighbour_is_cluster_mac};
use super::cluster::{Cluster, Kind};
use super::load::Wrk;
use super::measure::{Observer, Timings};
use super::probe::{self, now_ms};
use super::report::ScenarioResult;
use super::topology::{CLUSTER_IP6, CLUSTER_MAC};
use super::Programs;

/// The scenarios, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Failover,
    WireCut,
    Join,
    Drain,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Failover => "failover",
            Scenario::WireCut => "wire-cut",
            Scenario::Join => "join",
            Scenario::Drain => "drain",
        }
    }

    fn expectation(self) -> &'static str {
        match self {
            Scenario::Failover => {
                "only the dead node's connections lost; every new connection after the takeover \
                 succeeds; IPv4 and IPv6 alike"
            }
            Scenario::WireCut => {
                "the cut node fences itself; only its connections lost; every new connection after \
                 the takeover succeeds; IPv4 and IPv6 alike"
            }
            Scenario::Join => "no request fails; the new node serves; IPv4 and IPv6 alike",
            Scenario::Drain => {
                "no request fails; the drained node takes no new connection; IPv4 and IPv6 alike"
            }
        }
    }
}

/// What a scenario run needs.
#[derive(Debug)]
pub struct ScenarioRun<'a> {
    pub programs: &'a Programs,
    pub prefix: &'a str,
    pub nodes: u8,
    pub policy: &'a str,
    pub clients: u32,
    pub duration_s: u32,
    pub out: &'a Path,
    pub interrupted: fn() -> bool,
}

/// Sleeps `d`, returning early with an error if interrupted.
fn pause(d: Duration, interrupted: &dyn Fn() -> bool) -> Result<(), String> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    Ok(())
}

pub fn run(s: Scenario, r: &ScenarioRun<'_>) -> Result<ScenarioResult, String> {
    let ids: Vec<u8> = (1..=r.nodes).collect();
    let node = r.nodes;
    let others: Vec<u8> = ids.iter().copied().filter(|&i| i != node).collect();
    let initial = if s == Scenario::Join { &others } else { &ids };
    let mut c = Cluster::start_with(
        r.programs,
        r.prefix,
        Kind::Engine(r.policy.to_owned()),
        &ids,
        initial,
        r.out.join(format!("scenario-{}", s.name())),
        Some(CLUSTER_IP6),
    )?;
    c.wait_formed(initial, Duration::from_secs(30), &r.interrupted)?;

    // The probe and wrk run for the whole scenario; the event comes a third of the way in.
    let probe_file = c.dir().join("probe.jsonl");
    let probe_pid = c.start_probe(Duration::from_secs(u64::from(r.duration_s)), &probe_file)?;
    let wrk = Wrk::start(&c.topo.client, r.clients, r.duration_s, "/")?;
    let load_started = Instant::now();
    pause(
        Duration::from_secs(u64::from(r.duration_s)) / 3,
        &r.interrupted,
    )?;

    let deaths_before = c.peer_deaths();
    let event_ms = now_ms();
    let event = Instant::now();
    let event_after_ms = load_started.elapsed().as_millis() as u64;
    let limit = Duration::from_secs(u64::from(r.duration_s)) * 2 / 3;
    match s {
        Scenario::Failover => {
            let pid = c.engine_pid(node).ok_or("no engine to kill")?;
            c.topo.kill(pid);
        }
        Scenario::WireCut => c.set_wire(node, false)?,
        Scenario::Join => c.start_node(node)?,
        Scenario::Drain => {
            c.drain(node, true)?;
        }
    }
    // The timings are the nodes' own stamps of the steps they took (see `measure`): polling
    // only has to reach each node once after the step, however fast or slow the machine is.
    // Every reply is kept beside the report.
    let mut observer = Observer::new(s, node, &ids, event_ms);
    let mut polls = format!("{}\n", serde_json::json!({ "event_ms": event_ms }));
    let crash = matches!(s, Scenario::Failover | Scenario::WireCut);
    let asked: &[u8] = if crash { &others } else { &ids };
    while event.elapsed() < limit && !observer.timings().complete() {
        if (r.interrupted)() {
            return Err("interrupted".into());
        }
        for &id in asked {
            if let Some(st) = c.status(id) {
                observer.observe(id, &st);
                polls.push_str(&serde_json::to_string(&st).map_err(|e| e.to_string())?);
                polls.push('\n');
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The cut node still answers on its operator socket: it must say it is fenced.
    let fenced = (s == Scenario::WireCut).then(|| c.status(node).is_some_and(|st| st.fenced));
    let Timings {
        detected_ms,
        moved_ms,
        done_ms,
    } = observer.timings();

    let step = wrk.finish(&r.interrupted)?;
    // The probe stops on its own at the end of its duration.
    c.finish_probe(probe_pid, Duration::from_secs(10), &r.interrupted)?;
    let samples = probe::read(&probe_file)?;
    // NDP through the engines: the client resolved the cluster's IPv6 address to the cluster
    // MAC (and still does after the event).
    let neighbour = client_neighbour6(&c.topo, CLUSTER_IP6);
    let neighbour_ok = neighbour_is_cluster_mac(&neighbour);
    // Keep the evidence beside the report: every probe request, and each node's last status.
    let keep = |suffix: &str, text: String| {
        let path = r.out.join(format!("scenario-{}-{suffix}", s.name()));
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    keep(
        "probe.jsonl",
        std::fs::read_to_string(&probe_file).map_err(|e| e.to_string())?,
    )?;
    let statuses: Vec<_> = ids.iter().filter_map(|&i| c.status(i)).collect();
    keep("status-polls.jsonl", polls)?;
    keep(
        "status.json",
        serde_json::to_string_pretty(&statuses).map_err(|e| e.to_string())?,
    )?;
    let settled_at = moved_ms.map_or(u64::MAX, |ms| event_ms + ms);
    let verdict = probe::analyse(&samples, event_ms, settled_at);
    let learned = c
        .topo
        .learned_macs()
        .unwrap_or_default()
        .iter()
        .any(|m| m == CLUSTER_MAC);

    let passed = moved_ms.is_some()
        && deaths_before == 0
        && !learned
        && neighbour_ok
        && verdict.new_after_settled > 0
        && verdict.ipv6.new_after_settled > 0
        && verdict.new_failed_after_settled == 0
        && match s {
            Scenario::Failover => verdict.lost_by_node.iter().all(|(n, _)| *n == node),
            Scenario::WireCut => {
                fenced == Some(true) && verdict.lost_by_node.iter().all(|(n, _)| *n == node)
            }
            Scenario::Join => {
                step.errors == 0
                    && verdict.failed == 0
                    && verdict.nodes_after_settled.contains(&node)
            }
            Scenario::Drain => {
                step.errors == 0
                    && verdict.failed == 0
                    && !verdict.nodes_after_settled.contains(&node)
            }
        };
    Ok(ScenarioResult {
        scenario: s.name().to_owned(),
        nodes: r.nodes,
        policy: r.policy.to_owned(),
        node,
        clients: r.clients,
        duration_s: r.duration_s,
        event_after_ms,
        detected_ms,
        moved_ms,
        done_ms,
        wrk: step,
        probe: verdict,
        cluster_mac_learned: learned,
        ipv6_neighbour: neighbour,
        ipv6_neighbour_is_cluster_mac: neighbour_ok,
        peer_deaths_before_event: deaths_before,
        cut_node_fenced: fenced,
        expectation: s.expectation().to_owned(),
        passed,
    })
}
