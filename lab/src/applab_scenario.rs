//! The appliance lab's scenarios: an event in the middle of steady load (`wrk`, the connection
//! probe, and long downloads of the backends' `/big` at a limited rate, so that they span the
//! event), and what it did to connections:
//! - `appliance-kill`: the last appliance's engine is killed (SIGKILL). The promise: no
//!   connection lost (its successors send every flow to the backend it was going to), new
//!   connections succeed after the takeover. Half the downloads go through the victim (client
//!   ports whose bucket it holds, asked with `owner-of`).
//! - `appliance-join`: the last appliance starts mid-load and joins: nothing lost, it forwards.
//! - `director-kill`: the kernel director dies (its port goes down) for comparison: every
//!   connection through it is lost, and nothing is served until it comes back.
//!
//! Timings come from the appliances' own timelines ([`super::measure`]), as in server mode.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::applab::ApplianceOptions;
use super::appliance::{ApplianceLab, Dispatch, LabPlan};
use super::load::{Step, Wrk};
use super::measure::{Observer, Timings};
use super::probe::{self, now_ms, Sample, Verdict};
use super::report::{ms, per_node};
use super::run::interrupted;
use super::scenario::Scenario;
use super::topology::{CLUSTER_MAC, PINNED_CLIENT_PORTS};

/// The scenarios, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AppScenario {
    ApplianceKill,
    ApplianceWireCut,
    ApplianceJoin,
    BackendKill,
    BackendDrain,
    DirectorKill,
}

/// Every scenario, in the order of their names' list.
pub const ALL: [AppScenario; 6] = [
    AppScenario::ApplianceKill,
    AppScenario::ApplianceWireCut,
    AppScenario::ApplianceJoin,
    AppScenario::BackendKill,
    AppScenario::BackendDrain,
    AppScenario::DirectorKill,
];

impl AppScenario {
    pub fn name(self) -> &'static str {
        match self {
            AppScenario::ApplianceKill => "appliance-kill",
            AppScenario::ApplianceWireCut => "appliance-wire-cut",
            AppScenario::ApplianceJoin => "appliance-join",
            AppScenario::BackendKill => "backend-kill",
            AppScenario::BackendDrain => "backend-drain",
            AppScenario::DirectorKill => "director-kill",
        }
    }

    pub fn parse(s: &str) -> Option<AppScenario> {
        ALL.into_iter().find(|x| x.name() == s)
    }

    fn expectation(self) -> &'static str {
        match self {
            AppScenario::ApplianceKill | AppScenario::ApplianceWireCut => {
                "0 connections lost; every new connection after the takeover succeeds"
            }
            AppScenario::BackendKill => {
                "only the dead backend's connections lost; new connections avoid it after the \
                 health budget (fall x interval, then the agreed table)"
            }
            AppScenario::BackendDrain => {
                "0 connections lost (its downloads complete); new connections avoid it once every \
                 appliance has the agreed table"
            }
            AppScenario::ApplianceJoin => "0 connections lost; the new appliance forwards",
            AppScenario::DirectorKill => {
                "(the single dispatcher's failure) every connection through it lost; nothing \
                 served afterwards"
            }
        }
    }
}

/// Long downloads per scenario, and their rate: 2 MiB at 256 KiB/s lasts 8 s.
const DOWNLOADS: usize = 8;
const DOWNLOAD_KIB_S: u64 = 256;

/// One scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct AppScenarioResult {
    pub scenario: String,
    /// What stood in front of the backends: "2 appliances", "kernel director".
    pub config: String,
    /// The appliance killed, cut or joined, or the backend killed (0: the dispatcher).
    pub node: u8,
    pub clients: u32,
    pub duration_s: u32,
    pub event_after_ms: u64,
    /// From the event until every other appliance saw it.
    pub detected_ms: Option<u64>,
    /// From the event until every new flow went to its final owner (the takeover, for a kill).
    pub moved_ms: Option<u64>,
    pub done_ms: Option<u64>,
    pub wrk: Step,
    pub probe: Verdict,
    /// Long downloads started, of them through the killed appliance, and complete at the end.
    pub downloads: usize,
    pub downloads_through_node: usize,
    pub downloads_complete: usize,
    /// How each download ended: `complete`, or curl's exit and the bytes read.
    pub download_ends: Vec<String>,
    /// From the event until the probe was served again (None: never, within the run).
    pub served_again_ms: Option<u64>,
    pub cluster_mac_learned: bool,
    /// Live peers declared dead before the event (the scenario is then void).
    pub peer_deaths_before_event: usize,
    pub expectation: String,
    pub passed: bool,
}

