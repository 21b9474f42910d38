//! [`parse_l2_l4`]: the one-pass classifier the data path runs on every received frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ethernet::{EtherType, Frame};
use super::icmpv4;
use super::icmpv6;
use super::ipv4;
use super::ipv6;
use super::tcp::{self, TcpFlags};
use super::udp;
use super::{be, Error, IpProtocol, Result};

/// Fragment information of an IPv4 datagram or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// Identification: the IPv4 16-bit ident widened, or the IPv6 fragment header's 32 bits.
    /// With (src, dst, protocol) it names the datagram all fragments belong to.
    pub ident: u32,
    /// Offset of this fragment's data in bytes.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// True for an unfragmented packet or a first fragment: the L4 header is present.
/// `offset` is the fragment offset, `None` when not fragmented.
fn whole_or_first(offset: Option<u16>) -> bool {
    matches!(offset, None | Some(0))
}

impl Fragment {
    /// The fragment at offset 0, which carries the L4 header and decides the owner.
    pub fn is_first(&self) -> bool {
        self.offset == 0
    }
}

/// The flow an ICMP error quotes, read from the quoted header as it was SENT: for an error
/// about a packet the cluster sent, `src_ip`/`src_port` are the cluster's and
/// `dst_ip`/`dst_port` the client's, so the caller swaps them to build the flow key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotedFlow {
    /// Source of the quoted packet.
    pub src_ip: IpAddr,
    /// Destination of the quoted packet.
    pub dst_ip: IpAddr,
    /// Upper-layer protocol of the quoted packet (after IPv6 extension headers).
    pub protocol: IpProtocol,
    /// Source port, when the quote is TCP/UDP, unfragmented or a first fragment, and long enough.
    pub src_port: Option<u16>,
    /// Destination port, under the same conditions.
    pub dst_port: Option<u16>,
}

/// ICMPv4/ICMPv6 summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpInfo {
    /// Raw type (ICMPv4 or ICMPv6 numbering, per `Parsed::ip_version`).
    pub msg_type: u8,
    /// Raw code.
    pub code: u8,
    /// An error message, which quotes the packet that caused it.
    pub is_error: bool,
    /// For errors: where the quoted packet starts, from the start of the frame.
    pub quoted_offset: Option<usize>,
    /// For errors whose quote holds a readable IP header: the quoted flow.
    pub quoted: Option<QuotedFlow>,
    /// IPv4 "fragmentation needed" next-hop MTU or ICMPv6 "packet too big" MTU.
    pub mtu: Option<u32>,
    /// Echo identifier for echo request/reply.
    pub echo_ident: Option<u16>,
}

/// What [`parse_l2_l4`] found. `Copy`, about 100 bytes, no references into the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parsed {
    /// Payload EtherType (behind the VLAN tag).
    pub ethertype: EtherType,
    /// VLAN id of the one 802.1Q tag.
    pub vlan: Option<u16>,
    /// Start of the L3 header (14 or 18).
    pub l3_offset: usize,
    /// 4 or 6; 0 when the frame is not IP (ARP, unknown EtherType), in which case every field
    /// below holds its "nothing" value (unspecified addresses, `Unknown(255)`, zeros, `None`).
    pub ip_version: u8,
    /// IP source.
    pub src_ip: IpAddr,
    /// IP destination.
    pub dst_ip: IpAddr,
    /// Upper-layer protocol (for IPv6, after the extension headers).
    pub protocol: IpProtocol,
    /// Hop limit / TTL.
    pub hop_limit: u8,
    /// Set when the packet is a fragment (first, middle or last).
    pub fragment: Option<Fragment>,
    /// Start of the upper-layer header (or, for non-first fragments, of the fragment data),
    /// from the start of the frame.
    pub l4_offset: usize,
    /// Bytes from `l4_offset` to the end of the IP payload (Ethernet padding excluded).
    pub l4_len: usize,
    /// TCP/UDP source port (None for other protocols and non-first fragments).
    pub src_port: Option<u16>,
    /// TCP/UDP destination port.
    pub dst_port: Option<u16>,
    /// TCP control bits (empty unless TCP).
    pub tcp_flags: TcpFlags,
    /// ICMPv4/ICMPv6 details.
    pub icmp: Option<IcmpInfo>,
}

