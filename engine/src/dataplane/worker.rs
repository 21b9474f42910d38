//! `run`, which starts the EAL, the pool and both ports, launches one packet core
//! ([`super::core::Core`]) per configured lcore, and returns the counters once they stop.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use dpdk_sys as sys;

use super::core::Core;
use super::link::ControlLink;
use super::steer::Rings;
use super::{strerror, Eal, Mempool, Port, PortRole, StartError};
use crate::cluster::siphash::Lanes;
use crate::config::{IdleMode, Loaded};
use crate::control::Snapshot;
pub use crate::counters::{CoreCounters, CoreStats};
use crate::pipeline::{NodeIdentity, TableSizes};

/// What `run` returns when the loops have stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// (lcore id, counters) per packet core.
    pub cores: Vec<(u32, CoreStats)>,
    pub total: CoreStats,
    /// Seconds the packet loops ran.
    pub elapsed_secs: f64,
    /// Seconds the packet cores, together, spent on polls that received frames.
    pub busy_secs: f64,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (lcore, s) in &self.cores {
            writeln!(f, "core {lcore}: {s}")?;
        }
        write!(
            f,
            "total: {} (loops ran {:.3} s, busy {:.3} core-s)",
            self.total, self.elapsed_secs, self.busy_secs
        )
    }
}

/// Everything the packet cores share; read-only but for the link.
pub(super) struct Shared {
    pub(super) wire: u16,
    pub(super) host: u16,
    /// Whether each port's RX queues can raise interrupts (interrupt idle mode only).
    pub(super) wire_intr: bool,
    pub(super) host_intr: bool,
    pub(super) cores: Vec<u32>,
    pub(super) identity: NodeIdentity,
    pub(super) secret: Vec<u8>,
    pub(super) link: Arc<ControlLink>,
    pub(super) pool: *mut sys::rte_mempool,
    pub(super) sizes: TableSizes,
    pub(super) idle: IdleMode,
    pub(super) max_sleep: Duration,
    /// The control thread's tick (`control.interval`): an idle core 0 sends the wire
    /// heartbeats it queues, so it never waits longer than a fraction of it.
    pub(super) control_interval: Duration,
    pub(super) stop: Arc<AtomicBool>,
    /// Benchmarks only ([`Start::assumed`]): a fixed ownership the cores use instead of the
    /// control thread's snapshots.
    pub(super) assumed: Option<Arc<Snapshot>>,
    /// The bucket hash's implementation (`dataplane.hash_lanes`).
    pub(super) lanes: Lanes,
    /// Where the wire port's link state is read.
    pub(super) wire_link: super::port::LinkWatch,
    /// With several cores, the rings between them (see [`super::steer`]).
    pub(super) rings: Option<Rings>,
}

/// What the packet cores run with besides the node's configuration.
#[derive(Debug)]
pub struct Start {
    /// Set to stop the packet loops.
    pub stop: Arc<AtomicBool>,
    /// What the cores share with the control thread.
    pub link: Arc<ControlLink>,
    /// Benchmarks only: a fixed ownership the cores assume from the first frame on, ignoring
    /// the control thread's snapshots (so that a single engine measures a node of a larger
    /// cluster and `replay` can predict its every decision). `None` in production.
    pub assumed: Option<Arc<Snapshot>>,
}

// SAFETY: everything in `Shared` is read-only or atomic; the raw pool pointer refers to a
// mempool, which DPDK makes safe to use from every lcore.
unsafe impl Sync for Shared {}

