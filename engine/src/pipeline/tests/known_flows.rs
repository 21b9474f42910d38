//! A known flow's shortcut in appliance mode (`Pipeline::known_flow`, by the flow table's
//! checked marks): it decides every frame as the full decision would, and stands aside
//! whenever it could not know (the rules changed, a first SYN to a backend that takes no new
//! flows, a bucket in handoff).

use super::appliance::{
    appliances, client, compiled, compiled_after, in_mbuf, node_yaml, run, segment,
};
use super::*;
use crate::appliance::{BackendState, Services};
use crate::pipeline::appliance::Marks;
use crate::testkit::build;

/// Rules of every kind on the cluster address (after [`node_yaml`]): DSR on 80 and 8000-8099, GUE on 443, UDP on 53,
/// a disabled rule (on a second address too), a `single` rule node 2 takes first, IP-in-IP on
/// 4443; other ports match nothing (`unmatched: drop`). The DSR and UDP rules serve the IPv6
/// address 2001:2::1 too, and its 443 goes by GUE in IPv6 to IPv6 backends.
const RULES: &str = r#"
services:
  - name: web
    addresses: [198.18.0.1, "2001:2::1"]
    ports: [80, "8000-8099"]
    delivery: dsr
    backends:
      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { ip: 198.18.0.22, mac: 02:bb:00:00:00:02 }
      - { ip: 198.18.0.23, mac: 02:bb:00:00:00:03 }
  - name: tunnel
    addresses: [198.18.0.1]
    ports: [443]
    delivery: gue
    backends:
      - { ip: 198.18.0.31, mac: 02:bb:00:00:00:11 }
      - { ip: 198.18.0.32, mac: 02:bb:00:00:00:12 }
  - name: dns
    addresses: [198.18.0.1, "2001:2::1"]
    protocol: udp
    ports: [53]
    delivery: dsr
    backends:
      - { ip: 198.18.0.41, mac: 02:bb:00:00:00:21 }
      - { ip: 198.18.0.42, mac: 02:bb:00:00:00:22 }
  - name: ssh
    addresses: [198.18.0.1, 199.18.0.1]
    ports: [22, 81]
    mode: disabled
  - name: admin
    addresses: [198.18.0.1]
    ports: [9000]
    mode: single
    priority: [2, 1]
    delivery: dsr
    backends:
      - { ip: 198.18.0.51, mac: 02:bb:00:00:00:31 }
  - name: tunnel4
    addresses: [198.18.0.1]
    ports: [4443]
    delivery: ipip
    backends:
      - { ip: 198.18.0.61, mac: 02:bb:00:00:00:41 }
      - { ip: 198.18.0.62, mac: 02:bb:00:00:00:42 }
  - name: tunnel6
    addresses: ["2001:2::1"]
    ports: [443]
    delivery: gue
    backends:
      - { ip: "2001:2::31", mac: 02:bb:00:00:00:51 }
      - { ip: "2001:2::32", mac: 02:bb:00:00:00:52 }
"#;

/// [`RULES`] reloaded as variant `v`: 0 as it is; 1 with 8000-8099 moved to the GUE rules; 2
/// with a web backend gone and 5353 added to the UDP rule; 3 with the web rule disabled. The
/// node has an IPv6 address (2001:2::11) to encapsulate from.
fn rules(v: u8) -> String {
    let node = node_yaml().replace(
        "  ip: 198.18.0.11\n",
        "  ip: 198.18.0.11\n  ip6: \"2001:2::11\"\n",
    );
    let text = format!("{}{}", node, RULES.trim_start());
    match v % 4 {
        1 => text
            .replace("ports: [80, \"8000-8099\"]", "ports: [80]")
            .replace("ports: [443]", "ports: [443, \"8000-8099\"]"),
        2 => text
            .replace("      - { ip: 198.18.0.23, mac: 02:bb:00:00:00:03 }\n", "")
            .replace("ports: [53]", "ports: [53, 5353]"),
        3 => text.replace(
            "    ports: [80, \"8000-8099\"]\n    delivery: dsr\n",
            "    ports: [80, \"8000-8099\"]\n    mode: disabled\n    delivery: dsr\n",
        ),
        _ => text,
    }
}

