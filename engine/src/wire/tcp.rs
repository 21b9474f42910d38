//! TCP segment headers (RFC 9293): ports, sequence numbers, flags, checksum.
//!
//! The handoff logic lives on these flags: a SYN without ACK starts a new flow, FIN/RST end
//! learned entries (`DESIGN.md`, "Changing owners"). Options are exposed as bytes, not parsed.

use core::fmt;
use std::net::IpAddr;

use super::be;
use super::checksum;
use super::{Error, IpProtocol, Result};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const SEQ: usize = 4;
    pub(super) const ACK: usize = 8;
    pub(super) const FLAGS: usize = 12;
    pub(super) const WINDOW: usize = 14;
    pub(super) const CHECKSUM: usize = 16;
    pub(super) const URGENT: usize = 18;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;

/// The TCP control bits (the low 9 bits of the data-offset/flags word).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    /// No more data from sender.
    pub const FIN: TcpFlags = TcpFlags(0x001);
    /// Synchronize sequence numbers.
    pub const SYN: TcpFlags = TcpFlags(0x002);
    /// Reset the connection.
    pub const RST: TcpFlags = TcpFlags(0x004);
    /// Push.
    pub const PSH: TcpFlags = TcpFlags(0x008);
    /// Acknowledgment field significant.
    pub const ACK: TcpFlags = TcpFlags(0x010);
    /// Urgent pointer significant.
    pub const URG: TcpFlags = TcpFlags(0x020);
    /// ECN echo.
    pub const ECE: TcpFlags = TcpFlags(0x040);
    /// Congestion window reduced.
    pub const CWR: TcpFlags = TcpFlags(0x080);
    /// ECN nonce (historic, RFC 3540).
    pub const NS: TcpFlags = TcpFlags(0x100);
    /// No flags.
    pub const EMPTY: TcpFlags = TcpFlags(0);

    /// True when every bit of `other` is set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// SYN set.
    pub const fn syn(self) -> bool {
        self.contains(Self::SYN)
    }
    /// ACK set.
    pub const fn ack(self) -> bool {
        self.contains(Self::ACK)
    }
    /// FIN set.
    pub const fn fin(self) -> bool {
        self.contains(Self::FIN)
    }
    /// RST set.
    pub const fn rst(self) -> bool {
        self.contains(Self::RST)
    }
    /// A connection-opening SYN: SYN without ACK (and without RST).
    pub const fn is_syn_only(self) -> bool {
        self.syn() && !self.ack() && !self.rst()
    }
}

impl core::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpFlags({self})")
    }
}

impl fmt::Display for TcpFlags {
    /// tcpdump style: `S`, `S.`, `P.`, `F.`, `R`, `.`; `none` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        for (flag, c) in [
            (Self::FIN, "F"),
            (Self::SYN, "S"),
            (Self::RST, "R"),
            (Self::PSH, "P"),
            (Self::URG, "U"),
            (Self::ECE, "E"),
            (Self::CWR, "W"),
            (Self::NS, "N"),
            (Self::ACK, "."),
        ] {
            if self.contains(flag) {
                f.write_str(c)?;
            }
        }
        Ok(())
    }
}

