//! The bounded table of flows a node owns (or, in a second instance, has learned during a
//! handoff): enough TCP state to tell a new flow from an established or closing one, idle
//! timeouts per protocol, and a live count per bucket for the handoff's "done" step.
//!
//! The table never allocates after [`FlowTable::new`] and never reads a clock: callers pass
//! `now` in nanoseconds from any monotonic source, the same one for every call.
//!
//! # Identity
//!
//! The table does not store flow ids: it stores a 64-bit keyed fingerprint of each one
//! ([`FlowHash`]) and treats equal fingerprints as the same flow. The fingerprint is built from
//! the flow key's keyed bucket hash (SipHash under the cluster secret, computed for the
//! ownership decision anyway) and the rest of the 5-tuple through a bijective mixer, so:
//! - two flows of different clients collide only if their keyed SipHashes do, which nobody
//!   without the secret can arrange (and which happens by chance with probability ~2^-64 per
//!   pair that meets in a probe run);
//! - two flows with the same flow key and destination never collide (the ports and protocol
//!   enter injectively); flows of one client to different IPv4 destinations collide only by
//!   chance (the destination enters through a bijection keyed by the key's hash, so nobody
//!   without the secret can choose two that collide). An IPv6 destination is folded to 64 bits
//!   first, in public: a client can build an address that folds like another, but not choose
//!   both (two given addresses, service addresses say, collide only by chance). A collision
//!   merges that client's own flows of one bucket; in appliance mode a merged flow would take
//!   the other's marked backend ([`FlowTable::upsert_checked`]), which is why a client must not
//!   be able to aim one at a port its rule does not serve.
//!
//! # Layout
//!
//! Open addressing with linear probing over an array of 16-byte slots (four per cache line),
//! at most 2/3 full (`slots = ceil(capacity * 3 / 2)` rounded up to whole lines: 24 bytes of
//! slots per tracked flow, whatever the capacity, where rounding up to a power of two cost up to
//! twice that — 33.8 bytes at a million flows): the
//! fingerprint (8), `last_seen` in ticks of 2^24 ns (~16.8 ms; 4), the bucket (2), and 2 bytes
//! of state (3 bits, 0 = empty; UDP's open state apart from other protocols', for its timeout),
//! a mark (1 bit: the backend is checked, [`FlowTable::upsert_checked`]) and backend (12 bits:
//! the backend an appliance chose for the flow, so that a change of the backend pool moves no
//! existing flow). A probe run starts at the first
//! slot of the cache line the fingerprint's low 32 bits pick by a multiply-shift over the line
//! count (its home), not at a slot within it: a slot-granular home makes far more lookups read
//! a second line, and at millions of flows every line read is a memory access. Runs wrap from
//! the last slot to the first. Deletion shifts
//! the rest of the probe run back (no tombstones), so runs stay short under churn. A
//! 65536-entry `u32` array counts entries per bucket (256 KiB), a 4096-entry one per backend id
//! (16 KiB; id 0: flows without a backend). [`FlowTable::prefetch`] asks
//! for a flow's home line and the next one ahead of the lookup, so a burst's misses overlap.
//!
//! Ticks are 32 bits and wrap after ~2.3 years; idle times are compared with wrapping
//! arithmetic, which is exact as long as every entry is swept ([`FlowTable::expire`]) or
//! touched within that span (the data plane sweeps the whole table within minutes).
//!
//! # Bounds
//!
//! At most `capacity` entries. Inserting into a full table first removes one entry among the
//! first [`EVICTION_WINDOW`] entries of the new flow's probe run: an expired one if there is
//! one (counted as expired), else the least recently seen half-open one, else the least
//! recently seen (counted as evicted), as far as the admissions below allow: a new flow may be
//! left untracked instead.
//!
//! # Admission of half-open flows
//!
//! A half-open flow (a TCP SYN, no handshake ACK yet) costs a client nothing to create, and a
//! flood of SYNs from spoofed sources creates them at line rate. So half-open flows live in
//! their own bounded share of the table, at most [`HALF_OPEN_SHARE`] of `capacity`, and make
//! room only among themselves: a new half-open flow that finds its share (or the table) full
//! replaces an expired or the least recently seen half-open entry of its probe window, and if
//! the window holds none it is not tracked at all (counted in
//! [`FlowTableStats::untracked`]; the frame itself is still decided by bucket ownership, and
//! the doorkeeper below notes it: its next packet, the handshake's ACK, is tracked as an
//! established flow, if it comes before the doorkeeper's entry was taken). So a SYN flood can
//! never evict an established, closing or UDP flow, which is what a handoff (the old owner
//! serves what it tracks) and the "done" step rely on.
//!
//! # Admission of other new flows into a full table
//!
//! Any other first packet is as cheap to forge: an ACK or FIN from a spoofed source (a flow
//! picked up mid-stream, as after a failover), a UDP datagram. Into a full table such a flow
//! takes an expired or a half-open entry of its probe window if there is one; evicting a
//! settled entry needs a second packet of the flow: the table's doorkeeper (the fingerprints
//! of the flows turned away lately, exactly) notes the first, which is not tracked (counted in
//! [`FlowTableStats::turned_away`]; the frame is still decided by bucket ownership), and the
//! next packet of a flow the doorkeeper still holds evicts the least recently seen entry, as
//! every new flow did before. So a flood of spoofed one-packet flows never evicts a settled
//! flow (two packets of each can, a SYN and its ACK among them), and a real flow is tracked
//! from its second packet on, if it comes before the flood has turned away about as many flows
//! as the doorkeeper holds (4096 to 65536, by capacity), else from a later pair.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use super::flow_key::{Bucket, BucketHasher, BUCKETS};
use super::siphash::Lanes;
use crate::wire::IpProtocol;

/// How many occupied slots an insertion into a full table inspects to choose a victim.
pub const EVICTION_WINDOW: usize = 8;

/// Bytes of one slot.
pub const SLOT_BYTES: usize = 16;

/// The share of `capacity` half-open flows may take, as (numerator, denominator): one half.
pub const HALF_OPEN_SHARE: (usize, usize) = (1, 2);

/// Slots in one 64-byte cache line: a probe run starts at the first of them.
const SLOTS_PER_LINE: usize = 64 / SLOT_BYTES;

const TCP: u8 = IpProtocol::Tcp.raw();
const UDP: u8 = IpProtocol::Udp.raw();

/// `last_seen` is kept in ticks of 2^TICK_SHIFT ns (~16.8 ms).
const TICK_SHIFT: u32 = 24;

#[inline(always)]
fn ticks(now: u64) -> u32 {
    // Truncation is the wrap the module doc describes.
    (now >> TICK_SHIFT) as u32
}

/// A bijective 64-bit mixer (xorshift-multiply): every output bit depends on every input bit.
#[inline(always)]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 32;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 32;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 32;
    x
}

/// A flow's identity as the table knows it: a 64-bit keyed fingerprint (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowHash(pub u64);

impl FlowHash {
    /// The fingerprint of the flow `src:src_port -> dst:dst_port` (IP protocol `proto`) whose
    /// flow key has the keyed bucket hash `key_hash` ([`super::BucketHasher::hash`]).
    #[inline]
    pub fn new(key_hash: u64, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> FlowHash {
        FlowHash::from_parts(key_hash, &FlowRest::new(dst, src_port, dst_port, proto))
    }

    /// [`FlowHash::new`] with the part that does not depend on the key hash done earlier.
    #[inline(always)]
    pub fn from_parts(key_hash: u64, rest: &FlowRest) -> FlowHash {
        // Same key and destination: the ports and protocol enter injectively (XOR with equal
        // values, then a bijection). The destination enters through a bijection keyed by the
        // key hash, so that nobody without the secret can choose two destinations of one
        // client that collide (see the module doc's identity).
        FlowHash(mix(mix(key_hash ^ rest.dst) ^ rest.ports))
    }

    /// [`FlowHash::from_parts`] of eight flows (a burst's group, hashed by `hasher`'s
    /// [`BucketHasher::hash8`]): the same values, computed side by side in the vector
    /// registers the hasher uses ([`BucketHasher::lanes`]): two multiplies in each of two
    /// mixes are most of a fingerprint's cost.
    #[inline]
    pub fn from_parts8(
        key_hashes: &[u64; 8],
        rests: &[FlowRest; 8],
        hasher: &BucketHasher,
    ) -> [FlowHash; 8] {
        match hasher.lanes() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a hasher's lanes are `Avx512` only on a CPU with AVX2 and AVX-512F, VL
            // and DQ (`Sip13x8::with` keeps only lanes that `Lanes::runs_here`).
            Lanes::Avx512 => unsafe { x86::from_parts8_avx512(key_hashes, rests) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a hasher's lanes are `Avx2` only on a CPU with AVX2 (as above).
            Lanes::Avx2 => unsafe { x86::from_parts8_avx2(key_hashes, rests) },
            _ => from_parts8(key_hashes, rests),
        }
    }
}

/// [`FlowHash::from_parts`] of eight flows, in plain code: the compiler puts the eight side by
/// side in vector registers where the caller's target features allow.
#[inline(always)]
fn from_parts8(key_hashes: &[u64; 8], rests: &[FlowRest; 8]) -> [FlowHash; 8] {
    let mut out = [FlowHash(0); 8];
    for ((out, &key_hash), rest) in out.iter_mut().zip(key_hashes).zip(rests) {
        *out = FlowHash::from_parts(key_hash, rest);
    }
    out
}

/// [`from_parts8`] compiled for the vector units [`FlowHash::from_parts8`] may use.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{from_parts8, FlowHash, FlowRest};

    /// Four lanes of 64-bit multiplies by parts (AVX2 has no 64-bit multiply).
    #[target_feature(enable = "avx2")]
    pub(super) fn from_parts8_avx2(h: &[u64; 8], rests: &[FlowRest; 8]) -> [FlowHash; 8] {
        from_parts8(h, rests)
    }

    /// Eight lanes in one 512-bit register or two 256-bit ones, AVX-512DQ's 64-bit multiply.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512dq")]
    pub(super) fn from_parts8_avx512(h: &[u64; 8], rests: &[FlowRest; 8]) -> [FlowHash; 8] {
        from_parts8(h, rests)
    }
}

