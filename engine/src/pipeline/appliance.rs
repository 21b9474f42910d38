//! The decision for a TCP/UDP frame to a service address (appliance mode, DESIGN.md "Two
//! delivery modes"): its port rule, whether this node takes it, and the backend it goes to;
//! and for the ICMP a service address gets: errors about a backend's replies go to the
//! backend that serves the quoted flow, pings are answered in place.
//!
//! Ownership is the cluster's as for any flow (by bucket and the handoff rule; a `single` rule
//! by priority among the nodes that serve), so only the owner forwards a frame. The backend is
//! the one the flow table remembers for the flow, else the rule's backend table's choice, which
//! every node computes the same: when the owner of a bucket changes (a join, a drain, a node
//! dead), the new owner sends the flow to the same backend and the connection survives.
//!
//! An IP datagram in fragments goes the same way: its first fragment, which has the ports, is
//! decided as a frame of its flow, and the fragment tracker remembers the backend (or the
//! refusal) for the later ones, which go to that backend in the same delivery
//! ([`Pipeline::later_fragment_to_backend`]) or are dropped.
//!
//! This file decides and rewrites; it never sends, allocates or reads a clock.

use std::net::IpAddr;

use crate::appliance::encap::{self, Outer};
use crate::appliance::fragment::Cut;
use crate::appliance::route::{Route, Way};
use crate::appliance::Match;
use crate::cluster::handoff;
use crate::cluster::{
    backend_pick, Bucket, FirstFragment, FlowHash, FlowKey, FlowTable, TcpFlags, Upsert,
};
use crate::config::{Delivery, RuleMode, Unmatched};
use crate::wire::{self, parse_l2_l4, Parsed};

use super::prepare::bucket_from;
use super::types::TCP;
use super::{Action, DropReason, FrameBuf, Pipeline};

/// What the service path reads of a frame beyond its flow: where its IP packet is and whom it
/// is for. Addresses are numbers, not `IpAddr`s (17 bytes to build, copy and compare per
/// frame): IPv4's 32 bits in the low bits, or IPv6's 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Destination {
    pub l3: usize,
    pub ip_len: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
    pub src: u128,
    pub dst: u128,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4's "don't fragment", or IPv6 (never fragmented on the way).
    pub no_frag: bool,
}

impl Destination {
    /// The destination of a TCP/UDP frame [`Pipeline::decide`] has with
    /// [`super::Prepared::Flow`] (`None`: not one; it then takes the cluster's path): parsed
    /// already, its TCP/UDP header checked, and `plain` if it is the common frame, which is
    /// then read again only at its fixed offsets (its checks were made); any other (a VLAN
    /// tag, IPv4 options, IPv6 extension headers) is parsed.
    #[inline(always)]
    pub(super) fn of_prepared(frame: &[u8], plain: bool) -> Option<Destination> {
        if plain {
            Destination::fixed(frame)
        } else {
            Destination::parsed(frame)
        }
    }

    /// A frame that is not the common one, parsed.
    #[inline(never)]
    fn parsed(frame: &[u8]) -> Option<Destination> {
        let p = parse_l2_l4(frame).ok()?;
        Destination::at(
            frame,
            p.l3_offset,
            p.src_ip,
            p.dst_ip,
            p.src_port?,
            p.dst_port?,
        )
    }

    /// The destination of an IP fragment `frame` parsed as `p` (ports 0 in a later fragment).
    #[inline]
    pub(super) fn of_fragment(frame: &[u8], p: &Parsed) -> Option<Destination> {
        let (sp, dp) = (p.src_port.unwrap_or(0), p.dst_port.unwrap_or(0));
        Destination::at(frame, p.l3_offset, p.src_ip, p.dst_ip, sp, dp)
    }

    /// The source address.
    #[inline]
    pub(super) fn src_ip(&self) -> IpAddr {
        self.address(self.src)
    }

    /// The destination address.
    #[inline]
    pub(super) fn dst_ip(&self) -> IpAddr {
        self.address(self.dst)
    }

