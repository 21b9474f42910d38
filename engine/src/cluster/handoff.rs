//! The handoff rule: what a node does with a packet of a flow, by its [`Role`] for the flow's
//! bucket (DESIGN.md, "Changing owners without losing connections" and "Long-lived flows").
//!
//! [`verdict`] decides for a TCP or UDP packet (and [`serves_icmp_error`] for an ICMP error
//! quoting one) from plain values: the role, whether the plan is in its release gap, the
//! packet's protocol and TCP flags, the services' [`Health`], and what this node's two flow
//! tables hold for the flow (its own table, and the flows learned as the bucket's old owner's).
//! The packet core (`crate::pipeline`) carries the verdict out: it delivers or drops the frame,
//! records or forgets table entries and counts duplicate risk.
//!
//! This module must never read a frame, a clock or a snapshot, change a table, or allocate: the
//! tables are asked through [`FlowLookup`], and only for what the rule needs to know (an owner
//! with nothing learned and a healthy service looks nothing up before it delivers). It runs for
//! nearly every packet (an owner's, with nothing learned and a healthy service, the pipeline
//! decides by [`delivers_all`] without asking it): everything here is inlined and takes `Copy`
//! values.

use super::{FlowState, NodeId, TcpFlags};

/// What node `me` does with a frame of bucket `b` (DESIGN.md, "Changing owners without losing
/// connections"). Exactly one live node at a time is `Owner` or `Acquiring` for a bucket (the
/// invariant the simulations check), and during the release gap nobody is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Deliver every packet of the bucket; new flows are ours. Unknown non-SYN TCP packets go to
    /// our kernel, which answers with RST.
    Owner,
    /// Drop every packet of the bucket (but keep nothing: no learning).
    NotOwner,
    /// The bucket will move to us from `from`. Deliver nothing; record every flow key seen in
    /// the bucket as "learned-`from`" (the old owner's), so that we never take those flows
    /// after acquire. Learned entries end on FIN/RST or idle timeout.
    Learning { from: NodeId },
    /// The bucket moves from us to `to`. Take NO new flow; deliver a packet only if its key is a
    /// live entry of our own flow table (a retransmitted SYN of a connection we accepted
    /// included). Report how many flows are left (`Membership::report_flows`).
    Releasing { to: NodeId },
    /// The bucket moves to us from `from`, which has released it. Deliver a packet if its key is
    /// in our own flow table, or if it starts a new flow whose key is not learned-`from` (TCP: a
    /// SYN without ACK; UDP and the rest: any packet). Never take a TCP packet without SYN and
    /// with an unknown key (a long-idle connection of `from`). Keep recording learned-`from`
    /// keys for packets of flows we do not take.
    Acquiring { from: NodeId },
}

impl std::fmt::Display for Role {
    /// The role in words, as `owner-of` reports it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Owner => f.write_str("owner"),
            Role::NotOwner => f.write_str("not the owner"),
            Role::Learning { from } => write!(f, "learning the flows of {from}"),
            Role::Releasing { to } => write!(f, "releasing to {to}"),
            Role::Acquiring { from } => write!(f, "acquiring from {from}"),
        }
    }
}

impl Role {
    /// Whether a frame that starts a new flow is ours.
    #[inline]
    pub fn accepts_new_flows(self) -> bool {
        matches!(self, Role::Owner | Role::Acquiring { .. })
    }
}

/// The packet, as far as the rule is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// IP protocol TCP. Other protocols (UDP and the rest) have no connection state: any of
    /// their packets may start a flow.
    pub tcp: bool,
    /// The TCP control bits (empty for other protocols).
    pub flags: TcpFlags,
}

impl Packet {
    /// A TCP SYN without ACK: it opens a connection, possibly on the 4-tuple of one that ended.
    #[inline]
    fn opens_connection(self) -> bool {
        self.tcp && self.flags.is_initial_syn()
    }
}

/// The health of the services, as far as the rule is concerned (the control thread publishes
/// it to the cores as `pipeline::ServiceState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// This node's service fails its health check: it takes no new TCP connection.
    pub refuse_new: bool,
    /// Bit `id - 1` per peer that announced a failing service.
    pub refusing_peers: u64,
}