impl Parsed {
    fn l2_only(ethertype: EtherType, vlan: Option<u16>, l3_offset: usize) -> Parsed {
        Parsed {
            ethertype,
            vlan,
            l3_offset,
            ip_version: 0,
            src_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            protocol: IpProtocol::Unknown(255),
            hop_limit: 0,
            fragment: None,
            l4_offset: 0,
            l4_len: 0,
            src_port: None,
            dst_port: None,
            tcp_flags: TcpFlags::EMPTY,
            icmp: None,
        }
    }

    /// IPv4 or IPv6.
    pub fn is_ip(&self) -> bool {
        self.ip_version != 0
    }

    /// Any fragment (first, middle or last).
    pub fn is_fragment(&self) -> bool {
        self.fragment.is_some()
    }

    /// True when the L4 header is in this packet: not a fragment, or the first one.
    pub fn has_l4_header(&self) -> bool {
        self.is_ip() && whole_or_first(self.fragment.map(|f| f.offset))
    }
}

/// Reads Ethernet (one 802.1Q tag), IPv4/IPv6 (options, extension headers, fragments) and the
/// L4 header in one pass, for the ownership decision.
///
/// - Non-IP frames (ARP, unknown EtherTypes) are `Ok` with `ip_version == 0`; the caller looks
///   at `ethertype` (and reads ARP with [`super::arp`]).
/// - IP headers must be consistent (`ipv4::Packet::new_checked`, `ipv6::Packet::new_checked`,
///   the extension-header walk); TCP needs its whole header (data offset), UDP its 8 bytes (and
///   a consistent length when unfragmented), ICMP its 8. A first fragment too short for its L4
///   header is an error (RFC 1858's tiny-fragment attack).
/// - Non-first fragments have no ports: the owner of the first fragment takes them.
/// - ICMP errors: the quoted header is read leniently (the quote is usually cut short), to the
///   addresses, protocol and, if present, ports. An unreadable quote leaves `quoted` `None`
///   rather than failing the packet.
/// - Checksums are NOT verified here: the receiving stack does that.
///
/// Cost: a handful of bounds checks and big-endian loads; the only loop is the IPv6
/// extension-header walk (at most [`ipv6::MAX_EXT_HEADERS`] steps, twice for ICMPv6 errors).
/// No allocation, no panic on any input. Always inlined: the caller's `Parsed` is then built in
/// place (returned by value it was copied with a `memmove`, ~10% of the packet path).
#[inline(always)]
pub fn parse_l2_l4(frame: &[u8]) -> Result<Parsed> {
    let eth = Frame::new_checked(frame)?;
    let ethertype = eth.ethertype();
    let l3_offset = eth.payload_offset();
    let mut p = Parsed::l2_only(ethertype, eth.vlan(), l3_offset);
    let l3 = eth.payload();
    match ethertype {
        EtherType::Ipv4 => parse_ipv4(&mut p, l3)?,
        EtherType::Ipv6 => parse_ipv6(&mut p, l3)?,
        _ => {}
    }
    Ok(p)
}

/// What [`parse_l2_l4`] finds in the data path's common frame — untagged IPv4 without options
/// or IPv6 without extension headers, not a fragment, carrying TCP or UDP — as
/// [`parse_ip_flow`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpFlow {
    /// IP source.
    pub src: IpAddr,
    /// IP destination.
    pub dst: IpAddr,
    /// [`IpProtocol::Tcp`] or [`IpProtocol::Udp`], as a number.
    pub protocol: u8,
    /// TCP/UDP source port.
    pub src_port: u16,
    /// TCP/UDP destination port.
    pub dst_port: u16,
    /// TCP control bits as on the wire (byte 13 of the TCP header); 0 for UDP.
    pub tcp_flags: u8,
}

