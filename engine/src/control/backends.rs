//! The agreed backend table (appliance mode): every node reports the backends it sees down and
//! the ones it holds drained; the coordinator turns the live nodes' reports into the next
//! epoch-numbered [`BackendTable`] ([`crate::appliance::health::agree`]); every node sends its
//! report and the table it holds, and applies the coordinator's table unless it holds a newer
//! one, so that all choose new flows' backends from the same pool. Epochs only grow: a
//! coordinator goes on above the highest epoch any node holds (it restarted, a partition
//! healed).
//!
//! An operator's backend drain is the cluster's, not one node's: the node it was given to
//! holds it and relays it ([`BackendDrain`], format version 4) to every peer, and each peer
//! with the same services holds it too, so that it outlives the node that took it and an
//! undrain through any node lifts it everywhere. A node that starts holds the drains of the
//! first table it applies or makes ([`BackendAgreement::adopted`]), so that a drain lasts as
//! long as one node holds it. The one rule for the race between that first table and a
//! request: a request heard since the node started is newer than any table it has yet seen,
//! so an undrain it heard lifts the place from what it adopts (and a relayed request also
//! changes what it holds of its peers' reports, which heard the same broadcast, so that a
//! coordinator's next table no longer waits for their next reports). What is given up: a
//! running node that misses a request (cut off, both copies lost) keeps what it held, and its
//! report brings that back into the table; the reply names the peers a request was relayed
//! to, and repeating it through any node once they are back settles it.
//!
//! Sans-IO, driven by [`super::Membership`] (which authenticates the messages and knows who
//! coordinates and who is live): [`BackendAgreement::received`] for a peer's [`Backends`]
//! message, [`BackendAgreement::relayed`] for a peer's [`BackendDrain`],
//! [`BackendAgreement::coordinate`] each tick on the coordinator,
//! [`BackendAgreement::message`] for what to send. Backends are named by their place in the
//! configuration file ([`crate::appliance::Backend::agreed`]), the same on every node that runs
//! it; a peer whose services differ (another digest of the configured pools) is not counted:
//! its places may name other servers. The drains this node holds are kept by place too (a
//! relayed request and an adopted table apply without a lookup); a reload renumbers them with
//! the table ([`BackendAgreement::renumber`]).
//! Nothing here reads a clock or sends.

use std::collections::{BTreeMap, BTreeSet};

use crate::appliance::health::{agree, BackendTable, Report};
use crate::cluster::NodeId;

/// The body of a backends message: the sender's report and the table it holds (applied only
/// from the coordinator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// Digest of the sender's configured services and backends, in order (0: none
    /// configured).
    pub digest: u64,
    /// `None` while the sender's checks have not settled yet (it counts for nothing then).
    pub report: Option<Report>,
    pub table: Option<BackendTable>,
}

/// Most backend ids in one list of a message (down or drained, reported or agreed): a message
/// fits the control format's size bound. The coordinator's table keeps at most that many per
/// list, the first by place, so that every node applies the table it sends: beyond that many at
/// once, the rest count as up on every node alike ([`BackendAgreement::left_out`]).
pub const MAX_IDS: usize = 64;

impl Backends {
    /// The body's bytes: digest u64, then 0, or 1 and the report's down and drained lists, then
    /// 0, or 1 and the table (epoch u64, down and drained lists). A list is a count u8 and that
    /// many ids u16.
    pub fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.digest.to_be_bytes());
        match &self.report {
            None => b.push(0),
            Some(r) => {
                b.push(1);
                list(b, &r.down);
                list(b, &r.drained);
            }
        }
        match &self.table {
            None => b.push(0),
            Some(t) => {
                b.push(1);
                b.extend_from_slice(&t.epoch.to_be_bytes());
                list(b, &t.down);
                list(b, &t.drained);
            }
        }
    }

    /// Reads a body written by [`Backends::encode`] at the start of `bytes`; returns it and the
    /// bytes it took, `None` if malformed. Never panics.
    pub fn decode(bytes: &[u8]) -> Option<(Backends, usize)> {
        let mut r = Cursor { bytes, at: 0 };
        let digest = r.u64()?;
        let report = match r.take(1)?[0] {
            0 => None,
            1 => Some(Report {
                down: r.list()?,
                drained: r.list()?,
            }),
            _ => return None,
        };
        let table = match r.take(1)?[0] {
            0 => None,
            1 => Some(BackendTable {
                epoch: r.u64()?,
                down: r.list()?,
                drained: r.list()?,
            }),
            _ => return None,
        };
        Some((
            Backends {
                digest,
                report,
                table,
            },
            r.at,
        ))
    }
}

