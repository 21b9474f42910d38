//! clonecluster-lab: the namespace lab. A real layer-2 network with a learning switch, nodes
//! running the engine, and a client, all on one machine; the paper's experiment (`lab`), the
//! scenarios (failover, wire-cut, join, drain), appliance mode's experiment (`lab --mode appliance`:
//! engine appliances against one dispatcher in front of the same backends) and the soak run on
//! it, and the engine's namespace tests
//! build their clusters from its topology and services.
//!
//! This crate owns everything the lab needs that the engine binary must not carry (plots,
//! progress bars, temporary directories). It drives the engine only from outside: it starts the
//! `clonecluster` binary ([`programs`] finds it), talks to it over its operator socket and reads
//! its `/metrics` and logs. It runs `ip`, `sysctl` and `ethtool` commands and starts processes;
//! it must never touch an interface or address outside the namespaces it creates, and it cleans
//! up by PID and by the names it made.

pub mod applab;
pub mod applab_checks;
pub mod applab_encap;
pub mod applab_report;
pub mod applab_scenario;
pub mod appliance;
pub mod ceiling;
pub mod checks;
pub mod cluster;
pub mod dispatch;
pub mod encap_check;
pub mod load;
pub mod measure;
pub mod probe;
pub mod programs;
pub mod report;
pub mod run;
pub mod scenario;
pub mod services;
pub mod soak;
pub mod topology;

pub use programs::Programs;
pub use topology::{Ns, Topology};
