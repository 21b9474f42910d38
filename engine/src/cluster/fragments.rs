//! Which later IP fragments belong to this node.
//!
//! Only the first fragment of a datagram carries the ports, so only it can be mapped to a
//! bucket (DESIGN.md, "Data path"). Every node that sees a first fragment remembers, for a
//! short time, `(src, dst, proto, ident)` and what it did with it ([`FirstFragment`]: another
//! node's, delivered to its host, sent to a backend, or refused); later fragments are looked
//! up and go the same way. A later fragment that arrives before its first (reordering) is [`FragmentVerdict::Unknown`]:
//! its identity and arrival time go on a bounded wait list, and the caller decides what to do
//! with the frame (hold it briefly, or drop it). When the first fragment arrives,
//! [`FragmentTracker::first_fragment`] reports how many fragments of it were waiting.
//!
//! Both tables are set-associative caches of fixed size ([`WAYS`] entries per set), allocated
//! once: an insertion into a full set takes an empty or expired way, else the least recently
//! seen one, and counts the eviction. No clock is read: callers pass `now` in nanoseconds.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use siphasher::sip::SipHasher13;

use super::siphash::sip13;

/// Entries per set. An insertion inspects exactly these.
pub const WAYS: usize = 8;

/// How long a first fragment is remembered by default.
pub const DEFAULT_FRAGMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A fragmented datagram's identity. IPv4 addresses are stored IPv4-mapped; the IPv4
/// identification (16 bits) is widened, the IPv6 one (32 bits) is kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ident: u32,
    pub proto: u8,
}

impl FragmentKey {
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, ident: u32) -> FragmentKey {
        let mapped = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        FragmentKey {
            src: mapped(src),
            dst: mapped(dst),
            ident,
            proto,
        }
    }

    #[inline]
    fn encode(&self) -> [u8; 37] {
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&self.src);
        b[16..32].copy_from_slice(&self.dst);
        b[32..36].copy_from_slice(&self.ident.to_be_bytes());
        b[36] = self.proto;
        b
    }
}

impl fmt::Debug for FragmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FragmentKey({} -> {}, proto {}, ident {:#x})",
            std::net::Ipv6Addr::from(self.src),
            std::net::Ipv6Addr::from(self.dst),
            self.proto,
            self.ident
        )
    }
}

/// What this node did with a datagram's first fragment: what its later fragments get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirstFragment {
    /// Another node owned it.
    #[default]
    NotOwned,
    /// This node owned it and delivered it to its host.
    Owned,
    /// This node owned it and sent it to the backend with this id (appliance mode), the outer
    /// header's flow entropy `entropy` if encapsulated: later fragments go there the same way.
    Forwarded { backend: u16, entropy: u16 },
    /// This node owned it and dropped it (appliance mode: no rule, a disabled rule, no backend,
    /// too big for the tunnel): later fragments are dropped too.
    Refused,
}

impl FirstFragment {
    /// [`FirstFragment::Owned`] or [`FirstFragment::NotOwned`].
    pub fn owned(owned: bool) -> FirstFragment {
        if owned {
            FirstFragment::Owned
        } else {
            FirstFragment::NotOwned
        }
    }
}

/// What to do with a later (non-first) fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentVerdict {
    /// This node owned the first fragment and delivered it: deliver.
    Owned,
    /// Another node owned the first fragment: drop.
    NotOwned,
    /// This node sent the first fragment to a backend: send it there too.
    Forwarded { backend: u16, entropy: u16 },
    /// This node owned the first fragment and dropped it: drop.
    Refused,
    /// The first fragment has not been seen (yet): the fragment was put on the wait list.
    Unknown,
}

impl From<FirstFragment> for FragmentVerdict {
    #[inline]
    fn from(first: FirstFragment) -> FragmentVerdict {
        match first {
            FirstFragment::NotOwned => FragmentVerdict::NotOwned,
            FirstFragment::Owned => FragmentVerdict::Owned,
            FirstFragment::Forwarded { backend, entropy } => {
                FragmentVerdict::Forwarded { backend, entropy }
            }
            FirstFragment::Refused => FragmentVerdict::Refused,
        }
    }
}

/// Counters since construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FragmentStats {
    /// Remembered first fragments dropped before their timeout to make room.
    pub firsts_evicted: u64,
    /// Later fragments that found no first fragment.
    pub unknown: u64,
    /// Wait-list entries dropped before their timeout to make room.
    pub waits_evicted: u64,
    /// Wait-list entries whose first fragment arrived.
    pub waits_resolved: u64,
}

