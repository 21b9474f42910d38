//! ICMP for IPv6 (RFC 4443) and neighbour discovery (RFC 4861).
//!
//! Errors (destination unreachable, packet too big, time exceeded, parameter problem) quote
//! the offending packet: [`Packet::quoted_packet`]. Neighbour solicitations for the cluster
//! IPv6 address are answered by the designated node with an advertisement whose target
//! link-layer option is the cluster MAC and whose Ethernet source is the node MAC
//! ([`NeighborAdvertFrame`]). NDP options are walked by [`NdiscOptions`], which stops at a
//! zero length (malformed: it would loop forever) or at an option running past the buffer.

use std::net::{IpAddr, Ipv6Addr};

use super::be;
use super::checksum;
use super::ethernet::{self, EtherType, EthernetAddress};
use super::ipv6;
use super::{Error, IpProtocol, Result};

enum_with_unknown! {
    /// ICMPv6 message type.
    pub enum Message(u8) {
        /// Destination unreachable.
        DstUnreachable = 1,
        /// Packet too big (carries the MTU).
        PktTooBig = 2,
        /// Time exceeded.
        TimeExceeded = 3,
        /// Parameter problem.
        ParamProblem = 4,
        /// Echo request.
        EchoRequest = 128,
        /// Echo reply.
        EchoReply = 129,
        /// Multicast listener query.
        MldQuery = 130,
        /// Multicast listener report (v1).
        MldReport = 131,
        /// Multicast listener done.
        MldDone = 132,
        /// Router solicitation.
        RouterSolicit = 133,
        /// Router advertisement.
        RouterAdvert = 134,
        /// Neighbour solicitation.
        NeighborSolicit = 135,
        /// Neighbour advertisement.
        NeighborAdvert = 136,
        /// Redirect.
        Redirect = 137,
        /// Multicast listener report v2.
        MldReportV2 = 143,
    }
}

impl Message {
    /// True for error messages (types 0..=127), which quote the packet that caused them.
    pub fn is_error(&self) -> bool {
        u8::from(*self) < 128
    }

    /// True for neighbour solicitation/advertisement, whose target address is at bytes 8..24.
    pub fn is_neighbor(&self) -> bool {
        matches!(self, Message::NeighborSolicit | Message::NeighborAdvert)
    }
}

enum_with_unknown! {
    /// NDP option type.
    pub enum NdiscOptionType(u8) {
        /// Source link-layer address.
        SourceLinkLayerAddr = 1,
        /// Target link-layer address.
        TargetLinkLayerAddr = 2,
        /// Prefix information.
        PrefixInformation = 3,
        /// Redirected header.
        RedirectedHeader = 4,
        /// MTU.
        Mtu = 5,
    }
}

mod field {
    use core::ops::Range;
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const ECHO_IDENT: usize = 4;
    pub(super) const ECHO_SEQNO: usize = 6;
    pub(super) const MTU: usize = 4;
    pub(super) const POINTER: usize = 4;
    pub(super) const NEIGH_FLAGS: usize = 4;
    pub(super) const TARGET: Range<usize> = 8..24;
    pub(super) const NEIGH_OPTIONS: usize = 24;
}

/// Length of the ICMPv6 header (type, code, checksum, 4 bytes of message body).
pub const HEADER_LEN: usize = 8;
/// Length of a neighbour solicitation/advertisement without options.
pub const NEIGHBOR_LEN: usize = 24;
/// Length of a link-layer address option for Ethernet.
pub const LLADDR_OPTION_LEN: usize = 8;

/// Flags of a neighbour advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NeighborFlags {
    /// R: the sender is a router.
    pub router: bool,
    /// S: sent in response to a solicitation.
    pub solicited: bool,
    /// O: override an existing cache entry.
    pub override_: bool,
}

impl NeighborFlags {
    fn from_bits(b: u8) -> NeighborFlags {
        NeighborFlags {
            router: b & 0x80 != 0,
            solicited: b & 0x40 != 0,
            override_: b & 0x20 != 0,
        }
    }

