//! Plans and snapshots: the table in force for this node, the messages it sends, and (on the
//! coordinator) proposing and advancing plans. Part of [`Membership`].

use super::*;

impl Membership {
    // ---------------------------------------------------------------- snapshot

    /// Dead members of the current plan (bit per node), as this node sees them now.
    pub(super) fn dead_members(&self) -> u64 {
        match &self.cur {
            Some(c) => members_bits(&c.plan) & !self.serving_bits(),
            None => 0,
        }
    }

    /// The members the effective target table is built from: `to − dead`; if none is live, the
    /// live members of `from`; if none, this node alone.
    pub(super) fn eff_members(&self) -> Vec<Member> {
        let Some(c) = &self.cur else {
            return Vec::new();
        };
        let live = self.serving_bits();
        let alive = |list: &[Member]| -> Vec<Member> {
            list.iter()
                .copied()
                .filter(|m| live & bit(m.id) != 0)
                .collect()
        };
        let v = alive(&c.plan.to);
        if !v.is_empty() {
            return v;
        }
        let v = alive(&c.plan.from);
        if !v.is_empty() {
            return v;
        }
        vec![Member {
            id: self.cfg.me,
            weight: self.weight,
        }]
    }

    /// The effective target table (`build(eff_members)`), cached per dead set.
    pub(super) fn eff_table(&mut self) -> Option<Arc<OwnershipTable>> {
        let dead = self.dead_members();
        let members = self.eff_members();
        let c = self.cur.as_mut()?;
        if dead & members_list_bits(&c.plan.to) == 0 && members == c.plan.to {
            return Some(c.to_table.clone());
        }
        if let Some((d, t)) = &c.eff {
            if *d == dead {
                return Some(t.clone());
            }
        }
        let t = Arc::new(
            OwnershipTable::build(c.plan.id.epoch, &members)
                .unwrap_or_else(|_| unreachable!("eff_members is never empty nor duplicated")),
        );
        c.eff = Some((dead, t.clone()));
        Some(t)
    }

    /// Whether the plan in force is one this node is a member of, past its learning phase: its
    /// peers no longer own its buckets outright.
    fn taken_back(&self) -> bool {
        let me = self.cfg.me;
        self.cur
            .as_ref()
            .is_some_and(|c| c.plan.phase as u8 >= Phase::Release as u8)
            && self.eff_members().iter().any(|m| m.id == me)
    }

    /// What the published snapshot is built from: the plan, its phase, the dead members,
    /// whether this node owns nothing, the obligations' generation, and whether peers stand in
    /// for this node after an outage of its data path (None: no plan yet).
    fn snapshot_key(&self, owns_nothing: bool) -> Option<(PlanId, Phase, u64, bool, u64, bool)> {
        let c = self.cur.as_ref()?;
        Some((
            c.plan.id,
            c.plan.phase,
            self.dead_members(),
            owns_nothing,
            self.linger.generation,
            self.stood_in,
        ))
    }

