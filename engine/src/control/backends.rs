//! The agreed backend table (appliance mode): every node reports the backends it sees down and
//! the ones its operator drained; the coordinator turns the live nodes' reports into the next
//! epoch-numbered [`BackendTable`] ([`crate::appliance::health::agree`]) and sends it with its
//! own report; every node applies the coordinator's table, so that all choose new flows'
//! backends from the same pool.
//!
//! Sans-IO, driven by [`super::Membership`] (which authenticates the messages and knows who
//! coordinates and who is live): [`BackendAgreement::received`] for a peer's [`Backends`]
//! message, [`BackendAgreement::coordinate`] each tick on the coordinator,
//! [`BackendAgreement::message`] for what to send. A peer whose services differ (another
//! digest of the configured pools) is not counted: its backend ids may name other servers.
//! Nothing here reads a clock or sends.

use std::collections::BTreeMap;

use crate::appliance::health::{agree, BackendTable, Report};
use crate::cluster::NodeId;

/// The body of a backends message: the sender's report and, from the coordinator, its table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// Digest of the sender's configured services and backends (0: none configured).
    pub digest: u64,
    pub report: Report,
    pub table: Option<BackendTable>,
}

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct BackendAgreement {
    digest: u64,
    own: Report,
    table: BackendTable,
    /// The last report of each peer with our digest, by node id.
    peers: BTreeMap<u8, Report>,
    /// Peers whose services differ from ours (bit `id - 1`).
    mismatched: u64,
    /// The highest table epoch any node has sent: a new coordinator goes on from there.
    max_epoch: u64,
}

impl BackendAgreement {
    /// For a node whose services digest is `digest` (0: no backends: it sends nothing).
    pub fn new(digest: u64) -> BackendAgreement {
        BackendAgreement {
            digest,
            ..BackendAgreement::default()
        }
    }

    /// Whether this node has backends to agree on.
    pub fn active(&self) -> bool {
        self.digest != 0
    }

    /// After a reload: the services' new digest.
    pub fn set_digest(&mut self, digest: u64) {
        if digest != self.digest {
            self.digest = digest;
            self.peers.clear();
            self.mismatched = 0;
        }
    }

    /// What this node sees now (its checker's verdicts, its operator's drains).
    pub fn set_own(&mut self, report: Report) {
        self.own = report;
    }

    pub fn own(&self) -> &Report {
        &self.own
    }

    /// The table in force here.
    pub fn table(&self) -> &BackendTable {
        &self.table
    }

    /// Peers whose configured services differ from this node's (bit `id - 1`).
    pub fn mismatched(&self) -> u64 {
        self.mismatched
    }

    /// A peer's message. Returns the table to apply if `from_coordinator` sent one that
    /// differs from the one in force.
    pub fn received(
        &mut self,
        from: NodeId,
        msg: &Backends,
        from_coordinator: bool,
    ) -> Option<BackendTable> {
        let bit = 1u64 << from.index();
        if msg.digest != self.digest {
            self.mismatched |= bit;
            self.peers.remove(&from.get());
            return None;
        }
        self.mismatched &= !bit;
        self.peers.insert(from.get(), msg.report.clone());
        let table = msg.table.as_ref()?;
        self.max_epoch = self.max_epoch.max(table.epoch);
        if from_coordinator && *table != self.table {
            self.table = table.clone();
            return Some(self.table.clone());
        }
        None
    }

    /// A peer died or left: its report counts no more.
    pub fn forget(&mut self, node: NodeId) {
        self.peers.remove(&node.get());
        self.mismatched &= !(1u64 << node.index());
    }

    /// On the coordinator, every tick: the next table over the reports of the nodes in `live`
    /// (bit `id - 1`, itself included). Returns it if it changed.
    pub fn coordinate(&mut self, me: NodeId, live: u64) -> Option<BackendTable> {
        let reports = self
            .peers
            .iter()
            .filter(|(id, _)| **id != me.get() && live & (1u64 << (**id - 1)) != 0)
            .map(|(_, r)| r)
            .chain(std::iter::once(&self.own));
        let agreed = agree(reports)?;
        let mut next = self.table.next(&agreed)?;
        next.epoch = next.epoch.max(self.max_epoch + 1);
        self.max_epoch = next.epoch;
        self.table = next.clone();
        Some(next)
    }

