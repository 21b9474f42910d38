//! A service's backend table: which backend a new flow goes to, the same on every node.
//!
//! Maglev's lookup table (Eisenbud et al., NSDI 2016), with weights: [`TABLE_SIZE`] entries,
//! each naming one backend. Every backend walks its own permutation of the entries (an offset
//! and a skip from two keyed hashes of its address) and claims the next free entry in turn; a
//! backend of weight `w` takes a turn `w / max weight` times as often. A new flow reads the
//! entry at its hash. Chosen over weighted rendezvous hashing because a lookup is one memory
//! read whatever the number of backends (rendezvous costs a hash per backend per new flow), at
//! the price of a slightly larger disruption than the minimum when the pool changes: the flow
//! table remembers each flow's backend, so that only new flows ever see it.
//!
//! Owns the table and its construction; never sees a frame, a flow table or a clock. Built by
//! the control thread when the agreed backend pool changes, read by packet cores.

use std::net::IpAddr;

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Entries of a table: a prime (a permutation's skip must be coprime with it), about 650
/// entries per backend at 100 backends, so that equal backends differ by well under 1%.
pub const TABLE_SIZE: usize = 65537;

/// An entry no backend claimed (a table of no backend with a weight).
const NONE: u16 = u16::MAX;

/// The lookup table of one service.
#[derive(Clone)]
pub struct Maglev {
    entries: Box<[u16]>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Maglev({} entries)", self.entries.len())
    }
}

/// One backend as the table sees it: who it is (its address) and its weight (0: no new flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub ip: IpAddr,
    pub weight: u32,
}

impl Maglev {
    /// The table of `backends` (an entry names the backend's index in the slice), under the
    /// 128-bit `key` every node shares. The same inputs give the same table on every node.
    pub fn build(backends: &[Candidate], key: &[u8; 16]) -> Maglev {
        let m = TABLE_SIZE as u64;
        let mut entries = vec![NONE; TABLE_SIZE].into_boxed_slice();
        let live: Vec<(usize, u64, u64, u64)> = backends
            .iter()
            .enumerate()
            .filter(|(i, b)| b.weight > 0 && *i < usize::from(NONE))
            .map(|(i, b)| {
                let (h1, h2) = seeds(b.ip, key);
                (i, h1 % m, h2 % (m - 1) + 1, u64::from(b.weight))
            })
            .collect();
        let Some(max_weight) = live.iter().map(|l| l.3).max() else {
            return Maglev { entries };
        };
        let mut next = vec![0u64; live.len()];
        let mut taken = vec![0u64; live.len()];
        let mut filled = 0usize;
        let mut round = 0u64;
        while filled < TABLE_SIZE {
            round += 1;
            for (j, &(i, offset, skip, weight)) in live.iter().enumerate() {
                // A backend of the largest weight takes one entry per round, the others their
                // share of it (rounded down: a small weight waits for its turn).
                while taken[j] * max_weight < round * weight && filled < TABLE_SIZE {
                    let mut c = (offset + next[j] * skip) % m;
                    while entries[c as usize] != NONE {
                        next[j] += 1;
                        c = (offset + next[j] * skip) % m;
                    }
                    next[j] += 1;
                    // Indices below NONE only (filtered above): the cast is exact.
                    entries[c as usize] = i as u16;
                    taken[j] += 1;
                    filled += 1;
                }
            }
        }
        Maglev { entries }
    }

    /// The backend index for a flow whose (well mixed) hash is `h`; `None` in a table without
    /// a backend of non-zero weight.
    #[inline]
    pub fn lookup(&self, h: u64) -> Option<usize> {
        // Lemire's multiply-shift range reduction of the high 32 bits.
        let i = ((h >> 32) * TABLE_SIZE as u64) >> 32;
        match self.entries[i as usize] {
            NONE => None,
            b => Some(usize::from(b)),
        }
    }

    /// Entries per backend index (for status and tests).
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut v = vec![0; backends];
        for &e in self.entries.iter() {
            if let Some(c) = v.get_mut(usize::from(e)) {
                *c += 1;
            }
        }
        v
    }
}