#[derive(Clone, Copy, Default)]
struct Entry<V> {
    key: FragmentKey,
    /// Last time this entry was seen or refreshed.
    at: u64,
    /// `None`: empty way.
    val: Option<V>,
}

/// A fixed set-associative cache with idle expiry.
struct Cache<V> {
    entries: Box<[Entry<V>]>,
    set_mask: usize,
}

impl<V: Copy + Default> Cache<V> {
    fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        Cache {
            entries: vec![Entry::default(); sets * WAYS].into_boxed_slice(),
            set_mask: sets - 1,
        }
    }

    #[inline]
    fn set(&self, hash: u64) -> std::ops::Range<usize> {
        let start = (hash as usize & self.set_mask) * WAYS;
        start..start + WAYS
    }

    #[inline]
    fn live(e: &Entry<V>, now: u64, timeout: u64) -> bool {
        e.val.is_some() && now.saturating_sub(e.at) <= timeout
    }

    #[inline]
    fn find(&self, key: &FragmentKey, hash: u64, now: u64, timeout: u64) -> Option<usize> {
        self.set(hash)
            .find(|&i| Self::live(&self.entries[i], now, timeout) && self.entries[i].key == *key)
    }

    /// Every remembered value, expired ones included (their keys are never found again).
    fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().filter_map(|e| e.val.as_mut())
    }

    /// Stores `val` for `key` (new or refreshed). Returns whether a live entry was evicted.
    fn put(&mut self, key: &FragmentKey, hash: u64, val: V, now: u64, timeout: u64) -> bool {
        let slot = match self.find(key, hash, now, timeout) {
            Some(i) => Ok(i),
            None => {
                let set = self.set(hash);
                let free = set
                    .clone()
                    .find(|&i| !Self::live(&self.entries[i], now, timeout));
                match free {
                    Some(i) => Ok(i),
                    None => Err(set
                        .min_by_key(|&i| self.entries[i].at)
                        .unwrap_or_else(|| unreachable!("a set has WAYS > 0 entries"))),
                }
            }
        };
        let (i, evicted) = match slot {
            Ok(i) => (i, false),
            Err(i) => (i, true),
        };
        self.entries[i] = Entry {
            key: *key,
            at: now,
            val: Some(val),
        };
        evicted
    }

    fn capacity(&self) -> usize {
        self.entries.len()
    }
}

/// See the module doc.
pub struct FragmentTracker {
    /// First fragments seen: what this node did with each.
    firsts: Cache<FirstFragment>,
    /// Later fragments seen before their first: how many.
    waiting: Cache<u16>,
    timeout: u64,
    /// SipHash-1-3 keys.
    k0: u64,
    k1: u64,
    stats: FragmentStats,
}

impl FragmentTracker {
    /// Remembers up to about `capacity` first fragments and `wait_capacity` waiting datagrams
    /// (rounded up to whole sets), each for `timeout` after it was last seen. `hash_key` keys
    /// the set index (derive it from the cluster secret with [`super::derive_key`]).
    pub fn new(
        capacity: usize,
        wait_capacity: usize,
        timeout: Duration,
        hash_key: &[u8; 16],
    ) -> FragmentTracker {
        let (k0, k1) = SipHasher13::new_with_key(hash_key).keys();
        FragmentTracker {
            firsts: Cache::new(capacity),
            waiting: Cache::new(wait_capacity),
            timeout: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            k0,
            k1,
            stats: FragmentStats::default(),
        }
    }

    /// Entries of the first-fragment table.
    pub fn capacity(&self) -> usize {
        self.firsts.capacity()
    }

    /// Entries of the wait list.
    pub fn wait_capacity(&self) -> usize {
        self.waiting.capacity()
    }

    pub fn stats(&self) -> FragmentStats {
        self.stats
    }

    /// A first fragment (offset 0) that the caller decided from its ports: `first` is what it
    /// did with it. Returns how many later fragments of the same datagram were waiting for it
    /// (the caller sends the ones it held the same way); their wait entry is cleared.
    #[inline]
    pub fn first_fragment(&mut self, key: &FragmentKey, first: FirstFragment, now: u64) -> u16 {
        let hash = self.hash(key);
        if self.firsts.put(key, hash, first, now, self.timeout) {
            self.stats.firsts_evicted += 1;
        }
        match self.waiting.find(key, hash, now, self.timeout) {
            Some(i) => {
                let entry = &mut self.waiting.entries[i];
                let count = entry.val_count();
                entry.val = None;
                self.stats.waits_resolved += 1;
                count
            }
            None => 0,
        }
    }

