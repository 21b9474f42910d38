//! Appliance mode's agreed backend table, simulated: every node reports what its checks see,
//! the coordinator's table reaches every node within a heartbeat or two, a node whose checks
//! have not settled counts for nothing, and the table survives the coordinator's death. An
//! operator's backend drain holds on every node until it is undrained through any of them,
//! whichever node stops or restarts meanwhile.

use super::*;
use crate::appliance::health::{BackendTable, Report};
use crate::appliance::Services;
use crate::control::operator::{BackendReply, Reply};

const SERVICES: u64 = 0x5e7;

fn appliance(id: u8) -> Config {
    let mut c = config(id, 1);
    c.services_digest = SERVICES;
    c
}

fn report(down: &[u16]) -> Option<Report> {
    Some(Report {
        down: down.iter().copied().collect(),
        drained: Default::default(),
    })
}

/// The services of these tests' nodes: `web`, backends b1 to b3 at places 1 to 3.
fn web() -> Services {
    let text = crate::config::tests::LAB.replace(
        "  mac: 02:00:00:00:00:01\n",
        "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
    ) + "services:\n  - name: web\n    addresses: [198.18.0.100]\n    ports: [80]\n    \
         delivery: dsr\n    backends:\n"
        + &(1..=3)
            .map(|i| {
                format!("      - {{ name: b{i}, ip: 198.18.0.2{i}, mac: 02:bb:00:00:00:0{i} }}\n")
            })
            .collect::<String>();
    let c = crate::config::Config::parse(&text, "t.yaml").unwrap();
    c.validate("t.yaml").unwrap();
    Services::compile(&c, SECRET, None)
}

impl Sim {
    fn backend_report(&mut self, id: u8, r: Option<Report>) {
        self.input_node(id, |node, _, _| node.set_backend_report(r));
    }

    /// `drain-backend NAME` (or `undrain-backend`) through node `id`'s operator.
    fn drain_backend(&mut self, id: u8, name: &str, drain: bool) -> BackendReply {
        let mut reply = None;
        let services = web();
        self.input_node(id, |node, _, out| {
            reply = Some(node.drain_backend(name, drain, &services, out))
        });
        match reply {
            Some(Reply::DrainBackend(r)) => r,
            other => panic!("not a drain-backend reply: {other:?}"),
        }
    }

    fn drained_everywhere(&self, ids: &[u8]) -> Vec<Option<std::collections::BTreeSet<u16>>> {
        ids.iter()
            .map(|&id| self.table(id).map(|t| t.drained))
            .collect()
    }

    fn table(&self, id: u8) -> Option<BackendTable> {
        self.nodes[n(id).index()].as_ref().unwrap().backends.clone()
    }
}

/// Three appliances whose checks have settled with every backend up, two seconds on.
fn three_settled(seed: u64) -> Sim {
    let mut sim = Sim::new(seed);
    for id in 1..=3 {
        sim.start(appliance(id));
        sim.backend_report(id, report(&[]));
    }
    sim.run_until(2 * SEC);
    sim
}

#[test]
fn every_node_applies_the_same_agreed_backend_table() {
    let mut sim = three_settled(31);
    // Backend 7 fails on two of three nodes' checks, backend 8 on one only.
    sim.backend_report(2, report(&[7]));
    sim.backend_report(3, report(&[7, 8]));
    let changed = sim.now;
    sim.run_until(changed + 300 * MS);
    let t = sim.table(1).expect("a table");
    assert_eq!(
        t.down,
        [7].into_iter().collect(),
        "2 of 3 for 7, 1 of 3 for 8"
    );
    for id in 2..=3 {
        assert_eq!(
            sim.table(id),
            Some(t.clone()),
            "node {id} applies the coordinator's table"
        );
    }
    // The coordinator dies: the next one goes on from its epoch, and 8 now has 1 of 2.
    sim.stop(1);
    sim.run_until(sim.now + 2 * SEC);
    let next = sim.table(2).expect("a table");
    assert!(next.epoch > t.epoch, "{} after {}", next.epoch, t.epoch);
    assert_eq!(next.down, [7, 8].into_iter().collect());
    assert_eq!(sim.table(3), Some(next));
}

