//! Owning mbufs and fixed-size bursts: an mbuf is freed exactly once, by whoever holds it last.

use std::ptr::NonNull;

use dpdk_sys as sys;

use crate::pipeline::FrameBuf;

// A received frame has the headroom the pipeline writes outer headers into.
const _: () = assert!(crate::pipeline::HEADROOM == sys::RTE_PKTMBUF_HEADROOM as usize);

/// Frames moved per RX/TX call. Fixed so that bursts live on the stack.
pub const BURST: usize = 32;

/// One packet buffer, owned. Dropping it returns it to its pool.
#[derive(Debug)]
pub struct Mbuf {
    raw: NonNull<sys::rte_mbuf>,
}

impl Mbuf {
    /// A fresh, empty mbuf from `pool`, if the pool has one.
    pub fn alloc(pool: &super::Mempool) -> Option<Mbuf> {
        // SAFETY: the pool is valid for its lifetime; a non-null result is a fresh mbuf that
        // nobody else owns.
        let raw = unsafe { sys::rte_pktmbuf_alloc(pool.as_ptr()) };
        NonNull::new(raw).map(|raw| Mbuf { raw })
    }

    /// # Safety
    /// `raw` must be a valid mbuf that nobody else owns (e.g. just returned by `rx_burst`).
    pub unsafe fn from_raw(raw: NonNull<sys::rte_mbuf>) -> Mbuf {
        Mbuf { raw }
    }

    /// Gives up ownership, e.g. to a driver's TX queue.
    pub fn into_raw(self) -> *mut sys::rte_mbuf {
        let raw = self.raw.as_ptr();
        std::mem::forget(self);
        raw
    }

    /// The frame: the first segment's data. Frames from our pools fit in one segment.
    pub fn data(&self) -> &[u8] {
        // SAFETY: we own the mbuf; buf_addr + data_off points at data_len initialised bytes
        // inside the buffer, and no one else reads or writes it while we hold it.
        unsafe {
            let m = self.raw.as_ref();
            let start = (m.buf_addr as *const u8).add(usize::from(m.data_off));
            std::slice::from_raw_parts(start, usize::from(m.data_len))
        }
    }