    /// An address of this destination's IP version given as a number.
    #[inline]
    fn address(&self, a: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(a.into())
        } else {
            // IPv4 keeps its 32 bits in the low bits: the truncation is exact.
            IpAddr::V4((a as u32).into())
        }
    }

    /// The common frame as [`crate::wire::parse_ip_flow`] accepts it — untagged, IPv4 without
    /// options and not a fragment, or IPv6 with TCP or UDP right after its header, its lengths
    /// checked — read at fixed offsets without checking it again (`None` only if it is too
    /// short to hold the headers, which such a frame never is).
    #[inline(always)]
    fn fixed(frame: &[u8]) -> Option<Destination> {
        const L3: usize = 14;
        let (ip_len, v6) = Destination::fixed_length(frame)?;
        if v6 {
            let h: &[u8; L3 + 44] = frame.get(..L3 + 44)?.try_into().ok()?;
            let addr = |at: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&h[at..at + 16]);
                u128::from_be_bytes(a)
            };
            Some(Destination {
                l3: L3,
                ip_len,
                v6,
                src: addr(L3 + 8),
                dst: addr(L3 + 24),
                src_port: u16::from_be_bytes([h[L3 + 40], h[L3 + 41]]),
                dst_port: u16::from_be_bytes([h[L3 + 42], h[L3 + 43]]),
                no_frag: true,
            })
        } else {
            let h: &[u8; L3 + 24] = frame.get(..L3 + 24)?.try_into().ok()?;
            let word = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            Some(Destination {
                l3: L3,
                ip_len,
                v6,
                src: u128::from(word(L3 + 12)),
                dst: u128::from(word(L3 + 16)),
                src_port: u16::from_be_bytes([h[L3 + 20], h[L3 + 21]]),
                dst_port: u16::from_be_bytes([h[L3 + 22], h[L3 + 23]]),
                no_frag: h[L3 + 6] & 0x40 != 0,
            })
        }
    }

    /// The length and IP version (IPv6: `true`) of the common frame's IP packet, read at its
    /// fixed offsets (the start of [`Destination::fixed`]).
    #[inline(always)]
    fn fixed_length(frame: &[u8]) -> Option<(usize, bool)> {
        let h: &[u8; 20] = frame.get(..20)?.try_into().ok()?;
        Some(if h[12] == 0x86 {
            (40 + usize::from(u16::from_be_bytes([h[18], h[19]])), true)
        } else {
            (usize::from(u16::from_be_bytes([h[16], h[17]])), false)
        })
    }

    /// The destination of the IP packet at `l3` of `frame`, parsed (any frame).
    pub(super) fn at(
        frame: &[u8],
        l3: usize,
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
    ) -> Option<Destination> {
        let raw = |ip: IpAddr| match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let ip = frame.get(l3..)?;
        let (ip_len, no_frag) = match dst {
            IpAddr::V4(_) => (
                usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
                ip.get(6)? & 0x40 != 0,
            ),
            IpAddr::V6(_) => (
                40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
                true,
            ),
        };
        (ip_len <= ip.len()).then_some(Destination {
            l3,
            ip_len,
            v6: dst.is_ipv6(),
            src: raw(src),
            dst: raw(dst),
            src_port,
            dst_port,
            no_frag,
        })
    }
}

/// What a service frame's rule and the cluster's ownership say of it, before any backend.
enum Service {
    /// Not a service's (not a service address, or no rule and `unmatched: local`): it takes
    /// the cluster's own path.
    Cluster,
    /// Decided already: delivered to the host (a `local` rule) or dropped.
    Decided(Action),
    /// This node takes it, to a backend of rule `rule`; `upsert` is its flow-table entry.
    Forward { rule: usize, upsert: Upsert },
}

/// Whether the checked marks of the flow table (see [`FlowTable::upsert_checked`]) say what
/// the rule lookup would. A flow's backend is marked when the lookup found the flow's rule to
/// be a `multiple` rule that forwards and the backend to be that rule's; while the rules stay
/// the same ([`crate::appliance::Services::same_matching`]), the flow's later frames may skip
/// the lookup ([`Pipeline::known_flow`]). Rules that change clear every mark, a bounded number
/// of slots at a time between bursts ([`Pipeline::clear_marks`]); until the last is cleared,
/// every frame is looked up. (A change during a clearing starts it over.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Marks {
    /// Every mark in the table was set under the rules in force.
    #[default]
    Hold,
    /// The rules changed: marks from slot `next` on may be older.
    Clearing { next: usize },
}

/// Slots whose marks one [`Pipeline::clear_marks`] clears: 256 KiB of slots, tens of
/// microseconds (a table of 10 million flows is cleared in about a thousand calls).
const MARKS_CLEARED_AT_ONCE: usize = 16 * 1024;

/// 14 bits of a flow's fingerprint, the outer header's entropy (the GUE source port): the same
/// flow, the same outer port.
#[inline(always)]
fn entropy(hash: FlowHash) -> u16 {
    (hash.0 >> 48) as u16 & 0x3fff
}

