//! The decision for a frame from the wire, once prepared: the TCP/UDP shortcut straight to the
//! handoff rule ([`crate::cluster::handoff`]; an owner's frame with nothing learned and a
//! healthy service straight to the flow table, as the rule would say: `handoff::delivers_all`;
//! in appliance mode a known flow's frame first tries its marked backend, `known_flow`, then
//! its rule, `service_flow`), and the full path for everything else (ARP, neighbour discovery,
//! ICMP, fragments, group addresses, heartbeats).
//!
//! The rule decides; this file looks the flow up in the tables and carries the verdict out.

use std::net::IpAddr;

use crate::cluster::handoff::{self, FlowLookup, Forget, Take, Verdict};
use crate::cluster::{Bucket, FlowHash, FlowState, FlowTable, TcpFlags, Upsert};
use crate::config::Unmatched;
use crate::control::Phase;
use crate::wire::{self, ethernet, parse_l2_l4, EtherType, IpProtocol, Parsed, CONTROL_ETHERTYPE};

use super::prepare::bucket_from;
use super::types::TCP;
use super::{Action, DropReason, FrameBuf, Pipeline, Prepared};

/// This node's two flow tables, asked about one flow at `now`: what the handoff rule reads.
pub(super) struct Tables<'a> {
    pub own: &'a FlowTable,
    pub learned: &'a FlowTable,
    pub hash: FlowHash,
    pub now: u64,
}

impl FlowLookup for Tables<'_> {
    #[inline(always)]
    fn own(&self) -> Option<FlowState> {
        self.own.get(self.hash, self.now).map(|e| e.state)
    }

    #[inline(always)]
    fn learned(&self) -> Option<FlowState> {
        // Flows are learned only around handoffs: while there are none, an owner's frames skip
        // the lookup (and its cache miss: the table is not prefetched for an owned bucket).
        if self.learned.is_empty() {
            return None;
        }
        self.learned.get(self.hash, self.now).map(|e| e.state)
    }
}

impl Pipeline {
    /// Whether this node takes new flows (and stateless traffic) of `bucket` now.
    #[inline]
    pub(super) fn mine(&self, bucket: Bucket) -> bool {
        self.snapshot.new_flow_owner(bucket) == Some(self.id.node)
    }

    /// A frame from the shared segment: the first `len` bytes of `buf`, which may be longer (a
    /// reply is written in place and may outgrow the request) and have room before them (an
    /// encapsulation's outer headers are written there, see [`FrameBuf`]).
    ///
    /// The same as [`Pipeline::prepare`] then [`Pipeline::decide`]; a burst does better with
    /// all its `prepare`s first (the flow-table lines they prefetch arrive meanwhile).
    #[inline]
    pub fn from_wire(&mut self, buf: &mut FrameBuf<'_>, len: usize, now: u64) -> Action {
        let prepared = match buf.get(..len) {
            Some(frame) => self.prepare(frame),
            None => Prepared::Drop(DropReason::Malformed(wire::Error::BadLength)),
        };
        self.decide(buf, len, &prepared, now)
    }

    /// The second half of [`Pipeline::from_wire`]: `prepared` must come from
    /// [`Pipeline::prepare`] of the frame in `buf[..len]`, under the same snapshot.
    ///
    /// Most frames are decided in the caller's loop: a TCP/UDP frame in server mode
    /// ([`Pipeline::flow_packet`]), a known flow's in appliance mode ([`Pipeline::known_flow`]);
    /// every other frame, and one the shortcut stands aside for, in one call
    /// ([`Pipeline::decide_rest`]).
    #[inline(always)]
    pub fn decide(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        prepared: &Prepared,
        now: u64,
    ) -> Action {
        if let Prepared::Flow {
            hash,
            proto,
            flags,
            bucket,
            plain,
        } = *prepared
        {
            if !self.services.active() {
                return self.flow_packet(bucket, hash, proto, flags, now);
            }
            if plain && self.marks == super::appliance::Marks::Hold {
                if let Some(action) = self.known_flow(buf, len, bucket, hash, proto, flags, now) {
                    return action;
                }
            }
        }
        self.decide_rest(buf, len, prepared, now)
    }

    /// [`Pipeline::decide`] of every frame it does not decide in the caller's loop (a flow
    /// frame's only while services are configured, when the known flow's shortcut stood
    /// aside).
    #[inline(never)]
    fn decide_rest(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        prepared: &Prepared,
        now: u64,
    ) -> Action {
        match *prepared {
            Prepared::Drop(reason) => Action::Drop(reason),
            Prepared::Shared => self.to_own_host(buf),
            Prepared::Flow {
                bucket,
                hash,
                proto,
                flags,
                plain,
            } => {
                // Only while services are configured (`decide` takes the others'): the known
                // flow's shortcut stood aside.
                self.service_flow(buf, len, bucket, hash, proto, flags, plain, now)
            }
            Prepared::Other => self.decide_full(buf, len, now),
        }
    }

