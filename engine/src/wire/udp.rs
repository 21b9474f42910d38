//! UDP datagrams (RFC 768): ports, length, checksum.
//!
//! A checked packet has `8 <= length <= buffer.len()`; [`Packet::payload`] ends at `length`.
//! A zero checksum means "none" over IPv4 and is invalid over IPv6 (RFC 8200 §8.1).

use std::net::IpAddr;

use super::be;
use super::checksum;
use super::{Error, IpProtocol, Result};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const LENGTH: usize = 4;
    pub(super) const CHECKSUM: usize = 6;
}

/// Length of the header.
pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks that the header fits and that the length field covers the header and fits.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field_len = usize::from(self.len());
        if field_len < HEADER_LEN {
            return Err(Error::BadLength);
        }
        if len < field_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Unwraps the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn data(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be::u16_at(self.data(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be::u16_at(self.data(), field::DST_PORT)
    }

    /// Length field (header + payload).
    pub fn len(&self) -> u16 {
        be::u16_at(self.data(), field::LENGTH)
    }

    /// True when the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be::u16_at(self.data(), field::CHECKSUM)
    }

    /// The payload, up to the length field.
    pub fn payload(&self) -> &[u8] {
        &self.data()[HEADER_LEN..usize::from(self.len())]
    }

    /// True when the checksum verifies over the datagram (up to the length field) and the
    /// pseudo-header; true for a zero checksum over IPv4, false for one over IPv6.
    pub fn verify_checksum(&self, src: &IpAddr, dst: &IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4();
        }
        let datagram = &self.data()[..usize::from(self.len())];
        checksum::verify_with_pseudo_header(src, dst, IpProtocol::Udp, datagram)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn data_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the source port.
    pub fn set_src_port(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::SRC_PORT, v);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::DST_PORT, v);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::LENGTH, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::CHECKSUM, v);
    }

    /// Computes and writes the checksum (0 is sent as 0xffff). The length field must fit in
    /// the buffer.
    pub fn fill_checksum(&mut self, src: &IpAddr, dst: &IpAddr) {
        self.set_checksum(0);
        let end = usize::from(self.len());
        let sum = checksum::compute_with_pseudo_header(
            src,
            dst,
            IpProtocol::Udp,
            &self.buffer.as_ref()[..end],
        );
        self.set_checksum(if sum == 0 { 0xffff } else { sum });
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.data_mut()[HEADER_LEN..end]
    }
}

/// A parsed UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl Repr {
    /// Reads a checked datagram (checksum not verified).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload_len: usize::from(packet.len()) - HEADER_LEN,
        })
    }

    /// Header plus payload length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// Writes the header at the start of `datagram` and fills the checksum over the header and
    /// the `payload_len` bytes the caller already put after it.
    pub fn emit(&self, datagram: &mut [u8], src: &IpAddr, dst: &IpAddr) -> Result<()> {
        let len = u16::try_from(self.buffer_len()).map_err(|_| Error::BadLength)?;
        let data = datagram
            .get_mut(..self.buffer_len())
            .ok_or(Error::Truncated)?;
        let mut p = Packet::new_unchecked(data);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len(len);
        p.fill_checksum(src, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;

    const V4_A: [u8; 4] = [198, 18, 99, 1];
    const V4_B: [u8; 4] = [198, 18, 99, 2];

    #[test]
    fn deconstruct_v4() {
        let p = Packet::new_checked(&UDP4[34..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port(), p.len()), (41901, 5353, 12));
        assert_eq!(p.payload(), b"ping");
        assert!(p.verify_checksum(&V4_A.into(), &V4_B.into()));
        assert!(!p.verify_checksum(&V4_B.into(), &[198, 18, 99, 9].into()));
    }

    #[test]
    fn deconstruct_v6() {
        let src: IpAddr = "2001:2::1".parse().unwrap();
        let dst: IpAddr = "2001:2::2".parse().unwrap();
        let p = Packet::new_checked(&UDP6[54..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port()), (36860, 5354));
        assert_eq!(p.payload(), b"ping");
        assert!(p.verify_checksum(&src, &dst));
        let mut zero = [0u8; 12];
        zero.copy_from_slice(&UDP6[54..]);
        zero[6..8].fill(0);
        assert!(!Packet::new_checked(&zero[..])
            .unwrap()
            .verify_checksum(&src, &dst));
        assert!(Packet::new_checked(&zero[..])
            .unwrap()
            .verify_checksum(&V4_A.into(), &V4_B.into()));
    }

    #[test]
    fn construct_matches_capture() {
        let seg = &UDP4[34..];
        let repr = Repr::parse(&Packet::new_checked(seg).unwrap()).unwrap();
        assert_eq!(repr.payload_len, 4);
        let mut out = [0u8; 12];
        out[8..].copy_from_slice(b"ping");
        repr.emit(&mut out, &V4_A.into(), &V4_B.into()).unwrap();
        assert_eq!(&out[..], seg);
        assert_eq!(
            repr.emit(&mut out[..11], &V4_A.into(), &V4_B.into()),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn truncated_and_bad_length() {
        let seg = &UDP4[34..];
        for n in 0..seg.len() {
            assert_eq!(Packet::new_checked(&seg[..n]).err(), Some(Error::Truncated));
        }
        let mut bad = [0u8; 12];
        bad.copy_from_slice(seg);
        bad[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::BadLength));
    }
}
