//! Flow keys and the keyed bucket hash: `bucket = SipHash-1-3(key, encoding(flow key)) mod 65536`.
//!
//! This is part of the cluster's wire contract: every node must map every packet to the same
//! bucket, whatever its build, CPU or version. The exact algorithm is:
//!
//! 1. **Key derivation.** `key = HMAC-SHA256(key = cluster secret, message =
//!    b"clonecluster bucket key v1")[0..16]` ([`derive_key`] with [`BUCKET_KEY_LABEL`]). The
//!    SipHash keys are `k0 = u64::from_le_bytes(key[0..8])`, `k1 = u64::from_le_bytes(key[8..16])`.
//!    The key is secret, so nobody outside the cluster can aim traffic at one node.
//! 2. **Encoding.** A flow key is exactly 20 bytes ([`FlowKey::to_bytes`]):
//!
//!    | bytes    | content                                                              |
//!    |----------|----------------------------------------------------------------------|
//!    | `0`      | address family: `4` or `6`                                           |
//!    | `1..17`  | source address: IPv4 in `1..5` with `5..17` zero; IPv6 all 16 bytes  |
//!    | `17..19` | source port, big-endian (`0` unless affinity `none`)                 |
//!    | `19`     | IP protocol number (`0` unless affinity `none`)                      |
//!
//!    Affinity `single` keeps the whole address; `network` keeps the first 24 bits (IPv4) or
//!    64 bits (IPv6) and zeroes the rest. An IPv4-mapped IPv6 source is encoded as IPv6: it is
//!    what was on the wire.
//! 3. **Hash.** SipHash-1-3 over those 20 bytes, one message (no length prefix beyond
//!    SipHash's own), giving a `u64`.
//! 4. **Bucket.** The hash's low 16 bits (`hash mod 65536`).
//!
//! Changing any step changes which node owns which flow: it needs a protocol version bump
//! (a new label) so mixed clusters refuse each other rather than both answering a packet.

use std::fmt;
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use siphasher::sip::SipHasher13;

use super::siphash::{sip13_words20, Lanes, Sip13x8};
use super::Affinity;

/// Number of buckets: ownership is decided per bucket, never per flow.
pub const BUCKETS: usize = 65536;

/// The HMAC label of the bucket-hash key. Bump the version to change the bucket algorithm.
pub const BUCKET_KEY_LABEL: &[u8] = b"clonecluster bucket key v1";

/// `HMAC-SHA256(secret, label)`, first 16 bytes: one independent 128-bit key per purpose.
pub fn derive_key(secret: &[u8], label: &[u8]) -> [u8; 16] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    let tag = mac.finalize().into_bytes();
    let mut key = [0u8; 16];
    key.copy_from_slice(&tag[..16]);
    key
}

/// A bucket index, 0..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bucket(pub u16);

impl Bucket {
    /// The bucket as an array index.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// All buckets in order.
    pub fn all() -> impl Iterator<Item = Bucket> {
        (0..=u16::MAX).map(Bucket)
    }
}

/// Length of a flow key's encoding.
const KEY_LEN: usize = 20;
const FAMILY: usize = 0;
const ADDR: usize = 1;
const PORT: usize = 17;
const PROTO: usize = 19;

/// What ownership hashes: the client side of a flow, reduced by [`Affinity`].
///
/// Holds its 20-byte wire encoding (see the module doc) the way SipHash reads it, as three
/// little-endian words ([`KeyWords`]), built in registers from the parsed fields: hashing
/// reads whole words that were written as whole words, with no byte shuffling in memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey(KeyWords);

/// A flow key's 20-byte encoding as SipHash reads it: bytes `0..8`, `8..16` and `16..20`
/// as little-endian `u64`s (the last word's top four bytes zero).
pub type KeyWords = [u64; 3];

impl FlowKey {
    /// All zeros: a placeholder (no packet has it: the family byte is 4 or 6).
    pub const ZERO: FlowKey = FlowKey([0; 3]);

