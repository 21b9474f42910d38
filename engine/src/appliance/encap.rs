//! How an owned frame reaches its backend: DSR's MAC rewrite, IP-in-IP and GUE encapsulation,
//! and the ICMP answers the appliance gives itself: "too big" for a datagram the encapsulated
//! path cannot take, and the echo reply of a service address.
//!
//! Plain functions over byte slices. What reaches a backend is built once, when the services
//! or the node change ([`dsr_macs`], [`Outer::new`]), and written per frame ([`dsr`],
//! [`Outer::write`]). An encapsulation grows the frame at the front: the caller makes room
//! ([`Outer::push`] bytes before the frame, an mbuf's headroom) and then writes the grown
//! frame. Never reads a clock, never allocates, never panics on a frame (lengths are checked
//! by the caller's parse and again here).

use std::net::IpAddr;

use crate::wire::checksum;
use crate::wire::{EthernetAddress, IpProtocol};

const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const UDP: usize = 8;
/// A GUE header of version 0 without options: 4 bytes.
const GUE: usize = 4;
/// IP protocol numbers of the encapsulated packet: IPv4 (IP-in-IP) and IPv6.
const PROTO_IPV4: u8 = 4;
const PROTO_IPV6: u8 = 41;
/// TTL / hop limit of the outer header.
const OUTER_TTL: u8 = 64;

/// DSR's 12 bytes of MACs to `backend` from the node: destination, then source.
pub fn dsr_macs(node_mac: EthernetAddress, backend: EthernetAddress) -> [u8; 12] {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&backend.0);
    macs[6..].copy_from_slice(&node_mac.0);
    macs
}

/// DSR: the frame goes to the backend's MAC from the node's own ([`dsr_macs`]), unchanged
/// above layer 2.
#[inline(always)]
pub fn dsr(frame: &mut [u8], macs: &[u8; 12]) {
    if let Some(h) = frame.get_mut(..12) {
        h.copy_from_slice(macs);
    }
}

/// The outer header kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// IPv4 or IPv6 in IPv4 or IPv6 (protocol 4 / 41).
    Ipip,
    /// UDP to `port`, a GUE header (version 0), then the packet.
    Gue { port: u16 },
}

/// Bytes of outer headers after the Ethernet header, over IPv4 or IPv6.
pub fn overhead(tunnel: Tunnel, outer_v6: bool) -> usize {
    let ip = if outer_v6 { IPV6 } else { IPV4 };
    match tunnel {
        Tunnel::Ipip => ip,
        Tunnel::Gue { .. } => ip + UDP + GUE,
    }
}

/// The most bytes of outer headers, Ethernet included (GUE over IPv6).
const MAX_OUTER: usize = ETH + IPV6 + UDP + GUE;

/// The outer headers to one backend, built once ([`Outer::new`]: addresses, MACs, ports,
/// constant fields, the IPv4 checksum summed over them) and written before each frame to it
/// ([`Outer::write`]: a copy, then the frame's lengths, inner protocol, entropy and checksums).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    header: [u8; MAX_OUTER],
    /// Bytes of `header` in use: Ethernet plus [`overhead`].
    len: u8,
    tunnel: Tunnel,
    /// The node's own address (the outer source) and the backend's: the same IP version.
    src: IpAddr,
    dst: IpAddr,
    /// IPv4: the header checksum's sum over its constant fields (7 sixteen-bit words); the
    /// traffic class, total length and protocol are added per frame, so the bytes just
    /// written are never read back. Under 2^19 in all: a `u32` holds it.
    partial: u32,
}