/// The fast path of [`parse_l2_l4`]: the common frame read at fixed offsets, with the same
/// length checks. `None` for every other frame, valid or not (the caller then runs
/// [`parse_l2_l4`], which also names the error). For each frame it accepts, `parse_l2_l4`
/// returns `Ok` with the same addresses, protocol, ports and flags and no fragment; it accepts
/// every such frame (a property test holds both directions).
#[inline(always)]
pub fn parse_ip_flow(frame: &[u8]) -> Option<IpFlow> {
    const L3: usize = 14;
    const IPV4: [u8; 2] = EtherType::Ipv4.raw().to_be_bytes();
    const IPV6: [u8; 2] = EtherType::Ipv6.raw().to_be_bytes();
    let ethertype = frame.get(12..14)?;
    if ethertype == IPV4 {
        const L4: usize = L3 + ipv4::HEADER_LEN;
        // The IPv4 header and at least a UDP header's worth: one bounds check.
        let h: &[u8; L4 + udp::HEADER_LEN] = frame.get(..L4 + udp::HEADER_LEN)?.try_into().ok()?;
        // Version 4 with IHL 5 (no options); neither "more fragments" nor an offset (DF may be
        // set).
        if h[L3] != 0x45 || h[L3 + 6] & 0x3f != 0 || h[L3 + 7] != 0 {
            return None;
        }
        let total_len = usize::from(u16::from_be_bytes([h[L3 + 2], h[L3 + 3]]));
        if total_len < ipv4::HEADER_LEN || total_len > frame.len() - L3 {
            return None;
        }
        let src = Ipv4Addr::new(h[L3 + 12], h[L3 + 13], h[L3 + 14], h[L3 + 15]);
        let dst = Ipv4Addr::new(h[L3 + 16], h[L3 + 17], h[L3 + 18], h[L3 + 19]);
        l4_flow(
            frame,
            L4,
            total_len - ipv4::HEADER_LEN,
            h[L3 + 9],
            src.into(),
            dst.into(),
        )
    } else if ethertype == IPV6 {
        const L4: usize = L3 + ipv6::HEADER_LEN;
        let h: &[u8; L4 + udp::HEADER_LEN] = frame.get(..L4 + udp::HEADER_LEN)?.try_into().ok()?;
        if h[L3] >> 4 != 6 {
            return None;
        }
        let payload_len = usize::from(u16::from_be_bytes([h[L3 + 4], h[L3 + 5]]));
        if payload_len > frame.len() - L4 {
            return None;
        }
        let addr = |at: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&h[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        // Next header TCP or UDP directly: no extension header, so no fragment.
        l4_flow(
            frame,
            L4,
            payload_len,
            h[L3 + 6],
            addr(L3 + 8),
            addr(L3 + 24),
        )
    } else {
        None
    }
}

/// The TCP or UDP header at `l4` in `frame`, `l4_len` bytes of IP payload, for
/// [`parse_ip_flow`]: the checks `tcp::Packet::new_checked` and `udp::Packet::new_checked`
/// make.
#[inline(always)]
fn l4_flow(
    frame: &[u8],
    l4: usize,
    l4_len: usize,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
) -> Option<IpFlow> {
    const TCP: u8 = IpProtocol::Tcp.raw();
    const UDP: u8 = IpProtocol::Udp.raw();
    let tcp_flags = match protocol {
        TCP => {
            // The whole TCP header, options included, inside the IP payload.
            let fixed = frame.get(l4..l4 + tcp::HEADER_LEN)?;
            let header_len = usize::from(fixed[12] >> 4) * 4;
            if l4_len < tcp::HEADER_LEN || header_len < tcp::HEADER_LEN || header_len > l4_len {
                return None;
            }
            fixed[13]
        }
        UDP => {
            // The caller checked that the 8 bytes are in the frame.
            let udp_len = usize::from(u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]));
            if l4_len < udp::HEADER_LEN || udp_len < udp::HEADER_LEN || udp_len > l4_len {
                return None;
            }
            0
        }
        _ => return None,
    };
    Some(IpFlow {
        src,
        dst,
        protocol,
        src_port: u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        dst_port: u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
        tcp_flags,
    })
}