/// The services of variant `v` as a reload after `previous` compiles them (ids kept).
fn reloaded(v: u8, previous: &Services) -> Arc<Services> {
    compiled_after(&rules(v), Some(previous))
}

/// Node 1 of two, with [`RULES`].
fn node() -> Pipeline {
    let mut p = appliances(2, "dsr").remove(0);
    p.id.node_ip6 = Some("2001:2::11".parse().unwrap());
    p.set_services(compiled(&rules(0)));
    p
}

/// Destination ports the frames go to, and whether each is UDP's.
const PORTS: [(u16, bool); 9] = [
    (80, false),
    (8050, false),
    (443, false),
    (53, true),
    (5353, true),
    (22, false),
    (9000, false),
    (7777, false),
    (4443, false),
];

/// TCP flags a frame may carry: SYN, ACK, PSH+ACK, FIN+ACK, RST, SYN+ACK.
const FLAGS: [u8; 6] = [0x02, 0x10, 0x18, 0x11, 0x04, 0x12];

/// A frame from client `c` to `PORTS[port]`, with `FLAGS[flags]` if TCP.
fn frame(c: u32, port: usize, flags: usize) -> Vec<u8> {
    sized_frame(c, port, flags, Size::Small, false)
}

/// How large a frame is: small; an IP packet the GUE rules' 1500-byte path takes exactly
/// once encapsulated (32 bytes of outer headers in IPv4, 52 in IPv6), or one byte more (with
/// DF: answered "too big"); or a 1500-byte IP packet without or with DF (cut in pieces, or
/// answered; IPv6 is never cut on the way: both are answered). Every IPv4 packet but `Full`
/// has DF.
#[derive(Debug, Clone, Copy)]
enum Size {
    Small,
    AtMtu,
    PastMtu,
    Full,
    FullNoFragments,
}

impl Size {
    /// The IP packet's length, for a TCP (20-byte header) or UDP segment, in IPv4 or IPv6.
    fn ip_len(self, udp: bool, v6: bool) -> usize {
        let (header, outer) = if v6 {
            (40, 40 + 8 + 4)
        } else {
            (20, 20 + 8 + 4)
        };
        let small = header + if udp { 8 + 5 } else { 20 };
        match self {
            Size::Small => small,
            Size::AtMtu => 1500 - outer,
            Size::PastMtu => 1500 - outer + 1,
            Size::Full | Size::FullNoFragments => 1500,
        }
    }
}