impl AppScenarioResult {
    /// Probe connections lost plus downloads not complete.
    pub fn lost(&self) -> usize {
        self.probe
            .lost_by_node
            .iter()
            .map(|(_, n)| n)
            .sum::<usize>()
            + (self.downloads - self.downloads_complete)
    }

    /// What happened, in one line.
    pub fn summary(&self) -> String {
        format!(
            "{} lost (probe connections {}, downloads {} of {} incomplete, {} through node \
             {}), detected {}, moved {}, served again {}, {} wrk errors, probe {} failed of {}, \
             new after moved {} failed of {}: {}",
            self.lost(),
            per_node(&self.probe.lost_by_node),
            self.downloads - self.downloads_complete,
            self.downloads,
            self.downloads_through_node,
            self.node,
            ms(self.detected_ms),
            ms(self.moved_ms),
            self.served_again_ms
                .map_or("never".to_owned(), |v| format!("{v} ms")),
            self.wrk.errors,
            self.probe.failed,
            self.probe.requests,
            self.probe.new_failed_after_settled,
            self.probe.new_after_settled,
            if self.passed { "held" } else { "FAILED" }
        )
    }
}

/// Sleeps `d`, returning early with an error if interrupted.
fn pause(d: Duration) -> Result<(), String> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    Ok(())
}

/// When a request of the probe was first served after `since_ms` (a keep-alive request sent
/// then, or a fresh connection whose connect completed then, answered), in ms after
/// `since_ms`: how long nothing was served.
fn served_again(samples: &[Sample], since_ms: u64) -> Option<u64> {
    samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.t_ms + s.connect_ms)
        .filter(|&t| t >= since_ms)
        .map(|t| t - since_ms)
        .min()
}

/// The lab a scenario runs on, started and serving: (lab, the node acted on, the
/// configuration's name, every appliance id).
fn start(
    s: AppScenario,
    opts: &ApplianceOptions,
) -> Result<(ApplianceLab, u8, String, Vec<u8>), String> {
    let k = opts.nodes;
    let ids: Vec<u8> = (1..=k).collect();
    let (dispatch, node, config) = match s {
        AppScenario::DirectorKill => (Dispatch::Director, 0, "kernel director".to_owned()),
        AppScenario::BackendKill | AppScenario::BackendDrain => (
            Dispatch::Appliances,
            opts.backends,
            format!("{k} appliances"),
        ),
        _ => (Dispatch::Appliances, k, format!("{k} appliances")),
    };
    let initial: Vec<u8> = ids
        .iter()
        .copied()
        .filter(|&i| s != AppScenario::ApplianceJoin || i != node)
        .collect();
    let lab = ApplianceLab::start(
        &opts.programs,
        &opts.prefix,
        LabPlan {
            dispatch,
            backends: opts.backends,
            all_ids: &ids,
            start: &initial,
            health: matches!(s, AppScenario::BackendKill | AppScenario::BackendDrain),
        },
        opts.out.join(format!("scenario-{}", s.name())),
    )?;
    lab.wait_formed(&initial, Duration::from_secs(30), &interrupted)?;
    lab.wait_serving(Duration::from_secs(20), &interrupted)?;
    // The client's receive buffer is capped, so that a download stays in flight: a DSR backend
    // would otherwise push the whole file into it within the first second, and a download
    // would complete from the buffer however dead the path of its ACKs.
    lab.topo
        .client
        .run(&["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 65536 65536"])?;
    Ok((lab, node, config, ids))
}

/// Client ports of the downloads (half through the victim appliance, client ports whose buckets
/// it holds) and how many go through the node acted on.
fn download_ports(s: AppScenario, lab: &ApplianceLab, node: u8) -> (Vec<u16>, usize) {
    let first = *PINNED_CLIENT_PORTS.start();
    match s {
        AppScenario::ApplianceKill | AppScenario::ApplianceWireCut => {
            let mut p = lab.ports_owned_by(1, node, first, DOWNLOADS / 2);
            let through = p.len();
            p.extend(lab.ports_owned_by(1, 1, first + 1000, DOWNLOADS - p.len()));
            (p, through)
        }
        AppScenario::BackendKill | AppScenario::BackendDrain => {
            let mut p = lab.ports_to_backend(1, node, false, first, DOWNLOADS / 2);
            let through = p.len();
            p.extend(lab.ports_to_backend(1, node, true, first + 1000, DOWNLOADS - p.len()));
            (p, through)
        }
        AppScenario::DirectorKill => ((first..first + DOWNLOADS as u16).collect(), DOWNLOADS),
        _ => ((first..first + DOWNLOADS as u16).collect(), 0),
    }
}