    /// The key of a packet from `src`/`src_port` with IP protocol `proto`, under `affinity`.
    #[inline]
    pub fn new(affinity: Affinity, src: IpAddr, src_port: u16, proto: u8) -> FlowKey {
        // Bytes 17..20 (port, big-endian, then protocol) in the last word's bits 8..32.
        let tail = if affinity == Affinity::None {
            // The port's big-endian bytes are its swapped value's low bytes.
            u64::from(src_port.swap_bytes()) << 8 | u64::from(proto) << 24
        } else {
            0
        };
        match src {
            IpAddr::V4(v4) => {
                // The address in bytes 1..5.
                let mut a = u64::from(u32::from_le_bytes(v4.octets()));
                if affinity == Affinity::Network {
                    a &= 0x00ff_ffff;
                }
                FlowKey([4 | a << 8, 0, tail])
            }
            IpAddr::V6(v6) => {
                // The address in bytes 1..17: its first 7 bytes in word 0, the next 8 in word
                // 1, the last in word 2's low byte.
                let mut a = u128::from_le_bytes(v6.octets());
                if affinity == Affinity::Network {
                    a &= u128::from(u64::MAX);
                }
                // Truncations pick the words out of the shifted address.
                FlowKey([
                    6 | (a << 8) as u64,
                    (a >> 56) as u64,
                    (a >> 120) as u64 | tail,
                ])
            }
        }
    }

    /// The key of packets owned by source address alone, whatever the affinity (ICMP echo,
    /// IP protocols without ports): the same as affinity `single`.
    #[inline]
    pub fn source(src: IpAddr) -> FlowKey {
        FlowKey::new(Affinity::Single, src, 0, 0)
    }

    /// The exact bytes the bucket hash reads (the wire contract's encoding).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        let mut b = [0u8; KEY_LEN];
        b[0..8].copy_from_slice(&self.0[0].to_le_bytes());
        b[8..16].copy_from_slice(&self.0[1].to_le_bytes());
        b[16..20].copy_from_slice(&self.0[2].to_le_bytes()[..4]);
        b
    }

    /// The encoding as the words the bucket hash reads.
    #[inline]
    pub fn words(&self) -> &KeyWords {
        &self.0
    }

    /// The (possibly masked) source address.
    pub fn addr(&self) -> IpAddr {
        let b = self.to_bytes();
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[ADDR..ADDR + 16]);
        if b[FAMILY] == 4 {
            IpAddr::from([a[0], a[1], a[2], a[3]])
        } else {
            IpAddr::from(a)
        }
    }

    /// The source port, 0 unless affinity `none`.
    pub fn port(&self) -> u16 {
        let b = self.to_bytes();
        u16::from_be_bytes([b[PORT], b[PORT + 1]])
    }

    /// The IP protocol, 0 unless affinity `none`.
    pub fn proto(&self) -> u8 {
        self.to_bytes()[PROTO]
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FlowKey({}, port {}, proto {})",
            self.addr(),
            self.port(),
            self.proto()
        )
    }
}

/// The keyed bucket hash (see the module doc for the exact algorithm).
#[derive(Clone)]
pub struct BucketHasher {
    k0: u64,
    k1: u64,
    x8: Sip13x8,
}

impl BucketHasher {
    /// A hasher keyed from the cluster secret through [`derive_key`] and [`BUCKET_KEY_LABEL`].
    pub fn new(cluster_secret: &[u8]) -> BucketHasher {
        BucketHasher::from_key(&derive_key(cluster_secret, BUCKET_KEY_LABEL))
    }

    /// A hasher with an already derived 128-bit key.
    pub fn from_key(key: &[u8; 16]) -> BucketHasher {
        let (k0, k1) = SipHasher13::new_with_key(key).keys();
        BucketHasher {
            k0,
            k1,
            x8: Sip13x8::new(k0, k1),
        }
    }

    /// Hashes bursts ([`BucketHasher::hash8`]) with implementation `lanes`, one of
    /// [`Lanes::available`](super::siphash::Lanes::available); the values do not change.
    pub fn set_lanes(&mut self, lanes: Lanes) {
        self.x8 = Sip13x8::with(self.k0, self.k1, lanes);
    }

    /// The implementation [`BucketHasher::hash8`] runs (the vector units the CPU has).
    #[inline]
    pub fn lanes(&self) -> Lanes {
        self.x8.lanes()
    }

