//! ARP for Ethernet/IPv4 (RFC 826), and the reply the designated node sends for the cluster IP.
//!
//! Only hardware type Ethernet (1) with protocol IPv4 (0x0800) and lengths 6/4 is read; any
//! other combination is `Error::Unsupported`. The reply carries the cluster MAC as sender
//! hardware address but the node MAC as Ethernet source (see `DESIGN.md`): [`build_reply`].

use std::net::Ipv4Addr;

use super::be;
use super::ethernet::{self, EtherType, EthernetAddress};
use super::{Error, Result};

enum_with_unknown! {
    /// ARP operation code.
    pub enum Operation(u16) {
        /// Who has `target_protocol_addr`?
        Request = 1,
        /// `source_protocol_addr` is at `source_hardware_addr`.
        Reply = 2,
    }
}

mod field {
    use core::ops::Range;
    pub(super) const HTYPE: usize = 0;
    pub(super) const PTYPE: usize = 2;
    pub(super) const HLEN: usize = 4;
    pub(super) const PLEN: usize = 5;
    pub(super) const OPER: usize = 6;
    pub(super) const SHA: Range<usize> = 8..14;
    pub(super) const SPA: Range<usize> = 14..18;
    pub(super) const THA: Range<usize> = 18..24;
    pub(super) const TPA: Range<usize> = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;

/// A view of an Ethernet/IPv4 ARP packet.
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

    /// Checks that the packet is Ethernet/IPv4 ARP and that all 28 bytes are there.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < field::OPER {
            return Err(Error::Truncated);
        }
        if be::u16_at(data, field::HTYPE) != HTYPE_ETHERNET
            || be::u16_at(data, field::PTYPE) != PTYPE_IPV4
            || data[field::HLEN] != 6
            || data[field::PLEN] != 4
        {
            return Err(Error::Unsupported);
        }
        if data.len() < PACKET_LEN {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Unwraps the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Hardware type (1 = Ethernet).
    pub fn hardware_type(&self) -> u16 {
        be::u16_at(self.buffer.as_ref(), field::HTYPE)
    }

    /// Protocol type (0x0800 = IPv4).
    pub fn protocol_type(&self) -> u16 {
        be::u16_at(self.buffer.as_ref(), field::PTYPE)
    }

    /// Operation.
    pub fn operation(&self) -> Operation {
        Operation::from(be::u16_at(self.buffer.as_ref(), field::OPER))
    }

    /// Sender hardware address.
    pub fn source_hardware_addr(&self) -> EthernetAddress {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SHA]);
        EthernetAddress(a)
    }

    /// Sender protocol address.
    pub fn source_protocol_addr(&self) -> Ipv4Addr {
        let d = &self.buffer.as_ref()[field::SPA];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// Target hardware address.
    pub fn target_hardware_addr(&self) -> EthernetAddress {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::THA]);
        EthernetAddress(a)
    }

    /// Target protocol address.
    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        let d = &self.buffer.as_ref()[field::TPA];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes hardware/protocol type and lengths for Ethernet/IPv4.
    fn set_ethernet_ipv4(&mut self) {
        let d = self.buffer.as_mut();
        be::put_u16(d, field::HTYPE, HTYPE_ETHERNET);
        be::put_u16(d, field::PTYPE, PTYPE_IPV4);
        d[field::HLEN] = 6;
        d[field::PLEN] = 4;
    }

    /// Sets the operation.
    pub fn set_operation(&mut self, op: Operation) {
        be::put_u16(self.buffer.as_mut(), field::OPER, op.into());
    }

    /// Sets the sender hardware address.
    pub fn set_source_hardware_addr(&mut self, a: EthernetAddress) {
        self.buffer.as_mut()[field::SHA].copy_from_slice(&a.0);
    }

    /// Sets the sender protocol address.
    pub fn set_source_protocol_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SPA].copy_from_slice(&a.octets());
    }

    /// Sets the target hardware address.
    pub fn set_target_hardware_addr(&mut self, a: EthernetAddress) {
        self.buffer.as_mut()[field::THA].copy_from_slice(&a.0);
    }

    /// Sets the target protocol address.
    pub fn set_target_protocol_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::TPA].copy_from_slice(&a.octets());
    }
}