    fn bits(&self) -> u8 {
        (u8::from(self.router) << 7)
            | (u8::from(self.solicited) << 6)
            | (u8::from(self.override_) << 5)
    }
}

/// A view of an ICMPv6 message (pass the upper-layer bytes, so the checksum covers them).
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

    /// Checks that the 8-byte header fits, and for neighbour solicitation/advertisement that
    /// the target address does too.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.msg_type().is_neighbor() && len < NEIGHBOR_LEN {
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

    /// Message type.
    pub fn msg_type(&self) -> Message {
        Message::from(self.data()[field::TYPE])
    }

    /// Message code.
    pub fn msg_code(&self) -> u8 {
        self.data()[field::CODE]
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be::u16_at(self.data(), field::CHECKSUM)
    }

    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        be::u16_at(self.data(), field::ECHO_IDENT)
    }

    /// Echo sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        be::u16_at(self.data(), field::ECHO_SEQNO)
    }

    /// MTU of a packet-too-big message; `None` for other messages.
    pub fn mtu(&self) -> Option<u32> {
        (self.msg_type() == Message::PktTooBig).then(|| be::u32_at(self.data(), field::MTU))
    }

    /// Pointer of a parameter problem.
    pub fn pointer(&self) -> u32 {
        be::u32_at(self.data(), field::POINTER)
    }

    /// True for error messages.
    pub fn is_error(&self) -> bool {
        self.msg_type().is_error()
    }

    /// The packet quoted by an error message (as much of the original IPv6 packet as fit);
    /// `None` for informational messages.
    pub fn quoted_packet(&self) -> Option<&[u8]> {
        self.is_error().then(|| &self.data()[HEADER_LEN..])
    }

    /// Everything after the 8-byte header.
    pub fn data_bytes(&self) -> &[u8] {
        &self.data()[HEADER_LEN..]
    }

    /// Flags of a neighbour advertisement (all false for other messages).
    pub fn neighbor_flags(&self) -> NeighborFlags {
        if self.msg_type() == Message::NeighborAdvert {
            NeighborFlags::from_bits(self.data()[field::NEIGH_FLAGS])
        } else {
            NeighborFlags::default()
        }
    }

    /// Target address of a neighbour solicitation/advertisement; `None` for other messages
    /// (or a buffer too short for it).
    pub fn target_addr(&self) -> Option<Ipv6Addr> {
        if !self.msg_type().is_neighbor() {
            return None;
        }
        let bytes: [u8; 16] = self.data().get(field::TARGET)?.try_into().ok()?;
        Some(Ipv6Addr::from(bytes))
    }

    /// The NDP options of a neighbour solicitation/advertisement (empty for other messages).
    pub fn neighbor_options(&self) -> NdiscOptions<'_> {
        let bytes = if self.msg_type().is_neighbor() {
            self.data().get(field::NEIGH_OPTIONS..).unwrap_or(&[])
        } else {
            &[]
        };
        NdiscOptions::new(bytes)
    }

    /// True when the checksum over the whole buffer and the IPv6 pseudo-header verifies.
    pub fn verify_checksum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        checksum::verify_with_pseudo_header(
            &IpAddr::V6(*src),
            &IpAddr::V6(*dst),
            IpProtocol::Icmpv6,
            self.data(),
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn data_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the type.
    pub fn set_msg_type(&mut self, t: Message) {
        self.data_mut()[field::TYPE] = t.into();
    }

    /// Sets the code.
    pub fn set_msg_code(&mut self, c: u8) {
        self.data_mut()[field::CODE] = c;
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::CHECKSUM, v);
    }

    /// Sets the echo identifier.
    pub fn set_echo_ident(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::ECHO_IDENT, v);
    }

    /// Sets the echo sequence number.
    pub fn set_echo_seq_no(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::ECHO_SEQNO, v);
    }

    /// Computes and writes the checksum over the whole buffer and the IPv6 pseudo-header.
    pub fn fill_checksum(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let sum = checksum::compute_with_pseudo_header(
            &IpAddr::V6(*src),
            &IpAddr::V6(*dst),
            IpProtocol::Icmpv6,
            self.buffer.as_ref(),
        );
        self.set_checksum(sum);
    }
}

