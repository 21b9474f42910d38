//! `clonecluster-lab lab`: the paper's experiment on one machine. For each configuration (1 node,
//! N nodes per policy, and with `--baseline kernel` the kernel-only clone cluster of 1 and N
//! nodes) it builds the namespace network, starts the nodes, waits until the cluster has
//! formed, drives a ramp of client counts with `wrk` from the client namespace, checks the
//! Clone Cluster's preconditions, and tears everything down; then it runs the scenarios asked
//! for (failover, wire-cut, join, drain; dual-stack, see [`super::scenario`]). It writes the
//! report files ([`super::report`]) and shows a progress bar. Ctrl-C (or SIGTERM) stops it at
//! the next check, and everything it started is torn down (processes by PID, then the
//! namespaces).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::checks::{check_arp, Preconditions};
use super::cluster::{shares, Cluster, Kind};
use super::load::{Step, Wrk};
use super::report::{self, slug, ConfigResult, ScenarioResult};
use super::scenario::{self, Scenario, ScenarioRun};
use super::topology::{remove_namespaces, CLUSTER_MAC};
use super::Programs;

/// What to run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The engine and the probe.
    pub programs: Programs,
    pub nodes: u8,
    /// Policies to run with `nodes` nodes, after the 1-node baseline.
    pub policies: Vec<String>,
    pub clients: Vec<u32>,
    pub duration_s: u32,
    /// Run the ramp (the paper's figures).
    pub ramp: bool,
    pub scenarios: Vec<Scenario>,
    /// Clients during a scenario.
    pub scenario_clients: u32,
    /// Seconds per scenario.
    pub scenario_duration_s: u32,
    /// Also run the kernel-only clone cluster (nftables).
    pub kernel_baseline: bool,
    /// Also run 1 node with testpmd io in the engine's place (the ports' ceiling).
    pub testpmd_ceiling: bool,
    /// The same with `net_af_xdp` as the wire port.
    pub testpmd_xdp: bool,
    pub out: PathBuf,
    /// Namespace name prefix (short: interface names are made from it).
    pub prefix: String,
}

/// Everything one invocation measured.
#[derive(Debug, Clone)]
pub struct LabResults {
    pub configs: Vec<ConfigResult>,
    pub scenarios: Vec<ScenarioResult>,
}

impl LabResults {
    /// Every broken precondition and failed scenario, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for c in &self.configs {
            for p in c.preconditions.failures() {
                f.push(format!("{}: {p}", c.name));
            }
        }
        for s in &self.scenarios {
            if s.peer_deaths_before_event > 0 {
                f.push(format!(
                    "scenario {}: void: an engine declared a live peer dead {} time(s) before \
                     the event (starved control thread or lost heartbeats)",
                    s.scenario, s.peer_deaths_before_event
                ));
            } else if !s.passed {
                let v6 = &s.probe.ipv6;
                f.push(format!(
                    "scenario {}: expected {}; got {} wrk errors, {} probe failures, lost \
                     connections {}, {} of {} new connections failed after the move (IPv6: {} \
                     failures, {} lost, {} of {} new connections failed after the move; moved \
                     after {}; the nodes' plans are in scenario-{}-status-polls.jsonl){}",
                    s.scenario,
                    s.expectation,
                    s.wrk.errors,
                    s.probe.failed,
                    report::per_node(&s.probe.lost_by_node),
                    s.probe.new_failed_after_settled,
                    s.probe.new_after_settled,
                    v6.failed,
                    v6.lost,
                    v6.new_failed_after_settled,
                    v6.new_after_settled,
                    report::ms(s.moved_ms),
                    s.scenario,
                    if s.ipv6_neighbour_is_cluster_mac {
                        String::new()
                    } else {
                        format!(
                            "; the client's neighbour entry for the cluster's IPv6 address is \
                             not the cluster MAC {CLUSTER_MAC}: `{}` (no engine answered its \
                             neighbour solicitation)",
                            s.ipv6_neighbour
                        )
                    }
                ));
            }
        }
        f
    }
}

/// Set by SIGINT, SIGTERM or SIGHUP; every wait of the lab checks it.
fn interrupt_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        }
        flag
    })
}

/// Whether SIGINT, SIGTERM or SIGHUP arrived (the flag is set up on first use).
pub fn interrupted() -> bool {
    interrupt_flag().load(Ordering::Relaxed)
}

