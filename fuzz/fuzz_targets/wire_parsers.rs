//! Every packet view and `Repr::parse` in `wire`, on arbitrary bytes: none may panic. The first
//! byte picks the parser so one target covers them all, and each parser's getters run after a
//! successful `new_checked` (which promises they cannot panic).
#![no_main]

use clonecluster::wire::{arp, ethernet, icmpv4, icmpv6, ipv4, ipv6, tcp, udp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(f) = ethernet::Frame::new_checked(bytes) {
                let _ = (f.dst(), f.src(), f.ethertype(), f.vlan(), f.payload());
                let _ = ethernet::Repr::parse(&f);
            }
        }
        1 => {
            if let Ok(p) = arp::Packet::new_checked(bytes) {
                let _ = arp::Repr::parse(&p);
            }
        }
        2 => {
            if let Ok(p) = ipv4::Packet::new_checked(bytes) {
                let _ = (p.payload(), p.options(), p.verify_checksum(), p.is_fragment());
                let _ = ipv4::Repr::parse(&p);
            }
        }
        3 => {
            if let Ok(p) = ipv6::Packet::new_checked(bytes) {
                let _ = p.chain();
                let _ = ipv6::Repr::parse(&p);
            }
        }
        4 => {
            if let Ok(p) = tcp::Packet::new_checked(bytes) {
                let _ = (p.src_port(), p.dst_port(), p.options());
                let _ = tcp::Repr::parse(&p);
            }
        }
        5 => {
            if let Ok(p) = udp::Packet::new_checked(bytes) {
                let _ = udp::Repr::parse(&p);
            }
        }
        6 => {
            if let Ok(p) = icmpv4::Packet::new_checked(bytes) {
                let _ = (p.msg_type(), p.quoted_datagram(), p.next_hop_mtu());
            }
        }
        _ => {
            if let Ok(p) = icmpv6::Packet::new_checked(bytes) {
                let _ = (p.msg_type(), p.quoted_packet(), p.target_addr(), p.mtu());
                let _ = icmpv6::NdiscRepr::parse(&p);
            }
        }
    }
});
