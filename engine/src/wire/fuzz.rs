//! Property tests: no view and no parser panics on arbitrary bytes, whatever their length.
//! Random bytes rarely get past the first header, so real frames with random mutations are
//! fed too.

use proptest::prelude::*;

use super::*;
use crate::testkit::frames::ALL;

/// Runs every checked constructor and every getter that a successful check makes safe.
fn exercise(bytes: &[u8]) {
    let _ = parse_l2_l4(bytes);
    fast_path_agrees(bytes);
    if let Ok(f) = ethernet::Frame::new_checked(bytes) {
        let _ = (f.dst(), f.src(), f.vlan(), f.ethertype(), f.payload().len());
        let _ = ethernet::Repr::parse(&f);
    }
    if let Ok(p) = arp::Packet::new_checked(bytes) {
        let _ = arp::Repr::parse(&p);
    }
    if let Ok(p) = ipv4::Packet::new_checked(bytes) {
        let _ = (
            p.options().len(),
            p.payload().len(),
            p.verify_checksum(),
            p.frag_offset(),
        );
        let _ = ipv4::Repr::parse(&p);
    }
    if let Ok(p) = ipv6::Packet::new_checked(bytes) {
        let _ = (p.payload().len(), p.chain(), p.flow_label());
        let _ = ipv6::Repr::parse(&p);
    }
    let _ = ipv6::walk_chain(IpProtocol::HopByHop, bytes);
    let _ = ipv6::walk_chain(IpProtocol::Ipv6Opts, bytes);
    let a: std::net::IpAddr = [198, 18, 0, 1].into();
    if let Ok(p) = tcp::Packet::new_checked(bytes) {
        let _ = (
            p.options().len(),
            p.payload().len(),
            p.verify_checksum(&a, &a),
            p.flags(),
        );
        let _ = tcp::Repr::parse(&p);
    }
    if let Ok(p) = udp::Packet::new_checked(bytes) {
        let _ = (p.payload().len(), p.verify_checksum(&a, &a));
        let _ = udp::Repr::parse(&p);
    }
    if let Ok(p) = icmpv4::Packet::new_checked(bytes) {
        let _ = (
            p.quoted_datagram(),
            p.next_hop_mtu(),
            p.verify_checksum(),
            p.gateway(),
        );
    }
    if let Ok(p) = icmpv6::Packet::new_checked(bytes) {
        let z = std::net::Ipv6Addr::UNSPECIFIED;
        let _ = (
            p.quoted_packet(),
            p.mtu(),
            p.target_addr(),
            p.verify_checksum(&z, &z),
        );
        let _ = p.neighbor_options().count();
        let _ = icmpv6::NdiscRepr::parse(&p);
    }
    let _ = icmpv6::NdiscOptions::new(bytes).count();
}

/// [`parse_ip_flow`] accepts exactly the untagged, unfragmented TCP/UDP frames over IPv4
/// without options or IPv6 without extension headers that [`parse_l2_l4`] reads without error,
/// and reads them the same.
fn fast_path_agrees(frame: &[u8]) {
    let fast = parse_ip_flow(frame);
    let common = match parse_l2_l4(frame) {
        Ok(p)
            if p.vlan.is_none()
                && ((p.ip_version == 4 && p.l4_offset == 14 + ipv4::HEADER_LEN)
                    || (p.ip_version == 6 && p.l4_offset == 14 + ipv6::HEADER_LEN))
                && p.fragment.is_none()
                && matches!(p.protocol, IpProtocol::Tcp | IpProtocol::Udp) =>
        {
            Some(p)
        }
        _ => None,
    };
    match (fast, common) {
        (None, None) => {}
        (Some(f), Some(p)) => {
            assert_eq!(p.src_ip, f.src, "{frame:02x?}");
            assert_eq!(p.dst_ip, f.dst, "{frame:02x?}");
            assert_eq!(u8::from(p.protocol), f.protocol, "{frame:02x?}");
            assert_eq!(p.src_port, Some(f.src_port), "{frame:02x?}");
            assert_eq!(p.dst_port, Some(f.dst_port), "{frame:02x?}");
            assert_eq!(p.tcp_flags.0 as u8, f.tcp_flags, "{frame:02x?}");
        }
        (fast, common) => panic!("fast path {fast:?} vs parse_l2_l4 {common:?}: {frame:02x?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Edits aimed at the headers the fast path reads (the first 80 bytes), lengths included.
    #[test]
    fn the_fast_path_agrees_with_the_full_parser(
        which in 0..ALL.len(),
        edits in proptest::collection::vec((0usize..80, any::<u8>()), 0..4),
        cut in any::<usize>(),
        grow in 0usize..40,
    ) {
        let mut frame = ALL[which].to_vec();
        frame.resize(frame.len() + grow, 0);
        for (at, value) in edits {
            let at = at % frame.len();
            frame[at] = value;
        }
        fast_path_agrees(&frame);
        fast_path_agrees(&frame[..cut % (frame.len() + 1)]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        exercise(&bytes);
        // Also behind an Ethernet header, so the random part reaches the IP parsers.
        for ethertype in [[0x08, 0x00], [0x86, 0xdd], [0x08, 0x06]] {
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&ethertype);
            frame.extend_from_slice(&bytes);
            exercise(&frame);
        }
    }

    #[test]
    fn mutated_real_frames_never_panic(
        which in 0..ALL.len(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut frame = ALL[which].to_vec();
        for (at, value) in edits {
            let at = at % frame.len();
            frame[at] = value;
        }
        exercise(&frame);
        let cut = cut % (frame.len() + 1);
        exercise(&frame[..cut]);
        for l3 in [14usize, 18] {
            if let Some(rest) = frame.get(l3..) {
                exercise(rest);
            }
        }
    }
}