impl Health {
    /// Whether `node`'s service fails (it takes no new TCP connection).
    #[inline]
    fn refuses(self, node: NodeId) -> bool {
        self.refusing_peers & (1u64 << node.index()) != 0
    }
}

/// What the rule asks of the flow tables about the packet's flow. Each answer is asked for
/// only when the rule needs it, at most twice per packet.
pub trait FlowLookup {
    /// The flow's state in this node's own table (the flows it delivers), if it is there.
    fn own(&self) -> Option<FlowState>;
    /// The flow's state among the flows learned as the bucket's old owner's, if it is there.
    fn learned(&self) -> Option<FlowState>;
}

/// What to do with the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Deliver it: this node's flow, kept (or put) in its own table.
    Deliver,
    /// Deliver it as [`Take::Deliver`], although the old owner may still serve the flow (an
    /// unlearned UDP flow, a learned SYN sent again): one count of duplicate risk.
    DeliverAtRisk,
    /// Drop it: the old owner's flow, recorded (or refreshed) among the learned flows.
    Learn,
    /// Drop it: another node's.
    NotOwned,
    /// Drop it: a new flow between release and acquire, which no node takes now (its client
    /// retransmits). Only the old owner says so, so that the cluster counts it once.
    ReleaseGap,
}

/// An entry to remove before carrying out the [`Take`]: the flow it tracked is over, and this
/// packet starts another on its 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    Nothing,
    /// The entry of this node's own table.
    Own,
    /// The entry learned as the old owner's.
    Learned,
}

/// The handoff rule's answer for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub take: Take,
    pub forget: Forget,
}

impl Verdict {
    /// Deliver, and nothing else: the common case.
    pub const DELIVER: Verdict = Verdict::only(Take::Deliver);

    #[inline]
    const fn only(take: Take) -> Verdict {
        Verdict {
            take,
            forget: Forget::Nothing,
        }
    }
}

/// What a node does with a TCP or UDP packet of a bucket it has `role` for. `release_gap`: the
/// plan's phase is release (the old owner takes no new flow, the new owner none yet).
#[inline]
pub fn verdict(
    role: Role,
    release_gap: bool,
    packet: Packet,
    health: Health,
    tables: &impl FlowLookup,
) -> Verdict {
    match role {
        Role::Owner => owner(packet, health, tables),
        // The bucket moved on, but a flow this node served before it did stays this node's
        // for as long as it lives (a new connection on its 4-tuple does not).
        Role::NotOwner => still_serving(packet, tables, Take::NotOwned),
        Role::Releasing { .. } => {
            let otherwise = if release_gap {
                Take::ReleaseGap
            } else {
                Take::NotOwned
            };
            still_serving(packet, tables, otherwise)
        }
        Role::Learning { from } => learning(from, release_gap, packet, health, tables),
        Role::Acquiring { .. } => acquiring(packet, tables),
    }
}

/// Whether the rule delivers every packet of a bucket for which this node has `role`, whatever
/// the packet and its flow's entries, while no flow is learned (`learned_any` false: no
/// handoff under way here) and its service takes new flows: the owner's common case (see
/// the rule's owner case), which a caller may decide without asking the rule or the tables.
#[inline(always)]
pub fn delivers_all(role: Role, health: Health, learned_any: bool) -> bool {
    role == Role::Owner && !health.refuse_new && !learned_any
}

/// The owner delivers, but not a flow the bucket's previous owner still serves after the
/// handoff (DESIGN.md, "Long-lived flows": learned, never in this node's own table, not
/// starting again), and, while its service fails, no new TCP connection.
#[inline]
fn owner(packet: Packet, health: Health, tables: &impl FlowLookup) -> Verdict {
    let mut forget = Forget::Nothing;
    match tables.learned() {
        // The old owner's connection ended; this SYN starts a new one, this node's.
        Some(FlowState::Closing) if packet.opens_connection() => forget = Forget::Learned,
        Some(_) if tables.own().is_none() => return Verdict::only(Take::Learn),
        Some(_) | None => {}
    }
    let take = if health.refuse_new && packet.opens_connection() && tables.own().is_none() {
        Take::NotOwned
    } else {
        Take::Deliver
    };
    Verdict { take, forget }
}

