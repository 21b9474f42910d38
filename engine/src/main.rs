//! The `clonecluster` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use clonecluster::cluster::NodeId;
use clonecluster::config::{Config, Loaded};
use clonecluster::control::Snapshot;
use clonecluster::dataplane::{self, ControlLink, StartError};
use clonecluster::runtime::{control_thread, operator_command, Requests};

/// A Clone Cluster packet engine: several servers, one IP, one MAC, no dispatcher.
#[derive(Debug, Parser)]
#[command(name = "clonecluster", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine on this node until Ctrl-C or SIGTERM, then print the counters.
    Run {
        /// The node's YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the final counters as JSON instead of a table, and log JSON lines (one object
        /// per line, with node and epoch) on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Run N simulated nodes (ids 1..=N, this cluster's config) over every frame of a pcap and
    /// report what each delivered, answered or dropped, with duplicates and orphans.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// Number of simulated nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The capture to replay.
        pcap: PathBuf,
    },
    /// Drain a node (this one, or --node N through this one): hand every bucket over to the
    /// others without losing a connection.
    Drain {
        #[arg(long, short)]
        config: PathBuf,
        /// Another node's id: the request is relayed to it, authenticated.
        #[arg(long)]
        node: Option<u8>,
        /// The same as --node.
        #[arg(value_name = "NODE", conflicts_with = "node")]
        node_id: Option<u8>,
    },
    /// Undo a drain: the node takes its share again.
    Undrain {
        #[arg(long, short)]
        config: PathBuf,
        /// Another node's id: the request is relayed to it, authenticated.
        #[arg(long)]
        node: Option<u8>,
        /// The same as --node.
        #[arg(value_name = "NODE", conflicts_with = "node")]
        node_id: Option<u8>,
    },
    /// Which node owns a flow, and why (bucket, phase, this node's role).
    OwnerOf {
        #[arg(long, short)]
        config: PathBuf,
        /// Client address, IP:PORT.
        src: String,
        /// Cluster address, IP:PORT.
        dst: String,
        /// tcp or udp.
        #[arg(default_value = "tcp")]
        proto: String,
    },
    /// Re-read the node's YAML: show what changed, apply what can change live (node.weight),
    /// refuse the rest with the reason, change nothing if the file is broken.
    Reload {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The node's view of the cluster: epoch, handoff phase, and per node its state, weight,
    /// load and buckets. A table, or JSON with --json.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The lab: the paper's experiment in network namespaces (needs root, nginx-light, wrk).
    /// 1 node, then N nodes per policy, each under a ramp of wrk clients; writes CSVs,
    /// report.md and SVG plots into --out.
    Lab {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
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
        /// engine mid-load), join (add a node mid-load), drain (drain one node mid-load).
        #[arg(long, default_value = "ramp", value_delimiter = ',')]
        scenario: Vec<String>,
        /// Clients during a scenario.
        #[arg(long, default_value_t = 20)]
        scenario_clients: u32,
        /// Seconds per scenario (the event comes a third of the way in).
        #[arg(long, default_value_t = 9)]
        scenario_duration: u32,
        /// Also run this baseline on the same topology: `kernel` (the nftables clone cluster).
        #[arg(long)]
        baseline: Option<String>,
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
    /// The lab's connection probe (started by `lab` in the client namespace).
    #[command(hide = true)]
    LabProbe {
        #[arg(long)]
        target: std::net::SocketAddr,
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
    /// Validate a configuration and print it with every default filled in.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run --json` logs JSON lines too; CLONECLUSTER_LOG_FORMAT=json|text decides otherwise.
    let json_logs = match std::env::var("CLONECLUSTER_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => matches!(cli.command, Command::Run { json: true, .. }),
    };
    clonecluster::logging::init(json_logs);
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clonecluster: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Check { config } => {
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            println!("# {}: valid", config.display());
            print!("{}", loaded.config.to_yaml());
            Ok(())
        }
        Command::Lab {
            nodes,
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
            use clonecluster::lab::run::{cleanup as lab_cleanup, run as lab_run, LabOptions};
            use clonecluster::lab::scenario::Scenario;
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
            if !(2..=8).contains(&nodes) {
                return Err(format!("--nodes {nodes}: the lab runs 2 to 8 nodes"));
            }
            for p in &policy {
                if p != "hash" && p != "by-load" {
                    return Err(format!("--policy {p}: use hash or by-load"));
                }
            }
            if clients.is_empty() || clients.contains(&0) || duration == 0 {
                return Err("--clients and --duration: give positive numbers".into());
            }
            let mut ramp = false;
            let mut scenarios = Vec::new();
            for s in &scenario {
                match s.as_str() {
                    "ramp" => ramp = true,
                    "failover" => scenarios.push(Scenario::Failover),
                    "join" => scenarios.push(Scenario::Join),
                    "drain" => scenarios.push(Scenario::Drain),
                    other => {
                        return Err(format!(
                            "--scenario {other}: use ramp, failover, join or drain \
                             (comma-separated)"
                        ))
                    }
                }
            }
            if scenario_duration < 6 || scenario_clients == 0 {
                return Err(
                    "--scenario-duration must be at least 6 s and --scenario-clients positive"
                        .into(),
                );
            }
            let kernel_baseline = match baseline.as_deref() {
                None => false,
                Some("kernel") => true,
                Some(other) => {
                    return Err(format!(
                        "--baseline {other}: the only baseline is `kernel` (the nftables clone \
                         cluster)"
                    ))
                }
            };
            let bin = std::env::current_exe().map_err(|e| e.to_string())?;
            let opts = LabOptions {
                bin,
                nodes,
                policies: policy,
                clients,
                duration_s: duration,
                ramp,
                scenarios,
                scenario_clients,
                scenario_duration_s: scenario_duration,
                kernel_baseline,
                out: out.clone(),
                prefix: PREFIX.to_owned(),
            };
            let results = lab_run(&opts)?;
            println!(
                "report: {}\nplots: {} {}",
                out.join("report.md").display(),
                out.join("throughput.svg").display(),
                out.join("response_time.svg").display()
            );
            let failures = results.failures();
            if !failures.is_empty() {
                return Err(format!(
                    "the lab found problems:\n  {}",
                    failures.join("\n  ")
                ));
            }
            Ok(())
        }
        Command::Soak {
            minutes,
            nodes,
            clients,
            out,
        } => {
            use clonecluster::lab::soak::{run as soak_run, SoakOptions};
            if !(2..=8).contains(&nodes) {
                return Err(format!("--nodes {nodes}: the soak runs 2 to 8 nodes"));
            }
            if !(0.5..=24.0 * 60.0).contains(&minutes) || clients == 0 {
                return Err("--minutes: from 0.5 to 1440; --clients: a positive number".into());
            }
            let opts = SoakOptions {
                bin: std::env::current_exe().map_err(|e| e.to_string())?,
                prefix: "ccsoak".to_owned(),
                nodes,
                minutes,
                clients,
                out: out.clone(),
                interrupted: clonecluster::lab::run::interrupted,
            };
            let r = soak_run(&opts)?;
            println!("report: {}", out.join("soak.md").display());
            let failed: Vec<String> = r
                .checks
                .iter()
                .filter(|c| !c.held)
                .map(|c| format!("{}: {}", c.what, c.detail))
                .collect();
            if !failed.is_empty() {
                return Err(format!(
                    "the soak found problems:\n  {}",
                    failed.join("\n  ")
                ));
            }
            Ok(())
        }
        Command::LabProbe {
            target,
            keepalive,
            new,
            interval_ms,
            duration_ms,
            out,
        } => {
            use clonecluster::lab::probe;
            let opts = probe::ProbeOptions {
                target,
                keepalive,
                new_threads: new,
                interval: std::time::Duration::from_millis(interval_ms),
                duration: std::time::Duration::from_millis(duration_ms),
            };
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone());
            let samples = probe::run(&opts, &stop);
            probe::write(&out, &samples).map_err(|e| format!("{}: {e}", out.display()))
        }
        Command::Replay {
            config,
            nodes,
            json,
            pcap,
        } => {
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            let frames = clonecluster::replay::read_pcap(&pcap)?;
            let report = clonecluster::replay::replay(&loaded, nodes, frames)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Run { config, json } => {
            let loaded = Config::load(&config).map_err(|e| e.to_string())?;
            clonecluster::logging::set_node(loaded.config.node.id);
            clonecluster::logging::route_dpdk_logs()?;
            let assumed =
                assumed_snapshot(&loaded).map_err(|e| format!("{}: {e}", config.display()))?;
            let requests = Arc::new(Requests::default());
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                let requests = Arc::clone(&requests);
                // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
                unsafe {
                    signal_hook::low_level::register(signal, move || {
                        requests.terminate.store(true, Ordering::Relaxed)
                    })
                }
                .map_err(|e| format!("cannot install the signal handler: {e}"))?;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let link = Arc::new(ControlLink::new(
                loaded.config.dataplane.cores.len(),
                Arc::new(Snapshot::empty()),
            ));
            let control = {
                let (loaded, link, requests, stop) = (
                    loaded.clone(),
                    Arc::clone(&link),
                    Arc::clone(&requests),
                    Arc::clone(&stop),
                );
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || {
                        let result = control_thread(loaded, link, requests, Arc::clone(&stop));
                        // Whatever happened, the packet cores must not outlive the control.
                        stop.store(true, Ordering::Relaxed);
                        result
                    })
                    .map_err(|e| format!("cannot start the control thread: {e}"))?
            };
            let start = dataplane::Start {
                stop: Arc::clone(&stop),
                link,
                assumed,
            };
            let report = dataplane::run(&loaded, start);
            stop.store(true, Ordering::Relaxed);
            let control = control
                .join()
                .map_err(|_| "the control thread panicked".to_owned())?;
            control.map_err(|e| format!("{}: {e}", config.display()))?;
            let report = report.map_err(|e| format!("{}: {e}", config.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Drain {
            config,
            node,
            node_id,
        } => operator(&config, &with_node("drain", node.or(node_id))),
        Command::Undrain {
            config,
            node,
            node_id,
        } => operator(&config, &with_node("undrain", node.or(node_id))),
        Command::Status { config, json } => {
            if json {
                operator(&config, "status")
            } else {
                status_table(&config)
            }
        }
        Command::Reload { config } => operator(&config, "reload"),
        Command::OwnerOf {
            config,
            src,
            dst,
            proto,
        } => operator(&config, &format!("owner-of {src} {dst} {proto}")),
    }
}

/// Sends an operator command to the node described by `config` over its control socket.
/// Benchmarks only: `nodes=N,handoff=P` makes the packet cores assume they are this node of an
/// N-node cluster with P% of the buckets in handoff
/// ([`clonecluster::replay::assumed_snapshot`]), from the first frame on, and ignore the control
/// thread's snapshots. `benches/pipeline.rs` sets it so that a single engine measures a node of
/// a larger cluster and `replay` can predict its every decision.
const ASSUME_ENV: &str = "CLONECLUSTER_BENCH_ASSUME";

/// The snapshot [`ASSUME_ENV`] asks for, if it is set.
fn assumed_snapshot(loaded: &Loaded) -> Result<Option<Arc<Snapshot>>, StartError> {
    let Ok(spec) = std::env::var(ASSUME_ENV) else {
        return Ok(None);
    };
    let bad = |why: String| StartError {
        key: ASSUME_ENV,
        problem: why,
        fix: "set it to `nodes=N,handoff=P` (N 1..=64, P percent 0..=100), or unset it".into(),
    };
    let (mut nodes, mut handoff) = (1u8, 0u8);
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("nodes", v)) => nodes = v.parse().map_err(|_| bad(format!("nodes `{v}`")))?,
            Some(("handoff", v)) => {
                handoff = v.parse().map_err(|_| bad(format!("handoff `{v}`")))?
            }
            _ => return Err(bad(format!("`{part}` is not nodes=N or handoff=P"))),
        }
    }
    let me = NodeId::new(loaded.config.node.id).expect("validated: node.id is 1..=64");
    let snapshot =
        clonecluster::replay::assumed_snapshot(loaded, nodes, handoff, me).map_err(bad)?;
    tracing::warn!(
        nodes,
        handoff,
        "{ASSUME_ENV} is set: the packet cores assume a fixed ownership (benchmarks only)"
    );
    Ok(Some(Arc::new(snapshot)))
}

