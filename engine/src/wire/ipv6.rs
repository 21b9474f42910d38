//! IPv6 (RFC 8200): the fixed header and a bounded walk over the extension-header chain.
//!
//! [`walk_chain`] follows hop-by-hop, routing, fragment, destination-options, AH and the other
//! RFC 7045 style extension headers to the upper-layer protocol, recording the fragment header
//! if there is one. It stops after [`MAX_EXT_HEADERS`] headers (`Error::Malformed`), so a
//! packet made of nothing but options cannot hold a core. Behind a non-first fragment there is
//! no header chain, only data: the walk stops at the fragment header.

use std::net::Ipv6Addr;

use super::be;
use super::{Error, IpProtocol, Result};

mod field {
    use core::ops::Range;
    pub(super) const VER_TC_FLOW: usize = 0;
    pub(super) const LENGTH: usize = 4;
    pub(super) const NXT_HDR: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC: Range<usize> = 8..24;
    pub(super) const DST: Range<usize> = 24..40;
}

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;

/// How many extension headers [`walk_chain`] follows before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn addr_at(data: &[u8], range: core::ops::Range<usize>) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&data[range]);
    Ipv6Addr::from(a)
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking version 6 and [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        if p.version() != 6 {
            return Err(Error::BadVersion);
        }
        Ok(p)
    }

    /// Checks that the fixed header and the payload length it announces fit in the buffer.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN || data.len() < HEADER_LEN + usize::from(self.payload_len()) {
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

    /// Version nibble (6).
    pub fn version(&self) -> u8 {
        self.data()[field::VER_TC_FLOW] >> 4
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        ((be::u16_at(self.data(), field::VER_TC_FLOW) >> 4) & 0xff) as u8
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        be::u32_at(self.data(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    /// Payload length (extension headers included).
    pub fn payload_len(&self) -> u16 {
        be::u16_at(self.data(), field::LENGTH)
    }

    /// The next header after the fixed header (an extension header or the upper layer).
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(self.data()[field::NXT_HDR])
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.data()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        addr_at(self.data(), field::SRC)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        addr_at(self.data(), field::DST)
    }

    /// The payload (extension headers and upper layer), up to `payload_len`.
    pub fn payload(&self) -> &[u8] {
        &self.data()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }

    /// Walks the extension-header chain of the payload; see [`walk_chain`].
    pub fn chain(&self) -> Result<Chain> {
        walk_chain(self.next_header(), self.payload())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn data_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets version, traffic class and flow label at once.
    pub fn set_version_tc_flow(&mut self, traffic_class: u8, flow_label: u32) {
        let v = (6u32 << 28) | (u32::from(traffic_class) << 20) | (flow_label & 0x000f_ffff);
        be::put_u32(self.data_mut(), field::VER_TC_FLOW, v);
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, len: u16) {
        be::put_u16(self.data_mut(), field::LENGTH, len);
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, nh: IpProtocol) {
        self.data_mut()[field::NXT_HDR] = nh.into();
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, hl: u8) {
        self.data_mut()[field::HOP_LIMIT] = hl;
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.data_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.data_mut()[field::DST].copy_from_slice(&a.octets());
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.data_mut()[HEADER_LEN..end]
    }
}

/// The IPv6 fragment header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentHeader {
    /// Fragment offset in bytes.
    pub offset: u16,
    /// M flag: more fragments follow.
    pub more_frags: bool,
    /// Identification (shared by all fragments of one packet).
    pub ident: u32,
    /// Where the fragment header starts, relative to the IPv6 payload.
    pub header_offset: usize,
}

impl FragmentHeader {
    /// True when this fragment starts the packet (the upper-layer header is in it).
    pub fn is_first(&self) -> bool {
        self.offset == 0
    }
}

/// Where the extension-header chain ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// The upper-layer protocol (TCP, UDP, ICMPv6, ESP, NoNextHeader, or unknown). For a
    /// non-first fragment this is the fragment header's next header, and there is no
    /// upper-layer header at `upper_offset`, only data.
    pub protocol: IpProtocol,
    /// Where the upper-layer header (or, for a non-first fragment, the data) starts, relative
    /// to the IPv6 payload.
    pub upper_offset: usize,
    /// The fragment header, if the chain has one.
    pub fragment: Option<FragmentHeader>,
    /// How many extension headers were walked.
    pub ext_headers: u8,
}

