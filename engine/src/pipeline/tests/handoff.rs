//! Handoffs through real frames: flows across joins and drains, long flows, reused tuples,
//! adoption skew, failing services, duplicate risk. (The rule itself, case by case without
//! frames: `cluster::handoff`.)

use super::*;

/// A failing node takes no new TCP connection; a node learning a bucket from a failing node
/// does not count that node's refused SYNs as its flows, and takes the retransmission after
/// acquire.
#[test]
fn syns_refused_by_a_failing_owner_go_to_the_new_owner() {
    let from = OwnershipTable::build(1, &[Member::new(1, 100).unwrap()]).unwrap();
    let to = OwnershipTable::build(
        2,
        &[Member::new(1, 100).unwrap(), Member::new(2, 100).unwrap()],
    )
    .unwrap();
    let plan = PlanId {
        epoch: 2,
        proposer: NodeId::new(1).unwrap(),
    };
    let snap = |phase| {
        Arc::new(Snapshot::build(
            plan,
            phase,
            |b| from.owner(b),
            Some(&|b| to.owner(b)),
            to.digest(),
        ))
    };
    let mut a = Pipeline::new(identity(1), SECRET, snap(Phase::Learn), small());
    let mut b = Pipeline::new(identity(2), SECRET, snap(Phase::Learn), small());
    a.set_service(ServiceState {
        refuse_new: true,
        ..ServiceState::default()
    });
    b.set_service(ServiceState {
        refusing_peers: 1,
        ..ServiceState::default()
    });
    // A client port whose bucket moves from node 1 to node 2.
    let port = (30_000..40_000u16)
        .find(|&port| {
            let f = ipv4_frame(Ipv4Addr::new(198, 19, 0, 9), port, &Kind::Tcp(0x02));
            let parsed = parse_l2_l4(&f).unwrap();
            to.owner(b.bucket_of(&parsed)).get() == 2
        })
        .unwrap();
    let syn = ipv4_frame(Ipv4Addr::new(198, 19, 0, 9), port, &Kind::Tcp(0x02));
    let udp = ipv4_frame(Ipv4Addr::new(198, 19, 0, 9), port, &Kind::Udp);
    let mut buf = vec![0u8; 2048];
    let mut send = |p: &mut Pipeline, f: &[u8], now| {
        buf[..f.len()].copy_from_slice(f);
        p.from_wire(&mut FrameBuf::at_start(&mut buf), f.len(), now)
    };
    // Learn: the failing owner drops the SYN, the learner does not record it; UDP still
    // goes to the owner (the health check guards TCP services; node 1 owns every bucket
    // during learn).
    assert_eq!(send(&mut a, &syn, 1), Action::Drop(DropReason::NotOwned));
    assert_eq!(send(&mut b, &syn, 1), Action::Drop(DropReason::NotOwned));
    assert!(b.learned().is_empty());
    assert_eq!(send(&mut a, &udp, 2), Action::Deliver);
    // Acquire: the retransmitted SYN is the new owner's, and only its.
    a.set_snapshot(snap(Phase::Acquire));
    b.set_snapshot(snap(Phase::Acquire));
    assert_ne!(send(&mut a, &syn, 3), Action::Deliver);
    assert_eq!(send(&mut b, &syn, 3), Action::Deliver);
}