/// A node that no longer takes new flows of the bucket delivers the flows of its own table.
/// A SYN on the 4-tuple of a connection that has ended (clients reuse ports quickly) starts
/// a new flow, which this node no longer takes: the old entry is forgotten, or the new flow's
/// later packets would be delivered here as well as by the owner.
#[inline]
fn still_serving(packet: Packet, tables: &impl FlowLookup, otherwise: Take) -> Verdict {
    match tables.own() {
        Some(FlowState::Closing) if packet.opens_connection() => Verdict {
            take: otherwise,
            forget: Forget::Own,
        },
        Some(_) => Verdict::DELIVER,
        None => Verdict::only(otherwise),
    }
}

/// The new owner delivers nothing yet but its own earlier flows, and records the old owner's
/// flows. Only the learn
/// phase's new flows are the old owner's: once it has released the bucket it takes no new
/// flow, so a flow first seen then is nobody's yet (its SYN is retransmitted and taken after
/// acquire). Known ones are kept fresh. An old owner whose service fails takes no new
/// connection either.
#[inline]
fn learning(
    from: NodeId,
    release_gap: bool,
    packet: Packet,
    health: Health,
    tables: &impl FlowLookup,
) -> Verdict {
    // A flow this node served before the bucket moved away, now moving back: still its own
    // (DESIGN.md, "Long-lived flows"); the current owner has it learned and leaves it alone.
    if let Some(state) = tables.own() {
        if !(state == FlowState::Closing && packet.opens_connection()) {
            return Verdict::DELIVER;
        }
    }
    let known = tables.learned().is_some();
    let refused = packet.opens_connection() && health.refuses(from);
    if known || (!release_gap && !refused) {
        Verdict::only(Take::Learn)
    } else {
        Verdict::only(Take::NotOwned)
    }
}

/// The new owner delivers the flows of its own table and new flows that are not the old
/// owner's.
#[inline]
fn acquiring(packet: Packet, tables: &impl FlowLookup) -> Verdict {
    if tables.own().is_some() {
        return Verdict::DELIVER;
    }
    match tables.learned() {
        // The old owner's connection on this 4-tuple has ended; this SYN starts a new one,
        // which the old owner refuses.
        Some(FlowState::Closing) if packet.opens_connection() => Verdict {
            take: Take::Deliver,
            forget: Forget::Learned,
        },
        // A SYN learned but never answered (no ACK followed it), now sent again: nodes adopt a
        // phase at slightly different times, so the old owner may have released the bucket,
        // and refused this SYN, while this node was still learning. Had the old owner accepted
        // it, the client would have answered its SYN-ACK with an ACK rather than a
        // retransmission. Take it, or nobody ever would.
        Some(FlowState::SynSeen) if packet.flags.is_initial_syn() => Verdict {
            take: Take::DeliverAtRisk,
            forget: Forget::Learned,
        },
        // The old owner's flow: keep tracking it until it ends.
        Some(_) => Verdict::only(Take::Learn),
        // A new flow: TCP only on a SYN without ACK (a TCP packet of an unknown flow is a
        // long-idle connection of the old owner); anything else starts one, although the old
        // owner may serve it still (idle through the whole learn phase, or forgotten by a full
        // learned-flows table).
        None if !packet.tcp => Verdict::only(Take::DeliverAtRisk),
        None if packet.flags.is_initial_syn() => Verdict::DELIVER,
        None => Verdict::only(Take::NotOwned),
    }
}