impl Pipeline {
    /// A TCP/UDP frame while services are configured: by its rule, or the cluster's own path.
    /// (The arguments are a prepared flow frame's parts, as `flow_packet` takes them.)
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    pub(super) fn service_flow(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        plain: bool,
        now: u64,
    ) -> Action {
        let Some(d) = buf
            .get(..len)
            .and_then(|frame| Destination::of_prepared(frame, plain))
        else {
            return self.flow_packet(bucket, hash, proto, flags, now);
        };
        match self.service(&d, bucket, hash, proto, flags, now) {
            Service::Cluster => self.flow_packet(bucket, hash, proto, flags, now),
            Service::Decided(action) => action,
            Service::Forward { rule, upsert } => {
                match self.flow_backend(rule, &d, hash, proto, flags, upsert) {
                    Some(id) => self.forward_to(buf, len, id, &d, entropy(hash), Some(now)),
                    None => Action::Drop(DropReason::NoBackend),
                }
            }
        }
    }

    /// A known flow's frame, by its checked mark (see [`Marks`]), before
    /// [`Pipeline::service_flow`] (a frame `plain` as [`Destination::of_prepared`] takes it,
    /// while the marks hold): in a bucket this node owns with no handoff here (where the
    /// handoff rule delivers every frame: [`handoff::delivers_all`]), a flow whose backend is
    /// marked goes to that backend, unless the frame is a TCP connection's first SYN and the
    /// backend takes no new flows (see [`Pipeline::flow_backend`]): the rule lookup would find
    /// the rule the mark was set under, a `multiple` rule whose backend it is, and the
    /// decision would go the same way. `None` (nothing changed): any other frame, for the
    /// full decision.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn known_flow(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Option<Action> {
        let role = self.snapshot.role(bucket, self.id.node);
        if !handoff::delivers_all(role, self.health(), !self.learned.is_empty()) {
            return None;
        }
        let opens = proto == TCP && flags.is_initial_syn();
        let routes = &self.routes;
        let takes = |id| !opens || routes.get(id).is_some_and(|route| route.up);
        let id = self.flows.upsert_checked(hash, proto, flags, now, takes)?;
        // A marked backend has a route: the rules (and so the backend ids) are the ones the
        // mark was set under.
        Some(match self.routes.get(id) {
            Some(&Route {
                way: Way::Dsr(macs),
                ..
            }) => self.dsr(buf, len, id, &macs),
            Some(Route {
                way: Way::Encap(outer),
                mtu,
                ..
            }) => {
                // Most encapsulated frames: whole (the path's MTU takes them). Only their IP
                // packet's length and version are read, at the common frame's fixed offsets.
                let entropy = entropy(hash);
                let whole = buf
                    .get(..len)
                    .and_then(Destination::fixed_length)
                    .and_then(|(ip_len, v6)| Whole::of(outer, *mtu, 14, ip_len, v6, entropy));
                match whole {
                    Some(whole) => encapsulated(&mut self.appliance, outer, buf, len, id, whole),
                    None => self.known_flow_to(buf, len, id, hash, now),
                }
            }
            _ => self.known_flow_to(buf, len, id, hash, now),
        })
    }

    /// The rest of [`Pipeline::known_flow`] for a frame neither sent by DSR nor encapsulated
    /// whole (cut in pieces, answered "too big", a backend without a way).
    #[inline(never)]
    fn known_flow_to(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        id: u16,
        hash: FlowHash,
        now: u64,
    ) -> Action {
        match buf.get(..len).and_then(Destination::fixed) {
            Some(d) => self.forward_to(buf, len, id, &d, entropy(hash), Some(now)),
            None => Action::Drop(DropReason::Malformed(wire::Error::Truncated)),
        }
    }

    /// Clears a bounded share of the flow table's checked marks while the rules changed since
    /// they were set (see [`Marks`]; between bursts).
    pub(super) fn clear_marks(&mut self) {
        if let Marks::Clearing { next } = self.marks {
            self.marks = match self.flows.clear_checked(next, MARKS_CLEARED_AT_ONCE) {
                Some(next) => Marks::Clearing { next },
                None => Marks::Hold,
            };
        }
    }

    /// Whether rule `r`'s flows have their backends marked checked (see [`Marks`]): a
    /// `multiple` rule's (a `single` rule's frames are owned by priority, not by bucket, which
    /// [`Pipeline::known_flow`] does not ask).
    #[inline(always)]
    fn marks_rule(&self, r: usize) -> bool {
        self.services
            .rules()
            .get(r)
            .is_some_and(|rule| rule.mode == RuleMode::Multiple)
    }

    /// The first fragment of a datagram while services are configured (`p` its parse): by its
    /// rule, as an unfragmented frame of its flow, and what the later fragments must get.
    /// `None`: not a service's (or not TCP/UDP): it takes the cluster's path for fragments.
    pub(super) fn service_first_fragment(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        p: &Parsed,
        now: u64,
    ) -> Option<(Action, FirstFragment)> {
        let (Some(sp), Some(dp)) = (p.src_port, p.dst_port) else {
            return None;
        };
        let d = Destination::of_fragment(buf.get(..len)?, p)?;
        let key_hash = self.key_hash(p);
        let bucket = bucket_from(key_hash);
        let proto = u8::from(p.protocol);
        let hash = FlowHash::new(key_hash, p.dst_ip, sp, dp, proto);
        let flags = TcpFlags(p.tcp_flags.0 as u8);
        let (rule, upsert) = match self.service(&d, bucket, hash, proto, flags, now) {
            Service::Cluster => return None,
            Service::Decided(action) => {
                let first = match action {
                    Action::Deliver => FirstFragment::Owned,
                    Action::Drop(DropReason::NotOwned | DropReason::ReleaseGap) => {
                        FirstFragment::NotOwned
                    }
                    _ => FirstFragment::Refused,
                };
                return Some((action, first));
            }
            Service::Forward { rule, upsert } => (rule, upsert),
        };
        let Some(backend) = self.flow_backend(rule, &d, hash, proto, flags, upsert) else {
            return Some((Action::Drop(DropReason::NoBackend), FirstFragment::Refused));
        };
        let entropy = entropy(hash);
        let action = self.forward_to(buf, len, backend, &d, entropy, Some(now));
        let first = match action {
            // Cut to fit its tunnel or not, the first went to its backend: so do the others.
            Action::ToBackend | Action::Encapsulated { .. } | Action::ToBackendInPieces { .. } => {
                FirstFragment::Forwarded { backend, entropy }
            }
            _ => FirstFragment::Refused,
        };
        Some((action, first))
    }

    /// A later fragment (`p` its parse) of a datagram whose first went to backend `backend`:
    /// to the same backend, the same way.
    pub(super) fn later_fragment_to_backend(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        p: &Parsed,
        backend: u16,
        entropy: u16,
    ) -> Action {
        if self.routes.get(backend).is_none() {
            // The services changed since the first: its backend is gone.
            return Action::Drop(DropReason::NoBackend);
        }
        match buf
            .get(..len)
            .and_then(|frame| Destination::of_fragment(frame, p))
        {
            // A later fragment is never answered "too big" (RFC 1122 3.2.2: no ICMP error
            // about a fragment other than the first).
            Some(d) => self.forward_to(buf, len, backend, &d, entropy, None),
            None => Action::Drop(DropReason::Malformed(wire::Error::Truncated)),
        }
    }

    /// An ICMP echo request (`p` its parse, `bucket` its source's) to a service address other
    /// than the cluster's (whose owner's kernel holds it and answers): the appliances hold no
    /// service address, so the owner of the bucket answers it in place. `None`: not one (or
    /// with IPv4 options or IPv6 extension headers).
    pub(super) fn service_echo(
        &self,
        buf: &mut [u8],
        p: &Parsed,
        bucket: Bucket,
        to_cluster: bool,
    ) -> Option<Action> {
        let (request, header) = if p.dst_ip.is_ipv6() {
            (128, 40)
        } else {
            (8, 20)
        };
        // Only a plain header: options or extension headers (a source route) are not
        // reversed here; such a ping takes the cluster's path.
        if to_cluster
            || p.l4_offset != p.l3_offset + header
            || !p.icmp.is_some_and(|i| i.msg_type == request && i.code == 0)
            || !self.services.is_address(p.dst_ip)
        {
            return None;
        }
        if !self.mine(bucket) {
            return Some(Action::Drop(DropReason::NotOwned));
        }
        if !answers_to(buf, p.src_ip) {
            // An answer would go to every host of a group (RFC 1122 3.2.2.6, RFC 4443 4.2): a
            // request no host may send.
            return Some(Action::Drop(DropReason::Malformed(wire::Error::Malformed)));
        }
        Some(
            match encap::echo_reply(buf, p.l3_offset, p.l4_offset, p.l4_len, self.id.node_mac) {
                Some(len) => Action::reply(len),
                None => Action::Drop(DropReason::Malformed(wire::Error::Truncated)),
            },
        )
    }

    /// An ICMP error (`p` its parse; `key_hash` the keyed hash of the quoted flow's key) about
    /// a packet sent from a service address: with DSR a backend's replies carry the service
    /// address as their source, so "fragmentation needed" or "packet too big" about them comes
    /// here. It belongs to the backend that serves the quoted flow (its path-MTU discovery):
    /// the node that serves the flow sends it there, the flow's way (DSR or the tunnel). The
    /// backend is the one the flow table remembers, else the one the flow's rule chooses (the
    /// same on every node). `None`: not about a service's flow (the cluster's path).
    pub(super) fn service_icmp_error(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        key_hash: u64,
        p: &Parsed,
        now: u64,
    ) -> Option<Action> {
        let q = p.icmp?.quoted?;
        // The quoted packet went from the service (its port `sp`) to the client (`dp`).
        let (sp, dp) = (q.src_port?, q.dst_port?);
        let proto = u8::from(q.protocol);
        let Match::Rule(r) = self.services.lookup(q.src_ip, proto, sp) else {
            return None;
        };
        let rule = &self.services.rules()[r];
        if rule.delivery == Delivery::Local {
            return None;
        }
        let hash = FlowHash::new(key_hash, q.src_ip, dp, sp, proto);
        let pick = backend_pick(key_hash, q.src_ip, dp, sp, proto);
        let serves = match rule.mode {
            RuleMode::Disabled => return Some(Action::Drop(DropReason::RuleDisabled)),
            RuleMode::Single => rule.single_owner(self.serving) == Some(self.id.node),
            RuleMode::Multiple => {
                let role = self.snapshot.role(bucket_from(key_hash), self.id.node);
                let tables = super::decide::Tables {
                    own: &self.flows,
                    learned: &self.learned,
                    hash,
                    now,
                };
                crate::cluster::handoff::serves_icmp_error(role, Some(&tables))
            }
        };
        if !serves {
            return Some(Action::Drop(DropReason::NotOwned));
        }
        let remembered = self.flows.get(hash, now).map(|e| e.backend).filter(|&id| {
            self.routes
                .get(id)
                .is_some_and(|route| usize::from(route.rule) == r)
        });
        let id = match remembered {
            Some(id) => id,
            None => match self
                .services
                .choose_new(r, &self.hasher, pick, q.dst_ip, dp, proto)
            {
                Some(b) => b.id,
                None => return Some(Action::Drop(DropReason::NoBackend)),
            },
        };
        let d = Destination::at(buf.get(..len)?, p.l3_offset, p.src_ip, p.dst_ip, 0, 0)?;
        // An ICMP error too big for the tunnel is never cut either (at most 576 bytes in IPv4,
        // it fits any tunnel `check` allows; one that does not is not a router's).
        if self.too_big_for(id, d.ip_len) {
            // No ICMP error about an ICMP error (RFC 1122, RFC 4443): dropped, counted.
            self.appliance.too_big += 1;
            return Some(Action::Drop(DropReason::TooBig));
        }
        Some(self.forward_to(buf, len, id, &d, entropy(hash), None))
    }

    /// Whether an IP packet of `ip_len` bytes exceeds backend `id`'s encapsulated path.
    fn too_big_for(&self, id: u16, ip_len: usize) -> bool {
        self.routes.get(id).is_some_and(|route| match &route.way {
            Way::Encap(outer) => !outer.fits(ip_len, route.mtu),
            _ => false,
        })
    }

    /// A frame to `d`: its rule, and whether this node takes it (by the handoff rule, or a
    /// `single` rule's priority).
    #[inline(always)]
    fn service(
        &mut self,
        d: &Destination,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Service {
        let r = match self.services.lookup_raw(d.v6, d.dst, proto, d.dst_port) {
            Match::Cluster => return Service::Cluster,
            Match::NoRule => {
                return match self.services.unmatched() {
                    Unmatched::Drop => Service::Decided(Action::Drop(DropReason::NoRule)),
                    Unmatched::Local => Service::Cluster,
                }
            }
            Match::Rule(r) => r,
        };
        let rule = &self.services.rules()[r];
        let (mode, delivery) = (rule.mode, rule.delivery);
        let upsert = match mode {
            RuleMode::Disabled => return Service::Decided(Action::Drop(DropReason::RuleDisabled)),
            RuleMode::Single => {
                if rule.single_owner(self.serving) != Some(self.id.node) {
                    return Service::Decided(Action::Drop(DropReason::NotOwned));
                }
                self.flows.upsert(hash, proto, bucket, flags, now)
            }
            RuleMode::Multiple => match self.flow_verdict(bucket, hash, proto, flags, now) {
                Ok(u) => u,
                Err(action) => return Service::Decided(action),
            },
        };
        if delivery == Delivery::Local {
            return Service::Decided(Action::Deliver);
        }
        Service::Forward { rule: r, upsert }
    }

    /// The backend id of an owned flow of appliance rule `r` (`None`: no backend takes it).
    ///
    /// The flow table's backend holds, whatever the backend's health since (a verdict may be
    /// wrong; a connection it still serves is not cut), except for a connection's first SYN: a
    /// client that reuses the port of a connection its backend refused or lost (no TIME_WAIT
    /// after a reset) starts a new connection, which must not go to a backend that is down or
    /// drained.
    #[inline(always)]
    fn flow_backend(
        &mut self,
        r: usize,
        d: &Destination,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        upsert: Upsert,
    ) -> Option<u16> {
        let remembered = match upsert.backend {
            0 => None,
            id => self.routes.get(id).filter(|route| {
                usize::from(route.rule) == r
                    && (route.up || proto != TCP || !flags.is_initial_syn())
            }),
        };
        if remembered.is_some() {
            if !upsert.checked && self.marks_rule(r) {
                // Found its rule's under the rules in force: marked (see `Marks`).
                self.flows.set_backend(hash, upsert.backend, true);
            }
            return Some(upsert.backend);
        }
        // The flow's pick, from its key's hash (not in the prepared frame: only its bucket):
        // a new flow's cost only.
        let key = FlowKey::new(self.id.affinity, d.src_ip(), d.src_port, proto);
        let pick = backend_pick(
            self.hasher.hash(&key),
            d.dst_ip(),
            d.src_port,
            d.dst_port,
            proto,
        );
        let b = self
            .services
            .choose_new(r, &self.hasher, pick, d.src_ip(), d.src_port, proto)?;
        // A flow the table left untracked (a full table, its first packet) is counted once it
        // is tracked: each of its packets until then chooses again.
        if upsert.tracked {
            self.flows.set_backend(hash, b.id, self.marks_rule(r));
            self.appliance.new_flows[usize::from(b.id)] += 1;
        }
        Some(b.id)
    }

    /// A frame to `d`, to backend `id`: rewritten for DSR, or encapsulated in place (outer
    /// entropy `entropy`), or answered "too big" if `answer_at` gives the time (`None`: a
    /// frame no ICMP error may be about: dropped if too big).
    #[inline(always)]
    fn forward_to(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        id: u16,
        d: &Destination,
        entropy: u16,
        answer_at: Option<u64>,
    ) -> Action {
        let Some(route) = self.routes.get(id) else {
            return Action::Drop(DropReason::NoBackend);
        };
        match &route.way {
            Way::Unreachable => Action::Drop(DropReason::NoBackend),
            Way::Dsr(macs) => {
                let macs = *macs;
                self.dsr(buf, len, id, &macs)
            }
            Way::Encap(outer) => {
                if let Some(whole) = Whole::of(outer, route.mtu, d.l3, d.ip_len, d.v6, entropy) {
                    return encapsulated(&mut self.appliance, outer, buf, len, id, whole);
                }
                // Too big for the path.
                let overhead = outer.overhead();
                let mtu = usize::from(route.mtu);
                let room = mtu - overhead;
                if !d.no_frag {
                    // IPv4 that its sender lets be fragmented: cut, each piece its own
                    // encapsulated frame.
                    let packet = buf.get(d.l3..d.l3 + d.ip_len);
                    if let Some(cut) = packet.and_then(|p| Cut::new(p, room)) {
                        return self.in_pieces(id, *outer, cut, d, entropy);
                    }
                }
                // Counted with the too-big answers (a datagram without DF whose options
                // do not parse is dropped).
                self.appliance.too_big += 1;
                // The sender first: a flood from a group source spends no answer.
                let answer = d.no_frag
                    && answers_to(buf, d.src_ip())
                    && answer_at.is_some_and(|now| self.error_budget.take(now));
                if !answer {
                    return Action::Drop(DropReason::TooBig);
                }
                let room = u16::try_from(room).unwrap_or(u16::MAX);
                match encap::too_big(buf, d.l3, d.ip_len, room, self.id.node_mac) {
                    Some(len) => Action::reply(len),
                    None => Action::Drop(DropReason::Malformed(wire::Error::Truncated)),
                }
            }
        }
    }

    /// A frame of `len` bytes in `buf` to backend `id` by DSR (`macs`: its MAC and the
    /// node's): rewritten and counted.
    #[inline(always)]
    fn dsr(&mut self, buf: &mut [u8], len: usize, id: u16, macs: &[u8; 12]) -> Action {
        encap::dsr(buf, macs);
        self.appliance.count(usize::from(id), len);
        Action::ToBackend
    }

    /// An IPv4 datagram `d` without DF cut (`cut`) for backend `id` through `outer`: counted,
    /// and left for [`Pipeline::take_pieces`].
    #[inline(never)]
    fn in_pieces(
        &mut self,
        id: u16,
        outer: Outer,
        cut: Cut,
        d: &Destination,
        entropy: u16,
    ) -> Action {
        let Ok(count) = u16::try_from(cut.pieces()) else {
            return Action::Drop(DropReason::TooBig);
        };
        let at = usize::from(id);
        for k in 0..cut.pieces() {
            let len = cut.len(k).unwrap_or(0);
            self.appliance.count(at, 14 + outer.overhead() + len);
        }
        self.appliance.fragmented += 1;
        self.pieces = Some(Pieces {
            outer,
            cut,
            l3: d.l3,
            ip_len: d.ip_len,
            entropy,
        });
        Action::ToBackendInPieces { pieces: count }
    }

    /// After [`Action::ToBackendInPieces`]: what writes the pieces (`None`: taken already).
    pub fn take_pieces(&mut self) -> Option<Pieces> {
        self.pieces.take()
    }
}

