//! Fencing: whether this node may own buckets, from its own data path (wire link, packet cores)
//! and from what it and its peers hear on the wire, and when it may own them again. Part of
//! [`Membership`]; the rules and their table are in the module doc ("Liveness by the data
//! path"). Never owns anything on a guess: every rule here only ever takes buckets away from
//! this node, or gives them back once every live peer has said it no longer stands in for it.

use super::*;

/// Why a node is fenced: a set of reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct FenceReasons(u8);

impl FenceReasons {
    pub const NONE: FenceReasons = FenceReasons(0);
    /// The wire port has no link.
    pub const LINK_DOWN: FenceReasons = FenceReasons(1);
    /// A packet core stopped looping while awake.
    pub const CORE_STALLED: FenceReasons = FenceReasons(2);
    /// Peers are live (heard on UDP) but none is heard on the wire.
    pub const HEARS_NO_PEER_ON_WIRE: FenceReasons = FenceReasons(4);
    /// The peers that hear the wire do not hear this node on it.
    pub const UNHEARD_ON_WIRE: FenceReasons = FenceReasons(8);
    /// Its causes cleared, but its data path (link, cores) came back less than `dead_after`
    /// intervals ago, or a peer has not yet said it heard the fence.
    pub const SETTLING: FenceReasons = FenceReasons(16);
    /// Another process with this node id, started later, was heard less than `dead_after`
    /// intervals ago: the peers follow that one (they refuse this one's messages as stale),
    /// and the buckets of the id are its to serve.
    pub const SUPERSEDED: FenceReasons = FenceReasons(32);
    /// Every single reason, in the order they are listed.
    pub const ALL: [FenceReasons; 6] = [
        FenceReasons::LINK_DOWN,
        FenceReasons::CORE_STALLED,
        FenceReasons::HEARS_NO_PEER_ON_WIRE,
        FenceReasons::UNHEARD_ON_WIRE,
        FenceReasons::SETTLING,
        FenceReasons::SUPERSEDED,
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether a reason is this node's own data path ([`FenceReasons::LINK_DOWN`],
    /// [`FenceReasons::CORE_STALLED`]): nothing it could deliver meanwhile, its peers took
    /// its flows (see `Membership::refresh`).
    pub fn outage(self) -> bool {
        self.0 & (FenceReasons::LINK_DOWN.0 | FenceReasons::CORE_STALLED.0) != 0
    }

    /// Whether every reason of `other` (a nonempty set) is in this set.
    pub fn contains(self, other: FenceReasons) -> bool {
        other.0 != 0 && self.0 & other.0 == other.0
    }

    fn with(self, other: FenceReasons, on: bool) -> FenceReasons {
        if on {
            FenceReasons(self.0 | other.0)
        } else {
            self
        }
    }

    /// The single reasons in this set.
    pub fn iter(self) -> impl Iterator<Item = FenceReasons> {
        FenceReasons::ALL
            .into_iter()
            .filter(move |r| self.contains(*r))
    }

    /// A single reason's label for metrics and `status`: `link-down`, `core-stalled`,
    /// `hears-no-peer-on-wire`, `unheard-on-wire`, `settling`, `superseded` ("" for a set).
    pub fn label(self) -> &'static str {
        match self.0 {
            1 => "link-down",
            2 => "core-stalled",
            4 => "hears-no-peer-on-wire",
            8 => "unheard-on-wire",
            16 => "settling",
            32 => "superseded",
            _ => "",
        }
    }

    /// The reasons in words, for a log line.
    pub fn words(self) -> String {
        let words: Vec<&str> = self
            .iter()
            .map(|r| match r.0 {
                1 => "the wire port has no link",
                2 => "a packet core stalled",
                4 => "it hears no peer on the wire (peers are live on the control network)",
                8 => "no peer hears it on the wire",
                32 => "another process runs with this node id and started later",
                _ => "waiting for the cluster to hear that it is back",
            })
            .collect();
        if words.is_empty() {
            "no reason".to_string()
        } else {
            words.join("; ")
        }
    }
}

