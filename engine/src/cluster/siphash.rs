//! SipHash-1-3 of fixed-size messages, the hash under the bucket hash, the flow table's
//! fingerprints and the fragment tracker: one message at a time ([`sip13`]), 20-byte flow keys
//! given as words in lock step ([`sip13_words20_lanes`]), and a burst's flow keys eight at a
//! time in x86 vector registers ([`Sip13x8`], AVX-512 or AVX2 when the CPU has them, chosen once at run time).
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
    sip13_words(k0, k1, N / 8 + 1, |i| [word(m, i)])[0]
}

/// SipHash-1-3 of `L` messages of `n` words each in lock step, `words(i)` giving every
/// message's word `i` as SipHash compresses it (the last one with the length): each step of
/// the algorithm runs for every lane before the next, so the lanes' independent chains fill
/// the pipeline.
#[inline(always)]
fn sip13_words<const L: usize>(
    k0: u64,
    k1: u64,
    n: usize,
    words: impl Fn(usize) -> [u64; L],
) -> [u64; L] {
    let mut v = [init(k0, k1); L];
    for i in 0..n {
        let w = words(i);
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

/// A 20-byte message as SipHash reads it: bytes `0..8`, `8..16` and `16..20` as
/// little-endian words, the last one's top four bytes zero.
pub type Words20 = [u64; 3];

/// The last word SipHash compresses for a 20-byte message: its tail and the length.
#[inline(always)]
fn last20(w: u64) -> u64 {
    w | (20u64 << 56)
}

/// [`sip13`] of a 20-byte message given as [`Words20`].
#[inline]
pub(crate) fn sip13_words20(k0: u64, k1: u64, m: &Words20) -> u64 {
    sip13_words20_lanes(k0, k1, &[*m])[0]
}

/// [`sip13_words20`] of `L` messages in lock step (same values).
#[inline]
pub(crate) fn sip13_words20_lanes<const L: usize>(k0: u64, k1: u64, m: &[Words20; L]) -> [u64; L] {
    sip13_words(k0, k1, 3, |i| {
        m.map(|m| if i == 2 { last20(m[2]) } else { m[i] })
    })
}

/// Which implementation [`Sip13x8`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// [`sip13_words20_lanes`]: scalar chains in lock step. Any CPU.
    Scalar,
    /// Two 256-bit registers per SipHash state word, a lane per message (two independent
    /// chains of four); rotations by shifts and shuffles.
    Avx2,
    /// As AVX2, with AVX-512VL's one-instruction 64-bit rotations (and AVX-512DQ's 64-bit
    /// multiply for the flow fingerprints, `FlowHash::from_parts8`).
    Avx512,
}

/// Which SipHash implementation hashes each burst's flow keys. All give the same values (the
/// buckets do not depend on it); `auto` picks the fastest this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashLanes {
    #[default]
    Auto,
    /// Plain 64-bit arithmetic: any CPU.
    Scalar,
    /// 256-bit vector registers (x86-64 with AVX2).
    Avx2,
    /// 256-bit vector registers with AVX-512VL's rotations (x86-64 with AVX-512F, VL and DQ).
    Avx512,
}

