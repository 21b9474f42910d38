//! Flow keys and the keyed bucket hash: `bucket = SipHash-1-3(key, encoding(flow key)) mod 65536`.
//!
//! This is part of the cluster's wire contract: every node must map every packet to the same
//! bucket, whatever its build, CPU or version. The exact algorithm is:
//!
//! 1. **Key derivation.** `key = HMAC-SHA256(key = cluster secret, message =
//!    b"clonecluster bucket key v1")[0..16]` ([`derive_key`] with [`BUCKET_KEY_LABEL`]). The
//!    SipHash keys are `k0 = u64::from_le_bytes(key[0..8])`, `k1 = u64::from_le_bytes(key[8..16])`.
//!    The key is secret, so nobody outside the cluster can aim traffic at one node.
//! 2. **Encoding.** A flow key is exactly 20 bytes ([`FlowKey::as_bytes`]):
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

use super::siphash::{sip13, Sip13x4};
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
/// Holds its own 20-byte wire encoding (see the module doc), so hashing it copies nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey([u8; KEY_LEN]);

impl FlowKey {
    /// All zeros: a placeholder (no packet has it: the family byte is 4 or 6).
    pub const ZERO: FlowKey = FlowKey([0; KEY_LEN]);

    /// The key of a packet from `src`/`src_port` with IP protocol `proto`, under `affinity`.
    #[inline]
    pub fn new(affinity: Affinity, src: IpAddr, src_port: u16, proto: u8) -> FlowKey {
        let mut b = [0u8; KEY_LEN];
        match src {
            // Whole addresses, then the masked bytes cleared: fixed-size copies, no memcpy call.
            IpAddr::V4(v4) => {
                b[FAMILY] = 4;
                b[ADDR..ADDR + 4].copy_from_slice(&v4.octets());
                if affinity == Affinity::Network {
                    b[ADDR + 3] = 0;
                }
            }
            IpAddr::V6(v6) => {
                b[FAMILY] = 6;
                b[ADDR..ADDR + 16].copy_from_slice(&v6.octets());
                if affinity == Affinity::Network {
                    b[ADDR + 8..ADDR + 16].fill(0);
                }
            }
        }
        if affinity == Affinity::None {
            b[PORT..PORT + 2].copy_from_slice(&src_port.to_be_bytes());
            b[PROTO] = proto;
        }
        FlowKey(b)
    }

    /// The key of packets owned by source address alone, whatever the affinity (ICMP echo,
    /// IP protocols without ports): the same as affinity `single`.
    #[inline]
    pub fn source(src: IpAddr) -> FlowKey {
        FlowKey::new(Affinity::Single, src, 0, 0)
    }

    /// The exact bytes the bucket hash reads.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The (possibly masked) source address.
    pub fn addr(&self) -> IpAddr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.0[ADDR..ADDR + 16]);
        if self.0[FAMILY] == 4 {
            IpAddr::from([a[0], a[1], a[2], a[3]])
        } else {
            IpAddr::from(a)
        }
    }

    /// The source port, 0 unless affinity `none`.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes([self.0[PORT], self.0[PORT + 1]])
    }

    /// The IP protocol, 0 unless affinity `none`.
    pub fn proto(&self) -> u8 {
        self.0[PROTO]
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
    x4: Sip13x4,
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
            x4: Sip13x4::new(k0, k1),
        }
    }

    /// The full 64-bit hash of a flow key.
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        sip13(self.k0, self.k1, key.as_bytes())
    }

    /// The bucket of a flow key: the hash's low 16 bits.
    #[inline]
    pub fn bucket(&self, key: &FlowKey) -> Bucket {
        // Truncation is the definition: hash mod 65536.
        Bucket(self.hash(key) as u16)
    }

    /// [`BucketHasher::hash`] of four keys at once: the same values, computed side by side in
    /// vector registers where the CPU has them, else in four interleaved scalar chains
    /// ([`Sip13x4`]); a burst hashes faster than key by key.
    #[inline]
    pub fn hash4(&self, keys: &[FlowKey; 4]) -> [u64; 4] {
        self.x4.hash(&keys.each_ref().map(FlowKey::as_bytes))
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
        assert_eq!(k.as_bytes(), &want);

        let k = FlowKey::new(Affinity::Single, v4(192, 0, 2, 7), 0x1234, 6);
        want[17..20].fill(0);
        assert_eq!(k.as_bytes(), &want);
        assert_eq!(k, FlowKey::source(v4(192, 0, 2, 7)));

        let k = FlowKey::new(Affinity::Network, v4(192, 0, 2, 7), 0x1234, 6);
        want[4] = 0;
        assert_eq!(k.as_bytes(), &want);
        assert_eq!(k.addr(), v4(192, 0, 2, 0));

        let k = FlowKey::new(Affinity::Network, v6("2001:db8:1:2:3:4:5:6"), 80, 17);
        let mut want = [0u8; 20];
        want[0] = 6;
        want[1..9].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        assert_eq!(k.as_bytes(), &want);
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
        fn hash4_hashes_like_one_at_a_time(key: [u8; 16], m in proptest::array::uniform4(proptest::array::uniform20(0u8..))) {
            let h = BucketHasher::from_key(&key);
            let keys = m.map(FlowKey);
            let four = h.hash4(&keys);
            for (k, got) in keys.iter().zip(four) {
                proptest::prop_assert_eq!(got, h.hash(k));
                proptest::prop_assert_eq!(got, SipHasher13::new_with_key(&key).hash(k.as_bytes()));
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