impl Membership {
    /// The data path's word on the wire port's link. Down fences this node at once; back up,
    /// it stays fenced for `dead_after` intervals (see the module doc).
    pub fn set_wire_link(&mut self, up: bool, now: u64, out: &mut Vec<Output>) {
        self.wire_up = up;
        self.update_fence(now, out);
    }

    /// The control thread's word on the packet cores: `false` while one of them has stalled
    /// (it stopped looping while awake). Like a wire link down: the node fences itself, and
    /// stays fenced for `dead_after` intervals after every core loops again.
    pub fn set_cores_running(&mut self, up: bool, now: u64, out: &mut Vec<Output>) {
        self.cores_up = up;
        self.update_fence(now, out);
    }

    /// Whether this node is fenced (see the module doc).
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Why this node is fenced (empty when it is not).
    pub fn fence_reasons(&self) -> FenceReasons {
        if !self.fenced {
            return FenceReasons::NONE;
        }
        self.fence_causes
            .with(FenceReasons::SETTLING, self.fence_causes.is_empty())
    }

    /// Whether some live peer, not fenced itself, can take this node's buckets.
    pub(super) fn a_peer_stands_in(&self) -> bool {
        self.peers
            .iter()
            .flatten()
            .any(|p| p.alive && p.hb.is_some_and(|h| !h.fenced))
    }

    /// Whether this node, unfenced, still owns nothing because a live peer has not yet said
    /// it no longer stands in for it (see the module doc).
    pub fn withholding(&self) -> bool {
        let me = bit(self.cfg.me);
        !self.fenced
            && self
                .peers
                .iter()
                .flatten()
                .any(|p| p.alive && p.hb.is_some_and(|h| h.serving & me == 0))
    }

