//! IPv4 headers (RFC 791): options, fragments, header checksum.
//!
//! A checked packet has `20 <= header_len <= total_len <= buffer.len()`; bytes past
//! `total_len` (Ethernet padding) are not part of [`Packet::payload`].

use std::net::Ipv4Addr;

use super::be;
use super::checksum;
use super::{Error, IpProtocol, Result};

mod field {
    use core::ops::Range;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const DSCP_ECN: usize = 1;
    pub(super) const LENGTH: usize = 2;
    pub(super) const IDENT: usize = 4;
    pub(super) const FLG_OFF: usize = 6;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: usize = 10;
    pub(super) const SRC: Range<usize> = 12..16;
    pub(super) const DST: Range<usize> = 16..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking version 4 and [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        if p.version() != 4 {
            return Err(Error::BadVersion);
        }
        Ok(p)
    }

    /// Checks that the header (with options) fits, that IHL >= 5, and that the total length
    /// covers the header and fits in the buffer.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = self.header_len();
        let total_len = usize::from(self.total_len());
        if header_len < HEADER_LEN {
            return Err(Error::BadLength);
        }
        if data.len() < header_len {
            return Err(Error::Truncated);
        }
        if total_len < header_len {
            return Err(Error::BadLength);
        }
        if data.len() < total_len {
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

    /// Version nibble (4).
    pub fn version(&self) -> u8 {
        self.data()[field::VER_IHL] >> 4
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.data()[field::VER_IHL] & 0x0f) * 4
    }

    /// DSCP (6 bits).
    pub fn dscp(&self) -> u8 {
        self.data()[field::DSCP_ECN] >> 2
    }

    /// ECN (2 bits).
    pub fn ecn(&self) -> u8 {
        self.data()[field::DSCP_ECN] & 0x03
    }

    /// Total length (header + payload) in bytes.
    pub fn total_len(&self) -> u16 {
        be::u16_at(self.data(), field::LENGTH)
    }

    /// Identification (shared by all fragments of one datagram).
    pub fn ident(&self) -> u16 {
        be::u16_at(self.data(), field::IDENT)
    }

    /// Don't-fragment flag.
    pub fn dont_frag(&self) -> bool {
        be::u16_at(self.data(), field::FLG_OFF) & FLAG_DF != 0
    }

