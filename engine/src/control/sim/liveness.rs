//! Liveness by the data path, simulated: one node's wire path and UDP path in every pair of
//! states (the rule table of the membership module doc), in 2- and 3-node clusters. At every
//! instant: no bucket accepted by two nodes, and (from the failover budget on) none by a node
//! the table says cannot serve. Within the budget every bucket has an owner that can serve;
//! once the paths are back, the node rejoins and takes its share again.

use super::*;

/// The state of the victim's wire path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Up,
    /// Its port lost link: nothing goes either way, and its data path says so.
    LinkDown,
    /// Link up, but its control frames are dropped both ways (a filtering switch port).
    Filtered,
    /// Its frames reach no peer; it hears theirs.
    OneWayOut,
    /// It hears no peer's frames; they hear its.
    OneWayIn,
}

/// The state of the victim's UDP (control network) path, both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Udp {
    Up,
    Down,
}

impl Sim {
    fn sever(&mut self, from: u8, to: u8, path: Path, on: bool) {
        let bit = 1u64 << n(to).index();
        let cut = &mut self.severed[n(from).index()][path.index()];
        if on {
            *cut |= bit;
        } else {
            *cut &= !bit;
        }
    }

    /// Puts `victim`'s paths to `peers` in these states (`on`), or back up.
    fn fault(&mut self, victim: u8, peers: &[u8], wire: Wire, udp: Udp, on: bool) {
        for &p in peers {
            let (out, inward) = match wire {
                Wire::Up => (false, false),
                Wire::LinkDown | Wire::Filtered => (true, true),
                Wire::OneWayOut => (true, false),
                Wire::OneWayIn => (false, true),
            };
            if out {
                self.sever(victim, p, Path::Wire, on);
            }
            if inward {
                self.sever(p, victim, Path::Wire, on);
            }
            if udp == Udp::Down {
                self.sever(victim, p, Path::Udp, on);
                self.sever(p, victim, Path::Udp, on);
            }
        }
        if wire == Wire::LinkDown {
            self.input(victim, |m, now, out| m.set_wire_link(!on, now, out));
        }
    }

    /// Buckets accepting new flows in more than one live node.
    fn doubled(&self) -> u32 {
        let live: Vec<&SimNode> = self.nodes.iter().flatten().filter(|x| x.up).collect();
        let accepts = |x: &SimNode, b: Bucket| {
            let me = x.m.config().me;
            x.cores.iter().any(|s| s.1.role(b, me).accepts_new_flows())
        };
        Bucket::all()
            .filter(|&b| live.iter().filter(|x| accepts(x, b)).count() > 1)
            .count() as u32
    }

    /// Buckets accepting new flows per live node (by its cores' snapshots: any core), and the
    /// buckets no live node accepts.
    fn coverage(&self) -> (Vec<(u8, u32)>, u32) {
        let live: Vec<&SimNode> = self.nodes.iter().flatten().filter(|x| x.up).collect();
        let mut counts: Vec<(u8, u32)> = live.iter().map(|x| (x.m.config().me.get(), 0)).collect();
        let mut uncovered = 0;
        for b in Bucket::all() {
            let mut any = false;
            for (x, c) in live.iter().zip(counts.iter_mut()) {
                let me = x.m.config().me;
                if x.cores.iter().any(|s| s.1.role(b, me).accepts_new_flows()) {
                    c.1 += 1;
                    any = true;
                }
            }
            uncovered += u32::from(!any);
        }
        (counts, uncovered)
    }
}

/// The node that cannot serve (by the rule table) while the victim's paths are in these
/// states, if one: `None` also for the cases the table calls partitions (see [`partition_like`]).
fn unable(nodes: u8, victim: u8, wire: Wire, udp: Udp) -> Option<u8> {
    let other = if victim == 1 { 2 } else { 1 };
    match (wire, udp) {
        (Wire::Up, _) => None,
        (Wire::LinkDown, _) => Some(victim),
        // Two nodes that hear each other nowhere on the wire: the higher id fences.
        (Wire::Filtered, Udp::Up) if nodes == 2 => Some(2),
        (Wire::Filtered, Udp::Up) => Some(victim),
        // Two nodes: the one that hears nobody fences.
        (Wire::OneWayOut, Udp::Up) if nodes == 2 => Some(other),
        (Wire::OneWayOut, Udp::Up) => Some(victim),
        (Wire::OneWayIn, Udp::Up) => Some(victim),
        _ => None,
    }
}

/// Both paths cut between the victim and its peers in at least one direction, its link up: a
/// (possibly one-way) partition, which the table gives up (no false claim of safety here).
fn partition_like(wire: Wire, udp: Udp) -> bool {
    udp == Udp::Down && !matches!(wire, Wire::Up | Wire::LinkDown)
}