/// The frame of `len` bytes in `buf` to backend `id` through `outer`, encapsulated whole
/// ([`Whole::of`]): its outer headers written in place, over its Ethernet header and into the
/// headroom before it, and counted in `counts`. Dropped if the headroom is too small (never
/// with the data plane's) or the packet is longer than the frame (never once parsed).
#[inline(always)]
fn encapsulated(
    counts: &mut ApplianceCounts,
    outer: &Outer,
    buf: &mut FrameBuf<'_>,
    len: usize,
    id: u16,
    whole: Whole,
) -> Action {
    // The frame grown at the front, and nothing after it: bytes past the frame are never sent.
    let push = usize::from(whole.push);
    let written = buf
        .grown_front(push)
        .and_then(|grown| grown.get_mut(..push + len))
        .and_then(|grown| outer.write(grown, whole.inner_len, whole.inner_v6, whole.entropy));
    match written.and_then(|len| u16::try_from(len).ok()) {
        Some(len) => {
            counts.count(usize::from(id), whole.bytes);
            Action::Encapsulated {
                push: whole.push,
                len,
            }
        }
        None => Action::Drop(DropReason::NoBackend),
    }
}

/// Whether the sender (`src`) of the frame in `buf` may get an ICMP message from the node:
/// one host (RFC 1122 3.2.2, RFC 4443 2.4(e): not a group or unspecified source, not from a
/// group MAC), lest a forged source make every host on the segment receive the answers.
fn answers_to(buf: &[u8], src: IpAddr) -> bool {
    let group_mac = buf.get(6).is_none_or(|b| b & 1 != 0);
    let one_host = match src {
        IpAddr::V4(a) => !a.is_multicast() && !a.is_broadcast() && !a.is_unspecified(),
        IpAddr::V6(a) => !a.is_multicast() && !a.is_unspecified(),
    };
    !group_mac && one_host
}

