//! One packet core: its run-to-completion loop over its own queue pair, and everything that
//! loop owns (its pipeline, its bursts and TX queues, its fragment hold, its idle strategy, its
//! clock and its latency histogram).
//!
//! Two directions per core, each on the core's own queue of each port:
//! wire RX → [`Pipeline::decide`] → host TX (or wire TX for replies), and
//! host RX → [`Pipeline::from_host`] (source MAC := node MAC) → wire TX.
//! With several cores, a frame whose home is another core ([`crate::pipeline::home_core`]) is
//! passed to it through [`super::steer`] before anything is decided, and each core decides the
//! frames the others passed it like its own.
//! Between bursts it picks up the control thread's news from the [`ControlLink`] (a new
//! ownership snapshot, the service state; on core 0, control messages to send) and now and then
//! publishes its figures in its own [`CoreLink`]. Nothing here allocates, locks or logs per
//! frame (but the pool's mbufs for the pieces of a datagram cut for its backend's tunnel, and
//! core 0's control frames), and a core never waits on the control thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use dpdk_sys as sys;

use super::idle::Idle;
use super::link::{wire_frame, ControlLink, CoreLink};
use super::steer::Outgoing;
use super::worker::Shared;
use super::{Burst, Mbuf, Mempool, BURST};
use crate::counters::CoreCounters;
use crate::pipeline::{
    Action, DropReason, FragmentHold, Pipeline, Prepared, ReleaseTo, Released, Side,
};

/// Later fragments a core holds at most, waiting for their first.
const HOLD_CAPACITY: usize = 64;
/// Loop iterations between housekeeping rounds (flow expiry, held fragments) and publications
/// of the core's figures.
const MAINTAIN_EVERY: u32 = 1024;
/// The longest time between two housekeeping rounds, ns: loops slowed by a flood (every frame
/// to the host through the tap, say) can take far longer than this for `MAINTAIN_EVERY` of
/// them, and the figures (the busy share among them) must not go stale meanwhile.
const MAINTAIN_EVERY_NS: u64 = 10_000_000;
/// Flow-table slots a housekeeping round may sweep.
const EXPIRE_BUDGET: usize = 256;
/// One wire burst in this many has its processing time recorded.
const LATENCY_SAMPLE_EVERY: u32 = 8;
/// How often the burst latency quantiles are published, ns.
const LATENCY_EVERY_NS: u64 = 1_000_000_000;
/// Loop iterations between looks at the control link (a new snapshot, refusal, control frames
/// to send): its atomics sit on lines the control thread writes, so every look can miss.
const CONTROL_EVERY: u32 = 16;
/// How often core 0 reads the wire port's link state, ns (a syscall on `net_af_packet`).
const LINK_CHECK_NS: u64 = 100_000_000;
/// Bytes a piece of a cut datagram starts before an mbuf's data (in its headroom): more than
/// the outer headers it may outgrow its frame by.
const MAX_GROWTH: usize = 64;
/// How often a releasing node recounts its flows per bucket.
const COUNT_EVERY_NS: u64 = 50_000_000;

/// One packet core's state; [`Core::run`] is its loop.
pub(super) struct Core<'a> {
    shared: &'a Shared,
    link: &'a ControlLink,
    /// This core's part of the link: where it publishes its counters and figures.
    mine: &'a CoreLink,
    /// Its index in `dataplane.cores`, which is also its queue on both ports.
    index: usize,
    queue: u16,
    /// The snapshot version the pipeline follows.
    version: u64,
    /// The services version the pipeline follows.
    services_version: u64,
    rx: Burst,
    /// The wire burst's frames, parsed and hashed before any is decided.
    prepared: [Prepared; BURST],
    /// The pipeline and where its decisions send frames.
    fwd: Forward<'a>,
    /// With several cores: where frames whose home is another core go.
    steer: Option<Outgoing<'a>>,
    idle: Idle,
    clock: Clock,
    /// Burst processing times (RX to the last TX of the burst), published once a second.
    latency: hdrhistogram::Histogram<u64>,
    next_latency: u64,
    /// When the next housekeeping round is due at the latest (see [`MAINTAIN_EVERY_NS`]).
    next_maintain: u64,
    /// Loop iterations and wire bursts so far (wrapping).
    iterations: u32,
    bursts: u32,
    /// Wire polls that returned a whole burst (see `CoreLink::wire_full_bursts`).
    full_bursts: u64,
    /// Time spent on polls that received frames, not yet published.
    busy_ns: u64,
    /// When the previous poll started, and whether it received frames: each poll's time is
    /// known at the start of the next (one clock read per poll, as many as one per burst when
    /// the core is saturated).
    poll_start: u64,
    poll_busy: bool,
    next_link_check: u64,
    /// When releasing buckets are next counted, and the sweeps run under the current snapshot.
    next_count: u64,
    sweeps_since_change: u32,
}

