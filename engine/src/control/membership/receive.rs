//! Receiving: refusals, version checks, liveness of a message's sender, and whether a plan it
//! carries is followed. Part of [`Membership`]; never sends anything but through its outputs.

use super::*;

impl Membership {
    // ---------------------------------------------------------------- receiving

    pub(super) fn refuse(&mut self, path: Path, r: Refusal, now: u64) {
        self.refused[path.index()][r.index()] += 1;
        // Junk on the wire (not a genuine message's late or duplicate copy).
        let junk = matches!(
            r,
            Refusal::Malformed
                | Refusal::UnknownVersion
                | Refusal::BadMac
                | Refusal::WrongPath
                | Refusal::WrongDigest
        );
        if path == Path::Wire && junk {
            self.note_wire_noise(now);
        }
        if matches!(r, Refusal::BadMac | Refusal::WrongDigest) {
            self.last_auth_refusal = Some(now);
        }
    }

    /// Counts a message of an unknown version, and says so the first time and once a minute.
    pub(super) fn refuse_version(
        &mut self,
        path: Path,
        bytes: &[u8],
        now: u64,
        out: &mut Vec<Output>,
    ) {
        self.refuse(path, Refusal::UnknownVersion, now);
        let (version, node) = (bytes[2], bytes[5]);
        let due = match self.version_logged.iter_mut().find(|(v, _)| *v == version) {
            Some((_, at)) if now.saturating_sub(*at) < LOG_EVERY => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                // 256 versions at most: the list stays small.
                self.version_logged.push((version, now));
                true
            }
        };
        if due {
            let oldest = self.cfg.newest_version.saturating_sub(1).max(1);
            out.push(Output::Event(Event::VersionRefused {
                version,
                node,
                understood: (oldest, self.cfg.newest_version),
            }));
        }
    }

    /// The format version this node speaks now: the newest every live peer understands (its
    /// own newest when no peer is live, or none has been heard yet).
    pub fn speaks(&self) -> u8 {
        self.peers
            .iter()
            .flatten()
            .filter(|p| p.alive && p.version != 0)
            .map(|p| p.version)
            .fold(self.cfg.newest_version, u8::min)
            .max(PREVIOUS_VERSION)
    }

    /// `msg` was refused as stale: its sender restarted with a smaller incarnation than the
    /// one held for it (its clock stepped back since an earlier run), or it is an old message
    /// replayed, or another process runs with the same node id. Once the run held has fallen
    /// silent (nothing from it on either path for an interval and a half: it stopped), tells
    /// the sender which incarnation it must exceed, once a heartbeat interval at most, while
    /// every live peer can read the notice: a node restarted at once is told before its last
    /// run is declared dead (`dead_after` intervals), and rejoins as any restart does. While
    /// the run held still talks, nothing: of two processes with one id the later-started keeps
    /// its place while it talks (told, the other would raise its own above it, then the first
    /// above that, each raise a rejoin, forever; should it fall silent for an interval and a
    /// half, the other is told and takes its place), and a live node's old messages replayed
    /// draw nothing.
    pub(super) fn notice_stale(&mut self, msg: &Message, now: u64, out: &mut Vec<Output>) {
        // The refused run must read it too (a node restarted on an older release cannot).
        if self.speaks() < STALE_NOTICE_VERSION || msg.version < STALE_NOTICE_VERSION {
            return;
        }
        let every = self.cfg.interval;
        let Some(peer) = self.peers[msg.node.index()].as_mut() else {
            return;
        };
        let talking = peer
            .last_seen
            .iter()
            .flatten()
            .any(|&at| now.saturating_sub(at) < every + every / 2);
        if talking
            || peer
                .noticed_stale
                .is_some_and(|at| now.saturating_sub(at) < every)
        {
            return;
        }
        peer.noticed_stale = Some(now);
        let notice = StaleNotice {
            node: msg.node,
            known: peer.incarnation,
        };
        self.send(Body::StaleNotice(notice), out);
    }

    /// Peer `by` says it holds incarnation `notice.known` for `notice.node`. If that is this
    /// node and above its own incarnation, every peer that ran alongside an earlier run of this
    /// node refuses it: it goes on above. Otherwise (another node's notice, or one about an
    /// older message of this run, replayed) nothing changes.
    pub(super) fn noticed_stale(
        &mut self,
        by: NodeId,
        notice: StaleNotice,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        // `known` equal to this node's own: peers hold this very incarnation, accept this
        // node's messages and refused an older one, replayed.
        if notice.node != self.cfg.me || notice.known <= self.cfg.incarnation {
            return;
        }
        // No incarnation above the largest: the peers would refuse this one's fresh sequence
        // numbers as replays. Not a clock's value in this era: left as it is.
        let Some(raised) = notice.known.checked_add(1) else {
            return;
        };
        if self.own_past.len() == OWN_PAST_KEPT {
            self.own_past.remove(0);
        }
        self.own_past.push(self.cfg.incarnation);
        self.cfg.incarnation = raised;
        out.push(Output::Event(Event::IncarnationRaised {
            by,
            incarnation: self.cfg.incarnation,
        }));
        // Heard at once, not an interval later: before its last run is declared dead, if it
        // restarted quickly.
        self.send_heartbeat(now, out);
    }

    /// `msg`, authenticated, has this node's id and another run's incarnation: says so (the
    /// first time, then at most once a minute). A duplicate node id is a configuration error
    /// the peers cannot see (they follow the run that started later and refuse the other),
    /// while the run they refuse would still own the id's buckets by the plans it hears: a
    /// run that hears a later one fences itself ([`FenceReasons::SUPERSEDED`]) until that one
    /// has been silent for `dead_after` intervals.
    fn duplicate_id(&mut self, msg: &Message, now: u64, out: &mut Vec<Output>) {
        if msg.incarnation > self.cfg.incarnation {
            self.superseded_at = Some(now);
            self.update_fence(now, out);
        }
        if self
            .duplicate_logged
            .is_some_and(|at| now.saturating_sub(at) < LOG_EVERY)
        {
            return;
        }
        self.duplicate_logged = Some(now);
        out.push(Output::Event(Event::DuplicateId {
            incarnation: msg.incarnation,
            path: msg.path,
            later: msg.incarnation > self.cfg.incarnation,
        }));
    }

    /// Replay and incarnation checks; records liveness of an accepted message's sender.
    pub(super) fn accept(
        &mut self,
        msg: &Message,
        now: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), Refusal> {
        if msg.node == self.cfg.me {
            // Its own message come back (this run, before or since a raise) says nothing more
            // than the count.
            if msg.incarnation != self.cfg.incarnation && !self.own_past.contains(&msg.incarnation)
            {
                self.duplicate_id(msg, now, out);
            }
            return Err(Refusal::FromSelf);
        }
        let pi = msg.path.index();
        let slot = &mut self.peers[msg.node.index()];
        let peer = slot.get_or_insert_with(|| Peer::new(msg.incarnation, None, false));
        if msg.incarnation < peer.incarnation {
            return Err(Refusal::Stale);
        }
        if msg.incarnation > peer.incarnation {
            let heard_before = peer.last_seen.iter().any(Option::is_some);
            peer.incarnation = msg.incarnation;
            peer.last_seq = [0; 2];
            peer.hb = None;
            peer.hb_seq = 0;
            // A new run: its wire path gets the grace of a node that just came up.
            peer.alive_since = now;
            // A restart may be a downgrade: its newest version is learned again.
            peer.version = 0;
            if heard_before {
                out.push(Output::Event(Event::PeerRejoined {
                    node: msg.node,
                    incarnation: msg.incarnation,
                }));
            }
        }
        if msg.seq <= peer.last_seq[pi] {
            return Err(Refusal::Replayed);
        }
        // Each message goes out once per path with its own sequence number: on one path,
        // consecutive messages of a sender differ by the number of paths.
        let step = Path::ALL.len() as u64;
        if peer.last_seq[pi] != 0 {
            let gap = (msg.seq - peer.last_seq[pi]) / step;
            peer.lost[pi] += gap.saturating_sub(1);
        }
        peer.last_seq[pi] = msg.seq;
        peer.version = peer.version.max(msg.version);
        peer.last_seen[pi] = Some(now);
        peer.silent[pi] = 0;
        if !peer.alive {
            peer.alive = true;
            peer.alive_since = now;
            out.push(Output::Event(Event::PeerUp {
                node: msg.node,
                incarnation: msg.incarnation,
            }));
        }
        Ok(())
    }

    pub(super) fn consider_plan(
        &mut self,
        plan: Plan,
        now: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), Refusal> {
        self.max_epoch_seen = self.max_epoch_seen.max(plan.id.epoch);
        match &mut self.cur {
            Some(c) if c.plan.id == plan.id => {
                if c.plan.from != plan.from || c.plan.to != plan.to {
                    return Err(Refusal::TableMismatch);
                }
                if plan.phase > c.plan.phase {
                    c.plan.phase = plan.phase;
                    out.push(Output::Event(Event::PhaseChanged {
                        plan: plan.id,
                        phase: plan.phase,
                    }));
                    self.refresh(now, out);
                    self.send_heartbeat(now, out);
                }
                Ok(())
            }
            Some(c) if !plan.id.newer_than(c.plan.id) => Ok(()),
            _ => {
                let to_table = OwnershipTable::build(plan.id.epoch, &plan.to)
                    .map_err(|_| Refusal::Malformed)?;
                if to_table.digest() != plan.to_digest {
                    return Err(Refusal::TableMismatch);
                }
                let from_table = if plan.from == plan.to {
                    Some(Arc::new(to_table.clone()))
                } else if plan.from.is_empty() {
                    None
                } else {
                    let t = OwnershipTable::build(plan.id.epoch, &plan.from)
                        .map_err(|_| Refusal::Malformed)?;
                    Some(Arc::new(t))
                };
                if from_table.as_ref().map_or(0, |t| t.digest()) != plan.from_digest
                    && !plan.from.is_empty()
                {
                    return Err(Refusal::TableMismatch);
                }
                self.adopt(plan, from_table, Arc::new(to_table), now, out);
                Ok(())
            }
        }
    }

    pub(super) fn adopt(
        &mut self,
        plan: Plan,
        from_table: Option<Arc<OwnershipTable>>,
        to_table: Arc<OwnershipTable>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        // Members we never heard are presumed live for `dead_after` intervals from now: taking
        // their buckets at once could take buckets a live node still serves.
        for m in plan.from.iter().chain(&plan.to) {
            if m.id == self.cfg.me {
                continue;
            }
            let slot = &mut self.peers[m.id.index()];
            if slot.is_none() {
                *slot = Some(Peer::new(0, Some(now), true));
            }
        }
        let moving = match &from_table {
            Some(f) => f.moves(&to_table).count() as u32,
            None => 0,
        };
        out.push(Output::Event(Event::PlanAdopted {
            plan: plan.id,
            phase: plan.phase,
            members: plan.to.clone(),
            moving,
        }));
        self.cur = Some(Current {
            plan,
            from_table,
            to_table,
            eff: None,
        });
        self.report = None;
        self.refresh(now, out);
        self.send_heartbeat(now, out);
    }
}
