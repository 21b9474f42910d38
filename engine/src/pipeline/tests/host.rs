//! Frames from the host: the kernel's own answers for the cluster address, the node MAC as
//! source, and server FIN/RST ending flows.

use super::*;
use crate::wire::icmpv6;

#[test]
fn host_side_rules() {
    let frames = capture();
    let mut p = alone();
    // The kernel's ARP reply for the cluster IP is dropped: the engine answers.
    let mut reply = frames
        .iter()
        .find(|f| f[12..14] == [8, 6] && f[21] == 2 && f[28..32] == [198, 18, 0, 1])
        .unwrap()
        .clone();
    assert_eq!(
        p.from_host(&mut reply, 0),
        Action::Drop(DropReason::HostSuppressed)
    );
    // So is its neighbour advertisement for the cluster IPv6 address.
    let cluster6: Ipv6Addr = "2001:2::1".parse().unwrap();
    let mut na = frames
        .iter()
        .find(|f| f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == cluster6.octets())
        .unwrap()
        .clone();
    assert_eq!(
        p.from_host(&mut na, 0),
        Action::Drop(DropReason::HostSuppressed)
    );
    // Everything else passes with the node MAC as source and nothing else changed.
    for f in frames.iter().filter(|f| f[6..12] == CLUSTER_MAC.0) {
        let mut out = f.clone();
        match p.from_host(&mut out, 0) {
            Action::ToWire => {
                assert_eq!(out[6..12], NODE_MAC.0);
                assert_eq!(out[..6], f[..6]);
                assert_eq!(out[12..], f[12..]);
            }
            Action::Drop(DropReason::HostSuppressed) => {}
            other => panic!("{other:?}"),
        }
    }
    // The kernel's own ARP requests (resolving a client) pass.
    let mut req = reply.clone();
    req[21] = 1;
    req[38..42].copy_from_slice(&[198, 18, 0, 2]);
    assert_eq!(p.from_host(&mut req, 0), Action::ToWire);
}

#[test]
fn a_server_reset_ends_the_flow() {
    let mut p = alone();
    let client = Ipv4Addr::new(198, 19, 0, 7);
    let syn = ipv4_frame(client, 40_000, &Kind::Tcp(0x02));
    let mut buf = vec![0u8; 2048];
    buf[..syn.len()].copy_from_slice(&syn);
    assert_eq!(
        p.from_wire(&mut FrameBuf::at_start(&mut buf), syn.len(), 1),
        Action::Deliver
    );
    assert_eq!(p.flows().len(), 1);
    // The kernel refuses it: RST|ACK from 198.18.0.1:80 to the client.
    let mut rst = ipv4_frame(client, 40_000, &Kind::Tcp(0x14));
    rst[26..30].copy_from_slice(&[198, 18, 0, 1]);
    rst[30..34].copy_from_slice(&client.octets());
    rst[34..36].copy_from_slice(&80u16.to_be_bytes());
    rst[36..38].copy_from_slice(&40_000u16.to_be_bytes());
    assert_eq!(p.from_host(&mut rst, 2), Action::ToWire);
    let key = FlowKey::new(Affinity::None, IpAddr::V4(client), 40_000, 6);
    let id = FlowHash::new(
        p.hasher.hash(&key),
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        40_000,
        80,
        6,
    );
    assert_eq!(
        p.flows().get(id, 2).map(|e| e.state),
        Some(crate::cluster::FlowState::Closing)
    );
}