    /// Re-evaluates the fence: its causes now, and `dead_after` intervals of settling after
    /// a data path outage. Says so (event, heartbeat) when it changes; sends a heartbeat when
    /// the wire report changes, so that a peer waiting for it hears it at once.
    pub(super) fn update_fence(&mut self, now: u64, out: &mut Vec<Output>) {
        let causes = self.fence_causes_now(now);
        // Settling follows a data path outage only: a node fenced by the wire rules heard the
        // cluster's plan all along on UDP.
        let path = |r: FenceReasons| {
            r.contains(FenceReasons::LINK_DOWN) || r.contains(FenceReasons::CORE_STALLED)
        };
        if path(self.fence_causes) && !path(causes) {
            self.data_path_up_since = Some(now);
        }
        self.fence_causes = causes;
        let settling = self
            .data_path_up_since
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.dead_span());
        let fenced = !causes.is_empty() || settling || (self.fenced && !self.fence_heard());
        if fenced != self.fenced {
            self.fenced = fenced;
            let reasons = self.fence_reasons();
            out.push(Output::Event(Event::Fenced { fenced, reasons }));
            self.refresh(now, out);
            self.send_heartbeat(now, out);
        } else if self.last_heartbeat.is_some() && self.wire_report() != self.last_wire_report {
            self.send_heartbeat(now, out);
        }
    }

    /// Whether every live peer whose heartbeat this node holds has said it no longer counts
    /// this node as serving: it heard the fence, so a report of it that counts this node again
    /// can only follow the lift (heartbeats are taken in sequence order), and withholding
    /// waits for exactly that.
    fn fence_heard(&self) -> bool {
        let me = bit(self.cfg.me);
        self.peers
            .iter()
            .flatten()
            .all(|p| !p.alive || p.hb.is_none_or(|h| h.serving & me == 0))
    }

    /// What this node's heartbeats report on the wire and on whom it lets own buckets:
    /// (wire_heard, wire_deaf, serving).
    pub(super) fn wire_report(&self) -> (u64, bool, u64) {
        (self.wire_heard(), self.wire_deaf(), self.serving_bits())
    }

    fn fence_causes_now(&self, now: u64) -> FenceReasons {
        let wire_rules = self.wire_up && self.cores_up;
        let superseded = self
            .superseded_at
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.dead_span());
        FenceReasons::NONE
            .with(FenceReasons::SUPERSEDED, superseded)
            .with(FenceReasons::LINK_DOWN, !self.wire_up)
            .with(FenceReasons::CORE_STALLED, !self.cores_up)
            .with(
                FenceReasons::HEARS_NO_PEER_ON_WIRE,
                wire_rules && self.wire_deaf() && !self.deaf_but_kept(),
            )
            .with(FenceReasons::UNHEARD_ON_WIRE, wire_rules && self.unheard())
    }

    /// Whether live peer `p` is silent on the wire: heard on UDP at least `dead_after`
    /// intervals after its last wire message (or after it came up). A stopped peer, silent
    /// on both paths, never is: it is found dead instead.
    fn wire_silent(&self, p: &Peer) -> bool {
        let since = p.last_seen[Path::Wire.index()]
            .unwrap_or(0)
            .max(p.alive_since);
        let span = self.cfg.dead_span();
        let udp = p.last_seen[Path::Udp.index()];
        // Control frames this node could not use came in since, or a receive queue was backed
        // up, within the last span (as of the peer's last UDP message): the wire carries
        // frames, and the peer's heartbeats may be lost among them (a flood filling the queue
        // or the ring before it). That is no evidence of a dead wire path, and must not fence
        // anyone.
        let noisy = self
            .last_wire_noise
            .is_some_and(|t| t > since && udp.is_some_and(|u| t.saturating_add(span) > u));
        p.alive && !noisy && udp.is_some_and(|u| u >= since.saturating_add(span))
    }

    /// The wire brought control frames this node could not use at `now`: refused (forged,
    /// replayed, malformed, another cluster's) or dropped because their queue was full; or a
    /// receive queue was backed up (frames may have been lost before the data path saw
    /// them).
    pub fn note_wire_noise(&mut self, now: u64) {
        self.last_wire_noise = Some(now);
    }

    /// Bit `id - 1` per live peer not silent on the wire (this node's wire report).
    pub fn wire_heard(&self) -> u64 {
        let mut bits = 0;
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref().is_some_and(|p| p.alive && !self.wire_silent(p)) {
                bits |= 1 << i;
            }
        }
        bits
    }

    /// Whether this node's data path is up, peers are live, and every one of them is silent on
    /// the wire.
    pub fn wire_deaf(&self) -> bool {
        let any_live = self.peers.iter().flatten().any(|p| p.alive);
        self.wire_up && self.cores_up && any_live && self.wire_heard() == 0
    }

    /// A node that hears no peer on the wire keeps serving only if no live peer can serve
    /// instead of it: each is fenced or hears no peer either, and none of those that hear no
    /// peer has a lower id (so that in a two-node cluster whose wire path is silent both ways,
    /// exactly one node, the lowest, serves). A live peer with no heartbeat yet counts against.
    fn deaf_but_kept(&self) -> bool {
        let me = self.cfg.me.index();
        self.peers.iter().enumerate().all(|(i, p)| match p {
            Some(p) if p.alive => {
                p.hb.is_some_and(|h| (h.fenced || h.wire_deaf) && !(h.wire_deaf && i < me))
            }
            _ => true,
        })
    }

    /// Whether some live, unfenced peer hears the wire (it hears some peer on it), and none of
    /// those hears this node there.
    fn unheard(&self) -> bool {
        let me = bit(self.cfg.me);
        let mut witnesses = 0;
        for p in self.peers.iter().flatten().filter(|p| p.alive) {
            let Some(h) = p.hb else { continue };
            let heard = h.wire_heard;
            if h.fenced || h.wire_deaf || heard == 0 {
                continue;
            }
            if heard & me != 0 {
                return false;
            }
            witnesses += 1;
        }
        witnesses > 0
    }

    /// Bit `id - 1` per node that may own buckets now: live and not fenced (itself included
    /// unless fenced).
    pub(super) fn serving_bits(&self) -> u64 {
        let mut bits = if self.fenced { 0 } else { bit(self.cfg.me) };
        for (i, p) in self.peers.iter().enumerate() {
            if p.as_ref()
                .is_some_and(|p| p.alive && !p.hb.is_some_and(|h| h.fenced))
            {
                bits |= 1 << i;
            }
        }
        bits
    }
}
