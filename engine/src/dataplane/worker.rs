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

use super::{strerror, Burst, Eal, Mbuf, Mempool, Port, PortRole, StartError, BURST};
use crate::cluster::siphash::Lanes;
use crate::cluster::NodeId;
use crate::config::{IdleMode, Loaded};
pub use crate::counters::{CoreCounters, CoreStats};
use crate::pipeline::{
    Action, DropReason, FragmentHold, NodeIdentity, Pipeline, Prepared, TableSizes,
};
use crate::runtime::{wire_frame, ControlLink};

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

/// Everything the packet cores share; read-only but for the counters.
struct Shared {
    wire: u16,
    host: u16,
    /// Whether each port's RX queues can raise interrupts (interrupt idle mode only).
    wire_intr: bool,
    host_intr: bool,
    cores: Vec<u32>,
    identity: NodeIdentity,
    secret: Vec<u8>,
    link: Arc<ControlLink>,
    pool: *mut sys::rte_mempool,
    sizes: TableSizes,
    idle: IdleMode,
    max_sleep: Duration,
    stop: Arc<AtomicBool>,
    /// Benchmarks only ([`ASSUME_ENV`]): a fixed ownership the cores use instead of the
    /// control thread's snapshots.
    assumed: Option<Arc<crate::control::Snapshot>>,
    /// The bucket hash's implementation (`dataplane.hash_lanes`).
    lanes: Lanes,
    /// Where the wire port's link state is read.
    wire_link: super::port::LinkWatch,
}

/// Benchmarks only: `nodes=N,handoff=P` makes the packet cores assume they are this node of an
/// N-node cluster with P% of the buckets in handoff
/// ([`crate::replay::assumed_snapshot`]), from the first frame on, and ignore the control
/// thread's snapshots. `benches/pipeline.rs` sets it so that a single engine measures a node of
/// a larger cluster and `replay` can predict its every decision.
pub const ASSUME_ENV: &str = "CLONECLUSTER_BENCH_ASSUME";

/// The snapshot [`ASSUME_ENV`] asks for, if it is set.
fn assumed_snapshot(loaded: &Loaded) -> Result<Option<Arc<crate::control::Snapshot>>, StartError> {
    let Ok(spec) = std::env::var(ASSUME_ENV) else {
        return Ok(None);
    };
    let bad = |why: String| {
        StartError::new(
            ASSUME_ENV,
            why,
            "set it to `nodes=N,handoff=P` (N 1..=64, P percent 0..=100), or unset it",
        )
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
    let snapshot = crate::replay::assumed_snapshot(loaded, nodes, handoff, me).map_err(bad)?;
    tracing::warn!(
        nodes,
        handoff,
        "{ASSUME_ENV} is set: the packet cores assume a fixed ownership (benchmarks only)"
    );
    Ok(Some(Arc::new(snapshot)))
}

// SAFETY: everything in `Shared` is read-only or atomic; the raw pool pointer refers to a
// mempool, which DPDK makes safe to use from every lcore.
unsafe impl Sync for Shared {}

/// Starts the EAL, the pool and both ports from the config, runs one packet loop per
/// configured core until `stop` is set, then stops everything and returns the counters. The
/// cores follow the ownership snapshots the control thread publishes in `link`.
pub fn run(
    loaded: &Loaded,
    stop: Arc<AtomicBool>,
    link: Arc<ControlLink>,
) -> Result<RunReport, StartError> {
    let cfg = &loaded.config;
    let dp = &cfg.dataplane;
    let assumed = assumed_snapshot(loaded)?;
    let lanes = Lanes::from_config(dp.hash_lanes).map_err(|why| {
        StartError::new(
            "dataplane.hash_lanes",
            why,
            "use `auto` (the fastest this CPU has, the default) or `scalar`",
        )
    })?;
    tracing::info!(?lanes, "bucket hash implementation");
    let eal = Eal::start(dp, cfg.node.id)?;
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
    let shared = Shared {
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
        stop,
        assumed,
        lanes,
        wire_link: wire.link_watch.clone(),
    };
    tracing::info!(
        "clonecluster: node {} running on cores {:?}: wire port {} ({}), host port {} ({}), \
         idle {:?}",
        cfg.node.id,
        dp.cores,
        wire.name,
        wire.id,
        host.name,
        host.id,
        dp.idle
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
        .zip(&shared.link.counters)
        .map(|(&lcore, c)| (lcore, c.snapshot()))
        .collect();
    let mut total = CoreStats::default();
    for (_, s) in &cores {
        total.add(s);
    }
    let busy_ns: u64 = shared
        .link
        .core_busy_ns
        .iter()
        .map(|b| b.load(Relaxed))
        .sum();
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
            core_loop(shared, index);
            0
        }
        None => 0,
    }
}