    /// Rebuilds and publishes the snapshot if the plan, phase or dead set changed.
    pub(super) fn refresh(&mut self, _now: u64, out: &mut Vec<Output>) {
        // Fenced, or waiting for a peer to stop standing in for it: it owns nothing.
        let owns_nothing = self.fenced || self.withholding();
        // Fenced for its own data path while a peer can stand in: the peers take its buckets
        // at once and serve every flow they see, and go on as owners, through the plan that
        // leaves it out and the first phase of the one that takes it back. Until that plan
        // releases buckets to it (from then on no peer takes an unknown flow of them), the
        // flows of its table are theirs when seen (see `obligations`).
        if self.fenced && self.fence_causes.outage() && self.a_peer_stands_in() {
            self.stood_in = true;
        }
        if self.stood_in && !owns_nothing && self.taken_back() {
            self.stood_in = false;
        }
        let Some(key) = self.snapshot_key(owns_nothing) else {
            return;
        };
        if self.snap_key == Some(key) {
            return;
        }
        let (next_plan, next_phase) = (key.0, key.1);
        if self
            .snap_key
            .is_some_and(|k| (k.0, k.1) != (next_plan, next_phase))
        {
            // A plan whose buckets moved is over: what it left becomes obligations (which
            // changes the key's generation).
            self.settle(next_plan, next_phase);
        }
        let Some(key) = self.snapshot_key(owns_nothing) else {
            return;
        };
        let dead = key.2;
        let Some(c) = &self.cur else { return };
        let old_dead = self
            .snap_key
            .filter(|k| k.0 == c.plan.id)
            .map_or(0, |k| k.2);
        let Some(eff) = self.eff_table() else { return };
        let Some(c) = &self.cur else { return };
        let (id, phase) = (c.plan.id, c.plan.phase);
        let is_dead = |n: NodeId| dead & bit(n) != 0;
        let snap = match (&c.from_table, phase) {
            (Some(from), Phase::Learn | Phase::Release | Phase::Acquire) => {
                let owner = |b: Bucket| {
                    let f = from.owner(b);
                    if is_dead(f) {
                        eff.owner(b)
                    } else {
                        f
                    }
                };
                let target = |b: Bucket| eff.owner(b);
                Snapshot::build(id, phase, owner, Some(&target), eff.digest())
            }
            _ => Snapshot::build(id, Phase::Done, |b| eff.owner(b), None, eff.digest()),
        };
        // Peers' buckets taken (this node's own, when it is fenced, are the others' to take).
        let peers_dead = dead & !bit(self.cfg.me);
        if peers_dead & !old_dead != 0 {
            out.push(Output::Event(Event::TakeOver { dead: peers_dead }));
        }
        self.snap_key = Some(key);
        let snap = self.obligations(snap.with_dead(dead));
        // The same plan and tables, but this node owns nothing in them.
        let snap = if owns_nothing {
            snap.without(self.cfg.me)
        } else {
            snap
        };
        self.snapshot = Arc::new(snap);
        out.push(Output::Publish(self.snapshot.clone()));
        self.check_drained(out);
    }

    // ---------------------------------------------------------------- sending

    pub(super) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub(super) fn send(&mut self, body: Body, out: &mut Vec<Output>) {
        let version = self.speaks();
        self.send_as(version, body, out);
    }

    pub(super) fn send_as(&mut self, version: u8, body: Body, out: &mut Vec<Output>) {
        for path in Path::ALL {
            let msg = Message {
                version,
                node: self.cfg.me,
                incarnation: self.cfg.incarnation,
                seq: self.next_seq(),
                path,
                config_digest: self.cfg.config_digest,
                body: body.clone(),
            };
            out.push(Output::Send {
                path,
                bytes: msg.encode(&self.cfg.key),
            });
        }
    }

    pub(super) fn send_heartbeat(&mut self, now: u64, out: &mut Vec<Output>) {
        self.last_heartbeat = Some(now);
        let plan = self.plan();
        let releasing = self.snapshot.releasers() & bit(self.cfg.me) != 0;
        let left = match (plan, self.report) {
            _ if !releasing => 0,
            (Some((id, _)), Some((rid, left))) if id == rid => left,
            _ => LEFT_UNKNOWN,
        };
        let report = self.wire_report();
        self.last_wire_report = report;
        let (wire_heard, wire_deaf, serving) = report;
        // Buckets held from earlier plans count too (see `linger.rs`).
        let left = match left {
            LEFT_UNKNOWN => LEFT_UNKNOWN,
            n => n.saturating_add(self.held_count()).min(LEFT_UNKNOWN - 1),
        };
        let hb = Heartbeat {
            node_mac: self.cfg.node_mac,
            weight: self.weight,
            load: self.load,
            draining: self.draining,
            refusing: self.refusing,
            fenced: self.fenced,
            wire_deaf,
            wire_heard,
            serving,
            view: self.live_bits(),
            plan,
            table_digest: self.snapshot.digest(),
            releasing_left: left,
        };
        self.heartbeats_sent += 1;
        let version = match self.speaks() {
            // Speaking an older version for an older peer: now and then say what we are.
            v if v < self.cfg.newest_version
                && self.heartbeats_sent.is_multiple_of(PROBE_EVERY) =>
            {
                self.cfg.newest_version
            }
            v => v,
        };
        self.send_as(version, Body::Heartbeat(hb), out);
    }

    pub(super) fn send_plan(&mut self, out: &mut Vec<Output>) {
        if let Some(c) = &self.cur {
            let plan = c.plan.clone();
            self.send(Body::Plan(plan), out);
        }
    }

    // ---------------------------------------------------------------- coordinating