    /// A frame for the node's own MAC: to its host, addressed to the host port's MAC (the
    /// cluster MAC: the kernel takes frames for its interface's own address only). The node's
    /// kernel announces its own addresses with the node MAC (`Pipeline::from_host`), so that
    /// what it asks for itself (an appliance's backend checks, say) comes back to this node.
    #[inline(never)]
    fn to_own_host(&self, buf: &mut [u8]) -> Action {
        if let Some(dst) = buf.get_mut(..6) {
            dst.copy_from_slice(&self.id.cluster_mac.0);
        }
        Action::DeliverShared
    }

    /// [`Pipeline::from_wire`] without the TCP/UDP shortcut of [`Pipeline::prepare`].
    #[inline(never)]
    pub(super) fn decide_full(&mut self, buf: &mut FrameBuf<'_>, len: usize, now: u64) -> Action {
        let Some(frame) = buf.get(..len) else {
            return Action::Drop(DropReason::Malformed(wire::Error::BadLength));
        };
        if frame.len() < ethernet::HEADER_LEN {
            return Action::Drop(DropReason::Malformed(wire::Error::Truncated));
        }
        let dst = ethernet::Frame::new_unchecked(frame).dst();
        if dst == self.id.node_mac {
            return self.to_own_host(buf);
        }
        let group = dst.is_multicast(); // broadcast included
        if !group && dst != self.id.cluster_mac {
            return Action::Drop(DropReason::NotForUs);
        }
        // Borrowed out of the result: `Parsed` is large enough that moving it costs a memcpy.
        let parsed = parse_l2_l4(frame);
        let p = match &parsed {
            Ok(p) => p,
            Err(e) => return Action::Drop(DropReason::Malformed(*e)),
        };
        match p.ethertype {
            EtherType::Arp => self.arp_from_wire(buf, len, p),
            EtherType::Ipv4 | EtherType::Ipv6 => self.ip_from_wire(buf, len, p, group, now),
            EtherType::Unknown(CONTROL_ETHERTYPE) => Action::ToControl,
            _ if group => Action::DeliverShared,
            _ => Action::Drop(DropReason::NotForUs),
        }
    }

    fn ip_from_wire(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        p: &Parsed,
        group: bool,
        now: u64,
    ) -> Action {
        if p.protocol == IpProtocol::Icmpv6 {
            if let Some(icmp) = p.icmp {
                if let Some(action) = self.ndisc_from_wire(buf, len, p, icmp.msg_type) {
                    return action;
                }
            }
        }
        let to_cluster = match p.dst_ip {
            IpAddr::V4(a) => a == self.id.cluster_ip,
            IpAddr::V6(a) => Some(a) == self.id.cluster_ip6,
        };
        if group && !to_cluster {
            // Broadcast and multicast IP: every host.
            return Action::DeliverShared;
        }
        // Unicast IP to the cluster MAC: exactly one node delivers, whatever the address.
        if let Some(frag) = p.fragment {
            return self.fragment_from_wire(buf, len, p, frag, now);
        }
        let key_hash = self.key_hash(p);
        let bucket = bucket_from(key_hash);
        let proto = u8::from(p.protocol);
        match (p.src_port, p.dst_port) {
            (Some(sp), Some(dp)) => {
                let hash = FlowHash::new(key_hash, p.dst_ip, sp, dp, proto);
                self.flow_packet(bucket, hash, proto, TcpFlags(p.tcp_flags.0 as u8), now)
            }
            _ if p.icmp.is_some_and(|i| i.is_error) => {
                if self.services.active() {
                    if let Some(action) = self.service_icmp_error(buf, len, key_hash, p, now) {
                        return action;
                    }
                }
                self.icmp_error(key_hash, p, now)
            }
            _ => {
                if self.services.active() {
                    if let Some(action) = self.service_echo(buf, p, bucket, to_cluster) {
                        return action;
                    }
                    // No rule has this protocol (GRE, say) at a service address: under
                    // `unmatched: drop`, dropped as TCP/UDP to an unserved port is. (The cluster
                    // address's own traffic goes to its owner's kernel, which holds it, and
                    // so does ICMP that `service_echo` leaves alone: a ping with options.)
                    if !to_cluster
                        && p.icmp.is_none()
                        && self.services.unmatched() == Unmatched::Drop
                        && self.services.is_address(p.dst_ip)
                    {
                        return Action::Drop(DropReason::NoRule);
                    }
                }
                if self.mine(bucket) {
                    Action::Deliver
                } else {
                    Action::Drop(DropReason::NotOwned)
                }
            }
        }
    }

