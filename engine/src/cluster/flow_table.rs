//! The bounded table of flows a node owns (or, in a second instance, has learned during a
//! handoff): enough TCP state to tell a new flow from an established or closing one, idle
//! timeouts per protocol, and a live count per bucket for the handoff's "done" step.
//!
//! The table never allocates after [`FlowTable::new`] and never reads a clock: callers pass
//! `now` in nanoseconds from any monotonic source, the same one for every call.
//!
//! # Layout
//!
//! Open addressing with linear probing over a power-of-two array of slots, at most 3/4 full
//! (`slots = next_power_of_two(ceil(capacity * 4 / 3))`). A slot is 56 bytes: the flow id
//! (38), the 32-bit probe hash (4), the bucket (2), the state (1, `None` = empty) and
//! `last_seen` (8), padded to 8. Deletion shifts the rest of the probe run back (no
//! tombstones), using the stored hash, so runs stay short under churn. A 65536-entry `u32`
//! array counts entries per bucket (256 KiB).
//!
//! The probe index is SipHash-1-3 of the flow id under a caller-supplied key, so clients cannot
//! craft flows that pile into one probe run.
//!
//! # Bounds
//!
//! At most `capacity` entries. Inserting into a full table first removes one entry among the
//! first [`EVICTION_WINDOW`] entries of the new flow's probe run: an expired one if there is
//! one (counted as expired), else the least recently seen (counted as evicted).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use siphasher::sip::SipHasher13;

use super::flow_key::{sip13, Bucket, BUCKETS};

/// How many occupied slots an insertion into a full table inspects to choose a victim.
pub const EVICTION_WINDOW: usize = 8;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// A flow's full identity, as seen arriving at the cluster. IPv4 addresses are stored
/// IPv4-mapped (`::ffff:a.b.c.d`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowId {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl FlowId {
    pub fn new(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> FlowId {
        FlowId {
            src: mapped(src),
            dst: mapped(dst),
            src_port,
            dst_port,
            proto,
        }
    }

    /// The bytes the probe hash reads.
    #[inline]
    fn encode(&self) -> [u8; 37] {
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&self.src);
        b[16..32].copy_from_slice(&self.dst);
        b[32..34].copy_from_slice(&self.src_port.to_be_bytes());
        b[34..36].copy_from_slice(&self.dst_port.to_be_bytes());
        b[36] = self.proto;
        b
    }
}

#[inline]
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn unmapped(b: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FlowId({} {} -> {} {}, proto {})",
            unmapped(self.src),
            self.src_port,
            unmapped(self.dst),
            self.dst_port,
            self.proto
        )
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

/// The nanosecond form the packet path compares against.
#[derive(Debug, Clone, Copy)]
struct TimeoutsNs {
    tcp_syn: u64,
    tcp_established: u64,
    tcp_closing: u64,
    udp: u64,
    other: u64,
}

impl From<FlowTimeouts> for TimeoutsNs {
    fn from(t: FlowTimeouts) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        TimeoutsNs {
            tcp_syn: ns(t.tcp_syn),
            tcp_established: ns(t.tcp_established),
            tcp_closing: ns(t.tcp_closing),
            udp: ns(t.udp),
            other: ns(t.other),
        }
    }
}

impl TimeoutsNs {
    #[inline]
    fn of(&self, state: FlowState, proto: u8) -> u64 {
        match state {
            FlowState::SynSeen => self.tcp_syn,
            FlowState::Established => self.tcp_established,
            FlowState::Closing => self.tcp_closing,
            FlowState::Open if proto == UDP => self.udp,
            FlowState::Open => self.other,
        }
    }
}

/// A live flow, as returned by lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEntry {
    pub bucket: Bucket,
    pub state: FlowState,
    /// The `now` of the last packet seen.
    pub last_seen: u64,
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
}

/// Counters since construction. `inserted == len + evicted + expired + removed` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowTableStats {
    /// Entries created.
    pub inserted: u64,
    /// Live entries dropped to make room: each is a flow the node forgot while it was alive.
    pub evicted: u64,
    /// Entries dropped after their idle timeout (by a sweep, or reused as a victim).
    pub expired: u64,
    /// Entries dropped by [`FlowTable::remove`].
    pub removed: u64,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    last_seen: u64,
    id: FlowId,
    /// Low 32 bits of the probe hash: home slot = `hash & mask`, and a cheap compare.
    hash: u32,
    bucket: u16,
    /// `None`: the slot is empty.
    state: Option<FlowState>,
}

/// See the module doc.
pub struct FlowTable {
    slots: Box<[Slot]>,
    mask: usize,
    capacity: usize,
    len: usize,
    per_bucket: Box<[u32]>,
    timeouts: TimeoutsNs,
    /// SipHash-1-3 keys.
    k0: u64,
    k1: u64,
    /// Where the next [`FlowTable::expire`] call resumes.
    cursor: usize,
    stats: FlowTableStats,
}