/// The data-path side of handoff, flow by flow: TCP and UDP flows start and end across a
/// join (node 3) and a drain (node 2), every phase of each handoff in turn, all nodes
/// following the same snapshots. No flow is ever delivered by two nodes or changes owner
/// mid-flow, and no TCP packet is lost but SYNs sent in the release gap (retransmitted).
#[test]
fn flows_survive_a_join_and_a_drain() {
    const T: u64 = 1_000_000_000; // one phase
    const TICK: u64 = T / 10; // one packet per flow per tick
    let m = |ids: &[u8]| -> OwnershipTable {
        let members: Vec<Member> = ids.iter().map(|&i| Member::new(i, 100).unwrap()).collect();
        OwnershipTable::build(1, &members).unwrap()
    };
    let (before, joined, drained) = (m(&[1, 2]), m(&[1, 2, 3]), m(&[1, 3]));
    let plan = |epoch| PlanId {
        epoch,
        proposer: NodeId::new(1).unwrap(),
    };
    let moving = |from: &OwnershipTable, to: &OwnershipTable, epoch, phase| {
        Arc::new(Snapshot::build(
            plan(epoch),
            phase,
            |b| from.owner(b),
            Some(&|b| to.owner(b)),
            to.digest(),
        ))
    };
    let mut sizes = small();
    sizes.flows = 1 << 14;
    sizes.flow_timeouts = FlowTimeouts {
        tcp_syn: Duration::from_millis(500),
        tcp_established: Duration::from_secs(30),
        tcp_closing: Duration::from_millis(100),
        udp: Duration::from_secs(1), // = the learn phase
        other: Duration::from_secs(1),
    };
    let start = Arc::new(stable_snapshot(&before));
    let mut nodes: Vec<Pipeline> = (1..=3)
        .map(|i| Pipeline::new(identity(i), SECRET, Arc::clone(&start), sizes))
        .collect();

    // Flows: (start tick, packets, tcp, client port).
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let flows: Vec<(u64, u64, bool, u16)> = (0..400)
        .map(|i| {
            (
                next() % 100,
                5 + next() % 30,
                next() % 10 < 7,
                10_000 + i as u16,
            )
        })
        .collect();
    // Per flow: who delivered it, SYN state, packets sent so far.
    let mut owners: Vec<Option<NodeId>> = vec![None; flows.len()];
    let mut synced = vec![false; flows.len()];
    let mut sent = vec![0u64; flows.len()];
    let (mut lost_tcp, mut lost_syn, mut lost_udp) = (0, 0, 0);
    let mut gap_drops = 0;

    // The schedule: the join's phases, done when the releasing nodes hold no flow of the
    // moving buckets, then the drain's.
    let mut stage = 0; // 0 stable, 1..=3 join L/R/A, 4 joined, 5..=7 drain L/R/A, 8 drained
    let mut stage_since = 0u64;
    let mut buf = vec![0u8; 2048];
    for tick in 0..300u64 {
        let now = tick * TICK;
        // Advance the schedule.
        let (from, to, epoch) = if stage < 4 {
            (&before, &joined, 2)
        } else {
            (&joined, &drained, 3)
        };
        let releasing_empty = |nodes: &mut Vec<Pipeline>| {
            nodes.iter_mut().all(|p| {
                let slots = p.flows().slot_count();
                p.maintain(now, slots);
                let snap = Arc::clone(p.snapshot());
                let me = p.identity().node;
                let empty = snap
                    .releasing(me)
                    .all(|b| p.flows().count_in_bucket(b) == 0);
                empty
            })
        };
        let advance = match stage {
            0 | 4 => now >= stage_since + 2 * T,
            1 | 2 | 5 | 6 => now >= stage_since + T,
            3 | 7 => releasing_empty(&mut nodes),
            _ => false,
        };
        if advance {
            stage += 1;
            stage_since = now;
            let snap = match stage {
                1 | 5 => moving(from, to, epoch, Phase::Learn),
                2 | 6 => moving(from, to, epoch, Phase::Release),
                3 | 7 => moving(from, to, epoch, Phase::Acquire),
                4 => Arc::new(stable_snapshot(&joined)),
                _ => Arc::new(stable_snapshot(&drained)),
            };
            for p in nodes.iter_mut() {
                p.set_snapshot(Arc::clone(&snap));
            }
        }
        // One packet of every live flow.
        for (f, &(first, packets, tcp, port)) in flows.iter().enumerate() {
            if tick < first || sent[f] >= packets {
                continue;
            }
            let flags = if !tcp {
                0
            } else if !synced[f] {
                0x02
            } else if sent[f] + 1 == packets {
                0x11
            } else {
                0x10
            };
            let src = Ipv4Addr::new(198, 19, (f / 200) as u8, (f % 200) as u8);
            let frame = if tcp {
                ipv4_frame(src, port, &Kind::Tcp(flags))
            } else {
                ipv4_frame(src, port, &Kind::Udp)
            };
            let mut by = Vec::new();
            for p in nodes.iter_mut() {
                buf[..frame.len()].copy_from_slice(&frame);
                match p.from_wire(&mut FrameBuf::at_start(&mut buf), frame.len(), now) {
                    Action::Deliver => by.push(p.identity().node),
                    Action::Drop(DropReason::ReleaseGap) => gap_drops += 1,
                    _ => {}
                }
            }
            assert!(
                by.len() <= 1,
                "flow {f} packet delivered by {by:?} (stage {stage})"
            );
            match by.first() {
                Some(&n) => {
                    let owner = owners[f].get_or_insert(n);
                    assert_eq!(
                        *owner, n,
                        "flow {f} switched owner mid-flow (stage {stage})"
                    );
                    if tcp && !synced[f] {
                        synced[f] = true;
                    }
                    sent[f] += 1;
                }
                None if tcp && !synced[f] => lost_syn += 1, // retransmitted next tick
                None if tcp => {
                    lost_tcp += 1;
                    sent[f] += 1;
                }
                None => {
                    lost_udp += 1;
                    sent[f] += 1;
                }
            }
        }
    }
    assert_eq!(stage, 8, "both handoffs completed");
    assert_eq!(lost_tcp, 0, "TCP packets of established flows lost");
    assert!(owners.iter().filter(|o| o.is_some()).count() > 350);
    // Node 3 took flows after joining; node 2 none after draining.
    assert!(owners.iter().any(|o| *o == NodeId::new(3)));
    // Every packet nobody took was counted as a release-gap drop by each node.
    assert_eq!(gap_drops, lost_syn + lost_udp, "release-gap drops");
    eprintln!("handoff sim: {lost_syn} SYNs retransmitted, {lost_udp} UDP packets in release gaps");
}

