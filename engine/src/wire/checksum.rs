//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit big-endian words.
//!
//! Sums are kept unfolded in a `u64` while accumulating, so pieces (pseudo-header, header,
//! payload) can be added in any order and folded once at the end.

use std::net::IpAddr;

use super::IpProtocol;

/// Adds `data` to a running sum; an odd trailing byte is padded with zero, as RFC 1071 says.
#[inline]
pub fn accumulate(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits (not complemented).
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum field value for data whose running sum (checksum field zeroed) is `sum`.
#[inline]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// [`finish`] of a sum that fits in 32 bits: two folds, no loop.
#[inline]
pub fn finish32(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    // At most 0x1fffe before this fold: at most 0xffff after it.
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The plain checksum of one buffer (IPv4 header, ICMPv4 message).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    finish(accumulate(0, data))
}

/// Running sum of the TCP/UDP/ICMPv6 pseudo-header.
///
/// The IPv4 (RFC 793) and IPv6 (RFC 8200 §8.1) pseudo-headers sum to the same value: both
/// addresses, the protocol, and the upper-layer length. Mixed families cannot come from one
/// packet; they give a meaningless sum, never a panic.
#[inline]
pub fn pseudo_header(src: &IpAddr, dst: &IpAddr, protocol: IpProtocol, length: u32) -> u64 {
    let mut sum = match src {
        IpAddr::V4(a) => accumulate(0, &a.octets()),
        IpAddr::V6(a) => accumulate(0, &a.octets()),
    };
    sum = match dst {
        IpAddr::V4(a) => accumulate(sum, &a.octets()),
        IpAddr::V6(a) => accumulate(sum, &a.octets()),
    };
    sum + u64::from(u8::from(protocol)) + u64::from(length >> 16) + u64::from(length & 0xffff)
}

/// True when `data` (checksum field included) sums to all ones together with the pseudo-header.
#[inline]
pub fn verify_with_pseudo_header(
    src: &IpAddr,
    dst: &IpAddr,
    protocol: IpProtocol,
    data: &[u8],
) -> bool {
    let Ok(len) = u32::try_from(data.len()) else {
        return false;
    };
    fold(accumulate(pseudo_header(src, dst, protocol, len), data)) == 0xffff
}

/// The checksum field value for `data` (checksum field zeroed) under the pseudo-header.
#[inline]
pub fn compute_with_pseudo_header(
    src: &IpAddr,
    dst: &IpAddr,
    protocol: IpProtocol,
    data: &[u8],
) -> u16 {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    finish(accumulate(pseudo_header(src, dst, protocol, len), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(accumulate(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    /// Two folds finish any 32-bit sum as the loop does: the edges, and a stride through the
    /// rest.
    #[test]
    fn finish32_is_finish() {
        let edges = [
            0,
            1,
            0xfffe,
            0xffff,
            0x1_0000,
            0x1_fffe,
            0x1_ffff,
            0xffff_0000,
        ];
        let strided = (0..=u32::MAX).step_by(65_521);
        for sum in edges
            .into_iter()
            .chain(strided)
            .chain([u32::MAX - 1, u32::MAX])
        {
            assert_eq!(finish32(sum), finish(u64::from(sum)), "sum {sum:#x}");
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(accumulate(0, &[0x12, 0x34, 0x56])), 0x1234 + 0x5600);
        assert_eq!(checksum(&[]), 0xffff);
    }
}
