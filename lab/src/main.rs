//! The `clonecluster-lab` command line: the lab, the soak, and the connection probe they start.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use clonecluster_lab::programs::{ENGINE_ENV, ENGINE_NAME};
use clonecluster_lab::Programs;

/// The clonecluster lab: real engines in network namespaces on one machine (needs root).
///
/// It starts the engine binary `clonecluster` found next to this program (the same target
/// directory: build both with `cargo build --release --locked -p clonecluster -p
/// clonecluster-lab`), or the one named with --engine or CLONECLUSTER_ENGINE.
#[derive(Debug, Parser)]
#[command(name = "clonecluster-lab", version, about)]
struct Cli {
    /// The engine binary to run on the nodes (default: `clonecluster` next to this program;
    /// the environment variable CLONECLUSTER_ENGINE names it too).
    #[arg(long, global = true, value_name = "PATH")]
    engine: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The lab: the paper's experiment in network namespaces (needs root, nginx-light, wrk).
    /// 1 node, then N nodes per policy, each under a ramp of wrk clients; writes CSVs,
    /// report.md and SVG plots into --out.
    Lab {
        /// `server` (the engines are the servers: the paper's experiment) or `appliance` (a
        /// clone cluster of engine appliances in front of --backends nginx backends, against one
        /// backend alone, the kernel director (nftables) and HAProxy; scenarios:
        /// appliance-kill, appliance-wire-cut, appliance-join, backend-kill, backend-drain,
        /// director-kill).
        #[arg(long, default_value = "server")]
        mode: String,
        /// Nodes (appliance mode: appliances, K).
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Appliance mode: backends behind the appliances and dispatchers (M).
        #[arg(long, default_value_t = 3)]
        backends: u8,
        /// Policies for the N-node runs (comma-separated: hash, by-load).
        #[arg(long, default_value = "hash,by-load", value_delimiter = ',')]
        policy: Vec<String>,
        /// Client counts of the ramp.
        #[arg(long, default_value = "10,50,100,150,200,300", value_delimiter = ',')]
        clients: Vec<u32>,
        /// Seconds per step.
        #[arg(long, default_value_t = 3)]
        duration: u32,
        /// What to run (comma-separated): ramp (the paper's figures), failover (kill -9 one
        /// engine mid-load), wire-cut (one node's wire port down, its control network up),
        /// join (add a node mid-load), drain (drain one node mid-load).
        #[arg(long, default_value = "ramp", value_delimiter = ',')]
        scenario: Vec<String>,
        /// Clients during a scenario.
        #[arg(long, default_value_t = 20)]
        scenario_clients: u32,
        /// Seconds per scenario (the event comes a third of the way in).
        #[arg(long, default_value_t = 9)]
        scenario_duration: u32,
        /// Also run these baselines on the same topology (comma-separated): `kernel` (the
        /// nftables clone cluster), `testpmd` (1 node with dpdk-testpmd io in the engine's
        /// place: the ports' ceiling), `testpmd-xdp` (the same with net_af_xdp on the wire).
        #[arg(long, value_delimiter = ',')]
        baseline: Vec<String>,
        #[arg(long, default_value = "lab-out")]
        out: PathBuf,
        /// Remove what a crashed earlier run left (namespaces with the lab's prefix) and exit.
        #[arg(long)]
        cleanup: bool,
    },
    /// The soak: N nodes under steady load for MINUTES while the last node is killed and
    /// restarted, cut off and put back, drained and undrained, in turn; checks that nothing
    /// leaked (mbufs, memory), nothing was delivered twice and only the crashed node's
    /// connections were lost. Writes soak.md, soak.json, soak.csv and plots into --out.
    Soak {
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// `wrk` connections throughout.
        #[arg(long, default_value_t = 20)]
        clients: u32,
        #[arg(long, default_value = "soak-out")]
        out: PathBuf,
    },
    /// The lab's connection probe (started by `lab` and `soak` in the client namespace).
    #[command(hide = true)]
    LabProbe {
        #[arg(long)]
        target: std::net::SocketAddr,
        /// The cluster's IPv6 address and port: every other keep-alive slot and fresh
        /// connection goes there (a dual-stack probe).
        #[arg(long)]
        target6: Option<std::net::SocketAddr>,
        #[arg(long, default_value_t = 8)]
        keepalive: usize,
        #[arg(long, default_value_t = 4)]
        new: usize,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clonecluster-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let engine = cli.engine.as_deref();
    match cli.command {
        Command::Lab {
            mode,
            nodes,
            backends,
            policy,
            clients,
            duration,
            scenario,
            scenario_clients,
            scenario_duration,
            baseline,
            out,
            cleanup,
        } => {
            use clonecluster_lab::run::{cleanup as lab_cleanup, run as lab_run, LabOptions};
            const PREFIX: &str = "cclab";
            if cleanup {
                let removed = lab_cleanup(PREFIX);
                println!(
                    "removed {} namespaces: {}",
                    removed.len(),
                    removed.join(", ")
                );
                return Ok(());
            }
            if mode == "appliance" {
                let opts = appliance_request(
                    engine,
                    nodes,
                    backends,
                    clients,
                    duration,
                    &scenario,
                    scenario_clients,
                    scenario_duration,
                    out.clone(),
                )?;
                if !baseline.is_empty() {
                    bail!("--baseline: appliance mode always runs its baselines (the kernel director and HAProxy)");
                }
                return appliance(&opts);
            }
            if mode != "server" {
                bail!("--mode {mode}: use server or appliance");
            }
            let checked = check_lab_request(
                nodes,
                &policy,
                &clients,
                duration,
                &scenario,
                scenario_clients,
                scenario_duration,
                &baseline,
            )?;
            let opts = LabOptions {
                programs: programs(engine)?,
                nodes,
                policies: policy,
                clients,
                duration_s: duration,
                ramp: checked.ramp,
                scenarios: checked.scenarios,
                scenario_clients,
                scenario_duration_s: scenario_duration,
                kernel_baseline: checked.kernel_baseline,
                testpmd_ceiling: checked.testpmd_ceiling,
                testpmd_xdp: checked.testpmd_xdp,
                out: out.clone(),
                prefix: PREFIX.to_owned(),
            };
            let results = lab_run(&opts).map_err(anyhow::Error::msg)?;
            println!(
                "report: {}\nplots: {} {}",
                out.join("report.md").display(),
                out.join("throughput.svg").display(),
                out.join("response_time.svg").display()
            );
            let failures = results.failures();
            if !failures.is_empty() {
                bail!("the lab found problems:\n  {}", failures.join("\n  "));
            }
            Ok(())
        }
        Command::Soak {
            minutes,
            nodes,
            clients,
            out,
        } => soak(engine, minutes, nodes, clients, out),
        Command::LabProbe {
            target,
            target6,
            keepalive,
            new,
            interval_ms,
            duration_ms,
            out,
        } => {
            let opts = clonecluster_lab::probe::ProbeOptions {
                target,
                target6,
                keepalive,
                new_threads: new,
                interval: std::time::Duration::from_millis(interval_ms),
                duration: std::time::Duration::from_millis(duration_ms),
            };
            probe(&opts, &out)
        }
    }
}

/// `lab --mode appliance`'s flags, checked.
#[allow(clippy::too_many_arguments)]
fn appliance_request(
    engine: Option<&std::path::Path>,
    nodes: u8,
    backends: u8,
    clients: Vec<u32>,
    duration: u32,
    scenario: &[String],
    scenario_clients: u32,
    scenario_duration: u32,
    out: PathBuf,
) -> anyhow::Result<clonecluster_lab::applab::ApplianceOptions> {
    use clonecluster_lab::applab_scenario::AppScenario;
    if !(1..=8).contains(&nodes) || !(1..=20).contains(&backends) {
        bail!("--nodes {nodes} --backends {backends}: appliance mode runs 1 to 8 appliances and 1 to 20 backends");
    }
    if clients.is_empty() || clients.contains(&0) || duration == 0 {
        bail!("--clients and --duration: give positive numbers");
    }
    if scenario_duration < 6 || scenario_clients == 0 {
        bail!("--scenario-duration must be at least 6 s and --scenario-clients positive");
    }
    let mut ramp = false;
    let mut scenarios = Vec::new();
    for s in scenario {
        match AppScenario::parse(s) {
            _ if s == "ramp" => ramp = true,
            Some(x)
                if nodes < 2
                    && x != AppScenario::DirectorKill
                    && x != AppScenario::BackendKill
                    && x != AppScenario::BackendDrain =>
            {
                bail!("--scenario {s}: needs --nodes 2 or more")
            }
            Some(x) => scenarios.push(x),
            None => bail!(
                "--scenario {s}: appliance mode runs ramp, appliance-kill, appliance-wire-cut, appliance-join, \
                 backend-kill, backend-drain and director-kill (comma-separated)"
            ),
        }
    }
    Ok(clonecluster_lab::applab::ApplianceOptions {
        programs: programs(engine)?,
        nodes,
        backends,
        clients,
        duration_s: duration,
        ramp,
        scenarios,
        scenario_clients,
        scenario_duration_s: scenario_duration,
        out,
        prefix: "cclab".to_owned(),
    })
}

/// `lab --mode appliance`: runs it, says where the report is, fails if a check failed.
fn appliance(opts: &clonecluster_lab::applab::ApplianceOptions) -> anyhow::Result<()> {
    let say = |line: String| eprintln!("{line}");
    let results = clonecluster_lab::applab::run(opts, &say).map_err(|e| {
        if e == "interrupted" {
            anyhow::anyhow!(
                "interrupted: the lab stopped every process it started (by PID) and removed its \
                 namespaces"
            )
        } else {
            anyhow::Error::msg(e)
        }
    })?;
    println!(
        "report: {}\nplots: {} {}",
        opts.out.join("report.md").display(),
        opts.out.join("throughput.svg").display(),
        opts.out.join("response_time.svg").display()
    );
    let failures = results.failures();
    if !failures.is_empty() {
        bail!("the lab found problems:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// `soak`: checks the request, runs it, fails if a check failed.
fn soak(
    engine: Option<&std::path::Path>,
    minutes: f64,
    nodes: u8,
    clients: u32,
    out: PathBuf,
) -> anyhow::Result<()> {
    use clonecluster_lab::soak::{run as soak_run, SoakOptions};
    if !(2..=8).contains(&nodes) {
        bail!("--nodes {nodes}: the soak runs 2 to 8 nodes");
    }
    if !(0.5..=24.0 * 60.0).contains(&minutes) || clients == 0 {
        bail!("--minutes: from 0.5 to 1440; --clients: a positive number");
    }
    let opts = SoakOptions {
        programs: programs(engine)?,
        prefix: "ccsoak".to_owned(),
        nodes,
        minutes,
        clients,
        out: out.clone(),
        interrupted: clonecluster_lab::run::interrupted,
    };
    let r = soak_run(&opts).map_err(anyhow::Error::msg)?;
    println!("report: {}", out.join("soak.md").display());
    let failed: Vec<String> = r
        .checks
        .iter()
        .filter(|c| !c.held)
        .map(|c| format!("{}: {}", c.what, c.detail))
        .collect();
    if !failed.is_empty() {
        bail!("the soak found problems:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// `lab-probe`: the connection probe, until its duration ends or SIGTERM.
fn probe(
    opts: &clonecluster_lab::probe::ProbeOptions,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use clonecluster_lab::probe;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone());
    let samples = probe::run(opts, &stop);
    probe::write(out, &samples).with_context(|| out.display().to_string())
}

/// The engine named with --engine or CLONECLUSTER_ENGINE, or found next to this program.
fn programs(engine: Option<&std::path::Path>) -> anyhow::Result<Programs> {
    Programs::for_this_binary(engine).with_context(|| {
        format!("the lab runs the engine binary `{ENGINE_NAME}` (--engine PATH or {ENGINE_ENV})")
    })
}

/// What `lab`'s flags ask for, checked.
struct LabRequest {
    ramp: bool,
    scenarios: Vec<clonecluster_lab::scenario::Scenario>,
    kernel_baseline: bool,
    testpmd_ceiling: bool,
    testpmd_xdp: bool,
}

#[allow(clippy::too_many_arguments)]
fn check_lab_request(
    nodes: u8,
    policy: &[String],
    clients: &[u32],
    duration: u32,
    scenario: &[String],
    scenario_clients: u32,
    scenario_duration: u32,
    baseline: &[String],
) -> anyhow::Result<LabRequest> {
    use clonecluster_lab::scenario::Scenario;
    if !(2..=8).contains(&nodes) {
        bail!("--nodes {nodes}: the lab runs 2 to 8 nodes");
    }
    for p in policy {
        if p != "hash" && p != "by-load" {
            bail!("--policy {p}: use hash or by-load");
        }
    }
    if clients.is_empty() || clients.contains(&0) || duration == 0 {
        bail!("--clients and --duration: give positive numbers");
    }
    let mut ramp = false;
    let mut scenarios = Vec::new();
    for s in scenario {
        match s.as_str() {
            "ramp" => ramp = true,
            "failover" => scenarios.push(Scenario::Failover),
            "wire-cut" => scenarios.push(Scenario::WireCut),
            "join" => scenarios.push(Scenario::Join),
            "drain" => scenarios.push(Scenario::Drain),
            other => {
                bail!("--scenario {other}: use ramp, failover, wire-cut, join or drain (comma-separated)")
            }
        }
    }
    if scenario_duration < 6 || scenario_clients == 0 {
        bail!("--scenario-duration must be at least 6 s and --scenario-clients positive");
    }
    let (mut kernel_baseline, mut testpmd_ceiling, mut testpmd_xdp) = (false, false, false);
    for b in baseline {
        match b.as_str() {
            "kernel" => kernel_baseline = true,
            "testpmd" => testpmd_ceiling = true,
            "testpmd-xdp" => testpmd_xdp = true,
            other => bail!(
                "--baseline {other}: use kernel (the nftables clone cluster), testpmd \
                 (dpdk-testpmd io in one node's engine's place) and/or testpmd-xdp (the same \
                 with net_af_xdp on the wire veth)"
            ),
        }
    }
    Ok(LabRequest {
        ramp,
        scenarios,
        kernel_baseline,
        testpmd_ceiling,
        testpmd_xdp,
    })
}
