//! Which packet core decides a frame, when a node runs several: its *home core*.
//!
//! A core's pipeline keeps per-flow state (its flow table, the flows learned as an old owner's,
//! the fragment tracker, held later fragments). Both directions of a flow, all fragments of a
//! datagram and the ICMP errors about a flow must meet that state on one core, whatever queue
//! the port's own spreading (RSS, `PACKET_FANOUT`, the tap's flow steering) put them on: the
//! wire and host ports spread by different functions, and IP fragments carry no ports. So every
//! core hashes the flow's *remote address* — the client's: the source of a frame from the wire,
//! the destination of a frame from the host, the quoted destination of an ICMP error from the
//! wire — and a frame whose home is another core is passed to it.
//!
//! Keyed by address alone, every flow of one client meets on one core: the price of fragments
//! that carry no ports. Many clients spread over the cores; one busy client does not.
//!
//! This module only reads headers at fixed offsets; it must never fail on a frame (a frame it
//! cannot read has no home and stays on the core that received it, where the pipeline counts
//! it) and never look at anything but the frame.

/// Where a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The shared segment: the remote end is the source.
    Wire,
    /// The node's own kernel: the remote end is the destination.
    Host,
}

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4: u16 = 0x0800;
const IPV6: u16 = 0x86dd;
const VLAN: u16 = 0x8100;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// The home core of `frame` among `cores` (> 0), or `None` for a frame that carries no flow
/// state (not IP, or too short to read): any core decides those alike.
#[inline]
pub fn home_core(frame: &[u8], side: Side, cores: usize) -> Option<usize> {
    let remote = remote_address(frame, side)?;
    Some(spread(remote, cores))
}

/// A hash of the remote address of `frame` (see the module doc).
#[inline]
fn remote_address(frame: &[u8], side: Side) -> Option<u64> {
    let mut l3 = ETH_LEN;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == VLAN {
        ethertype = be16(frame, 16)?;
        l3 += VLAN_LEN;
    }
    match ethertype {
        IPV4 => {
            let ip = frame.get(l3..l3 + 20)?;
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
            if side == Side::Wire && ip[9] == ICMP && first_fragment {
                if let Some(quoted) = quoted_ipv4_destination(frame, l3 + header_len) {
                    return Some(quoted);
                }
            }
            let at = if side == Side::Wire { 12 } else { 16 };
            Some(u64::from(u32::from_be_bytes(
                ip[at..at + 4].try_into().ok()?,
            )))
        }
        IPV6 => {
            let ip = frame.get(l3..l3 + 40)?;
            if side == Side::Wire && ip[6] == ICMPV6 {
                if let Some(quoted) = quoted_ipv6_destination(frame, l3 + 40) {
                    return Some(quoted);
                }
            }
            let at = if side == Side::Wire { 8 } else { 24 };
            Some(fold6(&ip[at..at + 16]))
        }
        _ => None,
    }
}

/// An ICMPv4 error's quoted destination (the client the flow's packet was sent to).
fn quoted_ipv4_destination(frame: &[u8], icmp: usize) -> Option<u64> {
    let kind = *frame.get(icmp)?;
    // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
    if !matches!(kind, 3 | 4 | 5 | 11 | 12) {
        return None;
    }
    let inner = frame.get(icmp + 8..icmp + 8 + 20)?;
    Some(u64::from(u32::from_be_bytes(
        inner[16..20].try_into().ok()?,
    )))
}

/// An ICMPv6 error's quoted destination.
fn quoted_ipv6_destination(frame: &[u8], icmp: usize) -> Option<u64> {
    let kind = *frame.get(icmp)?;
    // Errors are types 0-127: destination unreachable, packet too big, time exceeded,
    // parameter problem.
    if kind >= 128 {
        return None;
    }
    let inner = frame.get(icmp + 8..icmp + 8 + 40)?;
    Some(fold6(&inner[24..40]))
}

#[inline]
fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

#[inline]
fn fold6(addr: &[u8]) -> u64 {
    let word = |i: usize| u64::from_be_bytes(addr[i..i + 8].try_into().expect("8 bytes"));
    word(0) ^ word(8).rotate_left(29)
}