/// Length in bytes of the generic extension header at `data[at..]` whose type is `kind`, or
/// `None` if `kind` is not an extension header we walk.
fn ext_header_len(kind: IpProtocol, data: &[u8], at: usize) -> Option<Result<usize>> {
    match kind {
        IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {}
        IpProtocol::Ah => {
            // RFC 4302: length in 4-octet units, minus 2.
            return Some(match data.get(at + 1) {
                Some(&l) => Ok((usize::from(l) + 2) * 4),
                None => Err(Error::Truncated),
            });
        }
        // Mobility (135), HIP (139), Shim6 (140) and the experimental 253/254 share the
        // generic layout (RFC 7045, RFC 8200 §4.8).
        IpProtocol::Unknown(135 | 139 | 140 | 253 | 254) => {}
        IpProtocol::Ipv6Frag => return Some(Ok(8)),
        _ => return None,
    }
    Some(match data.get(at + 1) {
        Some(&l) => Ok((usize::from(l) + 1) * 8),
        None => Err(Error::Truncated),
    })
}

/// Walks the extension headers in `payload` (the IPv6 payload), starting with `first` (the
/// fixed header's next header), to the upper-layer protocol.
///
/// Errors: `Truncated` if a header runs past `payload`; `Malformed` if there are more than
/// [`MAX_EXT_HEADERS`] headers or a hop-by-hop header is not first.
pub fn walk_chain(first: IpProtocol, payload: &[u8]) -> Result<Chain> {
    let mut kind = first;
    let mut at = 0usize;
    let mut fragment = None;
    let mut count = 0u8;
    loop {
        let len = match ext_header_len(kind, payload, at) {
            None => break,
            Some(len) => len?,
        };
        if usize::from(count) >= MAX_EXT_HEADERS {
            return Err(Error::Malformed);
        }
        if kind == IpProtocol::HopByHop && count != 0 {
            return Err(Error::Malformed);
        }
        let header = payload.get(at..at + len).ok_or(Error::Truncated)?;
        let next = IpProtocol::from(header[0]);
        count += 1;
        if kind == IpProtocol::Ipv6Frag {
            let v = be::u16_at(header, 2);
            let frag = FragmentHeader {
                offset: v & 0xfff8,
                more_frags: v & 1 != 0,
                ident: be::u32_at(header, 4),
                header_offset: at,
            };
            if fragment.is_some() {
                return Err(Error::Malformed);
            }
            fragment = Some(frag);
            at += len;
            kind = next;
            if !frag.is_first() {
                break;
            }
        } else {
            at += len;
            kind = next;
        }
    }
    Ok(Chain {
        protocol: kind,
        upper_offset: at,
        fragment,
        ext_headers: count,
    })
}