/// Two pipelines under one plan moving buckets from the `from` members to the `to`
/// members, fed the same frames; for the handoff tests below.
struct Handoff {
    from: OwnershipTable,
    to: OwnershipTable,
    nodes: Vec<Pipeline>,
    buf: Vec<u8>,
}

impl Handoff {
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);

    fn new(from: &[u8], to: &[u8]) -> Handoff {
        let m = |ids: &[u8]| -> OwnershipTable {
            let members: Vec<Member> = ids.iter().map(|&i| Member::new(i, 100).unwrap()).collect();
            OwnershipTable::build(1, &members).unwrap()
        };
        let (from, to) = (m(from), m(to));
        let start = Arc::new(stable_snapshot(&from));
        let nodes = (1..=2)
            .map(|i| Pipeline::new(identity(i), SECRET, Arc::clone(&start), small()))
            .collect();
        Handoff {
            from,
            to,
            nodes,
            buf: vec![0u8; 2048],
        }
    }

    fn snapshot(&self, phase: Phase) -> Arc<Snapshot> {
        let plan = PlanId {
            epoch: 2,
            proposer: NodeId::new(1).unwrap(),
        };
        Arc::new(Snapshot::build(
            plan,
            phase,
            |b| self.from.owner(b),
            Some(&|b| self.to.owner(b)),
            self.to.digest(),
        ))
    }

    /// Puts node `i` (1-based) in `phase`.
    fn set(&mut self, i: usize, phase: Phase) {
        let snap = self.snapshot(phase);
        self.nodes[i - 1].set_snapshot(snap);
    }

    fn set_all(&mut self, phase: Phase) {
        for i in 1..=self.nodes.len() {
            self.set(i, phase);
        }
    }

    /// `n` client ports whose buckets move from node `a` to node `b`.
    fn moving_ports(&self, a: u8, b: u8, n: usize) -> Vec<u16> {
        (20_000u16..30_000)
            .filter(|&port| {
                let f = ipv4_frame(Self::CLIENT, port, &Kind::Tcp(0x02));
                let bucket = self.nodes[0].bucket_of(&parse_l2_l4(&f).unwrap());
                Some(self.from.owner(bucket)) == NodeId::new(a)
                    && Some(self.to.owner(bucket)) == NodeId::new(b)
            })
            .take(n)
            .collect()
    }

    /// One TCP packet from the client's `port`; the nodes that delivered it.
    fn send(&mut self, port: u16, flags: u8, now: u64) -> Vec<u8> {
        self.deliver(&ipv4_frame(Self::CLIENT, port, &Kind::Tcp(flags)), now)
    }

    /// One UDP datagram from the client's `port`; the nodes that delivered it.
    fn send_udp(&mut self, port: u16, now: u64) -> Vec<u8> {
        self.deliver(&ipv4_frame(Self::CLIENT, port, &Kind::Udp), now)
    }

    /// The nodes that delivered frame `f`, offered to each.
    fn deliver(&mut self, f: &[u8], now: u64) -> Vec<u8> {
        let buf = &mut self.buf;
        self.nodes
            .iter_mut()
            .filter_map(|p| {
                buf[..f.len()].copy_from_slice(f);
                matches!(
                    p.from_wire(&mut FrameBuf::at_start(buf), f.len(), now),
                    Action::Deliver
                )
                .then(|| p.identity().node.get())
            })
            .collect()
    }

    /// A whole short connection (SYN, ACK, data, FIN, ACK): who delivered each packet.
    fn connection(&mut self, port: u16, t: u64) -> Vec<Vec<u8>> {
        [0x02, 0x10, 0x18, 0x11, 0x10]
            .iter()
            .enumerate()
            .map(|(i, &f)| self.send(port, f, t + i as u64))
            .collect()
    }
}