/// An operator's `drain-backend` or `undrain-backend`, relayed by the node it was given to to
/// every peer (format version 4 and later): each peer with the sender's services holds it as
/// its own (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendDrain {
    /// Digest of the sender's configured services: the places name its backends.
    pub digest: u64,
    /// Drain (true) or undrain.
    pub drain: bool,
    /// The backends, by place: 1 to [`MAX_IDS`] of them.
    pub places: BTreeSet<u16>,
}

impl BackendDrain {
    /// The body's bytes: digest u64, action u8 (1 drain, 2 undrain), a count u8 (1 to
    /// [`MAX_IDS`]) and that many places u16, in increasing order.
    pub fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.digest.to_be_bytes());
        b.push(if self.drain { 1 } else { 2 });
        // The operator's request names at most MAX_IDS (64) backends (`Node::drain_backend`
        // refuses more). More is a caller bug.
        debug_assert!(!self.places.is_empty() && self.places.len() <= MAX_IDS);
        list(b, &self.places);
    }

    /// Reads a body written by [`BackendDrain::encode`] at the start of `bytes`; returns it
    /// and the bytes it took, `None` if malformed (an unknown action, no place, more than
    /// [`MAX_IDS`], places out of order or repeated: one encoding per request). Never panics.
    pub fn decode(bytes: &[u8]) -> Option<(BackendDrain, usize)> {
        let mut r = Cursor { bytes, at: 0 };
        let digest = r.u64()?;
        let drain = match r.take(1)?[0] {
            1 => true,
            2 => false,
            _ => return None,
        };
        let n = usize::from(r.take(1)?[0]);
        if n == 0 || n > MAX_IDS {
            return None;
        }
        let mut places = BTreeSet::new();
        for c in r.take(2 * n)?.chunks_exact(2) {
            let place = u16::from_be_bytes([c[0], c[1]]);
            if places.last().is_some_and(|&last| last >= place) {
                return None;
            }
            places.insert(place);
        }
        Some((
            BackendDrain {
                digest,
                drain,
                places,
            },
            r.at,
        ))
    }
}

/// Writes a list of a message: a count u8 and that many ids u16 (at most [`MAX_IDS`]).
fn list(b: &mut Vec<u8>, ids: &BTreeSet<u16>) {
    // At most MAX_IDS (64): fits in u8.
    b.push(ids.len().min(MAX_IDS) as u8);
    for id in ids.iter().take(MAX_IDS) {
        b.extend_from_slice(&id.to_be_bytes());
    }
}

/// Reads a [`Backends`] body.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn list(&mut self) -> Option<BTreeSet<u16>> {
        let n = usize::from(self.take(1)?[0]);
        if n > MAX_IDS {
            return None;
        }
        Some(
            self.take(2 * n)?
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        )
    }
}

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct BackendAgreement {
    digest: u64,
    own: Option<Report>,
    table: BackendTable,
    /// The last report of each peer with our digest, by node id.
    peers: BTreeMap<u8, Report>,
    /// Peers whose services differ from ours (bit `id - 1`).
    mismatched: u64,
    /// The highest table epoch any node has sent: a new coordinator goes on from there.
    max_epoch: u64,
    /// Backends the last table this node made left out of its lists (beyond [`MAX_IDS`]).
    left_out: usize,
    /// Backends this node holds drained, by place: its operator's drains, those its peers
    /// relayed, those it adopted; its report carries them with its checker's verdicts.
    drained: BTreeSet<u16>,
    /// The drains this node took from the first table it applied or made (None: none yet).
    adopted: Option<BTreeSet<u16>>,
    /// Until that first table: the places a request undrained since this node started. The
    /// table may predate the request; the request wins.
    lifted: BTreeSet<u16>,
    /// A reload took every backend away: it still says so (a digest of 0 and no report), so
    /// that its peers stop counting the report it last sent.
    had_backends: bool,
}

