//! `clonecluster-lab lab --mode appliance`: the experiment an appliance buyer runs. The same
//! M backends behind (a) nothing (one backend alone), (b) one dispatcher, the design the paper
//! set out to avoid (the kernel director with nftables, HAProxy), and (c) a clone cluster of
//! engine appliances with 1 and K nodes; each under the same `wrk` ramp, with the
//! preconditions checked ([`super::applab_checks`]); where this kernel cannot decapsulate
//! GUE or IP-in-IP, the encapsulated frames an appliance sends checked frame by frame from a
//! capture on a backend's port ([`super::applab_encap`], with the ramp); then the scenarios
//! asked for ([`super::applab_scenario`]) and the report ([`super::applab_report`]).
//!
//! Ctrl-C (or SIGTERM) stops it at the next check; everything it started is torn down (processes
//! by PID, then the namespaces), as in server mode.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::applab_checks::{arp_answers, backends_answering, encap_failures, idle, AppChecks};
use super::applab_encap::{self, EncapStep};
use super::applab_scenario::{self, AppScenario, AppScenarioResult};
use super::appliance::{ApplianceLab, Dispatch, LabPlan};
use super::checks::{capture_arp, judge_arp};
use super::cluster::shares;
use super::dispatch::{kernel_features, KernelFeatures};
use super::load::{Step, Wrk};
use super::report::slug;
use super::run::{interrupted, leftovers};
use super::topology::{node_mac, CLUSTER_MAC};
use super::Programs;

/// What to run.
#[derive(Debug, Clone)]
pub struct ApplianceOptions {
    pub programs: Programs,
    /// Appliances in the cluster (K).
    pub nodes: u8,
    /// Backends (M).
    pub backends: u8,
    pub clients: Vec<u32>,
    pub duration_s: u32,
    pub ramp: bool,
    pub scenarios: Vec<AppScenario>,
    pub scenario_clients: u32,
    pub scenario_duration_s: u32,
    pub out: PathBuf,
    pub prefix: String,
}

/// One configuration's ramp.
#[derive(Debug, Clone, Serialize)]
pub struct AppConfigResult {
    pub name: String,
    /// `alone`, `director`, `haproxy` or `appliances`.
    pub dispatch: String,
    /// Appliances (0 for the others).
    pub nodes: u8,
    pub backends: u8,
    pub steps: Vec<Step>,
    /// Share of the frames each appliance forwarded.
    pub appliance_shares: Vec<(u8, f64)>,
    /// Share of the TCP segments each backend received.
    pub backend_shares: Vec<(u8, f64)>,
    pub checks: AppChecks,
    /// Every failed check, in words.
    pub failures: Vec<String>,
    /// From starting the engines to a formed cluster (0 for the others).
    pub formed_in_ms: u128,
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct AppResults {
    pub configs: Vec<AppConfigResult>,
    pub scenarios: Vec<AppScenarioResult>,
    pub kernel: KernelFeatures,
    /// The encapsulated frames checked from a capture (with the ramp, where this kernel cannot
    /// decapsulate them).
    pub encap: Option<EncapStep>,
    /// Wall time of the whole run, s.
    pub took_s: f64,
}

impl AppResults {
    /// Every broken precondition and failed scenario, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for c in &self.configs {
            for p in &c.failures {
                f.push(format!("{}: {p}", c.name));
            }
        }
        if let Some(e) = &self.encap {
            for p in encap_failures(e) {
                f.push(format!("encapsulated delivery: {p}"));
            }
        }
        for s in self.scenarios.iter().filter(|s| !s.passed) {
            f.push(format!(
                "scenario {}: expected {}; got {}",
                s.scenario,
                s.expectation,
                s.summary()
            ));
        }
        f
    }
}

/// The configurations of the ramp, in order: (name, dispatch, appliances).
fn configs(opts: &ApplianceOptions) -> Vec<(String, Dispatch, u8)> {
    let mut v = vec![
        ("1 backend alone".to_owned(), Dispatch::Alone, 0),
        ("kernel director".to_owned(), Dispatch::Director, 0),
        ("haproxy".to_owned(), Dispatch::Haproxy, 0),
        ("1 appliance".to_owned(), Dispatch::Appliances, 1),
    ];
    if opts.nodes > 1 {
        v.push((
            format!("{} appliances", opts.nodes),
            Dispatch::Appliances,
            opts.nodes,
        ));
    }
    v
}