/// One NDP option, as found by [`NdiscOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdiscOption<'a> {
    /// Option type.
    pub kind: NdiscOptionType,
    /// The whole option, type and length bytes included (a multiple of 8 bytes).
    pub bytes: &'a [u8],
}

impl NdiscOption<'_> {
    /// The Ethernet address of a source/target link-layer address option of length 1.
    pub fn link_layer_addr(&self) -> Option<EthernetAddress> {
        match self.kind {
            NdiscOptionType::SourceLinkLayerAddr | NdiscOptionType::TargetLinkLayerAddr
                if self.bytes.len() == LLADDR_OPTION_LEN =>
            {
                EthernetAddress::from_bytes(&self.bytes[2..])
            }
            _ => None,
        }
    }
}

/// Iterator over NDP options. Yields `Err(BadLength)` for an option of length 0 and
/// `Err(Truncated)` for one running past the buffer, then stops; every step consumes at least
/// 8 bytes, so it always ends.
#[derive(Debug, Clone)]
pub struct NdiscOptions<'a> {
    rest: &'a [u8],
}

impl<'a> NdiscOptions<'a> {
    /// Walks the options in `bytes`.
    pub fn new(bytes: &'a [u8]) -> NdiscOptions<'a> {
        NdiscOptions { rest: bytes }
    }

    /// The link-layer address of the first option of `kind` (source or target), after
    /// checking that every option before it is well-formed.
    pub fn find_link_layer_addr(self, kind: NdiscOptionType) -> Result<Option<EthernetAddress>> {
        for opt in self {
            let opt = opt?;
            if opt.kind == kind {
                return Ok(opt.link_layer_addr());
            }
        }
        Ok(None)
    }
}

impl<'a> Iterator for NdiscOptions<'a> {
    type Item = Result<NdiscOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = core::mem::take(&mut self.rest);
        let (&kind, len_units) = match rest {
            [kind, len, ..] => (kind, *len),
            _ => return Some(Err(Error::Truncated)),
        };
        if len_units == 0 {
            return Some(Err(Error::BadLength));
        }
        let len = usize::from(len_units) * 8;
        let Some(bytes) = rest.get(..len) else {
            return Some(Err(Error::Truncated));
        };
        self.rest = &rest[len..];
        Some(Ok(NdiscOption {
            kind: NdiscOptionType::from(kind),
            bytes,
        }))
    }
}

/// A parsed neighbour solicitation or advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdiscRepr {
    /// Who has `target_addr`? `lladdr` is the solicitor's source link-layer address (absent in
    /// duplicate address detection).
    NeighborSolicit {
        /// Address being resolved.
        target_addr: Ipv6Addr,
        /// Source link-layer address option.
        lladdr: Option<EthernetAddress>,
    },
    /// `target_addr` is at `lladdr`.
    NeighborAdvert {
        /// R/S/O flags.
        flags: NeighborFlags,
        /// Address being advertised.
        target_addr: Ipv6Addr,
        /// Target link-layer address option.
        lladdr: Option<EthernetAddress>,
    },
}