/// DESIGN.md, "Long-lived flows": a join's plan reaches Done (its release deadline
/// passed) while a connection of the old owner lives on. The old owner keeps serving it,
/// the new owner keeps leaving it alone, and new connections in the bucket are the new
/// owner's; once it ends, its reused 4-tuple is a new flow. If the old owner dies, the new
/// owner forgets what it learned and takes the flow's packets (its kernel answers RST).
#[test]
fn a_long_flow_outlives_its_handoff_until_it_ends_or_its_node_dies() {
    let mut h = Handoff::new(&[1], &[1, 2]);
    let ports = h.moving_ports(1, 2, 3);
    let (long, other, orphan) = (ports[0], ports[1], ports[2]);
    for port in [long, orphan] {
        assert_eq!(h.send(port, 0x02, 1), vec![1]);
        assert_eq!(h.send(port, 0x10, 2), vec![1]);
    }
    let mut t = 10;
    for phase in [Phase::Learn, Phase::Release, Phase::Acquire] {
        h.set_all(phase);
        for port in [long, orphan] {
            assert_eq!(h.send(port, 0x18, t), vec![1], "{phase:?}");
        }
        t += 1;
    }
    let done = Arc::new(stable_snapshot(&h.to));
    for p in h.nodes.iter_mut() {
        p.set_snapshot(Arc::clone(&done));
    }
    for _ in 0..5 {
        for port in [long, orphan] {
            assert_eq!(h.send(port, 0x18, t), vec![1], "after the plan");
        }
        t += 1;
    }
    assert_eq!(
        h.send(other, 0x02, t),
        vec![2],
        "a new connection is the new owner's"
    );
    // The long connection ends; its 4-tuple starts again: a new flow, the owner's.
    assert_eq!(h.send(long, 0x11, t + 1), vec![1]);
    assert_eq!(h.send(long, 0x02, t + 2), vec![2]);
    assert_eq!(h.send(long, 0x10, t + 3), vec![2]);
    // Node 1 dies: node 2, which finds it dead, takes what node 1 still served.
    let alone = OwnershipTable::build(3, &[Member::new(2, 100).unwrap()]).unwrap();
    h.nodes[1].set_snapshot(Arc::new(stable_snapshot(&alone).with_dead(0b01)));
    let mut f = ipv4_frame(Handoff::CLIENT, orphan, &Kind::Tcp(0x18));
    let len = f.len();
    f.resize(2048, 0);
    assert_eq!(
        h.nodes[1].from_wire(&mut FrameBuf::at_start(&mut f), len, t + 4),
        Action::Deliver
    );
}