impl BackendAgreement {
    /// For a node whose services digest is `digest` (0: no backends: it sends nothing).
    pub fn new(digest: u64) -> BackendAgreement {
        BackendAgreement {
            digest,
            ..BackendAgreement::default()
        }
    }

    /// The digest of this node's configured services (0: none).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Whether this node has backends to agree on.
    pub fn active(&self) -> bool {
        self.digest != 0
    }

    /// After a reload: the services' new digest (which peers differ stays as last seen until
    /// each one's next message).
    pub fn set_digest(&mut self, digest: u64) {
        if digest != self.digest {
            self.had_backends |= self.digest != 0;
            self.digest = digest;
            // Each peer's next message says again whether its services match.
            self.peers.clear();
        }
    }

    /// After a reload: the table in force as the new services number their backends (the
    /// same epoch; the next table goes on from it), and `moved`, an old place's new one (None:
    /// its backend is gone or its place names another server now: its drain ends with it).
    /// This node's last report named the old file's places: it counts for nothing (and no
    /// table is made of it) until the next one.
    pub fn renumber(&mut self, table: BackendTable, moved: impl Fn(u16) -> Option<u16>) {
        self.table = table;
        self.own = None;
        self.drained = self.drained.iter().filter_map(|&p| moved(p)).collect();
        self.lifted = self.lifted.iter().filter_map(|&p| moved(p)).collect();
    }

    /// What this node's checks see now (any `drained` in it adds to the drains this node
    /// holds); `None` while its checks have not settled.
    pub fn set_own(&mut self, report: Option<Report>) {
        self.own = report;
    }

    /// This node's report: its checker's verdicts and the drains it holds (`None` while its
    /// checks have not settled: it counts for nothing then, its drains included).
    pub fn own(&self) -> Option<Report> {
        self.own.as_ref().map(|r| Report {
            down: r.down.clone(),
            drained: r.drained.union(&self.drained).copied().collect(),
        })
    }

    /// The backends this node holds drained, by place.
    pub fn drained(&self) -> &BTreeSet<u16> {
        &self.drained
    }

    /// The drains this node took from the first table it applied or made (None: it has
    /// applied or made none since it started).
    pub fn adopted(&self) -> Option<&BTreeSet<u16>> {
        self.adopted.as_ref()
    }

    /// An operator's drain (`drain`) or undrain of the backends at `places`, given to this
    /// node or relayed: this node holds it from now on. Returns whether what it holds changed.
    pub fn drain(&mut self, places: &BTreeSet<u16>, drain: bool) -> bool {
        let mut changed = false;
        for &place in places {
            changed |= if drain {
                self.drained.insert(place)
            } else {
                self.drained.remove(&place)
            };
            if self.adopted.is_none() {
                if drain {
                    self.lifted.remove(&place);
                } else {
                    self.lifted.insert(place);
                }
            }
        }
        changed
    }

    /// An operator's request relayed on both paths (by a peer, or by this node). With this
    /// node's services, this node holds it ([`BackendAgreement::drain`]) and takes it as said
    /// in every peer's last report too: they heard the same broadcast (one that did not says
    /// so in its next report), and the next table need not wait for their reports. Another
    /// digest's places may name other servers: ignored. Returns whether what this node holds
    /// changed.
    pub fn relayed(&mut self, msg: &BackendDrain) -> bool {
        if msg.digest != self.digest {
            return false;
        }
        for r in self.peers.values_mut() {
            if msg.drain {
                r.drained.extend(&msg.places);
            } else {
                r.drained.retain(|p| !msg.places.contains(p));
            }
        }
        self.drain(&msg.places, msg.drain)
    }