/// Runs one row of the table: fault at t0, checks, recovery. Returns how long after the
/// fault every bucket had an owner that can serve.
fn row(seed: u64, nodes: u8, victim: u8, wire: Wire, udp: Udp) -> u64 {
    let ids: Vec<u8> = (1..=nodes).collect();
    let peers: Vec<u8> = ids.iter().copied().filter(|&i| i != victim).collect();
    let mut sim = cluster(seed, &ids);
    sim.run_until(3 * SEC);
    sim.assert_converged();
    let cfg = sim.node(1).config().clone();
    // The failover budget: dead_after intervals of silence, the tick that notices, and the
    // heartbeat that says so.
    let budget = cfg.dead_span() + 2 * cfg.interval;
    let t0 = sim.now;
    let what = format!("{nodes} nodes, node {victim}: wire {wire:?}, UDP {udp:?}");
    let cannot = unable(nodes, victim, wire, udp);
    if let Some(u) = cannot {
        sim.unable.push((n(u).index(), t0 + budget));
    }
    if partition_like(wire, udp) {
        sim.partition(&[(victim, 1)]);
        sim.partitioned = false;
        sim.compare_sides = true;
    }
    sim.fault(victim, &peers, wire, udp, true);
    // Step until every bucket is owned by a node that can serve.
    let mut took = None;
    let mut seen = None;
    while sim.now < t0 + 2 * budget {
        // Coverage changes only when some core takes up a snapshot.
        let key: Vec<(bool, [u64; CORES])> = sim
            .nodes
            .iter()
            .flatten()
            .map(|x| (x.up, x.cores.each_ref().map(|c| c.0)))
            .collect();
        if seen.as_ref() == Some(&key) {
            let next = sim.now + 5 * MS;
            sim.run_until(next);
            continue;
        }
        seen = Some(key);
        let (counts, uncovered) = sim.coverage();
        let by_unable = counts
            .iter()
            .filter(|c| Some(c.0) == cannot)
            .map(|c| c.1)
            .sum::<u32>();
        if uncovered == 0 && by_unable == 0 && took.is_none() {
            took = Some(sim.now - t0);
        }
        let next = sim.now + 5 * MS;
        sim.run_until(next);
    }
    let took = took.unwrap_or_else(|| panic!("{what}: never served\n{}", sim.log_tail()));
    if !partition_like(wire, udp) {
        assert!(took <= budget, "{what}: took {} ms", took / MS);
    }
    sim.run_until(t0 + 4 * SEC);
    let (counts, uncovered) = sim.coverage();
    assert_eq!(uncovered, 0, "{what}: {counts:?}");
    if partition_like(wire, udp) {
        // Cut both ways, each side owns everything; one-way, the side that is heard yields.
        let doubled = sim.doubled();
        let both_ways = wire == Wire::Filtered;
        assert_eq!(
            doubled > 0,
            both_ways,
            "{what}: {doubled} doubled, {counts:?}"
        );
    }
    if let Some(u) = cannot {
        assert!(sim.node(u).fenced(), "{what}");
        let serving = counts.iter().filter(|c| c.0 != u);
        for c in serving {
            let share = f64::from(c.1) / BUCKETS as f64;
            let want = 1.0 / f64::from(nodes - 1);
            assert!((share - want).abs() < 0.01, "{what}: {counts:?}");
        }
    }
    let cut_both = udp == Udp::Down && wire != Wire::Up;
    let deaths = sim
        .events
        .iter()
        .any(|(_, _, e)| matches!(e, Event::PeerDead { .. }));
    assert_eq!(
        deaths, cut_both,
        "{what}: a death only if both paths are cut"
    );

    // Paths back: the victim (and whoever fenced) rejoins and takes its share again.
    sim.unable.clear();
    sim.fault(victim, &peers, wire, udp, false);
    let t1 = sim.now;
    // A partition's sides may both own a bucket until the first plan crosses after healing.
    let grace = if partition_like(wire, udp) {
        2 * cfg.interval
    } else {
        0
    };
    sim.heal(grace);
    sim.compare_sides = false;
    sim.run_until(t1 + 8 * SEC);
    let c = sim.assert_converged();
    for &id in &ids {
        assert!(
            (share(&c, id) - 1.0 / f64::from(nodes)).abs() < 0.01,
            "{what}, back: {c:?}"
        );
        assert!(!sim.node(id).fenced(), "{what}, back");
    }
    took
}

