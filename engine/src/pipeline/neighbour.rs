//! Neighbour answers for the cluster address and the service addresses (appliance mode): ARP
//! requests and IPv6 neighbour solicitations.
//!
//! ONE designated node answers (the owner of the requester's bucket), from its node MAC, with
//! the cluster MAC inside the ARP payload or the target link-layer option (DESIGN.md, "Why it
//! works on a learning switch"): clients learn the cluster MAC, the switch never sees it as a
//! source. The answer is written in place over the request. Every other neighbour-discovery
//! and MLD message goes to every node's host.

use std::net::IpAddr;

use crate::cluster::FlowKey;
use crate::wire::{self, arp, ethernet, icmpv6, Parsed};

use super::{Action, DropReason, Pipeline};

impl Pipeline {
    /// The owner of the requester's bucket answers ARP and neighbour solicitations.
    #[inline]
    fn designated(&self, requester: IpAddr) -> bool {
        self.mine(self.hasher.bucket(&FlowKey::source(requester)))
    }

    pub(super) fn arp_from_wire(&mut self, buf: &mut [u8], len: usize, p: &Parsed) -> Action {
        let request = match arp::Packet::new_checked(&buf[p.l3_offset..len])
            .and_then(|pkt| arp::Repr::parse(&pkt))
        {
            Ok(r) => r,
            Err(e) => return Action::Drop(DropReason::Malformed(e)),
        };
        let target = request.target_protocol_addr;
        let for_us = request.is_request_for(self.id.cluster_ip)
            || (request.is_request_for(target) && self.services.is_address(IpAddr::V4(target)));
        if !for_us {
            // Replies to the cluster MAC (some node's kernel asked) and everything else: every
            // host may need them.
            return Action::DeliverShared;
        }
        if !self.designated(IpAddr::V4(request.source_protocol_addr)) {
            return Action::Drop(DropReason::NotOwned);
        }
        match arp::build_reply(buf, &request, self.id.node_mac, self.id.cluster_mac, p.vlan) {
            Ok(len) => Action::reply(len),
            Err(e) => Action::Drop(DropReason::Malformed(e)),
        }
    }

    /// Neighbour discovery: solicitations for the cluster address are answered by the
    /// designated node; all other ND and MLD messages go to every host. `None`: not ND.
    pub(super) fn ndisc_from_wire(
        &mut self,
        buf: &mut [u8],
        len: usize,
        p: &Parsed,
        msg_type: u8,
    ) -> Option<Action> {
        let msg = icmpv6::Message::from(msg_type);
        if !msg.is_neighbor()
            && !matches!(
                msg,
                icmpv6::Message::MldQuery
                    | icmpv6::Message::MldReport
                    | icmpv6::Message::MldDone
                    | icmpv6::Message::Unknown(143)
            )
        {
            return None;
        }
        let IpAddr::V6(src) = p.src_ip else {
            return Some(Action::DeliverShared);
        };
        if msg != icmpv6::Message::NeighborSolicit {
            return Some(Action::DeliverShared);
        }
        let packet = match icmpv6::Packet::new_checked(&buf[p.l4_offset..p.l4_offset + p.l4_len]) {
            Ok(pkt) => pkt,
            Err(e) => return Some(Action::Drop(DropReason::Malformed(e))),
        };
        let solicitation = match icmpv6::NdiscRepr::parse(&packet) {
            Ok(r) => r,
            Err(e) => return Some(Action::Drop(DropReason::Malformed(e))),
        };
        let icmpv6::NdiscRepr::NeighborSolicit { target_addr, .. } = solicitation else {
            return Some(Action::DeliverShared);
        };
        if Some(target_addr) != self.id.cluster_ip6
            && !self.services.is_address(IpAddr::V6(target_addr))
        {
            return Some(Action::DeliverShared);
        }
        // RFC 4861 7.1.1: a solicitation that crossed a router is invalid.
        if p.hop_limit != 255 {
            return Some(Action::Drop(DropReason::Malformed(wire::Error::Malformed)));
        }
        if !self.designated(IpAddr::V6(src)) {
            return Some(Action::Drop(DropReason::NotOwned));
        }
        let sol_eth_src = ethernet::Frame::new_unchecked(&*buf).src();
        let answer = icmpv6::NeighborAdvertFrame::answer(
            &solicitation,
            sol_eth_src,
            src,
            self.id.node_mac,
            self.id.cluster_mac,
            p.vlan,
        )
        .and_then(|na| na.emit(buf));
        let _ = len;
        Some(match answer {
            Ok(len) => Action::reply(len),
            Err(e) => Action::Drop(DropReason::Malformed(e)),
        })
    }
}
