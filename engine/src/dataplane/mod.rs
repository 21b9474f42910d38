//! The only code that touches DPDK: EAL start, mempool, ports, mbufs, DPDK's log stream and
//! the packet cores, and the [`ControlLink`] through which those cores and the control thread
//! share state.
//!
//! Everything above this module works on byte slices; here those slices come from mbufs. Every
//! `unsafe` block says why it is sound. Nothing on the packet path allocates, locks or logs (but
//! the pool's mbufs for the pieces of a datagram cut for its backend's tunnel).
//! This module must never import the control thread (`runtime`) or the offline replay: what
//! they need of each other passes through the link, and what a benchmark wants through
//! [`Start`].
//!
//! - `worker`: [`run`]: EAL, pool and ports up, one [`core::Core`] per lcore, counters back.
//! - `core`: one packet core's loop and everything it owns.
//! - `idle`: how a core waits on empty queues.
//! - `link`: [`ControlLink`] and its per-core part, `CoreLink`.
//! - `steer`: frames passed between cores, to the core that holds their flow's state.
//! - `eal`, `mbuf`, `port`, `log`: the DPDK objects, and DPDK's log messages as events.
//! - `test_hooks` (feature `testkit` only): a stalled core on demand, for tests.

mod core;
mod eal;
mod idle;
mod link;
mod log;
mod mbuf;
mod port;
mod steer;
#[cfg(feature = "testkit")]
pub mod test_hooks;
mod worker;

pub(crate) use eal::{Eal, Mempool};
pub use link::ControlLink;
pub(crate) use link::{wire_payload, BackendCounts, BackendFigures, CoreLink};
pub(crate) use log::route_logs;
pub use mbuf::{Burst, Mbuf, BURST};
pub use port::{Port, PortRole};
pub use worker::{run, CoreCounters, CoreStats, RunReport, Start};

use std::ffi::CStr;

/// Why the data plane could not start: the config key to look at, what failed, what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{key}`: {problem}\n  fix: {fix}")]
pub struct StartError {
    pub key: &'static str,
    pub problem: String,
    pub fix: String,
}

impl StartError {
    pub(crate) fn new(
        key: &'static str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        StartError {
            key,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// DPDK's text for an errno value (DPDK's own codes included).
pub(crate) fn strerror(errno: i32) -> String {
    let errno = errno.abs();
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated string
    // for every input value; it is copied out at once.
    let text = unsafe { CStr::from_ptr(dpdk_sys::rte_strerror(errno)) };
    format!("{} (errno {errno})", text.to_string_lossy())
}

/// The calling thread's `rte_errno`.
pub(crate) fn rte_errno() -> i32 {
    // SAFETY: the shim only reads DPDK's thread-local errno variable.
    unsafe { dpdk_sys::clonecluster_rte_errno() }
}