/// Namespaces an earlier run with this prefix left behind.
pub(crate) fn leftovers(prefix: &str) -> Vec<String> {
    let list = super::topology::run(&["ip", "netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

/// Removes everything an earlier (crashed) lab run left; returns what it removed.
pub fn cleanup(prefix: &str) -> Vec<String> {
    remove_namespaces(prefix)
}

/// The configurations of the ramp, in order.
fn configs(opts: &LabOptions) -> Vec<(String, u8, Kind)> {
    let mut v = vec![("1 node".to_owned(), 1, Kind::Engine("hash".to_owned()))];
    for p in &opts.policies {
        v.push((
            format!("{} nodes {p}", opts.nodes),
            opts.nodes,
            Kind::Engine(p.clone()),
        ));
    }
    if opts.kernel_baseline {
        v.push(("1 node kernel".to_owned(), 1, Kind::Kernel));
        v.push((
            format!("{} nodes kernel", opts.nodes),
            opts.nodes,
            Kind::Kernel,
        ));
    }
    if opts.testpmd_ceiling {
        v.push(("1 node testpmd io".to_owned(), 1, Kind::Testpmd(false)));
    }
    if opts.testpmd_xdp {
        v.push((
            "1 node testpmd io af_xdp".to_owned(),
            1,
            Kind::Testpmd(true),
        ));
    }
    v
}

/// Runs everything asked for; writes the report files into `out`.
pub fn run(opts: &LabOptions) -> Result<LabResults, String> {
    run_all(opts).map_err(|e| {
        if e == "interrupted" {
            "interrupted: the lab stopped every process it started (by PID) and removed its \
             namespaces"
                .to_owned()
        } else {
            e
        }
    })
}

fn run_all(opts: &LabOptions) -> Result<LabResults, String> {
    let left = leftovers(&opts.prefix);
    if !left.is_empty() {
        return Err(format!(
            "namespaces from an earlier lab run are still there (with whatever it started in \
             them): {}\n  fix: run `clonecluster-lab lab --cleanup` (it stops those processes by PID \
             and removes the namespaces)",
            left.join(", ")
        ));
    }
    interrupt_flag();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("{}: cannot create: {e}", opts.out.display()))?;
    let configs = if opts.ramp { configs(opts) } else { Vec::new() };
    let total = configs.len() * opts.clients.len() + opts.scenarios.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut results = LabResults {
        configs: Vec::new(),
        scenarios: Vec::new(),
    };
    for (name, nodes, kind) in configs {
        bar.set_message(format!("{name}: starting"));
        let r = run_config(opts, &name, nodes, kind, &|step: &Step| {
            bar.inc(1);
            say(format!(
                "[{}/{total}] {name}, {} clients: {:.0} req/s, mean {:.2} ms, p99 {:.2} ms, {} errors",
                bar.position(),
                step.clients,
                step.rps,
                step.mean_ms,
                step.p99_ms,
                step.errors
            ));
            bar.set_message(format!("{name}: after {} clients", step.clients));
        })?;
        for f in r.preconditions.failures() {
            say(format!("{name}: PRECONDITION FAILED: {f}"));
        }
        results.configs.push(r);
    }
    let policy = opts.policies.first().map_or("hash", String::as_str);
    for &s in &opts.scenarios {
        bar.set_message(format!("scenario {}", s.name()));
        let r = scenario::run(
            s,
            &ScenarioRun {
                programs: &opts.programs,
                prefix: &opts.prefix,
                nodes: opts.nodes,
                policy,
                clients: opts.scenario_clients,
                duration_s: opts.scenario_duration_s,
                out: &opts.out,
                interrupted,
            },
        )?;
        bar.inc(1);
        say(format!(
            "[{}/{total}] scenario {} of node {}: detected {}, moved {}, done {}, \
             {} wrk errors, probe {} failed of {}, lost {}; IPv6 {} new conn. ({} failed), {} \
             keep-alive req. ({} lost), neighbour {}: {}",
            bar.position(),
            r.scenario,
            r.node,
            report::ms(r.detected_ms),
            report::ms(r.moved_ms),
            report::ms(r.done_ms),
            r.wrk.errors,
            r.probe.failed,
            r.probe.requests,
            report::per_node(&r.probe.lost_by_node),
            r.probe.ipv6.new,
            r.probe.ipv6.new_failed,
            r.probe.ipv6.keepalive(),
            r.probe.ipv6.lost,
            if r.ipv6_neighbour_is_cluster_mac {
                "the cluster MAC"
            } else {
                "NOT the cluster MAC"
            },
            if r.passed { "held" } else { "FAILED" }
        ));
        results.scenarios.push(r);
    }
    bar.finish_and_clear();
    report::write_all(
        &opts.out,
        &opts.clients,
        opts.duration_s,
        &results.configs,
        &results.scenarios,
    )?;
    Ok(results)
}

fn run_config(
    opts: &LabOptions,
    name: &str,
    nodes: u8,
    kind: Kind,
    progress: &dyn Fn(&Step),
) -> Result<ConfigResult, String> {
    let ids: Vec<u8> = (1..=nodes).collect();
    let policy = match &kind {
        Kind::Engine(p) => p.clone(),
        Kind::Kernel => "jhash".to_owned(),
        Kind::Testpmd(_) => "io".to_owned(),
    };
    let c = Cluster::start(
        &opts.programs,
        &opts.prefix,
        kind.clone(),
        &ids,
        &ids,
        opts.out.join(slug(name)),
    )?;
    let formed = c.wait_formed(&ids, Duration::from_secs(30), &interrupted)?;
    let mut pre = Preconditions::default();
    check_arp(&c.topo, c.dir(), &mut pre)?;
    // testpmd forwards frames as they are: the kernel behind it answers ARP from the cluster
    // MAC and the switch learns it. The ceiling is not a clone cluster: not judged as one.
    let ceiling = matches!(kind, Kind::Testpmd(_));
    if ceiling {
        pre.arp_bad.clear();
    }
    let before = c.delivered();
    let mut steps = Vec::new();
    for &clients in &opts.clients {
        if interrupted() {
            return Err("interrupted".into());
        }
        let step =
            Wrk::start(&c.topo.client, clients, opts.duration_s, "/")?.finish(&interrupted)?;
        // The switch must never hold the cluster MAC: look after every step.
        if !ceiling
            && c.topo
                .learned_macs()
                .unwrap_or_default()
                .iter()
                .any(|m| m == CLUSTER_MAC)
        {
            pre.cluster_mac_learned = true;
        }
        progress(&step);
        steps.push(step);
    }
    pre.peer_deaths = c.peer_deaths();
    let node_shares = shares(&before, &c.delivered());
    pre.idle_nodes = node_shares
        .iter()
        .filter(|(_, s)| *s == 0.0)
        .map(|(id, _)| *id)
        .collect();
    Ok(ConfigResult {
        name: name.to_owned(),
        kind: kind.label().to_owned(),
        nodes,
        policy,
        steps,
        node_shares,
        preconditions: pre,
        formed_in_ms: formed.as_millis(),
    })
}