/// The ICMP errors a pipeline (a core) may send: a burst of [`ErrorBudget::BURST`], then
/// [`ErrorBudget::PER_SECOND`] (RFC 4443 2.4(f), RFC 1812 4.3.2.8: a flood of oversized
/// packets must not make the node answer each one).
#[derive(Debug, Clone, Copy)]
pub(super) struct ErrorBudget {
    tokens: u64,
    /// When the tokens were last counted (ns).
    at: u64,
}

impl Default for ErrorBudget {
    /// A full burst.
    fn default() -> Self {
        ErrorBudget {
            tokens: Self::BURST,
            at: 0,
        }
    }
}

impl ErrorBudget {
    pub const BURST: u64 = 50;
    pub const PER_SECOND: u64 = 1000;
    const NS_PER_TOKEN: u64 = 1_000_000_000 / Self::PER_SECOND;

    /// One error at `now`, if the budget has it.
    fn take(&mut self, now: u64) -> bool {
        let earned = now.saturating_sub(self.at) / Self::NS_PER_TOKEN;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(Self::BURST);
            self.at = if self.tokens == Self::BURST {
                now
            } else {
                self.at + earned * Self::NS_PER_TOKEN
            };
        }
        let some = self.tokens > 0;
        self.tokens -= u64::from(some);
        some
    }
}