    /// The full 64-bit hash of a flow key.
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hash_words(key.words())
    }

    /// [`BucketHasher::hash`] of a key given by its [`FlowKey::words`].
    #[inline]
    pub fn hash_words(&self, words: &KeyWords) -> u64 {
        sip13_words20(self.k0, self.k1, words)
    }

    /// The bucket of a flow key: the hash's low 16 bits.
    #[inline]
    pub fn bucket(&self, key: &FlowKey) -> Bucket {
        // Truncation is the definition: hash mod 65536.
        Bucket(self.hash(key) as u16)
    }

    /// [`BucketHasher::hash`] of eight keys (given by their [`FlowKey::words`]) at once: the
    /// same values, computed side by side in vector registers where the CPU has them, else
    /// in interleaved scalar chains ([`Sip13x8`]); a burst hashes faster than key by key.
    #[inline]
    pub fn hash8(&self, keys: &[KeyWords; 8]) -> [u64; 8] {
        self.x8.hash(keys)
    }
}

impl fmt::Debug for BucketHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key: it is derived from the cluster secret.
        f.write_str("BucketHasher { key: <secret> }")
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const SECRET: &[u8] = b"clonecluster test secret";

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn encoding_layout() {
        let k = FlowKey::new(Affinity::None, v4(192, 0, 2, 7), 0x1234, 6);
        let mut want = [0u8; 20];
        want[0] = 4;
        want[1..5].copy_from_slice(&[192, 0, 2, 7]);
        want[17] = 0x12;
        want[18] = 0x34;
        want[19] = 6;
        assert_eq!(k.to_bytes(), want);

        let k = FlowKey::new(Affinity::Single, v4(192, 0, 2, 7), 0x1234, 6);
        want[17..20].fill(0);
        assert_eq!(k.to_bytes(), want);
        assert_eq!(k, FlowKey::source(v4(192, 0, 2, 7)));

        let k = FlowKey::new(Affinity::Network, v4(192, 0, 2, 7), 0x1234, 6);
        want[4] = 0;
        assert_eq!(k.to_bytes(), want);
        assert_eq!(k.addr(), v4(192, 0, 2, 0));

        let k = FlowKey::new(Affinity::Network, v6("2001:db8:1:2:3:4:5:6"), 80, 17);
        let mut want = [0u8; 20];
        want[0] = 6;
        want[1..9].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        assert_eq!(k.to_bytes(), want);
        assert_eq!(k.addr(), v6("2001:db8:1:2::"));
    }

    #[test]
    fn affinity_groups_what_it_should() {
        let h = BucketHasher::new(SECRET);
        let b = |a, ip, port, proto| h.bucket(&FlowKey::new(a, ip, port, proto));
        // single: every port and protocol of one client in one bucket.
        assert_eq!(
            b(Affinity::Single, v4(10, 1, 2, 3), 1000, 6),
            b(Affinity::Single, v4(10, 1, 2, 3), 2000, 17)
        );
        // network: every client of a /24 or /64 in one bucket.
        assert_eq!(
            b(Affinity::Network, v4(10, 1, 2, 3), 1000, 6),
            b(Affinity::Network, v4(10, 1, 2, 250), 2000, 6)
        );
        assert_eq!(
            b(Affinity::Network, v6("2001:db8::1"), 1000, 6),
            b(Affinity::Network, v6("2001:db8::ffff:1"), 2000, 6)
        );
    }

    #[test]
    fn key_derivation_is_hmac_sha256_truncated() {
        // RFC 4231 test case 2: HMAC-SHA256(key "Jefe", "what do ya want for nothing?").
        let key = derive_key(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            key,
            [
                0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95,
                0x75, 0xc7
            ]
        );
        // Different labels give independent keys.
        assert_ne!(derive_key(SECRET, b"a"), derive_key(SECRET, b"b"));
    }

    /// PINNED VECTORS: these values are the cluster's wire contract. Nodes that disagree on
    /// them deliver the same packet twice or not at all. They were computed once with this
    /// implementation and must NEVER change without a protocol version bump (a new
    /// `BUCKET_KEY_LABEL` and a new heartbeat version). If this test fails, the change is wrong,
    /// not the vectors.
    #[test]
    fn pinned_hash_vectors() {
        let h = BucketHasher::new(SECRET);
        let cases: [(Affinity, IpAddr, u16, u8, u64); 6] = [
            (
                Affinity::None,
                v4(192, 0, 2, 1),
                40000,
                6,
                0x6f94_8905_8c49_8be1,
            ),
            (
                Affinity::None,
                v4(198, 51, 100, 9),
                53,
                17,
                0x3c1d_b1bc_4749_aa55,
            ),
            (
                Affinity::Single,
                v4(203, 0, 113, 77),
                0,
                0,
                0x0a74_d268_fcf9_2cad,
            ),
            (
                Affinity::Network,
                v4(203, 0, 113, 77),
                0,
                0,
                0x2071_8f1e_f341_4bb0,
            ),
            (
                Affinity::None,
                v6("2001:db8::1"),
                443,
                6,
                0xe2a6_eced_1486_4bcd,
            ),
            (
                Affinity::Network,
                v6("2001:db8:aaaa:bbbb:1:2:3:4"),
                0,
                0,
                0xbf14_bd3c_0e84_afed,
            ),
        ];
        for (affinity, ip, port, proto, want) in cases {
            let key = FlowKey::new(affinity, ip, port, proto);
            let got = h.hash(&key);
            assert_eq!(got, want, "{key:?}: got {got:#018x}");
            assert_eq!(h.bucket(&key), Bucket(want as u16));
        }
        assert_eq!(
            derive_key(SECRET, BUCKET_KEY_LABEL),
            [197, 122, 72, 172, 151, 13, 148, 240, 48, 20, 85, 31, 202, 117, 27, 53]
        );
    }

    #[test]
    fn buckets_are_uniform() {
        let h = BucketHasher::new(SECRET);
        let mut counts = vec![0u32; 256];
        let n = 256 * 1024;
        for i in 0..n {
            let ip = v4(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
            let b = h.bucket(&FlowKey::new(Affinity::None, ip, 1024 + (i % 7) as u16, 6));
            counts[b.index() >> 8] += 1;
        }
        // 1024 expected per range; 6 sigma is about 192.
        for c in counts {
            assert!((832..=1216).contains(&c), "{c}");
        }
    }

    proptest::proptest! {
        #[test]
        fn hash8_hashes_like_one_at_a_time(key: [u8; 16], ips in proptest::array::uniform8(0u128..), ports in proptest::array::uniform8(0u16..), v6 in proptest::array::uniform8(proptest::bool::ANY), affinity in 0u8..3) {
            let h = BucketHasher::from_key(&key);
            let affinity = [Affinity::None, Affinity::Single, Affinity::Network][usize::from(affinity)];
            let keys: [FlowKey; 8] = std::array::from_fn(|i| {
                let ip = if v6[i] { IpAddr::from(ips[i].to_be_bytes()) } else { IpAddr::from((ips[i] as u32).to_be_bytes()) };
                FlowKey::new(affinity, ip, ports[i], 6 + 11 * (i % 2) as u8)
            });
            let four = h.hash8(&keys.map(|k| *k.words()));
            for (k, got) in keys.iter().zip(four) {
                proptest::prop_assert_eq!(got, h.hash(k));
                proptest::prop_assert_eq!(got, SipHasher13::new_with_key(&key).hash(&k.to_bytes()));
            }
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let s = format!("{:?}", BucketHasher::new(SECRET));
        assert!(!s.contains("k0") && s.contains("secret"));
    }

    /// Timing sanity print, not an assertion: `cargo test --release -- --nocapture bucket_hash_speed`.
    #[test]
    fn bucket_hash_speed() {
        let h = BucketHasher::new(SECRET);
        let keys: Vec<FlowKey> = (0..1024u32)
            .map(|i| {
                let ip = if i % 2 == 0 {
                    v4(10, 0, (i >> 8) as u8, i as u8)
                } else {
                    IpAddr::V6(Ipv6Addr::from(u128::from(i) << 3))
                };
                FlowKey::new(Affinity::None, ip, i as u16, 6)
            })
            .collect();
        let rounds = if cfg!(debug_assertions) { 10 } else { 2000 };
        let start = std::time::Instant::now();
        let mut acc = 0u64;
        for _ in 0..rounds {
            for k in &keys {
                acc = acc.wrapping_add(u64::from(h.bucket(std::hint::black_box(k)).0));
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / (rounds * keys.len()) as f64;
        println!("bucket hash: {ns:.2} ns per key (acc {acc})");

        let start = std::time::Instant::now();
        for _ in 0..rounds {
            for i in 0..keys.len() as u32 {
                let ip = v4(10, 0, (i >> 8) as u8, i as u8);
                let k = FlowKey::new(Affinity::None, std::hint::black_box(ip), i as u16, 6);
                acc = acc.wrapping_add(u64::from(h.bucket(&k).0));
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / (rounds * keys.len()) as f64;
        println!("key build + bucket hash: {ns:.2} ns per packet (acc {acc})");
    }
}