/// Later fragments a core holds at most, waiting for their first.
const HOLD_CAPACITY: usize = 64;
/// Loop iterations between housekeeping rounds (flow expiry, held fragments).
const MAINTAIN_EVERY: u32 = 1024;
/// Flow-table slots a housekeeping round may sweep.
const EXPIRE_BUDGET: usize = 256;
/// One wire burst in this many has its processing time recorded.
const LATENCY_SAMPLE_EVERY: u32 = 8;
/// Loop iterations between looks at the control link (a new snapshot, refusal, control frames
/// to send): its atomics sit on lines the control thread writes, so every look can miss.
const CONTROL_EVERY: u32 = 16;
/// How often core 0 reads the wire port's link state, ns (a syscall on `net_af_packet`).
const LINK_CHECK_NS: u64 = 100_000_000;
/// How often a releasing node recounts its flows per bucket.
const COUNT_EVERY_NS: u64 = 50_000_000;

/// A TX burst bound to its port and queue, flushed when full and after every RX burst.
struct TxQueue<'a> {
    burst: Burst,
    port: u16,
    queue: u16,
    sent: &'a AtomicU64,
    unsent: &'a AtomicU64,
}

impl TxQueue<'_> {
    #[inline(always)]
    fn push(&mut self, m: Mbuf) {
        if self.burst.is_full() {
            self.flush();
        }
        // Not full any more: push cannot hand the mbuf back.
        let _ = self.burst.push(m);
    }

    #[inline(always)]
    fn flush(&mut self) {
        if self.burst.is_empty() {
            return;
        }
        let (sent, unsent) = self.burst.tx(self.port, self.queue);
        bump(self.sent, sent);
        if unsent > 0 {
            bump(self.unsent, unsent);
        }
    }
}

