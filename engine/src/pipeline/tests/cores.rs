//! Several packet cores: one pipeline per core, each frame decided by the pipeline of its home
//! core ([`home_core`]), decides every frame as one pipeline would — whatever queue the ports
//! put each frame on. Without the home core (each frame decided where it arrived), a refusal
//! and a later fragment miss the state their flow left on the other core.

use super::*;
use crate::pipeline::{home_core, Side};
use crate::testkit::build::udp_fragments;

/// A frame of the test's traffic: from a client (one of a few addresses and ports), either
/// way, with the RX queue the port put it on.
#[derive(Debug, Clone)]
enum Event {
    /// A TCP segment from the client (flags).
    Wire(u8),
    /// The node's kernel answering: RST (a refusal when the flow is new) or FIN.
    Host(u8),
    /// A UDP datagram in two IPv4 fragments, the later one first or not.
    Fragments { later_first: bool },
}

fn event() -> impl Strategy<Value = (u8, u8, Event, usize)> {
    let e = prop_oneof![
        3 => prop_oneof![Just(0x02u8), Just(0x10), Just(0x11)].prop_map(Event::Wire),
        2 => prop_oneof![Just(0x14u8), Just(0x11)].prop_map(Event::Host),
        1 => any::<bool>().prop_map(|later_first| Event::Fragments { later_first }),
    ];
    (0..4u8, 0..3u8, e, 0..2usize)
}

fn client(c: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + c)
}

/// The node's kernel's segment to the client's port (the flow reversed).
fn from_kernel(c: u8, port: u16, flags: u8) -> Vec<u8> {
    let mut f = ipv4_frame(client(c), port, &Kind::Tcp(flags));
    f[26..30].copy_from_slice(&[198, 18, 0, 1]);
    f[30..34].copy_from_slice(&client(c).octets());
    f[34..36].copy_from_slice(&80u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f
}

/// The frames of `event`, each with its side.
fn frames(c: u8, p: u8, event: &Event, ident: u16) -> Vec<(Side, Vec<u8>)> {
    let port = 40_000 + u16::from(p);
    match event {
        Event::Wire(flags) => vec![(Side::Wire, ipv4_frame(client(c), port, &Kind::Tcp(*flags)))],
        Event::Host(flags) => vec![(Side::Host, from_kernel(c, port, *flags))],
        Event::Fragments { later_first } => {
            let [first, later] = udp_fragments(CLIENT_MAC.0, client(c).octets(), port, ident);
            let mut both = vec![(Side::Wire, first), (Side::Wire, later)];
            if *later_first {
                both.reverse();
            }
            both
        }
    }
}

fn pipelines(n: usize) -> Vec<Pipeline> {
    (0..n)
        .map(|_| {
            let mut p = alone();
            p.set_service(ServiceState {
                hold_refusals_on: Some(80),
                ..ServiceState::default()
            });
            p
        })
        .collect()
}

/// What a pipeline did with a frame: its action, and what became of held fragments.
fn run(p: &mut Pipeline, side: Side, frame: &[u8], now: u64) -> (Action, Option<bool>) {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    let action = match side {
        Side::Wire => p.from_wire(&mut FrameBuf::at_start(&mut buf), frame.len(), now),
        Side::Host => p.from_host(&mut buf[..frame.len()], now),
    };
    (action, p.take_released().map(|r| r.to == ReleaseTo::Host))
}

/// Decisions of `cores` pipelines over `events`, each frame decided on its home core (or, with
/// `home` false, on the core its queue belongs to); and the flows they track in all.
fn decisions(
    events: &[(u8, u8, Event, usize)],
    cores: usize,
    home: bool,
) -> (Vec<(Action, Option<bool>)>, usize) {
    let mut ps = pipelines(cores);
    let mut out = Vec::new();
    for (i, (c, p, event, queue)) in events.iter().enumerate() {
        // The frames of one event arrive on consecutive queues (two fragments, two queues).
        for (j, (side, frame)) in frames(*c, *p, event, i as u16).into_iter().enumerate() {
            let arrived = (*queue + j) % cores;
            let core = if home {
                home_core(&frame, side, cores).unwrap_or(arrived)
            } else {
                arrived
            };
            out.push(run(&mut ps[core], side, &frame, i as u64 + 1));
        }
    }
    (out, ps.iter().map(|p| p.flows().len()).sum())
}

proptest! {
    #[test]
    fn cores_fed_by_home_decide_like_one(
        events in prop::collection::vec(event(), 1..60),
        cores in 2..5usize,
    ) {
        let one = decisions(&events, 1, true);
        let many = decisions(&events, cores, true);
        prop_assert_eq!(one, many);
    }
}

/// The same traffic decided where it arrived: the kernel's refusal reaches the core that never
/// saw the SYN and goes out (the client sees its connection refused), and a later fragment that
/// came first is never released.
#[test]
fn cores_fed_by_queue_miss_their_flows_state() {
    let events = vec![(0, 0, Event::Wire(0x02), 0), (0, 0, Event::Host(0x14), 1)];
    let one = decisions(&events, 1, true);
    assert_eq!(one.0[1].0, Action::Drop(DropReason::ServiceRefused));
    assert_eq!(decisions(&events, 2, true), one);
    let by_queue = decisions(&events, 2, false);
    assert_eq!(by_queue.0[1].0, Action::ToWire);

    let events = vec![(1, 0, Event::Fragments { later_first: true }, 0)];
    let one = decisions(&events, 1, true);
    assert_eq!(one.0[1].1, Some(true), "{:?}", one.0);
    assert_eq!(decisions(&events, 2, true), one);
    let by_queue = decisions(&events, 2, false);
    assert_eq!(by_queue.0[1].1, None, "{:?}", by_queue.0);
}