/// What decides each frame and where the decision sends it: the pipeline, the fragment hold,
/// the two TX queues and the burst's drops.
struct Forward<'a> {
    pipeline: Pipeline,
    hold: FragmentHold<Mbuf>,
    to_host: TxQueue<'a>,
    to_wire: TxQueue<'a>,
    /// Dropped frames, freed in bulk at the end of each burst.
    dropped: Burst,
    /// Drops counted per frame, published once per burst.
    drops: [u64; DropReason::COUNT],
    counters: &'a CoreCounters,
    link: &'a ControlLink,
    /// The pool, for the pieces of a datagram cut for its backend.
    pool: std::mem::ManuallyDrop<Mempool>,
}

/// A TX burst bound to its port and queue, flushed when full and after every RX burst.
struct TxQueue<'a> {
    burst: Burst,
    port: u16,
    queue: u16,
    sent: &'a AtomicU64,
    unsent: &'a AtomicU64,
}

impl<'a> Core<'a> {
    /// Core `index` of `shared.cores`, once the control thread has published a first ownership
    /// snapshot (or `stop` is set): before it, this node cannot know which flows are its own,
    /// so frames wait in the ports.
    pub(super) fn new(shared: &'a Shared, index: usize) -> Core<'a> {
        let link = &*shared.link;
        let mine = &link.cores[index];
        let queue = index as u16;
        while shared.assumed.is_none()
            && link.snapshot.load().plan().is_none()
            && !shared.stop.load(Relaxed)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Awake (under no version yet) before reading the version: see `CoreLink::decide_under`.
        let follows = shared.assumed.is_none();
        if follows {
            mine.decide_under(0);
        }
        let version = link.current_version();
        if follows {
            mine.decide_under(version);
        }
        let snapshot = match &shared.assumed {
            Some(assumed) => Arc::clone(assumed),
            None => link.snapshot.load_full(),
        };
        let mut pipeline = Pipeline::new(
            shared.identity.clone(),
            &shared.secret,
            snapshot,
            shared.sizes,
        );
        pipeline.set_hash_lanes(shared.lanes);
        let c = &mine.counters;
        let tx = |port, sent| TxQueue {
            burst: Burst::new(),
            port,
            queue,
            sent,
            unsent: &c.tx_unsent,
        };
        let clock = Clock::new();
        Core {
            shared,
            link,
            mine,
            index,
            queue,
            version,
            services_version: u64::MAX,
            rx: Burst::new(),
            prepared: [Prepared::default(); BURST],
            fwd: Forward {
                pipeline,
                hold: FragmentHold::new(HOLD_CAPACITY, shared.sizes.fragment_timeout),
                to_host: tx(shared.host, &c.host_tx),
                to_wire: tx(shared.wire, &c.wire_tx),
                dropped: Burst::new(),
                drops: [0; DropReason::COUNT],
                counters: c,
                link,
                // SAFETY: the pool outlives the packet loops (`run` frees it after they return).
                pool: unsafe { Mempool::borrow(shared.pool) },
            },
            steer: shared.rings.as_ref().map(|r| Outgoing::new(r, index)),
            idle: Idle::new(shared, queue),
            latency: hdrhistogram::Histogram::<u64>::new_with_bounds(1, 100_000_000, 2)
                .expect("valid histogram bounds"),
            next_latency: 0,
            next_maintain: 0,
            iterations: 0,
            bursts: 0,
            full_bursts: 0,
            busy_ns: 0,
            poll_start: clock.now(),
            poll_busy: false,
            next_link_check: 0,
            next_count: 0,
            sweeps_since_change: 0,
            clock,
        }
    }

    /// Both directions on this core's queue pair until `stop`.
    pub(super) fn run(mut self) {
        while !self.shared.stop.load(Relaxed) {
            #[cfg(feature = "testkit")]
            super::test_hooks::hold(self.index);
            let now = self.start_poll();
            // With several cores: while the frames this core passes back up, it receives
            // nothing of its own and only decides what the others passed it.
            let paused = self.steer.as_mut().is_some_and(|s| s.backed_up());
            let (from_wire, from_host) = if paused {
                (0, 0)
            } else {
                (self.poll_wire(now), self.poll_host(now))
            };
            let passed = self.poll_passed(now) + usize::from(paused);
            if self.iterations.is_multiple_of(CONTROL_EVERY) {
                self.between_bursts();
                self.wire_control(now);
            }
            self.poll_busy = from_wire + from_host + passed > 0;
            self.iterations = self.iterations.wrapping_add(1);
            if self.iterations.is_multiple_of(MAINTAIN_EVERY) || now >= self.next_maintain {
                self.next_maintain = now + MAINTAIN_EVERY_NS;
                self.maintain(now);
                self.publish(now);
            }
            self.count_releasing();
            let mark = self
                .shared
                .assumed
                .is_none()
                .then_some((self.mine, self.version));
            if self.idle.after_poll(from_wire + from_host + passed, mark) {
                // Woken up: adopt a newer snapshot before deciding anything.
                self.between_bursts();
                self.mine.loops.store(u64::from(self.iterations), Relaxed);
                // And send the wire heartbeats queued meanwhile now, not some wakes later.
                self.wire_control(self.clock.now());
            }
        }
        self.stop();
    }

    /// Core 0's part of the control path: the wire port's link, and the control frames the
    /// control thread queued for the wire.
    #[inline(always)]
    fn wire_control(&mut self, now: u64) {
        if self.index == 0 {
            self.watch_wire_link(now);
            self.send_control_frames();
        }
    }

    /// Reads the clock for this poll and books the previous poll's time if it was busy.
    /// Reading the clock costs (a VM may trap on the TSC): once per poll, for the busy time,
    /// the frames of both directions and the burst latency.
    #[inline(always)]
    fn start_poll(&mut self) -> u64 {
        let now = self.clock.now();
        if self.poll_busy {
            self.busy_ns += now.saturating_sub(self.poll_start);
        }
        self.poll_start = now;
        now
    }

    /// A wire burst: prepared (parsed, hashed, prefetched) as a whole, then decided frame by
    /// frame. One burst in [`LATENCY_SAMPLE_EVERY`] has its time recorded, from before its RX
    /// to after its last TX.
    #[inline(always)]
    fn poll_wire(&mut self, now: u64) -> usize {
        let received = self.rx.rx(self.shared.wire, self.queue);
        if received == 0 {
            return 0;
        }
        let sampled = self.bursts.is_multiple_of(LATENCY_SAMPLE_EVERY);
        bump(&self.mine.counters.wire_rx, received);
        self.bursts = self.bursts.wrapping_add(1);
        if received == BURST {
            // Published at once, not with the other figures: the control thread takes a full
            // burst as wire noise only within the last `dead_after` intervals, and heartbeats
            // lost in the backed-up queue must not fence the node (`hears-no-peer-on-wire`)
            // meanwhile. (With the figures, every 1024 loops, a core slowed by a SYN flood
            // published them too late.) One store per full burst, on the core's own line.
            self.full_bursts += 1;
            self.mine.wire_full_bursts.store(self.full_bursts, Relaxed);
        }
        self.pass_on(Side::Wire);
        self.decide_wire_burst(now, sampled);
        received
    }

    /// Frames whose home is another core leave `rx` for that core's ring (several cores only).
    #[inline(always)]
    fn pass_on(&mut self, side: Side) {
        if let Some(steer) = &mut self.steer {
            let (passed, refused) = steer.pass_on(&mut self.rx, side);
            if passed + refused > 0 {
                bump(&self.mine.counters.passed, passed);
                self.fwd.drops[DropReason::CoreQueueFull.index()] += refused as u64;
            }
        }
    }

    /// Frames other cores passed to this one (their home), decided like its own.
    #[inline(always)]
    fn poll_passed(&mut self, now: u64) -> usize {
        let Some(steer) = &self.steer else {
            return 0;
        };
        let rings = steer.rings();
        // SAFETY: these rings are this core's own incoming ones: it is their only consumer.
        let from_wire = unsafe { self.rx.from_ring(rings.incoming(self.index, Side::Wire)) };
        if from_wire > 0 {
            self.decide_wire_burst(now, false);
        }
        // SAFETY: as above.
        let from_host = unsafe { self.rx.from_ring(rings.incoming(self.index, Side::Host)) };
        if from_host > 0 {
            self.host_burst(now);
        }
        from_wire + from_host
    }

    /// Decides the wire burst in `rx`.
    #[inline(always)]
    fn decide_wire_burst(&mut self, now: u64, sampled: bool) {
        let received = self.rx.len();
        if received == 0 {
            publish_drops(&mut self.fwd.drops, self.fwd.counters);
            return;
        }
        // Two passes: parse, hash and prefetch every frame's flow-table line first, then
        // decide, so the burst's cache misses overlap instead of adding up.
        let others = {
            let mut frames: [Option<&[u8]>; BURST] = [None; BURST];
            for (i, frame) in frames.iter_mut().enumerate().take(received) {
                *frame = self.rx.frame(i);
            }
            let prepared = &mut self.prepared[..received];
            self.fwd
                .pipeline
                .prepare_burst(&frames[..received], prepared)
        };
        let fwd = &mut self.fwd;
        // Frames of buckets that are simply other nodes': dropped in bulk, so that whether a
        // frame is this node's (a coin toss in a 2-node cluster) is never a jump.
        fwd.drops[DropReason::NotOwned.index()] += u64::from(others.count_ones());
        for (i, m) in self.rx.drain_split(others, &mut fwd.dropped) {
            fwd.wire_frame(m, &self.prepared[i], now);
        }
        fwd.to_host.flush();
        fwd.to_wire.flush();
        fwd.dropped.free_all();
        publish_drops(&mut fwd.drops, fwd.counters);
        if sampled {
            let took = self.clock.now().saturating_sub(now).max(1);
            self.latency.saturating_record(took);
        }
    }

    /// A host burst: every frame goes to the wire with the node MAC as its source.
    #[inline(always)]
    fn poll_host(&mut self, now: u64) -> usize {
        let received = self.rx.rx(self.shared.host, self.queue);
        if received == 0 {
            return 0;
        }
        bump(&self.mine.counters.host_rx, received);
        self.pass_on(Side::Host);
        self.host_burst(now);
        received
    }

    /// Sends the host burst in `rx` to the wire.
    #[inline(always)]
    fn host_burst(&mut self, now: u64) {
        let fwd = &mut self.fwd;
        for m in self.rx.drain() {
            fwd.host_frame(m, now);
        }
        fwd.to_wire.flush();
        fwd.dropped.free_all();
        publish_drops(&mut fwd.drops, fwd.counters);
    }

    /// Between bursts, every few iterations: the service state, and a new ownership snapshot.
    #[inline]
    fn between_bursts(&mut self) {
        let pipeline = &mut self.fwd.pipeline;
        pipeline.set_service(self.link.service());
        self.mine.loops.store(u64::from(self.iterations), Relaxed);
        let sv = self.link.services_version.load(Relaxed);
        if sv != self.services_version {
            self.services_version = sv;
            pipeline.set_services(self.link.services.load_full());
        }
        let v = self.link.current_version();
        if v != self.version && self.shared.assumed.is_none() {
            self.version = v;
            pipeline.set_snapshot(self.link.snapshot.load_full());
            self.mine.decide_under(v);
            self.next_count = 0;
            self.sweeps_since_change = 0;
        }
    }

    /// Core 0 says whether the wire port has link (a node without it fences itself).
    #[inline]
    fn watch_wire_link(&mut self, now: u64) {
        if now >= self.next_link_check {
            self.next_link_check = now + LINK_CHECK_NS;
            let up = self.shared.wire_link.up();
            self.link.wire_link_up.store(up, Relaxed);
        }
    }

    /// Core 0 frames the control thread's messages and sends them on the wire.
    #[inline]
    fn send_control_frames(&mut self) {
        let queue = &self.link.wire_out.1;
        let frames = &self.link.frames_out.1;
        if queue.is_empty() && frames.is_empty() {
            return;
        }
        // SAFETY: the pool outlives the packet loops (`run` frees it after they return).
        let pool = unsafe { Mempool::borrow(self.shared.pool) };
        let to_wire = &mut self.fwd.to_wire;
        let sent = &self.mine.counters.control_tx;
        let mut send = |frame: &[u8]| {
            let Some(mut m) = Mbuf::alloc(&pool) else {
                return false;
            };
            let room = m.room_mut();
            if room.len() >= frame.len() {
                room[..frame.len()].copy_from_slice(frame);
                m.set_len(frame.len());
                bump(sent, 1);
                to_wire.push(m);
            }
            true
        };
        let node_mac = self.shared.identity.node_mac.0;
        while let Ok(message) = queue.try_recv() {
            if !send(&wire_frame(node_mac, &message)) {
                break;
            }
        }
        // Whole frames (neighbour requests for backends) go as they are.
        while let Ok(frame) = frames.try_recv() {
            if !send(&frame) {
                break;
            }
        }
        to_wire.flush();
    }

    /// Housekeeping: expired flows leave the tables, expired held fragments are freed.
    #[inline(never)]
    fn maintain(&mut self, now: u64) {
        let fwd = &mut self.fwd;
        fwd.pipeline.maintain(now, EXPIRE_BUDGET);
        let drops = &mut fwd.drops;
        fwd.hold.expire(now, |m| {
            drop(m);
            drops[DropReason::FragmentExpired.index()] += 1;
        });
        publish_drops(&mut fwd.drops, fwd.counters);
    }

    /// Publishes this core's figures in its [`CoreLink`]; core 0 also the pool's.
    #[inline(never)]
    fn publish(&mut self, now: u64) {
        let (mine, pipeline) = (self.mine, &self.fwd.pipeline);
        mine.flows.store(pipeline.flows().len() as u64, Relaxed);
        let (own, learned) = (pipeline.flows().stats(), pipeline.learned().stats());
        mine.evictions
            .store(own.evicted - own.evicted_half_open, Relaxed);
        let half_open =
            own.evicted_half_open + own.untracked + learned.evicted_half_open + learned.untracked;
        mine.half_open_dropped.store(half_open, Relaxed);
        mine.turned_away
            .store(own.turned_away + learned.turned_away, Relaxed);
        mine.duplicate_risk
            .store(pipeline.duplicate_risk(), Relaxed);
        if pipeline.services().active() {
            mine.backends.store(pipeline.appliance_counts());
        }
        if self.index == 0 {
            // SAFETY: the pool outlives the packet loops (`run` frees it after they return).
            let pool = unsafe { Mempool::borrow(self.shared.pool) };
            self.link
                .mbufs_in_use
                .store(u64::from(pool.in_use()), Relaxed);
        }
        mine.busy_ns
            .fetch_add(std::mem::take(&mut self.busy_ns), Relaxed);
        if now >= self.next_latency {
            self.next_latency = now + LATENCY_EVERY_NS;
            if !self.latency.is_empty() {
                let out = &mine.burst_latency_ns;
                for (slot, q) in out.iter().zip([0.5, 0.99, 0.999]) {
                    slot.store(self.latency.value_at_quantile(q), Relaxed);
                }
                out[3].store(self.latency.max(), Relaxed);
            }
            self.latency.reset();
        }
    }

    /// While buckets move, or this node still serves flows in buckets it released earlier,
    /// counts the live flows of those buckets for the control thread (the "done" step and the
    /// held buckets), a few times per second.
    #[inline(always)]
    fn count_releasing(&mut self) {
        if self
            .fwd
            .pipeline
            .snapshot()
            .counts(self.shared.identity.node)
        {
            let now = self.clock.now();
            if now >= self.next_count {
                self.recount_releasing(now);
            }
        }
    }

    /// Each round sweeps an eighth of the flow table, so expired flows leave the counts within
    /// a second.
    #[inline(never)]
    fn recount_releasing(&mut self, now: u64) {
        self.next_count = now + COUNT_EVERY_NS;
        let pipeline = &mut self.fwd.pipeline;
        let eighth = pipeline.flows().slot_count() / 8;
        pipeline.maintain(now, eighth);
        let counts = &self.mine.bucket_flows;
        for b in pipeline.snapshot().counted(self.shared.identity.node) {
            counts[b].store(pipeline.flows().count_in_bucket(b), Relaxed);
        }
        self.sweeps_since_change = self.sweeps_since_change.saturating_add(1);
        // The counts hold for this snapshot once a whole sweep has run under it.
        if self.sweeps_since_change >= 8 {
            self.mine.bucket_flows_version.store(self.version, Relaxed);
        }
    }

    /// After the loop: the last busy time is published, held fragments are freed.
    fn stop(mut self) {
        if self.poll_busy {
            self.busy_ns += self.clock.now().saturating_sub(self.poll_start);
        }
        self.mine.busy_ns.fetch_add(self.busy_ns, Relaxed);
        self.fwd.hold.drain(drop);
    }
}

impl Forward<'_> {
    /// Decides one wire frame and sends it where the decision says.
    #[inline(always)]
    fn wire_frame(&mut self, mut m: Mbuf, prep: &Prepared, now: u64) {
        let len = m.len();
        let action = self.pipeline.decide(&mut m.frame_buf(), len, prep, now);
        self.carry_out(m, action, now);
        if let Some(released) = self.pipeline.take_released() {
            self.release(released, now);
        }
    }

