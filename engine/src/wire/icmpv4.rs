//! ICMP for IPv4 (RFC 792): echo, and the error messages whose quoted datagram tells which
//! flow they belong to.
//!
//! An ICMP error is owned by the bucket of the flow it quotes, so path-MTU discovery reaches
//! the node that holds the connection (`DESIGN.md`, "Data path"). [`Packet::quoted_datagram`]
//! gives the quoted bytes (the original IPv4 header and at least its first 8 payload bytes);
//! they are usually a truncated datagram, so read them leniently (see `parse_l2_l4`).

use super::be;
use super::checksum;
use super::{Error, Result};

enum_with_unknown! {
    /// ICMPv4 message type.
    pub enum Message(u8) {
        /// Echo reply.
        EchoReply = 0,
        /// Destination unreachable (code 4: fragmentation needed, with next-hop MTU).
        DstUnreachable = 3,
        /// Source quench (deprecated, still an error with a quoted datagram).
        SourceQuench = 4,
        /// Redirect.
        Redirect = 5,
        /// Echo request.
        EchoRequest = 8,
        /// Router advertisement.
        RouterAdvert = 9,
        /// Router solicitation.
        RouterSolicit = 10,
        /// Time exceeded.
        TimeExceeded = 11,
        /// Parameter problem.
        ParamProblem = 12,
        /// Timestamp.
        Timestamp = 13,
        /// Timestamp reply.
        TimestampReply = 14,
    }
}

impl Message {
    /// True for error messages, which quote the datagram that caused them.
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Message::DstUnreachable
                | Message::SourceQuench
                | Message::Redirect
                | Message::TimeExceeded
                | Message::ParamProblem
        )
    }
}

enum_with_unknown! {
    /// Codes of destination unreachable.
    pub enum DstUnreachable(u8) {
        /// Network unreachable.
        NetUnreachable = 0,
        /// Host unreachable.
        HostUnreachable = 1,
        /// Protocol unreachable.
        ProtoUnreachable = 2,
        /// Port unreachable.
        PortUnreachable = 3,
        /// Fragmentation needed and DF set; the next-hop MTU is in the header.
        FragRequired = 4,
        /// Source route failed.
        SrcRouteFailed = 5,
        /// Communication administratively prohibited.
        AdminProhibit = 13,
    }
}

mod field {
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const ECHO_IDENT: usize = 4;
    pub(super) const ECHO_SEQNO: usize = 6;
    pub(super) const NEXT_HOP_MTU: usize = 6;
    pub(super) const POINTER: usize = 4;
    pub(super) const GATEWAY: usize = 4;
}

/// Length of the ICMPv4 header (type, code, checksum and the 4-byte rest of header).
pub const HEADER_LEN: usize = 8;

