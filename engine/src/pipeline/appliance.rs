//! The decision for a TCP/UDP frame to a service address (appliance mode, DESIGN.md "Two
//! delivery modes"): its port rule, whether this node takes it, and the backend it goes to.
//!
//! Ownership is the cluster's as for any flow (by bucket and the handoff rule; a `single` rule
//! by priority among the nodes that serve), so only the owner forwards a frame. The backend is
//! the one the flow table remembers for the flow, else the rule's backend table's choice, which
//! every node computes the same: when the owner of a bucket changes (a join, a drain, a node
//! dead), the new owner sends the flow to the same backend and the connection survives.
//!
//! This file decides and rewrites; it never sends, allocates or reads a clock.

use std::net::IpAddr;

use crate::appliance::encap::{self, Encap, Tunnel};
use crate::appliance::{BackendState, Match, Rule};
use crate::cluster::{Bucket, FlowHash, TcpFlags, Upsert};
use crate::config::{Delivery, RuleMode, Unmatched};
use crate::wire::{self, parse_ip_flow, parse_l2_l4};

use super::types::TCP;
use super::{Action, DropReason, Pipeline};

/// What the service path reads of a frame beyond its flow: where its IP packet is and whom it
/// is for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Destination {
    pub l3: usize,
    pub ip_len: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4's "don't fragment", or IPv6 (never fragmented on the way).
    pub no_frag: bool,
}

impl Destination {
    /// The destination of a TCP/UDP frame (`None`: not one; it then takes the cluster's path).
    #[inline]
    pub(super) fn of(frame: &[u8]) -> Option<Destination> {
        let (l3, src, dst, src_port, dst_port) = match parse_ip_flow(frame) {
            Some(f) => (14, f.src, f.dst, f.src_port, f.dst_port),
            None => {
                let p = parse_l2_l4(frame).ok()?;
                (p.l3_offset, p.src_ip, p.dst_ip, p.src_port?, p.dst_port?)
            }
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
            src,
            dst,
            src_port,
            dst_port,
            no_frag,
        })
    }
}

impl Pipeline {
    /// A TCP/UDP frame while services are configured: by its rule, or the cluster's own path.
    /// (The arguments are a prepared flow frame's parts, as `flow_packet` takes them.)
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    pub(super) fn service_flow(
        &mut self,
        buf: &mut [u8],
        len: usize,
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        now: u64,
    ) -> Action {
        let Some(d) = buf.get(..len).and_then(Destination::of) else {
            return self.flow_packet(bucket, hash, proto, flags, now);
        };
        let r = match self.services.lookup(d.dst, proto, d.dst_port) {
            Match::Cluster => return self.flow_packet(bucket, hash, proto, flags, now),
            Match::NoRule => {
                return match self.services.unmatched() {
                    Unmatched::Drop => Action::Drop(DropReason::NoRule),
                    Unmatched::Local => self.flow_packet(bucket, hash, proto, flags, now),
                }
            }
            Match::Rule(r) => r,
        };
        let rule = &self.services.rules()[r];
        let (mode, delivery) = (rule.mode, rule.delivery);
        let upsert = match mode {
            RuleMode::Disabled => return Action::Drop(DropReason::RuleDisabled),
            RuleMode::Single => {
                if rule.single_owner(self.serving) != Some(self.id.node) {
                    return Action::Drop(DropReason::NotOwned);
                }
                self.flows.upsert(hash, proto, bucket, flags, now)
            }
            RuleMode::Multiple => match self.flow_verdict(bucket, hash, proto, flags, now) {
                Ok(u) => u,
                Err(action) => return action,
            },
        };
        if delivery == Delivery::Local {
            return Action::Deliver;
        }
        self.forward_to_backend(buf, len, r, &d, hash, proto, flags, upsert)
    }

