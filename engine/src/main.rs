//! The `clonecluster` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use clonecluster::config::Config;
use clonecluster::control::Snapshot;
use clonecluster::dataplane;
use clonecluster::runtime::{control_thread, operator_command, ControlLink, Requests};

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
            let report = dataplane::run(&loaded, Arc::clone(&stop), link);
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