#[inline]
fn parse_ipv4(p: &mut Parsed, l3: &[u8]) -> Result<()> {
    let ip = ipv4::Packet::new_checked(l3)?;
    p.ip_version = 4;
    p.src_ip = IpAddr::V4(ip.src_addr());
    p.dst_ip = IpAddr::V4(ip.dst_addr());
    p.protocol = ip.protocol();
    p.hop_limit = ip.ttl();
    p.l4_offset = p.l3_offset + ip.header_len();
    let l4 = ip.payload();
    p.l4_len = l4.len();
    if ip.is_fragment() {
        p.fragment = Some(Fragment {
            ident: u32::from(ip.ident()),
            offset: ip.frag_offset(),
            more: ip.more_frags(),
        });
    }
    if ip.is_first_fragment() {
        parse_l4(p, l4)?;
    }
    Ok(())
}

fn parse_ipv6(p: &mut Parsed, l3: &[u8]) -> Result<()> {
    let ip = ipv6::Packet::new_checked(l3)?;
    p.ip_version = 6;
    p.src_ip = IpAddr::V6(ip.src_addr());
    p.dst_ip = IpAddr::V6(ip.dst_addr());
    p.hop_limit = ip.hop_limit();
    let payload = ip.payload();
    let chain = ipv6::walk_chain(ip.next_header(), payload)?;
    p.protocol = chain.protocol;
    p.l4_offset = p.l3_offset + ipv6::HEADER_LEN + chain.upper_offset;
    // walk_chain only returns offsets inside `payload`.
    let l4 = payload.get(chain.upper_offset..).ok_or(Error::Truncated)?;
    p.l4_len = l4.len();
    p.fragment = chain.fragment.map(|f| Fragment {
        ident: f.ident,
        offset: f.offset,
        more: f.more_frags,
    });
    if whole_or_first(p.fragment.map(|f| f.offset)) {
        parse_l4(p, l4)?;
    }
    Ok(())
}

/// Reads the L4 header at the start of `l4` (the rest of the IP payload).
#[inline]
fn parse_l4(p: &mut Parsed, l4: &[u8]) -> Result<()> {
    let fragmented = p.fragment.is_some();
    match (p.protocol, p.ip_version) {
        (IpProtocol::Tcp, _) => {
            let tcp = tcp::Packet::new_checked(l4)?;
            p.src_port = Some(tcp.src_port());
            p.dst_port = Some(tcp.dst_port());
            p.tcp_flags = tcp.flags();
        }
        (IpProtocol::Udp, _) => {
            // A first fragment holds only part of the datagram its length field describes.
            if fragmented {
                if l4.len() < udp::HEADER_LEN {
                    return Err(Error::Truncated);
                }
            } else {
                udp::Packet::new_checked(l4)?;
            }
            p.src_port = Some(be::u16_at(l4, 0));
            p.dst_port = Some(be::u16_at(l4, 2));
        }
        (IpProtocol::Icmp, 4) => {
            let icmp = icmpv4::Packet::new_checked(l4)?;
            let msg = icmp.msg_type();
            let is_error = msg.is_error();
            p.icmp = Some(IcmpInfo {
                msg_type: msg.into(),
                code: icmp.msg_code(),
                is_error,
                quoted_offset: is_error.then_some(p.l4_offset + icmpv4::HEADER_LEN),
                quoted: icmp.quoted_datagram().and_then(quoted_ipv4),
                mtu: icmp.next_hop_mtu().map(u32::from),
                echo_ident: matches!(
                    msg,
                    icmpv4::Message::EchoRequest | icmpv4::Message::EchoReply
                )
                .then(|| icmp.echo_ident()),
            });
        }
        (IpProtocol::Icmpv6, 6) => {
            let icmp = icmpv6::Packet::new_checked(l4)?;
            let msg = icmp.msg_type();
            let is_error = msg.is_error();
            p.icmp = Some(IcmpInfo {
                msg_type: msg.into(),
                code: icmp.msg_code(),
                is_error,
                quoted_offset: is_error.then_some(p.l4_offset + icmpv6::HEADER_LEN),
                quoted: icmp.quoted_packet().and_then(quoted_ipv6),
                mtu: icmp.mtu(),
                echo_ident: matches!(
                    msg,
                    icmpv6::Message::EchoRequest | icmpv6::Message::EchoReply
                )
                .then(|| icmp.echo_ident()),
            });
        }
        _ => {}
    }
    Ok(())
}

