//! The `clonecluster` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};

use clonecluster::appliance::Services;
use clonecluster::cluster::NodeId;
use clonecluster::config::{Config, Loaded, Unmatched};
use clonecluster::control::operator::{self, Reply, Request, Status};
use clonecluster::control::service_status::{services_status, services_table};
use clonecluster::control::Snapshot;
use clonecluster::dataplane::{self, ControlLink, StartError};
use clonecluster::runtime::{control_thread, Requests};

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
        /// When the connections the node still serves in the buckets it handed over are cut:
        /// a duration after the drain begins (30s, 2m), or `none` to wait for the last one.
        /// Default: the node's control.drain_deadline (always, for a drain relayed to another
        /// node).
        #[arg(long, value_name = "DURATION|none")]
        deadline: Option<operator::DrainDeadline>,
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
        /// Print the node's reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Appliance mode: send a backend no new flows, cluster-wide (its flows continue): the
    /// node relays it to its peers, every node with the same services holds it until an
    /// `undrain-backend` through any of them, and the coordinator's next backend table applies
    /// it on every node.
    DrainBackend {
        #[arg(long, short)]
        config: PathBuf,
        /// The backend's name (every service's backend of that name), or SERVICE/NAME.
        backend: String,
    },
    /// Appliance mode: undo `drain-backend` (through any node: it is relayed like the drain).
    UndrainBackend {
        #[arg(long, short)]
        config: PathBuf,
        backend: String,
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
            eprintln!("clonecluster: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            println!("# {}: valid", config.display());
            print!("{}", services_summary(&loaded));
            print!("{}", loaded.config.to_yaml());
            Ok(())
        }
        Command::Replay {
            config,
            nodes,
            json,
            pcap,
        } => {
            let loaded = Config::load(&config)?;
            let frames = clonecluster::replay::read_pcap(&pcap).map_err(anyhow::Error::msg)?;
            let report = clonecluster::replay::replay(&loaded, nodes, frames)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Run { config, json } => {
            let loaded = Config::load(&config)?;
            clonecluster::logging::set_node(loaded.config.node.id.get());
            clonecluster::logging::route_dpdk_logs()?;
            let assumed =
                assumed_snapshot(&loaded).with_context(|| config.display().to_string())?;
            let requests = Arc::new(Requests::default());
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                let requests = Arc::clone(&requests);
                // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
                unsafe {
                    signal_hook::low_level::register(signal, move || {
                        requests.terminate.store(true, Ordering::Relaxed)
                    })
                }
                .context("cannot install the signal handler")?;
            }
            #[cfg(feature = "testkit")]
            dataplane::test_hooks::install().context("cannot install the test hooks")?;
            let stop = Arc::new(AtomicBool::new(false));
            let link = Arc::new(ControlLink::new(
                loaded.config.dataplane.cores.len(),
                Arc::new(Snapshot::empty()),
            ));
            link.publish_services(Arc::new(Services::compile(
                &loaded.config,
                &loaded.secret,
                None,
            )));
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
                    .context("cannot start the control thread")?
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
                .map_err(|_| anyhow!("the control thread panicked"))?;
            control.with_context(|| config.display().to_string())?;
            let report = report.with_context(|| config.display().to_string())?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Drain {
            config,
            node,
            node_id,
            deadline,
        } => operator(
            &config,
            drain_request(node.or(node_id), true, deadline)?,
            false,
        ),
        Command::Undrain {
            config,
            node,
            node_id,
        } => operator(
            &config,
            drain_request(node.or(node_id), false, None)?,
            false,
        ),
        Command::Status { config, json } => operator(&config, Request::Status, json),
        Command::Reload { config } => operator(&config, Request::Reload, false),
        Command::DrainBackend { config, backend } => operator(
            &config,
            Request::DrainBackend {
                name: backend,
                drain: true,
            },
            false,
        ),
        Command::UndrainBackend { config, backend } => operator(
            &config,
            Request::DrainBackend {
                name: backend,
                drain: false,
            },
            false,
        ),
        Command::OwnerOf {
            config,
            src,
            dst,
            proto,
            json,
        } => {
            let request = Request::parse(&format!("owner-of {src} {dst} {proto}"))
                .map_err(anyhow::Error::msg)?;
            operator(&config, request, json)
        }
    }
}

