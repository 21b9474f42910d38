//! Ethernet II frames with at most one 802.1Q tag, and MAC addresses.
//!
//! The engine rewrites the Ethernet source of every frame it sends to the node MAC (see
//! `DESIGN.md`, "Why it works on a learning switch"): that is [`Frame::set_src`] on the mbuf's
//! bytes. A second tag (QinQ) is not unwrapped: the inner EtherType is then `Vlan`/`QinQ`, which
//! the data path treats as "not IP".

use core::fmt;
use core::str::FromStr;

use super::be;
use super::{Error, Result};

enum_with_unknown! {
    /// EtherType of an Ethernet II frame.
    pub enum EtherType(u16) {
        /// IPv4.
        Ipv4 = 0x0800,
        /// ARP.
        Arp = 0x0806,
        /// 802.1Q VLAN tag (customer tag).
        Vlan = 0x8100,
        /// IPv6.
        Ipv6 = 0x86dd,
        /// 802.1ad service tag (QinQ outer tag); not unwrapped here.
        QinQ = 0x88a8,
    }
}

impl fmt::Display for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtherType::Unknown(v) => write!(f, "0x{v:04x}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// A 48-bit Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);
    /// 00:00:00:00:00:00 (the ARP request's unknown target).
    pub const ZERO: EthernetAddress = EthernetAddress([0; 6]);

    /// Reads an address from the first six bytes of `data`; `None` if there are fewer.
    pub fn from_bytes(data: &[u8]) -> Option<EthernetAddress> {
        let bytes: [u8; 6] = data.get(..6)?.try_into().ok()?;
        Some(EthernetAddress(bytes))
    }

    /// The six octets.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Group bit set (broadcast included).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Group bit clear.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// Locally administered bit set (what generated node MACs should use).
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The IPv6 multicast MAC 33:33:xx:xx:xx:xx for a multicast group (RFC 2464 §7).
    pub fn ipv6_multicast(group: &std::net::Ipv6Addr) -> EthernetAddress {
        let o = group.octets();
        EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A string that is not six hex octets separated by `:` (or `-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressParseError;

impl fmt::Display for AddressParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid MAC address, expected six hex octets like 02:00:5e:10:00:01")
    }
}

impl std::error::Error for AddressParseError {}

impl FromStr for EthernetAddress {
    type Err = AddressParseError;

    fn from_str(s: &str) -> core::result::Result<Self, Self::Err> {
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut out {
            let part = parts.next().ok_or(AddressParseError)?;
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(AddressParseError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| AddressParseError)?;
        }
        if parts.next().is_some() {
            return Err(AddressParseError);
        }
        Ok(EthernetAddress(out))
    }
}

mod field {
    use core::ops::Range;
    pub(super) const DST: Range<usize> = 0..6;
    pub(super) const SRC: Range<usize> = 6..12;
    pub(super) const ETHERTYPE: usize = 12;
    pub(super) const TCI: usize = 14;
    pub(super) const INNER_ETHERTYPE: usize = 16;
}

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
/// Length of an Ethernet header with one 802.1Q tag.
pub const VLAN_HEADER_LEN: usize = 18;
const TPID_8021Q: u16 = 0x8100;

/// The EtherType of the cluster's control frames (wire heartbeats): 0x88b5, IEEE 802 "local
/// experimental EtherType 1". Named here, once, for the control transport that sends them and
/// the data path that hands them to the control thread.
pub const CONTROL_ETHERTYPE: u16 = 0x88b5;

/// A view of an Ethernet II frame (optionally with one 802.1Q tag).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it; getters may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wraps a buffer after [`Frame::check_len`].
    pub fn new_checked(buffer: T) -> Result<Frame<T>> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks that the header, including a tag if the outer EtherType says 802.1Q, fits.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if be::u16_at(data, field::ETHERTYPE) == TPID_8021Q && data.len() < VLAN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Unwraps the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC.
    pub fn dst(&self) -> EthernetAddress {
        let mut a = [0u8; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        EthernetAddress(a)
    }

    /// Source MAC.
    pub fn src(&self) -> EthernetAddress {
        let mut a = [0u8; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        EthernetAddress(a)
    }

    /// The EtherType right after the addresses (0x8100 for a tagged frame).
    pub fn outer_ethertype(&self) -> EtherType {
        EtherType::from(be::u16_at(self.buffer.as_ref(), field::ETHERTYPE))
    }

    fn is_tagged(&self) -> bool {
        be::u16_at(self.buffer.as_ref(), field::ETHERTYPE) == TPID_8021Q
    }

    /// The whole 802.1Q tag control information (PCP, DEI, VID), if tagged.
    pub fn vlan_tci(&self) -> Option<u16> {
        self.is_tagged()
            .then(|| be::u16_at(self.buffer.as_ref(), field::TCI))
    }

    /// The VLAN id (12 bits) of the one 802.1Q tag, if tagged.
    pub fn vlan(&self) -> Option<u16> {
        self.vlan_tci().map(|tci| tci & 0x0fff)
    }

    /// The EtherType of the payload, behind the tag if there is one.
    pub fn ethertype(&self) -> EtherType {
        let at = if self.is_tagged() {
            field::INNER_ETHERTYPE
        } else {
            field::ETHERTYPE
        };
        EtherType::from(be::u16_at(self.buffer.as_ref(), at))
    }

    /// Where the payload (the L3 header) starts: 14, or 18 when tagged.
    pub fn payload_offset(&self) -> usize {
        if self.is_tagged() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// The payload (including any Ethernet padding at the end).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.payload_offset()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC.
    pub fn set_dst(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.0);
    }

    /// Sets the source MAC (node MAC on everything the engine transmits).
    pub fn set_src(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.0);
    }

    /// Sets the payload EtherType (behind the tag if tagged).
    pub fn set_ethertype(&mut self, ethertype: EtherType) {
        let at = if self.is_tagged() {
            field::INNER_ETHERTYPE
        } else {
            field::ETHERTYPE
        };
        be::put_u16(self.buffer.as_mut(), at, ethertype.into());
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = self.payload_offset();
        &mut self.buffer.as_mut()[at..]
    }
}

/// The parsed Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source MAC.
    pub src: EthernetAddress,
    /// Destination MAC.
    pub dst: EthernetAddress,
    /// VLAN id of the one 802.1Q tag (priority 0 when emitted).
    pub vlan: Option<u16>,
    /// Payload EtherType.
    pub ethertype: EtherType,
}

impl Repr {
    /// Reads the header of a checked frame.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Repr> {
        frame.check_len()?;
        Ok(Repr {
            src: frame.src(),
            dst: frame.dst(),
            vlan: frame.vlan(),
            ethertype: frame.ethertype(),
        })
    }

    /// Header length: 14, or 18 with a tag.
    pub fn buffer_len(&self) -> usize {
        if self.vlan.is_some() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Writes the header at the start of `buffer`; `Truncated` if it does not fit.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<()> {
        let data = buffer
            .get_mut(..self.buffer_len())
            .ok_or(Error::Truncated)?;
        data[field::DST].copy_from_slice(&self.dst.0);
        data[field::SRC].copy_from_slice(&self.src.0);
        match self.vlan {
            Some(vid) => {
                be::put_u16(data, field::ETHERTYPE, TPID_8021Q);
                be::put_u16(data, field::TCI, vid & 0x0fff);
                be::put_u16(data, field::INNER_ETHERTYPE, self.ethertype.into());
            }
            None => be::put_u16(data, field::ETHERTYPE, self.ethertype.into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::frames::*;

    const HOST_A: EthernetAddress = EthernetAddress([0x62, 0xdd, 0xe8, 0x65, 0xd9, 0x68]);
    const HOST_B: EthernetAddress = EthernetAddress([0xe2, 0xb2, 0x52, 0xc6, 0x15, 0xcf]);

    #[test]
    fn deconstruct_untagged() {
        let f = Frame::new_checked(&IPV4_ICMP_ECHO_REQUEST[..]).unwrap();
        assert_eq!(f.dst(), HOST_B);
        assert_eq!(f.src(), HOST_A);
        assert_eq!(f.ethertype(), EtherType::Ipv4);
        assert_eq!(f.vlan(), None);
        assert_eq!(f.payload_offset(), 14);
        assert_eq!(f.payload().len(), 84);
        let f = Frame::new_checked(&ARP_REQUEST[..]).unwrap();
        assert!(f.dst().is_broadcast());
        assert_eq!(f.ethertype(), EtherType::Arp);
    }

    #[test]
    fn deconstruct_vlan_tagged() {
        let f = Frame::new_checked(&VLAN_ARP_REQUEST[..]).unwrap();
        assert_eq!(f.outer_ethertype(), EtherType::Vlan);
        assert_eq!(f.vlan(), Some(100));
        assert_eq!(f.vlan_tci(), Some(100));
        assert_eq!(f.ethertype(), EtherType::Arp);
        assert_eq!(f.payload_offset(), 18);
        assert_eq!(f.src(), HOST_A);
        assert!(f.dst().is_broadcast());
    }

    #[test]
    fn construct_matches_capture() {
        for frame in [&VLAN_ARP_REQUEST[..], &TCP4_SYN[..], &ICMP6_NA[..]] {
            let repr = Repr::parse(&Frame::new_checked(frame).unwrap()).unwrap();
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut out).unwrap();
            assert_eq!(&out[..], &frame[..repr.buffer_len()]);
        }
        let repr = Repr {
            src: HOST_A,
            dst: HOST_B,
            vlan: None,
            ethertype: EtherType::Ipv4,
        };
        assert_eq!(repr.emit(&mut [0u8; 13]), Err(Error::Truncated));
    }

    #[test]
    fn rewrite_source_in_place() {
        let mut buf = TCP4_SYN;
        let node = EthernetAddress([0x02, 0, 0, 0, 0, 7]);
        let mut f = Frame::new_checked(&mut buf[..]).unwrap();
        f.set_src(node);
        f.set_dst(HOST_A);
        assert_eq!(f.src(), node);
        assert_eq!(f.dst(), HOST_A);
        assert_eq!(&buf[12..], &TCP4_SYN[12..]);
    }

    #[test]
    fn truncated_and_tag_without_room() {
        for n in 0..14 {
            assert_eq!(
                Frame::new_checked(&ARP_REQUEST[..n]).err(),
                Some(Error::Truncated)
            );
        }
        for n in 14..18 {
            assert_eq!(
                Frame::new_checked(&VLAN_ARP_REQUEST[..n]).err(),
                Some(Error::Truncated)
            );
        }
    }

    #[test]
    fn address_text_and_classes() {
        assert_eq!(HOST_B.to_string(), "e2:b2:52:c6:15:cf");
        assert_eq!("e2:b2:52:c6:15:cf".parse::<EthernetAddress>(), Ok(HOST_B));
        assert_eq!("E2-B2-52-C6-15-CF".parse::<EthernetAddress>(), Ok(HOST_B));
        for bad in [
            "",
            "e2:b2:52:c6:15",
            "e2:b2:52:c6:15:cf:00",
            "e2:b2:52:c6:15:g0",
            "e2::52:c6:15:cf",
            "+1:b2:52:c6:15:cf",
            "123:b2:52:c6:15:cf",
        ] {
            assert!(bad.parse::<EthernetAddress>().is_err(), "{bad}");
        }
        assert!(EthernetAddress::BROADCAST.is_broadcast());
        assert!(EthernetAddress::BROADCAST.is_multicast());
        assert!(EthernetAddress([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert!(HOST_A.is_unicast() && HOST_A.is_local());
        assert_eq!(
            EthernetAddress::ipv6_multicast(&"ff02::1:ff00:2".parse().unwrap()),
            EthernetAddress([0x33, 0x33, 0xff, 0, 0, 2])
        );
        assert_eq!(EtherType::from(0x88b5), EtherType::Unknown(0x88b5));
    }
}