#[test]
fn a_node_whose_checks_have_not_settled_counts_for_nothing() {
    let mut sim = Sim::new(32);
    sim.start(appliance(1));
    sim.backend_report(1, report(&[]));
    sim.start(appliance(2));
    // Node 2 just started: every backend is down in its checks, but it has not settled.
    sim.backend_report(2, None);
    sim.run_until(2 * SEC);
    assert!(
        sim.table(1).is_none_or(|t| t.down.is_empty()),
        "an unsettled node takes no backend down"
    );
    sim.backend_report(2, report(&[3]));
    sim.run_until(sim.now + 300 * MS);
    assert_eq!(
        sim.table(2).map(|t| t.down),
        Some([3].into_iter().collect())
    );
}

#[test]
fn a_node_with_other_services_is_not_counted() {
    let mut sim = Sim::new(33);
    sim.start(appliance(1));
    sim.backend_report(1, report(&[]));
    let mut other = appliance(2);
    other.services_digest = SERVICES + 1;
    sim.start(other);
    sim.backend_report(2, report(&[1, 2, 3]));
    sim.run_until(2 * SEC);
    assert!(sim.table(1).is_none_or(|t| t.down.is_empty()));
    assert_eq!(sim.node(1).backends().mismatched(), 0b10);
    // Node 2 reloads node 1's services: counted again, and its verdicts take backends down.
    sim.input_node(2, |node, now, out| {
        let keys = vec!["services".to_owned()];
        assert!(matches!(
            node.reload(keys, None, Some(SERVICES), now, out),
            crate::control::operator::Reply::Reload(_)
        ));
    });
    sim.backend_report(2, report(&[1, 2, 3]));
    sim.run_until(4 * SEC);
    assert_eq!(sim.node(1).backends().mismatched(), 0);
    assert_eq!(
        sim.table(1).map(|t| t.down),
        Some([1, 2, 3].into_iter().collect()),
        "1 of 2 nodes seeing them down is half"
    );
}

/// The place of b2 in [`web`].
const B2: u16 = 2;

/// A drain through node 2 holds on every node while node 2 is stopped and after it restarts
/// (a rolling restart of all three, one at a time), and an undrain through node 3 lifts it
/// everywhere.
#[test]
fn a_backend_drain_outlives_its_node_and_an_undrain_anywhere_lifts_it() {
    let mut sim = three_settled(34);
    let reply = sim.drain_backend(2, "b2", true);
    assert_eq!(reply.relayed_to, Some(vec![1, 3]));
    assert!(!reply.unsettled);
    let text = reply.to_string();
    assert!(text.contains("relayed to nodes 1, 3"), "{text}");
    sim.run_until(sim.now + 300 * MS);
    let drained = Some([B2].into());
    assert_eq!(sim.drained_everywhere(&[1, 2, 3]), vec![drained.clone(); 3]);
    // Node 2 stops: the others hold the drain.
    sim.stop(2);
    sim.run_until(sim.now + 2 * SEC);
    assert_eq!(sim.drained_everywhere(&[1, 3]), vec![drained.clone(); 2]);
    // Every node restarts in turn (node 2 first): each takes the drain from its first table.
    for (k, id) in [2u8, 1, 3].into_iter().enumerate() {
        if id != 2 {
            sim.stop(id);
            sim.run_until(sim.now + 2 * SEC);
        }
        sim.start(config_services(id, 10_000 + k as u64));
        sim.backend_report(id, report(&[]));
        sim.run_until(sim.now + 4 * SEC);
        assert_eq!(
            sim.node(id).backends().drained(),
            &[B2].into(),
            "node {id} holds it again"
        );
        assert_eq!(
            sim.drained_everywhere(&[1, 2, 3]),
            vec![drained.clone(); 3],
            "after node {id} restarted"
        );
    }
    let reply = sim.drain_backend(3, "b2", false);
    assert_eq!(reply.relayed_to, Some(vec![1, 2]));
    sim.run_until(sim.now + 300 * MS);
    assert_eq!(sim.drained_everywhere(&[1, 2, 3]), vec![Some([].into()); 3]);
    for id in 1..=3 {
        assert!(sim.node(id).backends().drained().is_empty(), "node {id}");
    }
}

