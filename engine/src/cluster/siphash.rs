//! SipHash-1-3 of fixed-size messages, the hash under the bucket hash, the flow table's
//! fingerprints and the fragment tracker: one message at a time ([`sip13`]), several in lock
//! step ([`sip13_lanes`]), and four 20-byte flow keys at once in x86 vector registers
//! ([`Sip13x4`], AVX-512 or AVX2 when the CPU has them, chosen once at run time).
//!
//! Every variant gives exactly `siphasher`'s `SipHasher13` value (checked by property tests):
//! which one runs is a matter of speed, never of which bucket a flow lands in.

/// SipHash's initial state for keys `k0`, `k1`.
#[inline(always)]
fn init(k0: u64, k1: u64) -> [u64; 4] {
    [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ]
}

/// One SipRound.
#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// Word `i` (of `N / 8 + 1`) of a message as SipHash reads it: little-endian, the last word
/// zero-padded with the message length (mod 256) in its top byte.
#[inline(always)]
fn word<const N: usize>(m: &[u8; N], i: usize) -> u64 {
    let full = N / 8 * 8;
    let mut b = [0u8; 8];
    if i * 8 < full {
        b.copy_from_slice(&m[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    } else {
        b[..N - full].copy_from_slice(&m[full..]);
        u64::from_le_bytes(b) | ((N as u64) << 56)
    }
}

/// SipHash-1-3 of a fixed-size message, unrolled by the compiler: the same value as
/// `siphasher`'s `SipHasher13`, without its generic buffering.
#[inline]
pub(crate) fn sip13<const N: usize>(k0: u64, k1: u64, m: &[u8; N]) -> u64 {
    let mut v = init(k0, k1);
    for i in 0..=N / 8 {
        let w = word(m, i);
        v[3] ^= w;
        round(&mut v);
        v[0] ^= w;
    }
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// [`sip13`] of `L` messages in lock step (same values): each step of the algorithm runs for
/// every lane before the next, so the lanes' independent chains fill the pipeline.
#[inline]
pub(crate) fn sip13_lanes<const N: usize, const L: usize>(
    k0: u64,
    k1: u64,
    m: &[&[u8; N]; L],
) -> [u64; L] {
    let mut v = [init(k0, k1); L];
    for i in 0..=N / 8 {
        let w = m.map(|m| word(m, i));
        for (v, w) in v.iter_mut().zip(&w) {
            v[3] ^= w;
        }
        for v in v.iter_mut() {
            round(v);
        }
        for (v, w) in v.iter_mut().zip(&w) {
            v[0] ^= w;
        }
    }
    for v in v.iter_mut() {
        v[2] ^= 0xff;
    }
    for _ in 0..3 {
        for v in v.iter_mut() {
            round(v);
        }
    }
    v.map(|v| v[0] ^ v[1] ^ v[2] ^ v[3])
}

/// Which implementation [`Sip13x4`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// [`sip13_lanes`]: four scalar chains in lock step. Any CPU.
    Scalar,
    /// One 256-bit register per SipHash state word, a lane per message; rotations by shifts.
    Avx2,
    /// As AVX2, with AVX-512VL's one-instruction 64-bit rotations.
    Avx512,
}

impl Lanes {
    /// The fastest implementation this CPU runs.
    pub fn best() -> Lanes {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Lanes::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Lanes::Avx2;
            }
        }
        Lanes::Scalar
    }

    /// Every implementation this CPU runs, `Scalar` first (for tests and benches).
    pub fn available() -> Vec<Lanes> {
        let mut all = vec![Lanes::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Lanes::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                all.push(Lanes::Avx512);
            }
        }
        all
    }
}

/// SipHash-1-3 of four 20-byte messages at once (a burst's flow keys), keyed once.
#[derive(Clone)]
pub struct Sip13x4 {
    k0: u64,
    k1: u64,
    lanes: Lanes,
}

impl std::fmt::Debug for Sip13x4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys: they are derived from the cluster secret.
        write!(f, "Sip13x4 {{ lanes: {:?}, key: <secret> }}", self.lanes)
    }
}

/// The message length [`Sip13x4`] hashes: a flow key's encoding.
pub const X4_LEN: usize = 20;