impl Lanes {
    /// The implementation as `dataplane.hash_lanes` names it.
    pub fn name(self) -> &'static str {
        match self {
            Lanes::Scalar => "scalar",
            Lanes::Avx2 => "avx2",
            Lanes::Avx512 => "avx512",
        }
    }

    /// The fastest implementation this CPU runs.
    pub fn best() -> Lanes {
        // `available` lists them slowest first.
        Lanes::available().pop().unwrap_or(Lanes::Scalar)
    }

    /// Whether this CPU runs this implementation.
    fn runs_here(self) -> bool {
        match self {
            Lanes::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Lanes::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Lanes::Avx512 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// What `dataplane.hash_lanes` asks for: `Auto` is [`Lanes::best`]; an implementation
    /// this CPU lacks is an error saying which.
    pub fn from_config(wanted: HashLanes) -> Result<Lanes, String> {
        let lanes = match wanted {
            HashLanes::Auto => return Ok(Lanes::best()),
            HashLanes::Scalar => Lanes::Scalar,
            HashLanes::Avx2 => Lanes::Avx2,
            HashLanes::Avx512 => Lanes::Avx512,
        };
        if lanes.runs_here() {
            Ok(lanes)
        } else {
            Err(format!(
                "`{}` is not available on this CPU (it has {})",
                match lanes {
                    Lanes::Avx2 => "avx2: it needs AVX2",
                    _ => "avx512: it needs AVX-512F, AVX-512VL and AVX-512DQ",
                },
                Lanes::available()
                    .iter()
                    .map(|l| l.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    /// Every implementation this CPU runs, slowest (`Scalar`) first.
    pub fn available() -> Vec<Lanes> {
        [Lanes::Scalar, Lanes::Avx2, Lanes::Avx512]
            .into_iter()
            .filter(|l| l.runs_here())
            .collect()
    }
}

/// SipHash-1-3 of eight 20-byte messages at once (a burst's flow keys), keyed once.
#[derive(Clone)]
pub struct Sip13x8 {
    k0: u64,
    k1: u64,
    lanes: Lanes,
}

impl std::fmt::Debug for Sip13x8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys: they are derived from the cluster secret.
        write!(f, "Sip13x8 {{ lanes: {:?}, key: <secret> }}", self.lanes)
    }
}

impl Sip13x8 {
    /// Keys `k0`, `k1`, with the fastest implementation this CPU runs.
    pub fn new(k0: u64, k1: u64) -> Sip13x8 {
        Sip13x8::with(k0, k1, Lanes::best())
    }

    /// Keys `k0`, `k1`, with implementation `lanes`, which must be one of
    /// [`Lanes::available`] (anything else falls back to `Scalar`).
    pub fn with(k0: u64, k1: u64, lanes: Lanes) -> Sip13x8 {
        let lanes = if lanes.runs_here() {
            lanes
        } else {
            Lanes::Scalar
        };
        Sip13x8 { k0, k1, lanes }
    }

    /// The implementation in use.
    pub fn lanes(&self) -> Lanes {
        self.lanes
    }

    /// `[sip13_words20(k0, k1, &m[0]), ..., sip13_words20(k0, k1, &m[7])]`.
    #[inline]
    pub fn hash(&self, m: &[Words20; 8]) -> [u64; 8] {
        match self.lanes {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with` keeps `Avx512` only when the CPU has AVX-512F, VL and DQ.
            Lanes::Avx512 => unsafe { x86::sip13x8_avx512(self.k0, self.k1, m) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with` keeps `Avx2` only when the CPU has AVX2.
            Lanes::Avx2 => unsafe { x86::sip13x8_avx2(self.k0, self.k1, m) },
            _ => {
                // Two groups of four: eight scalar chains at once run out of registers.
                let [a, b] = [&m[..4], &m[4..]].map(|m| {
                    let m: &[Words20; 4] = m.try_into().unwrap_or_else(|_| unreachable!());
                    sip13_words20_lanes(self.k0, self.k1, m)
                });
                [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
            }
        }
    }
}

/// The vector implementations: each of the four state words `v0..v3` in 256-bit registers
/// holding that word for four messages. Macros rather than helper functions, because a
/// helper would not be compiled with its caller's target features.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{init, last20, Words20};

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

    /// One function per instruction set; `$rotl` is the rotation macro. Messages 0..4 go
    /// in chain 0, 4..8 in chain 1: two independent dependency chains for the CPU to overlap.
    macro_rules! sip13x8 {
        ($name:ident, $features:literal, $rotl:ident) => {
            #[target_feature(enable = $features)]
            pub(super) fn $name(k0: u64, k1: u64, m: &[Words20; 8]) -> [u64; 8] {
                macro_rules! round {
                    ($v:expr) => {
                        let v = &mut $v;
                        v[0] = _mm256_add_epi64(v[0], v[1]);
                        v[1] = _mm256_xor_si256($rotl!(v[1], 13), v[0]);
                        v[0] = $rotl!(v[0], 32);
                        v[2] = _mm256_add_epi64(v[2], v[3]);
                        v[3] = _mm256_xor_si256($rotl!(v[3], 16), v[2]);
                        v[0] = _mm256_add_epi64(v[0], v[3]);
                        v[3] = _mm256_xor_si256($rotl!(v[3], 21), v[0]);
                        v[2] = _mm256_add_epi64(v[2], v[1]);
                        v[1] = _mm256_xor_si256($rotl!(v[1], 17), v[2]);
                        v[2] = $rotl!(v[2], 32);
                    };
                }
                let s = init(k0, k1);
                let s = [
                    _mm256_set1_epi64x(s[0] as i64),
                    _mm256_set1_epi64x(s[1] as i64),
                    _mm256_set1_epi64x(s[2] as i64),
                    _mm256_set1_epi64x(s[3] as i64),
                ];
                let mut v = [s, s];
                for i in 0..3 {
                    let mut w = [_mm256_setzero_si256(); 2];
                    for (c, w) in w.iter_mut().enumerate() {
                        // Lane j holds message 4c + j's word i (set's arguments go highest
                        // lane first).
                        let m = &m[4 * c..4 * c + 4];
                        let word =
                            |j: usize| (if i == 2 { last20(m[j][2]) } else { m[j][i] }) as i64;
                        *w = _mm256_set_epi64x(word(3), word(2), word(1), word(0));
                    }
                    for (v, w) in v.iter_mut().zip(&w) {
                        v[3] = _mm256_xor_si256(v[3], *w);
                    }
                    round!(v[0]);
                    round!(v[1]);
                    for (v, w) in v.iter_mut().zip(&w) {
                        v[0] = _mm256_xor_si256(v[0], *w);
                    }
                }
                let ff = _mm256_set1_epi64x(0xff);
                v[0][2] = _mm256_xor_si256(v[0][2], ff);
                v[1][2] = _mm256_xor_si256(v[1][2], ff);
                for _ in 0..3 {
                    round!(v[0]);
                    round!(v[1]);
                }
                let h = v.map(|v| {
                    _mm256_xor_si256(_mm256_xor_si256(v[0], v[1]), _mm256_xor_si256(v[2], v[3]))
                });
                // SAFETY: `[__m256i; 2]` and `[u64; 8]` are both 64 plain bytes; every bit
                // pattern is a valid value of either, and lane j of chain c is at bytes
                // 8(4c + j)..8(4c + j + 1) of both.
                unsafe { std::mem::transmute::<[__m256i; 2], [u64; 8]>(h) }
            }
        };
    }

    sip13x8!(sip13x8_avx2, "avx2", rotl_avx2);
    sip13x8!(sip13x8_avx512, "avx2,avx512f,avx512vl", rotl_avx512);
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

        /// Every implementation this CPU runs gives the same values (on a CPU without AVX2
        /// only `Scalar` runs here; `best_is_available_and_used` prints which ran).
        #[test]
        fn every_x8_implementation_agrees(key: [u8; 16], m in proptest::array::uniform8(proptest::array::uniform20(0u8..))) {
            let (k0, k1) = SipHasher13::new_with_key(&key).keys();
            let want = m.each_ref().map(|m| sip13(k0, k1, m));
            let words: [Words20; 8] = m.map(|m| {
                let mut w = [0u64; 3];
                for (i, w) in w.iter_mut().enumerate() {
                    let mut b = [0u8; 8];
                    let end = (8 * i + 8).min(20);
                    b[..end - 8 * i].copy_from_slice(&m[8 * i..end]);
                    *w = u64::from_le_bytes(b);
                }
                w
            });
            proptest::prop_assert_eq!(sip13_words20(k0, k1, &words[0]), want[0]);
            for lanes in Lanes::available() {
                let h = Sip13x8::with(k0, k1, lanes);
                proptest::prop_assert_eq!(h.lanes(), lanes);
                proptest::prop_assert_eq!(h.hash(&words), want, "{:?}", lanes);
            }
        }
    }

    #[test]
    fn config_asks_for_an_implementation() {
        assert_eq!(Lanes::from_config(HashLanes::Auto), Ok(Lanes::best()));
        assert_eq!(Lanes::from_config(HashLanes::Scalar), Ok(Lanes::Scalar));
        for (wanted, lanes) in [
            (HashLanes::Avx2, Lanes::Avx2),
            (HashLanes::Avx512, Lanes::Avx512),
        ] {
            match Lanes::from_config(wanted) {
                Ok(got) => assert!(got == lanes && Lanes::available().contains(&lanes)),
                Err(e) => {
                    assert!(!Lanes::available().contains(&lanes));
                    assert!(e.contains("not available on this CPU"), "{e}");
                }
            }
        }
    }

    #[test]
    fn best_is_available_and_used() {
        let best = Lanes::best();
        assert!(Lanes::available().contains(&best));
        assert_eq!(Sip13x8::new(1, 2).lanes(), best);
        eprintln!("SipHash x8 lanes on this CPU: {:?}", Lanes::available());
    }
}