/// An IP packet that its backend's path takes whole, encapsulated: what
/// [`encapsulated`] writes and counts (the one test of the path's MTU for a frame
/// that fits, on both ways to it: [`Pipeline::forward_to`] and the known flow's shortcut).
#[derive(Debug, Clone, Copy)]
struct Whole {
    inner_len: usize,
    inner_v6: bool,
    entropy: u16,
    /// Bytes to add in front of the frame.
    push: u16,
    /// Bytes sent, Ethernet header included.
    bytes: usize,
}

impl Whole {
    /// An IP packet of `ip_len` bytes at `l3` of its frame (IPv6 if `v6`) through `outer`
    /// (path MTU `mtu`), with the flow's `entropy`: `None` if it is too big.
    #[inline(always)]
    fn of(
        outer: &Outer,
        mtu: u16,
        l3: usize,
        ip_len: usize,
        v6: bool,
        entropy: u16,
    ) -> Option<Whole> {
        if !outer.fits(ip_len, mtu) {
            return None;
        }
        Some(Whole {
            inner_len: ip_len,
            inner_v6: v6,
            entropy,
            // At most the outer headers' length (66 bytes).
            push: u16::try_from(outer.push(l3)).unwrap_or(0),
            bytes: 14 + outer.overhead() + ip_len,
        })
    }
}