/// Starts the EAL, the pool and both ports from the config, runs one packet loop per
/// configured core until `start.stop` is set, then stops everything and returns the counters.
/// The cores follow the ownership snapshots the control thread publishes in `start.link`.
pub fn run(loaded: &Loaded, start: Start) -> Result<RunReport, StartError> {
    let Start {
        stop,
        link,
        assumed,
    } = start;
    let cfg = &loaded.config;
    let dp = &cfg.dataplane;
    let lanes = Lanes::from_config(dp.hash_lanes).map_err(|why| {
        StartError::new(
            "dataplane.hash_lanes",
            why,
            "use `auto` (the fastest this CPU has, the default) or `scalar`",
        )
    })?;
    tracing::info!(lanes = lanes.name(), "bucket hash implementation");
    let eal = Eal::start(dp, cfg.node.id.get())?;
    let pool = Mempool::create(&eal, dp.pool_size, dp.mbuf_size)?;
    let queues = dp.cores.len() as u16;
    let desc = (dp.rx_descriptors, dp.tx_descriptors);
    let wire = Port::start(PortRole::Wire, &dp.wire_port, queues, desc, dp.idle, &pool)?;
    let host = Port::start(PortRole::Host, &dp.host_port, queues, desc, dp.idle, &pool)?;
    // The node's kernel must accept frames for the cluster MAC: give the host port that MAC
    // (on net_tap this sets the kernel interface's address).
    if let Err(e) = host.set_mac(cfg.cluster.mac) {
        tracing::warn!(port = %host.name, "cannot set the cluster MAC on the host port: {e}");
    }
    for port in [&wire, &host] {
        let (up, speed) = port.link();
        tracing::info!(port = %port.name, id = port.id, up, speed_mbps = speed, "port started");
    }
    let rings = if dp.cores.len() > 1 {
        Some(Rings::create(dp.cores.len(), cfg.node.id.get())?)
    } else {
        None
    };
    let mut shared = Shared {
        wire: wire.id,
        host: host.id,
        wire_intr: wire.rx_interrupts,
        host_intr: host.rx_interrupts,
        cores: dp.cores.clone(),
        identity: NodeIdentity::from_config(cfg),
        secret: loaded.secret.clone(),
        link,
        pool: pool.as_ptr(),
        sizes: TableSizes::from_config(cfg),
        idle: dp.idle,
        max_sleep: dp.idle_max_sleep.0,
        control_interval: cfg.control.interval.0,
        stop,
        assumed,
        lanes,
        wire_link: wire.link_watch.clone(),
        rings,
    };
    tracing::info!(
        "clonecluster: {} running on cores {}: wire port {} ({}), host port {} ({}), \
         idle {}",
        cfg.node.id,
        dp.cores
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
        wire.name,
        wire.id,
        host.name,
        host.id,
        dp.idle.name()
    );
    let started = std::time::Instant::now();
    // SAFETY: `shared` outlives every packet loop: rte_eal_mp_wait_lcore below returns only
    // after all of them (including the one on this, the main lcore) have returned. The entry
    // point only reads `shared` (counters are atomics).
    unsafe {
        let arg = &shared as *const Shared as *mut c_void;
        let ret = sys::rte_eal_mp_remote_launch(
            Some(core_entry),
            arg,
            sys::rte_rmt_call_main_t_CALL_MAIN,
        );
        if ret < 0 {
            return Err(StartError::new(
                "dataplane.cores",
                format!("cannot launch the packet loops: {}", strerror(ret)),
                "check that the listed cores exist and are idle",
            ));
        }
        sys::rte_eal_mp_wait_lcore();
    }
    let elapsed_secs = started.elapsed().as_secs_f64();
    let cores: Vec<(u32, CoreStats)> = shared
        .cores
        .iter()
        .zip(&shared.link.cores)
        .map(|(&lcore, c)| (lcore, c.counters.snapshot()))
        .collect();
    let mut total = CoreStats::default();
    for (_, s) in &cores {
        total.add(s);
    }
    let busy_ns: u64 = shared
        .link
        .cores
        .iter()
        .map(|c| c.busy_ns.load(Relaxed))
        .sum();
    tracing::debug!(
        in_use = pool.in_use(),
        "mbufs still out of the pool at stop"
    );
    // Frames left between cores go back to the pool; ports stop before the pool is freed, and
    // the EAL is cleaned up last.
    drop(shared.rings.take());
    drop(wire);
    drop(host);
    drop(pool);
    drop(eal);
    Ok(RunReport {
        cores,
        total,
        elapsed_secs,
        busy_secs: busy_ns as f64 / 1e9,
    })
}

/// The C entry point DPDK calls on every packet lcore.
unsafe extern "C" fn core_entry(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&Shared` passed by `run`, alive until every loop has returned.
    let shared = unsafe { &*(arg as *const Shared) };
    // SAFETY: plain read of the calling thread's lcore id.
    let lcore = unsafe { sys::rte_lcore_id() };
    match shared.cores.iter().position(|&c| c == lcore) {
        Some(index) => {
            Core::new(shared, index).run();
            0
        }
        None => 0,
    }
}