    /// After the backends changed (a reload): the later fragments of datagrams whose first
    /// went to a backend id for which `gone` is true (it now names another server, or none)
    /// are refused rather than sent where the first did not go. Returns how many datagrams.
    pub fn refuse_forwarded(&mut self, gone: impl Fn(u16) -> bool) -> usize {
        let mut n = 0;
        for first in self.firsts.values_mut() {
            if let FirstFragment::Forwarded { backend, .. } = *first {
                if gone(backend) {
                    *first = FirstFragment::Refused;
                    n += 1;
                }
            }
        }
        n
    }

    /// A later fragment (offset > 0): owned, not owned, or unknown (then put on the wait list).
    #[inline]
    pub fn later_fragment(&mut self, key: &FragmentKey, now: u64) -> FragmentVerdict {
        let hash = self.hash(key);
        if let Some(i) = self.firsts.find(key, hash, now, self.timeout) {
            let entry = &mut self.firsts.entries[i];
            entry.at = now;
            return entry.val.unwrap_or_default().into();
        }
        self.stats.unknown += 1;
        let count = match self.waiting.find(key, hash, now, self.timeout) {
            Some(i) => self.waiting.entries[i].val_count().saturating_add(1),
            None => 1,
        };
        if self.waiting.put(key, hash, count, now, self.timeout) {
            self.stats.waits_evicted += 1;
        }
        FragmentVerdict::Unknown
    }

    /// The verdict for a later fragment without recording anything.
    pub fn lookup(&self, key: &FragmentKey, now: u64) -> FragmentVerdict {
        match self.firsts.find(key, self.hash(key), now, self.timeout) {
            Some(i) => self.firsts.entries[i].val.unwrap_or_default().into(),
            None => FragmentVerdict::Unknown,
        }
    }

    /// How many later fragments of `key` are on the wait list.
    pub fn waiting(&self, key: &FragmentKey, now: u64) -> u16 {
        self.waiting
            .find(key, self.hash(key), now, self.timeout)
            .map_or(0, |i| self.waiting.entries[i].val_count())
    }

    #[inline]
    fn hash(&self, key: &FragmentKey) -> u64 {
        sip13(self.k0, self.k1, &key.encode())
    }
}

impl Entry<u16> {
    fn val_count(&self) -> u16 {
        self.val.unwrap_or(0)
    }
}