pub fn run(s: AppScenario, opts: &ApplianceOptions) -> Result<AppScenarioResult, String> {
    let (mut lab, node, config, ids) = start(s, opts)?;
    let (ports, through_node) = download_ports(s, &lab, node);
    let duration = Duration::from_secs(u64::from(opts.scenario_duration_s));
    let probe_file = lab.dir().join("probe.jsonl");
    let probe_pid = lab.start_probe(duration, &probe_file)?;
    let wrk = Wrk::start(
        &lab.topo.client,
        opts.scenario_clients,
        opts.scenario_duration_s,
        "/",
    )?;
    let downloads = lab.downloads(&ports, DOWNLOAD_KIB_S)?;
    let load_started = Instant::now();
    pause(duration / 3)?;

    let deaths_before = lab.peer_deaths();
    let fwd_before = lab.forwarded();
    let event_ms = now_ms();
    let event = Instant::now();
    let event_after_ms = load_started.elapsed().as_millis() as u64;
    match s {
        AppScenario::ApplianceKill => lab.kill_engine(node)?,
        AppScenario::ApplianceWireCut => lab.set_wire(node, false)?,
        AppScenario::ApplianceJoin => lab.start_node(node)?,
        AppScenario::BackendKill => lab.kill_backend(node)?,
        AppScenario::BackendDrain => lab.drain_backend(1, node)?,
        AppScenario::DirectorKill => lab.kill_dispatcher()?,
    }
    // The director's death is its port going down, a command that takes a few ms: requests
    // started before it completed may still have been served. A kill, a cut or a start takes
    // effect at once (waiting for the process's end or the tap is not part of it).
    let served_since = if s == AppScenario::DirectorKill {
        now_ms()
    } else {
        event_ms
    };
    let timings = observe(s, &lab, node, &ids, event_ms, event, duration * 2 / 3)?;
    let step = wrk.finish(&interrupted)?;
    lab.finish_probe(probe_pid, Duration::from_secs(10))?;
    let ends = lab.finish_downloads(downloads, Instant::now() + Duration::from_secs(20));
    let samples = probe::read(&probe_file)?;
    let keep = opts.out.join(format!("scenario-{}-probe.jsonl", s.name()));
    std::fs::copy(&probe_file, &keep).map_err(|e| format!("{}: {e}", keep.display()))?;
    let settled_at = timings.moved_ms.map_or(u64::MAX, |v| event_ms + v);
    let after = lab.forwarded();
    let grew = |id: u8| {
        let b = fwd_before.iter().find(|(i, _)| *i == id).map_or(0, |x| x.1);
        after.iter().any(|&(i, a)| i == id && a > b)
    };
    let mut r = AppScenarioResult {
        scenario: s.name().to_owned(),
        config,
        node,
        clients: opts.scenario_clients,
        duration_s: opts.scenario_duration_s,
        event_after_ms,
        detected_ms: timings.detected_ms,
        moved_ms: timings.moved_ms,
        done_ms: timings.done_ms,
        served_again_ms: served_again(&samples, served_since)
            .map(|v| v + (served_since - event_ms)),
        wrk: step,
        probe: probe::analyse(&samples, event_ms, settled_at),
        downloads: ports.len(),
        downloads_through_node: through_node,
        downloads_complete: ends.iter().filter(|e| ApplianceLab::complete(e)).count(),
        download_ends: ends,
        cluster_mac_learned: lab
            .topo
            .learned_macs()
            .unwrap_or_default()
            .iter()
            .any(|m| m == CLUSTER_MAC),
        peer_deaths_before_event: deaths_before,
        expectation: s.expectation().to_owned(),
        passed: false,
    };
    r.passed = judge(s, &r, s == AppScenario::ApplianceJoin && grew(node));
    Ok(r)
}

/// Whether scenario `s` kept its promise (`joined_forwards`: the joined appliance forwarded).
fn judge(s: AppScenario, r: &AppScenarioResult, joined_forwards: bool) -> bool {
    let after_move = r.moved_ms.is_some()
        && r.peer_deaths_before_event == 0
        && r.probe.new_after_settled > 0
        && r.probe.new_failed_after_settled == 0
        && !r.cluster_mac_learned;
    match s {
        AppScenario::ApplianceKill | AppScenario::ApplianceWireCut => {
            after_move && r.lost() == 0 && r.wrk.errors == 0 && r.downloads == DOWNLOADS
        }
        AppScenario::ApplianceJoin => {
            after_move
                && r.lost() == 0
                && r.wrk.errors == 0
                && r.probe.failed == 0
                && joined_forwards
        }
        AppScenario::BackendKill => {
            // Only the dead backend's connections lost, and once every appliance agreed it is
            // down, no new connection fails and none goes to it.
            let dead = super::appliance::backend_id(r.node);
            // The downloads are listed through the dead backend first: only those may end.
            let others_complete = r
                .download_ends
                .iter()
                .skip(r.downloads_through_node)
                .all(|e| ApplianceLab::complete(e));
            r.moved_ms.is_some()
                && r.probe.new_after_settled > 0
                && r.probe.new_failed_after_settled == 0
                && !r.probe.nodes_after_settled.contains(&dead)
                && r.probe.lost_by_node.iter().all(|(b, _)| *b == dead)
                && r.downloads == DOWNLOADS
                && others_complete
        }
        AppScenario::BackendDrain => {
            let drained = super::appliance::backend_id(r.node);
            r.moved_ms.is_some()
                && r.lost() == 0
                && r.wrk.errors == 0
                && r.probe.failed == 0
                && r.downloads == DOWNLOADS
                && r.probe.new_after_settled > 0
                && !r.probe.nodes_after_settled.contains(&drained)
        }
        AppScenario::DirectorKill => r.downloads_complete == 0 && r.served_again_ms.is_none(),
    }
}

