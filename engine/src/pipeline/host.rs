//! The host side: frames from the node's kernel, on their way to the wire port.
//!
//! Every frame leaves with the node MAC as its Ethernet source (DESIGN.md, "Why it works on a
//! learning switch"). The kernel's own ARP replies, announcements and neighbour advertisements
//! for the cluster address are dropped (the designated node's engine answers instead), and a
//! server's FIN or RST ends its flow in the flow table (IPv4 and IPv6); a refusal on the
//! health-checked port is held back ([`super::ServiceState::hold_refusals_on`]).

use std::net::{IpAddr, Ipv6Addr};

use crate::cluster::{FlowHash, FlowKey, FlowState, TcpFlags};
use crate::wire::{
    self, arp, ethernet, icmpv6, ipv4, ipv6, parse_l2_l4, tcp, EtherType, IpProtocol,
};

use super::types::TCP;
use super::{Action, DropReason, Pipeline};

impl Pipeline {
    /// A frame from the node's kernel, on its way to the wire. Its Ethernet source becomes the
    /// node MAC, always: if the switch ever saw the cluster MAC as a source it would learn it
    /// on this node's port and the other nodes would stop hearing the cluster. The kernel's own
    /// answers for the cluster address are dropped: the engine's designated node answers.
    #[inline]
    pub fn from_host(&mut self, frame: &mut [u8], now: u64) -> Action {
        if frame.len() < ethernet::HEADER_LEN {
            return Action::Drop(DropReason::Malformed(wire::Error::Truncated));
        }
        let ethertype = ethernet::Frame::new_unchecked(&*frame).outer_ethertype();
        // The server ending a connection (FIN or RST) ends its flow here too: a connection the
        // service refused or reset would otherwise hold up a handoff's "done" until it times out.
        // Checked cheaply on plain IPv4/TCP and IPv6/TCP first; only FIN/RST segments are parsed.
        if ends_connection(ethertype, frame) && self.server_closed(frame, now) {
            return Action::Drop(DropReason::ServiceRefused);
        }
        // Only ARP and IPv6 can carry the kernel's own address answers; IPv4 passes at once.
        if matches!(
            ethertype,
            EtherType::Arp | EtherType::Ipv6 | EtherType::Vlan
        ) {
            if let Some(reason) = self.host_suppressed(frame) {
                return Action::Drop(reason);
            }
        }
        match ethertype {
            EtherType::Arp => self.own_arp(frame),
            EtherType::Ipv6 => self.own_ndp(frame),
            _ => {}
        }
        ethernet::Frame::new_unchecked(frame).set_src(self.id.node_mac);
        Action::ToWire
    }

    /// The kernel's ARP about an address of its own other than the cluster's (the node's own
    /// address: an appliance checking its backends) names the node MAC as its sender, so that
    /// the answers come back to this node rather than to whichever node owns their bucket
    /// (the kernel's interface has the cluster MAC).
    fn own_arp(&self, frame: &mut [u8]) {
        let Ok(p) = parse_l2_l4(frame) else {
            return;
        };
        let Some(arp_bytes) = frame.get_mut(p.l3_offset..) else {
            return;
        };
        let Ok(mut pkt) = arp::Packet::new_checked(arp_bytes) else {
            return;
        };
        if pkt.source_protocol_addr() != self.id.cluster_ip
            && pkt.source_hardware_addr() == self.id.cluster_mac
        {
            pkt.set_source_hardware_addr(self.id.node_mac);
        }
    }

