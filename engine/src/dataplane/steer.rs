//! Frames passed between packet cores, so that each is decided on its home core
//! ([`crate::pipeline::home_core`]): one ring per core and side (wire, host) that every other
//! core may put into and only its owner takes from.
//!
//! Only when a node runs more than one packet core: with one there are no rings and nothing
//! is hashed. A core whose passes back up (a ring it feeds is three quarters full: its owner is
//! slower than the traffic) stops receiving until they drain, so that overload drops frames
//! where a port would anyway, in its receive queue, rather than between cores after they were
//! received. A frame a full ring still cannot take is freed and counted (`core-queue-full`),
//! never decided on a core that lacks its flow's state. This module must never decide anything
//! about a frame: where it goes is the pipeline's call.

use std::ffi::CString;

use dpdk_sys as sys;

use super::{Burst, Mbuf, StartError};
use crate::pipeline::Side;

/// Frames a ring holds (a power of two; one slot stays empty): a few bursts from each other
/// core between two polls of its owner.
const RING_SLOTS: u32 = 1024;
/// `RING_F_SC_DEQ` of `rte_ring_core.h` (a `#define` bindgen does not bind): one consumer.
const RING_F_SC_DEQ: u32 = 0x0002;
/// Free slots below which a ring counts as backed up.
const LOW_WATER: u32 = RING_SLOTS / 4;

/// Every core's incoming rings, `[core][side]`.
pub(super) struct Rings {
    rings: Vec<[Ring; 2]>,
}

/// One DPDK ring of mbuf pointers: multi-producer, single-consumer.
struct Ring(*mut sys::rte_ring);

// SAFETY: an `rte_ring` created without `RING_F_SP_ENQ` is safe to enqueue to from any lcore;
// the single consumer is the core whose index it has (see `Rings::incoming`).
unsafe impl Sync for Rings {}
// SAFETY: as above; the pointer is only freed by `Drop`, after every loop has stopped.
unsafe impl Send for Rings {}

impl Rings {
    /// Rings for `cores` packet cores of node `node` (ring names are global to the EAL's
    /// process).
    pub(super) fn create(cores: usize, node: u8) -> Result<Rings, StartError> {
        let mut rings = Vec::with_capacity(cores);
        for core in 0..cores {
            let ring = |side: &str| Ring::create(&format!("cc{node}-steer-{core}-{side}"));
            rings.push([ring("wire")?, ring("host")?]);
        }
        Ok(Rings { rings })
    }

    /// Where frames for core `core` from `side` go.
    #[inline(always)]
    pub(super) fn incoming(&self, core: usize, side: Side) -> *mut sys::rte_ring {
        self.rings[core][side_index(side)].0
    }
}

impl Ring {
    fn create(name: &str) -> Result<Ring, StartError> {
        let fix = "give the EAL more memory (`-m`), or list one core in dataplane.cores";
        let c = CString::new(name).expect("ring names have no NUL");
        // SAFETY: the EAL is up (rings are created after it in `run`); `c` outlives the call.
        let raw = unsafe {
            sys::rte_ring_create(
                c.as_ptr(),
                RING_SLOTS,
                sys::rte_socket_id() as i32,
                RING_F_SC_DEQ,
            )
        };
        if raw.is_null() {
            return Err(StartError::new(
                "dataplane.cores",
                format!(
                    "cannot create the ring `{name}` between packet cores: {}",
                    super::strerror(super::rte_errno())
                ),
                fix,
            ));
        }
        Ok(Ring(raw))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Frames still in the ring when the loops stopped are freed with it.
        let mut left = Burst::new();
        // SAFETY: every packet loop has returned (the rings are dropped after
        // `rte_eal_mp_wait_lcore`), so this thread is the ring's only user; its entries are
        // owned mbufs.
        while unsafe { left.from_ring(self.0) } > 0 {
            left.free_all();
        }
        // SAFETY: created by `rte_ring_create`, freed once, nobody uses it any more.
        unsafe { sys::rte_ring_free(self.0) };
    }
}

/// What one core keeps to pass frames to the others: a burst per (core, side), flushed into
/// that core's ring after each RX burst.
pub(super) struct Outgoing<'a> {
    rings: &'a Rings,
    me: usize,
    out: Vec<[Burst; 2]>,
    /// A ring this core feeds was backed up at the last look.
    backed_up: bool,
}

impl<'a> Outgoing<'a> {
    pub(super) fn new(rings: &'a Rings, me: usize) -> Outgoing<'a> {
        Outgoing {
            rings,
            me,
            out: (0..rings.rings.len())
                .map(|_| [Burst::new(), Burst::new()])
                .collect(),
            backed_up: false,
        }
    }

    /// Every core's incoming rings.
    #[inline(always)]
    pub(super) fn rings(&self) -> &'a Rings {
        self.rings
    }

    /// The number of cores.
    #[inline(always)]
    pub(super) fn cores(&self) -> usize {
        self.rings.rings.len()
    }

    /// Takes the frames of `burst` (received on `side`) whose home is another core out of it
    /// and into that core's ring. Returns (frames passed on, frames a full ring refused).
    #[inline]
    pub(super) fn pass_on(&mut self, burst: &mut Burst, side: Side) -> (usize, usize) {
        let (me, cores) = (self.me, self.cores());
        let s = side_index(side);
        let out = &mut self.out;
        let mut passed = 0;
        burst.split_off(
            |frame| crate::pipeline::home_core(frame, side, cores).filter(|&h| h != me),
            |home, m: Mbuf| {
                passed += 1;
                // One RX burst fills at most one outgoing burst.
                if let Err(m) = out[home][s].push(m) {
                    drop(m);
                }
            },
        );
        if passed == 0 {
            return (0, 0);
        }
        let (mut refused, mut least_free) = (0, u32::MAX);
        for (home, bursts) in self.out.iter_mut().enumerate() {
            // SAFETY: the ring is core `home`'s, multi-producer; only its own core dequeues.
            let (unsent, free) = unsafe { bursts[s].to_ring(self.rings.incoming(home, side)) };
            refused += unsent;
            least_free = least_free.min(free);
        }
        self.backed_up |= least_free < LOW_WATER;
        (passed - refused, refused)
    }

    /// Whether this core should leave its own queues alone for now: a ring it feeds was backed
    /// up, and still is (looked at again only then).
    #[inline(always)]
    pub(super) fn backed_up(&mut self) -> bool {
        if self.backed_up {
            self.backed_up = self.any_backed_up();
        }
        self.backed_up
    }

    fn any_backed_up(&self) -> bool {
        (0..self.cores())
            .filter(|&core| core != self.me)
            .flat_map(|core| [Side::Wire, Side::Host].map(|side| self.rings.incoming(core, side)))
            // SAFETY: reading a ring's counts is safe from any thread while it exists.
            .any(|ring| unsafe { sys::rte_ring_free_count(ring) } < LOW_WATER)
    }
}

#[inline(always)]
fn side_index(side: Side) -> usize {
    match side {
        Side::Wire => 0,
        Side::Host => 1,
    }
}