    /// The frame, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.room_mut()[..len]
    }

    /// Everything from the start of the frame to the end of the buffer: a reply built in place
    /// may be longer than the frame it answers (see [`Mbuf::set_len`]).
    pub fn room_mut(&mut self) -> &mut [u8] {
        // SAFETY: we own the mbuf exclusively; [buf_addr + data_off, buf_addr + buf_len) lies
        // inside the buffer the mbuf describes. Bytes past data_len were initialised when the
        // pool was created (DPDK zeroes the memzone) or by earlier frames.
        unsafe {
            let m = self.raw.as_ref();
            let start = (m.buf_addr as *mut u8).add(usize::from(m.data_off));
            let room = usize::from(m.buf_len) - usize::from(m.data_off);
            std::slice::from_raw_parts_mut(start, room)
        }
    }

    /// The whole buffer as a decision works in it ([`FrameBuf`]): the headroom, the frame, the
    /// tailroom.
    pub fn frame_buf(&mut self) -> FrameBuf<'_> {
        // SAFETY: we own the mbuf exclusively, and it is a direct mbuf (this crate never
        // attaches or clones one), so [buf_addr, buf_addr + buf_len) is its own buffer, which
        // nothing else reads or writes while the borrow of `self` lasts. Its bytes are
        // initialised: the pool's memory was zeroed when it was created, and drivers and
        // earlier frames only ever wrote into it (the headroom as the bytes past data_len,
        // see `room_mut`).
        let (buf, at) = unsafe {
            let m = self.raw.as_ref();
            let buf = std::slice::from_raw_parts_mut(m.buf_addr as *mut u8, usize::from(m.buf_len));
            (buf, usize::from(m.data_off))
        };
        FrameBuf::new(buf, at)
    }

    /// After [`crate::pipeline::Action::Encapsulated`]: the single-segment frame starts `push`
    /// bytes earlier (into the headroom) and is `len` bytes long; `false` if that leaves the
    /// buffer (nothing changes). (Chained frames are dropped before any decision.)
    pub fn reframe(&mut self, push: u16, len: u16) -> bool {
        // SAFETY: we own the mbuf; the new start and length are checked to lie inside the
        // buffer, whose bytes are initialised (see `frame_buf`); for a single segment pkt_len
        // equals data_len.
        unsafe {
            let m = self.raw.as_mut();
            let Some(start) = m.data_off.checked_sub(push) else {
                return false;
            };
            if u32::from(start) + u32::from(len) > u32::from(m.buf_len) {
                return false;
            }
            m.data_off = start;
            m.data_len = len;
            m.pkt_len = u32::from(len);
        }
        true
    }

    pub fn len(&self) -> usize {
        // SAFETY: reading a field of an mbuf we own.
        usize::from(unsafe { self.raw.as_ref() }.data_len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the frame length of a single-segment mbuf; `len` is clamped to the room.
    pub fn set_len(&mut self, len: usize) {
        let room = self.room_mut().len();
        let len = len.min(room) as u16;
        // SAFETY: we own the mbuf; for a single segment pkt_len equals data_len, and `len` fits
        // in the buffer.
        unsafe {
            let m = self.raw.as_mut();
            m.data_len = len;
            m.pkt_len = u32::from(len);
        }
    }

    /// Grows a single-segment frame by `n` bytes at the front, into the headroom (what
    /// `rte_pktmbuf_prepend` does); `false` if the headroom is too small (nothing changes).
    pub fn prepend(&mut self, n: usize) -> bool {
        let Ok(n16) = u16::try_from(n) else {
            return false;
        };
        // SAFETY: we own the mbuf; moving data_off back by at most data_off stays inside the
        // buffer, and the new bytes are initialised (see `room_mut`).
        unsafe {
            let m = self.raw.as_mut();
            if m.data_off < n16 || usize::from(m.data_len) + n > usize::from(u16::MAX) {
                return false;
            }
            m.data_off -= n16;
            m.data_len += n16;
            m.pkt_len += u32::from(n16);
        }
        true
    }

    /// Whether the frame spans several segments (only the first is inspected).
    pub fn is_chained(&self) -> bool {
        // SAFETY: reading a field of an mbuf we own.
        unsafe { self.raw.as_ref() }.nb_segs > 1
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (into_raw forgets self), so this is the only free.
        unsafe { sys::rte_pktmbuf_free(self.raw.as_ptr()) };
    }
}

/// Up to [`BURST`] owned mbufs in a fixed array. Whatever is left in it on drop is freed.
#[derive(Debug)]
pub struct Burst {
    slots: [*mut sys::rte_mbuf; BURST],
    len: usize,
}

impl Default for Burst {
    fn default() -> Self {
        Self::new()
    }
}

impl Burst {
    pub const fn new() -> Burst {
        Burst {
            slots: [std::ptr::null_mut(); BURST],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BURST
    }

    /// Appends an mbuf; hands it back when the burst is full.
    pub fn push(&mut self, m: Mbuf) -> Result<(), Mbuf> {
        if self.is_full() {
            return Err(m);
        }
        self.slots[self.len] = m.into_raw();
        self.len += 1;
        Ok(())
    }

    /// Asks for every frame's first cache line now, so that the misses overlap instead of
    /// being paid one after the other while the burst is processed.
    #[inline(always)]
    fn prefetch_frames(&self) {
        for &m in &self.slots[..self.len] {
            prefetch_frame(m);
        }
    }

    /// Receives into an empty burst; returns how many frames arrived.
    pub fn rx(&mut self, port: u16, queue: u16) -> usize {
        debug_assert!(self.is_empty());
        // SAFETY: `slots` has room for BURST pointers; the driver writes at most BURST and
        // returns how many. The port and queue were set up and started by `Port`.
        let n =
            unsafe { sys::rte_eth_rx_burst(port, queue, self.slots.as_mut_ptr(), BURST as u16) };
        self.len = usize::from(n);
        self.prefetch_frames();
        self.len
    }

    /// Transmits the whole burst. Frames the driver did not take are freed here. Returns
    /// (sent, not sent).
    pub fn tx(&mut self, port: u16, queue: u16) -> (usize, usize) {
        if self.len == 0 {
            return (0, 0);
        }
        // SAFETY: the first `len` slots hold mbufs we own; the driver takes ownership of the
        // first `sent` of them.
        let sent = usize::from(unsafe {
            sys::rte_eth_tx_burst(port, queue, self.slots.as_mut_ptr(), self.len as u16)
        });
        let unsent = self.len - sent;
        if unsent > 0 {
            // SAFETY: slots[sent..len] are still ours and are freed exactly once here.
            unsafe {
                sys::rte_pktmbuf_free_bulk(self.slots.as_mut_ptr().add(sent), unsent as u32);
            }
        }
        self.len = 0;
        (sent, unsent)
    }

    /// Frees every mbuf in the burst at once (one bulk call instead of one per frame).
    pub fn free_all(&mut self) {
        if self.len > 0 {
            // SAFETY: the first `len` slots are owned mbufs, freed once here.
            unsafe { sys::rte_pktmbuf_free_bulk(self.slots.as_mut_ptr(), self.len as u32) };
            self.len = 0;
        }
    }

    /// The `i`-th frame of the burst, read in place (the bytes [`Mbuf::data`] gives once the
    /// burst is drained). `None` past the end and for frames spanning several segments.
    #[inline]
    pub fn frame(&self, i: usize) -> Option<&[u8]> {
        let raw = *self.slots[..self.len].get(i)?;
        // SAFETY: slots below `len` hold valid mbufs owned by the burst, and `&self` keeps them
        // from being drained, sent or freed while the slice lives. buf_addr + data_off points
        // at data_len initialised bytes of the first segment, as in `Mbuf::data`.
        unsafe {
            let m = &*raw;
            if m.nb_segs > 1 {
                return None;
            }
            let start = (m.buf_addr as *const u8).add(usize::from(m.data_off));
            Some(std::slice::from_raw_parts(start, usize::from(m.data_len)))
        }
    }

    /// Takes every mbuf out: those whose bit is set in `mask` (bit `i` for the `i`-th) are
    /// moved to `to` at once, the others handed out in order with their index. `to` must have
    /// room for them (it is never filled past [`BURST`]: the rest are freed).
    pub fn drain_split(&mut self, mask: u64, to: &mut Burst) -> SplitDrain<'_> {
        let len = std::mem::take(&mut self.len);
        let all = if len >= 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        let mut moved = mask & all;
        while moved != 0 {
            let i = moved.trailing_zeros() as usize;
            moved &= moved - 1;
            // SAFETY: slot i (below the old length) holds an mbuf owned by this burst; it is
            // handed over exactly once, here, and never by the iterator (its bit is masked
            // out of `rest`).
            let m = unsafe { Mbuf::from_raw(NonNull::new_unchecked(self.slots[i])) };
            if let Err(m) = to.push(m) {
                drop(m);
            }
        }
        SplitDrain {
            slots: &self.slots[..len],
            rest: all & !mask,
        }
    }

    /// Takes out the frames `away` gives a destination for, handing each to `give` with it,
    /// and keeps the others, in their order (frames spanning several segments are kept).
    #[inline]
    pub fn split_off(
        &mut self,
        mut away: impl FnMut(&[u8]) -> Option<usize>,
        mut give: impl FnMut(usize, Mbuf),
    ) {
        let mut kept = 0;
        for i in 0..self.len {
            let dest = self.frame(i).and_then(&mut away);
            let raw = self.slots[i];
            match dest {
                Some(d) => {
                    // SAFETY: slot i (below `len`) holds an mbuf owned by the burst; it leaves
                    // the burst here, once (the slot is overwritten or cut off below).
                    give(d, unsafe { Mbuf::from_raw(NonNull::new_unchecked(raw)) });
                }
                None => {
                    self.slots[kept] = raw;
                    kept += 1;
                }
            }
        }
        self.len = kept;
    }

    /// Takes up to a burst of mbufs from `ring` into an empty burst; returns how many.
    ///
    /// # Safety
    /// `ring` must be a valid ring of owned mbufs that this thread may dequeue from.
    #[inline]
    pub unsafe fn from_ring(&mut self, ring: *mut sys::rte_ring) -> usize {
        debug_assert!(self.is_empty());
        // SAFETY: per the caller, `ring` holds mbuf pointers whose ownership passes to us;
        // `slots` has room for BURST of them.
        let n = unsafe {
            sys::rte_ring_dequeue_burst(
                ring,
                self.slots.as_mut_ptr().cast(),
                BURST as u32,
                std::ptr::null_mut(),
            )
        };
        self.len = n as usize;
        self.prefetch_frames();
        self.len
    }

    /// Puts every mbuf into `ring` (ownership passes to whoever dequeues them); those the ring
    /// has no room for are freed. Returns how many were freed, and the ring's free slots after
    /// (`u32::MAX` when the burst was empty).
    ///
    /// # Safety
    /// `ring` must be a valid ring of mbufs that this thread may enqueue to.
    #[inline]
    pub unsafe fn to_ring(&mut self, ring: *mut sys::rte_ring) -> (usize, u32) {
        if self.len == 0 {
            return (0, u32::MAX);
        }
        let mut free = 0u32;
        // SAFETY: per the caller; the first `len` slots are owned mbufs.
        let n = unsafe {
            sys::rte_ring_enqueue_burst(
                ring,
                self.slots.as_ptr().cast(),
                self.len as u32,
                &mut free,
            )
        } as usize;
        let unsent = self.len - n;
        if unsent > 0 {
            // SAFETY: the mbufs the ring did not take are still ours, freed once here.
            unsafe { sys::rte_pktmbuf_free_bulk(self.slots.as_mut_ptr().add(n), unsent as u32) };
        }
        self.len = 0;
        (unsent, free)
    }

    /// Takes every mbuf out, in order.
    pub fn drain(&mut self) -> Drain<'_> {
        let len = std::mem::take(&mut self.len);
        Drain {
            slots: &self.slots[..len],
            next: 0,
        }
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the first `len` slots are owned mbufs, freed once here.
            unsafe { sys::rte_pktmbuf_free_bulk(self.slots.as_mut_ptr(), self.len as u32) };
        }
    }
}

