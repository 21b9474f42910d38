//! Appliance mode: frames to a service address go from their one owner to their backend, and
//! every node chooses the same backend for a flow.

use super::*;
use crate::appliance::{BackendState, Services};
use crate::config::Config;
use crate::testkit::build;

/// Two DSR backends and a GUE backend behind the cluster address's port 80 (the test frames'
/// destination), a disabled rule on port 22 and nothing on the other ports.
const SERVICES: &str = r#"
cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
  ip: 198.18.0.11
dataplane:
  eal_args: [--no-huge, -m, "256"]
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
services:
  - name: web
    addresses: [198.18.0.1]
    ports: [80]
    delivery: DELIVERY
    backends:
      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { ip: 198.18.0.22, mac: 02:bb:00:00:00:02 }
      - { ip: 198.18.0.23, mac: 02:bb:00:00:00:03 }
  - name: ssh
    addresses: [198.18.0.1]
    ports: [22]
    mode: disabled
"#;

/// [`SERVICES`] without its services: the cluster, the node and its data plane.
pub(super) fn node_yaml() -> &'static str {
    &SERVICES[..SERVICES.find("services:").unwrap()]
}

/// The services of a configuration `text` (checked as `check` would).
pub(super) fn compiled(text: &str) -> Arc<Services> {
    compiled_after(text, None)
}

/// The services of a configuration `text` as a reload after `previous` compiles them (ids
/// kept).
pub(super) fn compiled_after(text: &str, previous: Option<&Services>) -> Arc<Services> {
    let c = Config::parse(text, "t.yaml").unwrap();
    c.validate("t.yaml").unwrap();
    Arc::new(Services::compile(&c, SECRET, previous))
}

fn services(delivery: &str) -> Arc<Services> {
    compiled(&SERVICES.replace("DELIVERY", delivery))
}

pub(super) fn appliances(n: u8, delivery: &str) -> Vec<Pipeline> {
    let members: Vec<Member> = (1..=n).map(|i| Member::new(i, 100).unwrap()).collect();
    let mut nodes = cluster(&members);
    let s = services(delivery);
    for p in nodes.iter_mut() {
        p.id.node_ip = Some(Ipv4Addr::new(198, 18, 0, 10 + p.id.node.get()));
        p.set_services(Arc::clone(&s));
    }
    nodes
}

/// A TCP segment from `src:sport` to the cluster address's `port`.
pub(super) fn segment(src: [u8; 4], sport: u16, port: u16, flags: u8) -> Vec<u8> {
    let mut t = build::tcp(sport, 1, 1, flags, b"");
    t[2..4].copy_from_slice(&port.to_be_bytes());
    build::ipv4([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, Some(16))
}

/// What node `p` does with `frame`: the action and the frame after it.
pub(super) fn run(p: &mut Pipeline, frame: &[u8], now: u64) -> (Action, Vec<u8>) {
    let mut buf = in_mbuf(frame);
    let action = p.from_wire(&mut FrameBuf::new(&mut buf, HEADROOM), frame.len(), now);
    (action, carry_out(p, action, &buf, frame.len()))
}

/// What node `p` does with the held later fragment `frame` once its first is decided
/// ([`Pipeline::released_fragment`]): the action and the frame after it.
fn released(p: &mut Pipeline, frame: &[u8], now: u64) -> (Action, Vec<u8>) {
    let mut buf = in_mbuf(frame);
    let action = p.released_fragment(&mut FrameBuf::new(&mut buf, HEADROOM), frame.len(), now);
    (action, carry_out(p, action, &buf, frame.len()))
}

/// `frame` in a buffer as a packet core's mbuf holds it: after [`HEADROOM`] bytes, with room
/// after it.
pub(super) fn in_mbuf(frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; HEADROOM + 2048];
    buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    buf
}

/// `action` without an encapsulated frame's length: the same for every frame of a flow.
pub(super) fn way(action: Action) -> Action {
    match action {
        Action::Encapsulated { push, .. } => Action::Encapsulated { push, len: 0 },
        other => other,
    }
}

/// What node `p` does with a burst of `frames`, as a packet core decides it: prepared
/// together, the frames `prepare_burst` marks as another node's dropped untouched, the others
/// decided one by one.
fn run_burst(p: &mut Pipeline, frames: &[Vec<u8>], now: u64) -> Vec<Action> {
    let views: Vec<Option<&[u8]>> = frames.iter().map(|f| Some(&f[..])).collect();
    let mut prepared = vec![Prepared::default(); frames.len()];
    let others = p.prepare_burst(&views, &mut prepared);
    frames
        .iter()
        .zip(&prepared)
        .enumerate()
        .map(|(i, (frame, prep))| {
            if i < 64 && others >> i & 1 == 1 {
                return Action::Drop(DropReason::NotOwned);
            }
            let mut buf = in_mbuf(frame);
            p.decide(
                &mut FrameBuf::new(&mut buf, HEADROOM),
                frame.len(),
                prep,
                now,
            )
        })
        .collect()
}

/// `n` appliances (as [`appliances`]) with the services of `text`: [`SERVICES`] as a test
/// changed it.
fn appliances_with(n: u8, text: &str) -> Vec<Pipeline> {
    let s = compiled(text);
    let mut nodes = appliances(n, "dsr");
    for p in nodes.iter_mut() {
        p.set_services(Arc::clone(&s));
    }
    nodes
}

/// The frame of `len` bytes after [`HEADROOM`] in `buf` (as [`in_mbuf`]) after `action`:
/// encapsulated, the answer, or as it was left.
fn carry_out(p: &mut Pipeline, action: Action, buf: &[u8], len: usize) -> Vec<u8> {
    let frame = &buf[HEADROOM..];
    match action {
        Action::Encapsulated { push, len } => {
            buf[HEADROOM - usize::from(push)..][..usize::from(len)].to_vec()
        }
        Action::Reply { len } => frame[..len as usize].to_vec(),
        Action::ToBackendInPieces { pieces } => {
            // Every piece, encapsulated, one after the other.
            let cut = p.take_pieces().unwrap();
            assert_eq!(cut.count(), usize::from(pieces));
            let mut sent = Vec::new();
            for k in 0..cut.count() {
                let mut out = vec![0u8; 2048];
                let n = cut.write(&frame[..len], k, &mut out).unwrap();
                sent.extend_from_slice(&out[..n]);
            }
            sent
        }
        _ => frame[..len].to_vec(),
    }
}

pub(super) fn client(i: u32) -> ([u8; 4], u16) {
    (
        [198, 18, 2 + (i / 200) as u8, (i % 200) as u8 + 1],
        30000 + (i % 1000) as u16,
    )
}