/// Runs everything asked for; writes the report files into `out`. `say` gets a line per step.
pub fn run(opts: &ApplianceOptions, say: &dyn Fn(String)) -> Result<AppResults, String> {
    let left = leftovers(&opts.prefix);
    if !left.is_empty() {
        return Err(format!(
            "namespaces from an earlier lab run are still there (with whatever it started in \
             them): {}\n  fix: run `clonecluster-lab lab --cleanup`",
            left.join(", ")
        ));
    }
    interrupted();
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("{}: cannot create: {e}", opts.out.display()))?;
    let kernel = kernel_features(&opts.prefix);
    say(format!(
        "kernel: IPVS {}, IP-in-IP decapsulation {}, FOU/GUE decapsulation {}",
        kernel.ipvs.words(),
        kernel.ipip.words(),
        kernel.fou.words()
    ));
    let mut results = AppResults {
        configs: Vec::new(),
        scenarios: Vec::new(),
        kernel,
        encap: None,
        took_s: 0.0,
    };
    let list = if opts.ramp { configs(opts) } else { Vec::new() };
    for (name, dispatch, nodes) in list {
        let r = run_config(opts, &name, dispatch, nodes, &|s: &Step| {
            say(format!(
                "{name}, {} clients: {:.0} req/s, mean {:.2} ms, p99 {:.2} ms, {} errors",
                s.clients, s.rps, s.mean_ms, s.p99_ms, s.errors
            ));
        })?;
        for f in &r.failures {
            say(format!("{name}: PRECONDITION FAILED: {f}"));
        }
        results.configs.push(r);
    }
    if opts.ramp && !results.kernel.decapsulates() {
        let e = applab_encap::run(opts)?;
        say(format!(
            "encapsulated delivery (GUE and IP-in-IP from appliance {} to backend {}, from a \
             capture): {}",
            e.appliance,
            e.backend,
            e.check.summary()
        ));
        for f in encap_failures(&e) {
            say(format!("encapsulated delivery: PRECONDITION FAILED: {f}"));
        }
        results.encap = Some(e);
    }
    for &s in &opts.scenarios {
        let r = applab_scenario::run(s, opts)?;
        say(format!("scenario {}: {}", r.scenario, r.summary()));
        results.scenarios.push(r);
    }
    results.took_s = started.elapsed().as_secs_f64();
    super::applab_report::write_all(opts, &results)?;
    Ok(results)
}

fn run_config(
    opts: &ApplianceOptions,
    name: &str,
    dispatch: Dispatch,
    nodes: u8,
    progress: &dyn Fn(&Step),
) -> Result<AppConfigResult, String> {
    let ids: Vec<u8> = (1..=nodes).collect();
    let lab = ApplianceLab::start(
        &opts.programs,
        &opts.prefix,
        LabPlan {
            dispatch,
            backends: opts.backends,
            all_ids: &ids,
            start: &ids,
            health: false,
        },
        opts.out.join(slug(name)),
    )?;
    let formed = lab.wait_formed(&ids, Duration::from_secs(30), &interrupted)?;
    lab.wait_serving(Duration::from_secs(20), &interrupted)?;
    let mut checks = AppChecks::default();
    check_arp(&lab, &mut checks)?;
    let (fwd_before, seg_before) = (lab.forwarded(), lab.backend_segments());
    let mut steps = Vec::new();
    for &clients in &opts.clients {
        if interrupted() {
            return Err("interrupted".into());
        }
        let step =
            Wrk::start(&lab.topo.client, clients, opts.duration_s, "/")?.finish(&interrupted)?;
        if lab
            .topo
            .learned_macs()
            .unwrap_or_default()
            .iter()
            .any(|m| m == CLUSTER_MAC)
        {
            checks.cluster_mac_learned = true;
        }
        progress(&step);
        steps.push(step);
    }
    let (fwd_after, seg_after) = (lab.forwarded(), lab.backend_segments());
    checks.idle_appliances = idle(&fwd_before, &fwd_after);
    checks.idle_backends = idle(&seg_before, &seg_after);
    checks.peer_deaths = lab.peer_deaths();
    Ok(AppConfigResult {
        name: name.to_owned(),
        dispatch: dispatch.label().to_owned(),
        nodes,
        backends: lab.backends.len() as u8,
        steps,
        appliance_shares: shares(&fwd_before, &fwd_after),
        backend_shares: shares(&seg_before, &seg_after),
        failures: checks.failures(dispatch),
        checks,
        formed_in_ms: formed.as_millis(),
    })
}

/// Captures the client's ARP exchange for the cluster address and judges it: who answered,
/// whether an appliance's answer follows server mode's rule, whether a backend answered.
fn check_arp(lab: &ApplianceLab, checks: &mut AppChecks) -> Result<(), String> {
    let frames = capture_arp(&lab.topo, lab.dir())?;
    let answers = arp_answers(&frames);
    checks.arp_replies = answers.len();
    checks.backends_answering_arp = backends_answering(&answers, &lab.backends);
    if lab.dispatch == Dispatch::Appliances {
        let macs: Vec<(u8, [u8; 6])> = lab
            .topo
            .nodes
            .iter()
            .filter_map(|(id, _)| {
                let m: clonecluster::wire::ethernet::EthernetAddress =
                    node_mac(*id).parse().ok()?;
                Some((*id, m.0))
            })
            .collect();
        let (_, by, bad) = judge_arp(&frames, &macs);
        checks.arp_answered_by = by;
        checks.arp_bad = bad;
    }
    Ok(())
}
