//! How an owned frame reaches its backend: DSR's MAC rewrite, IP-in-IP and GUE encapsulation,
//! and the ICMP answer for a datagram too big for the encapsulated path.
//!
//! Plain functions over byte slices. An encapsulation grows the frame at the front: the caller
//! makes room ([`Encap::push`] bytes before the frame, an mbuf's headroom) and then calls
//! [`Encap::write`] on the grown frame. Never reads a clock, never allocates, never panics on a
//! frame (lengths are checked by the caller's parse and again here).

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

/// The header checksum of the outer IPv4 header [`Encap::write`] builds (total length
/// `total_len`, protocol `proto`), summed from its fields: summing the bytes just written, read
/// back as 16-bit words, would stall each read on store forwarding.
#[inline(always)]
fn outer_ipv4_checksum(
    total_len: u16,
    proto: u8,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
) -> u16 {
    let (s, d) = (u64::from(u32::from(src)), u64::from(u32::from(dst)));
    // Version and IHL, length, identification 0, DF, TTL and protocol, checksum 0, addresses.
    let sum = 0x4500
        + u64::from(total_len)
        + 0x4000
        + (u64::from(OUTER_TTL) << 8 | u64::from(proto))
        + (s >> 16)
        + (s & 0xffff)
        + (d >> 16)
        + (d & 0xffff);
    checksum::finish(sum)
}

/// DSR: the frame goes to `backend`'s MAC from the node's own MAC, unchanged above layer 2.
#[inline]
pub fn dsr(frame: &mut [u8], node_mac: EthernetAddress, backend: EthernetAddress) {
    if let Some(h) = frame.get_mut(..12) {
        h[..6].copy_from_slice(&backend.0);
        h[6..12].copy_from_slice(&node_mac.0);
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

/// One encapsulation to carry out: everything [`Encap::write`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encap {
    pub tunnel: Tunnel,
    /// The node's own address (the outer source) and the backend's (the outer destination):
    /// the same IP version.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub node_mac: EthernetAddress,
    pub next_hop: EthernetAddress,
    /// Where the inner IP packet starts in the original frame, and its length.
    pub inner_at: usize,
    pub inner_len: usize,
    /// The inner packet is IPv6.
    pub inner_v6: bool,
    /// A per-flow value for the outer UDP source port (GUE): a backend's NIC spreads flows by it.
    pub entropy: u16,
}

impl Encap {
    /// Bytes of outer headers after the Ethernet header.
    pub fn overhead(tunnel: Tunnel, outer_v6: bool) -> usize {
        let ip = if outer_v6 { IPV6 } else { IPV4 };
        match tunnel {
            Tunnel::Ipip => ip,
            Tunnel::Gue { .. } => ip + UDP + GUE,
        }
    }

    /// Bytes to add before the frame (0 or more: a VLAN tag's 4 bytes are dropped).
    pub fn push(&self) -> usize {
        (ETH + Self::overhead(self.tunnel, self.dst.is_ipv6())).saturating_sub(self.inner_at)
    }

    /// The outer packet's IP length.
    pub fn outer_len(&self) -> usize {
        Self::overhead(self.tunnel, self.dst.is_ipv6()) + self.inner_len
    }

    /// Writes the outer headers into `frame`, the original frame after [`Encap::push`] bytes
    /// were added in front of it. Returns the new frame's length, or `None` if `frame` is too
    /// short (nothing sensible to send).
    pub fn write(&self, frame: &mut [u8]) -> Option<usize> {
        let over = Self::overhead(self.tunnel, self.dst.is_ipv6());
        let total = ETH + over + self.inner_len;
        let frame = frame.get_mut(..total)?;
        let outer_len = u16::try_from(over + self.inner_len).ok()?;
        frame[..6].copy_from_slice(&self.next_hop.0);
        frame[6..12].copy_from_slice(&self.node_mac.0);
        let inner_proto = if self.inner_v6 {
            PROTO_IPV6
        } else {
            PROTO_IPV4
        };
        let next = match self.tunnel {
            Tunnel::Ipip => inner_proto,
            Tunnel::Gue { .. } => IpProtocol::Udp.raw(),
        };
        let ip_len = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let h = &mut frame[ETH..ETH + IPV4];
                h[0] = 0x45;
                h[1] = 0;
                h[2..4].copy_from_slice(&outer_len.to_be_bytes());
                // Identification 0 with DF set (RFC 6864: an atomic datagram).
                h[4..6].fill(0);
                h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
                h[8] = OUTER_TTL;
                h[9] = next;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                let c = outer_ipv4_checksum(outer_len, next, s, d);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                IPV4
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let h = &mut frame[ETH..ETH + IPV6];
                h[..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
                let payload = outer_len - IPV6 as u16;
                h[4..6].copy_from_slice(&payload.to_be_bytes());
                h[6] = next;
                h[7] = OUTER_TTL;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                IPV6
            }
            _ => return None,
        };
        if let Tunnel::Gue { port } = self.tunnel {
            let at = ETH + ip_len;
            let udp_len = UDP + GUE + self.inner_len;
            let u = &mut frame[at..at + UDP + GUE];
            // An ephemeral source port (49152..=65535) from the flow: spread, never 0.
            u[..2].copy_from_slice(&(0xc000 | self.entropy).to_be_bytes());
            u[2..4].copy_from_slice(&port.to_be_bytes());
            u[4..6].copy_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
            u[6..8].fill(0);
            // GUE version 0, no control flag, no optional fields; then the inner protocol.
            u[8] = 0;
            u[9] = inner_proto;
            u[10..12].fill(0);
            if self.dst.is_ipv6() {
                // IPv6 needs the UDP checksum (RFC 8200 §8.1).
                let c = checksum::compute_with_pseudo_header(
                    &self.src,
                    &self.dst,
                    IpProtocol::Udp,
                    &frame[at..total],
                );
                let c = if c == 0 { 0xffff } else { c };
                frame[at + 6..at + 8].copy_from_slice(&c.to_be_bytes());
            }
        }
        Some(total)
    }
}