impl Outer {
    /// The outer headers from `src` (the node) to `dst` (the backend) through `next_hop`
    /// (`None`: the addresses are not of one IP version).
    pub fn new(
        tunnel: Tunnel,
        src: IpAddr,
        dst: IpAddr,
        node_mac: EthernetAddress,
        next_hop: EthernetAddress,
    ) -> Option<Outer> {
        let mut header = [0u8; MAX_OUTER];
        header[..6].copy_from_slice(&next_hop.0);
        header[6..12].copy_from_slice(&node_mac.0);
        let mut partial = 0;
        let ip = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                header[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let h = &mut header[ETH..ETH + IPV4];
                h[0] = 0x45;
                // Identification 0 with DF set (RFC 6864: an atomic datagram).
                h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
                h[8] = OUTER_TTL;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                let (s, d) = (u32::from(s), u32::from(d));
                // Version and IHL, DF, TTL (protocol added per frame), the addresses.
                partial = 0x4500
                    + 0x4000
                    + (u32::from(OUTER_TTL) << 8)
                    + (s >> 16)
                    + (s & 0xffff)
                    + (d >> 16)
                    + (d & 0xffff);
                IPV4
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                header[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let h = &mut header[ETH..ETH + IPV6];
                h[..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
                h[7] = OUTER_TTL;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                IPV6
            }
            _ => return None,
        };
        if let Tunnel::Gue { port } = tunnel {
            // Destination port; source port, length, checksum and inner protocol per frame
            // (GUE version 0, no control flag, no optional fields: zeros).
            header[ETH + ip + 2..ETH + ip + 4].copy_from_slice(&port.to_be_bytes());
        }
        Some(Outer {
            header,
            len: (ETH + overhead(tunnel, dst.is_ipv6())) as u8,
            tunnel,
            src,
            dst,
            partial,
        })
    }

    /// Bytes of outer headers after the Ethernet header.
    #[inline]
    pub fn overhead(&self) -> usize {
        usize::from(self.len) - ETH
    }

    /// Whether an IP packet of `ip_len` bytes, encapsulated, fits a path of MTU `mtu`.
    #[inline]
    pub fn fits(&self, ip_len: usize, mtu: u16) -> bool {
        ip_len + self.overhead() <= usize::from(mtu)
    }

    /// Bytes to add before a frame whose IP packet starts at `inner_at` (0 or more: a VLAN
    /// tag's 4 bytes are dropped).
    #[inline]
    pub fn push(&self, inner_at: usize) -> usize {
        usize::from(self.len).saturating_sub(inner_at)
    }

    /// Writes the outer headers into `frame`: the original frame with [`Outer::push`] bytes in
    /// front of it (the frame's buffer from there: the headroom's last bytes, then the frame),
    /// and nothing after it; the inner packet is `inner_len` bytes (IPv6 if `inner_v6`),
    /// `entropy` the flow's 14 bits for the GUE source port. Returns the new frame's length,
    /// or `None` (nothing sensible to send) if `frame` is too short or the lengths do not fit
    /// their 16-bit fields.
    ///
    /// One writer per header length, which the kind of `Outer` fixes (`len` decides; `tunnel`
    /// and `dst` agree with it, see [`Outer::new`]): with the length a constant, the copy of
    /// the template is a few vector moves and every field's place is known, so that one length
    /// check covers every write.
    #[inline]
    pub fn write(
        &self,
        frame: &mut [u8],
        inner_len: usize,
        inner_v6: bool,
        entropy: u16,
    ) -> Option<usize> {
        const GUE_V4: usize = ETH + IPV4 + UDP + GUE;
        const GUE_V6: usize = ETH + IPV6 + UDP + GUE;
        const IPIP_V4: usize = ETH + IPV4;
        const IPIP_V6: usize = ETH + IPV6;
        let args = (frame, inner_len, inner_v6, entropy);
        match usize::from(self.len) {
            GUE_V4 => self.write_as::<GUE_V4>(args),
            GUE_V6 => self.write_as::<GUE_V6>(args),
            IPIP_V4 => self.write_as::<IPIP_V4>(args),
            IPIP_V6 => self.write_as::<IPIP_V6>(args),
            len => {
                debug_assert!(false, "Outer::new makes no {len}-byte outer header");
                None
            }
        }
    }

    /// [`Outer::write`] for outer headers of `HEAD` bytes, Ethernet included (`self.len`).
    #[inline(always)]
    fn write_as<const HEAD: usize>(
        &self,
        (frame, inner_len, inner_v6, entropy): (&mut [u8], usize, bool, u16),
    ) -> Option<usize> {
        let total = HEAD + inner_len;
        let outer_len = u16::try_from(HEAD - ETH + inner_len).ok()?;
        let (head, inner) = frame.get_mut(..total)?.split_first_chunk_mut::<HEAD>()?;
        head.copy_from_slice(self.header.get(..HEAD)?);
        // The inner packet's traffic class (DSCP and ECN), copied to the outer header: its
        // marking holds on the way to the backend, and a congested router there marks ECN
        // rather than drops (RFC 6040's normal mode; the backend's decapsulator copies a CE
        // mark back into the inner header).
        let tc = match (inner_v6, inner.first_chunk::<2>()) {
            (true, Some(h)) => (h[0] << 4) | (h[1] >> 4),
            (false, Some(h)) => h[1],
            (_, None) => 0,
        };
        let inner_proto = if inner_v6 { PROTO_IPV6 } else { PROTO_IPV4 };
        let gue = HEAD == ETH + IPV4 + UDP + GUE || HEAD == ETH + IPV6 + UDP + GUE;
        let v6 = HEAD == ETH + IPV6 || HEAD == ETH + IPV6 + UDP + GUE;
        debug_assert_eq!(
            (gue, v6),
            (
                matches!(self.tunnel, Tunnel::Gue { .. }),
                self.dst.is_ipv6()
            )
        );
        let next = if gue {
            IpProtocol::Udp.raw()
        } else {
            inner_proto
        };
        let ip = if v6 {
            // The flow label from the flow (RFC 6438: a tunnel's flows spread over ECMP paths
            // even without ports, IP-in-IPv6), never 0 (unlabelled).
            let label = 0x1_0000 | u32::from(entropy);
            head[ETH] = 0x60 | (tc >> 4);
            head[ETH + 1] = (tc << 4) | (label >> 16) as u8;
            head[ETH + 2..ETH + 4].copy_from_slice(&(label as u16).to_be_bytes());
            head[ETH + 4..ETH + 6].copy_from_slice(&(outer_len - IPV6 as u16).to_be_bytes());
            head[ETH + 6] = next;
            IPV6
        } else {
            head[ETH + 1] = tc;
            head[ETH + 2..ETH + 4].copy_from_slice(&outer_len.to_be_bytes());
            head[ETH + 9] = next;
            let c = checksum::finish32(
                self.partial + u32::from(tc) + u32::from(outer_len) + u32::from(next),
            );
            head[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            IPV4
        };
        if gue {
            let at = ETH + ip;
            let udp_len = u16::try_from(UDP + GUE + inner_len).ok()?;
            // An ephemeral source port (49152..=65535) from the flow: spread, never 0.
            head[at..at + 2].copy_from_slice(&(0xc000 | entropy).to_be_bytes());
            head[at + 4..at + 6].copy_from_slice(&udp_len.to_be_bytes());
            head[at + 9] = inner_proto;
            if v6 {
                self.udp_checksum(&mut frame[at..total]);
            }
        }
        Some(total)
    }

    /// The UDP checksum of an outer IPv6 header's datagram (IPv6 needs it, RFC 8200 §8.1): a
    /// sum over the whole packet, out of line so that the other writers keep their registers.
    #[inline(never)]
    fn udp_checksum(&self, datagram: &mut [u8]) {
        let c =
            checksum::compute_with_pseudo_header(&self.src, &self.dst, IpProtocol::Udp, datagram);
        let c = if c == 0 { 0xffff } else { c };
        if let Some(field) = datagram.get_mut(6..8) {
            field.copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// Rewrites, in place, an ICMP or ICMPv6 echo request (IP packet at `l3`, message at `l4`,
/// `l4_len` bytes) into its echo reply: from the address it was sent to, to the request's source
/// MAC from `node_mac`, hop limit 64. Returns the reply's length (`None`: the lengths do not
/// fit the frame).
pub fn echo_reply(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    l4_len: usize,
    node_mac: EthernetAddress,
) -> Option<usize> {
    let end = l4.checked_add(l4_len)?;
    let frame = frame.get_mut(..end)?;
    if l4_len < 8 || l3 < ETH || l4 < l3 + IPV4 {
        return None;
    }
    let client_mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    frame[..6].copy_from_slice(&client_mac);
    frame[6..12].copy_from_slice(&node_mac.0);
    let swap = |frame: &mut [u8], a: usize, b: usize, n: usize| {
        for i in 0..n {
            frame.swap(a + i, b + i);
        }
    };
    if frame[l3] >> 4 == 6 {
        if l4 < l3 + IPV6 {
            return None;
        }
        swap(frame, l3 + 8, l3 + 24, 16);
        frame[l3 + 7] = 64;
        frame[l4] = 129; // echo reply
        frame[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
        let (src, dst) = (addr6(&frame[l3..], 8), addr6(&frame[l3..], 24));
        let c = checksum::compute_with_pseudo_header(
            &IpAddr::V6(src),
            &IpAddr::V6(dst),
            IpProtocol::Icmpv6,
            &frame[l4..end],
        );
        frame[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    } else {
        let ihl = usize::from(frame[l3] & 0x0f) * 4;
        if ihl < IPV4 || l3 + ihl > l4 {
            return None;
        }
        swap(frame, l3 + 12, l3 + 16, 4);
        frame[l3 + 8] = 64;
        frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&frame[l3..l3 + ihl]);
        frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        frame[l4] = 0; // echo reply
        frame[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&frame[l4..end]);
        frame[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    }
    Some(end)
}

/// Rewrites, in place, a frame whose IP packet (at `l3`, `ip_len` bytes) is too big for a path
/// of `mtu` bytes into the ICMP error that tells its sender: "fragmentation needed" (IPv4) or
/// "packet too big" (IPv6), from `from` (the service address it was sent to), to the frame's
/// source MAC from `node_mac`, with the frame's VLAN tags (the bytes up to `l3`) kept. Returns
/// the answer's length, `None` if `frame` (the whole buffer: the answer grows by its headers)
/// cannot hold the original header and 8 bytes behind them.
///
/// The quote is as much of the original packet as the buffer holds, up to what keeps the
/// answer within 576 bytes (IPv4, RFC 1812) or IPv6's minimum MTU of 1280 (RFC 4443): the
/// sender finds its socket by the ports behind the header, and behind any IPv6 extension
/// headers (a fragment header, a destination option), which 8 bytes would not reach.
pub fn too_big(
    frame: &mut [u8],
    l3: usize,
    ip_len: usize,
    mtu: u16,
    node_mac: EthernetAddress,
) -> Option<usize> {
    if l3 < ETH {
        return None;
    }
    let v6 = frame.get(l3)? >> 4 == 6;
    let (header, original_header, limit) = if v6 {
        (IPV6, IPV6, 1280)
    } else {
        (IPV4, usize::from(frame.get(l3)? & 0x0f) * 4, 576)
    };
    let icmp_at = l3 + header;
    let room = frame.len().checked_sub(icmp_at + 8)?;
    let quoted = ip_len.min(limit - header - 8).min(room);
    if quoted < (original_header + 8).min(ip_len) {
        return None;
    }
    // The addresses are read from the header the answer overwrites: copy them out first, then
    // move the quoted bytes behind the new headers.
    let mut addresses = [0u8; IPV6];
    addresses[..header].copy_from_slice(frame.get(l3..icmp_at)?);
    let src = &addresses;
    frame.copy_within(l3..l3 + quoted, icmp_at + 8);
    let client_mac = EthernetAddress(frame.get(6..12)?.try_into().ok()?);
    let total = icmp_at + 8 + quoted;
    let out = frame.get_mut(..total)?;
    out[..6].copy_from_slice(&client_mac.0);
    out[6..12].copy_from_slice(&node_mac.0);
    let ip_total = u16::try_from(total - l3).ok()?;
    if v6 {
        let (client, service) = (addr6(src, 8), addr6(src, 24));
        out[l3 - 2..l3].copy_from_slice(&0x86ddu16.to_be_bytes());
        let h = &mut out[l3..icmp_at];
        h[..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
        h[4..6].copy_from_slice(&(ip_total - IPV6 as u16).to_be_bytes());
        h[6] = IpProtocol::Icmpv6.raw();
        h[7] = 255;
        h[8..24].copy_from_slice(&service.octets());
        h[24..40].copy_from_slice(&client.octets());
        let i = &mut out[icmp_at..];
        i[0] = 2; // packet too big
        i[1] = 0;
        i[2..4].fill(0);
        i[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
        let c = checksum::compute_with_pseudo_header(
            &IpAddr::V6(service),
            &IpAddr::V6(client),
            IpProtocol::Icmpv6,
            i,
        );
        i[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        out[l3 - 2..l3].copy_from_slice(&0x0800u16.to_be_bytes());
        let h = &mut out[l3..icmp_at];
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&ip_total.to_be_bytes());
        h[4..6].fill(0);
        h[6..8].fill(0);
        h[8] = OUTER_TTL;
        h[9] = IpProtocol::Icmp.raw();
        h[10..12].fill(0);
        // From the service address the datagram was for, to its sender.
        h[12..16].copy_from_slice(&src[16..20]);
        h[16..20].copy_from_slice(&src[12..16]);
        let c = checksum::checksum(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let i = &mut out[icmp_at..];
        i[0] = 3; // destination unreachable
        i[1] = 4; // fragmentation needed and DF set
        i[2..6].fill(0);
        i[6..8].copy_from_slice(&mtu.to_be_bytes());
        let c = checksum::checksum(i);
        i[2..4].copy_from_slice(&c.to_be_bytes());
    }
    Some(total)
}

fn addr6(h: &[u8], at: usize) -> std::net::Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&h[at..at + 16]);
    a.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ipv4, ipv6, parse_l2_l4};
    use std::net::Ipv4Addr;

    const NODE: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const BACKEND: EthernetAddress = EthernetAddress([2, 0xbb, 0, 0, 0, 1]);

    fn client_syn() -> Vec<u8> {
        crate::testkit::build::syn([198, 18, 0, 50], 40000)
    }

    /// The outer IPv4 checksum summed from the fields is the one summed over the header bytes,
    /// and every field but the lengths, protocol, checksum and entropy is the template's.
    #[test]
    fn the_outer_checksum_from_fields_is_the_header_checksum() {
        let addrs = [
            Ipv4Addr::new(198, 18, 0, 11),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(10, 200, 3, 77),
        ];
        for (i, (s, d)) in addrs
            .iter()
            .flat_map(|s| addrs.iter().map(move |d| (s, d)))
            .enumerate()
        {
            for tunnel in [Tunnel::Ipip, Tunnel::Gue { port: 6080 }] {
                let o = Outer::new(tunnel, (*s).into(), (*d).into(), NODE, BACKEND).unwrap();
                for inner_len in [0usize, 40, 1480, 8980, 0xffff - 32] {
                    for inner_v6 in [false, true] {
                        let mut f = vec![0u8; o.push(14) + 14 + inner_len];
                        // The inner traffic class: DSCP EF (46) and ECT(1).
                        let inner = o.push(14) + 14;
                        if inner_len >= 2 {
                            let first = if inner_v6 { [0x6b, 0x90] } else { [0x45, 0xb9] };
                            f[inner..inner + 2].copy_from_slice(&first);
                        }
                        let Some(n) = o.write(&mut f, inner_len, inner_v6, 0x2345) else {
                            assert!(inner_len + o.overhead() > 0xffff, "case {i}");
                            continue;
                        };
                        assert_eq!(n, f.len());
                        let h = &f[14..34];
                        assert_eq!(checksum::checksum(h), 0, "case {i}: {s} -> {d}, {tunnel:?}");
                        assert_eq!(&h[12..16], &s.octets());
                        assert_eq!(&h[16..20], &d.octets());
                        assert_eq!((h[0], h[6], h[8]), (0x45, 0x40, OUTER_TTL));
                        let tc = if inner_len >= 2 { 0xb9 } else { 0 };
                        assert_eq!(h[1], tc, "the inner traffic class, case {i}");
                        let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
                        assert_eq!(total, n - 14, "case {i}");
                    }
                }
            }
        }
    }

    /// Outer headers of different IP versions cannot be built.
    #[test]
    fn mixed_versions_have_no_outer_headers() {
        let v4: IpAddr = Ipv4Addr::new(198, 18, 0, 11).into();
        let v6: IpAddr = "2001:2::11".parse().unwrap();
        assert!(Outer::new(Tunnel::Ipip, v4, v6, NODE, BACKEND).is_none());
        assert!(Outer::new(Tunnel::Gue { port: 1 }, v6, v4, NODE, BACKEND).is_none());
    }

    #[test]
    fn dsr_rewrites_only_the_macs() {
        let mut f = client_syn();
        let before = f.clone();
        dsr(&mut f, &dsr_macs(NODE, BACKEND));
        assert_eq!(&f[..6], &BACKEND.0);
        assert_eq!(&f[6..12], &NODE.0);
        assert_eq!(f[12..], before[12..]);
    }

    fn encap(tunnel: Tunnel, src: IpAddr, dst: IpAddr, f: &[u8]) -> Vec<u8> {
        let o = Outer::new(tunnel, src, dst, NODE, BACKEND).unwrap();
        let mut grown = vec![0u8; o.push(14)];
        grown.extend_from_slice(f);
        let n = o.write(&mut grown, f.len() - 14, false, 0x1234).unwrap();
        assert_eq!(n, grown.len());
        grown
    }

    #[test]
    fn gue_over_ipv4_is_well_formed() {
        let f = client_syn();
        let (src, dst) = (Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::new(198, 18, 1, 21));
        let g = encap(Tunnel::Gue { port: 6080 }, src.into(), dst.into(), &f);
        let p = parse_l2_l4(&g).unwrap();
        assert_eq!((p.src_ip, p.dst_ip), (src.into(), dst.into()));
        assert_eq!(p.dst_port, Some(6080));
        assert!(p.src_port.unwrap() >= 0xc000);
        let outer = ipv4::Packet::new_checked(&g[14..]).unwrap();
        assert!(outer.verify_checksum() && outer.dont_frag());
        // GUE version 0, inner protocol IPv4, then the client's packet unchanged.
        assert_eq!(&g[42..46], &[0, 4, 0, 0]);
        assert_eq!(&g[46..], &f[14..]);
        assert_eq!(usize::from(outer.total_len()), g.len() - 14);
    }

    #[test]
    fn ipip_and_gue_over_ipv6() {
        let mut f = client_syn();
        f[15] = 0xb9; // DSCP EF and ECT(1) (the inner checksum does not matter here)
        let (src, dst): (IpAddr, IpAddr) = (
            "2001:2::11".parse().unwrap(),
            "2001:2:1::21".parse().unwrap(),
        );
        let g = encap(Tunnel::Ipip, src, dst, &f);
        let outer = ipv6::Packet::new_checked(&g[14..]).unwrap();
        assert_eq!(outer.next_header(), IpProtocol::from(4u8));
        assert_eq!(g[14] >> 4, 6, "the version untouched by the flow label");
        let tc = (g[14] << 4) | (g[15] >> 4);
        assert_eq!(tc, 0xb9, "the inner IPv4 TOS as the traffic class");
        let label = u32::from_be_bytes([0, g[15] & 0x0f, g[16], g[17]]);
        assert_eq!(label, 0x1_1234, "the flow label from the flow's entropy");
        assert_eq!(&g[54..], &f[14..]);
        let g = encap(Tunnel::Gue { port: 6080 }, src, dst, &f);
        let udp = &g[54..];
        assert!(checksum::verify_with_pseudo_header(
            &src,
            &dst,
            IpProtocol::Udp,
            udp
        ));
    }

    #[test]
    fn too_big_answers_the_client_with_the_mtu() {
        let mut f = client_syn();
        f[14 + 6] |= 0x40; // DF
        let len = f.len();
        // The buffer (an mbuf) is longer than this small frame; a real one is above the MTU.
        f.resize(128, 0);
        let n = too_big(&mut f, 14, len - 14, 1480, NODE).unwrap();
        let p = parse_l2_l4(&f[..n]).unwrap();
        assert_eq!(p.dst_ip, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 50)));
        assert_eq!(
            p.src_ip,
            IpAddr::V4(Ipv4Addr::from(crate::testkit::build::CLUSTER_IP))
        );
        let icmp = p.icmp.unwrap();
        assert!(icmp.is_error);
        assert_eq!(&f[..6], &[2, 0, 0, 0, 0, 0x64]);
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1480);
        assert_eq!(checksum::checksum(&f[34..n]), 0);
        assert_eq!(n, 14 + 20 + 8 + (len - 14), "the whole small packet quoted");
    }

    /// A tagged frame's answer keeps its VLAN tag (the same VLAN back to the client), and a
    /// large IPv4 packet is quoted up to an answer of 576 bytes.
    #[test]
    fn too_big_keeps_the_vlan_tag_and_quotes_up_to_576_bytes() {
        let mut t = crate::testkit::build::tcp(40000, 1, 1, 0x10, &[7u8; 1400]);
        let plain = crate::testkit::build::ipv4(
            [2, 0, 0, 0, 0, 0x64],
            [198, 18, 0, 50],
            6,
            &mut t,
            Some(16),
        );
        let mut f = plain[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        f.extend_from_slice(&plain[12..]);
        let original = f[18..].to_vec();
        f.resize(2048, 0);
        let n = too_big(&mut f, 18, original.len(), 1400, NODE).unwrap();
        assert_eq!(
            &f[12..18],
            &[0x81, 0x00, 0x00, 0x64, 0x08, 0x00],
            "tag kept"
        );
        let p = parse_l2_l4(&f[..n]).unwrap();
        assert_eq!(p.l3_offset, 18);
        assert!(p.icmp.unwrap().is_error);
        assert_eq!(n - 18, 576, "IPv4: an answer of 576 bytes");
        assert_eq!(
            &f[18 + 28..n],
            &original[..548],
            "the packet's first 548 bytes"
        );
        assert_eq!(checksum::checksum(&f[18..38]), 0, "IP header checksum");
        assert_eq!(checksum::checksum(&f[38..n]), 0, "ICMP checksum");
        assert_eq!(u16::from_be_bytes([f[44], f[45]]), 1400);
    }

    /// An IPv6 packet with an extension header (a destination option) before TCP: the quote
    /// reaches the TCP ports (as much as keeps the answer within 1280 bytes), so that the
    /// sender's stack finds the socket whose path MTU to lower.
    #[test]
    fn packet_too_big_quotes_past_ipv6_extension_headers() {
        let mut l4 = vec![6u8, 0, 1, 4, 0, 0, 0, 0];
        l4.extend(crate::testkit::build::tcp(40000, 1, 1, 0x10, &[7u8; 1400]));
        let src = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50];
        let mut f = crate::testkit::build::ipv6([2, 0, 0, 0, 0, 0x64], src, 60, &mut l4, 8 + 16);
        let original = f[14..].to_vec();
        f.resize(2048, 0);
        let n = too_big(&mut f, 14, original.len(), 1280, NODE).unwrap();
        let p = parse_l2_l4(&f[..n]).unwrap();
        assert_eq!(p.dst_ip, IpAddr::V6(src.into()));
        assert_eq!(n - 14, 1280, "an answer of IPv6's minimum MTU");
        let quote = &f[14 + 48..n];
        assert_eq!(quote, &original[..1232]);
        assert_eq!(
            &quote[48..50],
            &40000u16.to_be_bytes(),
            "the client's port is quoted"
        );
        assert!(checksum::verify_with_pseudo_header(
            &p.src_ip,
            &p.dst_ip,
            IpProtocol::Icmpv6,
            &f[54..n]
        ));
        // A buffer with no room for the answer's headers: nothing half-built.
        let mut short = original.clone();
        short.splice(0..0, [0u8; 14]);
        let len = short.len();
        assert_eq!(
            too_big(&mut short[..14 + 40], 14, len - 14, 1280, NODE),
            None
        );
    }

    /// Every kind of outer header, written for inner packets of a few lengths and both IP
    /// versions: (the case, the header's bytes in hex for 40-byte inner packets), and an
    /// FNV-1a digest of every case's whole output (`None` as one byte 0xff).
    fn written_headers() -> (Vec<(String, String)>, u64) {
        let v4 = (
            Ipv4Addr::new(198, 18, 0, 11).into(),
            Ipv4Addr::new(198, 18, 1, 21).into(),
        );
        let v6: (IpAddr, IpAddr) = (
            "2001:2::11".parse().unwrap(),
            "2001:2:1::21".parse().unwrap(),
        );
        let mut headers = Vec::new();
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                digest = (digest ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        };
        for (tunnel, (src, dst)) in [
            (Tunnel::Ipip, v4),
            (Tunnel::Gue { port: 6080 }, v4),
            (Tunnel::Ipip, v6),
            (Tunnel::Gue { port: 6080 }, v6),
        ] {
            let o = Outer::new(tunnel, src, dst, NODE, BACKEND).unwrap();
            for inner_len in [0usize, 1, 40, 1400, 0xffff] {
                for inner_v6 in [false, true] {
                    let head = o.push(14) + 14;
                    let mut f: Vec<u8> = (0..head + inner_len.min(1400))
                        .map(|i| (i * 7 + 3) as u8)
                        .collect();
                    match o.write(&mut f, inner_len, inner_v6, 0x2345) {
                        Some(n) => {
                            feed(&f[..n]);
                            if inner_len == 40 {
                                let hex: String =
                                    f[..head].iter().map(|b| format!("{b:02x}")).collect();
                                let kind = match tunnel {
                                    Tunnel::Ipip => "ipip",
                                    Tunnel::Gue { .. } => "gue",
                                };
                                let case = format!("{kind} to {dst}, inner v6 {inner_v6}");
                                headers.push((case, hex));
                            }
                        }
                        None => feed(&[0xff]),
                    }
                }
            }
        }
        (headers, digest)
    }

    /// The writer's output pinned byte for byte: the headers of 40-byte inner packets, and a
    /// digest of every case's whole output (other lengths, the IPv6 UDP checksum over the whole
    /// packet, the `None` cases). The values are the output of the writer before 2026-12-07's
    /// rewrite for constant lengths, which gave the same for every case.
    #[test]
    fn outer_headers_are_pinned_byte_for_byte() {
        const HEADERS: [(&str, &str); 8] = [
            (
                "ipip to 198.18.1.21, inner v6 false",
                concat!(
                    "02bb00000001020000000001080045f8003c000040004004ac81c612000bc612",
                    "0115",
                ),
            ),
            (
                "ipip to 198.18.1.21, inner v6 true",
                concat!(
                    "02bb000000010200000000010800451f003c000040004029ad35c612000bc612",
                    "0115",
                ),
            ),
            (
                "gue to 198.18.1.21, inner v6 false",
                concat!(
                    "02bb000000010200000000010800454c0048000040004011ad14c612000bc612",
                    "0115e34517c00034000000040000",
                ),
            ),
            (
                "gue to 198.18.1.21, inner v6 true",
                concat!(
                    "02bb00000001020000000001080045540048000040004011ad0cc612000bc612",
                    "0115e34517c00034000000290000",
                ),
            ),
            (
                "ipip to 2001:2:1::21, inner v6 false",
                concat!(
                    "02bb0000000102000000000186dd684123450028044020010002000000000000",
                    "00000000001120010002000100000000000000000021",
                ),
            ),
            (
                "ipip to 2001:2:1::21, inner v6 true",
                concat!(
                    "02bb0000000102000000000186dd6d8123450028294020010002000000000000",
                    "00000000001120010002000100000000000000000021",
                ),
            ),
            (
                "gue to 2001:2:1::21, inner v6 false",
                concat!(
                    "02bb0000000102000000000186dd6d8123450034114020010002000000000000",
                    "00000000001120010002000100000000000000000021e34517c0003401f50004",
                    "0000",
                ),
            ),
            (
                "gue to 2001:2:1::21, inner v6 true",
                concat!(
                    "02bb0000000102000000000186dd61d123450034114020010002000000000000",
                    "00000000001120010002000100000000000000000021e34517c0003401d00029",
                    "0000",
                ),
            ),
        ];
        let (headers, digest) = written_headers();
        let expected: Vec<(String, String)> = HEADERS
            .iter()
            .map(|(case, hex)| (case.to_string(), hex.to_string()))
            .collect();
        assert_eq!(headers, expected);
        assert_eq!(digest, 0x4e88_36fa_f518_e9a4);
    }
}