    /// Sends a decided wire frame where `action` says.
    #[inline(always)]
    fn carry_out(&mut self, mut m: Mbuf, action: Action, now: u64) {
        let c = self.counters;
        match action {
            Action::Deliver => self.to_host.push(m),
            Action::DeliverShared => {
                self.link.neighbour_answer(m.data());
                self.to_host.push(m);
            }
            Action::ToWire => self.to_wire.push(m),
            Action::ToBackend => {
                bump(&c.to_backend, 1);
                self.to_wire.push(m);
            }
            Action::Encapsulated { push, len } => {
                if m.reframe(push, len) {
                    bump(&c.to_backend, 1);
                    self.to_wire.push(m);
                } else {
                    // Not with the lengths the decision wrote into this mbuf: counted, never
                    // sent half-built.
                    self.drops[DropReason::NoBackend.index()] += 1;
                    push_dropped(&mut self.dropped, m);
                }
            }
            Action::ToBackendInPieces { .. } => self.in_pieces(m),
            Action::Reply { len } => {
                // u32 to usize: lossless on the 64-bit targets DPDK runs on.
                m.set_len(len as usize);
                bump(&c.replies, 1);
                self.to_wire.push(m);
            }
            Action::ToControl => {
                bump(&c.to_control, 1);
                self.link.received_on_wire(m.data());
                push_dropped(&mut self.dropped, m);
            }
            Action::Hold => match self
                .pipeline
                .take_held()
                .map(|key| self.hold.put(key, now, m))
            {
                Some(Ok(())) => bump(&c.held, 1),
                Some(Err(m)) => {
                    drop(m);
                    self.drops[DropReason::FragmentExpired.index()] += 1;
                }
                None => {
                    // Every `Hold` leaves its key to take: a pipeline bug, counted.
                    debug_assert!(false, "Hold without a key");
                    self.drops[DropReason::FragmentExpired.index()] += 1;
                }
            },
            Action::Drop(reason) => {
                self.drops[reason.index()] += 1;
                push_dropped(&mut self.dropped, m);
            }
        }
    }