/// The kernel's RST to a SYN on the health-checked port is held back while another node
/// serves, and the flow forgotten: the retransmitted SYN is a new flow again.
#[test]
fn a_refused_connection_is_held_back_on_the_checked_port_only() {
    let client = Ipv4Addr::new(198, 19, 0, 7);
    let rst_to = |port: u16| {
        let mut rst = ipv4_frame(client, port, &Kind::Tcp(0x14));
        rst[26..30].copy_from_slice(&[198, 18, 0, 1]);
        rst[30..34].copy_from_slice(&client.octets());
        rst[34..36].copy_from_slice(&80u16.to_be_bytes());
        rst[36..38].copy_from_slice(&port.to_be_bytes());
        rst
    };
    for (hold, port, held) in [
        (Some(80), 40_000, true),
        (Some(443), 40_001, false),
        (None, 40_002, false),
    ] {
        let mut p = alone();
        p.set_service(ServiceState {
            hold_refusals_on: hold,
            ..ServiceState::default()
        });
        let syn = ipv4_frame(client, port, &Kind::Tcp(0x02));
        let mut buf = vec![0u8; 2048];
        buf[..syn.len()].copy_from_slice(&syn);
        assert_eq!(
            p.from_wire(&mut FrameBuf::at_start(&mut buf), syn.len(), 1),
            Action::Deliver
        );
        let expect = if held {
            Action::Drop(DropReason::ServiceRefused)
        } else {
            Action::ToWire
        };
        assert_eq!(p.from_host(&mut rst_to(port), 2), expect, "hold {hold:?}");
        assert_eq!(p.flows().len(), usize::from(!held), "hold {hold:?}");
    }
}

/// The same on IPv6: the server's FIN or RST from the cluster's IPv6 address ends the flow, and
/// the kernel's RST to a SYN on the health-checked port is held back while another node serves.
#[test]
fn ipv6_server_segments_end_flows_and_refusals_are_held_back() {
    use crate::testkit::build;
    let client: Ipv6Addr = "2001:2::100".parse().unwrap();
    let cluster6 = IpAddr::V6("2001:2::1".parse().unwrap());
    let syn = |port: u16| {
        let mut t = build::tcp(port, 1, 0, build::SYN, b"");
        build::ipv6(CLIENT_MAC.0, client.octets(), 6, &mut t, 16)
    };
    // The server's segment: the client's frame with addresses and ports swapped.
    let from_server = |port: u16, flags: u8| {
        let mut f = syn(port);
        f[..6].copy_from_slice(&CLIENT_MAC.0);
        f[6..12].copy_from_slice(&CLUSTER_MAC.0);
        let (dst, src) = (f[38..54].to_vec(), f[22..38].to_vec());
        f[22..38].copy_from_slice(&dst);
        f[38..54].copy_from_slice(&src);
        f[54..56].copy_from_slice(&80u16.to_be_bytes());
        f[56..58].copy_from_slice(&port.to_be_bytes());
        f[67] = flags;
        f
    };
    let flow = |p: &Pipeline, port: u16| {
        let key = FlowKey::new(Affinity::None, IpAddr::V6(client), port, 6);
        let id = FlowHash::new(p.hasher.hash(&key), cluster6, port, 80, 6);
        p.flows().get(id, 2).map(|e| e.state)
    };
    // (port the refusals are held on, the server's flags, held back, flow state after)
    let closing = Some(crate::cluster::FlowState::Closing);
    for (hold, port, flags, held, after) in [
        (Some(80), 40_000, 0x14, true, None),
        (Some(443), 40_001, 0x14, false, closing),
        (None, 40_002, 0x14, false, closing),
        (Some(80), 40_003, 0x11, false, closing),
    ] {
        let mut p = alone();
        p.set_service(ServiceState {
            hold_refusals_on: hold,
            ..ServiceState::default()
        });
        let syn = syn(port);
        let mut buf = vec![0u8; 2048];
        buf[..syn.len()].copy_from_slice(&syn);
        assert_eq!(
            p.from_wire(&mut FrameBuf::at_start(&mut buf), syn.len(), 1),
            Action::Deliver
        );
        assert_eq!(flow(&p, port), Some(crate::cluster::FlowState::SynSeen));
        let expect = if held {
            Action::Drop(DropReason::ServiceRefused)
        } else {
            Action::ToWire
        };
        let mut segment = from_server(port, flags);
        assert_eq!(
            p.from_host(&mut segment, 2),
            expect,
            "hold {hold:?} {flags:#x}"
        );
        assert_eq!(flow(&p, port), after, "hold {hold:?} {flags:#x}");
        assert_eq!(p.flows().len(), usize::from(!held), "hold {hold:?}");
    }
}