    /// What the handoff rule reads of the services' health.
    #[inline(always)]
    pub(super) fn health(&self) -> handoff::Health {
        handoff::Health {
            refuse_new: self.service.refuse_new,
            refusing_peers: self.service.refusing_peers,
        }
    }

    /// A TCP or UDP packet of flow `hash` (IP protocol `proto`) in `bucket`, for this node's
    /// host if it is this node's: see [`Pipeline::flow_verdict`].
    #[inline]
    pub(super) fn flow_packet(
        &mut self,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Action {
        match self.flow_verdict(bucket, hash, proto, flags, now) {
            Ok(_) => Action::Deliver,
            Err(action) => action,
        }
    }

    /// The handoff rule decides by this node's role for the bucket (or, for an owner's
    /// common case, [`handoff::delivers_all`] says what it would), and this carries its
    /// verdict out: `Ok` with the flow-table entry if this node takes the packet, else what to
    /// do with it instead.
    #[inline(always)]
    pub(super) fn flow_verdict(
        &mut self,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Result<Upsert, Action> {
        let role = self.snapshot.role(bucket, self.id.node);
        let health = self.health();
        // Most frames: an owned bucket and no handoff here. The rule would deliver them
        // whatever their flow's entries; asking it costs a call and a table lookup per frame.
        if handoff::delivers_all(role, health, !self.learned.is_empty()) {
            return Ok(self.flows.upsert(hash, proto, bucket, flags, now));
        }
        let verdict = handoff::verdict(
            role,
            self.snapshot.phase() == Phase::Release,
            handoff::Packet {
                tcp: proto == TCP,
                flags,
            },
            health,
            &Tables {
                own: &self.flows,
                learned: &self.learned,
                hash,
                now,
            },
        );
        // The common case first, on its own: the rest is out of line.
        if verdict == Verdict::DELIVER
            && (role.accepts_new_flows() || !self.snapshot.cuts(self.id.node))
        {
            return Ok(self.flows.upsert(hash, proto, bucket, flags, now));
        }
        let verdict = if verdict == Verdict::DELIVER {
            // A drain past its deadline serves no flow of a bucket it released any more.
            Verdict {
                take: Take::NotOwned,
                forget: Forget::Own,
            }
        } else {
            verdict
        };
        self.carry_out(verdict, bucket, hash, proto, flags, now)
    }

    /// Everything but a plain delivery: what a verdict of the handoff rule asks for.
    #[inline(never)]
    fn carry_out(
        &mut self,
        verdict: Verdict,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Result<Upsert, Action> {
        match verdict.forget {
            Forget::Nothing => {}
            Forget::Own => {
                self.flows.remove(hash);
            }
            Forget::Learned => {
                self.learned.remove(hash);
            }
        }
        match verdict.take {
            Take::Deliver => {}
            Take::DeliverAtRisk => self.duplicate_risk += 1,
            Take::Learn => {
                self.learned.upsert(hash, proto, bucket, flags, now);
                return Err(Action::Drop(DropReason::NotOwned));
            }
            Take::NotOwned => return Err(Action::Drop(DropReason::NotOwned)),
            // The old owner counts the packets it must refuse between release and acquire
            // (once per packet in the cluster): new flows that nobody takes yet.
            Take::ReleaseGap => return Err(Action::Drop(DropReason::ReleaseGap)),
        }
        Ok(self.flows.upsert(hash, proto, bucket, flags, now))
    }

    /// An ICMP error goes where the flow it quotes is served (the handoff rule's
    /// [`handoff::serves_icmp_error`]). `key_hash` is the keyed hash of the quoted flow's key.
    fn icmp_error(&mut self, key_hash: u64, p: &Parsed, now: u64) -> Action {
        let bucket = bucket_from(key_hash);
        let quoted = p.icmp.and_then(|i| i.quoted);
        let flow = quoted.and_then(|q| match (q.src_port, q.dst_port) {
            // The quoted packet went from the cluster to the client: reverse it.
            (Some(sp), Some(dp)) => Some(Tables {
                own: &self.flows,
                learned: &self.learned,
                hash: FlowHash::new(key_hash, q.src_ip, dp, sp, u8::from(q.protocol)),
                now,
            }),
            _ => None,
        });
        let role = self.snapshot.role(bucket, self.id.node);
        if handoff::serves_icmp_error(role, flow.as_ref()) {
            Action::Deliver
        } else {
            Action::Drop(DropReason::NotOwned)
        }
    }
}