/// A view of a TCP segment (header, options and payload).
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

    /// Checks that the fixed header fits, the data offset is at least 5 words, and the header
    /// with options fits.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = self.header_len();
        if header_len < HEADER_LEN {
            return Err(Error::BadLength);
        }
        if len < header_len {
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

    /// Sequence number.
    pub fn seq_number(&self) -> u32 {
        be::u32_at(self.data(), field::SEQ)
    }

    /// Acknowledgment number (meaningful when ACK is set).
    pub fn ack_number(&self) -> u32 {
        be::u32_at(self.data(), field::ACK)
    }

    /// Header length in bytes (data offset * 4), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.data()[field::FLAGS] >> 4) * 4
    }

    /// Control bits.
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(be::u16_at(self.data(), field::FLAGS) & 0x01ff)
    }

    /// SYN set.
    pub fn syn(&self) -> bool {
        self.flags().syn()
    }

    /// ACK set.
    pub fn ack(&self) -> bool {
        self.flags().ack()
    }

    /// FIN set.
    pub fn fin(&self) -> bool {
        self.flags().fin()
    }

    /// RST set.
    pub fn rst(&self) -> bool {
        self.flags().rst()
    }

    /// Receive window (unscaled).
    pub fn window_len(&self) -> u16 {
        be::u16_at(self.data(), field::WINDOW)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be::u16_at(self.data(), field::CHECKSUM)
    }

    /// Urgent pointer.
    pub fn urgent_at(&self) -> u16 {
        be::u16_at(self.data(), field::URGENT)
    }

    /// The options bytes.
    pub fn options(&self) -> &[u8] {
        &self.data()[HEADER_LEN..self.header_len()]
    }

    /// The segment payload (everything after the header, to the end of the buffer: slice the
    /// buffer to the IP payload first).
    pub fn payload(&self) -> &[u8] {
        &self.data()[self.header_len()..]
    }

    /// True when the checksum over the whole buffer and the pseudo-header verifies.
    pub fn verify_checksum(&self, src: &IpAddr, dst: &IpAddr) -> bool {
        checksum::verify_with_pseudo_header(src, dst, IpProtocol::Tcp, self.data())
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

    /// Sets the sequence number.
    pub fn set_seq_number(&mut self, v: u32) {
        be::put_u32(self.data_mut(), field::SEQ, v);
    }

    /// Sets the acknowledgment number.
    pub fn set_ack_number(&mut self, v: u32) {
        be::put_u32(self.data_mut(), field::ACK, v);
    }

    /// Sets header length (bytes, multiple of 4) and flags together.
    pub fn set_header_len_and_flags(&mut self, header_len: usize, flags: TcpFlags) {
        let offset = ((header_len / 4) & 0x0f) as u16;
        be::put_u16(
            self.data_mut(),
            field::FLAGS,
            (offset << 12) | (flags.0 & 0x01ff),
        );
    }

    /// Sets the window.
    pub fn set_window_len(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::WINDOW, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::CHECKSUM, v);
    }

    /// Sets the urgent pointer.
    pub fn set_urgent_at(&mut self, v: u16) {
        be::put_u16(self.data_mut(), field::URGENT, v);
    }

    /// Computes and writes the checksum over the whole buffer and the pseudo-header.
    pub fn fill_checksum(&mut self, src: &IpAddr, dst: &IpAddr) {
        self.set_checksum(0);
        let sum = checksum::compute_with_pseudo_header(src, dst, IpProtocol::Tcp, self.data());
        self.set_checksum(sum);
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = self.header_len();
        &mut self.data_mut()[at..]
    }
}

/// The basics of a TCP header (no options), enough to build a RST or a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq_number: u32,
    /// Acknowledgment number.
    pub ack_number: u32,
    /// Control bits.
    pub flags: TcpFlags,
    /// Window.
    pub window_len: u16,
}