/// Rewrites, in place, a frame whose IP packet (at `l3`, `ip_len` bytes) is too big for a path
/// of `mtu` bytes into the ICMP error that tells its sender: "fragmentation needed" (IPv4) or
/// "packet too big" (IPv6), from `from` (the service address it was sent to), to the frame's
/// source MAC from `node_mac`. Returns the answer's length. The quoted part is the original
/// header and the first 8 bytes of its payload (enough for the sender to find its socket).
pub fn too_big(
    frame: &mut [u8],
    l3: usize,
    ip_len: usize,
    mtu: u16,
    node_mac: EthernetAddress,
) -> Option<usize> {
    let v6 = frame.get(l3)? >> 4 == 6;
    let ip_header = if v6 {
        IPV6
    } else {
        usize::from(frame.get(l3)? & 0x0f) * 4
    };
    let quoted = (ip_header + 8).min(ip_len);
    // The quoted bytes (at most 68) move behind the new headers, and the addresses are read
    // from the header they overwrite: copy both out first.
    let mut q = [0u8; 68];
    q[..quoted].copy_from_slice(frame.get(l3..l3 + quoted)?);
    let src = &q;
    let client_mac = EthernetAddress(frame.get(6..12)?.try_into().ok()?);
    let icmp_at = ETH + if v6 { IPV6 } else { IPV4 };
    let total = icmp_at + 8 + quoted;
    let out = frame.get_mut(..total)?;
    out[..6].copy_from_slice(&client_mac.0);
    out[6..12].copy_from_slice(&node_mac.0);
    let ip_total = u16::try_from(total - ETH).ok()?;
    if v6 {
        let (client, service) = (addr6(src, 8), addr6(src, 24));
        out[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        let h = &mut out[ETH..ETH + IPV6];
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
        i[8..].copy_from_slice(&q[..quoted]);
        let c = checksum::compute_with_pseudo_header(
            &IpAddr::V6(service),
            &IpAddr::V6(client),
            IpProtocol::Icmpv6,
            i,
        );
        i[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let h = &mut out[ETH..ETH + IPV4];
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
        i[8..].copy_from_slice(&q[..quoted]);
        let c = checksum::checksum(i);
        i[2..4].copy_from_slice(&c.to_be_bytes());
    }
    Some(total)
}

fn addr6(h: &[u8; 68], at: usize) -> std::net::Ipv6Addr {
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

    /// The outer IPv4 checksum summed from the fields is the one summed over the header bytes.
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
            for total_len in [20u16, 60, 1500, 9000, 0xffff] {
                for proto in [4u8, 17, 41] {
                    let mut h = [0u8; 20];
                    h[0] = 0x45;
                    h[2..4].copy_from_slice(&total_len.to_be_bytes());
                    h[6] = 0x40;
                    h[8] = OUTER_TTL;
                    h[9] = proto;
                    h[12..16].copy_from_slice(&s.octets());
                    h[16..20].copy_from_slice(&d.octets());
                    assert_eq!(
                        outer_ipv4_checksum(total_len, proto, *s, *d),
                        checksum::checksum(&h),
                        "case {i}: {s} -> {d}, {total_len} bytes, protocol {proto}"
                    );
                }
            }
        }
    }

    #[test]
    fn dsr_rewrites_only_the_macs() {
        let mut f = client_syn();
        let before = f.clone();
        dsr(&mut f, NODE, BACKEND);
        assert_eq!(&f[..6], &BACKEND.0);
        assert_eq!(&f[6..12], &NODE.0);
        assert_eq!(f[12..], before[12..]);
    }

    fn encap(tunnel: Tunnel, src: IpAddr, dst: IpAddr, f: &[u8]) -> Vec<u8> {
        let e = Encap {
            tunnel,
            src,
            dst,
            node_mac: NODE,
            next_hop: BACKEND,
            inner_at: 14,
            inner_len: f.len() - 14,
            inner_v6: false,
            entropy: 0x1234,
        };
        let mut grown = vec![0u8; e.push()];
        grown.extend_from_slice(f);
        let n = e.write(&mut grown).unwrap();
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
        let f = client_syn();
        let (src, dst): (IpAddr, IpAddr) = (
            "2001:2::11".parse().unwrap(),
            "2001:2:1::21".parse().unwrap(),
        );
        let g = encap(Tunnel::Ipip, src, dst, &f);
        let outer = ipv6::Packet::new_checked(&g[14..]).unwrap();
        assert_eq!(outer.next_header(), IpProtocol::from(4u8));
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
    }
}