impl FlowTable {
    /// A table for at most `capacity` flows (at least 1), keyed for probing by `hash_key`
    /// (derive it from the cluster secret with [`super::derive_key`]).
    ///
    /// Allocates everything the table will ever use: `56 * slots + 256 KiB`.
    pub fn new(capacity: usize, timeouts: FlowTimeouts, hash_key: &[u8; 16]) -> FlowTable {
        let capacity = capacity.max(1);
        let slots = capacity
            .checked_add(capacity.div_ceil(3))
            .and_then(usize::checked_next_power_of_two)
            .filter(|&n| u32::try_from(n).is_ok())
            .unwrap_or_else(|| panic!("flow table capacity {capacity} is too large"));
        let (k0, k1) = SipHasher13::new_with_key(hash_key).keys();
        FlowTable {
            // Written element by element (not calloc'd), so every page is mapped here rather
            // than faulted in on the packet path.
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            mask: slots - 1,
            capacity,
            len: 0,
            per_bucket: (0..BUCKETS).map(|_| 0u32).collect(),
            timeouts: timeouts.into(),
            k0,
            k1,
            cursor: 0,
            stats: FlowTableStats::default(),
        }
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

    /// Entries held in `bucket`, expired ones not yet swept included: the handoff's "done"
    /// step should sweep ([`FlowTable::expire`]) before trusting a nonzero count.
    #[inline]
    pub fn count_in_bucket(&self, bucket: Bucket) -> u32 {
        self.per_bucket[bucket.index()]
    }

    /// The flow's entry, unless absent or idle past its timeout at `now`.
    #[inline]
    pub fn get(&self, id: &FlowId, now: u64) -> Option<FlowEntry> {
        let i = self.find(id, self.hash(id))?;
        let slot = &self.slots[i];
        if self.is_expired(slot, now) {
            return None;
        }
        Some(FlowEntry {
            bucket: Bucket(slot.bucket),
            state: slot.state?,
            last_seen: slot.last_seen,
        })
    }

    /// Records a packet of flow `id` (in `bucket`) at `now`: creates the entry if needed, moves
    /// its TCP state with `flags` (ignored for other protocols), refreshes `last_seen`.
    ///
    /// An entry found expired starts over as a new flow. Never allocates; a full table evicts
    /// (see the module doc).
    #[inline]
    pub fn upsert(&mut self, id: &FlowId, bucket: Bucket, flags: TcpFlags, now: u64) -> Upsert {
        let hash = self.hash(id);
        if let Some(i) = self.find(id, hash) {
            let expired = self.is_expired(&self.slots[i], now);
            if expired {
                // The old flow ended; this packet starts a new one in the same slot.
                self.stats.expired += 1;
                self.stats.inserted += 1;
            }
            let slot = &mut self.slots[i];
            let prev = if expired { None } else { slot.state };
            let state = FlowState::next(prev, id.proto, flags);
            slot.state = Some(state);
            slot.last_seen = now;
            return Upsert {
                state,
                is_new: expired,
                evicted: false,
            };
        }

        let mut evicted = false;
        if self.len >= self.capacity {
            evicted = self.make_room(hash, now);
        }
        let state = FlowState::next(None, id.proto, flags);
        let mut i = hash as usize & self.mask;
        while self.slots[i].state.is_some() {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = Slot {
            last_seen: now,
            id: *id,
            hash,
            bucket: bucket.0,
            state: Some(state),
        };
        self.len += 1;
        self.per_bucket[bucket.index()] += 1;
        self.stats.inserted += 1;
        Upsert {
            state,
            is_new: true,
            evicted,
        }
    }

    /// Forgets a flow; returns its entry if it was held (expired or not).
    pub fn remove(&mut self, id: &FlowId) -> Option<FlowEntry> {
        let i = self.find(id, self.hash(id))?;
        let slot = self.slots[i];
        self.delete_at(i);
        self.stats.removed += 1;
        Some(FlowEntry {
            bucket: Bucket(slot.bucket),
            state: slot.state?,
            last_seen: slot.last_seen,
        })
    }

    /// Sweeps at most `budget` slots, resuming where the last sweep stopped, and drops entries
    /// idle past their timeout at `now`. Returns how many were dropped. A sweep of
    /// `slot_count()` slots visits every entry at least once.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let mut dropped = 0;
        for _ in 0..budget {
            let i = self.cursor;
            let slot = &self.slots[i];
            if slot.state.is_some() && self.is_expired(slot, now) {
                // Deletion shifts the next entry of the run into `i`: look at `i` again.
                self.delete_at(i);
                self.stats.expired += 1;
                dropped += 1;
            } else {
                self.cursor = (i + 1) & self.mask;
            }
        }
        dropped
    }

    /// Number of slots (a power of two, more than `capacity`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn hash(&self, id: &FlowId) -> u32 {
        // Truncation: the table has at most 2^32 slots.
        sip13(self.k0, self.k1, &id.encode()) as u32
    }