/// One core's loop: both directions on queue `index` of each port, until `stop`.
fn core_loop(shared: &Shared, index: usize) {
    let queue = index as u16;
    let c = &shared.link.counters[index];
    let link = &*shared.link;
    let me: NodeId = shared.identity.node;
    // Frames wait in the ports until the control thread has published a first ownership
    // snapshot: before it, this node cannot know which flows are its own.
    while shared.assumed.is_none()
        && link.snapshot.load().plan().is_none()
        && !shared.stop.load(Relaxed)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut version = link.version.load(Relaxed);
    let mut pipeline = Pipeline::new(
        shared.identity.clone(),
        &shared.secret,
        match &shared.assumed {
            Some(assumed) => Arc::clone(assumed),
            None => link.snapshot.load_full(),
        },
        shared.sizes,
    );
    pipeline.set_hash_lanes(shared.lanes);
    // Time spent on polls that received frames, published with the other per-core figures.
    let mut busy_ns: u64 = 0;
    let mut next_count: u64 = 0;
    let mut next_link_check: u64 = 0;
    // Burst processing times (RX to the last TX of the burst), published once a second.
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 100_000_000, 2)
        .expect("valid histogram bounds");
    let mut next_latency: u64 = 0;
    let mut bursts: u32 = 0;
    let mut sweeps_since_change: u32 = 0;
    let mut hold: FragmentHold<Mbuf> =
        FragmentHold::new(HOLD_CAPACITY, shared.sizes.fragment_timeout);
    let mut rx = Burst::new();
    let mut prepared = [Prepared::default(); BURST];
    let mut to_host = TxQueue {
        burst: Burst::new(),
        port: shared.host,
        queue,
        sent: &c.host_tx,
        unsent: &c.tx_unsent,
    };
    let mut to_wire = TxQueue {
        burst: Burst::new(),
        port: shared.wire,
        queue,
        sent: &c.wire_tx,
        unsent: &c.tx_unsent,
    };
    // Dropped frames are freed in bulk at the end of each burst.
    let mut dropped = Burst::new();
    let mut idle = Idle::new(shared, queue);
    let clock = Clock::new();
    // When the previous poll started, and whether it received frames: each poll's time is
    // known at the start of the next (one clock read per poll, as many as one per burst when
    // the core is saturated).
    let mut poll_start = clock.now();
    let mut poll_busy = false;
    // Drops are counted here per frame and published once per burst.
    let mut drops = [0u64; DropReason::COUNT];
    let mut iterations: u32 = 0;

    while !shared.stop.load(Relaxed) {
        // Reading the clock costs (a VM may trap on the TSC): once per poll, for the busy time,
        // the frames of both directions and the burst latency (sampled on one wire burst in
        // eight, from before its RX to after its last TX).
        let now = clock.now();
        if poll_busy {
            busy_ns += now.saturating_sub(poll_start);
        }
        poll_start = now;
        let from_wire = rx.rx(shared.wire, queue);
        let sampled = from_wire > 0 && bursts.is_multiple_of(LATENCY_SAMPLE_EVERY);
        if from_wire > 0 {
            bump(&c.wire_rx, from_wire);
            bursts = bursts.wrapping_add(1);
            // Two passes: parse, hash and prefetch every frame's flow-table line first, then
            // decide, so the burst's cache misses overlap instead of adding up.
            let others = {
                let mut frames: [Option<&[u8]>; BURST] = [None; BURST];
                for (i, frame) in frames.iter_mut().enumerate().take(from_wire) {
                    *frame = rx.frame(i);
                }
                pipeline.prepare_burst(&frames[..from_wire], &mut prepared[..from_wire])
            };
            // Frames of buckets that are simply other nodes': dropped in bulk, so that whether
            // a frame is this node's (a coin toss in a 2-node cluster) is never a jump.
            drops[DropReason::NotOwned.index()] += u64::from(others.count_ones());
            for (i, mut m) in rx.drain_split(others, &mut dropped) {
                let prep = &prepared[i];
                let len = m.len();
                let action = pipeline.decide(m.room_mut(), len, prep, now);
                match action {
                    Action::Deliver | Action::DeliverShared => to_host.push(m),
                    Action::ToWire => to_wire.push(m),
                    Action::Reply { len } => {
                        m.set_len(len);
                        bump(&c.replies, 1);
                        to_wire.push(m);
                    }
                    Action::ToControl => {
                        bump(&c.to_control, 1);
                        link.received_on_wire(m.data());
                        push_dropped(&mut dropped, m);
                    }
                    Action::Hold(key) => match hold.put(key, now, m) {
                        Ok(()) => bump(&c.held, 1),
                        Err(m) => {
                            drop(m);
                            drops[DropReason::FragmentExpired.index()] += 1;
                        }
                    },
                    Action::Drop(reason) => {
                        drops[reason.index()] += 1;
                        push_dropped(&mut dropped, m);
                    }
                }
                if let Some(released) = pipeline.take_released() {
                    hold.release(&released.key, |m| {
                        if released.owned {
                            to_host.push(m);
                        } else {
                            drop(m);
                            drops[DropReason::NotOwned.index()] += 1;
                        }
                    });
                }
            }
            to_host.flush();
            to_wire.flush();
            dropped.free_all();
            publish_drops(&mut drops, c);
            if sampled {
                latency.saturating_record(clock.now().saturating_sub(now).max(1));
            }
        }

        let from_host = rx.rx(shared.host, queue);
        if from_host > 0 {
            bump(&c.host_rx, from_host);
            let host_now = now;
            for mut m in rx.drain() {
                let action = if m.is_chained() {
                    Action::Drop(DropReason::Chained)
                } else {
                    pipeline.from_host(m.data_mut(), host_now)
                };
                match action {
                    Action::Drop(reason) => {
                        drops[reason.index()] += 1;
                        push_dropped(&mut dropped, m);
                    }
                    _ => to_wire.push(m),
                }
            }
            to_wire.flush();
            dropped.free_all();
            publish_drops(&mut drops, c);
        }

        // Between bursts, every few iterations: a new ownership snapshot, and control frames to
        // send.
        let control_turn = iterations.is_multiple_of(CONTROL_EVERY);
        if control_turn {
            pipeline.set_service(link.service());
            let v = link.version.load(Relaxed);
            if v != version && shared.assumed.is_none() {
                version = v;
                pipeline.set_snapshot(link.snapshot.load_full());
                next_count = 0;
                sweeps_since_change = 0;
            }
        }
        // Core 0 says whether the wire port has link (a node without it fences itself).
        if control_turn && index == 0 && now >= next_link_check {
            next_link_check = now + LINK_CHECK_NS;
            link.wire_link_up.store(shared.wire_link.up(), Relaxed);
        }
        if control_turn && index == 0 && !link.wire_out.1.is_empty() {
            // SAFETY: the pool outlives the packet loops (`run` frees it after they return).
            let pool = unsafe { super::eal::Mempool::borrow(shared.pool) };
            while let Ok(message) = link.wire_out.1.try_recv() {
                let frame = wire_frame(shared.identity.node_mac.0, &message);
                let Some(mut m) = super::Mbuf::alloc(&pool) else {
                    break;
                };
                let room = m.room_mut();
                if room.len() >= frame.len() {
                    room[..frame.len()].copy_from_slice(&frame);
                    m.set_len(frame.len());
                    bump(&c.control_tx, 1);
                    to_wire.push(m);
                }
            }
            to_wire.flush();
        }

        poll_busy = from_wire + from_host > 0;
        iterations = iterations.wrapping_add(1);
        if iterations.is_multiple_of(MAINTAIN_EVERY) {
            pipeline.maintain(now, EXPIRE_BUDGET);
            link.core_flows[index].store(pipeline.flows().len() as u64, Relaxed);
            let (own, learned) = (pipeline.flows().stats(), pipeline.learned().stats());
            link.core_evictions[index].store(own.evicted - own.evicted_half_open, Relaxed);
            let half_open = own.evicted_half_open
                + own.untracked
                + learned.evicted_half_open
                + learned.untracked;
            link.core_half_open_dropped[index].store(half_open, Relaxed);
            link.core_duplicate_risk[index].store(pipeline.duplicate_risk(), Relaxed);
            if index == 0 {
                // SAFETY: the pool outlives the packet loops (`run` frees it after they return).
                let pool = unsafe { super::eal::Mempool::borrow(shared.pool) };
                link.mbufs_in_use.store(u64::from(pool.in_use()), Relaxed);
            }
            link.core_busy_ns[index].fetch_add(std::mem::take(&mut busy_ns), Relaxed);
            if now >= next_latency {
                next_latency = now + 1_000_000_000;
                let out = &link.burst_latency_ns[index];
                if !latency.is_empty() {
                    for (slot, q) in out.iter().zip([0.5, 0.99, 0.999]) {
                        slot.store(latency.value_at_quantile(q), Relaxed);
                    }
                    out[3].store(latency.max(), Relaxed);
                }
                latency.reset();
            }
            hold.expire(now, |m| {
                drop(m);
                drops[DropReason::FragmentExpired.index()] += 1;
            });
            publish_drops(&mut drops, c);
        }
        // While buckets move, count the live flows of those this node releases for the control
        // thread's "done" step, a few times per second: each round sweeps an eighth of the flow
        // table, so expired flows leave the counts within a second.
        if pipeline.snapshot().moving_count() > 0 {
            let now = clock.now();
            if now >= next_count {
                next_count = now + COUNT_EVERY_NS;
                let eighth = pipeline.flows().slot_count() / 8;
                pipeline.maintain(now, eighth);
                let counts = &link.bucket_flows[index];
                for b in pipeline.snapshot().releasing(me) {
                    counts[b.index()].store(pipeline.flows().count_in_bucket(b), Relaxed);
                }
                sweeps_since_change = sweeps_since_change.saturating_add(1);
                // The counts hold for this snapshot once a whole sweep has run under it.
                if sweeps_since_change >= 8 {
                    link.bucket_flows_version[index].store(version, Relaxed);
                }
            }
        }
        idle.after_poll(from_wire + from_host);
    }
    if poll_busy {
        busy_ns += clock.now().saturating_sub(poll_start);
    }
    link.core_busy_ns[index].fetch_add(busy_ns, Relaxed);
    hold.drain(drop);
}