/// The address hash onto `cores`: a multiplicative mix, then a multiply-shift range
/// reduction (no division per frame).
#[inline]
fn spread(x: u64, cores: usize) -> usize {
    let mixed = (x ^ (x >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (((mixed >> 32) * cores as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CLUSTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    /// Ethernet + IPv4 (fragment field `frag`) + `l4`; checksums do not matter here.
    fn v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&dst.octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    fn ports(src: u16, dst: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&src.to_be_bytes());
        l4[2..4].copy_from_slice(&dst.to_be_bytes());
        l4
    }

    #[test]
    fn both_directions_of_a_flow_have_one_home() {
        for cores in [2, 3, 4, 8] {
            for n in 1..=200u8 {
                let c = Ipv4Addr::new(198, 18, 1, n);
                let port = 40000 + u16::from(n);
                let to_cluster = v4(c, CLUSTER, 6, 0x4000, &ports(port, 80));
                let reply = v4(CLUSTER, c, 6, 0x4000, &ports(80, port));
                let a = home_core(&to_cluster, Side::Wire, cores).unwrap();
                let b = home_core(&reply, Side::Host, cores).unwrap();
                assert_eq!(a, b, "client {c}, {cores} cores");
                assert!(a < cores);
            }
        }
    }

    #[test]
    fn ipv6_flows_and_their_replies_have_one_home() {
        let s: Ipv6Addr = "2001:2::1".parse().unwrap();
        let mut seen = [false; 4];
        for n in 1..=100u16 {
            let c = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, n);
            let to_cluster = v6(c, s, 6, &ports(50000, 80));
            let reply = v6(s, c, 6, &ports(80, 50000));
            let home = home_core(&to_cluster, Side::Wire, 4).unwrap();
            assert_eq!(Some(home), home_core(&reply, Side::Host, 4));
            seen[home] = true;
        }
        assert_eq!(seen, [true; 4], "IPv6 clients spread over every core");
    }

    #[test]
    fn every_fragment_of_a_datagram_meets_its_flow() {
        let c = Ipv4Addr::new(198, 18, 1, 7);
        let whole = v4(c, CLUSTER, 17, 0, &ports(5000, 53));
        let first = v4(c, CLUSTER, 17, 0x2000, &ports(5000, 53));
        let later = v4(c, CLUSTER, 17, 185, &[0u8; 64]);
        let home = home_core(&whole, Side::Wire, 4);
        assert!(home.is_some());
        assert_eq!(home_core(&first, Side::Wire, 4), home);
        assert_eq!(home_core(&later, Side::Wire, 4), home);
        // The node's fragmented reply, from its kernel.
        let reply = v4(CLUSTER, c, 17, 185, &[0u8; 64]);
        assert_eq!(home_core(&reply, Side::Host, 4), home);
    }

    #[test]
    fn an_icmp_error_goes_home_with_the_flow_it_quotes() {
        let c = Ipv4Addr::new(198, 18, 1, 9);
        let flow = v4(c, CLUSTER, 6, 0x4000, &ports(41000, 80));
        let want = home_core(&flow, Side::Wire, 8);
        // The node's segment to the client, quoted by routers on the way.
        let quoted = v4(CLUSTER, c, 6, 0x4000, &ports(80, 41000));
        for n in 0..64 {
            let router = Ipv4Addr::new(198, 18, 5, n);
            let mut icmp = vec![3, 4, 0, 0, 0, 0, 5, 0xdc];
            icmp.extend_from_slice(&quoted[ETH_LEN..ETH_LEN + 28]);
            let error = v4(router, CLUSTER, ICMP, 0, &icmp);
            assert_eq!(home_core(&error, Side::Wire, 8), want, "from {router}");
        }
        let s: Ipv6Addr = "2001:2::1".parse().unwrap();
        let c6 = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 77);
        let want6 = home_core(&v6(c6, s, 6, &ports(41000, 80)), Side::Wire, 8);
        let quoted6 = v6(s, c6, 6, &ports(80, 41000));
        for n in 0..64 {
            let router = Ipv6Addr::new(0x2001, 2, 0, 9, 0, 0, 0, n);
            let mut icmp = vec![2, 0, 0, 0, 0, 0, 5, 0];
            icmp.extend_from_slice(&quoted6[ETH_LEN..ETH_LEN + 48]);
            let error = v6(router, s, ICMPV6, &icmp);
            assert_eq!(home_core(&error, Side::Wire, 8), want6, "from {router}");
        }
    }

    #[test]
    fn an_echo_request_goes_home_by_its_source() {
        let c = Ipv4Addr::new(198, 18, 1, 10);
        let echo = v4(c, CLUSTER, ICMP, 0, &[8, 0, 0, 0, 0, 1, 0, 1]);
        let reply = v4(CLUSTER, c, ICMP, 0, &[0, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(
            home_core(&echo, Side::Wire, 4),
            home_core(&reply, Side::Host, 4)
        );
    }

    #[test]
    fn frames_without_flow_state_or_too_short_have_no_home() {
        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(home_core(&arp, Side::Wire, 2), None);
        let tcp = v4(Ipv4Addr::new(198, 18, 1, 1), CLUSTER, 6, 0, &ports(1, 80));
        for len in 0..ETH_LEN + 20 {
            assert_eq!(home_core(&tcp[..len], Side::Wire, 2), None, "{len} bytes");
        }
        // A truncated ICMP error still has a home: its outer source.
        let error = v4(
            Ipv4Addr::new(198, 18, 5, 1),
            CLUSTER,
            ICMP,
            0,
            &[3, 4, 0, 0],
        );
        assert!(home_core(&error, Side::Wire, 2).is_some());
    }

    #[test]
    fn vlan_tagged_frames_have_the_untagged_home() {
        let c = Ipv4Addr::new(198, 18, 1, 11);
        let plain = v4(c, CLUSTER, 6, 0, &ports(1000, 80));
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged.extend_from_slice(&plain[12..]);
        assert_eq!(
            home_core(&tagged, Side::Wire, 8),
            home_core(&plain, Side::Wire, 8)
        );
    }

    #[test]
    fn many_clients_spread_over_the_cores() {
        let mut per_core = [0u32; 4];
        for n in 0..4000u32 {
            let c = Ipv4Addr::from(0xc612_0000 | (n + 256));
            let f = v4(c, CLUSTER, 6, 0, &ports(1234, 80));
            per_core[home_core(&f, Side::Wire, 4).unwrap()] += 1;
        }
        assert!(
            per_core.iter().all(|&n| (800..1200).contains(&n)),
            "{per_core:?}"
        );
    }
}
