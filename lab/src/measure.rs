//! A scenario's timings, read from the nodes' own timelines (`status`'s `timeline`: the plans
//! they adopted, the phases those reached, the peers they found dead, each stamped when the
//! node acted), never from a state the lab happens to catch while polling.
//!
//! A drain's `draining` state, say, can last less than one poll on a fast machine; the step
//! "plan 7 without node 2 adopted at t" stays in the timeline. So the lab may poll as slowly as
//! it likes: every poll that reaches a node gives the whole recent story, and the timings are
//! the nodes' own stamps minus the moment the lab acted.
//!
//! This module owns the rule "which step of which node ends which timing"; it never talks to a
//! node (the scenario feeds it the replies).

use clonecluster::control::operator::Status;
use clonecluster::control::{Phase, Step, Steps};

use super::scenario::Scenario;

/// From the event to each milestone, in ms (None: not yet, or never within the scenario).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Every other node saw the event: it found the node dead (failover), or adopted the plan
    /// that adds it (join) or leaves it out (drain).
    pub detected_ms: Option<u64>,
    /// Every node sends new flows to their final owners: the dead node's buckets were taken
    /// over, or the plan reached Acquire on every node.
    pub moved_ms: Option<u64>,
    /// It is over: the plan reached Done everywhere (failover, join), or the drained node said
    /// it owns nothing (drain).
    pub done_ms: Option<u64>,
}

impl Timings {
    pub fn complete(&self) -> bool {
        self.detected_ms.is_some() && self.moved_ms.is_some() && self.done_ms.is_some()
    }
}

/// The latest timeline heard from each node (a node that stops answering keeps its last one).
#[derive(Debug, Clone)]
pub struct Observer {
    scenario: Scenario,
    /// The node killed, joined or drained.
    node: u8,
    /// Every node of the scenario, `node` included.
    ids: Vec<u8>,
    /// When the lab acted, ms since the Unix epoch (the nodes' stamps use the same clock).
    event_ms: u64,
    timelines: Vec<(u8, Vec<Step>)>,
}

impl Observer {
    pub fn new(scenario: Scenario, node: u8, ids: &[u8], event_ms: u64) -> Observer {
        Observer {
            scenario,
            node,
            ids: ids.to_vec(),
            event_ms,
            timelines: Vec::new(),
        }
    }

    /// Takes node `id`'s `status` reply (its `timeline`; a reply without one is ignored).
    pub fn observe(&mut self, id: u8, status: &Status) {
        let steps = status.timeline.clone();
        match self.timelines.iter_mut().find(|(i, _)| *i == id) {
            Some((_, t)) => *t = steps,
            None => self.timelines.push((id, steps)),
        }
    }

    fn timeline(&self, id: u8) -> Option<&[Step]> {
        self.timelines
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, t)| t.as_slice())
    }

    /// The latest of `f` over `nodes`: None unless every one of them has it.
    fn all(&self, nodes: &[u8], f: impl Fn(&[Step]) -> Option<u64>) -> Option<u64> {
        nodes
            .iter()
            .map(|&n| self.timeline(n).and_then(&f))
            .try_fold(0, |latest, t| Some(latest.max(t?)))
            .filter(|_| !nodes.is_empty())
    }

    /// The timings so far.
    pub fn timings(&self) -> Timings {
        let (node, since) = (self.node, self.event_ms);
        let others: Vec<u8> = self.ids.iter().copied().filter(|&i| i != node).collect();
        let after = |t: u64| t.saturating_sub(since);
        // The plan each node first followed after the event that has (join) or lacks (drain,
        // failover) the node, and when that plan reached `phase` on every one of `nodes`.
        let has = |with: bool| move |m: &[u8]| m.contains(&node) == with;
        let plan_reached = |nodes: &[u8], with: bool, exact: bool, phase: Phase| {
            self.all(nodes, |t| {
                let fits = |m: &[u8]| has(with)(m) && (!exact || same_set(m, &others));
                let (plan, _) = t.first_plan(since, fits)?;
                t.reached(plan, phase)
            })
        };
        let t = match self.scenario {
            Scenario::Failover | Scenario::WireCut => Timings {
                // A cut node stays alive on the control network: the others see it when they
                // take its buckets.
                detected_ms: self.all(&others, |t| {
                    t.found_dead(since, node)
                        .or(if self.scenario == Scenario::WireCut {
                            t.took_over(since, node)
                        } else {
                            None
                        })
                }),
                moved_ms: self.all(&others, |t| t.took_over(since, node)),
                // The coordinator formalizes the loss with a plan of the survivors.
                done_ms: plan_reached(&others, false, true, Phase::Done),
            },
            Scenario::Join => Timings {
                detected_ms: self.all(&others, |t| Some(t.first_plan(since, has(true))?.1)),
                moved_ms: plan_reached(&self.ids, true, false, Phase::Acquire),
                done_ms: plan_reached(&self.ids, true, false, Phase::Done),
            },
            Scenario::Drain => Timings {
                detected_ms: self.all(&others, |t| Some(t.first_plan(since, has(false))?.1)),
                moved_ms: plan_reached(&self.ids, false, false, Phase::Acquire),
                done_ms: self.all(&[node], |t| t.drained(since)),
            },
        };
        Timings {
            detected_ms: t.detected_ms.map(after),
            moved_ms: t.moved_ms.map(after),
            done_ms: t.done_ms.map(after),
        }
    }
}