    /// More-fragments flag.
    pub fn more_frags(&self) -> bool {
        be::u16_at(self.data(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field counts 8-byte units).
    pub fn frag_offset(&self) -> u16 {
        (be::u16_at(self.data(), field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// True for any fragment of a fragmented datagram (first, middle or last).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// True when this packet starts its datagram (offset 0): the L4 header is here. True for
    /// unfragmented packets too.
    pub fn is_first_fragment(&self) -> bool {
        self.frag_offset() == 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.data()[field::TTL]
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> IpProtocol {
        IpProtocol::from(self.data()[field::PROTOCOL])
    }

    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        be::u16_at(self.data(), field::CHECKSUM)
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        let d = &self.data()[field::SRC];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        let d = &self.data()[field::DST];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// The options bytes (empty when IHL is 5).
    pub fn options(&self) -> &[u8] {
        &self.data()[HEADER_LEN..self.header_len()]
    }

    /// True when the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::accumulate(0, &self.data()[..self.header_len()])) == 0xffff
    }

    /// The payload: from the end of the header to `total_len`.
    pub fn payload(&self) -> &[u8] {
        &self.data()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn data_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the version nibble.
    pub fn set_version(&mut self, version: u8) {
        let d = self.data_mut();
        d[field::VER_IHL] = (d[field::VER_IHL] & 0x0f) | (version << 4);
    }

    /// Sets the header length in bytes (rounded down to a multiple of 4).
    pub fn set_header_len(&mut self, len: usize) {
        let d = self.data_mut();
        let ihl = ((len / 4) & 0x0f) as u8;
        d[field::VER_IHL] = (d[field::VER_IHL] & 0xf0) | ihl;
    }

    /// Sets DSCP and ECN.
    pub fn set_dscp_ecn(&mut self, dscp: u8, ecn: u8) {
        self.data_mut()[field::DSCP_ECN] = (dscp << 2) | (ecn & 0x03);
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, len: u16) {
        be::put_u16(self.data_mut(), field::LENGTH, len);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, ident: u16) {
        be::put_u16(self.data_mut(), field::IDENT, ident);
    }

    /// Sets flags and fragment offset (offset in bytes, must be a multiple of 8).
    pub fn set_fragment(&mut self, dont_frag: bool, more_frags: bool, offset: u16) {
        let mut v = (offset >> 3) & OFFSET_MASK;
        if dont_frag {
            v |= FLAG_DF;
        }
        if more_frags {
            v |= FLAG_MF;
        }
        be::put_u16(self.data_mut(), field::FLG_OFF, v);
    }

    /// Sets the time to live.
    pub fn set_ttl(&mut self, ttl: u8) {
        self.data_mut()[field::TTL] = ttl;
    }

    /// Sets the protocol.
    pub fn set_protocol(&mut self, protocol: IpProtocol) {
        self.data_mut()[field::PROTOCOL] = protocol.into();
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        be::put_u16(self.data_mut(), field::CHECKSUM, value);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.data_mut()[field::SRC].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.data_mut()[field::DST].copy_from_slice(&addr.octets());
    }

    /// Computes and writes the header checksum. The header length must fit in the buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let len = self.header_len();
        let sum = checksum::checksum(&self.buffer.as_ref()[..len]);
        self.set_checksum(sum);
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), usize::from(self.total_len()));
        &mut self.data_mut()[start..end]
    }
}

/// The parsed basics of an IPv4 header (options and fragmentation are not represented;
/// emitted headers have no options, DF set, identification 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Payload protocol.
    pub protocol: IpProtocol,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Time to live.
    pub ttl: u8,
}

impl Repr {
    /// Reads a checked packet. The checksum is not verified here (see
    /// [`Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        if packet.version() != 4 {
            return Err(Error::BadVersion);
        }
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            protocol: packet.protocol(),
            payload_len: usize::from(packet.total_len()) - packet.header_len(),
            ttl: packet.ttl(),
        })
    }

    /// Always 20: no options are emitted.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes a 20-byte header with a correct checksum at the start of `buffer`.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<()> {
        let total = HEADER_LEN
            .checked_add(self.payload_len)
            .and_then(|t| u16::try_from(t).ok())
            .ok_or(Error::BadLength)?;
        let data = buffer.get_mut(..HEADER_LEN).ok_or(Error::Truncated)?;
        let mut p = Packet::new_unchecked(data);
        p.set_version(4);
        p.set_header_len(HEADER_LEN);
        p.set_dscp_ecn(0, 0);
        p.set_total_len(total);
        p.set_ident(0);
        p.set_fragment(true, false, 0);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src_addr);
        p.set_dst_addr(self.dst_addr);
        p.fill_checksum();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;

    fn ip(frame: &[u8]) -> Packet<&[u8]> {
        Packet::new_checked(&frame[14..]).unwrap()
    }

    #[test]
    fn deconstruct_echo_request() {
        let p = ip(&IPV4_ICMP_ECHO_REQUEST);
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 84);
        assert_eq!(p.ident(), 54754);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert!(p.is_first_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), IpProtocol::Icmp);
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 18, 99, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 18, 99, 2));
        assert_eq!(p.checksum(), 0x129e);
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 64);
        assert!(p.options().is_empty());
    }

    #[test]
    fn deconstruct_fragments() {
        let first = ip(&IPV4_FRAG_FIRST);
        assert!(first.is_fragment() && first.is_first_fragment() && first.more_frags());
        assert_eq!((first.ident(), first.frag_offset()), (0xd5e4, 0));
        assert!(!first.dont_frag());
        let last = ip(&IPV4_FRAG_LAST);
        assert!(last.is_fragment() && !last.is_first_fragment() && !last.more_frags());
        assert_eq!((last.ident(), last.frag_offset()), (0xd5e4, 2960));
        assert_eq!(last.payload().len(), 48);
        assert!(first.verify_checksum() && last.verify_checksum());
    }

    #[test]
    fn deconstruct_options() {
        let p = ip(&IPV4_OPTIONS_ECHO);
        assert_eq!(p.header_len(), 60);
        assert_eq!(p.options().len(), 40);
        assert_eq!(&p.options()[..4], &[0x01, 0x07, 0x27, 0x08]); // NOP, RR len 39 ptr 8
        assert_eq!(p.payload().len(), 64);
        assert!(p.verify_checksum());
    }

    #[test]
    fn padding_is_not_payload() {
        // A 46-byte UDP/IPv4 frame is exactly minimum size; add Ethernet-style padding.
        let mut buf = [0u8; 64];
        buf[..UDP4.len() - 14].copy_from_slice(&UDP4[14..]);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 12);
    }

    #[test]
    fn construct_matches_capture() {
        // The echo reply has ident 50989 and no DF; emit our defaults, then set those two.
        let p = ip(&IPV4_ICMP_ECHO_REPLY);
        let repr = Repr::parse(&p).unwrap();
        assert_eq!(repr.payload_len, 64);
        let mut out = [0u8; HEADER_LEN];
        repr.emit(&mut out).unwrap();
        let mut q = Packet::new_unchecked(&mut out[..]);
        assert!(q.verify_checksum());
        q.set_ident(p.ident());
        q.set_fragment(false, false, 0);
        q.fill_checksum();
        assert_eq!(&out[..], &IPV4_ICMP_ECHO_REPLY[14..34]);
    }

    #[test]
    fn checksum_detects_corruption_and_refills() {
        let mut buf = IPV4_ICMP_ECHO_REQUEST;
        buf[14 + 8] = 63; // ttl
        let mut p = Packet::new_checked(&mut buf[14..]).unwrap();
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
    }

    #[test]
    fn inconsistent_and_truncated() {
        let full = &IPV4_OPTIONS_ECHO[14..];
        for n in 0..full.len() {
            assert!(Packet::new_checked(&full[..n]).is_err(), "prefix {n}");
        }
        let mut bad = [0u8; 84];
        bad.copy_from_slice(&IPV4_ICMP_ECHO_REQUEST[14..]);
        bad[0] = 0x44; // IHL 4
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::BadLength));
        bad[0] = 0x45;
        bad[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::BadLength));
        bad[2..4].copy_from_slice(&85u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::Truncated));
        bad[2..4].copy_from_slice(&84u16.to_be_bytes());
        bad[0] = 0x65;
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::BadVersion));
        let repr = Repr {
            src_addr: Ipv4Addr::LOCALHOST,
            dst_addr: Ipv4Addr::LOCALHOST,
            protocol: IpProtocol::Udp,
            payload_len: 65_516,
            ttl: 1,
        };
        assert_eq!(repr.emit(&mut [0u8; 20]), Err(Error::BadLength));
    }
}