impl fmt::Debug for FragmentTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FragmentTracker")
            .field("capacity", &self.capacity())
            .field("wait_capacity", &self.wait_capacity())
            .field("timeout_ns", &self.timeout)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    const KEY: &[u8; 16] = b"fragment-key!!!!";
    const MS: u64 = 1_000_000;

    fn frag(ident: u32) -> FragmentKey {
        FragmentKey::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            17,
            ident,
        )
    }

    fn tracker(capacity: usize) -> FragmentTracker {
        FragmentTracker::new(capacity, capacity, DEFAULT_FRAGMENT_TIMEOUT, KEY)
    }

    #[test]
    fn layout() {
        println!(
            "fragments: key {} bytes, entry {} bytes",
            std::mem::size_of::<FragmentKey>(),
            std::mem::size_of::<Entry<FirstFragment>>()
        );
        assert_eq!(tracker(100).capacity(), 128);
        assert_eq!(tracker(0).capacity(), WAYS);
    }

    #[test]
    fn owner_takes_later_fragments_others_drop() {
        let mut owner = tracker(64);
        let mut other = tracker(64);
        assert_eq!(owner.first_fragment(&frag(1), FirstFragment::Owned, 0), 0);
        assert_eq!(
            other.first_fragment(&frag(1), FirstFragment::NotOwned, 0),
            0
        );
        assert_eq!(owner.later_fragment(&frag(1), MS), FragmentVerdict::Owned);
        assert_eq!(
            other.later_fragment(&frag(1), MS),
            FragmentVerdict::NotOwned
        );
        // Remembered for 2 s after it was last seen.
        assert_eq!(
            owner.later_fragment(&frag(1), 2000 * MS),
            FragmentVerdict::Owned
        );
        assert_eq!(owner.lookup(&frag(1), 4001 * MS), FragmentVerdict::Unknown);
    }

    #[test]
    fn later_fragments_learn_where_the_first_went() {
        let mut t = tracker(64);
        let to = FirstFragment::Forwarded {
            backend: 7,
            entropy: 0x1234,
        };
        assert_eq!(t.later_fragment(&frag(3), 0), FragmentVerdict::Unknown);
        assert_eq!(t.first_fragment(&frag(3), to, MS), 1);
        assert_eq!(
            t.later_fragment(&frag(3), 2 * MS),
            FragmentVerdict::Forwarded {
                backend: 7,
                entropy: 0x1234
            }
        );
        t.first_fragment(&frag(4), FirstFragment::Refused, MS);
        assert_eq!(t.later_fragment(&frag(4), 2 * MS), FragmentVerdict::Refused);
        assert_eq!(t.lookup(&frag(4), 2 * MS), FragmentVerdict::Refused);
    }

    #[test]
    fn a_reload_refuses_the_later_fragments_of_a_backend_that_changed() {
        let mut t = tracker(64);
        let to = |backend| FirstFragment::Forwarded {
            backend,
            entropy: 1,
        };
        t.first_fragment(&frag(1), to(7), 0);
        t.first_fragment(&frag(2), to(8), 0);
        t.first_fragment(&frag(3), FirstFragment::Owned, 0);
        assert_eq!(t.refuse_forwarded(|id| id == 7), 1);
        assert_eq!(t.later_fragment(&frag(1), MS), FragmentVerdict::Refused);
        assert_eq!(
            t.later_fragment(&frag(2), MS),
            FragmentVerdict::Forwarded {
                backend: 8,
                entropy: 1
            }
        );
        assert_eq!(t.later_fragment(&frag(3), MS), FragmentVerdict::Owned);
    }

    #[test]
    fn early_fragments_wait_for_their_first() {
        let mut t = tracker(64);
        assert_eq!(t.later_fragment(&frag(7), 0), FragmentVerdict::Unknown);
        assert_eq!(t.later_fragment(&frag(7), MS), FragmentVerdict::Unknown);
        assert_eq!(t.waiting(&frag(7), MS), 2);
        assert_eq!(t.first_fragment(&frag(7), FirstFragment::Owned, 2 * MS), 2);
        assert_eq!(t.waiting(&frag(7), 2 * MS), 0);
        assert_eq!(t.later_fragment(&frag(7), 3 * MS), FragmentVerdict::Owned);
        let s = t.stats();
        assert_eq!((s.unknown, s.waits_resolved), (2, 1));
        // A wait entry older than the timeout is forgotten.
        t.later_fragment(&frag(8), 0);
        assert_eq!(
            t.first_fragment(&frag(8), FirstFragment::Owned, 3000 * MS),
            0
        );
    }

    #[test]
    fn full_sets_evict_and_count() {
        let mut t = FragmentTracker::new(WAYS, WAYS, DEFAULT_FRAGMENT_TIMEOUT, KEY);
        for i in 0..WAYS as u32 {
            t.first_fragment(&frag(i), FirstFragment::Owned, u64::from(i));
        }
        assert_eq!(t.stats().firsts_evicted, 0);
        t.first_fragment(&frag(100), FirstFragment::Owned, 100);
        assert_eq!(t.stats().firsts_evicted, 1);
        // The least recently seen (ident 0) went.
        assert_eq!(t.lookup(&frag(0), 100), FragmentVerdict::Unknown);
        assert_eq!(t.lookup(&frag(1), 100), FragmentVerdict::Owned);
        // Expired entries are reused without counting an eviction.
        t.first_fragment(&frag(200), FirstFragment::Owned, 3000 * MS);
        assert_eq!(t.stats().firsts_evicted, 1);
    }

    proptest! {
        #[test]
        fn bounded_and_consistent(
            capacity in 0usize..40,
            ops in proptest::collection::vec((0u32..100, any::<bool>(), any::<bool>(), 0u64..500), 1..300),
        ) {
            let mut t = tracker(capacity);
            let mut now = 0;
            for (ident, first, owned, dt) in ops {
                now += dt * MS;
                if first {
                    t.first_fragment(&frag(ident), FirstFragment::owned(owned), now);
                    let want = if owned { FragmentVerdict::Owned } else { FragmentVerdict::NotOwned };
                    prop_assert_eq!(t.lookup(&frag(ident), now), want);
                    prop_assert_eq!(t.waiting(&frag(ident), now), 0);
                } else {
                    let known = t.lookup(&frag(ident), now);
                    let v = t.later_fragment(&frag(ident), now);
                    prop_assert_eq!(v, known);
                    if v == FragmentVerdict::Unknown {
                        prop_assert!(t.waiting(&frag(ident), now) >= 1);
                    }
                }
                let live = t.firsts.entries.iter().filter(|e| e.val.is_some()).count();
                prop_assert!(live <= t.capacity());
            }
        }
    }
}