    pub(super) fn coordinate(&mut self, now: u64, out: &mut Vec<Output>) {
        if self.cur.is_none() {
            return self.bootstrap(now, out);
        }
        if !self.is_coordinator() {
            self.coord.key = None;
            return;
        }
        let Some((id, phase)) = self.plan() else {
            return;
        };
        if self.coord.key != Some((id, phase)) {
            self.coord.key = Some((id, phase));
            self.coord.phase_started = now;
            self.coord.all_acked_at = None;
        }
        let advance = match phase {
            Phase::Learn => {
                if self.all_acked(id, Phase::Learn) {
                    let since = *self.coord.all_acked_at.get_or_insert(now);
                    now.saturating_sub(since) >= self.cfg.learn
                } else {
                    self.coord.all_acked_at = None;
                    false
                }
            }
            Phase::Release => self.all_acked(id, Phase::Release),
            Phase::Acquire => {
                self.releasers_done(id)
                    || now.saturating_sub(self.coord.phase_started) >= self.cfg.release_deadline
            }
            Phase::Done => {
                if let Some((from, to)) = self.next_plan(now) {
                    self.propose(from, to, now, out);
                }
                false
            }
        };
        if advance {
            if let Some(c) = &mut self.cur {
                c.plan.phase = phase.next();
                out.push(Output::Event(Event::PhaseChanged {
                    plan: id,
                    phase: c.plan.phase,
                }));
            }
            self.refresh(now, out);
            self.send_plan(out);
            self.send_heartbeat(now, out);
        }
    }

    /// Whether every live member of the plan has published `phase` (or later) of plan `id`.
    pub(super) fn all_acked(&self, id: PlanId, phase: Phase) -> bool {
        let Some(c) = &self.cur else { return false };
        let bits = members_bits(&c.plan) & !bit(self.cfg.me);
        self.peers.iter().enumerate().all(|(i, p)| {
            if bits & (1 << i) == 0 {
                return true;
            }
            match p {
                Some(p) if p.alive => {
                    p.hb.and_then(|h| h.plan)
                        .is_some_and(|(pid, ph)| pid == id && ph >= phase)
                }
                _ => true,
            }
        })
    }

    /// Whether every live releasing node reports 0 flows left for plan `id`.
    pub(super) fn releasers_done(&self, id: PlanId) -> bool {
        let releasers = self.snapshot.releasers();
        (0..64).all(|i| {
            if releasers & (1 << i) == 0 {
                return true;
            }
            if i == self.cfg.me.index() {
                return self.report == Some((id, 0));
            }
            match &self.peers[i] {
                Some(p) if p.alive => p.hb.is_some_and(|h| {
                    h.releasing_left == 0
                        && h.plan
                            .is_some_and(|(pid, ph)| pid == id && ph >= Phase::Release)
                }),
                _ => true,
            }
        })
    }

    /// The members this node would put in the table now: live, not draining, weighted by
    /// policy. `eff` is the effective table's membership (weights kept under `ByLoad`).
    pub(super) fn desired_members(&self, eff: &[Member]) -> Vec<Member> {
        let mut v = Vec::new();
        for i in 0..64usize {
            let id = node_of(i);
            let (draining, weight) = if id == self.cfg.me {
                (self.draining || self.fenced, self.weight)
            } else {
                match &self.peers[i] {
                    Some(p) if p.alive => match (&p.hb, eff.iter().find(|m| m.id == id)) {
                        (Some(h), _) => (h.draining || h.fenced, h.weight),
                        (None, Some(m)) => (false, m.weight),
                        (None, None) => continue,
                    },
                    _ => continue,
                }
            };
            if draining {
                continue;
            }
            let weight = match self.cfg.policy {
                Policy::Hash => Weight::new(HASH_WEIGHT).unwrap_or(weight),
                Policy::Weighted => weight,
                Policy::ByLoad => eff.iter().find(|m| m.id == id).map_or(weight, |m| m.weight),
            };
            v.push(Member { id, weight });
        }
        if v.is_empty() {
            // Everybody drains: nobody to hand over to, keep what is.
            return eff.to_vec();
        }
        v
    }

