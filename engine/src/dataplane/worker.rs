//! The per-core run-to-completion loop, its counters, and `run`, which starts everything.
//!
//! Two directions per core, each on the core's own queue pair:
//! wire RX → [`Pipeline::from_wire`] → host TX (or wire TX for replies), and
//! host RX → [`Pipeline::from_host`] (source MAC := node MAC) → wire TX.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use dpdk_sys as sys;

use super::{strerror, Burst, Eal, Mempool, Port, PortRole, StartError};
use crate::config::{IdleMode, Loaded};
use crate::pipeline::{Action, DropReason, Pipeline};

/// One core's counters. Each field has a single writer (its core), which publishes with plain
/// relaxed stores; readers (the control thread, the exit report) read relaxed. Cache-aligned so
/// two cores never share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct CoreCounters {
    pub wire_rx: AtomicU64,
    pub host_rx: AtomicU64,
    /// Frames the host port's TX queue took.
    pub host_tx: AtomicU64,
    /// Frames the wire port's TX queue took (the host's frames and replies).
    pub wire_tx: AtomicU64,
    pub replies: AtomicU64,
    pub to_control: AtomicU64,
    /// Frames a TX queue did not take; freed and counted, never leaked.
    pub tx_unsent: AtomicU64,
    pub dropped: [AtomicU64; DropReason::COUNT],
}

#[inline(always)]
fn bump(counter: &AtomicU64, n: usize) {
    // Single writer: a load and a store, no locked read-modify-write on the packet path.
    counter.store(counter.load(Relaxed) + n as u64, Relaxed);
}

impl CoreCounters {
    pub fn snapshot(&self) -> CoreStats {
        CoreStats {
            wire_rx: self.wire_rx.load(Relaxed),
            host_rx: self.host_rx.load(Relaxed),
            host_tx: self.host_tx.load(Relaxed),
            wire_tx: self.wire_tx.load(Relaxed),
            replies: self.replies.load(Relaxed),
            to_control: self.to_control.load(Relaxed),
            tx_unsent: self.tx_unsent.load(Relaxed),
            dropped: std::array::from_fn(|i| self.dropped[i].load(Relaxed)),
        }
    }
}

/// A copy of one core's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CoreStats {
    pub wire_rx: u64,
    pub host_rx: u64,
    pub host_tx: u64,
    pub wire_tx: u64,
    pub replies: u64,
    pub to_control: u64,
    pub tx_unsent: u64,
    pub dropped: [u64; DropReason::COUNT],
}

impl CoreStats {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn add(&mut self, o: &CoreStats) {
        self.wire_rx += o.wire_rx;
        self.host_rx += o.host_rx;
        self.host_tx += o.host_tx;
        self.wire_tx += o.wire_tx;
        self.replies += o.replies;
        self.to_control += o.to_control;
        self.tx_unsent += o.tx_unsent;
        for (a, b) in self.dropped.iter_mut().zip(o.dropped) {
            *a += b;
        }
    }
}

impl std::fmt::Display for CoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wire_rx={} host_tx={} host_rx={} wire_tx={} replies={} to_control={} tx_unsent={} dropped={}",
            self.wire_rx,
            self.host_tx,
            self.host_rx,
            self.wire_tx,
            self.replies,
            self.to_control,
            self.tx_unsent,
            self.dropped_total()
        )?;
        for (reason, n) in DropReason::ALL.iter().zip(self.dropped) {
            if n > 0 {
                write!(f, " dropped_{}={n}", reason.as_str())?;
            }
        }
        Ok(())
    }
}

/// What `run` returns when the loops have stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// (lcore id, counters) per packet core.
    pub cores: Vec<(u32, CoreStats)>,
    pub total: CoreStats,
    /// Seconds the packet loops ran.
    pub elapsed_secs: f64,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (lcore, s) in &self.cores {
            writeln!(f, "core {lcore}: {s}")?;
        }
        write!(f, "total: {} (loops ran {:.3} s)", self.total, self.elapsed_secs)
    }
}

/// Everything the packet cores share; read-only but for the counters.
struct Shared {
    wire: u16,
    host: u16,
    /// Whether each port's RX queues can raise interrupts (interrupt idle mode only).
    wire_intr: bool,
    host_intr: bool,
    cores: Vec<u32>,
    counters: Vec<CoreCounters>,
    pipeline: Pipeline,
    idle: IdleMode,
    max_sleep: Duration,
    stop: Arc<AtomicBool>,
}