    /// The same for IPv6: the kernel's neighbour solicitations and advertisements from the
    /// node's own IPv6 address (`node.ip6`: an appliance checking its IPv6 backends)
    /// carry the node MAC in their link-layer address option, so that the backends' answers
    /// come back to this node. The ICMPv6 checksum is filled in again.
    fn own_ndp(&self, frame: &mut [u8]) {
        const ICMPV6: u8 = 58;
        const SOLICIT: u8 = 135;
        const ADVERT: u8 = 136;
        let ip = ethernet::HEADER_LEN;
        let icmp = ip + ipv6::HEADER_LEN;
        // Options after the type, code, checksum, flags and target (24 bytes).
        let options = icmp + 24;
        let Some(&kind) = frame.get(icmp) else {
            return;
        };
        if frame.get(ip + 6) != Some(&ICMPV6) || !matches!(kind, SOLICIT | ADVERT) {
            return;
        }
        let Ok(addrs) = <[u8; 32]>::try_from(&frame[ip + 8..ip + 40]) else {
            return;
        };
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&addrs[..16]).expect("16 bytes"));
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&addrs[16..]).expect("16 bytes"));
        if Some(src) != self.id.node_ip6 {
            return;
        }
        let payload_len = usize::from(u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]));
        let Some(end) = icmp.checked_add(payload_len).filter(|&e| e <= frame.len()) else {
            return;
        };
        let mut at = options;
        let mut changed = false;
        // Each option: type, length in units of 8 bytes, value; link-layer addresses (types 1
        // and 2) are 8 bytes long on Ethernet.
        while at + 8 <= end {
            let (kind, units) = (frame[at], usize::from(frame[at + 1]));
            if units == 0 {
                return;
            }
            if matches!(kind, 1 | 2) && units == 1 && frame[at + 2..at + 8] == self.id.cluster_mac.0
            {
                frame[at + 2..at + 8].copy_from_slice(&self.id.node_mac.0);
                changed = true;
            }
            at += units * 8;
        }
        if changed {
            icmpv6::Packet::new_unchecked(&mut frame[icmp..end]).fill_checksum(&src, &dst);
        }
    }

    /// The server sent FIN or RST: the flow ends. Returns true when the segment is the kernel
    /// refusing a new connection on the held port (see
    /// [`super::ServiceState::hold_refusals_on`]): the
    /// caller drops it, and the flow is forgotten so that the retransmitted SYN is a new flow.
    fn server_closed(&mut self, frame: &[u8], now: u64) -> bool {
        let Ok(p) = parse_l2_l4(frame) else {
            return false;
        };
        let (Some(sp), Some(dp)) = (p.src_port, p.dst_port) else {
            return false;
        };
        // The server's segment, reversed: the flow as the client sends it.
        let key = FlowKey::new(self.id.affinity, p.dst_ip, dp, TCP);
        let hash = FlowHash::new(self.hasher.hash(&key), p.src_ip, dp, sp, TCP);
        let Some(entry) = self.flows.get(hash, now) else {
            return false;
        };
        let flags = TcpFlags(p.tcp_flags.0 as u8);
        let refusal = flags.contains(TcpFlags::RST)
            && entry.state == FlowState::SynSeen
            && self.service.hold_refusals_on == Some(sp)
            && self.is_cluster_address(p.src_ip);
        if refusal {
            self.flows.remove(hash);
            return true;
        }
        self.flows.upsert(hash, TCP, entry.bucket, flags, now);
        false
    }

    /// The cluster's IPv4 address or its IPv6 address.
    fn is_cluster_address(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.id.cluster_ip,
            IpAddr::V6(a) => Some(a) == self.id.cluster_ip6,
        }
    }

    fn host_suppressed(&self, frame: &[u8]) -> Option<DropReason> {
        let p = parse_l2_l4(frame).ok()?;
        match p.ethertype {
            EtherType::Arp => {
                let pkt = arp::Packet::new_checked(&frame[p.l3_offset..]).ok()?;
                let r = arp::Repr::parse(&pkt).ok()?;
                let about_cluster = r.source_protocol_addr == self.id.cluster_ip;
                let gratuitous = r.source_protocol_addr == r.target_protocol_addr;
                let is_reply = r.operation == arp::Operation::Reply;
                // The kernel's replies for the cluster IP and its announcements of it; its
                // requests (resolving a client) pass.
                (about_cluster && (is_reply || gratuitous)).then_some(DropReason::HostSuppressed)
            }
            EtherType::Ipv6 if p.protocol == IpProtocol::Icmpv6 => {
                let cluster_ip6 = self.id.cluster_ip6?;
                let icmp = p.icmp?;
                let msg = icmpv6::Message::from(icmp.msg_type);
                let pkt = icmpv6::Packet::new_checked(&frame[p.l4_offset..p.l4_offset + p.l4_len])
                    .ok()?;
                let target = pkt.target_addr()?;
                let unspecified = p.src_ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
                let suppress = target == cluster_ip6
                    && (msg == icmpv6::Message::NeighborAdvert
                        || (msg == icmpv6::Message::NeighborSolicit && unspecified));
                suppress.then_some(DropReason::HostSuppressed)
            }
            _ => None,
        }
    }
}

/// Whether `frame` (of `ethertype`) is plain TCP carrying a FIN or an RST, over IPv4 without
/// options or over IPv6 without extension headers (how the kernel sends its segments): read at
/// fixed offsets, before any parse, on every IP frame from the host.
#[inline(always)]
fn ends_connection(ethertype: EtherType, frame: &[u8]) -> bool {
    let ip_len = match ethertype {
        EtherType::Ipv4 => ipv4::HEADER_LEN,
        EtherType::Ipv6 => ipv6::HEADER_LEN,
        _ => return false,
    };
    let tcp_at = ethernet::HEADER_LEN + ip_len;
    let Some(headers) = frame.get(ethernet::HEADER_LEN..tcp_at + tcp::HEADER_LEN) else {
        return false;
    };
    let plain_tcp = if ethertype == EtherType::Ipv4 {
        let ip = ipv4::Packet::new_unchecked(headers);
        ip.protocol() == IpProtocol::Tcp && ip.version() == 4 && ip.header_len() == ip_len
    } else {
        let ip = ipv6::Packet::new_unchecked(headers);
        ip.next_header() == IpProtocol::Tcp && ip.version() == 6
    };
    let segment = tcp::Packet::new_unchecked(&headers[ip_len..]);
    plain_tcp && (segment.flags().fin() || segment.flags().rst())
}