impl Sip13x4 {
    /// Keys `k0`, `k1`, with the fastest implementation this CPU runs.
    pub fn new(k0: u64, k1: u64) -> Sip13x4 {
        Sip13x4::with(k0, k1, Lanes::best())
    }

    /// Keys `k0`, `k1`, with implementation `lanes`, which must be one of
    /// [`Lanes::available`] (anything else falls back to `Scalar`).
    pub fn with(k0: u64, k1: u64, lanes: Lanes) -> Sip13x4 {
        let lanes = if Lanes::available().contains(&lanes) {
            lanes
        } else {
            Lanes::Scalar
        };
        Sip13x4 { k0, k1, lanes }
    }

    /// The implementation in use.
    pub fn lanes(&self) -> Lanes {
        self.lanes
    }

    /// `[sip13(k0, k1, m[0]), ..., sip13(k0, k1, m[3])]`.
    #[inline]
    pub fn hash(&self, m: &[&[u8; X4_LEN]; 4]) -> [u64; 4] {
        match self.lanes {
            Lanes::Scalar => sip13_lanes(self.k0, self.k1, m),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with` keeps `Avx512` only when the CPU has AVX-512F and AVX-512VL.
            Lanes::Avx512 => unsafe { x86::sip13x4_avx512(self.k0, self.k1, m) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with` keeps `Avx2` only when the CPU has AVX2.
            Lanes::Avx2 => unsafe { x86::sip13x4_avx2(self.k0, self.k1, m) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => sip13_lanes(self.k0, self.k1, m),
        }
    }
}

/// The vector implementations: the four state words `v0..v3` each in one 256-bit register
/// holding that word for all four messages. Macros rather than helper functions, because a
/// helper would not be compiled with its caller's target features.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{init, word, X4_LEN};

    /// Rotates every 64-bit lane left, AVX2: by a shuffle where the distance is a multiple of
    /// 16 bits, by two shifts otherwise.
    macro_rules! rotl_avx2 {
        ($x:expr, 32) => {
            _mm256_shuffle_epi32::<0b1011_0001>($x)
        };
        ($x:expr, 16) => {
            _mm256_shuffle_epi8(
                $x,
                _mm256_setr_epi8(
                    6, 7, 0, 1, 2, 3, 4, 5, 14, 15, 8, 9, 10, 11, 12, 13, 6, 7, 0, 1, 2, 3, 4, 5,
                    14, 15, 8, 9, 10, 11, 12, 13,
                ),
            )
        };
        ($x:expr, $n:literal) => {{
            let x = $x;
            _mm256_or_si256(
                _mm256_slli_epi64::<$n>(x),
                _mm256_srli_epi64::<{ 64 - $n }>(x),
            )
        }};
    }

    /// Rotates every 64-bit lane left, AVX-512VL: one `vprolq`.
    macro_rules! rotl_avx512 {
        ($x:expr, $n:literal) => {
            _mm256_rol_epi64::<$n>($x)
        };
    }