#[test]
fn one_owner_forwards_each_flow_to_a_backend_by_dsr() {
    let mut nodes = appliances(2, "dsr");
    let mut per_backend = [0u32; 4];
    for i in 0..600 {
        let (src, sport) = client(i);
        let syn = segment(src, sport, 80, 0x02);
        let mut forwarded = 0;
        for p in nodes.iter_mut() {
            let node_mac = p.id.node_mac;
            match run(p, &syn, 1) {
                (Action::ToBackend, out) => {
                    forwarded += 1;
                    assert_eq!(out[..6][..5], [2, 0xbb, 0, 0, 0], "to a backend MAC");
                    assert_eq!(&out[6..12], &node_mac.0, "from the node MAC");
                    assert_eq!(out[12..], syn[12..], "unchanged above layer 2");
                    per_backend[usize::from(out[5])] += 1;
                }
                (Action::Drop(DropReason::NotOwned), _) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(forwarded, 1, "exactly one node forwards");
    }
    assert!(per_backend[1..].iter().all(|&n| n > 120), "{per_backend:?}");
    assert_eq!(frames_sent(&nodes), 600);
}

#[test]
fn a_new_owner_sends_a_flow_to_the_same_backend() {
    // Node 1 alone serves the flows; node 2 alone (its successor after node 1 died) picks
    // their next segments up mid-stream.
    let mut first = appliances(1, "dsr").remove(0);
    let mut next = appliances(1, "dsr").remove(0);
    next.id.node = NodeId::new(2).unwrap();
    let table = OwnershipTable::build(2, &[Member::new(2, 100).unwrap()]).unwrap();
    next.set_snapshot(Arc::new(stable_snapshot(&table)));
    for i in 0..200 {
        let (src, sport) = client(i);
        let (_, a) = run(&mut first, &segment(src, sport, 80, 0x02), 1);
        let (action, b) = run(&mut next, &segment(src, sport, 80, 0x10), 2);
        assert_eq!(action, Action::ToBackend);
        assert_eq!(a[..6], b[..6], "flow {i}: the same backend");
    }
}

#[test]
fn a_change_of_the_pool_moves_no_existing_flow() {
    let mut p = appliances(1, "dsr").remove(0);
    let mut before = Vec::new();
    for i in 0..300 {
        let (src, sport) = client(i);
        before.push(run(&mut p, &segment(src, sport, 80, 0x02), 1).1[5]);
    }
    // Backend 1 drained, backend 2 failed: no new flows to either, existing ones stay.
    let s = p
        .services()
        .with_backend(SECRET, 1, |b| b.state = BackendState::Drained);
    let s = s.with_backend(SECRET, 2, |b| b.state = BackendState::Down);
    p.set_services(Arc::new(s));
    for (i, backend) in before.iter().enumerate() {
        let (src, sport) = client(i as u32);
        let (_, out) = run(&mut p, &segment(src, sport, 80, 0x10), 2);
        assert_eq!(out[5], *backend, "flow {i} stays on its backend");
    }
    for i in 1000..1100 {
        let (src, sport) = client(i);
        let (_, out) = run(&mut p, &segment(src, sport, 80, 0x02), 3);
        assert_eq!(out[5], 3, "new flows only to the backend that is up");
    }
}

/// A client port whose last connection went to a backend that has since failed or been
/// drained or weighted 0 (refused: no TIME_WAIT, so the port comes back at once): the new
/// connection's SYN goes to a backend that is up, and the flow stays there; segments of the old
/// connection still go to the old backend until then.
#[test]
fn a_new_connection_on_a_reused_port_avoids_a_backend_that_is_down_or_drained() {
    reused_ports_avoid(|b| b.state = BackendState::Drained);
    reused_ports_avoid(|b| b.weight = 0);
}

/// [`a_new_connection_on_a_reused_port_avoids_a_backend_that_is_down_or_drained`] with
/// backend 1 down and backend 2 as `stop` leaves it.
fn reused_ports_avoid(stop: fn(&mut crate::appliance::Backend)) {
    let mut p = appliances(1, "dsr").remove(0);
    let mut on = Vec::new();
    for i in 0..300 {
        let (src, sport) = client(i);
        on.push(run(&mut p, &segment(src, sport, 80, 0x02), 1).1[5]);
    }
    let s = p
        .services()
        .with_backend(SECRET, 1, |b| b.state = BackendState::Down);
    let s = s.with_backend(SECRET, 2, stop);
    p.set_services(Arc::new(s));
    let mut moved = 0;
    for (i, &was) in on.iter().enumerate() {
        let (src, sport) = client(i as u32);
        let (_, ack) = run(&mut p, &segment(src, sport, 80, 0x10), 2);
        assert_eq!(
            ack[5], was,
            "flow {i}: a segment of the old connection stays"
        );
        let (_, syn) = run(&mut p, &segment(src, sport, 80, 0x02), 3);
        assert_eq!(
            syn[5], 3,
            "flow {i}: a new connection only to the backend that is up"
        );
        let (_, next) = run(&mut p, &segment(src, sport, 80, 0x10), 4);
        assert_eq!(next[5], 3, "flow {i}: and it stays there");
        moved += usize::from(was != 3);
    }
    assert!(moved > 100, "{moved}");
}

#[test]
fn rules_drop_what_they_do_not_serve() {
    let mut p = appliances(1, "dsr").remove(0);
    let (src, sport) = client(1);
    let ssh = segment(src, sport, 22, 0x02);
    assert_eq!(
        run(&mut p, &ssh, 1).0,
        Action::Drop(DropReason::RuleDisabled)
    );
    let other = segment(src, sport, 8080, 0x02);
    assert_eq!(run(&mut p, &other, 1).0, Action::Drop(DropReason::NoRule));
    // ARP for a service address is answered like the cluster address's.
    let arp = build::arp_request([2, 0, 0, 0, 0, 0x64], [198, 18, 0, 50]);
    assert!(matches!(run(&mut p, &arp, 1).0, Action::Reply { .. }));
    // A backend without a MAC yet: nothing is sent.
    let s = p.services().with_backend(SECRET, 1, |b| b.mac = None);
    let s = s.with_backend(SECRET, 2, |b| b.mac = None);
    let s = s.with_backend(SECRET, 3, |b| b.mac = None);
    p.set_services(Arc::new(s));
    let web = segment(src, sport, 80, 0x02);
    assert_eq!(run(&mut p, &web, 1).0, Action::Drop(DropReason::NoBackend));
}

/// Under `unmatched: drop`, a packet of another protocol than the rules' (GRE, a timestamp
/// request) to a service address is no rule's: dropped and counted, not delivered to the
/// owner's kernel. The cluster address's own traffic (its owner's kernel answers pings) is
/// untouched.
#[test]
fn unmatched_drop_takes_every_protocol_to_a_service_address() {
    let text = SERVICES.replace("DELIVERY", "dsr").replace(
        "    addresses: [198.18.0.1]\n    ports: [80]",
        "    addresses: [198.18.0.1, 198.18.0.50]\n    ports: [80]",
    );
    let to = |dst: [u8; 4], mut frame: Vec<u8>| {
        frame[30..34].copy_from_slice(&dst);
        frame[24..26].fill(0);
        let c = build::checksum(&[&frame[14..34]]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        frame
    };
    let (src, _) = client(3);
    let gre = || build::ipv4([2, 0, 0, 0, 0, 0x64], src, 47, &mut [0u8; 8], None);
    for unmatched in ["drop", "local"] {
        let text = format!("{text}unmatched: {unmatched}\n");
        let mut p = appliances_with(1, &text).remove(0);
        let want = if unmatched == "drop" {
            Action::Drop(DropReason::NoRule)
        } else {
            Action::Deliver
        };
        assert_eq!(
            run(&mut p, &to([198, 18, 0, 50], gre()), 1).0,
            want,
            "{unmatched}"
        );
        assert_eq!(
            run(&mut p, &gre(), 1).0,
            Action::Deliver,
            "to the cluster address"
        );
    }
}

#[test]
fn gue_and_ipip_carry_the_client_packet_from_the_node_address() {
    for (delivery, push, proto) in [("gue", 32, 17u8), ("ipip", 20, 4)] {
        let mut p = appliances(1, delivery).remove(0);
        let (src, sport) = client(7);
        let syn = segment(src, sport, 80, 0x02);
        // Padded to Ethernet's 60 bytes, as it comes off the wire: the padding is not sent.
        let mut padded = syn.clone();
        padded.resize(60, 0);
        let (action, out) = run(&mut p, &padded, 1);
        let len = u16::try_from(usize::from(push) + syn.len()).unwrap();
        assert_eq!(action, Action::Encapsulated { push, len }, "{delivery}");
        assert_eq!(out.len(), usize::from(len));
        let outer = parse_l2_l4(&out).unwrap();
        assert_eq!(outer.src_ip, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)));
        assert_eq!(u8::from(outer.protocol), proto);
        assert_eq!(
            &out[out.len() - (syn.len() - 14)..],
            &syn[14..],
            "{delivery}"
        );
    }
}

/// A frame with no room before it for the outer headers (never in the data plane, whose
/// buffers have [`HEADROOM`]) is dropped, not sent half-built, and not counted as sent: a new
/// flow's first frame and its next.
#[test]
fn an_encapsulation_without_headroom_is_dropped() {
    let mut p = appliances(1, "gue").remove(0);
    let (src, sport) = client(7);
    for (flags, now) in [(0x02, 1), (0x10, 2)] {
        let mut buf = segment(src, sport, 80, flags);
        let len = buf.len();
        buf.resize(2048, 0);
        let action = p.from_wire(&mut FrameBuf::at_start(&mut buf), len, now);
        assert_eq!(action, Action::Drop(DropReason::NoBackend));
    }
    assert_eq!(frames_sent(&[p]), 0);
}

#[test]
fn a_datagram_too_big_for_the_tunnel_gets_fragmentation_needed() {
    let mut p = appliances(1, "gue").remove(0);
    let (src, sport) = client(9);
    let mut t = build::tcp(sport, 1, 1, 0x10, &[0u8; 1460]);
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    let big = build::ipv4([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, Some(16));
    let (action, out) = run(&mut p, &big, 1);
    assert!(matches!(action, Action::Reply { .. }), "{action:?}");
    let icmp = parse_l2_l4(&out).unwrap();
    assert_eq!(icmp.dst_ip, IpAddr::V4(Ipv4Addr::from(src)));
    assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1500 - 32);
    assert_eq!(p.appliance_counts().too_big, 1);
}

/// A datagram without DF too big for the tunnel is cut into IPv4 fragments that fit it, each
/// encapsulated to the flow's backend (the one its other frames go to), which join into the
/// datagram again; counted as cut, not as too big.
#[test]
fn a_datagram_without_df_too_big_for_the_tunnel_goes_in_pieces_to_its_backend() {
    for (delivery, overhead) in [("gue", 32), ("ipip", 20)] {
        let mut p = appliances(1, delivery).remove(0);
        let (src, sport) = client(9);
        let (_, out) = run(&mut p, &segment(src, sport, 80, 0x02), 1);
        let backend = parse_l2_l4(&out).unwrap().dst_ip;
        let data: Vec<u8> = (0..1900u32).map(|i| (i * 7) as u8).collect();
        let mut t = build::tcp(sport, 1, 1, 0x10, &data);
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        let mut big = build::ipv4([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, Some(16));
        big[20] = 0; // no DF
        big[24..26].fill(0);
        let c = build::checksum(&[&big[14..34]]);
        big[24..26].copy_from_slice(&c.to_be_bytes());
        let mut buf = in_mbuf(&big);
        let action = p.from_wire(&mut FrameBuf::new(&mut buf, HEADROOM), big.len(), 2);
        assert_eq!(
            action,
            Action::ToBackendInPieces { pieces: 2 },
            "{delivery}"
        );
        assert_eq!(
            &buf[HEADROOM..HEADROOM + big.len()],
            &big[..],
            "the frame itself is left as it was"
        );
        let pieces = p.take_pieces().unwrap();
        assert!(p.take_pieces().is_none(), "taken once");
        let mut joined = vec![0u8; big.len() - 34];
        for k in 0..pieces.count() {
            let mut out = vec![0u8; 2048];
            let n = pieces.write(&buf[HEADROOM..], k, &mut out).unwrap();
            assert!(n <= 14 + 1500, "{delivery} piece {k}: {n} bytes");
            let outer = parse_l2_l4(&out[..n]).unwrap();
            assert_eq!(outer.dst_ip, backend, "{delivery} piece {k}");
            let inner = &out[14 + overhead..n];
            assert_eq!(build::checksum(&[&inner[..20]]), 0, "inner header checksum");
            assert_eq!(&inner[4..6], &big[18..20], "the datagram's identification");
            let word = u16::from_be_bytes([inner[6], inner[7]]);
            assert_eq!(word & 0x2000 != 0, k == 0, "more fragments but the last");
            let at = usize::from(word & 0x1fff) * 8;
            joined[at..at + inner.len() - 20].copy_from_slice(&inner[20..]);
        }
        assert_eq!(joined, &big[34..], "{delivery}: the pieces join again");
        let counts = p.appliance_counts();
        assert_eq!((counts.fragmented, counts.too_big), (1, 0), "{delivery}");
        assert_eq!(counts.frames.iter().sum::<u64>(), 1 + 2, "{delivery}");
    }
}

/// A client's datagram in fragments whose first, 1500 bytes, is too big for the GUE tunnel:
/// the first is cut (its pieces continue the datagram's offsets) and the later fragment still
/// follows it to its backend, whichever comes first; the inner fragments join into the
/// client's segment.
#[test]
fn a_first_fragment_cut_for_its_tunnel_takes_the_later_ones_along() {
    let (src, sport) = client(11);
    let data: Vec<u8> = (0..2900u32).map(|i| (i * 3) as u8).collect();
    let mut seg = build::tcp(sport, 1, 1, 0x18, &data);
    seg[2..4].copy_from_slice(&80u16.to_be_bytes());
    let first = fragment4(src, 0x5151, 0, true, &seg[..1480]);
    let later = fragment4(src, 0x5151, 1480, false, &seg[1480..]);
    // The inner IPv4 packets of what node `p` sent for `action` on `frame`.
    let inner = |action: Action, sent: Vec<u8>| -> Vec<Vec<u8>> {
        match action {
            // The pieces one after the other (`carry_out`).
            Action::ToBackendInPieces { .. } => {
                let mut pieces = Vec::new();
                let mut rest = &sent[..];
                while !rest.is_empty() {
                    let n = 14 + usize::from(u16::from_be_bytes([rest[16], rest[17]]));
                    assert!(n <= 14 + 1500, "piece: {n} bytes");
                    pieces.push(rest[14 + 32..n].to_vec());
                    rest = &rest[n..];
                }
                pieces
            }
            Action::Encapsulated { .. } => vec![sent[14 + 32..].to_vec()],
            other => panic!("not sent to a backend: {other:?}"),
        }
    };
    for later_first in [false, true] {
        let mut p = appliances(1, "gue").remove(0);
        let mut sent = Vec::new();
        if later_first {
            let (held, _) = run(&mut p, &later, 1);
            assert!(matches!(held, Action::Hold), "{held:?}");
        }
        let (action, out) = run(&mut p, &first, 2);
        assert_eq!(action, Action::ToBackendInPieces { pieces: 2 });
        sent.extend(inner(action, out));
        if later_first {
            let released_to = p.take_released().expect("the held fragment is released");
            assert_eq!(released_to.to, ReleaseTo::Backend);
            let (action, out) = released(&mut p, &later, 3);
            sent.extend(inner(action, out));
        } else {
            let (action, out) = run(&mut p, &later, 3);
            sent.extend(inner(action, out));
        }
        // Three inner fragments of the datagram, by offset: the whole segment, the last alone
        // saying no more follow.
        assert_eq!(sent.len(), 3, "later first: {later_first}");
        sent.sort_by_key(|f| u16::from_be_bytes([f[6], f[7]]) & 0x1fff);
        let mut joined = Vec::new();
        for (k, f) in sent.iter().enumerate() {
            assert_eq!(&f[4..6], &[0x51, 0x51], "the datagram's identification");
            let word = u16::from_be_bytes([f[6], f[7]]);
            assert_eq!(
                usize::from(word & 0x1fff) * 8,
                joined.len(),
                "no gap, no overlap"
            );
            assert_eq!(word & 0x2000 != 0, k < 2, "more fragments but the last");
            joined.extend_from_slice(&f[20..]);
        }
        assert_eq!(joined, seg, "later first: {later_first}");
        assert_eq!(p.appliance_counts().fragmented, 1);
    }
}

/// "Too big" answers are rationed (a burst, then so many a second: a flood of oversized
/// packets does not make the node answer each), and never go to a group source MAC or
/// address (a forged source would make every host on the segment receive them).
#[test]
fn too_big_answers_are_rationed_and_only_for_one_host() {
    use crate::pipeline::appliance::ErrorBudget;
    let mut p = appliances(1, "gue").remove(0);
    let big = |src: [u8; 4], mac: [u8; 6]| {
        let mut t = build::tcp(40000, 1, 1, 0x10, &[0u8; 1460]);
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        build::ipv4(mac, src, 6, &mut t, Some(16))
    };
    let client = [2, 0, 0, 0, 0, 0x64];
    let answered = |p: &mut Pipeline, n: usize, now: u64| {
        (0..n)
            .filter(|&i| {
                let src = [198, 18, 3, (i % 250) as u8 + 1];
                let (action, _) = run(p, &big(src, client), now);
                assert!(matches!(
                    action,
                    Action::Reply { .. } | Action::Drop(DropReason::TooBig)
                ));
                matches!(action, Action::Reply { .. })
            })
            .count() as u64
    };
    let start = 5_000_000_000;
    assert_eq!(answered(&mut p, 1000, start), ErrorBudget::BURST);
    // 40 ms later: 40 ms' worth.
    assert_eq!(
        answered(&mut p, 1000, start + 40_000_000),
        ErrorBudget::PER_SECOND * 40 / 1000
    );
    assert_eq!(p.appliance_counts().too_big, 2000, "every one counted");
    let later = start + 10_000_000_000;
    for (src, mac) in [
        ([198, 18, 3, 1], [1, 0, 0x5e, 0, 0, 1]),
        ([255, 255, 255, 255], client),
        ([224, 0, 0, 1], client),
        ([0, 0, 0, 0], client),
    ] {
        let (action, _) = run(&mut p, &big(src, mac), later);
        assert_eq!(action, Action::Drop(DropReason::TooBig), "{src:?} {mac:?}");
    }
    assert!(matches!(
        run(&mut p, &big([198, 18, 3, 1], client), later).0,
        Action::Reply { .. }
    ));
}

/// `n` nodes whose services are [`SERVICES`] on the cluster's IPv6 address (2001:2::1) with
/// IPv6 backends 2001:2::21..23, each node with an IPv6 address to encapsulate from.
fn appliances6(n: u8, delivery: &str) -> Vec<Pipeline> {
    let text = SERVICES
        .replace("DELIVERY", delivery)
        .replace(
            "  ip: 198.18.0.11\n",
            "  ip: 198.18.0.11\n  ip6: \"2001:2::11\"\n",
        )
        .replace(
            "    addresses: [198.18.0.1]\n    ports: [80]",
            "    addresses: [\"2001:2::1\"]\n    ports: [80]",
        )
        .replace("ip: 198.18.0.21,", "ip: \"2001:2::21\",")
        .replace("ip: 198.18.0.22,", "ip: \"2001:2::22\",")
        .replace("ip: 198.18.0.23,", "ip: \"2001:2::23\",");
    let s = compiled(&text);
    let members: Vec<Member> = (1..=n).map(|i| Member::new(i, 100).unwrap()).collect();
    let mut nodes = cluster(&members);
    for p in nodes.iter_mut() {
        p.id.node_ip6 = Some(format!("2001:2::1{}", p.id.node.get()).parse().unwrap());
        p.set_services(Arc::clone(&s));
    }
    nodes
}

/// An IPv6 service: GUE over IPv6 from the node's IPv6 address, and "packet too big".
#[test]
fn ipv6_services_encapsulate_in_ipv6_and_answer_packet_too_big() {
    let mut p = appliances6(1, "gue").remove(0);
    let src = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50];
    let mut t = build::tcp(40000, 1, 0, 0x02, b"");
    let syn = build::ipv6([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, 16);
    let (action, out) = run(&mut p, &syn, 1);
    assert!(
        matches!(action, Action::Encapsulated { push: 52, .. }),
        "{action:?}"
    );
    let outer = parse_l2_l4(&out).unwrap();
    let node: IpAddr = "2001:2::11".parse().unwrap();
    assert_eq!(outer.src_ip, node);
    assert!(crate::wire::checksum::verify_with_pseudo_header(
        &outer.src_ip,
        &outer.dst_ip,
        crate::wire::IpProtocol::Udp,
        &out[54..]
    ));
    assert_eq!(
        &out[14 + 40 + 8..14 + 40 + 12],
        &[0, 41, 0, 0],
        "GUE, inner IPv6"
    );
    // A segment too big for the tunnel: ICMPv6 "packet too big" to the client, valid.
    let mut t = build::tcp(40000, 1, 1, 0x10, &[0u8; 1400]);
    let big = build::ipv6([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, 16);
    let (action, out) = run(&mut p, &big, 2);
    assert!(matches!(action, Action::Reply { .. }), "{action:?}");
    let icmp = parse_l2_l4(&out).unwrap();
    assert_eq!(icmp.dst_ip, IpAddr::V6(src.into()));
    assert_eq!(out[54], 2, "packet too big");
    assert_eq!(
        u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
        1500 - 52
    );
    assert!(crate::wire::checksum::verify_with_pseudo_header(
        &icmp.src_ip,
        &icmp.dst_ip,
        crate::wire::IpProtocol::Icmpv6,
        &out[54..]
    ));
}

#[test]
fn owner_of_names_the_backend_the_pipeline_picks() {
    use crate::cluster::BucketHasher;
    use crate::control::operator::{Proto, Reply, Request};
    use crate::control::{Membership, Node, Settings, Timeline};
    // The cluster's affinity makes the flow's fingerprint (the backend hash of a rule without
    // affinity); a rule's own affinity makes a keyed hash of the client instead.
    let cases = [
        (Affinity::None, "none"),
        (Affinity::Single, "none"),
        (Affinity::None, "network"),
        (Affinity::Network, "single"),
    ];
    for (cluster_affinity, rule_affinity) in cases {
        let delivery = format!("dsr\n    affinity: {rule_affinity}");
        let mut p = appliances(1, &delivery).remove(0);
        p.id.affinity = cluster_affinity;
        let me = NodeId::new(1).unwrap();
        let membership = crate::control::Config::new(me, 1, NODE_MAC.0, SECRET, 7);
        let mut node = Node::new(
            Membership::new(membership),
            Settings {
                drain_deadline: Some(1_000_000_000),
                health_port: None,
                hasher: BucketHasher::new(SECRET),
                affinity: cluster_affinity,
            },
        );
        let services = Arc::clone(p.services());
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let (src, sport) = client(i);
            let (action, out) = run(&mut p, &segment(src, sport, 80, 0x02), 1);
            assert_eq!(action, Action::ToBackend);
            let request = Request::OwnerOf {
                src: (Ipv4Addr::from(src), sport).into(),
                dst: (Ipv4Addr::new(198, 18, 0, 1), 80).into(),
                proto: Proto::Tcp,
            };
            let mut reply = node.request(&request, &Timeline::default(), 0, &mut Vec::new());
            node.describe_services(&request, &mut reply, &services);
            let Reply::OwnerOf(o) = reply else {
                panic!("no owner-of reply");
            };
            let service = o.service.expect("a flow to a service");
            assert_eq!(service.rule.as_deref(), Some("web"));
            let named = service.backend.expect("a backend");
            let (_, b) = services.backends().find(|(_, b)| b.id == named.id).unwrap();
            assert_eq!(
                b.mac.unwrap().0[..],
                out[..6],
                "flow {i} ({cluster_affinity:?}, rule affinity {rule_affinity}): owner-of names \
                 {}, the pipeline sent it elsewhere",
                named.name
            );
            seen.insert(named.id);
        }
        assert!(
            seen.len() >= 2,
            "{rule_affinity}: one backend only: {seen:?}"
        );
    }
}

/// The two fragments of a TCP segment (20-byte header and 36 bytes of data) from `src:sport`
/// to the service address's `port`: the first with the TCP header and 12 bytes of data, the
/// second with 24 bytes at offset 32. IPv4 with identification `ident`.
fn fragments4(src: [u8; 4], sport: u16, port: u16, ident: u16) -> [Vec<u8>; 2] {
    let mut seg = build::tcp(sport, 1, 1, 0x18, b"abcdefghijklmnopqrstuvwxyz0123456789");
    seg[2..4].copy_from_slice(&port.to_be_bytes());
    [
        fragment4(src, ident, 0, true, &seg[..32]),
        fragment4(src, ident, 32, false, &seg[32..]),
    ]
}

/// An IPv4 fragment of a TCP segment from `src` to the cluster address: `data` at byte
/// `offset` of the datagram of identification `ident`, `more` following.
fn fragment4(src: [u8; 4], ident: u16, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    let mut f = build::ethernet([2, 0, 0, 0, 0, 0x64], build::CLUSTER_MAC, 0x0800);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ident.to_be_bytes());
    ip[6..8].copy_from_slice(&((u16::from(more) << 13) | (offset / 8) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&build::CLUSTER_IP);
    let c = build::checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(data);
    f
}

/// [`fragments4`] over IPv6 (a fragment header with identification `ident`).
fn fragments6(src: [u8; 16], sport: u16, port: u16, ident: u32) -> [Vec<u8>; 2] {
    let mut seg = build::tcp(sport, 1, 1, 0x18, b"abcdefghijklmnopqrstuvwxyz0123456789");
    seg[2..4].copy_from_slice(&port.to_be_bytes());
    let fragment = |offset: u16, more: bool, data: &[u8]| {
        let mut f = build::ethernet([2, 0, 0, 0, 0, 0x64], build::CLUSTER_MAC, 0x86dd);
        let mut ip = [0u8; 48];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        ip[6] = 44;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&build::CLUSTER_IP6);
        ip[40] = 6;
        ip[42..44].copy_from_slice(&(offset | u16::from(more)).to_be_bytes());
        ip[44..48].copy_from_slice(&ident.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(data);
        f
    };
    [
        fragment(0, true, &seg[..32]),
        fragment(32, false, &seg[32..]),
    ]
}

/// The fragments of flow `i` to `port`, over IPv4 or IPv6.
fn fragments(v6: bool, i: u32, port: u16) -> [Vec<u8>; 2] {
    let (src, sport) = client(i);
    if v6 {
        let mut a = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[12..].copy_from_slice(&src);
        fragments6(a, sport, port, 0x1000 + i)
    } else {
        fragments4(src, sport, port, 0x1000 + i as u16)
    }
}

/// `n` appliance nodes with services on the IPv4 or the IPv6 cluster address.
fn nodes(v6: bool, n: u8, delivery: &str) -> Vec<Pipeline> {
    if v6 {
        appliances6(n, delivery)
    } else {
        appliances(n, delivery)
    }
}

/// Where a frame the pipeline sent to a backend goes, and how: the backend MAC for DSR, the
/// outer destination address and source port (the flow's entropy) for GUE.
fn sent_to(out: &[u8]) -> (Vec<u8>, Option<IpAddr>, Option<u16>) {
    let outer = parse_l2_l4(out).unwrap();
    if outer.protocol == crate::wire::IpProtocol::Udp {
        (out[..6].to_vec(), Some(outer.dst_ip), outer.src_port)
    } else {
        (out[..6].to_vec(), None, None)
    }
}

/// The inner packet a frame to a backend carries (`out`), and the original frame's IP packet
/// (`frame`), which it must be unchanged.
fn assert_carries(out: &[u8], frame: &[u8], what: &str) {
    assert_eq!(
        &out[out.len() - (frame.len() - 14)..],
        &frame[14..],
        "{what}"
    );
}

/// Frames the pipelines of `cluster` sent to backends, all backends together.
fn frames_sent(cluster: &[Pipeline]) -> u64 {
    cluster
        .iter()
        .map(|p| p.appliance_counts().frames.iter().sum::<u64>())
        .sum()
}

/// IPv4 and IPv6 × DSR and GUE, each with its label for assertion messages.
fn versions_and_deliveries() -> impl Iterator<Item = (bool, &'static str, String)> {
    [false, true].into_iter().flat_map(|v6| {
        ["dsr", "gue"].into_iter().map(move |delivery| {
            let what = format!("{} {delivery}", if v6 { "IPv6" } else { "IPv4" });
            (v6, delivery, what)
        })
    })
}

/// Appliance mode, issue 19: the later fragments of a service's flow (no ports) go where the
/// first went — the same backend, the same delivery — from the node that owned the first,
/// counted per backend; the other node drops them.
#[test]
fn later_fragments_follow_their_first_to_its_backend() {
    for (v6, delivery, what) in versions_and_deliveries() {
        let mut cluster = nodes(v6, 2, delivery);
        let mut backends = std::collections::BTreeSet::new();
        for i in 0..100 {
            let [first, later] = fragments(v6, i, 80);
            let mut forwarded = 0;
            for p in cluster.iter_mut() {
                let (a, first_out) = run(p, &first, 1);
                let (b, later_out) = run(p, &later, 2);
                match (a, b) {
                    (
                        Action::ToBackend | Action::Encapsulated { .. },
                        Action::ToBackend | Action::Encapsulated { .. },
                    ) => {
                        forwarded += 1;
                        assert_eq!(way(a), way(b), "{what} flow {i}: the same delivery");
                        let to = sent_to(&first_out);
                        assert_eq!(sent_to(&later_out), to, "{what} flow {i}: same backend");
                        assert_eq!(&later_out[6..12], &p.id.node_mac.0, "{what}");
                        assert_carries(&first_out, &first, &what);
                        assert_carries(&later_out, &later, &what);
                        backends.insert(to.0);
                    }
                    (Action::Drop(DropReason::NotOwned), Action::Drop(DropReason::NotOwned)) => {}
                    other => panic!("{what} flow {i}: {other:?}"),
                }
            }
            assert_eq!(forwarded, 1, "{what} flow {i}: one node forwards");
        }
        assert!(backends.len() >= 2, "{what}: {backends:?}");
        let counts: Vec<u64> = cluster
            .iter()
            .map(|p| p.appliance_counts().frames.iter().sum())
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 200, "{what}: {counts:?}");
        let new_flows: u64 = cluster
            .iter()
            .map(|p| p.appliance_counts().new_flows.iter().sum::<u64>())
            .sum();
        assert_eq!(new_flows, 100, "{what}: one new flow per datagram");
    }
}

/// A reload that removes a backend and gives its freed id to another service's new server:
/// the later fragments of datagrams whose first went to the removed one are refused, never
/// sent to the new server; those of backends that stay go on where their first went.
#[test]
fn later_fragments_never_follow_a_reused_backend_id() {
    let text = SERVICES.replace("DELIVERY", "dsr");
    let mut p = appliances_with(1, &text).remove(0);
    let old = Arc::clone(p.services());
    let removed = EthernetAddress([2, 0xbb, 0, 0, 0, 1]);
    let mut firsts = Vec::new();
    for i in 0..40 {
        let [first, later] = fragments(false, i, 80);
        let (a, out) = run(&mut p, &first, 1);
        assert_eq!(a, Action::ToBackend, "flow {i}");
        firsts.push((out[..6] == removed.0, later));
    }
    assert!(firsts.iter().any(|(to_removed, _)| *to_removed));
    assert!(firsts.iter().any(|(to_removed, _)| !*to_removed));
    let reloaded = text.replace("      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }\n", "")
        + "  - name: api\n    addresses: [198.18.0.1]\n    ports: [81]\n    delivery: dsr\n    \
           backends:\n      - { ip: 198.18.0.31, mac: 02:bb:00:00:00:31 }\n";
    let c = Config::parse(&reloaded, "t.yaml").unwrap();
    c.validate("t.yaml").unwrap();
    let new = Arc::new(Services::compile(&c, SECRET, Some(&old)));
    assert_eq!(old.server(1), Some(("web", "198.18.0.21".parse().unwrap())));
    assert_eq!(
        new.server(1),
        Some(("api", "198.18.0.31".parse().unwrap())),
        "the freed id names the new server"
    );
    p.set_services(new);
    for (i, (to_removed, later)) in firsts.iter().enumerate() {
        let (action, out) = run(&mut p, later, 2);
        if *to_removed {
            assert_eq!(
                action,
                Action::Drop(DropReason::FragmentRefused),
                "flow {i}: its first went to the removed backend"
            );
        } else {
            assert_eq!(action, Action::ToBackend, "flow {i}");
            assert_ne!(&out[..6], &[2, 0xbb, 0, 0, 0, 0x31], "flow {i}");
        }
    }
}

/// A later fragment that arrives before its first is held; the first's decision releases it
/// to the same backend ([`Pipeline::released_fragment`]) on the node that forwarded the first,
/// and to nowhere on the other.
#[test]
fn a_later_fragment_before_its_first_is_held_then_sent_to_the_first_backend() {
    for (v6, delivery, what) in versions_and_deliveries() {
        let mut cluster = nodes(v6, 2, delivery);
        for i in 0..50 {
            let [first, later] = fragments(v6, i, 80);
            let mut forwarded = 0;
            for p in cluster.iter_mut() {
                let mut hold: FragmentHold<Vec<u8>> = FragmentHold::new(8, Duration::from_secs(2));
                let (held, _) = run(p, &later, 1);
                assert_eq!(held, Action::Hold, "{what} flow {i}");
                let key = p.take_held().unwrap();
                hold.put(key, 1, later.clone()).unwrap();
                let (a, first_out) = run(p, &first, 2);
                let released = p.take_released().expect("the first releases its fragment");
                assert_eq!(released.key, key);
                let mut outs = Vec::new();
                hold.release(&released.key, |frame| {
                    outs.push(self::released(p, &frame, 3))
                });
                assert!(hold.is_empty());
                let [(b, later_out)] = <[_; 1]>::try_from(outs).unwrap();
                match a {
                    Action::ToBackend | Action::Encapsulated { .. } => {
                        forwarded += 1;
                        assert_eq!(released.to, ReleaseTo::Backend, "{what}");
                        assert_eq!(way(b), way(a), "{what} flow {i}: the same delivery");
                        assert_eq!(sent_to(&later_out), sent_to(&first_out), "{what}");
                        assert_carries(&later_out, &later, &what);
                    }
                    Action::Drop(DropReason::NotOwned) => {
                        assert_eq!(released.to, ReleaseTo::Nowhere, "{what}");
                        assert_eq!(b, Action::Drop(DropReason::NotOwned), "{what}");
                    }
                    other => panic!("{what} flow {i}: {other:?}"),
                }
            }
            assert_eq!(forwarded, 1, "{what} flow {i}: one node forwards");
        }
        assert_eq!(
            frames_sent(&cluster),
            100,
            "{what}: both fragments of each datagram counted"
        );
    }
}

/// The later fragments of a datagram whose first this node refused (a disabled rule, no
/// backend) are dropped and counted as such, whether they come after the first or were held.
#[test]
fn later_fragments_of_a_refused_first_are_dropped() {
    for v6 in [false, true] {
        let what = if v6 { "IPv6" } else { "IPv4" };
        let mut p = nodes(v6, 1, "gue").remove(0);
        // Port 22: the disabled rule's on IPv4; no rule's on IPv6 (`unmatched: drop`).
        let refused = if v6 {
            DropReason::NoRule
        } else {
            DropReason::RuleDisabled
        };
        let [first, later] = fragments(v6, 1, 22);
        assert_eq!(run(&mut p, &first, 1).0, Action::Drop(refused), "{what}");
        assert_eq!(
            run(&mut p, &later, 2).0,
            Action::Drop(DropReason::FragmentRefused),
            "{what}"
        );
        // Held first, then released to be dropped.
        let [first, later] = fragments(v6, 2, 22);
        assert!(matches!(run(&mut p, &later, 3).0, Action::Hold), "{what}");
        run(&mut p, &first, 4);
        let released = p.take_released().unwrap();
        assert_eq!(released.to, ReleaseTo::Nowhere, "{what}");
        assert_eq!(
            self::released(&mut p, &later, 5).0,
            Action::Drop(DropReason::FragmentRefused),
            "{what}"
        );
        // No backend with a MAC: the first is dropped, and so are the later ones.
        let s = p.services().with_backend(SECRET, 1, |b| b.mac = None);
        let s = s.with_backend(SECRET, 2, |b| b.mac = None);
        let s = s.with_backend(SECRET, 3, |b| b.mac = None);
        p.set_services(Arc::new(s));
        let [first, later] = fragments(v6, 3, 80);
        assert_eq!(
            run(&mut p, &first, 6).0,
            Action::Drop(DropReason::NoBackend),
            "{what}"
        );
        assert_eq!(
            run(&mut p, &later, 7).0,
            Action::Drop(DropReason::FragmentRefused),
            "{what}"
        );
        assert_eq!(p.appliance_counts().frames.iter().sum::<u64>(), 0, "{what}");
    }
}

/// Fragments to the cluster address on a port no rule has follow `unmatched`: with `local`
/// they take the cluster's path (the owner of the bucket delivers them to its host); with
/// `drop` (the default) the first is dropped as matching no rule and the later one with it.
#[test]
fn fragments_outside_the_rules_follow_unmatched() {
    for unmatched in ["drop", "local"] {
        let text = SERVICES.replace("DELIVERY", "dsr") + &format!("unmatched: {unmatched}\n");
        let mut p = appliances_with(1, &text).remove(0);
        let [first, later] = fragments(false, 1, 8080);
        let (a, _) = run(&mut p, &first, 1);
        let (b, _) = run(&mut p, &later, 2);
        if unmatched == "local" {
            assert_eq!((a, b), (Action::Deliver, Action::Deliver));
        } else {
            assert_eq!(a, Action::Drop(DropReason::NoRule));
            assert_eq!(b, Action::Drop(DropReason::FragmentRefused));
        }
    }
}

/// Each backend's current flows (the `service_backend_flows` gauge): counted from the flow
/// table at housekeeping, moved with a flow, gone with it.
#[test]
fn each_backends_current_flows_are_counted() {
    let mut p = appliances(1, "dsr").remove(0);
    for i in 0..300 {
        let (src, sport) = client(i);
        run(&mut p, &segment(src, sport, 80, 0x02), 1);
    }
    let sweep = p.flows().slot_count();
    p.maintain(1, sweep);
    let counts = p.appliance_counts().clone();
    assert_eq!(counts.flows[1..].iter().sum::<u64>(), 300);
    for id in 1..=3 {
        assert_eq!(counts.flows[id], counts.new_flows[id], "backend {id}");
        assert_eq!(
            u64::from(p.flows().count_for_backend(id as u16)),
            counts.flows[id]
        );
    }
    // Backend 1 drained: its flows stay, and stay counted.
    let s = p
        .services()
        .with_backend(SECRET, 1, |b| b.state = BackendState::Drained);
    p.set_services(Arc::new(s));
    for i in 0..300 {
        let (src, sport) = client(i);
        run(&mut p, &segment(src, sport, 80, 0x10), 2);
    }
    p.maintain(2, sweep);
    assert_eq!(p.appliance_counts().flows, counts.flows);
    // Idle past every timeout: swept out of the table and the counts.
    p.maintain(3_600_000_000_000, 2 * sweep);
    assert!(p.appliance_counts().flows.iter().all(|&n| n == 0));
}

/// The destination of a frame prepared as a flow, as the service path reads it (at fixed
/// offsets, unchecked, for the frame `prepare` calls plain) and as the parser says it is.
fn destination_agrees(p: &Pipeline, frame: &[u8]) -> Result<(), TestCaseError> {
    use super::super::appliance::Destination;
    let Prepared::Flow { plain, .. } = p.prepare(frame) else {
        return Ok(());
    };
    let parsed = parse_l2_l4(frame).unwrap();
    let want = Destination::at(
        frame,
        parsed.l3_offset,
        parsed.src_ip,
        parsed.dst_ip,
        parsed.src_port.unwrap(),
        parsed.dst_port.unwrap(),
    );
    prop_assert_eq!(Destination::of_prepared(frame, plain), want);
    Ok(())
}

#[test]
fn the_destination_read_at_fixed_offsets_is_the_parsers() {
    let p = appliances(1, "dsr").remove(0);
    let mut frames = capture();
    for i in 0..50 {
        let (src, sport) = client(i);
        frames.push(segment(src, sport, 80, 0x02));
        frames.push(build::ipv6(
            [2, 0, 0, 0, 0, 0x64],
            [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i as u8],
            17,
            &mut build::udp(sport, b"datagram"),
            6,
        ));
    }
    let mut flows = 0;
    for f in &frames {
        flows += usize::from(matches!(p.prepare(f), Prepared::Flow { .. }));
        destination_agrees(&p, f).unwrap();
    }
    assert!(flows > 100, "{flows}");
}

proptest! {
    /// Frames with header bytes changed at random: whatever is still prepared as a flow has
    /// the same destination either way.
    #[test]
    fn changed_headers_keep_the_destinations_agreeing(
        v6 in any::<bool>(),
        changes in proptest::collection::vec((0usize..62, any::<u8>()), 1..4),
        cut in 0usize..8,
    ) {
        let p = appliances(1, "dsr").remove(0);
        let mut f = if v6 {
            build::ipv6(
                [2, 0, 0, 0, 0, 0x64],
                [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                6,
                &mut build::tcp(40000, 1, 1, 0x10, b"payload"),
                16,
            )
        } else {
            segment([198, 18, 2, 9], 40000, 80, 0x10)
        };
        for (at, byte) in changes {
            let len = f.len();
            f[at % len] = byte;
        }
        f.truncate(f.len() - cut);
        destination_agrees(&p, &f)?;
    }
}

/// Frames to a service that are malformed, or too big for the backend's tunnel without DF,
/// are dropped with their reason (what the core counts) and never reach a backend.
#[test]
fn malformed_and_oversize_frames_to_a_service_are_dropped_never_forwarded() {
    for delivery in ["dsr", "gue", "ipip"] {
        let mut p = appliances(1, delivery).remove(0);
        let (src, sport) = client(3);
        let good = segment(src, sport, 80, 0x10);
        assert!(
            matches!(
                run(&mut p, &good, 1).0,
                Action::ToBackend | Action::Encapsulated { .. }
            ),
            "{delivery}: the well-formed frame is forwarded"
        );
        let sent = |p: &Pipeline| p.appliance_counts().frames.iter().sum::<u64>();
        assert_eq!(sent(&p), 1);
        let mut bad: Vec<(String, Vec<u8>)> = (0..good.len())
            .map(|n| (format!("cut to {n} bytes"), good[..n].to_vec()))
            .collect();
        let mut changed = |what: &str, at: usize, byte: u8| {
            let mut f = good.clone();
            f[at] = byte;
            bad.push((what.to_owned(), f));
        };
        changed("IPv4 header length 4 words", 14, 0x44);
        changed("IP version 5", 14, 0x55);
        changed("IPv4 total length past the frame", 16, 0x05);
        changed("IPv4 total length below its header", 17, 19);
        changed("TCP data offset 4 words", 14 + 20 + 12, 0x40);
        changed("TCP data offset past the segment", 14 + 20 + 12, 0xf0);
        for (what, frame) in &bad {
            let (action, _) = run(&mut p, frame, 2);
            assert!(
                matches!(action, Action::Drop(DropReason::Malformed(_))),
                "{delivery}, {what}: {action:?}"
            );
        }
        assert_eq!(
            sent(&p),
            1,
            "{delivery}: nothing malformed reached a backend"
        );
    }
    // Too big for the GUE tunnel (1500 bytes of path), fragmentation allowed, but with IPv4
    // options whose length runs past the header: it cannot be cut (which options go into every
    // piece cannot be told); dropped as too big and counted with the too-big answers.
    let mut p = appliances(1, "gue").remove(0);
    let (src, sport) = client(4);
    let mut t = build::tcp(sport, 1, 1, 0x10, &[0u8; 1456]);
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    let plain = build::ipv4([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, Some(16));
    let mut big = plain[..34].to_vec();
    big.extend_from_slice(&[7, 9, 4, 0]); // record route, 9 bytes long in a 4-byte space
    big.extend_from_slice(&plain[34..]);
    big[14] = 0x46;
    let total = (big.len() - 14) as u16;
    big[16..18].copy_from_slice(&total.to_be_bytes());
    big[20] &= !0x40; // no DF
    big[24..26].copy_from_slice(&[0, 0]);
    let c = build::checksum(&[&big[14..38]]);
    big[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&mut p, &big, 1).0, Action::Drop(DropReason::TooBig));
    assert_eq!(p.appliance_counts().too_big, 1);
    assert_eq!(p.appliance_counts().fragmented, 0);
    assert_eq!(p.appliance_counts().frames.iter().sum::<u64>(), 0);
}

/// `unmatched: local`: a frame to a service address on a port no rule has takes the
/// cluster's path (its bucket's owner delivers it to its host). (`drop`: see
/// `rules_drop_what_they_do_not_serve`.)
#[test]
fn unmatched_local_delivers_what_no_rule_serves_by_bucket() {
    let text = SERVICES.replace("DELIVERY", "dsr") + "unmatched: local\n";
    let mut nodes = appliances_with(2, &text);
    assert_eq!(
        nodes[0].services().unmatched(),
        crate::config::Unmatched::Local
    );
    for i in 0..50 {
        let (src, sport) = client(i);
        let other = segment(src, sport, 8080, 0x02);
        let actions: Vec<Action> = nodes.iter_mut().map(|p| run(p, &other, 1).0).collect();
        assert_eq!(
            actions.iter().filter(|a| **a == Action::Deliver).count(),
            1,
            "exactly one node delivers: {actions:?}"
        );
        assert!(actions
            .iter()
            .all(|a| matches!(a, Action::Deliver | Action::Drop(DropReason::NotOwned))));
        // The rules still hold: port 22 is disabled, port 80 goes to a backend.
        let ssh = segment(src, sport, 22, 0x02);
        assert!(nodes
            .iter_mut()
            .all(|p| run(p, &ssh, 1).0 == Action::Drop(DropReason::RuleDisabled)));
    }
}

/// A service on an IPv4 address of its own (not the cluster's): exactly one node answers ARP
/// for it, with the cluster MAC, and its frames go to the backends.
#[test]
fn an_ipv4_service_address_of_its_own_is_answered_once_with_the_cluster_mac() {
    let text = SERVICES.replace("DELIVERY", "dsr").replace(
        "addresses: [198.18.0.1]\n    ports: [80]",
        "addresses: [198.18.0.100]\n    ports: [80]",
    );
    let mut nodes = appliances_with(3, &text);
    for i in 0..20u8 {
        let mut arp = build::arp_request([2, 0, 0, 0, 0, 0x64], [198, 18, 2, 1 + i]);
        arp[38..42].copy_from_slice(&[198, 18, 0, 100]);
        let answers: Vec<Vec<u8>> = nodes
            .iter_mut()
            .filter_map(|p| match run(p, &arp, 1) {
                (Action::Reply { .. }, out) => Some(out),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 1, "one designated node answers");
        let a = &answers[0];
        assert_eq!(a[21], 2, "an ARP reply");
        assert_eq!(a[22..28], build::CLUSTER_MAC, "the cluster MAC inside");
        assert_eq!(a[28..32], [198, 18, 0, 100], "for the service address");
    }
    // Its frames: one node forwards each flow to a backend.
    let (src, sport) = client(5);
    let mut t = build::tcp(sport, 1, 1, 0x02, b"");
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    let mut syn = build::ipv4([2, 0, 0, 0, 0, 0x64], src, 6, &mut t, None);
    syn[30..34].copy_from_slice(&[198, 18, 0, 100]);
    syn[24..26].copy_from_slice(&[0, 0]);
    let c = build::checksum(&[&syn[14..34]]);
    syn[24..26].copy_from_slice(&c.to_be_bytes());
    let forwarded = nodes
        .iter_mut()
        .map(|p| run(p, &syn, 1).0)
        .filter(|a| *a == Action::ToBackend)
        .count();
    assert_eq!(forwarded, 1);
}

/// "Fragmentation needed" from a router on the way back, about a backend's DSR reply (from
/// the service address, port 80, to the client): an ICMP error to the service address.
fn frag_needed_about_reply(client: [u8; 4], sport: u16) -> Vec<u8> {
    let router = [198, 18, 3, 1];
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
    let mut quoted = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 63, 6, 0, 0];
    quoted.extend_from_slice(&build::CLUSTER_IP);
    quoted.extend_from_slice(&client);
    quoted.extend_from_slice(&80u16.to_be_bytes());
    quoted.extend_from_slice(&sport.to_be_bytes());
    quoted.extend_from_slice(&[0, 0, 0, 1]);
    icmp.extend_from_slice(&quoted);
    let c = build::checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = build::ipv4([2, 0, 0, 0, 0, 0xfe], router, 1, &mut icmp, None);
    f[26..30].copy_from_slice(&router);
    f[24..26].copy_from_slice(&[0, 0]);
    let c = build::checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Path-MTU discovery of a backend's replies: an ICMP error about a DSR reply (sent from the
/// service address) reaches the backend that serves the quoted flow, from exactly one node,
/// the flow's way (DSR, or GUE/IPIP encapsulated), even once the flow's rule would choose
/// another backend for it; after the flow's owner died, from the new owner to the backend the
/// rule chooses, the one the flow had.
#[test]
fn icmp_errors_about_a_flows_replies_reach_its_backend() {
    for delivery in ["dsr", "gue", "ipip"] {
        let mut nodes = appliances(2, delivery);
        let mut flows = Vec::new();
        for i in 0..40 {
            let (src, sport) = client(i);
            let syn = segment(src, sport, 80, 0x02);
            let mut backend = None;
            for p in nodes.iter_mut() {
                if let (Action::ToBackend | Action::Encapsulated { .. }, out) = run(p, &syn, 1) {
                    backend = Some(sent_to(&out));
                }
            }
            flows.push((src, sport, backend.expect("one node forwards the SYN")));
        }
        // Backend 1 takes no new flows any more: the flows it has keep it.
        let s = Arc::new(
            nodes[0]
                .services()
                .with_backend(SECRET, 1, |b| b.weight = 0),
        );
        for p in nodes.iter_mut() {
            p.set_services(Arc::clone(&s));
        }
        let mut to_backend_1 = 0;
        for (src, sport, backend) in flows {
            let error = frag_needed_about_reply(src, sport);
            let mut forwarded = Vec::new();
            for p in nodes.iter_mut() {
                match run(p, &error, 2) {
                    (Action::ToBackend | Action::Encapsulated { .. }, out) => {
                        assert_eq!(sent_to(&out), backend, "{delivery}: the flow's backend");
                        assert_carries(&out, &error, delivery);
                        forwarded.push(p.id.node);
                    }
                    (Action::Drop(DropReason::NotOwned), _) => {}
                    other => panic!("{delivery}: unexpected {other:?}"),
                }
            }
            assert_eq!(
                forwarded.len(),
                1,
                "{delivery}: exactly one node forwards it"
            );
            to_backend_1 += usize::from(backend.0[5] == 1);
        }
        assert!(to_backend_1 > 0, "{delivery}: some flows were backend 1's");
    }
    // The owner of a flow is gone and its table with it: the node that takes the bucket sends
    // the error to the backend the flow's rule chooses, the backend the flow had.
    let mut nodes = appliances(2, "dsr");
    let (src, sport) = client(77);
    let syn = segment(src, sport, 80, 0x02);
    let (owner, backend) = nodes
        .iter_mut()
        .enumerate()
        .find_map(|(i, p)| match run(p, &syn, 1) {
            (Action::ToBackend | Action::Encapsulated { .. }, out) => Some((i, sent_to(&out))),
            _ => None,
        })
        .unwrap();
    let survivor = &mut nodes[1 - owner];
    let alone = stable_snapshot(
        &OwnershipTable::build(2, &[Member::new(survivor.id.node.get(), 100).unwrap()]).unwrap(),
    );
    survivor.set_snapshot(Arc::new(alone));
    let (action, out) = run(survivor, &frag_needed_about_reply(src, sport), 3);
    assert!(
        matches!(action, Action::ToBackend | Action::Encapsulated { .. }),
        "{action:?}"
    );
    assert_eq!(sent_to(&out), backend);
}

/// A `single` rule: the first node of its priority list that serves takes every flow of the
/// rule, whatever the buckets; when it is gone, the next takes over.
#[test]
fn a_single_rule_goes_to_its_first_serving_node_then_the_next() {
    let text = SERVICES.replace("DELIVERY", "dsr").replace(
        "    ports: [80]\n    delivery: dsr\n",
        "    ports: [80]\n    mode: single\n    priority: [2, 1]\n    delivery: dsr\n",
    );
    let mut nodes = appliances_with(2, &text);
    for i in 0..100 {
        let (src, sport) = client(i);
        let syn = segment(src, sport, 80, 0x02);
        let actions: Vec<Action> = nodes.iter_mut().map(|p| run(p, &syn, 1).0).collect();
        assert_eq!(
            actions,
            [Action::Drop(DropReason::NotOwned), Action::ToBackend],
            "node 2 first in the list takes every flow"
        );
    }
    // The same in bursts, as a packet core decides them: the frames of buckets node 1 owns
    // are not dropped in bulk on node 2 as another node's, they are its rule's.
    let syns: Vec<Vec<u8>> = (200..264)
        .map(|i| {
            let (src, sport) = client(i);
            segment(src, sport, 80, 0x02)
        })
        .collect();
    for (p, want) in nodes
        .iter_mut()
        .zip([Action::Drop(DropReason::NotOwned), Action::ToBackend])
    {
        let actions = run_burst(p, &syns, 1);
        assert!(
            actions.iter().all(|a| *a == want),
            "{}: {actions:?}",
            p.id.node
        );
    }
    // Node 2 is gone: node 1, alone in the table, takes the rule.
    let node1 = &mut nodes[0];
    let alone =
        stable_snapshot(&OwnershipTable::build(2, &[Member::new(1, 100).unwrap()]).unwrap());
    node1.set_snapshot(Arc::new(alone));
    for i in 100..150 {
        let (src, sport) = client(i);
        let syn = segment(src, sport, 80, 0x02);
        assert_eq!(run(node1, &syn, 2).0, Action::ToBackend);
    }
}

proptest! {
    /// Frames to a service with header bytes changed at random and cut short, through every
    /// delivery: never a panic, and a frame that reaches a backend is one the parser reads
    /// whole, to the rule's port, carried unchanged above layer 2 (DSR) or whole inside the
    /// tunnel.
    #[test]
    fn changed_frames_to_a_service_reach_a_backend_only_well_formed(
        delivery in prop_oneof![Just("dsr"), Just("gue"), Just("ipip")],
        changes in proptest::collection::vec((0usize..60, any::<u8>()), 1..4),
        cut in 0usize..30,
    ) {
        let mut p = appliances(1, delivery).remove(0);
        let mut f = segment([198, 18, 2, 9], 40000, 80, 0x10);
        for (at, byte) in changes {
            let len = f.len();
            f[at % len] = byte;
        }
        f.truncate(f.len().saturating_sub(cut));
        let (action, out) = run(&mut p, &f, 1);
        if let Action::ToBackend | Action::Encapsulated { .. } = action {
            let parsed = parse_l2_l4(&f);
            prop_assert!(parsed.is_ok(), "{:?} forwarded", parsed);
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.dst_port, Some(80));
            prop_assert!(parsed.fragment.is_none() || parsed.src_port.is_some());
            assert_carries(&out, &f, delivery);
        }
    }
}

/// Pings to a service address of its own (IPv4 and IPv6): exactly one node (the owner of the
/// source's bucket) answers, from the service address and the node MAC, checksums valid.
#[test]
fn pings_to_a_service_address_are_answered_once() {
    use crate::wire::checksum;
    let text = SERVICES.replace("DELIVERY", "dsr").replace(
        "addresses: [198.18.0.1]\n    ports: [80]",
        "addresses: [198.18.0.100, \"2001:2::100\"]\n    ports: [80]",
    );
    let mut nodes = appliances_with(3, &text);
    let client_mac = [2, 0, 0, 0, 0, 0x64];
    let vip: Ipv6Addr = "2001:2::100".parse().unwrap();
    for i in 0..20u8 {
        let src4 = [198, 18, 2, 1 + i];
        let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, i, 1, 2, 3, 4];
        let c = checksum::checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let mut v4 = build::ipv4(client_mac, src4, 1, &mut echo, None);
        v4[30..34].copy_from_slice(&[198, 18, 0, 100]);
        v4[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&v4[14..34]);
        v4[24..26].copy_from_slice(&c.to_be_bytes());

        let src6: Ipv6Addr = format!("2001:2::2:{}", i + 1).parse().unwrap();
        let mut echo6 = vec![128, 0, 0, 0, 0x12, 0x34, 0, i, 5, 6, 7, 8];
        let c = checksum::compute_with_pseudo_header(
            &IpAddr::V6(src6),
            &IpAddr::V6(vip),
            crate::wire::IpProtocol::Icmpv6,
            &echo6,
        );
        echo6[2..4].copy_from_slice(&c.to_be_bytes());
        let mut v6 = build::ethernet(client_mac, build::CLUSTER_MAC, 0x86dd);
        v6.extend_from_slice(&[0x60, 0, 0, 0, 0, echo6.len() as u8, 58, 64]);
        v6.extend_from_slice(&src6.octets());
        v6.extend_from_slice(&vip.octets());
        v6.extend_from_slice(&echo6);

        for (request, v6_request) in [(v4, false), (v6, true)] {
            let mut replies = Vec::new();
            for p in nodes.iter_mut() {
                let node_mac = p.id.node_mac;
                match run(p, &request, 1) {
                    (Action::Reply { .. }, out) => replies.push((node_mac, out)),
                    (Action::Drop(DropReason::NotOwned), _) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(replies.len(), 1, "one node answers");
            let (node_mac, out) = &replies[0];
            assert_eq!(out[..6], client_mac, "to the client's MAC");
            assert_eq!(out[6..12], node_mac.0, "from the node MAC");
            let r = parse_l2_l4(out).unwrap();
            assert_eq!(r.hop_limit, 64);
            if v6_request {
                assert_eq!(r.src_ip, IpAddr::V6(vip));
                assert_eq!(r.dst_ip, IpAddr::V6(src6));
                assert_eq!(out[54], 129, "echo reply");
                assert!(checksum::verify_with_pseudo_header(
                    &r.src_ip,
                    &r.dst_ip,
                    crate::wire::IpProtocol::Icmpv6,
                    &out[54..]
                ));
                assert_eq!(
                    out[58..],
                    request[58..],
                    "identifier, sequence and data kept"
                );
            } else {
                assert_eq!(r.src_ip, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100)));
                assert_eq!(r.dst_ip, IpAddr::V4(Ipv4Addr::from(src4)));
                assert_eq!(out[34], 0, "echo reply");
                assert_eq!(checksum::checksum(&out[14..34]), 0, "IP header checksum");
                assert_eq!(checksum::checksum(&out[34..]), 0, "ICMP checksum");
                assert_eq!(
                    out[38..],
                    request[38..],
                    "identifier, sequence and data kept"
                );
            }
        }
    }
    let ping = |dst: [u8; 4], options: bool| {
        let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 2];
        let c = checksum::checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = build::ipv4(client_mac, [198, 18, 2, 1], 1, &mut echo, None);
        if options {
            f[14] = 0x46;
            f.splice(34..34, [1, 1, 1, 0]); // four bytes of no-op options
            let total = (f.len() - 14) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
        }
        let header = 14 + usize::from(f[14] & 0x0f) * 4;
        f[30..34].copy_from_slice(&dst);
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&f[14..header]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    // With IPv4 options (a source route would have to be reversed), and to the cluster
    // address (which the owner's host holds): the owner's host gets it.
    for (what, frame) in [
        ("options", ping([198, 18, 0, 100], true)),
        ("cluster address", ping(build::CLUSTER_IP, false)),
    ] {
        let actions: Vec<Action> = nodes.iter_mut().map(|p| run(p, &frame, 1).0).collect();
        assert_eq!(
            actions.iter().filter(|a| **a == Action::Deliver).count(),
            1,
            "{what}: {actions:?}"
        );
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, Action::Deliver | Action::Drop(DropReason::NotOwned))),
            "{what}: {actions:?}"
        );
    }
}

/// A `local` rule among appliance rules: its frames go to the owner's own host, like server
/// mode's, while the other rules forward.
#[test]
fn a_local_rule_delivers_to_the_owners_host() {
    let text = SERVICES.replace("DELIVERY", "dsr").replace(
        "  - name: ssh\n    addresses: [198.18.0.1]\n    ports: [22]\n    mode: disabled\n",
        "  - name: ssh\n    addresses: [198.18.0.1]\n    ports: [22]\n    delivery: local\n",
    );
    let mut nodes = appliances_with(2, &text);
    for i in 0..50 {
        let (src, sport) = client(i);
        for (port, want) in [(22, Action::Deliver), (80, Action::ToBackend)] {
            let syn = segment(src, sport, port, 0x02);
            let actions: Vec<Action> = nodes.iter_mut().map(|p| run(p, &syn, 1).0).collect();
            assert_eq!(
                actions.iter().filter(|a| **a == want).count(),
                1,
                "port {port}: {actions:?}"
            );
            assert!(actions
                .iter()
                .all(|a| *a == want || *a == Action::Drop(DropReason::NotOwned)));
        }
    }
}