/// A parsed Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Request, reply or unknown.
    pub operation: Operation,
    /// Sender MAC.
    pub source_hardware_addr: EthernetAddress,
    /// Sender IPv4 address.
    pub source_protocol_addr: Ipv4Addr,
    /// Target MAC (zero in requests).
    pub target_hardware_addr: EthernetAddress,
    /// Target IPv4 address.
    pub target_protocol_addr: Ipv4Addr,
}

impl Repr {
    /// Reads an ARP packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        Ok(Repr {
            operation: packet.operation(),
            source_hardware_addr: packet.source_hardware_addr(),
            source_protocol_addr: packet.source_protocol_addr(),
            target_hardware_addr: packet.target_hardware_addr(),
            target_protocol_addr: packet.target_protocol_addr(),
        })
    }

    /// Always 28.
    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }

    /// Writes the packet at the start of `buffer`.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<()> {
        let data = buffer.get_mut(..PACKET_LEN).ok_or(Error::Truncated)?;
        let mut p = Packet::new_unchecked(data);
        p.set_ethernet_ipv4();
        p.set_operation(self.operation);
        p.set_source_hardware_addr(self.source_hardware_addr);
        p.set_source_protocol_addr(self.source_protocol_addr);
        p.set_target_hardware_addr(self.target_hardware_addr);
        p.set_target_protocol_addr(self.target_protocol_addr);
        Ok(())
    }

    /// True for a request (or gratuitous announcement) asking for `addr`.
    pub fn is_request_for(&self, addr: Ipv4Addr) -> bool {
        self.operation == Operation::Request && self.target_protocol_addr == addr
    }

    /// The reply to this request, telling the requester that the address it asked for is at
    /// `hardware_addr` (the cluster MAC).
    pub fn reply(&self, hardware_addr: EthernetAddress) -> Repr {
        Repr {
            operation: Operation::Reply,
            source_hardware_addr: hardware_addr,
            source_protocol_addr: self.target_protocol_addr,
            target_hardware_addr: self.source_hardware_addr,
            target_protocol_addr: self.source_protocol_addr,
        }
    }
}

/// Length of the frame [`build_reply`] writes: 42, or 46 with a VLAN tag. The NIC pads it to the
/// 60-byte minimum.
pub fn reply_frame_len(vlan: Option<u16>) -> usize {
    let eth = if vlan.is_some() {
        ethernet::VLAN_HEADER_LEN
    } else {
        ethernet::HEADER_LEN
    };
    eth + PACKET_LEN
}