/// `check`'s summary of the services (rules, backends, shares of new flows), as YAML comments
/// so that the printed configuration stays valid; empty without services.
fn services_summary(loaded: &Loaded) -> String {
    if loaded.config.services.is_empty() {
        return String::new();
    }
    let services = Services::compile(&loaded.config, &loaded.secret, None);
    let rules = services.rules();
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut out = format!(
        "# services: {}, {}, unmatched traffic: {}\n",
        count(rules.len(), "rule"),
        count(services.backends().count(), "backend"),
        match loaded.config.unmatched {
            Unmatched::Drop => "dropped",
            Unmatched::Local => "delivered locally",
        }
    );
    for line in services_table(&services_status(&services)).lines() {
        out.push_str("#   ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

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
    let me = loaded.config.node.id;
    let snapshot = clonecluster::replay::assumed_snapshot(loaded, nodes, handoff, me)
        .map_err(|e| bad(format!("{e:#}")))?;
    tracing::warn!(
        nodes,
        handoff,
        "{ASSUME_ENV} is set: the packet cores assume a fixed ownership (benchmarks only)"
    );
    Ok(Some(Arc::new(snapshot)))
}

fn drain_request(
    node: Option<u8>,
    drain: bool,
    deadline: Option<operator::DrainDeadline>,
) -> anyhow::Result<Request> {
    let node = match node {
        Some(n) => Some(NodeId::new(n).context("a node id is 1..=64")?),
        None => None,
    };
    Ok(Request::Drain {
        node,
        drain,
        deadline,
    })
}

/// Sends an operator request to the node described by `config` over its control socket and
/// prints its reply: for people, or as the node's JSON line with `json`.
fn operator(config: &std::path::Path, request: Request, json: bool) -> anyhow::Result<()> {
    let loaded = Config::load(config)?;
    let socket = loaded.config.control.socket.ok_or_else(|| {
        anyhow!(
            "{}: `control.socket`: not set, so the node takes no operator commands\n  fix: set \
             control.socket to a path such as /run/clonecluster/control.sock and restart it",
            config.display()
        )
    })?;
    let line = operator::call_raw(&socket, &request)?;
    let reply = Reply::decode(&request, &line).map_err(anyhow::Error::msg)?;
    if json {
        println!("{line}");
    } else {
        print_reply(&reply);
    }
    match reply {
        Reply::Refused(r) => bail!("the node refused `{request}`: {}", r.error),
        _ => Ok(()),
    }
}

/// A reply in words.
fn print_reply(reply: &Reply) {
    match reply {
        Reply::Status(s) => status_table(s),
        Reply::Drain(d) => {
            let what = if d.draining {
                "draining: it hands its buckets over"
            } else {
                "undrained: it takes its share again"
            };
            let how = if d.relayed { " (request relayed)" } else { "" };
            println!("node {}: {what}{how}", d.node);
        }
        Reply::Reload(r) if r.changed.is_empty() => println!("reload: nothing changed"),
        Reply::Reload(r) => println!("reload: applied {}", r.applied.join(", ")),
        Reply::DrainBackend(b) => println!("{b}"),
        Reply::OwnerOf(o) => {
            // A `single` rule's flows go to its first serving node, not by bucket.
            let single = o
                .service
                .as_ref()
                .is_some_and(|s| s.mode == Some(clonecluster::config::RuleMode::Single));
            let nobody = if single {
                "nobody (no node of the rule's priority list serves)"
            } else {
                "nobody (handoff gap)"
            };
            let opt = |n: Option<u8>| n.map_or(nobody.to_owned(), |n| format!("node {n}"));
            println!("flow                {}", o.flow);
            println!(
                "bucket              {} (affinity {})",
                o.bucket,
                o.affinity.name()
            );
            println!("epoch, phase        {}, {}", o.epoch, o.phase.name());
            println!("new flows go to     {}", opt(o.new_flows_owner));
            println!("owner when settled  {}", opt(o.owner_when_settled));
            println!("this node           {}", o.role_of_this_node);
            if let Some(service) = &o.service {
                print!("{service}");
            }
        }
        Reply::Refused(r) => {
            println!("refused: {}", r.error);
            if let Some(changed) = r.changed.as_ref().filter(|c| !c.is_empty()) {
                println!("changed keys: {}", changed.join(", "));
            }
        }
    }
}

/// `status` as a table for people.
fn status_table(s: &Status) {
    println!(
        "node {} | epoch {} | phase {} | moving buckets {} | healthy {}",
        s.node,
        s.epoch,
        s.phase.name(),
        s.moving,
        s.healthy.map_or("-".to_owned(), |h| h.to_string())
    );
    if s.fenced {
        println!(
            "fenced: {} (this node owns nothing)",
            s.fence_reasons.join(", ")
        );
    }
    if s.drain_cut {
        println!("this node's drain reached its deadline: its old connections were cut");
    }
    println!(
        "{:>4}  {:<9} {:>6} {:>10} {:>10} {:>8} {:>6} {:>14}",
        "node", "state", "weight", "accepting", "buckets", "flows", "busy", "handed-over"
    );
    let opt = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
    for m in s.nodes() {
        // Handed over, still serving: buckets (and, for the answering node, connections).
        let held = match (m.held_buckets, m.held_flows) {
            (Some(b), Some(f)) => format!("{f} in {b}"),
            (Some(b), None) => format!("in {b}"),
            _ => "-".to_owned(),
        };
        println!(
            "{:>4}  {:<9} {:>6} {:>10} {:>10} {:>8} {:>6} {:>14}",
            m.node,
            m.state.name(),
            opt(m.weight),
            m.accepting_buckets,
            m.final_buckets,
            opt(m.active_flows),
            m.busy_permille
                .map_or("-".to_owned(), |p| format!("{}%", p / 10)),
            held,
        );
    }
    if s.owed_buckets > 0 {
        println!(
            "{} buckets still hold connections of an earlier owner (it serves them until they \
             end)",
            s.owed_buckets
        );
    }
    if !s.services.is_empty() {
        println!("services (backend table epoch {})", s.services_epoch);
        print!("{}", services_table(&s.services));
    }
    if !s.services_differ.is_empty() {
        println!(
            "nodes {} run other services than this node: their backend checks are not counted \
             and they may send a flow to another backend (reload every node to the same file)",
            clonecluster::control::node::ids_text(&s.services_differ)
        );
    }
}