/// [`frame`] of size `size`, from the client's IPv6 address (2001:2::<its IPv4 address>) to
/// 2001:2::1 if `v6`.
fn sized_frame(c: u32, port: usize, flags: usize, size: Size, v6: bool) -> Vec<u8> {
    let (src, sport) = client(c);
    let (port, udp) = PORTS[port % PORTS.len()];
    let header = if v6 { 40 } else { 20 };
    let mut l4 = if udp {
        build::udp(sport, &vec![b'q'; size.ip_len(true, v6) - header - 8])
    } else {
        let payload = vec![b't'; size.ip_len(false, v6) - header - 20];
        build::tcp(sport, 1, 1, FLAGS[flags % FLAGS.len()], &payload)
    };
    l4[2..4].copy_from_slice(&port.to_be_bytes());
    let (proto, checksum_at) = if udp { (17, 6) } else { (6, 16) };
    let mac = [2, 0, 0, 0, 0, 0x64];
    let mut f = if v6 {
        let mut src6 = [0u8; 16];
        src6[..4].copy_from_slice(&[0x20, 0x01, 0, 2]);
        src6[12..].copy_from_slice(&src);
        build::ipv6(mac, src6, proto, &mut l4, checksum_at)
    } else {
        build::ipv4(mac, src, proto, &mut l4, Some(checksum_at))
    };
    assert_eq!(f.len(), 14 + size.ip_len(udp, v6));
    if v6 {
        return f;
    }
    // The builder sets DF: every IPv4 packet has it but the one to be cut in pieces.
    assert_eq!(f[14 + 6] & 0x40, 0x40);
    if let Size::Full = size {
        // Without DF, and the header checksum again.
        f[14 + 6] &= !0x40;
        f[14 + 10..14 + 12].fill(0);
        let c = crate::wire::checksum::checksum(&f[14..34]);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// What the shortcut alone does with `frame` at `now` (`None`: it stands aside, as for any
/// frame while the marks do not hold).
fn known(p: &mut Pipeline, frame: &[u8], now: u64) -> Option<Action> {
    let Prepared::Flow {
        bucket,
        hash,
        proto,
        flags,
        plain: true,
    } = p.prepare(frame)
    else {
        return None;
    };
    if p.marks != Marks::Hold {
        return None;
    }
    let mut buf = in_mbuf(frame);
    let mut buf = FrameBuf::new(&mut buf, HEADROOM);
    p.known_flow(&mut buf, frame.len(), bucket, hash, proto, flags, now)
}

/// Client `c`'s flow to port 80 that node 1 owns (the other node owns about half).
fn owned_client(p: &Pipeline, from: u32) -> u32 {
    (from..)
        .find(|&c| matches!(p.prepare(&frame(c, 0, 0)), Prepared::Flow { bucket, .. } if p.mine(bucket)))
        .unwrap()
}

#[test]
fn a_known_flow_skips_the_lookup_until_the_rules_change() {
    let mut p = node();
    let c = owned_client(&p, 0);
    let (syn, ack) = (frame(c, 1, 0), frame(c, 1, 1));
    assert_eq!(
        known(&mut p, &syn, 1),
        None,
        "a new flow: the full decision"
    );
    let (first, out) = run(&mut p, &syn, 1);
    assert_eq!(first, Action::ToBackend);
    let backend = out[5];
    let by_shortcut = known(&mut p, &ack, 2).expect("the flow is marked");
    assert_eq!(by_shortcut, Action::ToBackend);
    assert_eq!(run(&mut p, &ack, 2).1[5], backend);
    // A health change keeps the rules: the marks hold.
    let s = p
        .services()
        .with_backend(SECRET, 3, |b| b.state = BackendState::Down);
    p.set_services(Arc::new(s));
    assert!(known(&mut p, &ack, 3).is_some());
    // 8000-8099 moves to the GUE rule: no shortcut until every mark is cleared, then the flow
    // is decided in full once (to the GUE rule's backend) and marked again.
    let s = reloaded(1, p.services());
    p.set_services(s);
    assert_eq!(known(&mut p, &ack, 4), None, "marks clearing");
    p.maintain(4, 256);
    assert_eq!(p.marks, Marks::Hold);
    assert_eq!(known(&mut p, &ack, 4), None, "its mark is cleared");
    let (moved, _) = run(&mut p, &ack, 4);
    assert!(
        matches!(moved, Action::Encapsulated { push, .. } if push > 0),
        "{moved:?}"
    );
    assert!(matches!(
        known(&mut p, &ack, 5),
        Some(Action::Encapsulated { push, .. }) if push > 0
    ));
    // A new connection on the port, to a backend that takes no new flows: not the shortcut's.
    let s = p
        .services()
        .with_backend(SECRET, 4, |b| b.state = BackendState::Down);
    let s = s.with_backend(SECRET, 5, |b| b.state = BackendState::Down);
    p.set_services(Arc::new(s));
    assert_eq!(known(&mut p, &syn, 6), None);
    assert!(known(&mut p, &ack, 6).is_some(), "its segments still are");
}

/// IPv6 flows take the shortcut too: by DSR (port 80) and by GUE in IPv6 (443), the same
/// backend and bytes as the full decision.
#[test]
fn an_ipv6_flow_takes_the_shortcut_too() {
    let mut p = node();
    for (port, push) in [(0, 0), (2, 52)] {
        let c = (0..)
            .find(|&c| {
                let f = sized_frame(c, port, 0, Size::Small, true);
                matches!(p.prepare(&f), Prepared::Flow { bucket, .. } if p.mine(bucket))
            })
            .unwrap();
        let syn = sized_frame(c, port, 0, Size::Small, true);
        let ack = sized_frame(c, port, 1, Size::Small, true);
        assert_eq!(
            known(&mut p, &syn, 1),
            None,
            "a new flow: the full decision"
        );
        // DSR, or an encapsulation `push` bytes longer (the frames are as long as each other).
        let to = |len| match push {
            0 => Action::ToBackend,
            push => Action::Encapsulated {
                push,
                len: u16::try_from(len).unwrap() + push,
            },
        };
        let (first, by_rule) = run(&mut p, &syn, 1);
        assert_eq!(first, to(syn.len()));
        assert_eq!(known(&mut p, &ack, 2), Some(to(ack.len())));
        p.marks = Marks::Clearing { next: 0 };
        let (full, by_full) = run(&mut p, &ack, 3);
        p.marks = Marks::Hold;
        let (shortcut, by_shortcut) = run(&mut p, &ack, 3);
        assert_eq!((full, shortcut), (to(ack.len()), to(ack.len())));
        assert_eq!(by_shortcut, by_full);
        // The same backend as the first frame's: its MAC (DSR), or the outer header's
        // destination (GUE in IPv6, bytes 38..54 of the frame).
        let dst = |out: &[u8]| {
            if push == 0 {
                out[..6].to_vec()
            } else {
                out[38..54].to_vec()
            }
        };
        assert_eq!(dst(&by_shortcut), dst(&by_rule));
    }
}

/// A client's flow to 199.18.0.1:81 (a disabled rule's) whose fingerprint would equal its
/// flow's to 198.18.0.1:80 without the keyed mixing of the destination (the first octet's
/// difference cancelled by the port's): refused by its rule, never sent to the other flow's
/// marked backend.
#[test]
fn a_flow_aimed_at_another_rules_port_takes_its_own_rule() {
    let mut p = node();
    let c = owned_client(&p, 0);
    for flags in [0x02, 0x10, 0x18] {
        assert_eq!(run(&mut p, &frame(c, 0, 0), 1).0, Action::ToBackend);
        let (src, sport) = client(c);
        let mut aimed = segment(src, sport, 81, flags);
        aimed[30] = 199;
        aimed[24..26].fill(0);
        let sum = build::checksum(&[&aimed[14..34]]);
        aimed[24..26].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            run(&mut p, &aimed, 2).0,
            Action::Drop(DropReason::RuleDisabled)
        );
    }
}

/// One step of [`the_shortcut_decides_as_the_full_decision`].
#[derive(Debug, Clone)]
enum Step {
    /// A frame from client `c` to `PORTS[port]` with `FLAGS[flags]`, of size `size`, in IPv6
    /// if `v6`.
    Frame {
        c: u32,
        port: usize,
        flags: usize,
        size: Size,
        v6: bool,
    },
    /// Time passes (seconds: past the UDP, closing and established timeouts too).
    Wait(u64),
    /// Backend `id` goes down, is drained or comes back up (`state` 0..3).
    Health { id: u16, state: u8 },
    /// The configuration reloaded as [`rules`]'s variant.
    Reload(u8),
    /// Housekeeping between bursts.
    Maintain,
    /// The buckets change hands (see [`owners`]).
    Owners(u8),
    /// The node's own service fails (refusing new flows) or comes back.
    Refusing(bool),
}

/// The snapshots of [`Step::Owners`]: the buckets both nodes' (0), node 1's alone (1), node
/// 2's alone (2), moving from node 1's to both nodes' (3-5: learn, release, acquire) or from
/// both nodes' to node 2's (6-8).
fn owners(which: u8) -> Arc<Snapshot> {
    let table = |ids: &[u8]| {
        let members: Vec<Member> = ids.iter().map(|&i| Member::new(i, 100).unwrap()).collect();
        OwnershipTable::build(1, &members).unwrap()
    };
    let (both, one, two) = (table(&[1, 2]), table(&[1]), table(&[2]));
    let phases = [Phase::Learn, Phase::Release, Phase::Acquire];
    let moving = |from: &OwnershipTable, to: &OwnershipTable, phase| {
        let plan = PlanId {
            epoch: 2,
            proposer: NodeId::new(1).unwrap(),
        };
        Snapshot::build(
            plan,
            phase,
            |b| from.owner(b),
            Some(&|b| to.owner(b)),
            to.digest(),
        )
    };
    Arc::new(match which % 9 {
        0 => stable_snapshot(&both),
        1 => stable_snapshot(&one),
        2 => stable_snapshot(&two),
        w @ 3..=5 => moving(&one, &both, phases[usize::from(w - 3)]),
        w => moving(&both, &two, phases[usize::from(w - 6)]),
    })
}

/// A frame's size from a number in 0..12: mostly small, for a flow's frames have to repeat
/// for the shortcut to be taken.
fn size_of(n: u8) -> Size {
    match n {
        0 => Size::AtMtu,
        1 => Size::PastMtu,
        2 => Size::Full,
        3 => Size::FullNoFragments,
        _ => Size::Small,
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (0u32..6, 0usize..PORTS.len(), 0usize..FLAGS.len(), 0u8..12).prop_map(
            |(c, port, flags, size)| Step::Frame {
                c,
                port,
                flags,
                size: size_of(size),
                v6: false,
            }
        ),
        // IPv6 from fewer clients to the ports that serve it (DSR, GUE in IPv6, UDP) and one
        // that does not, so that its flows repeat as often as IPv4's.
        6 => (0u32..2, 0usize..4, 0usize..FLAGS.len(), 0u8..12).prop_map(
            |(c, port, flags, size)| Step::Frame {
                c,
                port: [0, 2, 3, 7][port],
                flags,
                size: size_of(size),
                v6: true,
            }
        ),
        1 => prop_oneof![Just(1u64), Just(40), Just(400)].prop_map(Step::Wait),
        2 => (1u16..=12, 0u8..3).prop_map(|(id, state)| Step::Health { id, state }),
        1 => (0u8..4).prop_map(Step::Reload),
        2 => Just(Step::Maintain),
        1 => (0u8..9).prop_map(Step::Owners),
        1 => any::<bool>().prop_map(Step::Refusing),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any sequence of frames, waits, health changes, reloads, changes of owners (handoffs
    /// included) and of the node's own service: a node that takes the
    /// shortcut and one that never does (its marks forced to "clearing" before every frame)
    /// decide every frame alike, send the same bytes and count the same.
    #[test]
    fn the_shortcut_decides_as_the_full_decision(
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        let (mut fast, mut full) = (node(), node());
        let mut now = 1_000_000u64;
        for s in steps {
            match s {
                Step::Frame { c, port, flags, size, v6 } => {
                    let f = sized_frame(c, port, flags, size, v6);
                    full.marks = Marks::Clearing { next: 0 };
                    let a = run(&mut fast, &f, now);
                    let b = run(&mut full, &f, now);
                    prop_assert_eq!(a, b, "client {} port {} flags {} size {:?} IPv6 {}", c, port, flags, size, v6);
                    now += 1_000;
                }
                Step::Wait(secs) => now += secs * 1_000_000_000,
                Step::Health { id, state } => {
                    let state = [BackendState::Down, BackendState::Drained, BackendState::Up]
                        [usize::from(state)];
                    let s = Arc::new(fast.services().with_backend(SECRET, id, |b| b.state = state));
                    fast.set_services(Arc::clone(&s));
                    full.set_services(s);
                }
                Step::Reload(v) => {
                    let s = reloaded(v, fast.services());
                    fast.set_services(Arc::clone(&s));
                    full.set_services(s);
                }
                Step::Maintain => {
                    fast.maintain(now, 256);
                    full.maintain(now, 256);
                }
                Step::Owners(which) => {
                    fast.set_snapshot(owners(which));
                    full.set_snapshot(owners(which));
                }
                Step::Refusing(refuse_new) => {
                    let service = ServiceState {
                        refuse_new,
                        ..ServiceState::default()
                    };
                    fast.set_service(service);
                    full.set_service(service);
                }
            }
        }
        let (a, b) = (fast.appliance_counts(), full.appliance_counts());
        prop_assert_eq!(&a.frames, &b.frames);
        prop_assert_eq!(&a.bytes, &b.bytes);
        prop_assert_eq!(&a.new_flows, &b.new_flows);
        prop_assert_eq!((a.too_big, a.fragmented), (b.too_big, b.fragmented));
        prop_assert_eq!(fast.flows().len(), full.flows().len());
        prop_assert_eq!(fast.flows().stats(), full.flows().stats());
        for id in 0..=12 {
            prop_assert_eq!(fast.flows().count_for_backend(id), full.flows().count_for_backend(id));
        }
        // Every flow's entry: state, time and backend.
        for (c, v6) in (0..6).flat_map(|c| [(c, false), (c, true)]) {
            for port in 0..PORTS.len() {
                if let Prepared::Flow { hash, .. } = fast.prepare(&sized_frame(c, port, 1, Size::Small, v6)) {
                    prop_assert_eq!(fast.flows().get(hash, now), full.flows().get(hash, now));
                }
            }
        }
    }
}