impl NdiscRepr {
    /// Reads a neighbour solicitation/advertisement; `Unsupported` for other messages, an error
    /// for a malformed option list. The checksum is not verified (see
    /// [`Packet::verify_checksum`]); RFC 4861 §7.1.1 also wants hop limit 255, which the caller
    /// checks on the IPv6 header.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<NdiscRepr> {
        packet.check_len()?;
        let target_addr = packet.target_addr().ok_or(Error::Unsupported)?;
        if packet.msg_code() != 0 {
            return Err(Error::Malformed);
        }
        match packet.msg_type() {
            Message::NeighborSolicit => Ok(NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr: packet
                    .neighbor_options()
                    .find_link_layer_addr(NdiscOptionType::SourceLinkLayerAddr)?,
            }),
            Message::NeighborAdvert => Ok(NdiscRepr::NeighborAdvert {
                flags: packet.neighbor_flags(),
                target_addr,
                lladdr: packet
                    .neighbor_options()
                    .find_link_layer_addr(NdiscOptionType::TargetLinkLayerAddr)?,
            }),
            _ => Err(Error::Unsupported),
        }
    }

    /// Message length: 24, plus 8 with a link-layer address option.
    pub fn buffer_len(&self) -> usize {
        let lladdr = match self {
            NdiscRepr::NeighborSolicit { lladdr, .. }
            | NdiscRepr::NeighborAdvert { lladdr, .. } => lladdr,
        };
        NEIGHBOR_LEN
            + if lladdr.is_some() {
                LLADDR_OPTION_LEN
            } else {
                0
            }
    }

    /// Writes the message at the start of `buffer` (exactly `buffer_len` bytes) with its
    /// checksum under the given IPv6 addresses.
    pub fn emit(&self, buffer: &mut [u8], src: &Ipv6Addr, dst: &Ipv6Addr) -> Result<()> {
        let data = buffer
            .get_mut(..self.buffer_len())
            .ok_or(Error::Truncated)?;
        let (msg, flags, target, lladdr, opt) = match *self {
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } => (
                Message::NeighborSolicit,
                0,
                target_addr,
                lladdr,
                NdiscOptionType::SourceLinkLayerAddr,
            ),
            NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            } => (
                Message::NeighborAdvert,
                flags.bits(),
                target_addr,
                lladdr,
                NdiscOptionType::TargetLinkLayerAddr,
            ),
        };
        data[field::TYPE] = msg.into();
        data[field::CODE] = 0;
        data[field::NEIGH_FLAGS..field::TARGET.start].copy_from_slice(&[flags, 0, 0, 0]);
        data[field::TARGET].copy_from_slice(&target.octets());
        if let Some(mac) = lladdr {
            let o = &mut data[field::NEIGH_OPTIONS..field::NEIGH_OPTIONS + LLADDR_OPTION_LEN];
            o[0] = opt.into();
            o[1] = 1;
            o[2..].copy_from_slice(&mac.0);
        }
        Packet::new_unchecked(data).fill_checksum(src, dst);
        Ok(())
    }
}

/// All-nodes multicast, where advertisements answering duplicate address detection go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// A complete Ethernet + IPv6 + neighbour advertisement frame, as the designated node sends it
/// for the cluster IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighborAdvertFrame {
    /// Ethernet source: the node MAC (never the cluster MAC, or the switch learns it).
    pub eth_src: EthernetAddress,
    /// Ethernet destination.
    pub eth_dst: EthernetAddress,
    /// 802.1Q VLAN id, if the solicitation was tagged.
    pub vlan: Option<u16>,
    /// IPv6 source (the target address itself).
    pub ip_src: Ipv6Addr,
    /// IPv6 destination (the solicitor, or all-nodes).
    pub ip_dst: Ipv6Addr,
    /// R/S/O flags.
    pub flags: NeighborFlags,
    /// The advertised address (the cluster IPv6 address).
    pub target_addr: Ipv6Addr,
    /// The target link-layer address option (the cluster MAC).
    pub target_lladdr: EthernetAddress,
}

