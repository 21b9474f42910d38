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
use super::appliance::{ApplianceLab, Dispatch};
use super::load::{Step, Wrk};
use super::measure::{Observer, Timings};
use super::probe::{self, now_ms, Kind, Sample, Verdict};
use super::report::{ms, per_node};
use super::run::interrupted;
use super::scenario::Scenario;
use super::topology::{CLUSTER_MAC, PINNED_CLIENT_PORTS};

/// The scenarios, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AppScenario {
    ApplianceKill,
    ApplianceJoin,
    DirectorKill,
}

impl AppScenario {
    pub fn name(self) -> &'static str {
        match self {
            AppScenario::ApplianceKill => "appliance-kill",
            AppScenario::ApplianceJoin => "appliance-join",
            AppScenario::DirectorKill => "director-kill",
        }
    }

    pub fn parse(s: &str) -> Option<AppScenario> {
        [
            AppScenario::ApplianceKill,
            AppScenario::ApplianceJoin,
            AppScenario::DirectorKill,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }

    fn expectation(self) -> &'static str {
        match self {
            AppScenario::ApplianceKill => {
                "0 connections lost; every new connection after the takeover succeeds"
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
    /// The appliance killed or joined (0: the dispatcher).
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
    /// From the event until a new connection was served again (None: never, within the run).
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

/// The first successful fresh connection after `event_ms`, in ms after it.
fn served_again(samples: &[Sample], event_ms: u64) -> Option<u64> {
    samples
        .iter()
        .filter(|s| s.kind == Kind::New && s.ok && s.t_ms >= event_ms)
        .map(|s| s.t_ms - event_ms)
        .min()
}

pub fn run(s: AppScenario, opts: &ApplianceOptions) -> Result<AppScenarioResult, String> {
    let k = opts.nodes;
    let ids: Vec<u8> = (1..=k).collect();
    let (dispatch, node, config) = match s {
        AppScenario::DirectorKill => (Dispatch::Director, 0, "kernel director".to_owned()),
        _ => (Dispatch::Appliances, k, format!("{k} appliances")),
    };
    let others: Vec<u8> = ids.iter().copied().filter(|&i| i != node).collect();
    let initial = if s == AppScenario::ApplianceJoin {
        &others
    } else {
        &ids
    };
    let mut lab = ApplianceLab::start(
        &opts.programs,
        &opts.prefix,
        dispatch,
        opts.backends,
        &ids,
        initial,
        opts.out.join(format!("scenario-{}", s.name())),
    )?;
    lab.wait_formed(initial, Duration::from_secs(30), &interrupted)?;
    lab.wait_serving(Duration::from_secs(20), &interrupted)?;
    // The client's receive buffer is capped, so that a download stays in flight: a DSR backend
    // would otherwise push the whole file into it within the first second, and a download
    // would complete from the buffer however dead the path of its ACKs.
    lab.topo
        .client
        .run(&["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 65536 65536"])?;

    // Downloads: half through the victim of a kill (client ports its buckets hold).
    let first = *PINNED_CLIENT_PORTS.start();
    let ports: Vec<u16> = if s == AppScenario::ApplianceKill {
        let mut p = lab.ports_owned_by(1, node, first, DOWNLOADS / 2);
        p.extend(lab.ports_owned_by(1, 1, first + 1000, DOWNLOADS - p.len()));
        p
    } else {
        (first..first + DOWNLOADS as u16).collect()
    };
    let through_node = match s {
        AppScenario::ApplianceKill => DOWNLOADS / 2,
        AppScenario::ApplianceJoin => 0,
        AppScenario::DirectorKill => ports.len(),
    };
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
        AppScenario::ApplianceJoin => lab.start_node(node)?,
        AppScenario::DirectorKill => lab.kill_dispatcher()?,
    }
    // Requests started before the action completed may still have been served.
    let acted_ms = now_ms();
    let timings = observe(s, &lab, node, &ids, event_ms, event, duration * 2 / 3)?;
    let step = wrk.finish(&interrupted)?;
    lab.finish_probe(probe_pid, Duration::from_secs(10))?;
    let ends = lab.finish_downloads(downloads, Instant::now() + Duration::from_secs(20));
    let complete = ends.iter().filter(|e| ApplianceLab::complete(e)).count();
    let samples = probe::read(&probe_file)?;
    let keep = opts.out.join(format!("scenario-{}-probe.jsonl", s.name()));
    std::fs::copy(&probe_file, &keep).map_err(|e| format!("{}: {e}", keep.display()))?;
    let settled_at = timings.moved_ms.map_or(u64::MAX, |v| event_ms + v);
    let verdict = probe::analyse(&samples, event_ms, settled_at);
    let learned = lab
        .topo
        .learned_macs()
        .unwrap_or_default()
        .iter()
        .any(|m| m == CLUSTER_MAC);
    let joined_forwards = || {
        let after = lab.forwarded();
        let grew = |id: u8| {
            let b = fwd_before.iter().find(|(i, _)| *i == id).map_or(0, |x| x.1);
            after.iter().any(|&(i, a)| i == id && a > b)
        };
        grew(node)
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
        served_again_ms: served_again(&samples, acted_ms).map(|v| v + (acted_ms - event_ms)),
        wrk: step,
        probe: verdict,
        downloads: ports.len(),
        downloads_through_node: through_node.min(ports.len()),
        downloads_complete: complete,
        download_ends: ends,
        cluster_mac_learned: learned,
        peer_deaths_before_event: deaths_before,
        expectation: s.expectation().to_owned(),
        passed: false,
    };
    let no_loss = r.lost() == 0 && r.wrk.errors == 0 && r.probe.failed == 0;
    let after_move =
        r.probe.new_after_settled > 0 && r.probe.new_failed_after_settled == 0 && !learned;
    r.passed = match s {
        AppScenario::ApplianceKill => {
            r.moved_ms.is_some()
                && deaths_before == 0
                && after_move
                && r.lost() == 0
                && r.wrk.errors == 0
                && r.downloads == DOWNLOADS
        }
        AppScenario::ApplianceJoin => {
            r.moved_ms.is_some() && deaths_before == 0 && after_move && no_loss && joined_forwards()
        }
        AppScenario::DirectorKill => r.downloads_complete == 0 && r.served_again_ms.is_none(),
    };
    Ok(r)
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
        AppScenario::ApplianceKill => Scenario::Failover,
        AppScenario::ApplianceJoin => Scenario::Join,
        AppScenario::DirectorKill => {
            pause(limit.saturating_sub(event.elapsed()))?;
            return Ok(Timings::default());
        }
    };
    let asked: Vec<u8> = if s == AppScenario::ApplianceKill {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            AppScenario::ApplianceKill,
            AppScenario::ApplianceJoin,
            AppScenario::DirectorKill,
        ] {
            assert_eq!(AppScenario::parse(s.name()), Some(s));
        }
        assert_eq!(AppScenario::parse("failover"), None);
    }

    #[test]
    fn served_again_is_the_first_fresh_success_after_the_event() {
        let sample = |t_ms, kind, ok: bool| Sample {
            t_ms,
            kind,
            slot: 0,
            conn: 0,
            node: ok.then_some(11),
            ok,
            connect_ms: 1,
            error: String::new(),
        };
        let samples = vec![
            sample(90, Kind::New, true),
            sample(120, Kind::New, false),
            sample(130, Kind::Keepalive, true),
            sample(400, Kind::New, true),
        ];
        assert_eq!(served_again(&samples, 100), Some(300));
        assert_eq!(served_again(&samples[..3], 100), None);
    }
}