    /// What to send this tick (the table too when `coordinator`); `None` without backends.
    pub fn message(&self, coordinator: bool) -> Option<Backends> {
        self.active().then(|| Backends {
            digest: self.digest,
            report: self.own.clone(),
            table: coordinator.then(|| self.table.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId::new(i).unwrap()
    }

    fn down(ids: &[u16]) -> Report {
        Report {
            down: ids.iter().copied().collect(),
            drained: Default::default(),
        }
    }

    /// Three nodes exchange messages for a few rounds; node 1 coordinates.
    fn rounds(nodes: &mut [BackendAgreement], live: u64, k: usize) {
        for _ in 0..k {
            let coordinator = n(1);
            nodes[0].coordinate(coordinator, live);
            let msgs: Vec<(NodeId, Backends)> = nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| live & (1 << i) != 0)
                .filter_map(|(i, a)| a.message(i == 0).map(|m| (n(i as u8 + 1), m)))
                .collect();
            for (i, a) in nodes.iter_mut().enumerate() {
                for (from, m) in &msgs {
                    if from.index() != i {
                        a.received(*from, m, *from == coordinator);
                    }
                }
            }
        }
    }

    #[test]
    fn every_node_ends_on_the_coordinators_table() {
        let mut nodes = vec![BackendAgreement::new(42); 3];
        nodes[1].set_own(down(&[5]));
        nodes[2].set_own(down(&[5, 6]));
        rounds(&mut nodes, 0b111, 3);
        for a in &nodes {
            assert_eq!(
                a.table().down,
                down(&[5]).down,
                "2 of 3 see 5 down, 1 of 3 sees 6"
            );
            assert_eq!(a.table().epoch, nodes[0].table().epoch);
        }
        let before = nodes[0].table().epoch;
        nodes[1].set_own(down(&[]));
        rounds(&mut nodes, 0b111, 3);
        assert!(nodes.iter().all(|a| a.table().down.is_empty()));
        assert!(nodes[2].table().epoch > before);
    }

    #[test]
    fn dead_nodes_and_other_configurations_do_not_count() {
        let mut nodes = vec![
            BackendAgreement::new(42),
            BackendAgreement::new(42),
            BackendAgreement::new(43),
        ];
        nodes[2].set_own(down(&[5]));
        rounds(&mut nodes, 0b111, 3);
        assert!(
            nodes[0].table().down.is_empty(),
            "node 3's pools are not ours"
        );
        assert_eq!(nodes[0].mismatched(), 0b100);
        assert!(
            nodes[2].table().down.is_empty(),
            "it applies no table of another digest"
        );
        nodes[1].set_own(down(&[5]));
        rounds(&mut nodes, 0b011, 2);
        assert_eq!(
            nodes[0].table().down,
            down(&[5]).down,
            "1 of 2 live checkers"
        );
        nodes[0].forget(n(2));
        nodes[0].coordinate(n(1), 0b001);
        assert!(
            nodes[0].table().down.is_empty(),
            "alone, it trusts its own checks"
        );
    }

    #[test]
    fn a_new_coordinator_goes_on_from_the_highest_epoch() {
        let mut nodes = vec![BackendAgreement::new(42); 2];
        nodes[0].set_own(down(&[1]));
        rounds(&mut nodes, 0b11, 2);
        let epoch = nodes[1].table().epoch;
        assert!(epoch > 0);
        // Node 1 is gone; node 2 coordinates and sees backend 1 back.
        nodes[1].forget(n(1));
        nodes[1].set_own(down(&[]));
        let t = nodes[1].coordinate(n(2), 0b10).unwrap();
        assert!(t.epoch > epoch && t.down.is_empty());
        assert_eq!(
            BackendAgreement::new(0).message(true),
            None,
            "no backends, no messages"
        );
    }
}