    /// A datagram cut for its backend: each piece, encapsulated, in an mbuf of its own to the
    /// wire; the frame itself is freed. All the pieces or none: without every mbuf they need,
    /// or with one that cannot be written, none is sent (the backend could not reassemble the
    /// datagram from the others).
    #[inline(never)]
    fn in_pieces(&mut self, m: Mbuf) {
        let Some(pieces) = self.pipeline.take_pieces() else {
            // Every `ToBackendInPieces` leaves its pieces to take: a pipeline bug, counted.
            debug_assert!(false, "ToBackendInPieces without pieces");
            self.drops[DropReason::NoBackend.index()] += 1;
            push_dropped(&mut self.dropped, m);
            return;
        };
        let count = pieces.count();
        let mut out = Burst::new();
        while out.len() < count {
            let Some(mut piece) = Mbuf::alloc(&self.pool) else {
                break;
            };
            // The piece may be up to the outer headers longer than the frame it comes from,
            // which filled its own mbuf at most: it starts in the headroom (128 bytes, more
            // than any outer header).
            let grown = piece.prepend(MAX_GROWTH);
            debug_assert!(grown, "an mbuf's headroom holds the outer headers");
            let written = pieces.write(m.data(), out.len(), piece.room_mut());
            let Some(len) = written else {
                // The frame, counted once (as every drop reason counts frames received).
                self.drops[DropReason::TooBig.index()] += 1;
                push_dropped(&mut self.dropped, m);
                return;
            };
            piece.set_len(len);
            if let Err(piece) = out.push(piece) {
                // More pieces than a burst holds: never with a path of at least 1280 bytes
                // and frames of at most 16 KiB (`mbuf_size`).
                debug_assert!(false, "{count} pieces");
                drop(piece);
                break;
            }
        }
        if out.len() < count {
            self.drops[DropReason::NoMbuf.index()] += 1;
        } else {
            bump(&self.counters.to_backend, count);
            for piece in out.drain() {
                self.to_wire.push(piece);
            }
        }
        push_dropped(&mut self.dropped, m);
    }

