//! The node's timeline: the last membership and handoff steps this node took, each with the
//! wall-clock time it took it, as `status` reports them.
//!
//! Why it exists: a state that lasts a few hundred milliseconds (a peer seen `draining`, a
//! plan in `Release`) can be missed by anyone who polls, on a slow machine or a fast one. The
//! steps themselves stay: "plan 7 (members 1) adopted at t, reached Acquire at t + 1 s". The lab
//! measures its scenarios from these (the lab crate's `measure`), and an operator reads what
//! happened after the fact.
//!
//! It owns only the bounded list of steps and their typed form, shared by the node that writes
//! them and every reader of `status`. It never reads a clock: the caller stamps each step.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::membership::Event;
use super::message::Phase;

/// Steps kept; older ones are forgotten (a scenario needs the last few dozen at most).
pub const KEPT: usize = 64;

/// One step this node took, stamped with the wall-clock time (ms since the Unix epoch) at which
/// its control thread carried it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub at_ms: u64,
    #[serde(flatten)]
    pub what: What,
}

/// What happened (the log-worthy [`Event`]s that change who owns what).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum What {
    /// A plan followed from now on, in `phase`, towards the table of `members`.
    PlanAdopted {
        epoch: u64,
        proposer: u8,
        phase: Phase,
        members: Vec<u8>,
    },
    /// The followed plan reached `phase`.
    Phase {
        epoch: u64,
        proposer: u8,
        phase: Phase,
    },
    /// This node declared `peer` dead (both paths silent).
    PeerDead { peer: u8 },
    /// The buckets of the dead plan members (`dead`) were taken at once.
    TakeOver { dead: Vec<u8> },
    /// This node drained: it owns no bucket and serves no flow of a bucket it released.
    Drained,
    /// This node's drain reached its deadline: the flows it still served were cut.
    DrainCut,
    /// This node fenced itself (its wire port lost link: it owns nothing), or lifted its fence.
    Fenced { fenced: bool },
}

impl What {
    /// The step an [`Event`] is, if it changes ownership (peer up and rejoin are not steps).
    pub fn of(e: &Event) -> Option<What> {
        Some(match e {
            Event::PlanAdopted {
                plan,
                phase,
                members,
                ..
            } => What::PlanAdopted {
                epoch: plan.epoch,
                proposer: plan.proposer.get(),
                phase: *phase,
                members: members.iter().map(|m| m.id.get()).collect(),
            },
            Event::PhaseChanged { plan, phase } => What::Phase {
                epoch: plan.epoch,
                proposer: plan.proposer.get(),
                phase: *phase,
            },
            Event::PeerDead { node } => What::PeerDead { peer: node.get() },
            Event::TakeOver { dead } => What::TakeOver {
                dead: (1..=64u8)
                    .filter(|i| dead & (1u64 << (i - 1)) != 0)
                    .collect(),
            },
            Event::Drained => What::Drained,
            Event::DrainCut => What::DrainCut,
            Event::Fenced { fenced, .. } => What::Fenced { fenced: *fenced },
            Event::PeerUp { .. }
            | Event::PeerRejoined { .. }
            | Event::IncarnationRaised { .. }
            | Event::DuplicateId { .. }
            | Event::VersionRefused { .. }
            | Event::ServiceDown { .. }
            | Event::ServiceUp
            | Event::Terminating
            | Event::Stopping { .. }
            | Event::BackendDrainRelayed { .. }
            | Event::BackendDrainsAdopted { .. } => return None,
        })
    }
}

/// The last [`KEPT`] steps, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    steps: VecDeque<Step>,
}

impl Timeline {
    /// Records `e` at `at_ms` if it is a step.
    pub fn record(&mut self, at_ms: u64, e: &Event) {
        let Some(what) = What::of(e) else { return };
        if self.steps.len() == KEPT {
            self.steps.pop_front();
        }
        self.steps.push_back(Step { at_ms, what });
    }

    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter()
    }
}

/// Reading a timeline: when a plan reached a phase, when a peer was found dead.
pub trait Steps {
    /// The first plan adopted at or after `since_ms` whose members satisfy `fits`: its
    /// (epoch, proposer) and adoption time.
    fn first_plan(&self, since_ms: u64, fits: impl Fn(&[u8]) -> bool) -> Option<((u64, u8), u64)>;
    /// When plan `id` was first followed in `phase` or a later one (adopted in it, or moved to
    /// it).
    fn reached(&self, id: (u64, u8), phase: Phase) -> Option<u64>;
    /// The first time at or after `since_ms` that this node found `peer` dead.
    fn found_dead(&self, since_ms: u64, peer: u8) -> Option<u64>;
    /// The first time at or after `since_ms` that `peer`'s buckets were taken over.
    fn took_over(&self, since_ms: u64, peer: u8) -> Option<u64>;
    /// The first time at or after `since_ms` that this node drained.
    fn drained(&self, since_ms: u64) -> Option<u64>;
}