fn operator(config: &std::path::Path, command: &str) -> Result<(), String> {
    let loaded = Config::load(config).map_err(|e| e.to_string())?;
    let socket = loaded.config.control.socket.ok_or_else(|| {
        format!(
            "{}: `control.socket`: not set, so the node takes no operator commands\n  fix: set \
             control.socket to a path such as /run/clonecluster/control.sock and restart it",
            config.display()
        )
    })?;
    let reply = operator_command(&socket, command)?;
    println!("{reply}");
    if reply.contains("\"ok\":false") {
        return Err(format!("the node refused `{command}`"));
    }
    Ok(())
}

/// `status` as a table for people.
fn status_table(config: &std::path::Path) -> Result<(), String> {
    let loaded = Config::load(config).map_err(|e| e.to_string())?;
    let socket = loaded.config.control.socket.ok_or_else(|| {
        format!(
            "{}: `control.socket`: not set\n  fix: set it and restart the node",
            config.display()
        )
    })?;
    let reply = operator_command(&socket, "status")?;
    let s: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| format!("bad reply from the node: {e}"))?;
    println!(
        "node {} | epoch {} | phase {} | moving buckets {} | healthy {}",
        s["node"],
        s["epoch"],
        s["phase"].as_str().unwrap_or("?"),
        s["moving"],
        s["healthy"]
            .as_bool()
            .map_or("-".to_owned(), |h| h.to_string())
    );
    println!(
        "{:>4}  {:<9} {:>6} {:>10} {:>10} {:>8} {:>6}",
        "node", "state", "weight", "accepting", "buckets", "flows", "busy"
    );
    let outside = s["outside"].as_array().into_iter().flatten();
    for m in s["members"].as_array().into_iter().flatten().chain(outside) {
        let opt = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |n| n.to_string());
        println!(
            "{:>4}  {:<9} {:>6} {:>10} {:>10} {:>8} {:>6}",
            m["node"].to_string(),
            m["state"].as_str().unwrap_or("?"),
            opt(&m["weight"]),
            m["accepting_buckets"].to_string(),
            m["final_buckets"].to_string(),
            opt(&m["active_flows"]),
            m["busy_permille"]
                .as_u64()
                .map_or("-".to_owned(), |p| format!("{}%", p / 10)),
        );
    }
    Ok(())
}

fn with_node(command: &str, node: Option<u8>) -> String {
    match node {
        Some(n) => format!("{command} {n}"),
        None => command.to_owned(),
    }
}