/// The number a new flow's backend is picked by under affinity `none`
/// ([`crate::appliance::Rule::affinity_hash`]) for the flow `src:src_port -> dst:dst_port`
/// (IP protocol `proto`) whose flow key has the keyed bucket hash `key_hash`: what
/// [`FlowHash::new`] computed before 2026-12-07. Every node must pick alike, in a rolling
/// upgrade too, so the pick keeps its formula while the table's fingerprint changed.
#[inline]
pub fn backend_pick(key_hash: u64, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let rest = FlowRest::new(dst, src_port, dst_port, proto);
    mix(key_hash ^ rest.ports ^ rest.dst.rotate_left(8))
}

/// What a [`FlowHash`] takes besides the flow key's hash, folded: computed while the key's
/// hash is not known yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowRest {
    ports: u64,
    dst: u64,
}

impl FlowRest {
    #[inline(always)]
    pub fn new(dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> FlowRest {
        let ports = (u64::from(src_port) << 48) | (u64::from(dst_port) << 32) | u64::from(proto);
        let dst = match dst {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let a = u128::from(a);
                // Truncations: the two halves of the address.
                (a as u64) ^ mix((a >> 64) as u64)
            }
        };
        FlowRest { ports, dst }
    }
}

/// TCP header flags, as on the wire (byte 13 of the TCP header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const NONE: TcpFlags = TcpFlags(0);
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const ACK: TcpFlags = TcpFlags(0x10);

    #[inline]
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    #[inline]
    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    /// A SYN without ACK: the first packet of a new TCP connection.
    #[inline]
    pub const fn is_initial_syn(self) -> bool {
        self.contains(Self::SYN) && !self.contains(Self::ACK)
    }
}

/// What the table knows of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FlowState {
    /// Not TCP: alive while packets keep coming.
    Open = 1,
    /// TCP: a SYN was seen, no handshake ACK yet.
    SynSeen,
    /// TCP: past the handshake (or picked up mid-stream).
    Established,
    /// TCP: a FIN or RST was seen.
    Closing,
}

impl FlowState {
    /// The state after a packet with `flags` (ignored unless `proto` is TCP).
    pub fn next(prev: Option<FlowState>, proto: u8, flags: TcpFlags) -> FlowState {
        use FlowState::*;
        if proto != TCP {
            return Open;
        }
        if flags.contains(TcpFlags::RST) || flags.contains(TcpFlags::FIN) {
            return Closing;
        }
        match (prev, flags.contains(TcpFlags::SYN)) {
            // A fresh SYN after a close is the 4-tuple being reused.
            (None | Some(Closing) | Some(SynSeen) | Some(Open), true) => SynSeen,
            // A SYN on an established flow: a stray retransmit; keep what we know.
            (Some(Established), true) => Established,
            // Handshake done, or a flow picked up mid-stream (failover, learning).
            (None | Some(SynSeen) | Some(Established) | Some(Open), false) => Established,
            (Some(Closing), false) => Closing,
        }
    }
}

/// Idle timeouts: an entry not seen for longer than its timeout is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
    /// Other IP protocols.
    pub other: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_syn: Duration::from_secs(30),
            tcp_established: Duration::from_secs(300),
            tcp_closing: Duration::from_secs(30),
            udp: Duration::from_secs(30),
            other: Duration::from_secs(30),
        }
    }
}

/// The tick form the packet path compares against: one timeout per slot state (the state's 3
/// bits index it), read with a load rather than a jump on the state, which a mix of TCP and
/// UDP flows would mispredict.
#[derive(Debug, Clone, Copy)]
struct TimeoutTicks([u32; 8]);

impl From<FlowTimeouts> for TimeoutTicks {
    fn from(t: FlowTimeouts) -> Self {
        let t_of = |d: Duration| {
            u32::try_from(d.as_nanos() >> TICK_SHIFT)
                .unwrap_or(u32::MAX)
                // Idle times compare with wrapping arithmetic: keep them below half the range.
                .min(u32::MAX / 2)
        };
        let mut by_state = [t_of(t.other); 8];
        by_state[usize::from(STATE_SYN)] = t_of(t.tcp_syn);
        by_state[usize::from(STATE_ESTABLISHED)] = t_of(t.tcp_established);
        by_state[usize::from(STATE_CLOSING)] = t_of(t.tcp_closing);
        by_state[usize::from(STATE_OPEN_UDP)] = t_of(t.udp);
        TimeoutTicks(by_state)
    }
}

impl TimeoutTicks {
    /// The timeout of a slot in `state` (its 3 bits: [`STATE_MASK`]).
    #[inline(always)]
    fn of(&self, state: u8) -> u32 {
        self.0[usize::from(state & STATE_MASK as u8)]
    }
}

const EMPTY: u8 = 0;
const STATE_OPEN: u8 = FlowState::Open as u8;
const STATE_SYN: u8 = FlowState::SynSeen as u8;
const STATE_ESTABLISHED: u8 = FlowState::Established as u8;
const STATE_CLOSING: u8 = FlowState::Closing as u8;
/// [`FlowState::Open`] of a UDP flow (its own idle timeout).
const STATE_OPEN_UDP: u8 = 5;
/// The state's bits in [`Slot::meta`] (`EMPTY` to `STATE_OPEN_UDP`).
const STATE_MASK: u16 = 0x7;
/// The bit of [`Slot::meta`] that marks the backend checked (see [`FlowTable::upsert_checked`]).
const CHECKED: u16 = 0x8;
const BACKEND_SHIFT: u32 = 4;
/// Backend ids a slot can hold (0: none).
const BACKEND_IDS: usize = 1 << (16 - BACKEND_SHIFT);

/// The slot form of a state: UDP's `Open` apart, for its timeout.
#[inline(always)]
fn raw_state(state: FlowState, proto: u8) -> u8 {
    if state == FlowState::Open && proto == UDP {
        STATE_OPEN_UDP
    } else {
        state as u8
    }
}

/// The state a packet with `flags` (IP protocol `proto`) leaves an entry in, if it keeps
/// the entry's state `raw` as it is — an established TCP connection's segment without FIN or
/// RST, a UDP or other flow's packet once open: most packets, whose entry only needs its time
/// refreshed. `None`: any other (the full step decides, [`FlowState::next`]).
#[inline(always)]
fn kept_state(raw: u8, proto: u8, flags: TcpFlags) -> Option<FlowState> {
    let (steady, state) = match proto {
        TCP if !flags.contains(TcpFlags::FIN) && !flags.contains(TcpFlags::RST) => {
            (STATE_ESTABLISHED, FlowState::Established)
        }
        TCP => return None,
        UDP => (STATE_OPEN_UDP, FlowState::Open),
        _ => (STATE_OPEN, FlowState::Open),
    };
    (raw == steady).then_some(state)
}

impl FlowState {
    #[inline]
    fn from_raw(raw: u8) -> Option<FlowState> {
        match raw {
            STATE_OPEN | STATE_OPEN_UDP => Some(FlowState::Open),
            STATE_SYN => Some(FlowState::SynSeen),
            STATE_ESTABLISHED => Some(FlowState::Established),
            STATE_CLOSING => Some(FlowState::Closing),
            _ => None,
        }
    }
}

/// A live flow, as returned by lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEntry {
    pub bucket: Bucket,
    pub state: FlowState,
    /// The `now` of the last packet seen, rounded down to a tick (2^24 ns).
    pub last_seen: u64,
    /// The backend an appliance chose for the flow (0: none yet; see [`FlowTable::set_backend`]).
    pub backend: u16,
}

/// What [`FlowTable::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upsert {
    /// The flow's state after this packet.
    pub state: FlowState,
    /// The flow was not in the table (or had expired) before this packet.
    pub is_new: bool,
    /// A live entry was evicted to make room.
    pub evicted: bool,
    /// The flow is in the table now (false: a half-open flow that found no room among the
    /// half-open ones, or another new flow turned away from a full table; see the module
    /// doc's admissions).
    pub tracked: bool,
    /// The backend recorded for the flow (0: none: a new flow, or not an appliance's).
    pub backend: u16,
    /// The backend is marked checked (see [`FlowTable::upsert_checked`]).
    pub checked: bool,
}

impl Upsert {
    /// A new flow's packet the table left untracked (see the module doc's admissions).
    fn untracked(state: FlowState) -> Upsert {
        Upsert {
            state,
            is_new: true,
            evicted: false,
            tracked: false,
            backend: 0,
            checked: false,
        }
    }
}

/// Counters since construction. `inserted == len + evicted + expired + removed` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowTableStats {
    /// Entries created.
    pub inserted: u64,
    /// Live entries dropped to make room: each is a flow the node forgot while it was alive.
    pub evicted: u64,
    /// Of `evicted`, half-open entries (replaced by newer half-open flows, or by any new flow
    /// when the table is full: see the module doc's admission).
    pub evicted_half_open: u64,
    /// Entries dropped after their idle timeout (by a sweep, or reused as a victim).
    pub expired: u64,
    /// Entries dropped by [`FlowTable::remove`].
    pub removed: u64,
    /// New half-open flows not tracked: the half-open share of the table had no room for
    /// them (a SYN flood, most likely).
    pub untracked: u64,
    /// Other new flows not tracked: the table was full, and this was the first packet of the
    /// flow its doorkeeper saw (see the module doc).
    pub turned_away: u64,
}

/// One slot: see the module doc's layout.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Slot {
    hash: u64,
    /// Ticks (see [`ticks`]) of the last packet.
    last_seen: u32,
    bucket: u16,
    /// Bits 0..3: `EMPTY` or the state ([`raw_state`]); bit 3: the backend is marked checked
    /// ([`CHECKED`]); bits 4..16: the backend id (0: none).
    meta: u16,
}

impl Slot {
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.state() == EMPTY
    }

    #[inline(always)]
    fn state(&self) -> u8 {
        // The mask keeps 3 bits: the truncation is exact.
        (self.meta & STATE_MASK) as u8
    }

    #[inline(always)]
    fn set_state(&mut self, state: u8) {
        self.meta = (self.meta & !STATE_MASK) | u16::from(state);
    }

    #[inline(always)]
    fn backend(&self) -> u16 {
        self.meta >> BACKEND_SHIFT
    }
}