/// Ports of a quoted TCP/UDP header: both live in its first 4 bytes.
fn quoted_ports(protocol: IpProtocol, l4: &[u8]) -> (Option<u16>, Option<u16>) {
    match (protocol, l4) {
        (IpProtocol::Tcp | IpProtocol::Udp, [a, b, c, d, ..]) => (
            Some(u16::from_be_bytes([*a, *b])),
            Some(u16::from_be_bytes([*c, *d])),
        ),
        _ => (None, None),
    }
}

/// Reads a quoted IPv4 header without requiring the whole datagram to be present.
fn quoted_ipv4(quote: &[u8]) -> Option<QuotedFlow> {
    if quote.len() < ipv4::HEADER_LEN {
        return None;
    }
    let ip = ipv4::Packet::new_unchecked(quote);
    let header_len = ip.header_len();
    if ip.version() != 4 || header_len < ipv4::HEADER_LEN || header_len > quote.len() {
        return None;
    }
    let protocol = ip.protocol();
    let (src_port, dst_port) = if ip.is_first_fragment() {
        quoted_ports(protocol, &quote[header_len..])
    } else {
        (None, None)
    };
    Some(QuotedFlow {
        src_ip: IpAddr::V4(ip.src_addr()),
        dst_ip: IpAddr::V4(ip.dst_addr()),
        protocol,
        src_port,
        dst_port,
    })
}