/// Starts the EAL, the pool and both ports from the config, runs one packet loop per
/// configured core until `stop` is set, then stops everything and returns the counters.
pub fn run(loaded: &Loaded, stop: Arc<AtomicBool>) -> Result<RunReport, StartError> {
    let cfg = &loaded.config;
    let dp = &cfg.dataplane;
    let eal = Eal::start(dp, cfg.node.id)?;
    let pool = Mempool::create(&eal, dp.pool_size)?;
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

    let shared = Shared {
        wire: wire.id,
        host: host.id,
        wire_intr: wire.rx_interrupts,
        host_intr: host.rx_interrupts,
        cores: dp.cores.clone(),
        counters: dp.cores.iter().map(|_| CoreCounters::default()).collect(),
        pipeline: Pipeline::new(cfg.node.mac, cfg.cluster.mac),
        idle: dp.idle,
        max_sleep: dp.idle_max_sleep.0,
        stop,
    };
    eprintln!(
        "clonecluster: node {} running on cores {:?}: wire port {} ({}), host port {} ({}), \
         idle {:?}",
        cfg.node.id, dp.cores, wire.name, wire.id, host.name, host.id, dp.idle
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
        .zip(&shared.counters)
        .map(|(&lcore, c)| (lcore, c.snapshot()))
        .collect();
    let mut total = CoreStats::default();
    for (_, s) in &cores {
        total.add(s);
    }
    tracing::debug!(
        in_use = pool.in_use(),
        "mbufs still out of the pool at stop"
    );
    // Ports stop before the pool is freed, and the EAL is cleaned up last.
    drop(wire);
    drop(host);
    drop(pool);
    drop(eal);
    Ok(RunReport {
        cores,
        total,
        elapsed_secs,
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
            core_loop(shared, index);
            0
        }
        None => 0,
    }
}

/// One core's loop: both directions on queue `index` of each port, until `stop`.
fn core_loop(shared: &Shared, index: usize) {
    let queue = index as u16;
    let counters = &shared.counters[index];
    let mut pipeline = shared.pipeline.clone();
    let mut rx = Burst::new();
    let mut to_host = Burst::new();
    let mut to_wire = Burst::new();
    let mut idle = Idle::new(shared, queue);

    while !shared.stop.load(Relaxed) {
        let from_wire = rx.rx(shared.wire, queue);
        if from_wire > 0 {
            bump(&counters.wire_rx, from_wire);
            for mut m in rx.drain() {
                let action = if m.is_chained() {
                    Action::Drop(DropReason::Chained)
                } else {
                    pipeline.from_wire(m.data_mut())
                };
                match action {
                    Action::ToHost => push(&mut to_host, m),
                    Action::ToWire => push(&mut to_wire, m),
                    Action::Reply { len } => {
                        m.set_len(len);
                        bump(&counters.replies, 1);
                        push(&mut to_wire, m);
                    }
                    // No control thread takes wire heartbeats yet: counted and freed.
                    Action::ToControl => bump(&counters.to_control, 1),
                    Action::Drop(reason) => bump(&counters.dropped[reason as usize], 1),
                }
            }
            flush(
                &mut to_host,
                shared.host,
                queue,
                &counters.host_tx,
                counters,
            );
            flush(
                &mut to_wire,
                shared.wire,
                queue,
                &counters.wire_tx,
                counters,
            );
        }

        let from_host = rx.rx(shared.host, queue);
        if from_host > 0 {
            bump(&counters.host_rx, from_host);
            for mut m in rx.drain() {
                let action = if m.is_chained() {
                    Action::Drop(DropReason::Chained)
                } else {
                    pipeline.from_host(m.data_mut())
                };
                match action {
                    Action::ToWire | Action::Reply { .. } => push(&mut to_wire, m),
                    Action::ToHost => push(&mut to_host, m),
                    Action::ToControl => bump(&counters.to_control, 1),
                    Action::Drop(reason) => bump(&counters.dropped[reason as usize], 1),
                }
            }
            flush(
                &mut to_wire,
                shared.wire,
                queue,
                &counters.wire_tx,
                counters,
            );
            flush(
                &mut to_host,
                shared.host,
                queue,
                &counters.host_tx,
                counters,
            );
        }

        idle.after_poll(from_wire + from_host);
    }
}

#[inline(always)]
fn push(burst: &mut Burst, m: super::Mbuf) {
    // One RX burst fills at most one TX burst, and TX bursts are flushed after every RX burst.
    if let Err(m) = burst.push(m) {
        debug_assert!(false, "TX burst overflow");
        drop(m);
    }
}

#[inline(always)]
fn flush(burst: &mut Burst, port: u16, queue: u16, sent_counter: &AtomicU64, c: &CoreCounters) {
    if burst.is_empty() {
        return;
    }
    let (sent, unsent) = burst.tx(port, queue);
    bump(sent_counter, sent);
    if unsent > 0 {
        bump(&c.tx_unsent, unsent);
    }
}

/// Polls without traffic before a core starts to back off.
const SPIN_POLLS: u32 = 64;
const FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Longest epoll wait when every port can wake us: only bounds how late `stop` is seen.
const INTERRUPT_WAIT_MS: i32 = 100;

/// What a core does after a poll, by idle mode.
struct Idle {
    mode: IdleMode,
    empty_polls: u32,
    sleep: Duration,
    max_sleep: Duration,
    /// Interrupt mode: (port, queue) pairs registered with this thread's epoll.
    intr: [(u16, u16, bool); 2],
    armed: bool,
    wait_ms: i32,
}

impl Idle {
    fn new(shared: &Shared, queue: u16) -> Idle {
        let mut mode = shared.idle;
        let mut intr = [(shared.wire, queue, false), (shared.host, queue, false)];
        if mode == IdleMode::Interrupt {
            for (entry, capable) in intr.iter_mut().zip([shared.wire_intr, shared.host_intr]) {
                if !capable {
                    continue;
                }
                // SAFETY: the port was started with RX interrupts configured and `queue` is
                // one of its queues; the epoll instance is this thread's own.
                let ret = unsafe {
                    sys::rte_eth_dev_rx_intr_ctl_q(
                        entry.0,
                        entry.1,
                        sys::RTE_EPOLL_PER_THREAD,
                        sys::RTE_INTR_EVENT_ADD as i32,
                        std::ptr::null_mut(),
                    )
                };
                entry.2 = ret == 0;
                if ret != 0 {
                    tracing::info!(port = entry.0, queue, "no RX interrupt: {}", strerror(ret));
                }
            }
            if !intr.iter().any(|e| e.2) {
                tracing::info!(
                    queue,
                    "no port has RX interrupts: falling back to adaptive idle"
                );
                mode = IdleMode::Adaptive;
            }
        }
        // When a port cannot wake us, the wait is bounded like an adaptive sleep.
        let all_capable = intr.iter().all(|e| e.2);
        let max_ms = shared.max_sleep.as_millis().clamp(1, i32::MAX as u128) as i32;
        Idle {
            mode,
            empty_polls: 0,
            sleep: FIRST_SLEEP,
            max_sleep: shared.max_sleep.max(FIRST_SLEEP),
            intr,
            armed: false,
            wait_ms: if all_capable {
                INTERRUPT_WAIT_MS
            } else {
                max_ms
            },
        }
    }

    #[inline(always)]
    fn after_poll(&mut self, received: usize) {
        if received > 0 {
            if self.empty_polls != 0 {
                self.empty_polls = 0;
                self.sleep = FIRST_SLEEP;
                self.disarm();
            }
            return;
        }
        match self.mode {
            IdleMode::Busy => {}
            IdleMode::Adaptive => {
                self.empty_polls += 1;
                if self.empty_polls > SPIN_POLLS {
                    std::thread::sleep(self.sleep);
                    self.sleep = (self.sleep * 2).min(self.max_sleep);
                }
            }
            IdleMode::Interrupt => {
                self.empty_polls += 1;
                if self.empty_polls <= SPIN_POLLS {
                    return;
                }
                if !self.armed {
                    // Arm, then poll once more before sleeping: a frame that arrived before the
                    // arm raised no interrupt.
                    self.arm();
                    return;
                }
                let mut events = [sys::rte_epoll_event::default(); 2];
                // SAFETY: `events` has room for 2 events; the epoll instance is this thread's.
                unsafe {
                    sys::rte_epoll_wait(
                        sys::RTE_EPOLL_PER_THREAD,
                        events.as_mut_ptr(),
                        events.len() as i32,
                        self.wait_ms,
                    );
                }
                self.disarm();
            }
        }
    }

    fn arm(&mut self) {
        for &(port, queue, capable) in &self.intr {
            if capable {
                // SAFETY: the queue was registered for interrupts in `new`.
                unsafe { sys::rte_eth_dev_rx_intr_enable(port, queue) };
            }
        }
        self.armed = true;
    }

    fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        for &(port, queue, capable) in &self.intr {
            if capable {
                // SAFETY: the queue was registered for interrupts in `new`.
                unsafe { sys::rte_eth_dev_rx_intr_disable(port, queue) };
            }
        }
        self.armed = false;
    }
}