fn same_set(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clonecluster::control::operator::NodeState;

    /// Status replies as node 1 and node 2 gave them while node 2 drained, after a line with
    /// the moment the lab asked for the drain (recorded from a lab run's polls, one in five
    /// kept): no poll ever shows node 2 `draining` among the members; by the first poll after the
    /// drain it is already `drained`, outside the table.
    const DRAIN_POLLS: &str = include_str!("../../tests/fixtures/drain-status-polls.jsonl");

    #[test]
    fn drain_timings_come_from_the_plan_even_if_draining_is_never_seen() {
        let mut lines = DRAIN_POLLS.lines().filter(|l| !l.trim().is_empty());
        let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        let event_ms = head["event_ms"].as_u64().unwrap();
        let mut obs = Observer::new(Scenario::Drain, 2, &[1, 2], event_ms);
        let mut seen_draining = false;
        let mut polls = 0;
        for line in lines {
            let reply: Status = serde_json::from_str(line).unwrap();
            seen_draining |= reply.nodes().any(|m| m.state == NodeState::Draining);
            obs.observe(reply.node, &reply);
            polls += 1;
        }
        assert!(polls >= 4, "the fixture has the polls");
        assert!(
            !seen_draining,
            "the fixture is the case the old polling missed"
        );
        assert_eq!(
            obs.timings(),
            Timings {
                // Node 1 adopted the plan without node 2 26 ms after the drain was asked for.
                detected_ms: Some(26),
                // Node 2 reached Acquire last.
                moved_ms: Some(1_097),
                // Node 2's keep-alive connections kept it serving past the recording.
                done_ms: None,
            }
        );
    }

    fn step(at_ms: u64, json: serde_json::Value) -> serde_json::Value {
        let mut j = json;
        j["at_ms"] = at_ms.into();
        j
    }

    fn status(steps: Vec<serde_json::Value>) -> Status {
        serde_json::from_value(serde_json::json!({
            "node": 1, "epoch": 1, "phase": "Done", "moving": 0, "draining": false,
            "drained": false, "refusing": false, "healthy": null, "members": [], "outside": [],
            "timeline": steps,
        }))
        .unwrap()
    }

    #[test]
    fn failover_timings_wait_for_every_survivor() {
        let dead = |at| step(at, serde_json::json!({"step": "peer-dead", "peer": 3}));
        let take = |at| step(at, serde_json::json!({"step": "take-over", "dead": [3]}));
        let plan = |at, phase| {
            step(
                at,
                serde_json::json!({"step": "plan-adopted", "epoch": 9, "proposer": 1,
                                   "phase": phase, "members": [1, 2]}),
            )
        };
        let mut obs = Observer::new(Scenario::Failover, 3, &[1, 2, 3], 1000);
        // A step before the event is not the event's.
        obs.observe(1, &status(vec![dead(900), dead(1300), take(1300)]));
        assert_eq!(obs.timings(), Timings::default(), "node 2 not heard yet");
        obs.observe(2, &status(vec![dead(1350), take(1351), plan(2000, "Done")]));
        let t = obs.timings();
        assert_eq!(
            (t.detected_ms, t.moved_ms, t.done_ms),
            (Some(350), Some(351), None)
        );
        obs.observe(1, &status(vec![take(1300), plan(1900, "Learn")]));
        assert_eq!(obs.timings().done_ms, None, "node 1's plan is not done");
        obs.observe(
            1,
            &status(vec![
                take(1300),
                plan(1900, "Learn"),
                step(
                    2500,
                    serde_json::json!({"step": "phase", "epoch": 9, "proposer": 1,
                                             "phase": "Done"}),
                ),
            ]),
        );
        let t = obs.timings();
        assert_eq!(t.done_ms, Some(1500));
        assert_eq!(
            t.detected_ms, None,
            "node 1's newest timeline lost its peer-dead step"
        );
    }

    #[test]
    fn join_timings_follow_the_plan_that_adds_the_node() {
        let plan = |at, epoch, members: &[u8]| {
            step(
                at,
                serde_json::json!({"step": "plan-adopted", "epoch": epoch, "proposer": 1,
                                   "phase": "Learn", "members": members}),
            )
        };
        let phase = |at, epoch, ph: &str| {
            step(
                at,
                serde_json::json!({"step": "phase", "epoch": epoch, "proposer": 1, "phase": ph}),
            )
        };
        let mut obs = Observer::new(Scenario::Join, 2, &[1, 2], 10_000);
        obs.observe(
            1,
            &status(vec![
                plan(9_000, 4, &[1]),
                plan(10_400, 5, &[1, 2]),
                phase(11_400, 5, "Release"),
                phase(11_500, 5, "Acquire"),
            ]),
        );
        obs.observe(
            2,
            &status(vec![plan(10_450, 5, &[1, 2]), phase(11_520, 5, "Acquire")]),
        );
        let t = obs.timings();
        assert_eq!(
            (t.detected_ms, t.moved_ms, t.done_ms),
            (Some(400), Some(1520), None)
        );
    }
}
