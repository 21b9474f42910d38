//! Long-lived flows in the simulator (DESIGN.md, "Long-lived flows"): plans complete while a
//! connection of a bucket they moved lives on with its old owner, later plans proceed and keep
//! the obligation, and only a drain's deadline ends such a connection.
//!
//! The flow model (`Sim::flow_linger`): a node that releases buckets in a plan keeps one flow in
//! the first of them for `flow_linger` after the release began.

use super::*;

/// The bucket node `id` still holds flows in (it released it, its flow lives on).
fn held_bucket(sim: &Sim, id: u8) -> Option<Bucket> {
    let snap = sim.node(id).snapshot().clone();
    let me = n(id);
    let b = snap.counted(me).find(|&b| snap.final_owner(b) != Some(me));
    b
}

/// The node that owns `b` once settled, as node `id` sees it, and its role there in its own
/// snapshot.
fn owner_role(sim: &Sim, b: Bucket) -> (u8, Role) {
    let owner = sim.node(1).snapshot().final_owner(b).unwrap();
    let role = sim.node(owner.get()).snapshot().role(b, owner);
    (owner.get(), role)
}

fn done_plans(sim: &Sim, id: u8) -> usize {
    sim.events_of(id)
        .filter(|e| {
            matches!(
                e,
                Event::PhaseChanged {
                    phase: Phase::Done,
                    ..
                }
            )
        })
        .count()
}

#[test]
fn a_join_completes_while_a_long_flow_lives_and_the_next_plan_proceeds() {
    let mut sim = cluster(31, &[1, 2]);
    sim.flow_linger = 60 * SEC;
    let t0 = sim.now;
    sim.add(3);
    // Learn 1 s, then the release deadline (5 s): the plan completes with the flows left.
    sim.run_until(t0 + 10 * SEC);
    sim.assert_converged();
    let b = held_bucket(&sim, 1).expect("node 1 still serves its flow in a bucket it released");
    assert!(sim.node(1).held_buckets() >= 1 && sim.node(1).released_flows() >= 1);
    assert!(!sim.node(1).snapshot().cuts(n(1)));
    // Its new owner takes new flows there, and leaves every flow it does not know to node 1.
    let (owner, role) = owner_role(&sim, b);
    assert_eq!(role, Role::Acquiring { from: n(1) }, "owner {owner}");
    assert_eq!(sim.node(owner).snapshot().new_flow_owner(b), Some(n(owner)));
    // The status names what node 1 still serves, on node 1 and on its peers.
    let st = sim.node(1).status(&Timeline::default());
    assert_eq!(st.node(1).unwrap().held_flows, Some(1));
    let st = sim.node(3).status(&Timeline::default());
    assert!(st.node(1).unwrap().held_buckets.is_some_and(|b| b >= 1));

    // The next plan (another join) proceeds and completes; the flow still lives on node 1.
    // Every bucket the plan moved away from node 1 is owed to it. At every instant, no node
    // plays `Owner` for a bucket it sees owed to node 1 (its kernel would answer node 1's flows
    // with RST), whether the next plan moves that bucket again or not.
    let owed: Vec<Bucket> = Bucket::all()
        .filter(|&b| sim.node(2).snapshot().owed_to(b) == Some(n(1)))
        .collect();
    assert!(owed.contains(&b));
    let before = done_plans(&sim, 1);
    sim.add(4);
    let owners: Vec<_> = owed
        .iter()
        .map(|&o| sim.node(2).snapshot().final_owner(o))
        .collect();
    while sim.now < t0 + 25 * SEC {
        let t = sim.now + 50 * MS;
        sim.run_until(t);
        for id in 2..=4 {
            let snap = sim.node(id).snapshot().clone();
            for &o in owed.iter().filter(|&&o| snap.owed_to(o) == Some(n(1))) {
                assert_ne!(
                    snap.role(o, n(id)),
                    Role::Owner,
                    "node {id}, bucket {} owed to node 1, at {} ms",
                    o.0,
                    (sim.now - t0) / MS
                );
            }
        }
    }
    // The check meant something: the next plan moved owed buckets again.
    let moved_again = owed
        .iter()
        .zip(&owners)
        .filter(|(&o, &was)| sim.node(2).snapshot().final_owner(o) != was)
        .count();
    assert!(moved_again > 0);
    sim.assert_converged();
    assert!(
        done_plans(&sim, 1) > before,
        "the next plan never completed"
    );
    assert_eq!(held_bucket(&sim, 1), Some(b), "the flow was cut");
    let (owner, role) = owner_role(&sim, b);
    if owner != 1 {
        assert_eq!(role, Role::Acquiring { from: n(1) }, "owner {owner}");
    }

    // Once the flows have ended (the second plan started one of its own), the bucket is its
    // owner's outright.
    sim.run_until(t0 + 90 * SEC);
    assert_eq!(held_bucket(&sim, 1), None);
    assert_eq!(sim.node(1).held_buckets(), 0);
    let (_, role) = owner_role(&sim, b);
    assert_eq!(role, Role::Owner);
    assert!((1..=4).all(|id| sim.node(id).owed_buckets() == 0));
}