/// A view of an ICMPv4 message (pass the IPv4 payload, so the checksum covers the right bytes).
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

    /// Checks that the 8-byte header fits.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
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

    /// Echo identifier (echo request/reply).
    pub fn echo_ident(&self) -> u16 {
        be::u16_at(self.data(), field::ECHO_IDENT)
    }

    /// Echo sequence number (echo request/reply).
    pub fn echo_seq_no(&self) -> u16 {
        be::u16_at(self.data(), field::ECHO_SEQNO)
    }

    /// Next-hop MTU of "fragmentation needed" (RFC 1191); `None` for other messages.
    pub fn next_hop_mtu(&self) -> Option<u16> {
        (self.msg_type() == Message::DstUnreachable
            && DstUnreachable::from(self.msg_code()) == DstUnreachable::FragRequired)
            .then(|| be::u16_at(self.data(), field::NEXT_HOP_MTU))
    }

    /// Pointer of a parameter problem (offset of the faulty octet in the quoted datagram).
    pub fn pointer(&self) -> u8 {
        self.data()[field::POINTER]
    }

    /// Gateway address of a redirect.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        let d = self.data();
        let g = field::GATEWAY;
        std::net::Ipv4Addr::new(d[g], d[g + 1], d[g + 2], d[g + 3])
    }

    /// True for error messages, which quote a datagram.
    pub fn is_error(&self) -> bool {
        self.msg_type().is_error()
    }

    /// The datagram quoted by an error message (original IPv4 header + at least 8 bytes of its
    /// payload, possibly cut short); `None` for non-error messages.
    pub fn quoted_datagram(&self) -> Option<&[u8]> {
        self.is_error().then(|| self.data_bytes())
    }

    /// Everything after the 8-byte header (echo data, quoted datagram, ...).
    pub fn data_bytes(&self) -> &[u8] {
        &self.data()[HEADER_LEN..]
    }

    /// True when the checksum over the whole buffer verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::accumulate(0, self.data())) == 0xffff
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

    /// Sets the 4-byte rest of header (unused field, MTU, pointer or gateway) raw.
    pub fn set_rest_of_header(&mut self, v: u32) {
        be::put_u32(self.data_mut(), field::ECHO_IDENT, v);
    }

    /// Computes and writes the checksum over the whole buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(sum);
    }

    /// Everything after the header, writable.
    pub fn data_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;
    use crate::wire::{ipv4, udp, IpProtocol};
    use std::net::Ipv4Addr;

    fn icmp(frame: &[u8]) -> Packet<&[u8]> {
        let ip = ipv4::Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!(ip.protocol(), IpProtocol::Icmp);
        let start = 14 + ip.header_len();
        Packet::new_checked(&frame[start..14 + usize::from(ip.total_len())]).unwrap()
    }

    #[test]
    fn deconstruct_echo() {
        let p = icmp(&IPV4_ICMP_ECHO_REQUEST);
        assert_eq!(p.msg_type(), Message::EchoRequest);
        assert_eq!(p.msg_code(), 0);
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (7466, 1));
        assert!(p.verify_checksum());
        assert!(!p.is_error());
        assert_eq!(p.quoted_datagram(), None);
        assert_eq!(p.data_bytes().len(), 56);
        let r = icmp(&IPV4_ICMP_ECHO_REPLY);
        assert_eq!(r.msg_type(), Message::EchoReply);
        assert!(r.verify_checksum());
        let o = icmp(&IPV4_OPTIONS_ECHO);
        assert_eq!((o.echo_ident(), o.msg_type()), (7468, Message::EchoRequest));
        assert!(o.verify_checksum());
    }

    #[test]
    fn port_unreachable_quotes_the_udp_flow() {
        let p = icmp(&ICMP4_PORT_UNREACH);
        assert_eq!(p.msg_type(), Message::DstUnreachable);
        assert_eq!(
            DstUnreachable::from(p.msg_code()),
            DstUnreachable::PortUnreachable
        );
        assert_eq!(p.next_hop_mtu(), None);
        assert!(p.verify_checksum());
        let q = p.quoted_datagram().unwrap();
        let inner = ipv4::Packet::new_checked(q).unwrap();
        assert_eq!(inner.src_addr(), Ipv4Addr::new(198, 18, 99, 1));
        assert_eq!(inner.dst_addr(), Ipv4Addr::new(198, 18, 99, 2));
        let u = udp::Packet::new_checked(inner.payload()).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (41901, 9999));
    }

    #[test]
    fn frag_needed_carries_mtu_and_a_cut_quote() {
        let p = icmp(&ICMP4_FRAG_NEEDED);
        assert_eq!(p.msg_type(), Message::DstUnreachable);
        assert_eq!(
            DstUnreachable::from(p.msg_code()),
            DstUnreachable::FragRequired
        );
        assert_eq!(p.next_hop_mtu(), Some(1280));
        assert!(p.verify_checksum());
        let q = p.quoted_datagram().unwrap();
        // Linux quotes 548 bytes of a 1428-byte datagram: a strict view refuses it...
        assert_eq!(ipv4::Packet::new_checked(q).err(), Some(Error::Truncated));
        // ...but the header and the ports are there.
        let inner = ipv4::Packet::new_unchecked(q);
        assert_eq!(inner.total_len(), 1428);
        assert_eq!(inner.dst_addr(), Ipv4Addr::new(198, 18, 98, 2));
        let ports = &q[inner.header_len()..];
        assert_eq!(u16::from_be_bytes([ports[0], ports[1]]), 40488);
        assert_eq!(u16::from_be_bytes([ports[2], ports[3]]), 7777);
    }

    #[test]
    fn time_exceeded() {
        let p = icmp(&ICMP4_TIME_EXCEEDED);
        assert_eq!(p.msg_type(), Message::TimeExceeded);
        assert!(p.is_error() && p.verify_checksum());
        let inner = ipv4::Packet::new_checked(p.quoted_datagram().unwrap()).unwrap();
        assert_eq!(inner.ttl(), 1);
        assert_eq!(inner.protocol(), IpProtocol::Icmp);
        let echo = Packet::new_checked(inner.payload()).unwrap();
        assert_eq!(
            (echo.msg_type(), echo.echo_ident()),
            (Message::EchoRequest, 7850)
        );
    }

    #[test]
    fn construct_echo_reply_from_request() {
        // Turning the captured request into a reply reproduces the captured reply's ICMP part.
        let req = icmp(&IPV4_ICMP_ECHO_REQUEST);
        let mut buf = req.into_inner().to_vec();
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_msg_type(Message::EchoReply);
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(&buf[..], &IPV4_ICMP_ECHO_REPLY[34..]);
        let mut redirect = [5u8, 0, 0, 0, 198, 18, 99, 254];
        let mut p = Packet::new_checked(&mut redirect[..]).unwrap();
        p.set_rest_of_header(u32::from(Ipv4Addr::new(198, 18, 99, 253)));
        assert_eq!(p.gateway(), Ipv4Addr::new(198, 18, 99, 253));
        assert_eq!(p.quoted_datagram(), Some(&[][..]));
    }

    #[test]
    fn truncated() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&[0u8; 8][..n]).err(),
                Some(Error::Truncated)
            );
        }
        assert_eq!(Message::from(42), Message::Unknown(42));
    }
}