/// The parsed basics of an IPv6 header, for building packets without extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source address.
    pub src_addr: Ipv6Addr,
    /// Destination address.
    pub dst_addr: Ipv6Addr,
    /// Next header.
    pub next_header: IpProtocol,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Repr {
    /// Reads the fixed header of a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        if packet.version() != 6 {
            return Err(Error::BadVersion);
        }
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.payload_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Always 40.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the fixed header (traffic class and flow label 0) at the start of `buffer`.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<()> {
        let len = u16::try_from(self.payload_len).map_err(|_| Error::BadLength)?;
        let data = buffer.get_mut(..HEADER_LEN).ok_or(Error::Truncated)?;
        let mut p = Packet::new_unchecked(data);
        p.set_version_tc_flow(0, 0);
        p.set_payload_len(len);
        p.set_next_header(self.next_header);
        p.set_hop_limit(self.hop_limit);
        p.set_src_addr(self.src_addr);
        p.set_dst_addr(self.dst_addr);
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
    fn deconstruct_echo() {
        let p = ip(&ICMP6_ECHO_REQUEST);
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0);
        assert_eq!(p.flow_label(), 0x1b187);
        assert_eq!(p.payload_len(), 64);
        assert_eq!(p.next_header(), IpProtocol::Icmpv6);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "2001:2::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "2001:2::2".parse::<Ipv6Addr>().unwrap());
        let c = p.chain().unwrap();
        assert_eq!(
            (c.protocol, c.upper_offset, c.fragment, c.ext_headers),
            (IpProtocol::Icmpv6, 0, None, 0)
        );
    }

    #[test]
    fn hop_by_hop_chain() {
        let p = ip(&IPV6_HBH_MLD);
        assert_eq!(p.next_header(), IpProtocol::HopByHop);
        let c = p.chain().unwrap();
        assert_eq!(c.protocol, IpProtocol::Icmpv6);
        assert_eq!(c.upper_offset, 8);
        assert_eq!(c.ext_headers, 1);
        assert_eq!(p.payload()[c.upper_offset], 143); // MLDv2 report
    }

    #[test]
    fn fragment_chain() {
        let first = ip(&IPV6_FRAG_FIRST).chain().unwrap();
        let f = first.fragment.unwrap();
        assert_eq!(
            (f.offset, f.more_frags, f.ident, f.header_offset),
            (0, true, 0x66ad_490c, 0)
        );
        assert!(f.is_first());
        assert_eq!(
            (first.protocol, first.upper_offset),
            (IpProtocol::Icmpv6, 8)
        );

        let last = ip(&IPV6_FRAG_LAST).chain().unwrap();
        let f = last.fragment.unwrap();
        assert_eq!(
            (f.offset, f.more_frags, f.ident),
            (2896, false, 0x66ad_490c)
        );
        assert!(!f.is_first());
        assert_eq!((last.protocol, last.upper_offset), (IpProtocol::Icmpv6, 8));
    }

    #[test]
    fn synthetic_long_chains() {
        // hop-by-hop, routing, destination options, fragment(first), then UDP.
        let mut buf = [0u8; 40];
        buf[0] = 43; // HBH -> routing
        buf[8] = 60; // routing -> dest opts
        buf[9] = 1; // routing: 16 bytes
        buf[24] = 44; // dest opts -> fragment
        buf[32] = 17; // fragment -> UDP
        buf[34..36].copy_from_slice(&1u16.to_be_bytes()); // offset 0, M
        buf[36..40].copy_from_slice(&7u32.to_be_bytes());
        let c = walk_chain(IpProtocol::HopByHop, &buf).unwrap();
        assert_eq!(
            (c.protocol, c.upper_offset, c.ext_headers),
            (IpProtocol::Udp, 40, 4)
        );
        assert_eq!(
            c.fragment.map(|f| (f.ident, f.header_offset)),
            Some((7, 32))
        );
        for n in 0..40 {
            assert_eq!(
                walk_chain(IpProtocol::HopByHop, &buf[..n]).err(),
                Some(Error::Truncated)
            );
        }
        // Hop-by-hop anywhere but first is malformed.
        assert_eq!(
            walk_chain(IpProtocol::Ipv6Opts, &[0u8; 16]).err(),
            Some(Error::Malformed)
        );
        // A chain of destination options longer than the bound.
        let mut many = [0u8; 8 * (MAX_EXT_HEADERS + 1)];
        for h in many.chunks_mut(8) {
            h[0] = 60;
        }
        assert_eq!(
            walk_chain(IpProtocol::Ipv6Opts, &many).err(),
            Some(Error::Malformed)
        );
        // No next header ends the chain.
        let c = walk_chain(IpProtocol::Ipv6Opts, &[59, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((c.protocol, c.upper_offset), (IpProtocol::Ipv6NoNxt, 8));
    }

    #[test]
    fn construct_matches_capture() {
        let p = ip(&ICMP6_NA);
        let repr = Repr::parse(&p).unwrap();
        let mut out = [0u8; HEADER_LEN];
        repr.emit(&mut out).unwrap();
        assert_eq!(&out[..], &ICMP6_NA[14..54]);
        let mut q = Packet::new_unchecked(&mut out[..]);
        q.set_version_tc_flow(0, 0x1b187);
        assert_eq!(q.flow_label(), 0x1b187);
        assert_eq!(q.version(), 6);
    }

    #[test]
    fn truncated_and_bad_version() {
        let full = &TCP6_SYN[14..];
        for n in 0..full.len() {
            assert_eq!(
                Packet::new_checked(&full[..n]).err(),
                Some(Error::Truncated)
            );
        }
        let mut v4 = [0u8; 40];
        v4[0] = 0x45;
        assert_eq!(Packet::new_checked(&v4[..]).err(), Some(Error::BadVersion));
    }
}