impl NeighborAdvertFrame {
    /// The answer to a solicitation for `target_addr` that came from `(sol_eth_src,
    /// sol_ip_src)` with source link-layer option `sol_lladdr`: unicast back with S and O set,
    /// or, for duplicate address detection (unspecified source), to all-nodes with S clear
    /// (RFC 4861 §7.2.4).
    pub fn answer(
        solicitation: &NdiscRepr,
        sol_eth_src: EthernetAddress,
        sol_ip_src: Ipv6Addr,
        node_mac: EthernetAddress,
        cluster_mac: EthernetAddress,
        vlan: Option<u16>,
    ) -> Result<NeighborAdvertFrame> {
        let NdiscRepr::NeighborSolicit {
            target_addr,
            lladdr,
        } = *solicitation
        else {
            return Err(Error::Unsupported);
        };
        let dad = sol_ip_src.is_unspecified();
        let (eth_dst, ip_dst) = if dad {
            (EthernetAddress::ipv6_multicast(&ALL_NODES), ALL_NODES)
        } else {
            (lladdr.unwrap_or(sol_eth_src), sol_ip_src)
        };
        Ok(NeighborAdvertFrame {
            eth_src: node_mac,
            eth_dst,
            vlan,
            ip_src: target_addr,
            ip_dst,
            flags: NeighborFlags {
                router: false,
                solicited: !dad,
                override_: true,
            },
            target_addr,
            target_lladdr: cluster_mac,
        })
    }

    fn ndisc(&self) -> NdiscRepr {
        NdiscRepr::NeighborAdvert {
            flags: self.flags,
            target_addr: self.target_addr,
            lladdr: Some(self.target_lladdr),
        }
    }

    fn eth(&self) -> ethernet::Repr {
        ethernet::Repr {
            src: self.eth_src,
            dst: self.eth_dst,
            vlan: self.vlan,
            ethertype: EtherType::Ipv6,
        }
    }

    /// Frame length: 86, or 90 with a VLAN tag.
    pub fn buffer_len(&self) -> usize {
        self.eth().buffer_len() + ipv6::HEADER_LEN + self.ndisc().buffer_len()
    }

    /// Writes the frame at the start of `buffer` with hop limit 255 and a correct checksum;
    /// returns its length.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        let buffer = buffer.get_mut(..len).ok_or(Error::Truncated)?;
        let eth = self.eth();
        eth.emit(buffer)?;
        let ndisc = self.ndisc();
        let ip = ipv6::Repr {
            src_addr: self.ip_src,
            dst_addr: self.ip_dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: ndisc.buffer_len(),
            hop_limit: 255,
        };
        let (ip_buf, icmp_buf) = buffer[eth.buffer_len()..].split_at_mut(ipv6::HEADER_LEN);
        ip.emit(ip_buf)?;
        ndisc.emit(icmp_buf, &self.ip_src, &self.ip_dst)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;
    use crate::wire::udp;

    const HOST_A: EthernetAddress = EthernetAddress([0x62, 0xdd, 0xe8, 0x65, 0xd9, 0x68]);
    const HOST_B: EthernetAddress = EthernetAddress([0xe2, 0xb2, 0x52, 0xc6, 0x15, 0xcf]);