const WIRES: [Wire; 5] = [
    Wire::Up,
    Wire::LinkDown,
    Wire::Filtered,
    Wire::OneWayOut,
    Wire::OneWayIn,
];

fn table(nodes: u8, seed: u64) {
    let mut worst = 0;
    let mut seed = seed;
    for victim in 1..=nodes {
        for wire in WIRES {
            for udp in [Udp::Up, Udp::Down] {
                seed += 1;
                let took = row(seed, nodes, victim, wire, udp);
                if !partition_like(wire, udp) {
                    worst = worst.max(took);
                }
            }
        }
    }
    println!(
        "{nodes} nodes: worst time until every bucket is served by a node that can: {:.1} ms",
        worst as f64 / MS as f64
    );
}

#[test]
fn every_path_state_in_a_two_node_cluster() {
    table(2, 500);
}

#[test]
fn every_path_state_in_a_three_node_cluster() {
    table(3, 600);
}

/// A flood of control frames on the wire that the nodes cannot use (forged, malformed) is not
/// a dead wire path: while it lasts, genuine heartbeats lost among it fence nobody. Once it
/// stops, a wire that really carries nothing between the nodes fences as the table says.
#[test]
fn a_flood_of_unusable_control_frames_fences_nobody() {
    let junk = [0x5au8; 60];
    noise_holds_off_the_fence(71, |m, now, out| {
        m.handle_message(Path::Wire, &junk, now, out)
    });
}

/// A receive queue backed up (the runtime notes the wire noise when a packet core counts a
/// full burst) is noise too: heartbeats lost in it fence nobody while it lasts. (From the
/// note on: how promptly a core's full bursts reach it is the runtime's and the core's, which
/// the namespace flood test covers.)
#[test]
fn a_backed_up_receive_queue_fences_nobody() {
    noise_holds_off_the_fence(72, |m, now, _| m.note_wire_noise(now));
}

/// Noise holds off the fence only within `dead_after` intervals of it: noted less often than
/// that (as when a packet core slowed by a flood published its full bursts only every 1024
/// loops), a wire that carries no heartbeat fences between two notes.
#[test]
fn noise_noted_less_often_than_dead_after_intervals_holds_off_nothing() {
    let ids = [1u8, 2];
    let mut sim = cluster(73, &ids);
    sim.run_until(3 * SEC);
    sim.assert_converged();
    let cfg = sim.node(1).config().clone();
    let every = cfg.dead_span() + 2 * cfg.interval;
    sim.fault(2, &[1], Wire::Filtered, Udp::Up, true);
    let end = sim.now + 3 * SEC;
    while sim.now < end {
        for id in ids {
            sim.input(id, |m, now, _| m.note_wire_noise(now));
        }
        let next = sim.now + every;
        sim.run_until(next);
        // Just before the next note: the last is more than `dead_after` intervals old.
        assert!(
            sim.node(2)
                .fence_reasons()
                .contains(FenceReasons::HEARS_NO_PEER_ON_WIRE),
            "noise every {every} ns held off the fence"
        );
        assert_eq!(sim.doubled(), 0);
    }
}

/// Two nodes whose wire carries none of their heartbeats for 3 s while `noise` (called on
/// both every 20 ms) comes: nobody fences and every bucket is served; once the noise stops,
/// the silent wire fences node 2 (the two-node rule).
fn noise_holds_off_the_fence(
    seed: u64,
    mut noise: impl FnMut(&mut Membership, u64, &mut Vec<Output>),
) {
    let ids = [1u8, 2];
    let mut sim = cluster(seed, &ids);
    sim.run_until(3 * SEC);
    sim.assert_converged();
    // Every genuine wire frame between the nodes is lost, and the noise comes on both nodes'
    // wire ports.
    sim.fault(2, &[1], Wire::Filtered, Udp::Up, true);
    let end = sim.now + 3 * SEC;
    while sim.now < end {
        for id in ids {
            sim.input(id, &mut noise);
        }
        let next = sim.now + 20 * MS;
        sim.run_until(next);
        for id in ids {
            assert!(!sim.node(id).fenced(), "node {id} fenced in the noise");
        }
        assert_eq!(sim.doubled(), 0);
    }
    let (counts, uncovered) = sim.coverage();
    assert_eq!(uncovered, 0, "{counts:?}");
    assert!(counts.iter().all(|c| c.1 > 0), "both serve: {counts:?}");
    // The noise stops, the wire stays silent: node 2 fences (the two-node rule).
    let quiet = sim.now;
    sim.run_until(quiet + 2 * SEC);
    assert!(sim.node(2).fenced(), "a silent wire still fences");
    assert!(!sim.node(1).fenced());
}