/// Iterator over the mbufs of a burst; frees those not taken when dropped.
#[derive(Debug)]
pub struct Drain<'a> {
    slots: &'a [*mut sys::rte_mbuf],
    next: usize,
}

impl Iterator for Drain<'_> {
    type Item = Mbuf;

    #[inline]
    fn next(&mut self) -> Option<Mbuf> {
        let raw = *self.slots.get(self.next)?;
        self.next += 1;
        // SAFETY: each slot below the burst's old length holds an mbuf owned by the burst,
        // and each is handed out once.
        Some(unsafe { Mbuf::from_raw(NonNull::new_unchecked(raw)) })
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        for m in self.by_ref() {
            drop(m);
        }
    }
}

/// The mbufs of a burst not moved by [`Burst::drain_split`], with their index; frees those
/// not taken when dropped.
#[derive(Debug)]
pub struct SplitDrain<'a> {
    slots: &'a [*mut sys::rte_mbuf],
    /// The indexes still to hand out.
    rest: u64,
}

impl Iterator for SplitDrain<'_> {
    type Item = (usize, Mbuf);

    #[inline]
    fn next(&mut self) -> Option<(usize, Mbuf)> {
        if self.rest == 0 {
            return None;
        }
        let i = self.rest.trailing_zeros() as usize;
        self.rest &= self.rest - 1;
        // SAFETY: `rest` only has bits below the burst's old length, each for a slot holding
        // an mbuf owned by the burst that `drain_split` did not move; each is handed out once.
        Some((i, unsafe {
            Mbuf::from_raw(NonNull::new_unchecked(self.slots[i]))
        }))
    }
}

impl Drop for SplitDrain<'_> {
    fn drop(&mut self) {
        for m in self.by_ref() {
            drop(m);
        }
    }
}

/// Warms the cache line holding the start of the frame in `m`.
#[inline(always)]
fn prefetch_frame(m: *mut sys::rte_mbuf) {
    // SAFETY: `m` is a valid mbuf just received into the burst (owned by it); reading its
    // buf_addr and data_off fields is sound, and computing the address does not dereference
    // the frame.
    let data = unsafe { ((*m).buf_addr as *const u8).add(usize::from((*m).data_off)) };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, even on an invalid address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(data.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