    /// (src, dst, ICMPv6 message) of a captured frame with no extension headers.
    fn icmp(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, Packet<&[u8]>) {
        let ip = ipv6::Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Icmpv6);
        let end = 54 + usize::from(ip.payload_len());
        (
            ip.src_addr(),
            ip.dst_addr(),
            Packet::new_checked(&frame[54..end]).unwrap(),
        )
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn deconstruct_echo() {
        let (s, d, p) = icmp(&ICMP6_ECHO_REQUEST);
        assert_eq!(p.msg_type(), Message::EchoRequest);
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (7469, 1));
        assert!(p.verify_checksum(&s, &d));
        assert!(!p.verify_checksum(&s, &v6("2001:2::3")));
        assert!(!p.is_error() && p.quoted_packet().is_none() && p.target_addr().is_none());
    }

    #[test]
    fn deconstruct_neighbor_solicitation() {
        let (s, d, p) = icmp(&ICMP6_NS);
        assert_eq!(d, v6("ff02::1:ff00:2"));
        assert!(p.verify_checksum(&s, &d));
        assert_eq!(p.msg_type(), Message::NeighborSolicit);
        assert_eq!(p.target_addr(), Some(v6("2001:2::2")));
        let opts: Vec<_> = p.neighbor_options().collect();
        assert_eq!(opts.len(), 1);
        let o = opts[0].unwrap();
        assert_eq!(o.kind, NdiscOptionType::SourceLinkLayerAddr);
        assert_eq!(o.link_layer_addr(), Some(HOST_A));
        assert_eq!(
            NdiscRepr::parse(&p),
            Ok(NdiscRepr::NeighborSolicit {
                target_addr: v6("2001:2::2"),
                lladdr: Some(HOST_A)
            })
        );
    }

    #[test]
    fn deconstruct_neighbor_advertisements() {
        let (s, d, p) = icmp(&ICMP6_NA);
        assert!(p.verify_checksum(&s, &d));
        let flags = NeighborFlags {
            router: false,
            solicited: true,
            override_: true,
        };
        assert_eq!(p.neighbor_flags(), flags);
        assert_eq!(
            NdiscRepr::parse(&p),
            Ok(NdiscRepr::NeighborAdvert {
                flags,
                target_addr: v6("2001:2::2"),
                lladdr: Some(HOST_B)
            })
        );
        let (s, d, p) = icmp(&ICMP6_NA_ROUTER);
        assert!(p.verify_checksum(&s, &d));
        let r = NdiscRepr::parse(&p).unwrap();
        assert_eq!(
            r,
            NdiscRepr::NeighborAdvert {
                flags: NeighborFlags {
                    router: true,
                    solicited: true,
                    override_: false
                },
                target_addr: v6("fe80::e0b2:52ff:fec6:15cf"),
                lladdr: None
            }
        );
        assert_eq!(r.buffer_len(), 24);
    }

    #[test]
    fn construct_ndisc_matches_capture() {
        for frame in [&ICMP6_NS[..], &ICMP6_NA[..], &ICMP6_NA_ROUTER[..]] {
            let (s, d, p) = icmp(frame);
            let repr = NdiscRepr::parse(&p).unwrap();
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut out, &s, &d).unwrap();
            assert_eq!(&out[..], p.into_inner());
        }
    }

    #[test]
    fn advert_builder_reproduces_the_kernels_answer() {
        // 2001:2::2's kernel answered ICMP6_NS with ICMP6_NA; with node MAC = cluster MAC we
        // must produce the same frame byte for byte.
        let (s, _, p) = icmp(&ICMP6_NS);
        let ns = NdiscRepr::parse(&p).unwrap();
        let na = NeighborAdvertFrame::answer(&ns, HOST_A, s, HOST_B, HOST_B, None).unwrap();
        let mut out = [0u8; 128];
        let n = na.emit(&mut out).unwrap();
        assert_eq!(&out[..n], &ICMP6_NA[..]);
        assert_eq!(na.emit(&mut out[..n - 1]), Err(Error::Truncated));
    }

    #[test]
    fn advert_builder_node_mac_vlan_and_dad() {
        let node = EthernetAddress([0x02, 0, 0, 0, 0, 3]);
        let cluster = EthernetAddress([0x02, 0xcc, 0, 0, 0, 1]);
        let ns = NdiscRepr::NeighborSolicit {
            target_addr: v6("2001:2::100"),
            lladdr: None,
        };
        let na =
            NeighborAdvertFrame::answer(&ns, HOST_A, Ipv6Addr::UNSPECIFIED, node, cluster, Some(7))
                .unwrap();
        let mut out = [0u8; 90];
        assert_eq!(na.emit(&mut out), Ok(90));
        let f = ethernet::Frame::new_checked(&out[..]).unwrap();
        assert_eq!(
            (f.src(), f.dst(), f.vlan()),
            (node, EthernetAddress([0x33, 0x33, 0, 0, 0, 1]), Some(7))
        );
        let ip = ipv6::Packet::new_checked(f.payload()).unwrap();
        assert_eq!(
            (ip.src_addr(), ip.dst_addr(), ip.hop_limit()),
            (v6("2001:2::100"), ALL_NODES, 255)
        );
        let p = Packet::new_checked(ip.payload()).unwrap();
        assert!(p.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert!(!p.neighbor_flags().solicited && p.neighbor_flags().override_);
        assert_eq!(
            p.neighbor_options()
                .find_link_layer_addr(NdiscOptionType::TargetLinkLayerAddr),
            Ok(Some(cluster))
        );
        let na_repr = NdiscRepr::parse(&p).unwrap();
        assert_eq!(
            NeighborAdvertFrame::answer(
                &na_repr,
                HOST_A,
                Ipv6Addr::UNSPECIFIED,
                node,
                cluster,
                None
            )
            .err(),
            Some(Error::Unsupported)
        );
    }

    #[test]
    fn malformed_options() {
        let (_, _, p) = icmp(&ICMP6_NS);
        let mut buf = p.into_inner().to_vec();
        buf[25] = 0; // option length 0
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.neighbor_options().next(), Some(Err(Error::BadLength)));
        assert_eq!(NdiscRepr::parse(&p).err(), Some(Error::BadLength));
        buf[25] = 2; // runs past the end
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(NdiscRepr::parse(&p).err(), Some(Error::Truncated));
        let mut it = NdiscOptions::new(&[1]);
        assert_eq!(it.next(), Some(Err(Error::Truncated)));
        assert_eq!(it.next(), None);
        // An unknown option before the link-layer one is skipped.
        let opts = [9u8, 1, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 9];
        assert_eq!(
            NdiscOptions::new(&opts).find_link_layer_addr(NdiscOptionType::SourceLinkLayerAddr),
            Ok(Some(EthernetAddress([2, 0, 0, 0, 0, 9])))
        );
    }

    #[test]
    fn errors_quote_the_packet() {
        let (s, d, p) = icmp(&ICMP6_PORT_UNREACH);
        assert!(p.verify_checksum(&s, &d));
        assert_eq!((p.msg_type(), p.msg_code()), (Message::DstUnreachable, 4));
        let inner = ipv6::Packet::new_checked(p.quoted_packet().unwrap()).unwrap();
        assert_eq!(inner.dst_addr(), v6("2001:2::2"));
        let u = udp::Packet::new_checked(inner.payload()).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (36860, 9999));

        let (s, d, p) = icmp(&ICMP6_PACKET_TOO_BIG);
        assert!(p.verify_checksum(&s, &d));
        assert_eq!(p.mtu(), Some(1280));
        let q = p.quoted_packet().unwrap();
        assert_eq!(q.len(), 1280 - 48);
        let inner = ipv6::Packet::new_unchecked(q);
        assert_eq!(inner.dst_addr(), v6("2001:2:0:98::2"));
        assert_eq!(ipv6::Packet::new_checked(q).err(), Some(Error::Truncated));

        let (s, d, p) = icmp(&ICMP6_TIME_EXCEEDED);
        assert!(p.verify_checksum(&s, &d) && p.is_error());
        assert_eq!(p.msg_type(), Message::TimeExceeded);
        assert_eq!(p.mtu(), None);
    }

    #[test]
    fn construct_echo_and_truncation() {
        let (s, d, p) = icmp(&ICMP6_ECHO_REQUEST);
        let mut buf = p.into_inner().to_vec();
        let mut q = Packet::new_checked(&mut buf[..]).unwrap();
        q.set_msg_type(Message::EchoReply);
        q.fill_checksum(&d, &s);
        assert!(q.verify_checksum(&d, &s));
        assert_eq!(q.echo_ident(), 7469);
        for n in 0..HEADER_LEN {
            assert_eq!(Packet::new_checked(&buf[..n]).err(), Some(Error::Truncated));
        }
        let (_, _, ns) = icmp(&ICMP6_NS);
        let ns = ns.into_inner();
        for n in 0..NEIGHBOR_LEN {
            assert_eq!(Packet::new_checked(&ns[..n]).err(), Some(Error::Truncated));
        }
    }
}