/// Adds the burst's drop counts to the core's counters and clears them.
#[inline(always)]
fn publish_drops(drops: &mut [u64; DropReason::COUNT], c: &CoreCounters) {
    for (local, shared) in drops.iter_mut().zip(&c.dropped) {
        if *local != 0 {
            shared.store(shared.load(Relaxed) + *local, Relaxed);
            *local = 0;
        }
    }
}

/// Keeps a dropped mbuf for the bulk free at the end of the burst (one RX burst fills at most
/// one burst of drops).
#[inline(always)]
fn push_dropped(dropped: &mut Burst, m: Mbuf) {
    if let Err(m) = dropped.push(m) {
        drop(m);
    }
}

/// Monotonic nanoseconds from the TSC, for flow and fragment timeouts: cheaper than a clock
/// call per burst.
struct Clock {
    start: u64,
    /// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
    ns_per_tick: u128,
}

impl Clock {
    fn new() -> Clock {
        // SAFETY: plain reads of the TSC and of the frequency the EAL measured at start.
        let (start, hz) = unsafe { (sys::rte_rdtsc(), sys::rte_get_tsc_hz()) };
        Clock {
            start,
            ns_per_tick: (1_000_000_000u128 << 32) / u128::from(hz.max(1)),
        }
    }

    #[inline(always)]
    fn now(&self) -> u64 {
        // The instruction itself where we know it (DPDK's `rte_rdtsc` is the same `rdtsc`, but
        // behind a wrapper call).
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `rdtsc` only reads the time-stamp counter.
        let tsc = unsafe { std::arch::x86_64::_rdtsc() };
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: a plain read of the TSC.
        let tsc = unsafe { sys::rte_rdtsc() };
        ((u128::from(tsc.wrapping_sub(self.start)) * self.ns_per_tick) >> 32) as u64
    }
}

#[inline(always)]
fn bump(counter: &AtomicU64, n: usize) {
    // Single writer: a load and a store, no locked read-modify-write on the packet path.
    counter.store(counter.load(Relaxed) + n as u64, Relaxed);
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