    #[inline]
    fn find(&self, id: &FlowId, hash: u32) -> Option<usize> {
        let mut i = hash as usize & self.mask;
        loop {
            let slot = &self.slots[i];
            slot.state?;
            if slot.hash == hash && slot.id == *id {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    fn is_expired(&self, slot: &Slot, now: u64) -> bool {
        match slot.state {
            Some(state) => {
                now.saturating_sub(slot.last_seen) > self.timeouts.of(state, slot.id.proto)
            }
            None => false,
        }
    }

    /// Drops one entry from the probe run at `hash`'s home to make room. Returns whether the
    /// victim was live (an eviction) rather than expired.
    fn make_room(&mut self, hash: u32, now: u64) -> bool {
        let mut i = hash as usize & self.mask;
        let mut victim = None;
        let mut oldest = u64::MAX;
        let mut seen = 0;
        // The table holds `capacity >= 1` entries, so this finds one within `slots` steps.
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.state.is_some() {
                if self.is_expired(slot, now) {
                    self.delete_at(i);
                    self.stats.expired += 1;
                    return false;
                }
                if slot.last_seen < oldest || victim.is_none() {
                    oldest = slot.last_seen;
                    victim = Some(i);
                }
                seen += 1;
                if seen == EVICTION_WINDOW {
                    break;
                }
            }
            i = (i + 1) & self.mask;
        }
        match victim {
            Some(v) => {
                self.delete_at(v);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }

    /// Empties slot `hole` and shifts the rest of its probe run back (no tombstones).
    fn delete_at(&mut self, mut hole: usize) {
        let bucket = self.slots[hole].bucket as usize;
        self.per_bucket[bucket] -= 1;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let slot = self.slots[j];
            if slot.state.is_none() {
                break;
            }
            let home = slot.hash as usize & self.mask;
            // `j` may move back to `hole` only if `hole` lies on its probe path home..=j.
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = slot;
                hole = j;
            }
        }
        self.slots[hole].state = None;
    }
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

    fn flow(n: u32, proto: u8) -> FlowId {
        FlowId::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            (n % 50_000) as u16 + 1024,
            80,
            proto,
        )
    }

    fn table(capacity: usize) -> FlowTable {
        FlowTable::new(capacity, FlowTimeouts::default(), KEY)
    }

    /// Checks every structural invariant by brute force.
    fn check(t: &FlowTable) {
        let occupied: Vec<&Slot> = t.slots.iter().filter(|s| s.state.is_some()).collect();
        assert_eq!(occupied.len(), t.len);
        assert!(t.len <= t.capacity);
        let mut per_bucket = vec![0u32; BUCKETS];
        for s in &occupied {
            per_bucket[usize::from(s.bucket)] += 1;
            assert_eq!(t.hash(&s.id), s.hash);
            assert!(t.find(&s.id, s.hash).is_some(), "{:?} unreachable", s.id);
        }
        assert!(
            per_bucket[..] == t.per_bucket[..],
            "per-bucket counts drifted"
        );
        let st = t.stats;
        assert_eq!(
            st.inserted,
            t.len as u64 + st.evicted + st.expired + st.removed
        );
    }

    #[test]
    fn layout() {
        let slot = std::mem::size_of::<Slot>();
        println!(
            "flow table: FlowId {} bytes, slot {slot} bytes, {:.1} bytes per flow at full load",
            std::mem::size_of::<FlowId>(),
            slot as f64 * table(3 << 20).slot_count() as f64 / (3 << 20) as f64
        );
        assert_eq!(std::mem::size_of::<FlowId>(), 38);
        assert_eq!(slot, 56);
        assert_eq!(table(3).slot_count(), 4);
        assert_eq!(table(1000).slot_count(), 2048);
        assert_eq!(table(0).capacity(), 1);
    }

    #[test]
    fn tcp_lifecycle() {
        let mut t = table(16);
        let f = flow(1, TCP);
        let b = Bucket(7);
        let u = t.upsert(&f, b, TcpFlags::SYN, 0);
        assert_eq!(
            (u.state, u.is_new, u.evicted),
            (FlowState::SynSeen, true, false)
        );
        assert_eq!(
            t.upsert(&f, b, TcpFlags::SYN, SEC).state,
            FlowState::SynSeen
        );
        let u = t.upsert(&f, b, TcpFlags::ACK, 2 * SEC);
        assert_eq!((u.state, u.is_new), (FlowState::Established, false));
        // An established flow idles up to 300 s.
        assert!(t.get(&f, 2 * SEC + 300 * SEC).is_some());
        assert!(t.get(&f, 2 * SEC + 301 * SEC).is_none());
        let fin = TcpFlags::FIN.union(TcpFlags::ACK);
        assert_eq!(t.upsert(&f, b, fin, 3 * SEC).state, FlowState::Closing);
        assert_eq!(
            t.upsert(&f, b, TcpFlags::ACK, 4 * SEC).state,
            FlowState::Closing
        );
        // Closing idles 30 s only.
        assert!(t.get(&f, 35 * SEC).is_none());
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
        assert!(t.upsert(&f, Bucket(1), TcpFlags::NONE, 0).is_new);
        assert!(!t.upsert(&f, Bucket(1), TcpFlags::NONE, 30 * SEC).is_new);
        let u = t.upsert(&f, Bucket(1), TcpFlags::NONE, 61 * SEC);
        assert_eq!((u.state, u.is_new), (FlowState::Open, true));
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().expired, 1);
        check(&t);
    }