    /// At `Done`: the next plan `(from, to)`, if the cluster should change.
    pub(super) fn next_plan(&mut self, now: u64) -> Option<(Vec<Member>, Vec<Member>)> {
        let eff = self.eff_members();
        let desired = self.desired_members(&eff);
        let c = self.cur.as_ref()?;
        if desired != eff {
            return Some((eff, desired));
        }
        if eff != c.plan.to || c.plan.from != c.plan.to {
            // Formalize deaths (and a finished plan's table) as a plan with no moves.
            return Some((eff.clone(), eff));
        }
        if self.cfg.policy == Policy::ByLoad {
            if let Some(to) = self.rebalance(now, &eff) {
                return Some((eff, to));
            }
        }
        None
    }

    /// Creates, adopts and sends a plan from `from` to `to`.
    pub(super) fn propose(
        &mut self,
        from: Vec<Member>,
        to: Vec<Member>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        let epoch = self.max_epoch_seen.max(self.epoch()) + 1;
        self.max_epoch_seen = epoch;
        let (Ok(from_t), Ok(to_t)) = (
            OwnershipTable::build(epoch, &from),
            OwnershipTable::build(epoch, &to),
        ) else {
            return;
        };
        let phase = if from_t.digest() == to_t.digest() {
            Phase::Done
        } else {
            Phase::Learn
        };
        let plan = Plan {
            id: PlanId {
                epoch,
                proposer: self.cfg.me,
            },
            phase,
            from_digest: from_t.digest(),
            to_digest: to_t.digest(),
            from,
            to,
        };
        self.adopt(plan, Some(Arc::new(from_t)), Arc::new(to_t), now, out);
        self.send_plan(out);
    }

    /// A plan-less node alone long enough (and lowest among plan-less live nodes) starts the
    /// cluster with the live nodes.
    pub(super) fn bootstrap(&mut self, now: u64, out: &mut Vec<Output>) {
        let Some(started) = self.started else { return };
        let span = self.cfg.dead_span();
        if now.saturating_sub(started) < span + self.cfg.interval {
            return;
        }
        // Alone but hearing messages we must refuse: we may be the misconfigured one.
        let alone = self.live_bits() == bit(self.cfg.me);
        if alone
            && self
                .last_auth_refusal
                .is_some_and(|t| now.saturating_sub(t) < span)
        {
            return;
        }
        let someone_has_plan = self
            .peers
            .iter()
            .flatten()
            .any(|p| p.alive && p.hb.is_some_and(|h| h.plan.is_some()));
        if someone_has_plan || !self.is_coordinator() {
            return;
        }
        let members = self.desired_members(&[]);
        if members.is_empty() {
            return;
        }
        self.propose(members.clone(), members, now, out);
    }

    /// By-load: new weights if loads are off by more than the hysteresis, scaled down until at
    /// most `rebalance_max_moved_permille` of the buckets move.
    pub(super) fn rebalance(&mut self, now: u64, eff: &[Member]) -> Option<Vec<Member>> {
        let every = self.cfg.rebalance_every;
        if now.saturating_sub(self.coord.phase_started) < every
            || now.saturating_sub(self.coord.last_rebalance) < every
            || eff.len() < 2
        {
            return None;
        }
        self.coord.last_rebalance = now;
        let loads: Vec<Load> = eff
            .iter()
            .map(|m| {
                if m.id == self.cfg.me {
                    Some(self.load)
                } else {
                    self.peers[m.id.index()]
                        .as_ref()
                        .and_then(|p| p.hb.map(|h| h.load))
                }
            })
            .collect::<Option<_>>()?;
        let rel = relative_loads(&loads)?;
        let hysteresis = f64::from(self.cfg.rebalance_hysteresis_permille) / 1000.0;
        if rel.iter().all(|r| (r - 1.0).abs() <= hysteresis) {
            return None;
        }
        let current = self.eff_table()?;
        let limit = u64::from(self.cfg.rebalance_max_moved_permille) * BUCKETS as u64 / 1000;
        for alpha in [1.0, 0.5, 0.25, 0.125] {
            let next: Vec<Member> = eff
                .iter()
                .zip(&rel)
                .map(|(m, r)| {
                    let f = r.clamp(0.25, 4.0).powf(-alpha);
                    let w = (f64::from(m.weight.get()) * f).round().clamp(1.0, 1e9) as u32;
                    Member {
                        id: m.id,
                        weight: Weight::new(w).unwrap_or(m.weight),
                    }
                })
                .collect();
            if next == eff {
                return None;
            }
            let cand = OwnershipTable::build(0, &next).ok()?;
            let moved = current.moves(&cand).count() as u64;
            if moved <= limit {
                return Some(next);
            }
        }
        None
    }
}