/// Polls the appliances' status until the timings are complete or `limit` passed since the
/// event (the dispatcher has no timeline: it waits out `limit`).
fn observe(
    s: AppScenario,
    lab: &ApplianceLab,
    node: u8,
    ids: &[u8],
    event_ms: u64,
    event: Instant,
    limit: Duration,
) -> Result<Timings, String> {
    let kind = match s {
        AppScenario::ApplianceKill | AppScenario::ApplianceWireCut => Scenario::Failover,
        AppScenario::ApplianceJoin => Scenario::Join,
        AppScenario::BackendKill | AppScenario::BackendDrain => {
            let state = if s == AppScenario::BackendKill {
                "down"
            } else {
                "drained"
            };
            return observe_backend(lab, node, state, ids, event, limit);
        }
        AppScenario::DirectorKill => {
            pause(limit.saturating_sub(event.elapsed()))?;
            return Ok(Timings::default());
        }
    };
    let asked: Vec<u8> = if kind == Scenario::Failover {
        ids.iter().copied().filter(|&i| i != node).collect()
    } else {
        ids.to_vec()
    };
    let mut observer = Observer::new(kind, node, ids, event_ms);
    while event.elapsed() < limit && !observer.timings().complete() {
        if interrupted() {
            return Err("interrupted".into());
        }
        for &id in &asked {
            if let Some(st) = lab.status(id) {
                observer.observe(id, &st);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(observer.timings())
}

/// Polls the appliances until every one of `ids` shows backend `index` in `state` in its
/// status (the agreed table: it takes no new flow from then on), then waits out `limit`.
/// Detected: the first appliance to show it; moved: the last.
fn observe_backend(
    lab: &ApplianceLab,
    index: u8,
    state: &str,
    ids: &[u8],
    event: Instant,
    limit: Duration,
) -> Result<Timings, String> {
    let name = format!("b{index}");
    let mut seen: Vec<(u8, u64)> = Vec::new();
    while event.elapsed() < limit && seen.len() < ids.len() {
        if interrupted() {
            return Err("interrupted".into());
        }
        for &id in ids {
            if seen.iter().any(|(i, _)| *i == id) {
                continue;
            }
            let shows = lab.status(id).is_some_and(|st| {
                st.services
                    .iter()
                    .flat_map(|sv| &sv.backends)
                    .any(|b| b.name == name && b.state == state)
            });
            if shows {
                seen.push((id, event.elapsed().as_millis() as u64));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pause(limit.saturating_sub(event.elapsed()))?;
    let complete = seen.len() == ids.len();
    Ok(Timings {
        detected_ms: seen.iter().map(|(_, t)| *t).min(),
        moved_ms: complete.then(|| seen.iter().map(|(_, t)| *t).max().unwrap_or(0)),
        done_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Kind;

    #[test]
    fn names_round_trip() {
        for s in ALL {
            assert_eq!(AppScenario::parse(s.name()), Some(s));
        }
        assert_eq!(AppScenario::parse("failover"), None);
    }

    #[test]
    fn served_again_is_the_first_success_after_the_event() {
        let sample = |t_ms, kind, ok: bool| Sample {
            t_ms,
            kind,
            slot: 0,
            conn: 0,
            node: ok.then_some(11),
            ok,
            connect_ms: 1,
            error: String::new(),
            family: crate::probe::Family::Ipv4,
        };
        let samples = vec![
            sample(90, Kind::New, true),
            sample(120, Kind::New, false),
            sample(130, Kind::Keepalive, true),
            sample(400, Kind::New, true),
        ];
        // A connect that started before and completed after counts (connects take 1 ms); so
        // does a keep-alive request.
        assert_eq!(served_again(&samples, 100), Some(31));
        assert_eq!(served_again(&samples, 91), Some(0));
        assert_eq!(served_again(&samples, 132), Some(269));
        assert_eq!(served_again(&samples[..2], 100), None);
    }
}