    #[test]
    fn full_table_evicts_expired_before_live() {
        let mut t = table(8);
        for n in 0..8 {
            t.upsert(&flow(n, TCP), Bucket(n as u16), TcpFlags::SYN, 0);
        }
        // Keep all but flow 3 fresh; flow 3's SYN state times out.
        for n in (0..8).filter(|&n| n != 3) {
            t.upsert(&flow(n, TCP), Bucket(n as u16), TcpFlags::ACK, 29 * SEC);
        }
        t.upsert(&flow(100, TCP), Bucket(100), TcpFlags::SYN, 31 * SEC);
        check(&t);
        // The window covers all 8 entries here, so the expired one must be the victim.
        assert!(t.get(&flow(3, TCP), 31 * SEC).is_none());
        assert_eq!((t.stats().evicted, t.stats().expired), (0, 1));
        // Now nothing is expired: the oldest live entry goes, and it is counted.
        let u = t.upsert(&flow(101, TCP), Bucket(101), TcpFlags::SYN, 32 * SEC);
        assert!(u.evicted);
        assert_eq!(t.stats().evicted, 1);
        assert_eq!(t.len(), 8);
        check(&t);
    }

    #[test]
    fn sweep_budget_resumes() {
        let mut t = table(1000);
        for n in 0..1000 {
            t.upsert(&flow(n, UDP), Bucket((n % 10) as u16), TcpFlags::NONE, 0);
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
            let ids: Vec<FlowId> = (0..n as u32).map(|i| flow(i, TCP)).collect();
            let start = std::time::Instant::now();
            for (i, id) in ids.iter().enumerate() {
                t.upsert(id, Bucket(i as u16), TcpFlags::SYN, 1);
            }
            let insert = start.elapsed().as_nanos() as f64 / n as f64;
            let start = std::time::Instant::now();
            let mut hits = 0;
            for _ in 0..10_000_000 / n {
                for id in &ids {
                    hits += usize::from(t.get(std::hint::black_box(id), 2).is_some());
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

    proptest! {
        #[test]
        fn never_exceeds_capacity_and_counts_evictions(
            capacity in 1usize..40,
            ops in ops(120),
        ) {
            let mut t = table(capacity);
            let mut now = 0;
            for op in ops {
                match op {
                    Op::Upsert(k, f) => {
                        let full = t.len() == t.capacity();
                        let had = t.find(&flow(k, proto_of(k)), t.hash(&flow(k, proto_of(k)))).is_some();
                        let before = t.stats();
                        let u = t.upsert(&flow(k, proto_of(k)), Bucket(k as u16), TcpFlags(f), now);
                        let after = t.stats();
                        prop_assert!(t.get(&flow(k, proto_of(k)), now).is_some());
                        prop_assert_eq!(u.evicted, after.evicted == before.evicted + 1);
                        if u.evicted {
                            prop_assert!(full && !had);
                        }
                    }
                    Op::Remove(k) => {
                        t.remove(&flow(k, proto_of(k)));
                        prop_assert!(t.get(&flow(k, proto_of(k)), now).is_none());
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
            let mut t = table(60);
            let mut model: HashMap<u32, FlowState> = HashMap::new();
            for op in ops {
                match op {
                    Op::Upsert(k, f) => {
                        let s = FlowState::next(model.get(&k).copied(), proto_of(k), TcpFlags(f));
                        model.insert(k, s);
                        t.upsert(&flow(k, proto_of(k)), Bucket(k as u16 % 4), TcpFlags(f), 0);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(model.remove(&k).is_some(), t.remove(&flow(k, proto_of(k))).is_some());
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
                prop_assert_eq!(t.get(&flow(k, proto_of(k)), 0).map(|e| e.state), Some(s));
            }
            check(&t);
        }
    }
}