/// Reads a quoted IPv6 header and walks as much of its extension chain as was quoted.
fn quoted_ipv6(quote: &[u8]) -> Option<QuotedFlow> {
    let (header, rest) = (
        quote.get(..ipv6::HEADER_LEN)?,
        quote.get(ipv6::HEADER_LEN..)?,
    );
    let ip = ipv6::Packet::new_unchecked(header);
    if ip.version() != 6 {
        return None;
    }
    let src: [u8; 16] = header.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = header.get(24..40)?.try_into().ok()?;
    let chain = ipv6::walk_chain(ip.next_header(), rest).ok()?;
    let (src_port, dst_port) = if whole_or_first(chain.fragment.map(|f| f.offset)) {
        quoted_ports(chain.protocol, rest.get(chain.upper_offset..)?)
    } else {
        (None, None)
    };
    Some(QuotedFlow {
        src_ip: IpAddr::V6(Ipv6Addr::from(src)),
        dst_ip: IpAddr::V6(Ipv6Addr::from(dst)),
        protocol: chain.protocol,
        src_port,
        dst_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn arp_and_vlan_are_l2_only() {
        let p = parse_l2_l4(&ARP_REQUEST).unwrap();
        assert_eq!(
            (p.ethertype, p.vlan, p.l3_offset, p.ip_version),
            (EtherType::Arp, None, 14, 0)
        );
        assert!(!p.is_ip() && !p.has_l4_header());
        let p = parse_l2_l4(&VLAN_ARP_REQUEST).unwrap();
        assert_eq!(
            (p.ethertype, p.vlan, p.l3_offset),
            (EtherType::Arp, Some(100), 18)
        );
    }

    #[test]
    fn tcp_over_ipv4() {
        let p = parse_l2_l4(&TCP4_SYN).unwrap();
        assert_eq!(p.ip_version, 4);
        assert_eq!(
            (p.src_ip, p.dst_ip),
            (v4(198, 18, 99, 1), v4(198, 18, 99, 2))
        );
        assert_eq!(p.protocol, IpProtocol::Tcp);
        assert_eq!((p.src_port, p.dst_port), (Some(60328), Some(8080)));
        assert!(p.tcp_flags.is_syn_only());
        assert_eq!((p.l4_offset, p.l4_len, p.hop_limit), (34, 40, 64));
        assert!(!p.is_fragment() && p.has_l4_header() && p.icmp.is_none());
        let p = parse_l2_l4(&TCP4_FIN).unwrap();
        assert!(p.tcp_flags.fin() && p.tcp_flags.ack());
    }

    #[test]
    fn tcp_and_udp_over_ipv6() {
        let p = parse_l2_l4(&TCP6_SYN).unwrap();
        assert_eq!((p.ip_version, p.protocol), (6, IpProtocol::Tcp));
        assert_eq!((p.src_ip, p.dst_ip), (v6("2001:2::1"), v6("2001:2::2")));
        assert_eq!((p.src_port, p.dst_port), (Some(48470), Some(8080)));
        assert_eq!(p.tcp_flags, TcpFlags::SYN);
        assert_eq!((p.l4_offset, p.l4_len), (54, 40));
        let p = parse_l2_l4(&UDP6).unwrap();
        assert_eq!(
            (p.protocol, p.src_port, p.dst_port),
            (IpProtocol::Udp, Some(36860), Some(5354))
        );
        let p = parse_l2_l4(&UDP4).unwrap();
        assert_eq!(
            (p.src_port, p.dst_port, p.l4_len),
            (Some(41901), Some(5353), 12)
        );
    }

    #[test]
    fn ipv4_fragments() {
        let first = parse_l2_l4(&IPV4_FRAG_FIRST).unwrap();
        assert_eq!(
            first.fragment,
            Some(Fragment {
                ident: 0xd5e4,
                offset: 0,
                more: true
            })
        );
        assert!(first.has_l4_header());
        let icmp = first.icmp.unwrap();
        assert_eq!(
            (icmp.msg_type, icmp.echo_ident, icmp.is_error),
            (8, Some(7467), false)
        );
        let last = parse_l2_l4(&IPV4_FRAG_LAST).unwrap();
        assert_eq!(
            last.fragment,
            Some(Fragment {
                ident: 0xd5e4,
                offset: 2960,
                more: false
            })
        );
        assert!(!last.has_l4_header() && last.icmp.is_none());
        assert_eq!(
            (last.protocol, last.l4_offset, last.l4_len),
            (IpProtocol::Icmp, 34, 48)
        );
    }

    #[test]
    fn ipv6_fragments_and_hop_by_hop() {
        let first = parse_l2_l4(&IPV6_FRAG_FIRST).unwrap();
        assert_eq!(
            first.fragment,
            Some(Fragment {
                ident: 0x66ad_490c,
                offset: 0,
                more: true
            })
        );
        assert_eq!((first.protocol, first.l4_offset), (IpProtocol::Icmpv6, 62));
        assert_eq!(first.icmp.unwrap().echo_ident, Some(7470));
        let last = parse_l2_l4(&IPV6_FRAG_LAST).unwrap();
        assert_eq!(
            last.fragment,
            Some(Fragment {
                ident: 0x66ad_490c,
                offset: 2896,
                more: false
            })
        );
        assert!(last.icmp.is_none() && !last.has_l4_header());
        let mld = parse_l2_l4(&IPV6_HBH_MLD).unwrap();
        assert_eq!(
            (mld.protocol, mld.l4_offset, mld.hop_limit),
            (IpProtocol::Icmpv6, 62, 1)
        );
        assert_eq!(mld.icmp.unwrap().msg_type, 143);
    }

    #[test]
    fn options_are_skipped() {
        let p = parse_l2_l4(&IPV4_OPTIONS_ECHO).unwrap();
        assert_eq!(p.l4_offset, 14 + 60);
        assert_eq!(p.icmp.unwrap().echo_ident, Some(7468));
    }

    #[test]
    fn icmpv4_errors_expose_the_quoted_flow() {
        let p = parse_l2_l4(&ICMP4_PORT_UNREACH).unwrap();
        let i = p.icmp.unwrap();
        assert_eq!((i.msg_type, i.code, i.is_error, i.mtu), (3, 3, true, None));
        assert_eq!(i.quoted_offset, Some(42));
        assert_eq!(
            i.quoted,
            Some(QuotedFlow {
                src_ip: v4(198, 18, 99, 1),
                dst_ip: v4(198, 18, 99, 2),
                protocol: IpProtocol::Udp,
                src_port: Some(41901),
                dst_port: Some(9999),
            })
        );
        let i = parse_l2_l4(&ICMP4_FRAG_NEEDED).unwrap().icmp.unwrap();
        assert_eq!((i.code, i.mtu), (4, Some(1280)));
        let q = i.quoted.unwrap();
        assert_eq!(
            (q.dst_ip, q.src_port, q.dst_port),
            (v4(198, 18, 98, 2), Some(40488), Some(7777))
        );
        let i = parse_l2_l4(&ICMP4_TIME_EXCEEDED).unwrap().icmp.unwrap();
        assert_eq!(i.msg_type, 11);
        let q = i.quoted.unwrap();
        assert_eq!((q.protocol, q.src_port), (IpProtocol::Icmp, None));
    }

    #[test]
    fn icmpv6_errors_expose_the_quoted_flow() {
        let i = parse_l2_l4(&ICMP6_PORT_UNREACH).unwrap().icmp.unwrap();
        assert_eq!((i.msg_type, i.code, i.is_error), (1, 4, true));
        assert_eq!(
            i.quoted,
            Some(QuotedFlow {
                src_ip: v6("2001:2::1"),
                dst_ip: v6("2001:2::2"),
                protocol: IpProtocol::Udp,
                src_port: Some(36860),
                dst_port: Some(9999),
            })
        );
        let i = parse_l2_l4(&ICMP6_PACKET_TOO_BIG).unwrap().icmp.unwrap();
        assert_eq!((i.msg_type, i.mtu), (2, Some(1280)));
        let q = i.quoted.unwrap();
        assert_eq!(
            (q.dst_ip, q.src_port, q.dst_port),
            (v6("2001:2:0:98::2"), Some(47988), Some(7777))
        );
        let i = parse_l2_l4(&ICMP6_TIME_EXCEEDED).unwrap().icmp.unwrap();
        assert_eq!(i.quoted.unwrap().protocol, IpProtocol::Icmpv6);
        let i = parse_l2_l4(&ICMP6_NS).unwrap().icmp.unwrap();
        assert_eq!(
            (i.msg_type, i.is_error, i.quoted, i.quoted_offset),
            (135, false, None, None)
        );
    }

    #[test]
    fn every_prefix_is_ok_or_err_never_a_panic() {
        for frame in ALL {
            assert!(parse_l2_l4(frame).is_ok());
            for n in 0..frame.len() {
                let _ = parse_l2_l4(&frame[..n]);
            }
            // Prefixes that cut the IP header or payload are errors.
            if let Ok(p) = parse_l2_l4(frame) {
                if p.is_ip() {
                    assert!(parse_l2_l4(&frame[..p.l4_offset - 1]).is_err());
                }
            }
        }
    }

    #[test]
    fn tiny_first_fragment_and_bad_tcp_are_errors() {
        // Cut TCP4_SYN to a first fragment holding 12 bytes of TCP.
        let mut f = [0u8; 14 + 20 + 12];
        f.copy_from_slice(&TCP4_SYN[..46]);
        f[16..18].copy_from_slice(&32u16.to_be_bytes());
        f[20..22].copy_from_slice(&0x2000u16.to_be_bytes()); // MF
        assert_eq!(parse_l2_l4(&f).err(), Some(Error::Truncated));
        let mut f = TCP4_SYN;
        f[34 + 12] = 0x30; // data offset 3
        assert_eq!(parse_l2_l4(&f).err(), Some(Error::BadLength));
        let mut f = TCP4_SYN;
        f[14] = 0x65; // version 6 under EtherType IPv4
        assert_eq!(parse_l2_l4(&f).err(), Some(Error::BadVersion));
        let mut f = UDP6;
        f[14 + 40 + 4..14 + 40 + 6].copy_from_slice(&20u16.to_be_bytes()); // UDP length > payload
        assert_eq!(parse_l2_l4(&f).err(), Some(Error::Truncated));
    }

    #[test]
    fn unknown_ethertype_is_ok() {
        let mut f = ARP_REQUEST;
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        let p = parse_l2_l4(&f).unwrap();
        assert_eq!((p.ethertype, p.ip_version), (EtherType::Unknown(0x88b5), 0));
    }
}