impl Steps for [Step] {
    fn first_plan(&self, since_ms: u64, fits: impl Fn(&[u8]) -> bool) -> Option<((u64, u8), u64)> {
        self.iter().find_map(|s| match &s.what {
            What::PlanAdopted {
                epoch,
                proposer,
                members,
                ..
            } if s.at_ms >= since_ms && fits(members) => Some(((*epoch, *proposer), s.at_ms)),
            _ => None,
        })
    }

    fn reached(&self, id: (u64, u8), phase: Phase) -> Option<u64> {
        self.iter().find_map(|s| match &s.what {
            What::PlanAdopted {
                epoch,
                proposer,
                phase: p,
                ..
            }
            | What::Phase {
                epoch,
                proposer,
                phase: p,
            } if (*epoch, *proposer) == id && *p >= phase => Some(s.at_ms),
            _ => None,
        })
    }

    fn found_dead(&self, since_ms: u64, peer: u8) -> Option<u64> {
        self.iter()
            .find(|s| s.at_ms >= since_ms && s.what == What::PeerDead { peer })
            .map(|s| s.at_ms)
    }

    fn took_over(&self, since_ms: u64, peer: u8) -> Option<u64> {
        self.iter().find_map(|s| match &s.what {
            What::TakeOver { dead } if s.at_ms >= since_ms && dead.contains(&peer) => Some(s.at_ms),
            _ => None,
        })
    }

    fn drained(&self, since_ms: u64) -> Option<u64> {
        self.iter()
            .find(|s| s.at_ms >= since_ms && s.what == What::Drained)
            .map(|s| s.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Member, NodeId, Weight};
    use crate::control::PlanId;

    fn id(n: u8) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn adopted(epoch: u64, phase: Phase, members: &[u8]) -> Event {
        Event::PlanAdopted {
            plan: PlanId {
                epoch,
                proposer: id(1),
            },
            phase,
            members: members
                .iter()
                .map(|&m| Member {
                    id: id(m),
                    weight: Weight::new(100).unwrap(),
                })
                .collect(),
            moving: 0,
        }
    }

    fn phase(epoch: u64, phase: Phase) -> Event {
        Event::PhaseChanged {
            plan: PlanId {
                epoch,
                proposer: id(1),
            },
            phase,
        }
    }

    #[test]
    fn records_steps_and_reads_them_back() {
        let mut t = Timeline::default();
        t.record(900, &adopted(3, Phase::Done, &[1, 2]));
        t.record(
            1000,
            &Event::PeerUp {
                node: id(2),
                incarnation: 1,
            },
        );
        t.record(1100, &adopted(4, Phase::Learn, &[1]));
        t.record(2100, &phase(4, Phase::Release));
        t.record(2200, &phase(4, Phase::Acquire));
        t.record(2300, &Event::PeerDead { node: id(2) });
        t.record(2300, &Event::TakeOver { dead: 0b10 });
        t.record(3000, &phase(4, Phase::Done));
        let steps: Vec<Step> = t.steps().cloned().collect();
        assert_eq!(steps.len(), 7, "peer up is not a step");

        assert_eq!(
            steps.first_plan(1000, |m| !m.contains(&2)),
            Some(((4, 1), 1100))
        );
        assert_eq!(
            steps.first_plan(1000, |m| m.contains(&2)),
            None,
            "plan 3 came before"
        );
        assert_eq!(steps.reached((4, 1), Phase::Acquire), Some(2200));
        assert_eq!(steps.reached((4, 1), Phase::Release), Some(2100));
        assert_eq!(
            steps.reached((3, 1), Phase::Acquire),
            Some(900),
            "adopted when done"
        );
        assert_eq!(steps.reached((5, 1), Phase::Learn), None);
        assert_eq!(steps.took_over(2000, 2), Some(2300));
        assert_eq!(steps.took_over(2000, 3), None);
        assert_eq!(steps.found_dead(2000, 2), Some(2300));
        assert_eq!(steps.found_dead(2400, 2), None);
        assert_eq!(steps.drained(0), None);
    }

    #[test]
    fn keeps_the_last_steps() {
        let mut t = Timeline::default();
        for i in 0..(KEPT as u64 + 10) {
            t.record(i, &Event::Drained);
        }
        assert_eq!(t.steps().count(), KEPT);
        assert_eq!(t.steps().next().map(|s| s.at_ms), Some(10));
    }

    #[test]
    fn reads_as_json_a_person_can_follow() {
        let mut t = Timeline::default();
        t.record(5, &adopted(4, Phase::Learn, &[1]));
        t.record(6, &Event::TakeOver { dead: 0b110 });
        let json = serde_json::to_string(&t.steps().collect::<Vec<_>>()).unwrap();
        assert_eq!(
            json,
            r#"[{"at_ms":5,"step":"plan-adopted","epoch":4,"proposer":1,"phase":"Learn","members":[1]},{"at_ms":6,"step":"take-over","dead":[2,3]}]"#
        );
        let back: Vec<Step> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t.steps().cloned().collect::<Vec<_>>());
    }
}
