//! Appliance mode's agreed backend table, simulated: every node reports what its checks see,
//! the coordinator's table reaches every node within a heartbeat or two, a node whose checks
//! have not settled counts for nothing, and the table survives the coordinator's death.

use super::*;
use crate::appliance::health::{BackendTable, Report};

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

impl Sim {
    fn backend_report(&mut self, id: u8, r: Option<Report>) {
        self.input_node(id, |node, _, _| node.set_backend_report(r));
    }

    fn table(&self, id: u8) -> Option<BackendTable> {
        self.nodes[n(id).index()].as_ref().unwrap().backends.clone()
    }
}

#[test]
fn every_node_applies_the_same_agreed_backend_table() {
    let mut sim = Sim::new(31);
    for id in 1..=3 {
        sim.start(appliance(id));
        sim.backend_report(id, report(&[]));
    }
    sim.run_until(2 * SEC);
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