/// DESIGN.md, "Liveness": a node fenced for its own data path (no link, a stalled core) takes
/// nothing, and its peers take its buckets as owners and deliver every packet of its flows.
/// Until it owns buckets again its snapshot cuts its own flows: each is forgotten when its
/// packet comes (the stand-in delivers it), where it had delivered it too, for as long as the
/// flow lived, even after it rejoined; a flow that stays quiet meanwhile stays its own, for
/// its return. A node fenced over what the wire carries (its snapshot cuts nothing: that fence
/// can be short) keeps them all.
#[test]
fn a_node_fenced_for_its_data_path_leaves_its_flows_to_its_stand_in() {
    for outage in [true, false] {
        let mut h = Handoff::new(&[1, 2], &[1, 2]);
        let port = h.moving_ports(1, 1, 1)[0];
        assert_eq!(h.send(port, 0x02, 1), vec![1]);
        assert_eq!(h.send(port, 0x10, 2), vec![1]);
        // A UDP flow of node 1's (its bucket is not the TCP port's: the protocol is in the
        // key), quiet through the fence.
        assert!((20_000u16..30_000).any(|p| h.send_udp(p, 2) == vec![1]));
        assert_eq!(h.nodes[0].flows().len(), 2);
        // Node 1 fences: its snapshot has itself dead and owning nothing; node 2 finds it dead
        // and owns everything.
        let me = NodeId::new(1).unwrap();
        let fenced = stable_snapshot(&h.from).with_dead(0b01).without(me);
        let cut = if outage { 0b01 } else { 0 };
        let fenced = fenced.with_obligations(None, Vec::new(), cut);
        h.nodes[0].set_snapshot(Arc::new(fenced));
        let alone = OwnershipTable::build(3, &[Member::new(2, 100).unwrap()]).unwrap();
        h.nodes[1].set_snapshot(Arc::new(stable_snapshot(&alone).with_dead(0b01)));
        if outage {
            assert_eq!(h.send(port, 0x18, 3), vec![2], "the stand-in alone");
            assert_eq!(h.send(port, 0x18, 4), vec![2], "the stand-in alone");
            // The TCP flow forgotten when seen, the quiet UDP flow kept.
            assert_eq!(h.nodes[0].flows().len(), 1, "the quiet flow stays its own");
        } else {
            assert_eq!(
                h.send(port, 0x18, 3),
                vec![1, 2],
                "as before: kept for its return"
            );
            assert_eq!(h.nodes[0].flows().len(), 2);
        }
    }
}

/// Clients reuse a source port soon after a connection closed. During a handoff the old
/// owner still holds the ended connection in its table (and the new owner may have learned
/// it): the SYN on the reused 4-tuple is a new flow, taken by the new owner alone, and no
/// later packet of it reaches the old owner.
#[test]
fn a_reused_tuple_is_a_new_flow_during_a_handoff() {
    let mut h = Handoff::new(&[1], &[1, 2]);
    // Two client ports whose buckets move from node 1 to node 2 in the join.
    let ports = h.moving_ports(1, 2, 2);
    // Port 0's connection ends before the plan; port 1's while node 2 learns.
    assert!(h.connection(ports[0], 10).iter().all(|by| by == &vec![1]));
    h.set_all(Phase::Learn);
    assert!(h.connection(ports[1], 100).iter().all(|by| by == &vec![1]));
    h.set_all(Phase::Acquire);
    // Both ports are reused: each new connection is node 2's alone, packet by packet.
    for port in ports {
        let by = h.connection(port, 1_000);
        assert!(by.iter().all(|b| b == &vec![2]), "port {port}: {by:?}");
    }
}