/// Whether an ICMP error quoting a flow of a bucket this node has `role` for is this node's:
/// it goes where the quoted flow is served (so that path-MTU discovery reaches the node that
/// holds the connection). The owner takes it; during a handoff, whichever of the two nodes
/// has the flow in its own table; an error quoting no ports, the new owner. `quoted`: the
/// tables, asked about the quoted flow, if the quote names one.
#[inline]
pub fn serves_icmp_error(role: Role, quoted: Option<&impl FlowLookup>) -> bool {
    match (role, quoted) {
        (Role::Owner, _) => true,
        (Role::Releasing { .. } | Role::Acquiring { .. }, Some(tables)) => tables.own().is_some(),
        (Role::Acquiring { .. }, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Plain answers for the rule, counting the questions asked.
    #[derive(Default)]
    struct Known {
        own: Option<FlowState>,
        learned: Option<FlowState>,
        asked: Cell<u32>,
    }

    impl Known {
        fn new(own: Option<FlowState>, learned: Option<FlowState>) -> Known {
            Known {
                own,
                learned,
                asked: Cell::new(0),
            }
        }
    }

    impl FlowLookup for Known {
        fn own(&self) -> Option<FlowState> {
            self.asked.set(self.asked.get() + 1);
            self.own
        }
        fn learned(&self) -> Option<FlowState> {
            self.asked.set(self.asked.get() + 1);
            self.learned
        }
    }

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    const SYN: Packet = Packet {
        tcp: true,
        flags: TcpFlags::SYN,
    };
    const ACK: Packet = Packet {
        tcp: true,
        flags: TcpFlags::ACK,
    };
    const SYN_ACK: Packet = Packet {
        tcp: true,
        flags: TcpFlags(0x12),
    };
    const UDP: Packet = Packet {
        tcp: false,
        flags: TcpFlags::NONE,
    };
    const HEALTHY: Health = Health {
        refuse_new: false,
        refusing_peers: 0,
    };
    const FAILING: Health = Health {
        refuse_new: true,
        refusing_peers: 0,
    };
    /// Node 1's service fails (bit 0).
    const PEER_1_FAILING: Health = Health {
        refuse_new: false,
        refusing_peers: 0b1,
    };

    use FlowState::{Closing, Established, Open, SynSeen};

    const fn v(take: Take, forget: Forget) -> Verdict {
        Verdict { take, forget }
    }
    const DELIVER: Verdict = v(Take::Deliver, Forget::Nothing);
    const AT_RISK: Verdict = v(Take::DeliverAtRisk, Forget::Nothing);
    const LEARN: Verdict = v(Take::Learn, Forget::Nothing);
    const NOT_OWNED: Verdict = v(Take::NotOwned, Forget::Nothing);
    const GAP: Verdict = v(Take::ReleaseGap, Forget::Nothing);

    type Case = (
        &'static str,
        Role,
        bool,
        Packet,
        Health,
        Option<FlowState>,
        Option<FlowState>,
        Verdict,
    );

    /// Every branch of the rule: (what, role, release gap, packet, health, own table, learned,
    /// verdict).
    #[rustfmt::skip]
    fn cases() -> Vec<Case> {
        let owner = Role::Owner;
        let not_owner = Role::NotOwner;
        let learning = Role::Learning { from: n(1) };
        let releasing = Role::Releasing { to: n(2) };
        let acquiring = Role::Acquiring { from: n(1) };
        vec![
            // Owner.
            ("owner: a new flow", owner, false, SYN, HEALTHY, None, None, DELIVER),
            ("owner: a known flow", owner, false, ACK, HEALTHY, Some(Established), None, DELIVER),
            ("owner: UDP", owner, false, UDP, HEALTHY, None, None, DELIVER),
            ("owner: unknown TCP goes to the kernel (RST)", owner, false, ACK, HEALTHY, None, None, DELIVER),
            ("owner: the old owner's long flow", owner, false, ACK, HEALTHY, None, Some(Established), LEARN),
            ("owner: the old owner's UDP flow", owner, false, UDP, HEALTHY, None, Some(Open), LEARN),
            ("owner: learned but in its own table too", owner, false, ACK, HEALTHY, Some(Established), Some(Established), DELIVER),
            ("owner: the old owner's flow ended, its tuple starts again", owner, false, SYN, HEALTHY, None, Some(Closing), v(Take::Deliver, Forget::Learned)),
            ("owner: the old owner's flow ending, not a SYN", owner, false, ACK, HEALTHY, None, Some(Closing), LEARN),
            ("owner: a SYN of a live learned flow is the old owner's", owner, false, SYN, HEALTHY, None, Some(SynSeen), LEARN),
            ("owner, failing: no new connection", owner, false, SYN, FAILING, None, None, NOT_OWNED),
            ("owner, failing: a known connection's SYN", owner, false, SYN, FAILING, Some(SynSeen), None, DELIVER),
            ("owner, failing: known packets", owner, false, ACK, FAILING, Some(Established), None, DELIVER),
            ("owner, failing: unknown TCP still goes to the kernel", owner, false, ACK, FAILING, None, None, DELIVER),
            ("owner, failing: UDP", owner, false, UDP, FAILING, None, None, DELIVER),
            ("owner, failing: a SYN-ACK is no new connection", owner, false, SYN_ACK, FAILING, None, None, DELIVER),
            ("owner, failing: the old owner's ended tuple starts again, refused", owner, false, SYN, FAILING, None, Some(Closing), v(Take::NotOwned, Forget::Learned)),
            ("owner, failing: restarting a tuple it holds itself", owner, false, SYN, FAILING, Some(Closing), Some(Closing), v(Take::Deliver, Forget::Learned)),
            // Not owner.
            ("not owner: another node's", not_owner, false, SYN, HEALTHY, None, None, NOT_OWNED),
            ("not owner: UDP", not_owner, false, UDP, HEALTHY, None, None, NOT_OWNED),
            ("not owner: a flow it served before the bucket moved", not_owner, false, ACK, HEALTHY, Some(Established), None, DELIVER),
            ("not owner: its closing flow's last ACK", not_owner, false, ACK, HEALTHY, Some(Closing), None, DELIVER),
            ("not owner: its ended flow's tuple starts again", not_owner, false, SYN, HEALTHY, Some(Closing), None, v(Take::NotOwned, Forget::Own)),
            ("not owner: a retransmitted SYN it accepted", not_owner, false, SYN, HEALTHY, Some(SynSeen), None, DELIVER),
            ("not owner: ignores learned entries", not_owner, false, ACK, HEALTHY, None, Some(Established), NOT_OWNED),
            // Releasing.
            ("releasing: a flow of its table", releasing, false, ACK, HEALTHY, Some(Established), None, DELIVER),
            ("releasing: a SYN it accepted, retransmitted", releasing, true, SYN, HEALTHY, Some(SynSeen), None, DELIVER),
            ("releasing: UDP it serves", releasing, true, UDP, HEALTHY, Some(Open), None, DELIVER),
            ("releasing, gap: a new flow nobody takes", releasing, true, SYN, HEALTHY, None, None, GAP),
            ("releasing, gap: new UDP nobody takes", releasing, true, UDP, HEALTHY, None, None, GAP),
            ("releasing, acquire: a new flow is the new owner's", releasing, false, SYN, HEALTHY, None, None, NOT_OWNED),
            ("releasing, gap: its ended tuple starts again", releasing, true, SYN, HEALTHY, Some(Closing), None, v(Take::ReleaseGap, Forget::Own)),
            ("releasing, acquire: its ended tuple starts again", releasing, false, SYN, HEALTHY, Some(Closing), None, v(Take::NotOwned, Forget::Own)),
            ("releasing: its closing flow's FIN retransmitted", releasing, false, ACK, HEALTHY, Some(Closing), None, DELIVER),
            // Learning.
            ("learning: a new flow is the old owner's", learning, false, SYN, HEALTHY, None, None, LEARN),
            ("learning: UDP is the old owner's", learning, false, UDP, HEALTHY, None, None, LEARN),
            ("learning: a known flow kept fresh", learning, false, ACK, HEALTHY, None, Some(Established), LEARN),
            ("learning, gap: a new flow is nobody's", learning, true, SYN, HEALTHY, None, None, NOT_OWNED),
            ("learning, gap: new UDP is nobody's", learning, true, UDP, HEALTHY, None, None, NOT_OWNED),
            ("learning, gap: a known flow kept fresh", learning, true, ACK, HEALTHY, None, Some(Established), LEARN),
            ("learning: a SYN the failing old owner refuses", learning, false, SYN, PEER_1_FAILING, None, None, NOT_OWNED),
            ("learning: the failing old owner's known flow", learning, false, SYN, PEER_1_FAILING, None, Some(SynSeen), LEARN),
            ("learning: the failing old owner still serves UDP", learning, false, UDP, PEER_1_FAILING, None, None, LEARN),
            ("learning: the failing old owner's packets of known flows", learning, false, ACK, PEER_1_FAILING, None, None, LEARN),
            ("learning: its own flow, the bucket moving back", learning, false, ACK, HEALTHY, Some(Established), None, DELIVER),
            ("learning, gap: its own flow, the bucket moving back", learning, true, ACK, HEALTHY, Some(Established), None, DELIVER),
            ("learning: a SYN on its own ended flow is the old owner's", learning, false, SYN, HEALTHY, Some(Closing), None, LEARN),
            ("learning: another peer's failure changes nothing", learning, false, SYN, Health { refusing_peers: 0b10, ..HEALTHY }, None, None, LEARN),
            ("learning: its own failure changes nothing", learning, false, SYN, FAILING, None, None, LEARN),
            // Acquiring.
            ("acquiring: a flow of its table", acquiring, false, ACK, HEALTHY, Some(Established), Some(Established), DELIVER),
            ("acquiring: a new connection", acquiring, false, SYN, HEALTHY, None, None, DELIVER),
            ("acquiring: unknown TCP is the old owner's idle connection", acquiring, false, ACK, HEALTHY, None, None, NOT_OWNED),
            ("acquiring: unknown SYN-ACK is not a new connection", acquiring, false, SYN_ACK, HEALTHY, None, None, NOT_OWNED),
            ("acquiring: unlearned UDP, at a risk", acquiring, false, UDP, HEALTHY, None, None, AT_RISK),
            ("acquiring: the old owner's flow", acquiring, false, ACK, HEALTHY, None, Some(Established), LEARN),
            ("acquiring: the old owner's UDP flow", acquiring, false, UDP, HEALTHY, None, Some(Open), LEARN),
            ("acquiring: the old owner's ended tuple starts again", acquiring, false, SYN, HEALTHY, None, Some(Closing), v(Take::Deliver, Forget::Learned)),
            ("acquiring: the old owner's closing flow", acquiring, false, ACK, HEALTHY, None, Some(Closing), LEARN),
            ("acquiring: a learned SYN sent again", acquiring, false, SYN, HEALTHY, None, Some(SynSeen), v(Take::DeliverAtRisk, Forget::Learned)),
            ("acquiring: the ACK of a learned SYN", acquiring, false, ACK, HEALTHY, None, Some(SynSeen), LEARN),
            ("acquiring: a SYN of an established learned flow", acquiring, false, SYN, HEALTHY, None, Some(Established), LEARN),
            ("acquiring: health plays no part", acquiring, false, SYN, FAILING, None, None, DELIVER),
        ]
    }

    #[test]
    fn every_branch_of_the_rule() {
        for (what, role, gap, packet, health, own, learned, expected) in cases() {
            let tables = Known::new(own, learned);
            assert_eq!(
                verdict(role, gap, packet, health, &tables),
                expected,
                "{what}"
            );
        }
    }

    /// The release gap matters only to the two nodes of a moving bucket.
    #[test]
    fn the_gap_changes_only_a_moving_bucket() {
        for (what, role, gap, packet, health, own, learned, expected) in cases() {
            if matches!(role, Role::Owner | Role::NotOwner | Role::Acquiring { .. }) {
                let tables = Known::new(own, learned);
                assert_eq!(
                    verdict(role, !gap, packet, health, &tables),
                    expected,
                    "{what}"
                );
            }
        }
    }

    /// The common case costs no lookup before the delivery (the caller's upsert is the only
    /// table access), and no case asks more than twice.
    #[test]
    fn questions_asked() {
        let tables = Known::new(None, None);
        assert_eq!(verdict(Role::Owner, false, SYN, HEALTHY, &tables), DELIVER);
        // The learned table is asked (the caller answers "none" without looking while it is
        // empty); the own table is not.
        assert_eq!(tables.asked.get(), 1);
        for (what, role, gap, packet, health, own, learned, _) in cases() {
            let tables = Known::new(own, learned);
            verdict(role, gap, packet, health, &tables);
            assert!(tables.asked.get() <= 2, "{what}");
        }
    }

    type Input = (
        Role,
        bool,
        Packet,
        Health,
        Option<FlowState>,
        Option<FlowState>,
    );

    /// Every combination of roles, phases, packets, health and table contents.
    fn every_input() -> Vec<Input> {
        let roles = [
            Role::Owner,
            Role::NotOwner,
            Role::Learning { from: n(1) },
            Role::Releasing { to: n(2) },
            Role::Acquiring { from: n(1) },
        ];
        let fin_ack = Packet {
            tcp: true,
            flags: TcpFlags(0x11),
        };
        let packets = [SYN, ACK, SYN_ACK, fin_ack, UDP];
        let healths = [HEALTHY, FAILING, PEER_1_FAILING];
        let states = [
            None,
            Some(Open),
            Some(SynSeen),
            Some(Established),
            Some(Closing),
        ];
        let mut out = Vec::new();
        for role in roles {
            for gap in [false, true] {
                for packet in packets {
                    for health in healths {
                        for own in states {
                            for learned in states {
                                out.push((role, gap, packet, health, own, learned));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Over every input: the new owner delivers nothing while learning but its own earlier
    /// flows; only it takes a flow
    /// at a risk; the node that does not own the bucket learns nothing; only the old owner
    /// reports the release gap, and only in it; an own entry is forgotten only by a node that
    /// no longer takes new flows, when it had ended; a learned one only for a SYN, when it had
    /// ended or was a SYN itself; and a flow of the own table is delivered unless it starts
    /// again.
    #[test]
    fn what_each_role_may_do() {
        for (role, gap, packet, health, own, learned) in every_input() {
            let got = verdict(role, gap, packet, health, &Known::new(own, learned));
            let ctx = format!(
                "{role:?}, gap {gap}, {packet:?}, {health:?}, own {own:?}, learned {learned:?}: \
                 {got:?}"
            );
            let learning = matches!(role, Role::Learning { .. });
            let releasing = matches!(role, Role::Releasing { .. });
            let allowed = match got.take {
                // Learning, only a flow of its own table (served before the bucket moved).
                Take::Deliver => !learning || own.is_some(),
                Take::DeliverAtRisk => matches!(role, Role::Acquiring { .. }),
                Take::Learn => role != Role::NotOwner && !releasing,
                Take::ReleaseGap => releasing && gap,
                Take::NotOwned => true,
            };
            assert!(allowed, "{ctx}");
            let forgets = match got.forget {
                Forget::Nothing => true,
                Forget::Own => (role == Role::NotOwner || releasing) && own == Some(Closing),
                Forget::Learned => {
                    matches!(learned, Some(Closing | SynSeen)) && packet.flags.is_initial_syn()
                }
            };
            assert!(forgets, "{ctx}");
            if own.is_some() && !packet.opens_connection() {
                assert_eq!(got.take, Take::Deliver, "{ctx}");
            }
        }
    }

    /// The shortcut says "deliver" only where the rule does: over every input whose learned
    /// table is empty (no learned entry for any flow), and never with one learned entry.
    #[test]
    fn delivers_all_is_the_rule_s_answer() {
        let mut shortcuts = 0;
        for (role, gap, packet, health, own, learned) in every_input() {
            if !delivers_all(role, health, learned.is_some()) {
                continue;
            }
            shortcuts += 1;
            assert!(learned.is_none());
            let got = verdict(role, gap, packet, health, &Known::new(own, learned));
            assert_eq!(
                got,
                Verdict::DELIVER,
                "{role:?}, gap {gap}, {packet:?}, {health:?}, own {own:?}"
            );
        }
        // Owner x 2 phases x 5 packets x 2 healths that take new flows x 5 own states.
        assert_eq!(shortcuts, 2 * 5 * 2 * 5);
    }

    #[test]
    fn icmp_errors_go_where_the_quoted_flow_is_served() {
        let held = Known::new(Some(Established), None);
        let unknown = Known::new(None, Some(Established));
        let releasing = Role::Releasing { to: n(2) };
        let acquiring = Role::Acquiring { from: n(1) };
        for (role, quoted, expected) in [
            (Role::Owner, Some(&unknown), true),
            (Role::Owner, None, true),
            (Role::NotOwner, Some(&held), false),
            (Role::NotOwner, None, false),
            (Role::Learning { from: n(1) }, Some(&held), false),
            (Role::Learning { from: n(1) }, None, false),
            (releasing, Some(&held), true),
            (releasing, Some(&unknown), false),
            (releasing, None, false),
            (acquiring, Some(&held), true),
            (acquiring, Some(&unknown), false),
            (acquiring, None, true),
        ] {
            assert_eq!(
                serves_icmp_error(role, quoted),
                expected,
                "{role:?} {}",
                quoted.is_some()
            );
        }
    }
}