/// A backend's two permutation seeds: keyed hashes of its address.
fn seeds(ip: IpAddr, key: &[u8; 16]) -> (u64, u64) {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let one = |salt: u8| {
        let mut h = SipHasher13::new_with_key(key);
        h.write(&bytes);
        h.write_u8(salt);
        h.finish()
    };
    (one(0), one(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const KEY: [u8; 16] = *b"0123456789abcdef";

    fn pool(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                ip: IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1)),
                weight: 100,
            })
            .collect()
    }

    fn mixed(x: u64) -> u64 {
        // SplitMix64's finaliser: stands in for a flow's keyed hash.
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn equal_backends_share_within_one_percent() {
        let t = Maglev::build(&pool(100), &KEY);
        let shares = t.shares(100);
        let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
        let mean = TABLE_SIZE as f64 / 100.0;
        assert!(
            (*hi as f64 - mean) / mean < 0.01 && (mean - *lo as f64) / mean < 0.01,
            "{lo}..{hi} around {mean}"
        );
        // And flows follow the entries.
        let mut flows = vec![0u32; 100];
        for x in 0..1_000_000u64 {
            flows[t.lookup(mixed(x)).unwrap()] += 1;
        }
        let (lo, hi) = (flows.iter().min().unwrap(), flows.iter().max().unwrap());
        assert!(f64::from(*hi) / f64::from(*lo) < 1.1, "{lo}..{hi}");
    }

    #[test]
    fn weights_set_the_shares() {
        let mut p = pool(3);
        p[1].weight = 50;
        p[2].weight = 0;
        let s = Maglev::build(&p, &KEY).shares(3);
        assert_eq!(s[2], 0, "weight 0 takes no new flows");
        let ratio = s[1] as f64 / s[0] as f64;
        assert!((ratio - 0.5).abs() < 0.01, "{s:?}");
        assert_eq!(s[0] + s[1], TABLE_SIZE);
        assert_eq!(Maglev::build(&[], &KEY).lookup(5), None);
    }

    /// Every node builds the same table from the same pool and key (the services digest makes
    /// nodes with another pool, or the same backends in another order, known as different),
    /// and another key gives another table.
    #[test]
    fn the_pool_and_the_key_decide_the_table() {
        let p = pool(10);
        let a = Maglev::build(&p, &KEY);
        let b = Maglev::build(&p, &KEY);
        assert_eq!(
            a.entries, b.entries,
            "deterministic: every node builds the same table"
        );
        let c = Maglev::build(&p, b"another key 16by");
        assert_ne!(a.entries, c.entries);
    }

    /// Entries of table `a` over pool `pa` whose backend (by address) differs in table `b`
    /// over pool `pb`, and of those how many went to `to` (an address).
    fn moved(
        a: &Maglev,
        pa: &[Candidate],
        b: &Maglev,
        pb: &[Candidate],
        to: IpAddr,
    ) -> (usize, usize) {
        let ip = |t: &Maglev, p: &[Candidate], k: usize| p[usize::from(t.entries[k])].ip;
        let (mut moved, mut to_new) = (0, 0);
        for k in 0..TABLE_SIZE {
            let (x, y) = (ip(a, pa, k), ip(b, pb, k));
            if x != y {
                moved += 1;
                to_new += usize::from(y == to);
            }
        }
        (moved, to_new)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Removing one of N backends moves only about 1/N of the entries: its own, plus a
        /// little of Maglev's extra disruption.
        #[test]
        fn removing_a_backend_moves_about_its_share(n in 3usize..60, gone in 0usize..60) {
            let gone = gone % n;
            let before = pool(n);
            let mut after = before.clone();
            after[gone].weight = 0;
            let (a, b) = (Maglev::build(&before, &KEY), Maglev::build(&after, &KEY));
            let mut own = 0;
            let mut others = 0;
            for (x, y) in a.entries.iter().zip(b.entries.iter()) {
                if usize::from(*x) == gone {
                    own += 1;
                } else if x != y {
                    others += 1;
                }
            }
            prop_assert!(b.entries.iter().all(|e| usize::from(*e) != gone));
            // Maglev's paper: a few percent beyond the minimum at this table size.
            let frac = others as f64 / TABLE_SIZE as f64;
            prop_assert!(frac < 0.5 / n as f64 + 0.01, "{others} other entries moved (own {own})");
        }

        /// A backend taken out of the list (not only weighted 0): the same, by address.
        #[test]
        fn a_backend_taken_out_moves_about_its_share(n in 3usize..60, gone in 0usize..60) {
            let gone = gone % n;
            let before = pool(n);
            let mut after = before.clone();
            let out = after.remove(gone).ip;
            let (a, b) = (Maglev::build(&before, &KEY), Maglev::build(&after, &KEY));
            let own = a.entries.iter().filter(|&&e| usize::from(e) == gone).count();
            let (moved, _) = moved(&a, &before, &b, &after, out);
            let others = moved - own;
            prop_assert!(
                (others as f64 / TABLE_SIZE as f64) < 0.5 / n as f64 + 0.01,
                "{others} other entries moved (own {own})"
            );
        }

        /// A backend added to N: about 1/(N+1) of the entries move, nearly all of them to it.
        #[test]
        fn a_backend_added_takes_about_its_share(n in 2usize..60) {
            let before = pool(n);
            let after = pool(n + 1);
            let new = after[n].ip;
            let (a, b) = (Maglev::build(&before, &KEY), Maglev::build(&after, &KEY));
            let (moved, to_new) = moved(&a, &before, &b, &after, new);
            let share = TABLE_SIZE as f64 / (n + 1) as f64;
            prop_assert!((to_new as f64 - share).abs() / share < 0.02, "{to_new} to the new one, {share:.0} its share");
            let others = moved - to_new;
            prop_assert!(
                (others as f64 / TABLE_SIZE as f64) < 0.5 / n as f64 + 0.01,
                "{others} entries moved between the old backends"
            );
        }
    }
}