    /// An owned frame of appliance rule `r`: to the flow's backend.
    ///
    /// The flow table's backend holds, whatever the backend's health since (a verdict may be
    /// wrong; a connection it still serves is not cut), except for a connection's first SYN: a
    /// client that reuses the port of a connection its backend refused or lost (no TIME_WAIT
    /// after a reset) starts a new connection, which must not go to a backend that is down or
    /// drained.
    #[allow(clippy::too_many_arguments)]
    fn forward_to_backend(
        &mut self,
        buf: &mut [u8],
        len: usize,
        r: usize,
        d: &Destination,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        upsert: Upsert,
    ) -> Action {
        let rule: &Rule = &self.services.rules()[r];
        let remembered = match upsert.backend {
            0 => None,
            id => self
                .services
                .backend(r, id)
                .filter(|b| b.state == BackendState::Up || proto != TCP || !flags.is_initial_syn()),
        };
        let backend = match remembered {
            Some(b) => b,
            None => {
                let chosen =
                    self.services
                        .choose_new(r, &self.hasher, hash, d.src, d.src_port, proto);
                let Some(b) = chosen else {
                    return Action::Drop(DropReason::NoBackend);
                };
                if upsert.tracked {
                    self.flows.set_backend(hash, b.id);
                }
                self.appliance.new_flows[usize::from(b.id)] += 1;
                b
            }
        };
        let Some(mac) = backend.mac else {
            return Action::Drop(DropReason::NoBackend);
        };
        let id = usize::from(backend.id);
        let tunnel = match rule.delivery {
            Delivery::Dsr | Delivery::Local => {
                encap::dsr(buf, self.id.node_mac, mac);
                self.appliance.frames[id] += 1;
                self.appliance.bytes[id] += len as u64;
                return Action::ToBackend { push: 0 };
            }
            Delivery::Ipip => Tunnel::Ipip,
            Delivery::Gue => Tunnel::Gue {
                port: rule.gue_port,
            },
        };
        let src = match backend.ip {
            IpAddr::V4(_) => self.id.node_ip.map(IpAddr::V4),
            IpAddr::V6(_) => self.id.node_ip6.map(IpAddr::V6),
        };
        let Some(src) = src else {
            return Action::Drop(DropReason::NoBackend);
        };
        let overhead = Encap::overhead(tunnel, backend.ip.is_ipv6());
        if d.ip_len + overhead > usize::from(rule.mtu) {
            if !d.no_frag {
                // The outer header says DF: a sender that allows fragmentation would need the
                // node to fragment, which it does not. Counted with the too-big answers.
                self.appliance.too_big += 1;
                return Action::Drop(DropReason::NoBackend);
            }
            let room = u16::try_from(usize::from(rule.mtu) - overhead).unwrap_or(u16::MAX);
            self.appliance.too_big += 1;
            return match encap::too_big(buf, d.l3, d.ip_len, room, self.id.node_mac) {
                Some(len) => Action::Reply { len },
                None => Action::Drop(DropReason::Malformed(wire::Error::Truncated)),
            };
        }
        let e = Encap {
            tunnel,
            src,
            dst: backend.ip,
            node_mac: self.id.node_mac,
            next_hop: mac,
            inner_at: d.l3,
            inner_len: d.ip_len,
            inner_v6: d.dst.is_ipv6(),
            // 14 bits of the flow's fingerprint: the same flow, the same outer port.
            entropy: (hash.0 >> 48) as u16 & 0x3fff,
        };
        self.appliance.frames[id] += 1;
        self.appliance.bytes[id] += (14 + overhead + d.ip_len) as u64;
        let push = u16::try_from(e.push()).unwrap_or(0);
        self.pending = Some(e);
        Action::ToBackend { push }
    }

    /// After [`Action::ToBackend`] with `push` > 0: writes the outer headers into `frame`, the
    /// frame grown by `push` bytes in front. Returns the frame's new length (`None`: drop it).
    pub fn take_encap(&mut self, frame: &mut [u8]) -> Option<usize> {
        self.pending.take()?.write(frame)
    }
}

/// Per backend id, what this pipeline sent (appliance mode).
#[derive(Debug, Clone, Default)]
pub struct ApplianceCounts {
    pub frames: Vec<u64>,
    pub bytes: Vec<u64>,
    pub new_flows: Vec<u64>,
    /// Datagrams too big for an encapsulated path: answered with ICMP (DF) or dropped.
    pub too_big: u64,
}

impl ApplianceCounts {
    /// Room for every backend id up to `max` (counts of known ids kept).
    pub(super) fn fit(&mut self, max: usize) {
        for v in [&mut self.frames, &mut self.bytes, &mut self.new_flows] {
            if v.len() <= max {
                v.resize(max + 1, 0);
            }
        }
    }
}