/// Nodes adopt a plan's phase one after the other. The old owner may release a bucket (and
/// refuse a SYN) while the new owner still learns (and records that SYN as the old owner's
/// flow); the retransmitted SYN after acquire must then be taken by the new owner, once.
/// A SYN the old owner accepted, followed by the client's ACK, stays the old owner's.
#[test]
fn a_syn_refused_in_the_adoption_skew_is_taken_after_acquire() {
    let mut h = Handoff::new(&[1, 2], &[1]);
    // Two client ports whose buckets move from node 2 to node 1.
    let moving = h.moving_ports(2, 1, 2);
    let (refused, accepted) = (moving[0], moving[1]);
    // Learn everywhere: node 2 accepts a connection and node 1 learns it with its ACK.
    h.set_all(Phase::Learn);
    assert_eq!(h.send(accepted, 0x02, 10), vec![2]);
    assert_eq!(h.send(accepted, 0x10, 20), vec![2]);
    // Node 2 has released; node 1 has not adopted Release yet and still learns.
    h.set(2, Phase::Release);
    assert!(h.send(refused, 0x02, 30).is_empty(), "the gap");
    // Acquire everywhere: the retransmitted SYN is node 1's, the other flow stays node 2's.
    h.set_all(Phase::Acquire);
    assert_eq!(h.send(refused, 0x02, 1_000_000_030), vec![1]);
    assert_eq!(h.send(refused, 0x10, 1_000_000_040), vec![1]);
    assert_eq!(h.send(accepted, 0x02, 1_000_000_050), vec![2]);
    assert_eq!(h.send(accepted, 0x10, 1_000_000_060), vec![2]);
    // Retaking the learned SYN is the handoff's one duplicate risk here (had node 2's
    // SYN-ACK been lost, both would hold the connection), counted once.
    let risk: Vec<u64> = h.nodes.iter().map(Pipeline::duplicate_risk).collect();
    assert_eq!(risk, vec![1, 0]);
}

/// While acquiring, an unknown UDP flow is taken as new although the old owner may still
/// serve it (idle through the learn phase): counted as duplicate risk. A new TCP
/// connection (a SYN) and a known UDP flow are not.
#[test]
fn unlearned_udp_taken_while_acquiring_is_duplicate_risk() {
    let mut h = Handoff::new(&[1], &[1, 2]);
    let ports = h.moving_ports(1, 2, 3);
    h.set_all(Phase::Learn);
    // Port 0's UDP flow is active while node 2 learns: it stays node 1's, no risk.
    assert_eq!(h.send_udp(ports[0], 10), vec![1]);
    h.set_all(Phase::Acquire);
    assert_eq!(h.send_udp(ports[0], 20), vec![1]);
    // A connection that starts now is node 2's, no risk.
    assert_eq!(h.send(ports[1], 0x02, 30), vec![2]);
    // Port 2's UDP flow was not seen while node 2 learned: node 2 takes it, at a risk.
    assert_eq!(h.send_udp(ports[2], 40), vec![2]);
    let risk: Vec<u64> = h.nodes.iter().map(Pipeline::duplicate_risk).collect();
    assert_eq!(risk, vec![0, 1]);
}

/// A node found dead elsewhere (not the old owner of these buckets): what node 2 learned from
/// node 1, which lives on and serves it, stays learned (forgotten, node 2 took node 1's UDP
/// flow as unknown and delivered it too, for as long as it lived). Node 1 found dead: its
/// flows are forgotten.
#[test]
fn a_death_elsewhere_keeps_what_was_learned_from_a_live_owner() {
    let mut h = Handoff::new(&[1], &[1, 2]);
    // A UDP flow whose bucket moves from node 1 to node 2 (the protocol is in the key).
    let port = (20_000u16..30_000)
        .find(|&port| {
            let f = ipv4_frame(Handoff::CLIENT, port, &Kind::Udp);
            let bucket = h.nodes[0].bucket_of(&parse_l2_l4(&f).unwrap());
            h.from.owner(bucket).get() == 1 && h.to.owner(bucket).get() == 2
        })
        .unwrap();
    let ports = [port];
    h.set_all(Phase::Learn);
    assert_eq!(h.send_udp(ports[0], 10), vec![1]);
    h.set_all(Phase::Acquire);
    let learned = h.nodes[1].learned().len();
    assert!(learned > 0);
    // Node 3, in no handoff here, is found dead.
    let acquire = h.snapshot(Phase::Acquire);
    h.nodes[1].set_snapshot(Arc::new((*acquire).clone().with_dead(0b100)));
    assert_eq!(h.nodes[1].learned().len(), learned);
    assert_eq!(h.send_udp(ports[0], 20), vec![1], "node 1's alone");
    assert_eq!(h.nodes[1].duplicate_risk(), 0);
    // Node 1 found dead: what was learned as its is forgotten.
    h.nodes[1].set_snapshot(Arc::new((*acquire).clone().with_dead(0b101)));
    assert!(h.nodes[1].learned().is_empty());
}

