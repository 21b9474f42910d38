//! The namespace lab: a real layer-2 network with a learning switch, nodes running the engine,
//! and a client, all on one machine (used by the integration tests and `clonecluster lab`).
//!
//! This module runs `ip`, `sysctl` and `ethtool` commands and starts processes; it must never
//! touch an interface or address outside the namespaces it creates, and it cleans up by PID and
//! by the names it made.

pub mod checks;
pub mod cluster;
pub mod load;
pub mod measure;
pub mod probe;
pub mod report;
pub mod run;
pub mod scenario;
pub mod services;
pub mod soak;
pub mod topology;

pub use topology::{Ns, Topology};