/// Writes a whole Ethernet frame answering `request` for the cluster address: Ethernet source
/// `node_mac` (so the switch never learns the cluster MAC), Ethernet destination the requester,
/// ARP sender hardware address `cluster_mac`. Returns the frame length.
pub fn build_reply(
    buffer: &mut [u8],
    request: &Repr,
    node_mac: EthernetAddress,
    cluster_mac: EthernetAddress,
    vlan: Option<u16>,
) -> Result<usize> {
    let len = reply_frame_len(vlan);
    let buffer = buffer.get_mut(..len).ok_or(Error::Truncated)?;
    let eth = ethernet::Repr {
        src: node_mac,
        dst: request.source_hardware_addr,
        vlan,
        ethertype: EtherType::Arp,
    };
    eth.emit(buffer)?;
    request
        .reply(cluster_mac)
        .emit(&mut buffer[eth.buffer_len()..])?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;
    use crate::wire::ethernet::Frame;

    const HOST_A: EthernetAddress = EthernetAddress([0x62, 0xdd, 0xe8, 0x65, 0xd9, 0x68]);
    const HOST_B: EthernetAddress = EthernetAddress([0xe2, 0xb2, 0x52, 0xc6, 0x15, 0xcf]);

    fn arp_of(frame: &[u8]) -> Packet<&[u8]> {
        let f = Frame::new_checked(frame).unwrap();
        Packet::new_checked(&frame[f.payload_offset()..]).unwrap()
    }

    #[test]
    fn deconstruct_request() {
        let p = arp_of(&ARP_REQUEST);
        assert_eq!(p.hardware_type(), 1);
        assert_eq!(p.protocol_type(), 0x0800);
        assert_eq!(p.operation(), Operation::Request);
        assert_eq!(p.source_hardware_addr(), HOST_A);
        assert_eq!(p.source_protocol_addr(), Ipv4Addr::new(198, 18, 99, 1));
        assert_eq!(p.target_hardware_addr(), EthernetAddress::ZERO);
        assert_eq!(p.target_protocol_addr(), Ipv4Addr::new(198, 18, 99, 2));
        let r = Repr::parse(&p).unwrap();
        assert!(r.is_request_for(Ipv4Addr::new(198, 18, 99, 2)));
    }

    #[test]
    fn deconstruct_tagged_request() {
        let r = Repr::parse(&arp_of(&VLAN_ARP_REQUEST)).unwrap();
        assert_eq!(r.target_protocol_addr, Ipv4Addr::new(198, 18, 100, 2));
        assert_eq!(r.source_protocol_addr, Ipv4Addr::new(198, 18, 100, 1));
    }

    #[test]
    fn construct_round_trip() {
        for frame in [&ARP_REQUEST[..], &ARP_REPLY[..]] {
            let r = Repr::parse(&arp_of(frame)).unwrap();
            let mut out = [0u8; PACKET_LEN];
            r.emit(&mut out).unwrap();
            assert_eq!(&out[..], &frame[14..42]);
        }
    }

    #[test]
    fn reply_builder_reproduces_the_kernels_reply() {
        // The kernel of 198.18.99.2 answered this request; with node MAC = cluster MAC = its
        // MAC our builder must produce the same bytes.
        let req = Repr::parse(&arp_of(&ARP_REQUEST)).unwrap();
        let mut out = [0u8; 64];
        let n = build_reply(&mut out, &req, HOST_B, HOST_B, None).unwrap();
        assert_eq!(&out[..n], &ARP_REPLY[..]);
    }

    #[test]
    fn reply_builder_splits_node_and_cluster_mac() {
        let node = EthernetAddress([0x02, 0, 0, 0, 0, 3]);
        let cluster = EthernetAddress([0x02, 0xcc, 0, 0, 0, 1]);
        let req = Repr::parse(&arp_of(&VLAN_ARP_REQUEST)).unwrap();
        let mut out = [0u8; 46];
        let n = build_reply(&mut out, &req, node, cluster, Some(100)).unwrap();
        assert_eq!(n, 46);
        let f = Frame::new_checked(&out[..]).unwrap();
        assert_eq!((f.src(), f.dst(), f.vlan()), (node, HOST_A, Some(100)));
        let r = Repr::parse(&Packet::new_checked(f.payload()).unwrap()).unwrap();
        assert_eq!(r.operation, Operation::Reply);
        assert_eq!(r.source_hardware_addr, cluster);
        assert_eq!(r.source_protocol_addr, Ipv4Addr::new(198, 18, 100, 2));
        assert_eq!(r.target_hardware_addr, HOST_A);
        assert_eq!(
            build_reply(&mut [0u8; 45], &req, node, cluster, Some(100)),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn truncated_and_unsupported() {
        let arp = &ARP_REQUEST[14..];
        for n in 0..PACKET_LEN {
            assert!(Packet::new_checked(&arp[..n]).is_err());
        }
        let mut other = [0u8; PACKET_LEN];
        other.copy_from_slice(arp);
        other[1] = 6; // IEEE 802 hardware type
        assert_eq!(
            Packet::new_checked(&other[..]).err(),
            Some(Error::Unsupported)
        );
        assert_eq!(Operation::from(9), Operation::Unknown(9));
    }
}