    /// The later fragments held for a first fragment just decided: to the host if it went
    /// there, decided again (to its backend) if it went to a backend, else dropped.
    #[inline(never)]
    fn release(&mut self, released: Released, now: u64) {
        while let Some(mut m) = self.hold.take(&released.key) {
            match released.to {
                ReleaseTo::Backend => {
                    let len = m.len();
                    let action = self
                        .pipeline
                        .released_fragment(&mut m.frame_buf(), len, now);
                    self.carry_out(m, action, now);
                }
                ReleaseTo::Host => self.to_host.push(m),
                ReleaseTo::Nowhere => {
                    self.drops[DropReason::NotOwned.index()] += 1;
                    push_dropped(&mut self.dropped, m);
                }
            }
        }
    }

    /// Sends one host frame to the wire (or drops it).
    #[inline(always)]
    fn host_frame(&mut self, mut m: Mbuf, now: u64) {
        let action = if m.is_chained() {
            Action::Drop(DropReason::Chained)
        } else {
            self.pipeline.from_host(m.data_mut(), now)
        };
        match action {
            Action::Drop(reason) => {
                self.drops[reason.index()] += 1;
                push_dropped(&mut self.dropped, m);
            }
            _ => self.to_wire.push(m),
        }
    }
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

#[inline(always)]
fn bump(counter: &AtomicU64, n: usize) {
    // Single writer: a load and a store, no locked read-modify-write on the packet path.
    counter.store(counter.load(Relaxed) + n as u64, Relaxed);
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