    /// The first table this node applies or makes: it holds that table's drains from now on
    /// (so that a drain outlives the restart of the node that took it), less the places a
    /// request undrained since this node started (the request is newer than the table).
    fn adopt(&mut self) {
        if self.adopted.is_some() {
            return;
        }
        let taken: BTreeSet<u16> = self
            .table
            .drained
            .iter()
            .filter(|p| !self.lifted.contains(p) && !self.drained.contains(p))
            .copied()
            .collect();
        self.drained.extend(&taken);
        self.lifted.clear();
        self.adopted = Some(taken);
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
    /// differs from the one in force and is not older (a lower epoch) than it.
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
        match &msg.report {
            Some(r) => {
                self.peers.insert(from.get(), r.clone());
            }
            None => {
                self.peers.remove(&from.get());
            }
        }
        let table = msg.table.as_ref()?;
        self.max_epoch = self.max_epoch.max(table.epoch);
        // An older table (a late copy on the slower path, a coordinator that restarted and
        // has not caught up yet) never replaces a newer one: the coordinator goes on above the
        // highest epoch it hears of ([`BackendAgreement::coordinate`]). Under the same epoch,
        // the coordinator's table wins (two sides of a healed partition may have made one each).
        if from_coordinator && table.epoch >= self.table.epoch && *table != self.table {
            self.table = table.clone();
            self.adopt();
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
        let own = self.own();
        let reports = self
            .peers
            .iter()
            .filter(|(id, _)| **id != me.get() && live & (1u64 << (**id - 1)) != 0)
            .map(|(_, r)| r)
            .chain(own.as_ref());
        let mut agreed = agree(reports)?;
        self.left_out = 0;
        for list in [&mut agreed.down, &mut agreed.drained] {
            while list.len() > MAX_IDS {
                list.pop_last();
                self.left_out += 1;
            }
        }
        // A node holds a newer table than this one (this node restarted, or coordinated
        // before it had heard the others): a table above it, even if nothing changed here, so
        // that every node takes it.
        let behind = self.table.epoch < self.max_epoch;
        let mut next = match self.table.next(&agreed) {
            Some(next) => next,
            None if behind => BackendTable {
                epoch: self.table.epoch,
                down: agreed.down,
                drained: agreed.drained,
            },
            None => return None,
        };
        next.epoch = self.table.epoch.max(self.max_epoch).saturating_add(1);
        self.max_epoch = next.epoch;
        self.table = next.clone();
        self.adopt();
        Some(next)
    }

    /// How many backends the last table this node made as coordinator could not list (more
    /// than [`MAX_IDS`] down, or drained, at once): they count as up, on every node alike.
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// What to send this tick; `None` without backends. Every node sends the table it holds
    /// once it has one (epoch 0: none made or applied yet, never sent): only the
    /// coordinator's is applied, the others' epochs tell a new coordinator where to go on
    /// from.
    ///
    /// A node that a reload left without backends sends its digest, 0, alone: its peers find
    /// its services differ and drop the report it sent before (else it voted on for as long
    /// as it lived, under places that meant its old file).
    pub fn message(&self) -> Option<Backends> {
        if !self.active() {
            return self.had_backends.then(Backends::default);
        }
        Some(Backends {
            digest: self.digest,
            report: self.own(),
            table: (self.table.epoch > 0).then(|| self.table.clone()),
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

    /// A node that checks and sees every backend up.
    fn settled(digest: u64) -> BackendAgreement {
        let mut a = BackendAgreement::new(digest);
        a.set_own(Some(Report::default()));
        a
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
                .filter_map(|(i, a)| a.message().map(|m| (n(i as u8 + 1), m)))
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

    /// More backends down than a message lists: the coordinator's table keeps the first
    /// [`MAX_IDS`] by place, and what it applies is what every node decodes from its message.
    #[test]
    fn a_table_lists_what_a_message_carries() {
        let mut a = BackendAgreement::new(1);
        a.set_own(Some(Report {
            down: (1..=100).collect(),
            drained: (200..=210).collect(),
        }));
        let table = a.coordinate(n(1), 0b1).unwrap();
        assert_eq!(table.down, (1..=MAX_IDS as u16).collect());
        assert_eq!(table.drained.len(), 11);
        assert_eq!(a.left_out(), 100 - MAX_IDS);
        let mut bytes = Vec::new();
        a.message().unwrap().encode(&mut bytes);
        let (decoded, _) = Backends::decode(&bytes).unwrap();
        assert_eq!(decoded.table.as_ref(), Some(a.table()));
        let mut b = BackendAgreement::new(1);
        assert_eq!(b.received(n(1), &decoded, true), Some(table));
        assert_eq!(b.table(), a.table());
    }

    /// A reload renumbers the table in force; the report made before it, in the old file's
    /// places, makes no table and is not sent until the next report.
    #[test]
    fn a_report_of_the_old_places_counts_for_nothing_after_a_reload() {
        let mut a = BackendAgreement::new(1);
        a.set_own(Some(down(&[3])));
        let before = a.coordinate(n(1), 0b1).unwrap();
        assert_eq!(before.down, [3].into());
        a.set_digest(2);
        let renumbered = BackendTable {
            epoch: before.epoch,
            down: [2].into(),
            drained: Default::default(),
        };
        a.renumber(renumbered.clone(), Some);
        assert_eq!(
            a.coordinate(n(1), 0b1),
            None,
            "no table of the stale report"
        );
        assert_eq!(a.table(), &renumbered);
        assert_eq!(a.message().unwrap().report, None);
        a.set_own(Some(down(&[2])));
        assert_eq!(a.coordinate(n(1), 0b1), None, "the same table: nothing new");
    }

    #[test]
    fn every_node_ends_on_the_coordinators_table() {
        let mut nodes = vec![settled(42); 3];
        nodes[1].set_own(Some(down(&[5])));
        nodes[2].set_own(Some(down(&[5, 6])));
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
        nodes[1].set_own(Some(down(&[])));
        rounds(&mut nodes, 0b111, 3);
        assert!(nodes.iter().all(|a| a.table().down.is_empty()));
        assert!(nodes[2].table().epoch > before);
    }

    #[test]
    fn dead_nodes_and_other_configurations_do_not_count() {
        let mut nodes = vec![settled(42), settled(42), settled(43)];
        nodes[2].set_own(Some(down(&[5])));
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
        nodes[1].set_own(Some(down(&[5])));
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

    /// A peer that a reload leaves without backends says so: its last report stops counting.
    #[test]
    fn a_peer_reloaded_to_no_backends_stops_voting() {
        let mut nodes = vec![settled(42); 2];
        nodes[1].set_own(Some(down(&[5])));
        rounds(&mut nodes, 0b11, 2);
        assert!(nodes[0].table().down.contains(&5), "1 of 2 sees it down");
        nodes[1].set_digest(0);
        rounds(&mut nodes, 0b11, 2);
        assert!(
            !nodes[0].table().down.contains(&5),
            "its report counts no more"
        );
        assert_eq!(nodes[0].mismatched(), 0b10);
        assert_eq!(
            BackendAgreement::new(0).message(),
            None,
            "a node that never had backends sends nothing"
        );
    }

    #[test]
    fn the_body_round_trips_and_refuses_garbage() {
        let m = Backends {
            digest: 0x0102_0304_0506_0708,
            report: Some(Report {
                down: [3, 4000].into_iter().collect(),
                drained: [9].into_iter().collect(),
            }),
            table: Some(BackendTable {
                epoch: 12,
                down: [3].into_iter().collect(),
                drained: Default::default(),
            }),
        };
        let mut b = Vec::new();
        m.encode(&mut b);
        assert_eq!(Backends::decode(&b), Some((m.clone(), b.len())));
        for cut in 0..b.len() {
            assert_eq!(Backends::decode(&b[..cut]), None, "cut at {cut}");
        }
        let mut bad = b.clone();
        bad[9] = 200;
        assert_eq!(Backends::decode(&bad), None, "a list longer than MAX_IDS");
        let no_table = Backends {
            table: None,
            report: None,
            ..m
        };
        let mut b = Vec::new();
        no_table.encode(&mut b);
        assert_eq!(Backends::decode(&b), Some((no_table, b.len())));
    }

    /// The coordinator restarts while the others still hold the table it made (backend 5
    /// down): whatever it sends before it has heard them, no node ever applies an older epoch
    /// or a table with 5 up, and once it has heard their epochs its table goes above them.
    #[test]
    fn a_restarted_coordinator_never_takes_an_agreed_table_back() {
        let mut nodes = vec![settled(42); 3];
        nodes[1].set_own(Some(down(&[5])));
        nodes[2].set_own(Some(down(&[5])));
        rounds(&mut nodes, 0b111, 3);
        let agreed = nodes[1].table().clone();
        assert!(agreed.epoch > 0 && agreed.down.contains(&5));
        // Node 1 again, fresh: no table (nothing sent), and its checks have not settled.
        nodes[0] = BackendAgreement::new(42);
        assert_eq!(
            nodes[0].message().unwrap().table,
            None,
            "no table before one is made"
        );
        let mut epochs = [agreed.epoch; 3];
        for round in 0..4 {
            rounds(&mut nodes, 0b111, 1);
            for (i, a) in nodes.iter().enumerate().skip(1) {
                assert!(
                    a.table().epoch >= epochs[i],
                    "round {round}: node {}",
                    i + 1
                );
                assert!(a.table().down.contains(&5), "round {round}: node {}", i + 1);
                epochs[i] = a.table().epoch;
            }
        }
        for a in &nodes {
            assert!(a.table().epoch > agreed.epoch, "a table above the old one");
            assert_eq!(a.table().down, agreed.down);
        }
    }

    /// A late copy of an older table (the slower of the two paths) changes nothing.
    #[test]
    fn an_older_table_never_replaces_a_newer_one() {
        let mut a = settled(42);
        let msg = |epoch: u64, down: &[u16]| Backends {
            digest: 42,
            report: None,
            table: Some(BackendTable {
                epoch,
                down: down.iter().copied().collect(),
                drained: Default::default(),
            }),
        };
        assert!(a.received(n(1), &msg(3, &[7]), true).is_some());
        assert!(a.received(n(1), &msg(4, &[]), true).is_some());
        assert_eq!(a.received(n(1), &msg(3, &[7]), true), None, "late copy");
        assert!(a.table().down.is_empty());
        assert_eq!(
            a.received(n(2), &msg(9, &[7]), false),
            None,
            "not the coordinator's"
        );
        assert!(a.table().down.is_empty());
        // Made coordinator, it goes on above the highest epoch it heard of.
        a.set_own(Some(down(&[])));
        let t = a.coordinate(n(1), 0b1).unwrap();
        assert!(t.epoch > 9 && t.down.is_empty());
    }

    fn drain(places: &[u16], drain: bool) -> BackendDrain {
        BackendDrain {
            digest: 42,
            drain,
            places: places.iter().copied().collect(),
        }
    }

    #[test]
    fn a_backend_drain_round_trips_and_every_cut_is_refused() {
        for d in [drain(&[0], true), drain(&[3, 9, 4000], false)] {
            let mut b = Vec::new();
            d.encode(&mut b);
            assert_eq!(b.len(), 8 + 1 + 1 + 2 * d.places.len());
            assert_eq!(BackendDrain::decode(&b), Some((d.clone(), b.len())));
            for cut in 0..b.len() {
                assert_eq!(BackendDrain::decode(&b[..cut]), None, "cut at {cut}");
            }
        }
    }

    /// Node 2's operator drains backend 5; node 2 restarts; every node keeps it drained, node
    /// 2 again too (it adopts it from its first table); an undrain through node 3 lifts it
    /// everywhere.
    #[test]
    fn a_drain_outlives_the_node_that_took_it() {
        let mut nodes = vec![settled(42); 3];
        rounds(&mut nodes, 0b111, 2);
        // Node 2 holds it and relays it to 1 and 3.
        for a in nodes.iter_mut() {
            a.relayed(&drain(&[5], true));
        }
        rounds(&mut nodes, 0b111, 2);
        assert!(nodes.iter().all(|a| a.table().drained.contains(&5)));
        nodes[1] = settled(42);
        rounds(&mut nodes, 0b101, 2);
        assert!(nodes[0].table().drained.contains(&5), "node 2 is gone");
        rounds(&mut nodes, 0b111, 2);
        assert_eq!(nodes[1].adopted(), Some(&[5].into()));
        assert!(nodes[1].drained().contains(&5));
        // Node 1 and node 3 restart in turn: node 2 holds it meanwhile.
        for i in [0, 2] {
            nodes[i] = settled(42);
            rounds(&mut nodes, 0b111 & !(1 << i), 2);
            rounds(&mut nodes, 0b111, 2);
            assert!(nodes[i].drained().contains(&5), "node {}", i + 1);
        }
        assert!(nodes.iter().all(|a| a.table().drained.contains(&5)));
        for a in nodes.iter_mut() {
            a.relayed(&drain(&[5], false));
        }
        rounds(&mut nodes, 0b111, 2);
        for a in &nodes {
            assert!(a.table().drained.is_empty() && a.drained().is_empty());
        }
    }

    /// A node starts while an undrain is relayed: its first table still lists the backend,
    /// but the undrain it heard is newer and wins. A drain heard after it wins in turn.
    #[test]
    fn an_undrain_heard_before_the_first_table_wins_over_it() {
        let table = |drained: &[u16]| Backends {
            digest: 42,
            report: Some(Report::default()),
            table: Some(BackendTable {
                epoch: 7,
                down: Default::default(),
                drained: drained.iter().copied().collect(),
            }),
        };
        let mut a = settled(42);
        assert!(!a.relayed(&drain(&[5, 6], false)), "held nothing");
        assert!(a.received(n(1), &table(&[5, 6, 7]), true).is_some());
        assert_eq!(a.adopted(), Some(&[7].into()));
        assert_eq!(a.drained(), &[7].into());
        // After the first table, the table never adds a drain again: requests do.
        let mut t = table(&[5, 7]);
        t.table.as_mut().unwrap().epoch = 8;
        assert!(a.received(n(1), &t, true).is_some());
        assert_eq!(a.drained(), &[7].into());

        let mut b = settled(42);
        b.relayed(&drain(&[5], false));
        b.relayed(&drain(&[5], true));
        b.received(n(1), &table(&[]), true);
        assert_eq!(b.drained(), &[5].into(), "the last request wins");
        assert_eq!(b.own().unwrap().drained, [5].into());
    }

    #[test]
    fn a_relayed_drain_of_other_services_changes_nothing() {
        let mut a = settled(42);
        let other = BackendDrain {
            digest: 43,
            ..drain(&[5], true)
        };
        assert!(!a.relayed(&other));
        assert!(a.drained().is_empty());
        assert_eq!(
            a.mismatched(),
            0,
            "nothing to say beyond its backends messages"
        );
    }

    /// The coordinator takes a relayed request as said in every peer's report: its next table
    /// does not wait for their next reports (which a node that starts meanwhile could adopt).
    #[test]
    fn a_relayed_request_counts_in_the_next_table_at_once() {
        let mut nodes = vec![settled(42); 3];
        for a in nodes.iter_mut() {
            a.relayed(&drain(&[5], true));
        }
        rounds(&mut nodes, 0b111, 2);
        assert!(nodes[0].table().drained.contains(&5));
        // Only the coordinator hears the undrain yet; the peers' reports it holds still list 5.
        nodes[0].relayed(&drain(&[5], false));
        let t = nodes[0].coordinate(n(1), 0b111).expect("a new table");
        assert!(t.drained.is_empty());
    }

    /// Before its checks settle, a node's drains count for nothing (the reply says so).
    #[test]
    fn drains_count_with_the_report() {
        let mut a = BackendAgreement::new(42);
        a.drain(&[5].into(), true);
        assert_eq!(a.own(), None);
        assert_eq!(a.message().unwrap().report, None);
        a.set_own(Some(Report::default()));
        assert_eq!(a.message().unwrap().report.unwrap().drained, [5].into());
        // A reload moves the drains with their backends, and ends those whose backend left.
        a.drain(&[6].into(), true);
        a.renumber(BackendTable::default(), |p| (p == 5).then_some(2));
        assert_eq!(a.drained(), &[2].into());
    }

    #[test]
    fn a_new_coordinator_goes_on_from_the_highest_epoch() {
        let mut nodes = vec![settled(42); 2];
        nodes[0].set_own(Some(down(&[1])));
        rounds(&mut nodes, 0b11, 2);
        let epoch = nodes[1].table().epoch;
        assert!(epoch > 0);
        // Node 1 is gone; node 2 coordinates and sees backend 1 back.
        nodes[1].forget(n(1));
        nodes[1].set_own(Some(down(&[])));
        let t = nodes[1].coordinate(n(2), 0b10).unwrap();
        assert!(t.epoch > epoch && t.down.is_empty());
        assert_eq!(
            BackendAgreement::new(0).message(),
            None,
            "no backends, no messages"
        );
    }
}
