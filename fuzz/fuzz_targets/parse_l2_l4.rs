//! The one-pass classifier the data path runs on every frame: never a panic; and its fixed-offset
//! fast path, `parse_ip_flow`, accepts exactly the plain TCP/UDP frames (untagged, IPv4 without
//! options or IPv6 without extension headers, not fragmented) and reads them as the full parser
//! does.
#![no_main]

use clonecluster::wire::{parse_ip_flow, parse_l2_l4, IpProtocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse_l2_l4(data);
    if let Some(f) = parse_ip_flow(data) {
        let p = full.expect("the full parser accepts what the fast path accepts");
        assert!(p.vlan.is_none() && p.fragment.is_none(), "{data:02x?}");
        assert_eq!(
            (p.src_ip, p.dst_ip, u8::from(p.protocol)),
            (f.src, f.dst, f.protocol),
            "{data:02x?}"
        );
        assert_eq!(
            (p.src_port, p.dst_port, p.tcp_flags.0 as u8),
            (Some(f.src_port), Some(f.dst_port), f.tcp_flags),
            "{data:02x?}"
        );
    } else if let Ok(p) = full {
        let plain = p.vlan.is_none()
            && p.fragment.is_none()
            && matches!(p.protocol, IpProtocol::Tcp | IpProtocol::Udp)
            && ((p.ip_version == 4 && p.l4_offset == 34)
                || (p.ip_version == 6 && p.l4_offset == 54));
        assert!(
            !plain,
            "the fast path refused a plain TCP/UDP frame: {data:02x?}"
        );
    }
});