impl Repr {
    /// Reads a checked segment (options ignored, checksum not verified).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq_number: packet.seq_number(),
            ack_number: packet.ack_number(),
            flags: packet.flags(),
            window_len: packet.window_len(),
        })
    }

    /// Always 20: no options are emitted.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes a 20-byte header at the start of `segment` and fills the checksum over the whole
    /// of `segment` (header plus whatever payload the caller already put after it).
    pub fn emit(&self, segment: &mut [u8], src: &IpAddr, dst: &IpAddr) -> Result<()> {
        if segment.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let mut p = Packet::new_unchecked(segment);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_seq_number(self.seq_number);
        p.set_ack_number(self.ack_number);
        p.set_header_len_and_flags(HEADER_LEN, self.flags);
        p.set_window_len(self.window_len);
        p.set_urgent_at(0);
        p.fill_checksum(src, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;
    use crate::wire::{ipv4, ipv6};

    /// (src, dst, segment) of a captured TCP/IPv4 frame.
    fn seg4(frame: &[u8]) -> (IpAddr, IpAddr, &[u8]) {
        let ip = ipv4::Packet::new_checked(&frame[14..]).unwrap();
        let (s, d) = (ip.src_addr().into(), ip.dst_addr().into());
        let start = 14 + ip.header_len();
        (s, d, &frame[start..14 + usize::from(ip.total_len())])
    }

    fn seg6(frame: &[u8]) -> (IpAddr, IpAddr, &[u8]) {
        let ip = ipv6::Packet::new_checked(&frame[14..]).unwrap();
        (
            ip.src_addr().into(),
            ip.dst_addr().into(),
            &frame[54..54 + usize::from(ip.payload_len())],
        )
    }

    #[test]
    fn deconstruct_syn() {
        let (s, d, seg) = seg4(&TCP4_SYN);
        let p = Packet::new_checked(seg).unwrap();
        assert_eq!((p.src_port(), p.dst_port()), (60328, 8080));
        assert_eq!(p.seq_number(), 166_711_831);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), TcpFlags::SYN);
        assert!(p.flags().is_syn_only());
        assert_eq!(p.window_len(), 64240);
        assert_eq!(p.checksum(), 0xe23e);
        assert_eq!(&p.options()[..4], &[2, 4, 0x05, 0xb4]); // MSS 1460
        assert!(p.payload().is_empty());
        assert!(p.verify_checksum(&s, &d));
        assert!(!p.verify_checksum(&d, &IpAddr::from([198, 18, 99, 3])));
    }

    #[test]
    fn deconstruct_flags_and_data() {
        let (_, _, seg) = seg4(&TCP4_SYN_ACK);
        let p = Packet::new_checked(seg).unwrap();
        assert!(p.syn() && p.ack() && !p.flags().is_syn_only());
        assert_eq!(p.ack_number(), 166_711_832);
        let (s, d, seg) = seg4(&TCP4_DATA);
        let p = Packet::new_checked(seg).unwrap();
        assert_eq!(p.flags(), TcpFlags::PSH | TcpFlags::ACK);
        assert_eq!(p.flags().to_string(), "P.");
        assert_eq!(p.payload(), b"hello\n");
        assert!(p.verify_checksum(&s, &d));
        let (_, _, seg) = seg4(&TCP4_FIN);
        let p = Packet::new_checked(seg).unwrap();
        assert!(p.fin() && p.ack() && !p.rst());
    }

    #[test]
    fn ipv6_checksums() {
        for frame in [&TCP6_SYN[..], &TCP6_DATA[..]] {
            let (s, d, seg) = seg6(frame);
            let p = Packet::new_checked(seg).unwrap();
            assert!(p.verify_checksum(&s, &d));
            assert_eq!(p.dst_port(), 8080);
        }
        let (s, d, seg) = seg6(&TCP6_DATA);
        assert_eq!(Packet::new_checked(seg).unwrap().payload(), b"hello\n");
        let mut copy = seg.to_vec();
        copy[25] ^= 1;
        assert!(!Packet::new_checked(&copy[..])
            .unwrap()
            .verify_checksum(&s, &d));
        copy[25] ^= 1;
        copy[16..18].fill(0);
        let mut p = Packet::new_checked(&mut copy[..]).unwrap();
        assert!(!p.verify_checksum(&s, &d));
        p.fill_checksum(&s, &d);
        assert_eq!(&copy[..], seg);
    }

    #[test]
    fn construct_matches_capture() {
        // The FIN has a 12-byte timestamp option; rebuild it from a Repr plus the captured
        // options and compare.
        let (s, d, seg) = seg4(&TCP4_FIN);
        let p = Packet::new_checked(seg).unwrap();
        let repr = Repr::parse(&p).unwrap();
        let mut out = seg.to_vec();
        out[..20].fill(0);
        out[16..18].fill(0xaa);
        repr.emit(&mut out, &s, &d).unwrap(); // 20-byte header: data offset wrong on purpose
        let mut q = Packet::new_unchecked(&mut out[..]);
        q.set_header_len_and_flags(p.header_len(), repr.flags);
        q.fill_checksum(&s, &d);
        assert_eq!(&out[..], seg);
        assert_eq!(repr.emit(&mut [0u8; 19], &s, &d), Err(Error::Truncated));
    }

    #[test]
    fn truncated_and_bad_offset() {
        let (_, _, seg) = seg4(&TCP4_SYN);
        for n in 0..seg.len() {
            assert_eq!(
                Packet::new_checked(&seg[..n]).err(),
                Some(Error::Truncated),
                "{n}"
            );
        }
        let mut bad = seg.to_vec();
        bad[12] = 0x40; // data offset 4
        assert_eq!(Packet::new_checked(&bad[..]).err(), Some(Error::BadLength));
        assert_eq!(TcpFlags::EMPTY.to_string(), "none");
        assert_eq!(
            format!("{:?}", TcpFlags::SYN | TcpFlags::ACK),
            "TcpFlags(S.)"
        );
    }
}
