//! The `clonecluster` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use clonecluster::config::Config;
use clonecluster::dataplane;

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
        /// Print the final counters as JSON instead of a table.
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
    /// Validate a configuration and print it with every default filled in.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLONECLUSTER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
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
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .map_err(|e| format!("cannot install the signal handler: {e}"))?;
            }
            let report =
                dataplane::run(&loaded, stop).map_err(|e| format!("{}: {e}", config.display()))?;
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
    }
}