/// A datagram [`Pipeline::forward_to`] decided to cut ([`Action::ToBackendInPieces`]): writes
/// each piece, encapsulated for its backend, into a frame of its own.
#[derive(Debug, Clone, Copy)]
pub struct Pieces {
    outer: Outer,
    cut: Cut,
    /// Where the datagram is in the frame decided, and its length.
    l3: usize,
    ip_len: usize,
    entropy: u16,
}

impl Pieces {
    /// How many.
    pub fn count(&self) -> usize {
        self.cut.pieces()
    }

    /// Writes piece `k` of the datagram in `frame` (the frame that was decided, unchanged)
    /// into `out`, the outer headers in front: returns the new frame's length (`None`: `out`
    /// too short, or no piece `k`).
    pub fn write(&self, frame: &[u8], k: usize, out: &mut [u8]) -> Option<usize> {
        let packet = frame.get(self.l3..self.l3 + self.ip_len)?;
        let head = 14 + self.outer.overhead();
        let n = self.cut.write(packet, k, out.get_mut(head..)?)?;
        self.outer.write(out, n, false, self.entropy)
    }
}

/// Per backend id, what this pipeline sent (appliance mode), and its flows now.
#[derive(Debug, Clone, Default)]
pub struct ApplianceCounts {
    pub frames: Vec<u64>,
    pub bytes: Vec<u64>,
    pub new_flows: Vec<u64>,
    /// Flows in the flow table whose backend is this one (a gauge, as of the last
    /// [`Pipeline::maintain`]; expired flows not yet swept included).
    pub flows: Vec<u64>,
    /// Datagrams too big for an encapsulated path: answered with ICMP (DF) or dropped.
    pub too_big: u64,
    /// IPv4 datagrams without DF too big for an encapsulated path, cut into pieces (each
    /// piece counted in `frames` and `bytes`).
    pub fragmented: u64,
}

impl ApplianceCounts {
    /// One frame of `bytes` bytes sent to backend id `at`.
    #[inline(always)]
    fn count(&mut self, at: usize, bytes: usize) {
        if let (Some(f), Some(b)) = (self.frames.get_mut(at), self.bytes.get_mut(at)) {
            *f += 1;
            *b += bytes as u64;
        }
    }

    /// Room for every backend id up to `max` (counts of known ids kept).
    pub(super) fn fit(&mut self, max: usize) {
        for v in [
            &mut self.frames,
            &mut self.bytes,
            &mut self.new_flows,
            &mut self.flows,
        ] {
            if v.len() <= max {
                v.resize(max + 1, 0);
            }
        }
    }

    /// The flows of `table` per backend id, for the ids it has room for.
    pub(super) fn count_flows(&mut self, table: &FlowTable) {
        for (id, n) in self.flows.iter_mut().enumerate() {
            // `fit` made room for backend ids only (at most 4095): the id fits in u16.
            *n = u64::from(table.count_for_backend(id as u16));
        }
    }
}