/// After a plan completed with a connection still open on the old owner (node 1): the owner of
/// the owed bucket (node 2) takes new connections there but leaves a packet of a connection it
/// does not know alone (as plain owner, its kernel would answer with RST); the old owner keeps
/// serving its connection until its drain's deadline cuts it, and then forgets it.
#[test]
fn an_owed_bucket_is_acquired_not_owned_and_a_cut_drain_serves_no_old_flow() {
    let n = |i| NodeId::new(i).unwrap();
    let from = OwnershipTable::build(1, &[Member::new(1, 100).unwrap()]).unwrap();
    let to = OwnershipTable::build(
        2,
        &[Member::new(1, 100).unwrap(), Member::new(2, 100).unwrap()],
    )
    .unwrap();
    let plan = PlanId {
        epoch: 2,
        proposer: n(1),
    };
    // Done: the moved buckets owed to node 1 (and, `cut`, node 1's drain past its deadline).
    let done = |owed: bool, cut: u64| {
        let s = Snapshot::build(plan, Phase::Done, |b| to.owner(b), None, to.digest());
        let mut a: Box<[u8; crate::cluster::BUCKETS]> = vec![0u8; crate::cluster::BUCKETS]
            .into_boxed_slice()
            .try_into()
            .unwrap();
        for b in Bucket::all() {
            if owed && to.owner(b) != from.owner(b) {
                a[b.index()] = 1;
            }
        }
        Arc::new(s.with_obligations(owed.then_some(a), Vec::new(), cut))
    };
    let mut a = Pipeline::new(
        identity(1),
        SECRET,
        Arc::new(stable_snapshot(&from)),
        small(),
    );
    let mut b = Pipeline::new(identity(2), SECRET, done(true, 0), small());
    let client = Ipv4Addr::new(198, 19, 0, 9);
    let port = (30_000..40_000u16)
        .find(|&port| {
            let f = ipv4_frame(client, port, &Kind::Tcp(0x02));
            to.owner(b.bucket_of(&parse_l2_l4(&f).unwrap())).get() == 2
        })
        .unwrap();
    let syn = ipv4_frame(client, port, &Kind::Tcp(0x02));
    let ack = ipv4_frame(client, port, &Kind::Tcp(0x10));
    let new_syn = ipv4_frame(client, port + 1, &Kind::Tcp(0x02));
    let mut buf = vec![0u8; 2048];
    let mut send = |p: &mut Pipeline, f: &[u8], now| {
        buf[..f.len()].copy_from_slice(f);
        p.from_wire(&mut FrameBuf::at_start(&mut buf), f.len(), now)
    };
    // Node 1 served the connection before the bucket moved.
    assert_eq!(send(&mut a, &syn, 1), Action::Deliver);
    assert_eq!(send(&mut a, &ack, 2), Action::Deliver);
    a.set_snapshot(done(true, 0));
    let bucket = b.bucket_of(&parse_l2_l4(&ack).unwrap());
    assert_eq!(
        b.snapshot().role(bucket, n(2)),
        Role::Acquiring { from: n(1) }
    );
    // Node 1 still serves it, node 2 leaves it alone, and takes a new connection.
    assert_eq!(send(&mut a, &ack, 3), Action::Deliver);
    assert_eq!(send(&mut b, &ack, 3), Action::Drop(DropReason::NotOwned));
    if to.owner(b.bucket_of(&parse_l2_l4(&new_syn).unwrap())).get() == 2 {
        assert_eq!(send(&mut b, &new_syn, 3), Action::Deliver);
    }
    // Without the obligation, node 2 would hand the packet to its kernel (an RST).
    b.set_snapshot(done(false, 0));
    assert_eq!(send(&mut b, &ack, 4), Action::Deliver);
    // Node 1's drain reaches its deadline: it serves the connection no more, and forgets it.
    a.set_snapshot(done(false, 1));
    assert_eq!(send(&mut a, &ack, 5), Action::Drop(DropReason::NotOwned));
    assert_eq!(a.flows().count_in_bucket(bucket), 0);
}