/// A long flow's bucket moves away (a join) and, while the flow lives, back (the joined node
/// drains): at no instant does a node other than the flow's own play `Owner` for that bucket
/// (its kernel would answer the flow with RST), and the flow's node serves it throughout.
#[test]
fn a_bucket_that_moves_back_to_the_node_serving_its_long_flow_never_gets_another_owner() {
    let mut sim = cluster(34, &[1, 2]);
    sim.flow_linger = 60 * SEC;
    let t0 = sim.now;
    sim.add(3);
    sim.run_until(t0 + 10 * SEC);
    sim.assert_converged();
    let b = held_bucket(&sim, 1).expect("node 1 still serves its flow in a bucket it released");
    assert_eq!(sim.node(1).snapshot().final_owner(b), Some(n(3)));
    // Node 3 drains: its buckets go back to the nodes that had them, b to node 1.
    sim.input(3, |m, now, out| m.drain(now, out));
    let mut back = false;
    while sim.now < t0 + 30 * SEC {
        let t = sim.now + 20 * MS;
        sim.run_until(t);
        for id in 2..=3 {
            let role = sim.node(id).snapshot().role(b, n(id));
            assert_ne!(
                role,
                Role::Owner,
                "node {id} owns node 1's flow's bucket at {} ms",
                (sim.now - t0) / MS
            );
        }
        back |= sim.node(1).snapshot().final_owner(b) == Some(n(1));
    }
    assert!(back, "the drain never moved the bucket back to node 1");
    sim.assert_converged();
    // Node 1 owns it again (acquiring from node 3 if node 3's own flow lives on there).
    assert_eq!(owner_role(&sim, b).0, 1);
}

#[test]
fn a_drain_with_a_deadline_cuts_at_the_deadline() {
    let mut sim = cluster(32, &[1, 2, 3]);
    sim.flow_linger = 60 * SEC;
    let t0 = sim.now;
    sim.input(2, |m, now, out| {
        m.drain_until(Some(now + 15 * SEC), now, out)
    });
    sim.run_until(t0 + 14 * SEC);
    // The plan is done, node 2 owns nothing but still serves its flow: not drained.
    sim.assert_converged();
    assert!(sim.node(2).held_buckets() >= 1);
    assert!(!sim.node(2).is_drained() && !sim.node(2).cut());
    assert!(!sim.events_of(2).any(|e| *e == Event::DrainCut));
    let b = held_bucket(&sim, 2).unwrap();
    assert_eq!(owner_role(&sim, b).1, Role::Acquiring { from: n(2) });
    // At the deadline it cuts: it serves none of those flows, it is drained, and the others
    // forget what they learned of them and own the bucket outright.
    sim.run_until(t0 + 15 * SEC + 500 * MS);
    assert!(sim.node(2).cut() && sim.node(2).is_drained());
    assert!(sim.events_of(2).any(|e| *e == Event::DrainCut));
    assert!(sim.node(2).snapshot().cuts(n(2)));
    assert_eq!(sim.node(2).held_buckets(), 0);
    let (owner, role) = owner_role(&sim, b);
    assert_eq!(role, Role::Owner);
    assert!(sim.node(owner).snapshot().cut() & (1 << 1) != 0);
    // Undrained, it takes its share again and serves what it takes.
    sim.input(2, |m, now, out| m.undrain(now, out));
    sim.run_until(t0 + 25 * SEC);
    let c = sim.assert_converged();
    assert!((share(&c, 2) - 1.0 / 3.0).abs() < 0.01, "{c:?}");
    assert!(!sim.node(2).snapshot().cuts(n(2)));
}

#[test]
fn a_drain_without_a_deadline_waits_for_the_last_flow() {
    let mut sim = cluster(33, &[1, 2, 3]);
    sim.flow_linger = 30 * SEC;
    let t0 = sim.now;
    sim.input_node(2, |node, now, out| {
        node.request(
            &crate::control::operator::Request::Drain {
                node: None,
                drain: true,
                deadline: Some(crate::control::operator::DrainDeadline::Wait),
            },
            &Timeline::default(),
            now,
            out,
        );
    });
    sim.run_until(t0 + 25 * SEC);
    sim.assert_converged();
    assert_eq!(sim.node(2).snapshot().accepting_count(n(2)), 0);
    assert!(!sim.node(2).is_drained() && !sim.node(2).cut());
    let st = sim.node(1).status(&Timeline::default());
    assert_eq!(
        st.node(2).map(|s| s.state),
        Some(crate::control::operator::NodeState::Draining)
    );
    sim.run_until(t0 + 35 * SEC);
    assert!(sim.node(2).is_drained() && !sim.node(2).cut());
    assert!(sim.events_of(2).any(|e| *e == Event::Drained));
    let st = sim.node(1).status(&Timeline::default());
    assert_eq!(
        st.node(2).map(|s| s.state),
        Some(crate::control::operator::NodeState::Drained)
    );
}