    /// One function per instruction set; `$rotl` is the rotation macro.
    macro_rules! sip13x4 {
        ($name:ident, $features:literal, $rotl:ident) => {
            #[target_feature(enable = $features)]
            pub(super) fn $name(k0: u64, k1: u64, m: &[&[u8; X4_LEN]; 4]) -> [u64; 4] {
                macro_rules! round {
                    ($v:ident) => {
                        $v[0] = _mm256_add_epi64($v[0], $v[1]);
                        $v[1] = _mm256_xor_si256($rotl!($v[1], 13), $v[0]);
                        $v[0] = $rotl!($v[0], 32);
                        $v[2] = _mm256_add_epi64($v[2], $v[3]);
                        $v[3] = _mm256_xor_si256($rotl!($v[3], 16), $v[2]);
                        $v[0] = _mm256_add_epi64($v[0], $v[3]);
                        $v[3] = _mm256_xor_si256($rotl!($v[3], 21), $v[0]);
                        $v[2] = _mm256_add_epi64($v[2], $v[1]);
                        $v[1] = _mm256_xor_si256($rotl!($v[1], 17), $v[2]);
                        $v[2] = $rotl!($v[2], 32);
                    };
                }
                let s = init(k0, k1);
                let mut v = [
                    _mm256_set1_epi64x(s[0] as i64),
                    _mm256_set1_epi64x(s[1] as i64),
                    _mm256_set1_epi64x(s[2] as i64),
                    _mm256_set1_epi64x(s[3] as i64),
                ];
                for i in 0..=X4_LEN / 8 {
                    // Lane j holds message j's word i (set's arguments go highest lane first).
                    let w = _mm256_set_epi64x(
                        word(m[3], i) as i64,
                        word(m[2], i) as i64,
                        word(m[1], i) as i64,
                        word(m[0], i) as i64,
                    );
                    v[3] = _mm256_xor_si256(v[3], w);
                    round!(v);
                    v[0] = _mm256_xor_si256(v[0], w);
                }
                v[2] = _mm256_xor_si256(v[2], _mm256_set1_epi64x(0xff));
                round!(v);
                round!(v);
                round!(v);
                let h =
                    _mm256_xor_si256(_mm256_xor_si256(v[0], v[1]), _mm256_xor_si256(v[2], v[3]));
                // SAFETY: `__m256i` and `[u64; 4]` are both 32 plain bytes; every bit pattern is
                // a valid value of either, and lane j is at bytes 8j..8j+8 of both.
                unsafe { std::mem::transmute::<__m256i, [u64; 4]>(h) }
            }
        };
    }

    sip13x4!(sip13x4_avx2, "avx2", rotl_avx2);
    sip13x4!(sip13x4_avx512, "avx2,avx512f,avx512vl", rotl_avx512);
}

#[cfg(test)]
mod tests {
    use siphasher::sip::SipHasher13;

    use super::*;

    proptest::proptest! {
        #[test]
        fn sip13_is_siphash13(key: [u8; 16], m20: [u8; 20], m37 in proptest::array::uniform::<_, 37>(0u8..)) {
            let sip = SipHasher13::new_with_key(&key);
            let (k0, k1) = sip.keys();
            proptest::prop_assert_eq!(sip13(k0, k1, &m20), sip.hash(&m20));
            proptest::prop_assert_eq!(sip13(k0, k1, &m37), sip.hash(&m37));
            proptest::prop_assert_eq!(sip13(k0, k1, &[0u8; 0]), sip.hash(&[]));
            proptest::prop_assert_eq!(sip13(k0, k1, &[7u8; 8]), sip.hash(&[7; 8]));
        }

        #[test]
        fn lanes_hash_like_one_at_a_time(key: [u8; 16], m in proptest::array::uniform4(proptest::array::uniform20(0u8..)), m37 in proptest::array::uniform2(proptest::array::uniform::<_, 37>(0u8..))) {
            let (k0, k1) = SipHasher13::new_with_key(&key).keys();
            let want = m.each_ref().map(|m| sip13(k0, k1, m));
            proptest::prop_assert_eq!(sip13_lanes(k0, k1, &m.each_ref()), want);
            let two = sip13_lanes(k0, k1, &m37.each_ref());
            proptest::prop_assert_eq!(two, m37.each_ref().map(|m| sip13(k0, k1, m)));
        }

        /// Every implementation this CPU runs gives the same values (on a CPU without AVX2
        /// only `Scalar` runs here: the test says which ran in its name's output).
        #[test]
        fn every_x4_implementation_agrees(key: [u8; 16], m in proptest::array::uniform4(proptest::array::uniform20(0u8..))) {
            let (k0, k1) = SipHasher13::new_with_key(&key).keys();
            let want = m.each_ref().map(|m| sip13(k0, k1, m));
            for lanes in Lanes::available() {
                let h = Sip13x4::with(k0, k1, lanes);
                proptest::prop_assert_eq!(h.lanes(), lanes);
                proptest::prop_assert_eq!(h.hash(&m.each_ref()), want, "{:?}", lanes);
            }
        }
    }

    #[test]
    fn best_is_available_and_used() {
        let best = Lanes::best();
        assert!(Lanes::available().contains(&best));
        assert_eq!(Sip13x4::new(1, 2).lanes(), best);
        eprintln!("SipHash x4 lanes on this CPU: {:?}", Lanes::available());
    }
}