fn config_services(id: u8, incarnation: u64) -> Config {
    let mut c = config(id, incarnation);
    c.services_digest = SERVICES;
    c
}

/// A node with other services ignores a relayed drain: its places may name other servers.
#[test]
fn a_relayed_backend_drain_of_other_services_changes_nothing() {
    let mut sim = Sim::new(35);
    sim.start(appliance(1));
    sim.backend_report(1, report(&[]));
    let mut other = appliance(2);
    other.services_digest = SERVICES + 1;
    sim.start(other);
    sim.backend_report(2, report(&[]));
    sim.run_until(2 * SEC);
    // Junk and authentication refusals (late copies, refused as replays, are the network's).
    let refused = |sim: &Sim| {
        [
            Refusal::Malformed,
            Refusal::UnknownVersion,
            Refusal::BadMac,
            Refusal::WrongPath,
            Refusal::WrongDigest,
        ]
        .map(|r| sim.node(1).refused_total(r))
    };
    let before = refused(&sim);
    let reply = sim.drain_backend(2, "b2", true);
    assert_eq!(reply.relayed_to, Some(vec![]));
    assert_eq!(reply.services_differ, vec![1]);
    assert!(reply.to_string().contains("ignored by node 1"), "{reply}");
    sim.run_until(sim.now + 500 * MS);
    assert!(sim.node(1).backends().drained().is_empty());
    assert!(sim.table(1).is_none_or(|t| t.drained.is_empty()));
    assert_eq!(refused(&sim), before, "nothing refused");
    assert!(!sim
        .events_of(1)
        .any(|e| matches!(e, Event::BackendDrainRelayed { .. })));
}

/// A peer of the version before (4) reads a relayed drain as any peer does: since version 5
/// no peer that could not (version 3) can be in the cluster. A node whose checks have not
/// settled says its drains count once they have.
#[test]
fn with_a_peer_of_the_version_before_a_backend_drain_is_relayed_to_it() {
    let mut sim = Sim::new(36);
    let mut old = old_config(1, 1);
    old.services_digest = SERVICES;
    sim.start(old);
    // Backend 3 is down: a table is made and applied everywhere (a node that has applied
    // none would take the drain from the next one).
    sim.backend_report(1, report(&[3]));
    for id in 2..=3 {
        sim.start(appliance(id));
        sim.backend_report(id, report(&[3]));
    }
    sim.run_until(3 * SEC);
    assert!(sim.node(2).backends().adopted().is_some());
    assert_eq!(sim.node(3).speaks(), PREVIOUS_VERSION);
    let malformed = sim.node(1).refused_total(Refusal::Malformed);
    let reply = sim.drain_backend(3, "b2", true);
    assert_eq!(
        (reply.relayed_to.clone(), reply.older_peers.clone()),
        (Some(vec![1, 2]), vec![])
    );
    sim.run_until(sim.now + 500 * MS);
    assert_eq!(sim.node(1).refused_total(Refusal::Malformed), malformed);
    assert_eq!(
        sim.drained_everywhere(&[1, 2, 3]),
        vec![Some([B2].into()); 3],
        "held by every node"
    );
    sim.backend_report(2, None);
    let reply = sim.drain_backend(2, "b1", true);
    assert!(reply.unsettled);
    assert!(reply.to_string().contains("once they have"), "{reply}");
}