/// The kernel resolving a neighbour from the node's own IPv6 address (an appliance's
/// `node.ip6`, checking an IPv6 backend) names the node MAC in its solicitation, and so in its
/// advertisements: the backend's answers then come to this node, not to whichever node owns
/// their bucket. Solicitations from the cluster address keep the cluster MAC.
#[test]
fn the_kernels_own_ipv6_neighbour_messages_carry_the_node_mac() {
    let own: Ipv6Addr = "2001:2::a1".parse().unwrap();
    let backend: Ipv6Addr = "2001:2::b1".parse().unwrap();
    let cluster6: Ipv6Addr = "2001:2::1".parse().unwrap();
    // Type 135 (solicitation) or 136 (advertisement) from `src`, with a source (1) or target
    // (2) link-layer address option holding the cluster MAC.
    let message = |kind: u8, src: Ipv6Addr, target: Ipv6Addr| {
        let mut icmp = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(&[if kind == 135 { 1 } else { 2 }, 1]);
        icmp.extend_from_slice(&CLUSTER_MAC.0);
        let dst: Ipv6Addr = "ff02::1:ff00:b1".parse().unwrap();
        let mut f = Vec::new();
        f.extend_from_slice(&[0x33, 0x33, 0xff, 0, 0, 0xb1]);
        f.extend_from_slice(&CLUSTER_MAC.0);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        icmpv6::Packet::new_unchecked(&mut icmp[..]).fill_checksum(&src, &dst);
        f.extend_from_slice(&icmp);
        (f, src, dst)
    };
    let table = OwnershipTable::build(1, &[Member::new(1, 100).unwrap()]).unwrap();
    let id = NodeIdentity {
        node_ip6: Some(own),
        ..identity(1)
    };
    let snapshot = Arc::new(stable_snapshot(&table));
    let mut p = Pipeline::new(id, SECRET, snapshot, small());
    for kind in [135u8, 136] {
        let (mut f, src, dst) = message(kind, own, backend);
        assert_eq!(p.from_host(&mut f, 0), Action::ToWire);
        assert_eq!(f[6..12], NODE_MAC.0);
        assert_eq!(
            f[80..86],
            NODE_MAC.0,
            "type {kind}: the option names the node MAC"
        );
        let packet = icmpv6::Packet::new_checked(&f[54..]).unwrap();
        assert!(packet.verify_checksum(&src, &dst), "type {kind}");
    }
    // From the cluster address (the kernel resolving a client) or another address: the option
    // stays; so it does on a node without an IPv6 address of its own.
    for src in [cluster6, "2001:2::77".parse().unwrap()] {
        let (mut f, ..) = message(135, src, backend);
        let before = f.clone();
        assert_eq!(p.from_host(&mut f, 0), Action::ToWire);
        assert_eq!(f[12..], before[12..]);
    }
    let (mut f, ..) = message(135, own, backend);
    let before = f.clone();
    assert_eq!(alone().from_host(&mut f, 0), Action::ToWire);
    assert_eq!(f[12..], before[12..]);
    // Truncated or odd options change nothing and never panic.
    let (full, ..) = message(135, own, backend);
    for len in 54..full.len() {
        let mut f = full[..len].to_vec();
        let _ = p.from_host(&mut f, 0);
        assert_eq!(f[12..], full[12..len], "{len} bytes");
    }
    let (mut zero, ..) = message(135, own, backend);
    zero[79] = 0;
    let _ = p.from_host(&mut zero, 0);
}