/// The slot array: zeroed (all slots empty) and fully touched at construction, on 2 MiB pages
/// when it is at least that large and the kernel grants transparent huge pages on request
/// (`madvise`): a table of millions of flows is read at a random line per packet, and with
/// 4 KiB pages nearly every such read would also miss the TLB and walk the page tables.
struct Slots {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Slots` owns its allocation exclusively, like a `Box<[Slot]>`; `Slot` is plain data.
unsafe impl Send for Slots {}
// SAFETY: shared references only read, as through a `&[Slot]`.
unsafe impl Sync for Slots {}

/// Tables at least this large are aligned to, and advised onto, huge pages.
const HUGE_PAGE: usize = 2 << 20;

impl Slots {
    fn zeroed(len: usize) -> Slots {
        let bytes = len
            .checked_mul(SLOT_BYTES)
            .expect("slot count fits in memory");
        // Cache-line aligned at least, so that a probe run's first line is one line.
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(bytes.max(SLOT_BYTES), align)
            .expect("a valid slot array layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: [raw, raw + bytes) is our own fresh, page-aligned allocation; the advice
            // only changes how the kernel backs it (and may be refused: then 4 KiB pages).
            unsafe {
                libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        // SAFETY: `raw` is valid for `layout.size()` bytes of writes. Zeroing touches every page
        // now rather than on the packet path, and all-zero bytes are a valid, empty `Slot`
        // (plain integers; state 0 = EMPTY).
        unsafe { std::ptr::write_bytes(raw, 0, layout.size()) };
        Slots {
            ptr: ptr.cast(),
            len,
            layout,
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];
    #[inline(always)]
    fn deref(&self) -> &[Slot] {
        // SAFETY: `ptr` points at `len` initialised slots that we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [Slot] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

/// See the module doc.
pub struct FlowTable {
    slots: Slots,
    /// Cache lines of slots (`slots.len() / SLOTS_PER_LINE`).
    lines: u64,
    capacity: usize,
    len: usize,
    /// Entries per bucket, for every bucket: a bucket indexes it without a bounds check.
    per_bucket: Box<[u32; BUCKETS]>,
    /// Entries per backend id (index 0: none), for appliance mode's per-backend flow gauge.
    per_backend: Box<[u32]>,
    timeouts: TimeoutTicks,
    /// Where the next [`FlowTable::expire`] call resumes.
    cursor: usize,
    stats: FlowTableStats,
    /// Entries in state SynSeen, expired ones not yet swept included.
    half_open: usize,
    /// Most half-open entries (see the module doc's admission).
    half_open_cap: usize,
    /// The new flows a full table saw once (see the module doc).
    doorkeeper: Doorkeeper,
}

/// Which new flows a full [`FlowTable`] turned away lately: their fingerprints, exactly, in a
/// direct-mapped array (a fingerprint takes the place of an earlier one at its index). A
/// flood of one-packet flows only replaces entries; a real flow's next packet finds its own
/// if it comes before the flood has put another flow's there (on average, within as many
/// other turned-away flows as the array has entries).
struct Doorkeeper {
    seen: Box<[u64]>,
}

impl Doorkeeper {
    /// Entries for a table of `capacity` flows: a power of two from 4096 to 65536 (512 KiB).
    fn entries(capacity: usize) -> usize {
        capacity.next_power_of_two().clamp(4096, 65536)
    }

    fn new(capacity: usize) -> Doorkeeper {
        Doorkeeper {
            seen: (0..Self::entries(capacity)).map(Self::empty).collect(),
        }
    }

    /// Entry `i` holding no fingerprint: a value whose index bits are not `i`, so that no
    /// fingerprint (not even 0) is found there.
    fn empty(i: usize) -> u64 {
        ((i ^ 1) as u64) << 32
    }

    fn index(&self, hash: u64) -> usize {
        // The home slot takes the low 32 bits (`FlowTable::home`).
        (hash >> 32) as usize & (self.seen.len() - 1)
    }

    /// Notes the flow with fingerprint `hash` as turned away.
    fn note(&mut self, hash: u64) {
        let i = self.index(hash);
        self.seen[i] = hash;
    }

    /// Whether the flow with fingerprint `hash` was turned away lately (then forgotten);
    /// notes it if not.
    fn seen_before(&mut self, hash: u64) -> bool {
        let i = self.index(hash);
        if self.seen[i] == hash {
            self.seen[i] = Self::empty(i);
            return true;
        }
        self.note(hash);
        false
    }
}

impl FlowTable {
    /// A table for at most `capacity` flows (at least 1).
    ///
    /// Allocates everything the table will ever use: `16 * slots + 272 KiB` and the
    /// doorkeeper's 32 to 512 KiB.
    pub fn new(capacity: usize, timeouts: FlowTimeouts) -> FlowTable {
        let capacity = capacity.max(1);
        let slots = Self::slots_for(capacity);
        FlowTable {
            slots: Slots::zeroed(slots),
            lines: (slots / SLOTS_PER_LINE) as u64,
            capacity,
            len: 0,
            // Built on the heap: 256 KiB would not fit every thread's stack.
            per_bucket: vec![0u32; BUCKETS]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("BUCKETS counts")),
            per_backend: (0..BACKEND_IDS).map(|_| 0u32).collect(),
            timeouts: timeouts.into(),
            cursor: 0,
            stats: FlowTableStats::default(),
            half_open: 0,
            half_open_cap: (capacity * HALF_OPEN_SHARE.0 / HALF_OPEN_SHARE.1).max(1),
            doorkeeper: Doorkeeper::new(capacity),
        }
    }

    /// Slots a table of `capacity` flows has (whole cache lines, at most 2/3 full).
    pub fn slots_for(capacity: usize) -> usize {
        let capacity = capacity.max(1);
        capacity
            .checked_add(capacity.div_ceil(2))
            .map(|n| n.div_ceil(SLOTS_PER_LINE) * SLOTS_PER_LINE)
            .filter(|&n| u32::try_from(n).is_ok())
            .unwrap_or_else(|| panic!("flow table capacity {capacity} is too large"))
    }

    /// Bytes a table of `capacity` flows allocates (slots, per-bucket and per-backend counts,
    /// the doorkeeper).
    pub fn footprint(capacity: usize) -> usize {
        Self::slots_for(capacity) * SLOT_BYTES
            + super::BUCKETS * 4
            + BACKEND_IDS * 4
            + Doorkeeper::entries(capacity) * 8
    }

    /// Most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn stats(&self) -> FlowTableStats {
        self.stats
    }

    /// Half-open entries held (TCP SYN seen, no ACK yet), expired ones not yet swept included.
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Entries held in `bucket`, expired ones not yet swept included: the handoff's "done"
    /// step should sweep ([`FlowTable::expire`]) before trusting a nonzero count.
    #[inline]
    pub fn count_in_bucket(&self, bucket: Bucket) -> u32 {
        self.per_bucket[bucket.index()]
    }

    /// Entries whose backend is `id` (1..=4095; 0: entries without one), expired ones not yet
    /// swept included, as [`FlowTable::count_in_bucket`].
    #[inline]
    pub fn count_for_backend(&self, id: u16) -> u32 {
        self.per_backend.get(usize::from(id)).copied().unwrap_or(0)
    }

    /// Asks the CPU for the cache line of `hash`'s home slot and the line after it (where the
    /// probe run continues when the home line is full: 7% of lookups at 10 million flows in
    /// 2^24 slots), so that a lookup a little later finds them there. Only a hint: no effect on
    /// the table.
    #[inline(always)]
    pub fn prefetch(&self, hash: FlowHash) {
        self.prefetch_if(hash, true);
    }

    /// [`FlowTable::prefetch`] if `wanted`, else a prefetch of the table's first lines (which
    /// stay cached when asked for often): no jump on `wanted`, which may be a coin toss per
    /// frame (a node's share of a 2-node cluster).
    #[inline(always)]
    pub fn prefetch_if(&self, hash: FlowHash, wanted: bool) {
        let h = std::hint::select_unpredictable(wanted, self.home(hash.0), 0);
        // Addresses only, never read here, so neither bounds-checked nor wrapped: a run from
        // the last line goes on at the first, which the second prefetch then misses (one
        // line in the table's).
        let home = self.slots.as_ptr().wrapping_add(h);
        let next = home.wrapping_add(SLOTS_PER_LINE);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint and never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(home.cast());
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(next.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (home, next);
    }

    /// The flow's entry, unless absent or idle past its timeout at `now`.
    #[inline]
    pub fn get(&self, hash: FlowHash, now: u64) -> Option<FlowEntry> {
        let i = self.find(hash.0)?;
        let slot = &self.slots[i];
        if self.is_expired(slot, ticks(now)) {
            return None;
        }
        Some(FlowEntry {
            bucket: Bucket(slot.bucket),
            state: FlowState::from_raw(slot.state())?,
            last_seen: u64::from(slot.last_seen) << TICK_SHIFT,
            backend: slot.backend(),
        })
    }

    /// Records the backend an appliance chose (or confirmed) for flow `hash` (1..=4095; see
    /// [`crate::config::MAX_BACKENDS`]), marked `checked` or not (see
    /// [`FlowTable::upsert_checked`]); returns whether the flow is in the table.
    pub fn set_backend(&mut self, hash: FlowHash, backend: u16, checked: bool) -> bool {
        debug_assert!(backend < 1 << (16 - BACKEND_SHIFT));
        let Some(i) = self.find(hash.0) else {
            return false;
        };
        let slot = &mut self.slots[i];
        let old = slot.backend();
        let mark = if checked { CHECKED } else { 0 };
        slot.meta = (slot.meta & STATE_MASK) | mark | (backend << BACKEND_SHIFT);
        self.per_backend[usize::from(old)] -= 1;
        self.per_backend[usize::from(slot.backend())] += 1;
        true
    }

    /// A packet of flow `hash` whose backend is marked checked ([`FlowTable::set_backend`]) and
    /// has not been unmarked since ([`FlowTable::clear_checked`]), if `takes` says the backend
    /// takes it: recorded as [`FlowTable::upsert`] records a known flow's, and the backend
    /// returned. Any other (not in the table, expired, without a backend or the mark, or
    /// `takes` false) changes nothing: `None`.
    ///
    /// The table only keeps the mark: what it means (appliance mode: the backend was found to
    /// be the flow's rule's under the rules in force) is its user's.
    #[inline(always)]
    pub fn upsert_checked(
        &mut self,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
        takes: impl FnOnce(u16) -> bool,
    ) -> Option<u16> {
        let now_t = ticks(now);
        let i = self.find(hash.0)?;
        let slot = &self.slots[i];
        if slot.meta & CHECKED == 0 || self.is_expired(slot, now_t) || !takes(slot.backend()) {
            return None;
        }
        self.step(i, false, proto, flags, now_t);
        Some(self.slots[i].backend())
    }

    /// Clears the checked marks of up to `budget` slots from slot `from` on: returns the slot to
    /// go on from, `None` once the last is cleared. Marks set meanwhile behind the cursor stay;
    /// an entry a deletion moves back loses its mark (it may move from ahead of the cursor to
    /// behind it).
    pub fn clear_checked(&mut self, from: usize, budget: usize) -> Option<usize> {
        let end = from.saturating_add(budget).min(self.slots.len());
        for slot in self.slots.get_mut(from..end).unwrap_or_default() {
            slot.meta &= !CHECKED;
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Records a packet of flow `hash` (IP protocol `proto`, in `bucket`) at `now`: creates the
    /// entry if needed, moves its TCP state with `flags` (ignored for other protocols),
    /// refreshes `last_seen`.
    ///
    /// An entry found expired starts over as a new flow. Never allocates; a full table evicts
    /// or leaves the new flow untracked (see the module doc's bounds and admissions).
    #[inline(always)]
    pub fn upsert(
        &mut self,
        hash: FlowHash,
        proto: u8,
        bucket: Bucket,
        flags: TcpFlags,
        now: u64,
    ) -> Upsert {
        let hash = hash.0;
        let now_t = ticks(now);
        let Some(i) = self.find(hash) else {
            return self.insert(hash, proto, bucket, flags, now_t);
        };
        let expired = self.is_expired(&self.slots[i], now_t);
        if expired {
            // The old flow ended; this packet starts a new one in the same slot.
            self.stats.expired += 1;
            self.stats.inserted += 1;
        }
        if expired {
            // A new flow chooses its backend anew (and is checked anew).
            let slot = &mut self.slots[i];
            self.per_backend[usize::from(slot.backend())] -= 1;
            self.per_backend[0] += 1;
            slot.meta &= STATE_MASK;
        }
        let state = self.step(i, expired, proto, flags, now_t);
        let slot = &self.slots[i];
        Upsert {
            state,
            is_new: expired,
            evicted: false,
            tracked: true,
            backend: slot.backend(),
            checked: slot.meta & CHECKED != 0,
        }
    }

    /// A packet of the flow in slot `i` (a flow that starts over in it if `fresh`, else in the
    /// slot's state before it) at tick `now_t`: moves its state and time; returns the new
    /// state.
    #[inline(always)]
    fn step(&mut self, i: usize, fresh: bool, proto: u8, flags: TcpFlags, now_t: u32) -> FlowState {
        let slot = &mut self.slots[i];
        // Most packets of a known flow keep its state: only the time changes.
        if let Some(state) = kept_state(slot.state(), proto, flags).filter(|_| !fresh) {
            slot.last_seen = now_t;
            return state;
        }
        let prev = if fresh {
            None
        } else {
            FlowState::from_raw(slot.state())
        };
        let state = FlowState::next(prev, proto, flags);
        let raw = raw_state(state, proto);
        if raw != slot.state() {
            // A known flow changes state in place: it stays tracked (a reused 4-tuple's SYN
            // may take the half-open count one past its share until the next insertion makes
            // room). Most packets change nothing but the time.
            self.half_open = self.half_open + usize::from(raw == STATE_SYN)
                - usize::from(slot.state() == STATE_SYN);
            slot.set_state(raw);
        }
        slot.last_seen = now_t;
        state
    }

    /// The new-flow half of [`FlowTable::upsert`], out of line: the packet path inlines only
    /// the lookup of a known flow.
    #[inline(never)]
    fn insert(
        &mut self,
        hash: u64,
        proto: u8,
        bucket: Bucket,
        flags: TcpFlags,
        now_t: u32,
    ) -> Upsert {
        let state = FlowState::next(None, proto, flags);
        let half_open = state == FlowState::SynSeen;
        let mut evicted = false;
        if half_open && (self.half_open >= self.half_open_cap || self.len >= self.capacity) {
            match self.make_room(hash, now_t, Victims::HalfOpen) {
                Room::Expired => {}
                Room::Evicted => evicted = true,
                Room::None => {
                    self.stats.untracked += 1;
                    // Its ACK may then take a settled entry's place.
                    self.doorkeeper.note(hash);
                    return Upsert::untracked(state);
                }
            }
        } else if self.len >= self.capacity {
            // An expired or half-open entry first; a settled one only for a flow seen before.
            match self.make_room(hash, now_t, Victims::Unsettled) {
                Room::Expired => {}
                Room::Evicted => evicted = true,
                Room::None if self.doorkeeper.seen_before(hash) => {
                    evicted = self.make_room(hash, now_t, Victims::Any) == Room::Evicted;
                }
                Room::None => {
                    self.stats.turned_away += 1;
                    return Upsert::untracked(state);
                }
            }
        }
        let mut i = self.home(hash);
        while !self.slots[i].is_empty() {
            i = self.wrap(i + 1);
        }
        self.slots[i] = Slot {
            hash,
            last_seen: now_t,
            bucket: bucket.0,
            meta: u16::from(raw_state(state, proto)),
        };
        self.len += 1;
        self.half_open += usize::from(half_open);
        self.per_bucket[bucket.index()] += 1;
        self.per_backend[0] += 1;
        self.stats.inserted += 1;
        Upsert {
            state,
            is_new: true,
            evicted,
            tracked: true,
            backend: 0,
            checked: false,
        }
    }

    /// Forgets every flow (counted as removed). Walks every slot: not for the packet path's
    /// every frame, only for rare events (a node found dead).
    pub fn clear(&mut self) {
        if self.len == 0 {
            return;
        }
        for slot in self.slots.iter_mut() {
            slot.meta = 0;
        }
        self.per_bucket.fill(0);
        self.per_backend.fill(0);
        self.stats.removed += self.len as u64;
        self.len = 0;
        self.half_open = 0;
    }

    /// Forgets the flows of every bucket `keep` refuses (counted as removed). Walks every
    /// slot, as [`FlowTable::clear`]: only for rare events (a node found dead).
    pub fn retain_buckets(&mut self, keep: impl Fn(Bucket) -> bool) {
        let mut i = 0;
        while self.len > 0 && i < self.slots.len() {
            let slot = self.slots[i];
            if !slot.is_empty() && !keep(Bucket(slot.bucket)) {
                // A later entry of the run may move into `i`: look at `i` again (one that moves
                // back across the wrap came from a slot already looked at, and was kept).
                self.delete_at(i);
                self.stats.removed += 1;
            } else {
                i += 1;
            }
        }
    }

    /// Forgets a flow; returns its entry if it was held (expired or not).
    pub fn remove(&mut self, hash: FlowHash) -> Option<FlowEntry> {
        let i = self.find(hash.0)?;
        let slot = self.slots[i];
        self.delete_at(i);
        self.stats.removed += 1;
        Some(FlowEntry {
            bucket: Bucket(slot.bucket),
            state: FlowState::from_raw(slot.state())?,
            last_seen: u64::from(slot.last_seen) << TICK_SHIFT,
            backend: slot.backend(),
        })
    }

    /// Sweeps at most `budget` slots, resuming where the last sweep stopped, and drops entries
    /// idle past their timeout at `now`. Returns how many were dropped. A sweep of
    /// `slot_count()` slots visits every entry at least once.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let now_t = ticks(now);
        let mut dropped = 0;
        for _ in 0..budget {
            let i = self.cursor;
            let slot = &self.slots[i];
            if !slot.is_empty() && self.is_expired(slot, now_t) {
                // Deletion shifts the next entry of the run into `i`: look at `i` again.
                self.delete_at(i);
                self.stats.expired += 1;
                dropped += 1;
            } else {
                self.cursor = self.wrap(i + 1);
            }
        }
        dropped
    }

    /// Number of slots (whole cache lines, more than `capacity`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The slot where `hash`'s probe run starts: the first slot of the cache line its low 32
    /// bits pick (see the module doc's layout).
    #[inline(always)]
    fn home(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.lines) >> 32) as usize * SLOTS_PER_LINE
    }

    /// Slot `i` (at most one line past the last) within the array: runs wrap to the first.
    #[inline(always)]
    fn wrap(&self, i: usize) -> usize {
        if i >= self.slots.len() {
            i - self.slots.len()
        } else {
            i
        }
    }

    /// How far slot `to` lies after slot `from` along a run.
    #[inline(always)]
    fn distance(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.slots.len() - from
        }
    }

    #[inline(always)]
    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = self.home(hash);
        loop {
            let slot = &self.slots[i];
            if slot.is_empty() {
                return None;
            }
            if slot.hash == hash {
                return Some(i);
            }
            i = self.wrap(i + 1);
        }
    }

    /// Whether an occupied slot's entry is idle past its timeout at tick `now_t`.
    #[inline]
    fn is_expired(&self, slot: &Slot, now_t: u32) -> bool {
        let idle = now_t.wrapping_sub(slot.last_seen);
        // A `now` before `last_seen` (a wrapped difference in the upper half) is not idleness.
        !slot.is_empty() && idle <= u32::MAX / 2 && idle > self.timeouts.of(slot.state())
    }

    /// Drops one entry among the first [`EVICTION_WINDOW`] entries of the probe run at
    /// `hash`'s home to make room, of those `victims` allows: an expired one, else the least
    /// recently seen half-open one, else (with [`Victims::Any`]) the least recently seen one.
    fn make_room(&mut self, hash: u64, now_t: u32, victims: Victims) -> Room {
        let mut i = self.home(hash);
        // (is half-open, idle ticks, slot): the best victim so far.
        let mut victim: Option<(bool, u32, usize)> = None;
        let mut seen = 0;
        // The table holds `capacity >= 1` entries, so this finds one within `slots` steps.
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !slot.is_empty() {
                let syn = slot.state() == STATE_SYN;
                let expired = self.is_expired(slot, now_t);
                let allowed = match victims {
                    Victims::HalfOpen => syn,
                    Victims::Unsettled => syn || expired,
                    Victims::Any => true,
                };
                if allowed && expired {
                    self.delete_at(i);
                    self.stats.expired += 1;
                    return Room::Expired;
                }
                let idle = now_t.wrapping_sub(slot.last_seen);
                if allowed && victim.is_none_or(|v| (syn, idle) > (v.0, v.1)) {
                    victim = Some((syn, idle, i));
                }
                seen += 1;
                if seen == EVICTION_WINDOW {
                    break;
                }
            }
            i = self.wrap(i + 1);
        }
        match victim {
            Some((syn, _, v)) => {
                self.delete_at(v);
                self.stats.evicted += 1;
                self.stats.evicted_half_open += u64::from(syn);
                Room::Evicted
            }
            None => Room::None,
        }
    }

    /// Empties slot `hole` and shifts the rest of its probe run back (no tombstones).
    fn delete_at(&mut self, mut hole: usize) {
        let bucket = self.slots[hole].bucket as usize;
        self.per_bucket[bucket] -= 1;
        self.per_backend[usize::from(self.slots[hole].backend())] -= 1;
        self.len -= 1;
        self.half_open -= usize::from(self.slots[hole].state() == STATE_SYN);
        let mut j = hole;
        loop {
            j = self.wrap(j + 1);
            let slot = self.slots[j];
            if slot.is_empty() {
                break;
            }
            let home = self.home(slot.hash);
            // `j` may move back to `hole` only if `hole` lies on its probe path home..=j.
            if self.distance(home, j) >= self.distance(hole, j) {
                // Unmarked as it moves: a clearing of the marks under way
                // ([`FlowTable::clear_checked`]) may have passed `hole` and not `j` (one full
                // decision marks it again).
                self.slots[hole] = Slot {
                    meta: slot.meta & !CHECKED,
                    ..slot
                };
                hole = j;
            }
        }
        self.slots[hole].meta = 0;
    }
}

/// The entries [`FlowTable::make_room`] may drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victims {
    /// Half-open ones (for a new half-open flow).
    HalfOpen,
    /// Expired or half-open ones (for another new flow, seen once).
    Unsettled,
    /// Any (for a new flow seen before).
    Any,
}

/// What [`FlowTable::make_room`] freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// An expired entry.
    Expired,
    /// A live entry.
    Evicted,
    /// Nothing: no candidate in the window.
    None,
}

impl fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("slots", &self.slots.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    const KEY: &[u8; 16] = b"flow-table-key!!";
    const SEC: u64 = 1_000_000_000;

    /// A test flow: its fingerprint (from a SipHash of `n`, standing in for the bucket hash)
    /// and protocol.
    #[derive(Debug, Clone, Copy)]
    struct Flow {
        hash: FlowHash,
        proto: u8,
    }

    fn flow(n: u32, proto: u8) -> Flow {
        let (k0, k1) = siphasher::sip::SipHasher13::new_with_key(KEY).keys();
        let key_hash = super::super::siphash::sip13(k0, k1, &n.to_le_bytes());
        Flow {
            hash: FlowHash::new(
                key_hash,
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                (n % 50_000) as u16 + 1024,
                80,
                proto,
            ),
            proto,
        }
    }

    impl FlowTable {
        fn up(&mut self, f: &Flow, bucket: Bucket, flags: TcpFlags, now: u64) -> Upsert {
            self.upsert(f.hash, f.proto, bucket, flags, now)
        }
        fn g(&self, f: &Flow, now: u64) -> Option<FlowEntry> {
            self.get(f.hash, now)
        }
        fn rm(&mut self, f: &Flow) -> Option<FlowEntry> {
            self.remove(f.hash)
        }
    }

    /// [`backend_pick`]'s pinned values (see `the_backend_pick_keeps_its_formula`).
    const PICK_V4: u64 = 13_776_507_210_625_336_178;
    const PICK_V6: u64 = 13_662_763_297_628_489_416;

    fn table(capacity: usize) -> FlowTable {
        FlowTable::new(capacity, FlowTimeouts::default())
    }

    /// Retaining some buckets forgets exactly the others' flows, full runs and the wrap
    /// included.
    #[test]
    fn retain_buckets_forgets_exactly_the_others() {
        let mut t = table(2000);
        let flows: Vec<Flow> = (0..2000).map(|n| flow(n, 17)).collect();
        for (i, f) in flows.iter().enumerate() {
            t.up(f, Bucket((i % 7) as u16), TcpFlags::default(), SEC);
        }
        assert_eq!(t.len(), 2000);
        let before = t.len();
        t.retain_buckets(|b| b.0 % 7 != 3);
        check(&t);
        for (i, f) in flows.iter().enumerate() {
            let held = t.g(f, SEC).is_some();
            assert_eq!(held, i % 7 != 3, "flow {i}");
        }
        assert_eq!(t.count_in_bucket(Bucket(3)), 0);
        assert_eq!(t.len(), before - (0..2000).filter(|i| i % 7 == 3).count());
    }

    /// Checks every structural invariant by brute force.
    fn check(t: &FlowTable) {
        let occupied: Vec<&Slot> = t.slots.iter().filter(|s| !s.is_empty()).collect();
        assert_eq!(occupied.len(), t.len);
        assert!(t.len <= t.capacity);
        let mut per_bucket = vec![0u32; BUCKETS];
        for s in &occupied {
            per_bucket[usize::from(s.bucket)] += 1;
            assert!(t.find(s.hash).is_some(), "{:x} unreachable", s.hash);
        }
        assert!(
            per_bucket[..] == t.per_bucket[..],
            "per-bucket counts drifted"
        );
        let mut per_backend = vec![0u32; BACKEND_IDS];
        for s in &occupied {
            per_backend[usize::from(s.backend())] += 1;
        }
        assert!(
            per_backend[..] == t.per_backend[..],
            "per-backend counts drifted"
        );
        let st = t.stats;
        assert_eq!(
            st.inserted,
            t.len as u64 + st.evicted + st.expired + st.removed
        );
        let syn = occupied.iter().filter(|s| s.state() == STATE_SYN).count();
        assert_eq!(syn, t.half_open, "half-open count drifted");
    }

    /// A marked backend is the known flow's shortcut: `upsert_checked` records the packet as
    /// `upsert` would and names the backend, for a marked live flow only, and changes nothing
    /// otherwise; marks are cleared slot range by slot range, and with a flow that ends.
    #[test]
    fn a_marked_backend_is_found_and_recorded_without_a_second_lookup() {
        let mut t = table(100);
        let (f, b) = (flow(1, TCP), Bucket(7));
        let any = |_| true;
        assert_eq!(t.upsert_checked(f.hash, TCP, TcpFlags::ACK, SEC, any), None);
        assert_eq!(t.len(), 0, "not inserted");
        t.up(&f, b, TcpFlags::SYN, SEC);
        t.set_backend(f.hash, 5, false);
        assert_eq!(
            t.upsert_checked(f.hash, TCP, TcpFlags::ACK, 2 * SEC, any),
            None
        );
        let e = t.g(&f, 2 * SEC).unwrap();
        let at_syn = SEC >> TICK_SHIFT << TICK_SHIFT;
        assert_eq!(
            (e.state, e.last_seen),
            (FlowState::SynSeen, at_syn),
            "unmarked: untouched"
        );
        let u = t.up(&f, b, TcpFlags::ACK, 2 * SEC);
        assert!(!u.checked);
        // Marked: the packet is recorded as `upsert` records it.
        t.set_backend(f.hash, 5, true);
        assert!(t.up(&f, b, TcpFlags::ACK, 2 * SEC).checked);
        let mut other = table(100);
        other.up(&f, b, TcpFlags::SYN, SEC);
        other.up(&f, b, TcpFlags::ACK, 2 * SEC);
        for (flags, at) in [(TcpFlags::ACK, 3), (TcpFlags::FIN, 4), (TcpFlags::ACK, 5)] {
            assert_eq!(t.upsert_checked(f.hash, TCP, flags, at * SEC, any), Some(5));
            other.up(&f, b, flags, at * SEC);
            assert_eq!(
                t.g(&f, at * SEC).map(|e| (e.state, e.last_seen)),
                other.g(&f, at * SEC).map(|e| (e.state, e.last_seen))
            );
        }
        assert_eq!(t.g(&f, 5 * SEC).unwrap().state, FlowState::Closing);
        // The backend refused: nothing recorded.
        assert_eq!(
            t.upsert_checked(f.hash, TCP, TcpFlags::RST, 6 * SEC, |id| id != 5),
            None
        );
        assert_eq!(
            t.g(&f, 6 * SEC).unwrap().last_seen,
            ((5 * SEC) >> TICK_SHIFT) << TICK_SHIFT
        );
        // Expired: nothing, and the flow that starts over in its slot is unmarked.
        let late = 1000 * SEC;
        assert_eq!(
            t.upsert_checked(f.hash, TCP, TcpFlags::ACK, late, any),
            None
        );
        let u = t.up(&f, b, TcpFlags::SYN, late);
        assert_eq!((u.is_new, u.backend, u.checked), (true, 0, false));
        check(&t);
        // Clearing, a range at a time: marks set behind the cursor stay.
        let mut t = table(1000);
        let flows: Vec<Flow> = (0..1000).map(|n| flow(n, UDP)).collect();
        for f in &flows {
            t.up(f, b, TcpFlags::NONE, SEC);
            t.set_backend(f.hash, 2, true);
        }
        let slots = t.slot_count();
        let (mut at, mut calls) = (Some(0), 0);
        while let Some(from) = at {
            at = t.clear_checked(from, 100);
            calls += 1;
            if calls == 3 {
                t.set_backend(flows[0].hash, 2, true);
            }
        }
        assert_eq!(calls, slots.div_ceil(100));
        let marked: Vec<usize> = (0..1000)
            .filter(|&i| {
                t.upsert_checked(flows[i].hash, UDP, TcpFlags::NONE, SEC, any)
                    .is_some()
            })
            .collect();
        let first = t.find(flows[0].hash.0).unwrap();
        assert_eq!(marked, if first < 300 { vec![0] } else { vec![] });
        check(&t);
    }

    #[test]
    fn backend_is_kept_with_the_flow_and_forgotten_with_it() {
        let mut t = table(100);
        let (f, b) = (flow(1, TCP), Bucket(7));
        assert!(!t.set_backend(f.hash, 9, false), "not in the table yet");
        assert_eq!(t.up(&f, b, TcpFlags::SYN, SEC).backend, 0);
        assert!(t.set_backend(f.hash, 4095, false));
        // State changes keep it; the state is unchanged by it.
        let u = t.up(&f, b, TcpFlags::ACK, 2 * SEC);
        assert_eq!((u.state, u.backend), (FlowState::Established, 4095));
        assert_eq!(t.g(&f, 2 * SEC).map(|e| e.backend), Some(4095));
        // UDP keeps its own timeout next to a backend.
        let udp = flow(2, UDP);
        t.up(&udp, b, TcpFlags::NONE, SEC);
        assert!(t.set_backend(udp.hash, 3, false));
        assert_eq!(t.g(&udp, 20 * SEC).map(|e| e.backend), Some(3));
        assert_eq!(t.g(&udp, 40 * SEC), None, "UDP's 30 s timeout");
        // A flow that starts over after its timeout chooses again.
        let u = t.up(&udp, b, TcpFlags::NONE, 40 * SEC);
        assert_eq!((u.is_new, u.backend), (true, 0));
        assert_eq!(t.rm(&f).map(|e| e.backend), Some(4095));
        check(&t);
    }

    #[test]
    fn flows_are_counted_per_backend() {
        let mut t = table(100);
        let b = Bucket(7);
        let flows: Vec<Flow> = (0..10).map(|n| flow(n, UDP)).collect();
        for f in &flows {
            t.up(f, b, TcpFlags::NONE, SEC);
        }
        assert_eq!(t.count_for_backend(0), 10);
        for (i, f) in flows.iter().enumerate() {
            t.set_backend(f.hash, 1 + (i % 2) as u16, false);
        }
        assert_eq!((t.count_for_backend(1), t.count_for_backend(2)), (5, 5));
        // Moved, removed, expired and started over, swept: each leaves its backend's count.
        t.set_backend(flows[0].hash, 2, false);
        assert_eq!((t.count_for_backend(1), t.count_for_backend(2)), (4, 6));
        t.rm(&flows[1]);
        assert_eq!(t.count_for_backend(2), 5);
        t.up(&flows[2], b, TcpFlags::NONE, 40 * SEC);
        assert_eq!((t.count_for_backend(0), t.count_for_backend(1)), (1, 3));
        check(&t);
        t.expire(40 * SEC, t.slot_count());
        assert_eq!(t.count_for_backend(1) + t.count_for_backend(2), 0);
        assert_eq!(t.count_for_backend(0), 1);
        check(&t);
        t.clear();
        assert_eq!(t.count_for_backend(0), 0);
        assert_eq!(t.count_for_backend(4096), 0, "an id beyond the table's");
        check(&t);
    }

    #[test]
    fn layout() {
        let slot = std::mem::size_of::<Slot>();
        println!(
            "flow table: slot {slot} bytes, {:.1} bytes per flow at full load",
            slot as f64 * table(3 << 20).slot_count() as f64 / (3 << 20) as f64
        );
        assert_eq!(slot, SLOT_BYTES);
        assert_eq!(std::mem::align_of::<Slot>(), 16);
        assert_eq!(table(3).slot_count(), 8);
        assert_eq!(table(1000).slot_count(), 1500);
        // 24 bytes of slots per flow at every size, where powers of two cost up to twice that.
        for capacity in [1_000, 1_000_000, 1 << 20, (1 << 20) + 1, 10_000_000] {
            let slots = FlowTable::slots_for(capacity) * SLOT_BYTES;
            let per_flow = slots as f64 / capacity as f64;
            assert!(per_flow <= 24.1, "{capacity} flows: {per_flow} bytes each");
        }
        assert_eq!(table(0).capacity(), 1);
    }

    #[test]
    fn fingerprints_separate_ports_protocols_and_destinations() {
        let mut seen = std::collections::HashSet::new();
        let dsts = [
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            "2001:2::1".parse().unwrap(),
            "2001:2::2".parse().unwrap(),
        ];
        // One client key (the same keyed hash), many flows: none may merge.
        for dst in dsts {
            for sport in 0..200u16 {
                for dport in [53u16, 80, 443] {
                    for proto in [TCP, UDP] {
                        let h = FlowHash::new(0x1234_5678_9abc_def0, dst, sport, dport, proto);
                        assert!(seen.insert(h), "{dst} {sport} {dport} {proto}");
                    }
                }
            }
        }
        // The home slot follows every input bit, the key hash's included.
        let a = FlowHash::new(1, dsts[0], 1, 80, TCP);
        let b = FlowHash::new(2, dsts[0], 1, 80, TCP);
        assert_ne!(a.0 & 0xffff, b.0 & 0xffff);
        // Destinations whose difference the ports would cancel in a fingerprint without the
        // keyed bijection (the first octet of an IPv4 address against the low byte of the
        // port, as in `backend_pick`): apart.
        let (v4a, v4b) = (dsts[0], IpAddr::V4(Ipv4Addr::new(199, 18, 0, 1)));
        let (v6a, v6b): (IpAddr, IpAddr) = (
            "2001:2::1".parse().unwrap(),
            "2001:2::100:1".parse().unwrap(),
        );
        for key_hash in [1u64, 0x1234_5678_9abc_def0, u64::MAX] {
            for (x, y) in [(v4a, v4b), (v6a, v6b)] {
                let pick = |dst, dport| backend_pick(key_hash, dst, 7, dport, TCP);
                assert_eq!(pick(x, 80), pick(y, 81), "{x} and {y} collide in the pick");
                assert_ne!(
                    FlowHash::new(key_hash, x, 7, 80, TCP),
                    FlowHash::new(key_hash, y, 7, 81, TCP),
                    "{x} {y}"
                );
            }
        }
    }

    /// The pick of a new flow's backend is the same in every release (a rolling upgrade mixes
    /// them, and a flow's next owner must choose its backend again): pinned.
    #[test]
    fn the_backend_pick_keeps_its_formula() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let v6: IpAddr = "2001:2::1".parse().unwrap();
        assert_eq!(
            backend_pick(0x1234_5678_9abc_def0, v4, 40000, 80, TCP),
            PICK_V4
        );
        assert_eq!(
            backend_pick(0x1234_5678_9abc_def0, v6, 40000, 443, UDP),
            PICK_V6
        );
    }

    /// A clearing of the marks spread over many calls, entries deleted meanwhile (each moving
    /// the rest of its probe run back, possibly from ahead of the cursor to behind it): once it
    /// is done, no entry of before keeps its mark.
    #[test]
    fn a_clearing_leaves_no_mark_behind_entries_that_move() {
        let mut t = table(1000);
        let flows: Vec<Flow> = (0..1000).map(|n| flow(n, UDP)).collect();
        for f in &flows {
            t.up(f, Bucket(1), TcpFlags::NONE, SEC);
            t.set_backend(f.hash, 2, true);
        }
        let mut gone = vec![false; flows.len()];
        let (mut at, mut moved) = (Some(0), 0);
        while let Some(from) = at {
            // An odd budget: cursors fall inside cache lines too (an entry at its line's
            // first slot, its home, never moves back).
            at = t.clear_checked(from, 41);
            let Some(cursor) = at else { break };
            // Between two calls, delete an entry just behind the cursor: the entry at the
            // cursor may move back behind it (and is not deleted after it).
            let behind = (0..flows.len()).find(|&i| {
                !gone[i]
                    && t.find(flows[i].hash.0)
                        .is_some_and(|s| s + 3 >= cursor && s < cursor)
            });
            if let Some(i) = behind {
                let ahead = t.slots[cursor];
                t.rm(&flows[i]);
                gone[i] = true;
                moved += usize::from(!ahead.is_empty() && t.slots[cursor].hash != ahead.hash);
            }
        }
        assert!(moved > 10, "{moved} entries moved behind the cursor");
        check(&t);
        for (i, f) in flows.iter().enumerate().filter(|(i, _)| !gone[*i]) {
            let marked = t.upsert_checked(f.hash, UDP, TcpFlags::NONE, SEC, |_| true);
            assert_eq!(marked, None, "flow {i} kept its mark through the clearing");
        }
    }

    #[test]
    fn slots_pack_four_to_a_cache_line() {
        let t = table(1000);
        assert_eq!(64 / std::mem::size_of::<Slot>(), 4);
        assert_eq!(t.slots.as_ptr() as usize % 64, 0);
        assert_eq!(
            FlowTable::footprint(10_000_000),
            15_000_000 * SLOT_BYTES + BUCKETS * 4 + 4096 * 4 + 65536 * 8
        );
        assert_eq!(FlowTable::slots_for(10_000_000), 15_000_000);
        assert!((1..5000).all(|c| FlowTable::slots_for(c).is_multiple_of(SLOTS_PER_LINE)));
    }

    #[test]
    fn a_probe_run_starts_at_its_lines_first_slot() {
        let mut t = table(1000);
        let line = 37usize;
        // Five fingerprints whose low bits pick one line (of 375): the first four fill it from
        // its start, the fifth goes to the next.
        let first = ((line as u64) << 32).div_ceil(375);
        let hashes: Vec<u64> = [3u64, 2, 1, 0, 2]
            .iter()
            .enumerate()
            .map(|(n, &j)| ((n as u64 + 1) << 32) | (first + j))
            .collect();
        assert!(hashes.iter().all(|&h| t.home(h) == line * 4));
        for &h in &hashes {
            t.upsert(FlowHash(h), TCP, Bucket(1), TcpFlags::SYN, 0);
        }
        let at: Vec<usize> = hashes.iter().map(|&h| t.find(h).unwrap()).collect();
        assert_eq!(
            at,
            [
                line * 4,
                line * 4 + 1,
                line * 4 + 2,
                line * 4 + 3,
                line * 4 + 4
            ]
        );
        // Deleting the first shifts the run back: the fifth moves home, into the line.
        t.remove(FlowHash(hashes[0]));
        assert_eq!(t.find(hashes[4]), Some(line * 4 + 3));
        assert!(hashes[1..].iter().all(|&h| t.find(h).is_some()));
    }

    #[test]
    fn large_tables_start_on_huge_page_boundaries() {
        let t = table(150_000);
        assert_eq!(t.slot_count(), 225_000);
        assert_eq!(t.slots.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(t.slots.iter().all(Slot::is_empty));
        let small = table(10);
        assert_eq!(small.slots.len(), 16);
        assert!(small.slots.iter().all(Slot::is_empty));
    }

    #[test]
    fn prefetch_changes_nothing() {
        let mut t = table(16);
        let f = flow(1, TCP);
        t.prefetch(f.hash);
        assert!(t.is_empty());
        t.up(&f, Bucket(3), TcpFlags::SYN, 0);
        t.prefetch(f.hash);
        t.prefetch(flow(2, UDP).hash);
        assert_eq!(t.len(), 1);
        check(&t);
    }

    #[test]
    fn times_are_kept_in_ticks() {
        let mut t = table(16);
        let f = flow(1, UDP);
        let at = 5 * SEC + 123_456;
        t.up(&f, Bucket(1), TcpFlags::NONE, at);
        let e = t.g(&f, at).unwrap();
        // Rounded down to a tick of 2^24 ns.
        assert_eq!(e.last_seen, at >> 24 << 24);
        assert!(at - e.last_seen < 1 << 24);
        // UDP idles 30 s, to within a tick.
        assert!(t.g(&f, at + 30 * SEC - (1 << 24)).is_some());
        assert!(t.g(&f, at + 30 * SEC + 2 * (1 << 24)).is_none());
        // A `now` before the entry's (another clock) is not idleness.
        assert!(t.g(&f, at - SEC).is_some());
    }

    #[test]
    fn ticks_wrap_without_forgetting_or_reviving() {
        // The 32-bit tick counter wraps at 2^56 ns (~2.3 years).
        let wrap = 1u64 << 56;
        let mut t = table(16);
        let f = flow(1, TCP);
        let before = wrap - 10 * SEC;
        t.up(&f, Bucket(1), TcpFlags::ACK, before);
        assert_eq!(
            t.g(&f, wrap + 10 * SEC).map(|e| e.state),
            Some(FlowState::Established)
        );
        assert!(t.g(&f, before + 301 * SEC).is_none());
        assert_eq!(t.expire(wrap + 10 * SEC, t.slot_count()), 0);
        assert_eq!(t.expire(before + 301 * SEC, t.slot_count()), 1);
        check(&t);
    }

    #[test]
    fn tcp_lifecycle() {
        let mut t = table(16);
        let f = flow(1, TCP);
        let b = Bucket(7);
        let u = t.up(&f, b, TcpFlags::SYN, 0);
        assert_eq!(
            (u.state, u.is_new, u.evicted),
            (FlowState::SynSeen, true, false)
        );
        assert_eq!(t.up(&f, b, TcpFlags::SYN, SEC).state, FlowState::SynSeen);
        let u = t.up(&f, b, TcpFlags::ACK, 2 * SEC);
        assert_eq!((u.state, u.is_new), (FlowState::Established, false));
        // An established flow idles up to 300 s.
        assert!(t.g(&f, 2 * SEC + 300 * SEC).is_some());
        assert!(t.g(&f, 2 * SEC + 301 * SEC).is_none());
        let fin = TcpFlags::FIN.union(TcpFlags::ACK);
        assert_eq!(t.up(&f, b, fin, 3 * SEC).state, FlowState::Closing);
        assert_eq!(
            t.up(&f, b, TcpFlags::ACK, 4 * SEC).state,
            FlowState::Closing
        );
        // Closing idles 30 s only.
        assert!(t.g(&f, 35 * SEC).is_none());
        assert_eq!(t.count_in_bucket(b), 1);
        assert_eq!(t.expire(35 * SEC, t.slot_count()), 1);
        assert_eq!(t.count_in_bucket(b), 0);
        check(&t);
    }

    #[test]
    fn state_transitions() {
        use FlowState::*;
        let next = |p, f| FlowState::next(p, TCP, f);
        assert_eq!(next(None, TcpFlags::ACK), Established);
        assert_eq!(next(None, TcpFlags::RST), Closing);
        assert_eq!(next(Some(Closing), TcpFlags::SYN), SynSeen);
        assert_eq!(next(Some(Established), TcpFlags::SYN), Established);
        assert_eq!(next(Some(SynSeen), TcpFlags::ACK), Established);
        assert_eq!(FlowState::next(None, UDP, TcpFlags::FIN), Open);
        assert!(TcpFlags::SYN.is_initial_syn());
        assert!(!TcpFlags::SYN.union(TcpFlags::ACK).is_initial_syn());
    }

    #[test]
    fn udp_times_out_and_restarts() {
        let mut t = table(4);
        let f = flow(9, UDP);
        assert!(t.up(&f, Bucket(1), TcpFlags::NONE, 0).is_new);
        assert!(!t.up(&f, Bucket(1), TcpFlags::NONE, 30 * SEC).is_new);
        let u = t.up(&f, Bucket(1), TcpFlags::NONE, 61 * SEC);
        assert_eq!((u.state, u.is_new), (FlowState::Open, true));
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().expired, 1);
        check(&t);
    }

    #[test]
    fn full_table_evicts_expired_before_live() {
        let mut t = table(8);
        for n in 0..8 {
            t.up(&flow(n, TCP), Bucket(n as u16), TcpFlags::SYN, 0);
            // Half-open flows take at most half the table: complete the handshakes.
            if n != 3 {
                t.up(&flow(n, TCP), Bucket(n as u16), TcpFlags::ACK, 0);
            }
        }
        // Keep all but flow 3 fresh; flow 3's SYN state times out.
        for n in (0..8).filter(|&n| n != 3) {
            t.up(&flow(n, TCP), Bucket(n as u16), TcpFlags::ACK, 29 * SEC);
        }
        t.up(&flow(100, TCP), Bucket(100), TcpFlags::SYN, 31 * SEC);
        check(&t);
        // The window covers all 8 entries here, so the expired one must be the victim.
        assert!(t.g(&flow(3, TCP), 31 * SEC).is_none());
        assert_eq!((t.stats().evicted, t.stats().expired), (0, 1));
        // Now nothing is expired: a half-open newcomer may only replace a half-open entry
        // (flow 100, the only one).
        let u = t.up(&flow(101, TCP), Bucket(101), TcpFlags::SYN, 32 * SEC);
        assert!(u.evicted && u.tracked);
        assert!(t.g(&flow(100, TCP), 32 * SEC).is_none());
        assert_eq!(t.stats().evicted, 1);
        // An established newcomer takes a half-open entry first, then, from its second packet
        // on (its first is turned away), the least recently seen.
        let u = t.up(&flow(102, TCP), Bucket(102), TcpFlags::ACK, 33 * SEC);
        assert!(u.evicted && t.g(&flow(101, TCP), 33 * SEC).is_none());
        assert_eq!(t.half_open(), 0);
        let u = t.up(&flow(103, TCP), Bucket(103), TcpFlags::ACK, 34 * SEC);
        assert!(!u.tracked && !u.evicted);
        assert_eq!(t.stats().turned_away, 1);
        let u = t.up(&flow(103, TCP), Bucket(103), TcpFlags::ACK, 34 * SEC);
        assert!(u.evicted && u.tracked);
        assert_eq!(t.stats().evicted, 3);
        assert_eq!(t.len(), 8);
        check(&t);
    }

    #[test]
    fn a_syn_flood_never_evicts_established_flows() {
        let capacity = 1000;
        let mut t = table(capacity);
        // 600 established connections.
        for n in 0..600 {
            t.up(&flow(n, TCP), Bucket(n as u16), TcpFlags::SYN, 0);
            t.up(&flow(n, TCP), Bucket(n as u16), TcpFlags::ACK, 0);
        }
        // A million SYNs from spoofed sources, none ever answered, over 20 s.
        for n in 0..1_000_000u32 {
            let now = u64::from(n) * 20_000;
            let u = t.up(&flow(10_000 + n, TCP), Bucket(n as u16), TcpFlags::SYN, now);
            assert_eq!(u.state, FlowState::SynSeen);
        }
        let now = 20 * SEC;
        assert!(
            (0..600).all(|n| t.g(&flow(n, TCP), now).is_some()),
            "established kept"
        );
        let st = t.stats();
        assert!(t.half_open() <= capacity / 2, "{}", t.half_open());
        assert!(st.untracked > 0 && st.evicted > 0, "{st:?}");
        assert_eq!(
            st.evicted, st.evicted_half_open,
            "only half-open entries evicted"
        );
        assert_eq!(
            st.untracked + st.evicted + t.half_open() as u64 + st.expired,
            1_000_000,
            "every SYN tracked (and maybe replaced later) or counted as untracked"
        );
        check(&t);
        // A real client's handshake still completes: its ACK is tracked as established even
        // if its SYN was not.
        let u = t.up(&flow(5_000_000, TCP), Bucket(7), TcpFlags::ACK, now);
        assert!(u.tracked && u.state == FlowState::Established);
        check(&t);
    }

    /// A full table of settled flows (established, closing, UDP) under a flood of spoofed
    /// one-packet flows of every other kind (ACKs and FINs picked up mid-stream, datagrams):
    /// nothing settled is evicted, the flood is turned away, and a real new flow is tracked
    /// from its second packet on.
    #[test]
    fn a_flood_of_one_packet_flows_never_evicts_settled_ones() {
        let capacity = 1000;
        let mut t = table(capacity);
        // Flow n: an ACK, a FIN (with `fin`) or a datagram, by n mod 3.
        let packet = |n: u32, fin: TcpFlags| match n % 3 {
            0 => (TCP, TcpFlags::ACK),
            1 => (TCP, fin),
            _ => (UDP, TcpFlags::default()),
        };
        for n in 0..capacity as u32 {
            let (proto, flags) = packet(n, TcpFlags::FIN);
            t.up(&flow(n, proto), Bucket(n as u16), flags, 0);
        }
        assert_eq!(t.len(), capacity);
        // 300 000 spoofed packets, each of its own flow, over 3 s.
        for n in 0..300_000u32 {
            let now = u64::from(n) * 10_000;
            let (proto, flags) = packet(n, TcpFlags(TcpFlags::FIN.0 | TcpFlags::ACK.0));
            t.up(&flow(10_000 + n, proto), Bucket(n as u16), flags, now);
        }
        let now = 3 * SEC;
        let st = t.stats();
        assert_eq!((st.turned_away, st.evicted), (300_000, 0), "{st:?}");
        assert!(
            (0..capacity as u32).all(|n| t.g(&flow(n, packet(n, TcpFlags::FIN).0), now).is_some()),
            "settled flows kept"
        );
        check(&t);
        // A real flow: its first packet is turned away, its second tracked.
        let real = flow(9_000_000, TCP);
        let u = t.up(&real, Bucket(9), TcpFlags::ACK, now);
        assert!(!u.tracked);
        let u = t.up(&real, Bucket(9), TcpFlags::ACK, now);
        assert!(u.tracked && u.evicted && u.state == FlowState::Established);
        // A real connection: its SYN finds no room (no half-open entry to replace), its
        // handshake's ACK is tracked.
        let conn = flow(9_000_001, TCP);
        let u = t.up(&conn, Bucket(9), TcpFlags::SYN, now);
        assert!(!u.tracked);
        let u = t.up(&conn, Bucket(9), TcpFlags::ACK, now);
        assert!(u.tracked && u.state == FlowState::Established);
        check(&t);
    }

    #[test]
    fn sweep_budget_resumes() {
        let mut t = table(1000);
        for n in 0..1000 {
            t.up(&flow(n, UDP), Bucket((n % 10) as u16), TcpFlags::NONE, 0);
        }
        let mut dropped = 0;
        let mut calls = 0;
        while !t.is_empty() {
            dropped += t.expire(31 * SEC, 100);
            calls += 1;
            check(&t);
        }
        assert_eq!(dropped, 1000);
        // Each call visits 100 slots or drops entries; 2048 slots + 1000 drops bound it.
        assert!(calls <= (2048 + 1000) / 100 + 1);
        assert_eq!(t.stats().expired, 1000);
    }

    /// Timing sanity print, not an assertion: `cargo test --release -- --nocapture flow_table_speed`.
    #[test]
    fn flow_table_speed() {
        let sizes: &[usize] = if cfg!(debug_assertions) {
            &[10_000]
        } else {
            &[10_000, 1_000_000]
        };
        for &n in sizes {
            let mut t = table(n);
            let ids: Vec<Flow> = (0..n as u32).map(|i| flow(i, TCP)).collect();
            let start = std::time::Instant::now();
            for (i, id) in ids.iter().enumerate() {
                t.up(id, Bucket(i as u16), TcpFlags::SYN, 1);
            }
            let insert = start.elapsed().as_nanos() as f64 / n as f64;
            let start = std::time::Instant::now();
            let mut hits = 0;
            for _ in 0..10_000_000 / n {
                for id in &ids {
                    hits += usize::from(t.g(std::hint::black_box(id), 2).is_some());
                }
            }
            let lookup = start.elapsed().as_nanos() as f64 / hits as f64;
            println!(
                "flow table at {n} flows: insert {insert:.1} ns, lookup {lookup:.1} ns ({hits} hits)"
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(u32, u8),
        Remove(u32),
        Expire(usize),
        Advance(u64),
    }

    fn ops(keys: u32) -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            6 => (0..keys, prop_oneof![Just(0u8), Just(0x02), Just(0x10), Just(0x01), Just(0x04)])
                .prop_map(|(k, f)| Op::Upsert(k, f)),
            1 => (0..keys).prop_map(Op::Remove),
            1 => (0usize..64).prop_map(Op::Expire),
            1 => (0u64..40 * SEC).prop_map(Op::Advance),
        ];
        proptest::collection::vec(op, 1..400)
    }

    fn proto_of(k: u32) -> u8 {
        match k % 3 {
            0 => UDP,
            _ => TCP,
        }
    }

    /// A packet `kept_state` lets through keeps its entry's state: the full step gives it back.
    #[test]
    fn kept_states_are_what_the_full_step_keeps() {
        let mut kept = 0;
        for raw in [
            STATE_OPEN,
            STATE_SYN,
            STATE_ESTABLISHED,
            STATE_CLOSING,
            STATE_OPEN_UDP,
        ] {
            for proto in [TCP, UDP, 1, 47] {
                for flags in 0..=u8::MAX {
                    let flags = TcpFlags(flags);
                    let prev = FlowState::from_raw(raw);
                    let next = FlowState::next(prev, proto, flags);
                    match kept_state(raw, proto, flags) {
                        Some(state) => {
                            kept += 1;
                            assert_eq!(state, next, "{raw} {proto} {flags:?}");
                            assert_eq!(raw_state(next, proto), raw, "{raw} {proto} {flags:?}");
                        }
                        // Any other established segment, or a UDP flow's: a change of state.
                        None if (raw, proto) == (STATE_ESTABLISHED, TCP) => {
                            assert_ne!(raw_state(next, proto), raw);
                        }
                        None => {}
                    }
                }
            }
        }
        // Established TCP without FIN or RST (64 flag sets), open UDP and other (256 each).
        assert_eq!(kept, 64 + 256 + 2 * 256);
    }

    proptest! {
        /// Every implementation this CPU runs fingerprints eight flows as one at a time does.
        #[test]
        fn fingerprints_of_eight_are_fingerprints_of_one(
            hashes in proptest::array::uniform8(any::<u64>()),
            dsts in proptest::array::uniform8(any::<u128>()),
            ports in proptest::array::uniform8((any::<u16>(), any::<u16>(), any::<u8>())),
            v6 in proptest::array::uniform8(any::<bool>()),
        ) {
            let rests: [FlowRest; 8] = std::array::from_fn(|i| {
                let dst = if v6[i] {
                    IpAddr::from(dsts[i].to_be_bytes())
                } else {
                    IpAddr::from((dsts[i] as u32).to_be_bytes())
                };
                FlowRest::new(dst, ports[i].0, ports[i].1, ports[i].2)
            });
            let one: Vec<FlowHash> =
                (0..8).map(|i| FlowHash::from_parts(hashes[i], &rests[i])).collect();
            for lanes in Lanes::available() {
                let mut hasher = BucketHasher::new(b"fingerprints");
                hasher.set_lanes(lanes);
                prop_assert_eq!(hasher.lanes(), lanes);
                prop_assert_eq!(&FlowHash::from_parts8(&hashes, &rests, &hasher)[..], &one[..]);
            }
        }

        #[test]
        fn never_exceeds_capacity_and_counts_evictions(
            capacity in 1usize..40,
            ops in ops(120),
        ) {
            let mut t = table(capacity);
            let mut now = 0;
            // Keys ever left untracked (turned away, or a SYN without room): only they may evict
            // a settled flow with a packet other than a SYN (a flood's one-packet flows never).
            let mut noted = std::collections::HashSet::new();
            for op in ops {
                match op {
                    Op::Upsert(k, f) => {
                        let full = t.len() == t.capacity();
                        let had = t.find(flow(k, proto_of(k)).hash.0).is_some();
                        let before = t.stats();
                        let settled = |t: &FlowTable| {
                            t.slots.iter().filter(|s| !s.is_empty() && s.state() != STATE_SYN).count()
                        };
                        let settled_before = settled(&t);
                        let u = t.up(&flow(k, proto_of(k)), Bucket(k as u16), TcpFlags(f), now);
                        let after = t.stats();
                        prop_assert_eq!(u.tracked, t.g(&flow(k, proto_of(k)), now).is_some());
                        prop_assert_eq!(
                            !u.tracked,
                            after.untracked + after.turned_away
                                == before.untracked + before.turned_away + 1
                        );
                        prop_assert_eq!(u.evicted, after.evicted == before.evicted + 1);
                        if u.evicted {
                            prop_assert!(!had);
                        }
                        if u.evicted && u.state != FlowState::SynSeen {
                            prop_assert!(full);
                        }
                        if !had && u.state == FlowState::SynSeen {
                            // A new half-open flow never displaces any other kind.
                            prop_assert!(settled(&t) >= settled_before);
                        } else if !u.tracked {
                            // Turned away: only from a full table, displacing nothing.
                            prop_assert!(full && !had && !u.evicted);
                            prop_assert_eq!(settled(&t), settled_before);
                        }
                        let settled_evicted = u.evicted
                            && after.evicted_half_open == before.evicted_half_open;
                        if settled_evicted {
                            // Only a flow left untracked before evicts a settled one.
                            prop_assert!(noted.contains(&k), "key {} evicted a settled flow", k);
                        }
                        if !u.tracked {
                            noted.insert(k);
                        }
                    }
                    Op::Remove(k) => {
                        t.rm(&flow(k, proto_of(k)));
                        prop_assert!(t.g(&flow(k, proto_of(k)), now).is_none());
                    }
                    Op::Expire(budget) => {
                        t.expire(now, budget);
                    }
                    Op::Advance(d) => now += d,
                }
                prop_assert!(t.len() <= t.capacity());
            }
            check(&t);
        }

        /// With room for every key and no time passing, the table is an exact map.
        #[test]
        fn matches_a_map_when_never_full(ops in ops(60)) {
            // Room for every key, and for every key half-open at once.
            let mut t = table(120);
            let mut model: HashMap<u32, FlowState> = HashMap::new();
            for op in ops {
                match op {
                    Op::Upsert(k, f) => {
                        let s = FlowState::next(model.get(&k).copied(), proto_of(k), TcpFlags(f));
                        model.insert(k, s);
                        t.up(&flow(k, proto_of(k)), Bucket(k as u16 % 4), TcpFlags(f), 0);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(model.remove(&k).is_some(), t.rm(&flow(k, proto_of(k))).is_some());
                    }
                    Op::Expire(budget) => {
                        prop_assert_eq!(t.expire(0, budget), 0);
                    }
                    Op::Advance(_) => {}
                }
            }
            prop_assert_eq!(t.len(), model.len());
            prop_assert_eq!(t.stats().evicted, 0);
            for (k, s) in model {
                prop_assert_eq!(t.g(&flow(k, proto_of(k)), 0).map(|e| e.state), Some(s));
            }
            check(&t);
        }
    }
}
