//! Backend MACs learned by ARP (IPv4) and neighbour discovery (IPv6): appliance mode sends a
//! backend's frames to its MAC, which the configuration may leave out. A backend on another
//! network (`via`) is reached through a router: its frames go to the router's MAC, asked for
//! once for every backend behind it.
//!
//! Sans-IO: [`Neighbours::tick`] says which requests to send now (whole Ethernet frames, from
//! the node's own MAC and address), [`Neighbours::received`] reads an ARP reply or neighbour
//! advertisement the wire brought to the node's MAC and says which backend's MAC it taught or
//! changed. A backend is asked every [`RETRY`] until it answers, then every [`REFRESH`] at its
//! known MAC; a refresh unanswered after [`RETRY`] is asked again of everyone (broadcast, or
//! the solicited-node group), then after twice as long each time, up to [`REFRESH`], until an
//! answer: a backend replaced by another machine at the same address, whose NIC filters frames
//! to the old MAC, is followed within a refresh and a retry, and a backend that is switched off
//! costs the segment a broadcast every [`REFRESH`] once it has been silent half a minute. A
//! backend that stops answering keeps its last MAC: its health check, not ARP, says whether it
//! serves.
//!
//! Owns only the resolution state; never sends, reads a clock or touches [`super::Services`]
//! (the control thread publishes what this learns).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::wire::{self, arp, icmpv6, EtherType, EthernetAddress, IpProtocol};

use super::Services;

/// Between requests to a backend that has not answered yet.
pub const RETRY: Duration = Duration::from_secs(1);
/// Between requests to a backend whose MAC is known.
pub const REFRESH: Duration = Duration::from_secs(30);

/// One address to resolve: a backend's own, or the router its frames go through.
#[derive(Debug, Clone)]
struct Entry {
    ip: IpAddr,
    /// The backends whose frames go to this address's MAC.
    ids: Vec<u16>,
    mac: Option<EthernetAddress>,
    next_ask: u64,
    /// When it was last asked.
    asked: u64,
    /// No answer since it was last asked.
    awaiting: bool,
    /// Nanoseconds to the next request while a known MAC goes unanswered (doubles, up to
    /// [`REFRESH`]).
    backoff: u64,
}

/// The resolution state of every backend without a configured MAC.
#[derive(Debug, Clone)]
pub struct Neighbours {
    entries: Vec<Entry>,
    node_mac: EthernetAddress,
    /// Never a backend's (learned, it would send a backend's frames back to every node).
    cluster_mac: EthernetAddress,
    node_ip: Option<Ipv4Addr>,
    node_ip6: Option<Ipv6Addr>,
}

impl Neighbours {
    /// For the backends of `services` that have no configured MAC, asked from `node_mac` and
    /// the node's addresses (`cluster_mac`: the cluster's, which no answer may teach).
    pub fn new(
        services: &Services,
        node_mac: EthernetAddress,
        cluster_mac: EthernetAddress,
        node_ip: Option<Ipv4Addr>,
        node_ip6: Option<Ipv6Addr>,
    ) -> Neighbours {
        let mut n = Neighbours {
            entries: Vec::new(),
            node_mac,
            cluster_mac,
            node_ip,
            node_ip6,
        };
        // Nothing is known yet: nothing to tell.
        let _ = n.update(services);
        n
    }

    /// After a reload: new addresses are asked at once, ones no backend needs forgotten,
    /// known MACs kept. Returns the MACs known already for backends of `services` that lack
    /// one: a backend a reload put behind a router this node has resolved.
    pub fn update(&mut self, services: &Services) -> Vec<(u16, EthernetAddress)> {
        let mut wanted: Vec<(IpAddr, Vec<u16>)> = Vec::new();
        for (_, b) in services.backends().filter(|(_, b)| !b.configured_mac) {
            let ip = b.via.unwrap_or(b.ip);
            match wanted.iter_mut().find(|(w, _)| *w == ip) {
                Some((_, ids)) => ids.push(b.id),
                None => wanted.push((ip, vec![b.id])),
            }
        }
        self.entries
            .retain(|e| wanted.iter().any(|(ip, _)| *ip == e.ip));
        for (ip, ids) in wanted {
            match self.entries.iter_mut().find(|e| e.ip == ip) {
                Some(e) => e.ids = ids,
                None => self.entries.push(Entry {
                    ip,
                    ids,
                    mac: None,
                    next_ask: 0,
                    asked: 0,
                    awaiting: false,
                    backoff: 0,
                }),
            }
        }
        services
            .backends()
            .filter(|(_, b)| b.mac.is_none())
            .filter_map(|(_, b)| {
                let e = self.entries.iter().find(|e| e.ids.contains(&b.id))?;
                Some((b.id, e.mac?))
            })
            .collect()
    }

    /// Whether answers matter (some backend is resolved here): the data path copies ARP
    /// replies and neighbour advertisements to the node's MAC only then.
    pub fn wants_answers(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Backends not resolved yet, by id.
    pub fn unresolved(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries
            .iter()
            .filter(|e| e.mac.is_none())
            .flat_map(|e| e.ids.iter().copied())
    }

    /// The requests due at `now` (nanoseconds), as whole frames for the wire.
    pub fn tick(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for e in self.entries.iter_mut() {
            if now < e.next_ask {
                continue;
            }
            // A refresh goes to the known MAC, unless the last request went unanswered: the
            // address may have moved to a NIC that no longer takes frames to that MAC.
            let known = e.mac.filter(|_| !e.awaiting);
            // Unresolved: every retry. A known MAC: a retry after a refresh, then longer and
            // longer while nobody answers. An answer moves the next request to a refresh after
            // this one.
            let retry = RETRY.as_nanos() as u64;
            e.backoff = match (e.mac, e.awaiting) {
                (Some(_), true) => (e.backoff * 2).clamp(retry, REFRESH.as_nanos() as u64),
                _ => retry,
            };
            e.next_ask = now + e.backoff;
            e.asked = now;
            e.awaiting = true;
            let frame = match e.ip {
                IpAddr::V4(ip) => self
                    .node_ip
                    .map(|src| arp_request(self.node_mac, src, ip, known)),
                IpAddr::V6(ip) => self
                    .node_ip6
                    .and_then(|src| solicitation(self.node_mac, src, ip, known)),
            };
            out.extend(frame);
        }
        out
    }

    /// An ARP reply or neighbour advertisement to the node's MAC: the MAC it taught and the
    /// backends whose frames go there, if it is news (a first answer or a changed MAC).
    ///
    /// Only a unicast MAC that is neither the node's nor the cluster's is learned (a forged
    /// answer must not flood a backend's frames to the segment or loop them back to the
    /// cluster), and an advertisement without the override flag never changes a known MAC
    /// (RFC 4861 7.2.5).
    pub fn received(&mut self, frame: &[u8]) -> Option<(EthernetAddress, &[u16])> {
        let (ip, mac, overrides) = answer(frame)?;
        if !mac.is_unicast() || mac.0 == [0; 6] || mac == self.node_mac || mac == self.cluster_mac {
            return None;
        }
        let e = self.entries.iter_mut().find(|e| e.ip == ip)?;
        if !overrides && e.mac.is_some_and(|known| known != mac) {
            return None;
        }
        // Answered: the next request is a refresh.
        if e.awaiting {
            e.awaiting = false;
            e.next_ask = e.asked + REFRESH.as_nanos() as u64;
        }
        if e.mac == Some(mac) {
            return None;
        }
        e.mac = Some(mac);
        Some((mac, &e.ids))
    }
}

/// Whether `frame` is an ARP reply or a neighbour advertisement (for the data path's copy to
/// the control thread; cheap, no full parse).
#[inline]
pub fn is_answer(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x06]) => frame.get(20..22) == Some(&[0, 2]),
        // IPv6, next header ICMPv6, type 136 (no extension headers: NDP has none).
        Some([0x86, 0xdd]) => frame.get(20) == Some(&58) && frame.get(54) == Some(&136),
        _ => false,
    }
}

/// The address and MAC an answer teaches, and whether it may replace a known MAC (an ARP
/// reply always; a neighbour advertisement with its override flag).
///
/// A neighbour advertisement counts only as RFC 4861 7.1.2 says: hop limit 255 (it was sent on
/// this link: a router forwarding one from another network, to the node's own address,
/// lowers it), a valid checksum, a unicast target.
fn answer(frame: &[u8]) -> Option<(IpAddr, EthernetAddress, bool)> {
    let p = wire::parse_l2_l4(frame).ok()?;
    match p.ethertype {
        EtherType::Arp => {
            let r = arp::Repr::parse(&arp::Packet::new_checked(frame.get(p.l3_offset..)?).ok()?)
                .ok()?;
            (r.operation == arp::Operation::Reply).then_some((
                IpAddr::V4(r.source_protocol_addr),
                r.source_hardware_addr,
                true,
            ))
        }
        EtherType::Ipv6 if p.protocol == IpProtocol::Icmpv6 && p.hop_limit == 255 => {
            let (IpAddr::V6(src), IpAddr::V6(dst)) = (p.src_ip, p.dst_ip) else {
                return None;
            };
            let packet =
                icmpv6::Packet::new_checked(frame.get(p.l4_offset..p.l4_offset + p.l4_len)?)
                    .ok()?;
            if !packet.verify_checksum(&src, &dst) {
                return None;
            }
            let icmpv6::NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            } = icmpv6::NdiscRepr::parse(&packet).ok()?
            else {
                return None;
            };
            if target_addr.is_multicast() {
                return None;
            }
            // An advertisement without the option comes from the Ethernet source.
            let mac = match lladdr {
                Some(mac) => mac,
                None => EthernetAddress(frame.get(6..12)?.try_into().ok()?),
            };
            Some((IpAddr::V6(target_addr), mac, flags.override_))
        }
        _ => None,
    }
}

/// "Who has `target`? Tell `src`": broadcast, or unicast to the known MAC for a refresh.
fn arp_request(
    node_mac: EthernetAddress,
    src: Ipv4Addr,
    target: Ipv4Addr,
    known: Option<EthernetAddress>,
) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&known.map_or([0xff; 6], |m| m.0));
    f[6..12].copy_from_slice(&node_mac.0);
    f[12..14].copy_from_slice(&EtherType::Arp.raw().to_be_bytes());
    let r = arp::Repr {
        operation: arp::Operation::Request,
        source_hardware_addr: node_mac,
        source_protocol_addr: src,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    // 60 bytes hold the 28-byte ARP packet after the header: emit cannot fail.
    let _ = r.emit(&mut f[14..]);
    f
}

/// A neighbour solicitation for `target` from `src`, to its solicited-node group (or to the
/// known MAC and address for a refresh), with the node MAC as source link-layer address.
fn solicitation(
    node_mac: EthernetAddress,
    src: Ipv6Addr,
    target: Ipv6Addr,
    known: Option<EthernetAddress>,
) -> Option<Vec<u8>> {
    let t = target.octets();
    let (dst_mac, dst_ip) = match known {
        Some(mac) => (mac.0, target),
        None => {
            let group = Ipv6Addr::new(
                0xff02,
                0,
                0,
                0,
                0,
                1,
                0xff00 | u16::from(t[13]),
                u16::from_be_bytes([t[14], t[15]]),
            );
            ([0x33, 0x33, 0xff, t[13], t[14], t[15]], group)
        }
    };
    let ns = icmpv6::NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(node_mac),
    };
    let icmp_len = ns.buffer_len();
    let mut f = vec![0u8; 14 + 40 + icmp_len];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&node_mac.0);
    f[12..14].copy_from_slice(&EtherType::Ipv6.raw().to_be_bytes());
    let ip = &mut f[14..54];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&u16::try_from(icmp_len).ok()?.to_be_bytes());
    ip[6] = IpProtocol::Icmpv6.raw();
    ip[7] = 255;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst_ip.octets());
    ns.emit(&mut f[54..], &src, &dst_ip).ok()?;
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const NODE: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const CLUSTER: EthernetAddress = EthernetAddress([2, 0xcc, 0, 0, 0, 1]);
    const B: EthernetAddress = EthernetAddress([2, 0xbb, 0, 0, 0, 7]);

    fn services() -> Services {
        let text = r#"
cluster: { ip: 198.18.0.1, mac: "02:cc:00:00:00:01", secret_file: secret }
node: { id: 1, mac: "02:00:00:00:00:01", ip: 198.18.0.11, ip6: "2001:2::11" }
dataplane:
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
services:
  - name: web
    addresses: [198.18.0.100, "2001:2::100"]
    ports: [80]
    delivery: dsr
    backends:
      - { ip: 198.18.0.21, mac: "02:bb:00:00:00:01" }
      - { ip: 198.18.0.22 }
      - { ip: "2001:2::22" }
"#;
        let c = Config::parse(text, "t.yaml").unwrap();
        c.validate("t.yaml").unwrap();
        Services::compile(&c, b"secret", None)
    }

    fn neighbours() -> Neighbours {
        Neighbours::new(
            &services(),
            NODE,
            CLUSTER,
            Some(Ipv4Addr::new(198, 18, 0, 11)),
            Some("2001:2::11".parse().unwrap()),
        )
    }

    /// The backend's answer to `request`, as a real host writes it.
    fn arp_reply_to(request: &[u8], mac: EthernetAddress) -> Vec<u8> {
        let r = arp::Repr::parse(&arp::Packet::new_checked(&request[14..]).unwrap()).unwrap();
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&NODE.0);
        f[6..12].copy_from_slice(&mac.0);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        let answer = arp::Repr {
            operation: arp::Operation::Reply,
            source_hardware_addr: mac,
            source_protocol_addr: r.target_protocol_addr,
            target_hardware_addr: r.source_hardware_addr,
            target_protocol_addr: r.source_protocol_addr,
        };
        answer.emit(&mut f[14..]).unwrap();
        f
    }

    #[test]
    fn asks_for_unconfigured_backends_until_they_answer_then_refreshes() {
        let mut n = neighbours();
        assert!(n.wants_answers());
        assert_eq!(
            n.unresolved().count(),
            2,
            "the configured MAC is not asked for"
        );
        let sent = n.tick(0);
        assert_eq!(sent.len(), 2);
        let arp = sent.iter().find(|f| f[12..14] == [0x08, 0x06]).unwrap();
        assert_eq!(&arp[..6], &[0xff; 6]);
        assert_eq!(&arp[6..12], &NODE.0);
        let ns = sent.iter().find(|f| f[12..14] == [0x86, 0xdd]).unwrap();
        let p = wire::parse_l2_l4(ns).unwrap();
        assert_eq!(p.hop_limit, 255);
        assert_eq!(&ns[..3], &[0x33, 0x33, 0xff]);
        assert!(n.tick(500_000_000).is_empty(), "not again before a second");
        assert_eq!(n.tick(1_000_000_000).len(), 2, "again after a second");
        // The answer teaches the MAC once; the next request is a unicast refresh.
        let reply = arp_reply_to(arp, B);
        assert!(is_answer(&reply) && !is_answer(arp));
        assert_eq!(n.received(&reply), Some((B, &[2u16][..])));
        assert_eq!(n.received(&reply), None, "no news");
        assert_eq!(n.unresolved().count(), 1);
        let later = n.tick(5_000_000_000);
        assert_eq!(
            later.len(),
            1,
            "only the unresolved one within the refresh time"
        );
        let refresh = n.tick(32_000_000_000);
        let arp = refresh.iter().find(|f| f[12..14] == [0x08, 0x06]).unwrap();
        assert_eq!(&arp[..6], &B.0, "a refresh goes to the known MAC");
        // The backend's machine was replaced: its new NIC ignores frames to the old MAC, so the
        // refresh goes unanswered; a second later everyone is asked.
        let is_arp = |f: &Vec<u8>| f[12..14] == [0x08, 0x06];
        assert!(
            !n.tick(32_500_000_000).iter().any(is_arp),
            "not before a retry"
        );
        let again = n.tick(33_000_000_000);
        let arp = again.iter().find(|f| is_arp(f)).unwrap().clone();
        assert_eq!(&arp[..6], &[0xff; 6], "an unanswered refresh is broadcast");
        assert_eq!(n.unresolved().count(), 1, "the old MAC is kept meanwhile");
        // Still nobody: again after 2 s, then 4 s (a machine switched off is not asked every
        // second for ever).
        let asked_at = |n: &mut Neighbours, from: u64, to: u64| {
            (from..=to)
                .step_by(250_000_000)
                .find(|&t| n.tick(t).iter().any(is_arp))
        };
        assert_eq!(
            asked_at(&mut n, 33_250_000_000, 40_000_000_000),
            Some(35_000_000_000)
        );
        assert_eq!(
            asked_at(&mut n, 35_250_000_000, 45_000_000_000),
            Some(39_000_000_000)
        );
        // A changed MAC is news; the next request is a refresh to it, a refresh later.
        let moved = EthernetAddress([2, 0xbb, 0, 0, 0, 8]);
        assert_eq!(
            n.received(&arp_reply_to(&arp, moved)),
            Some((moved, &[2u16][..]))
        );
        assert!(
            !n.tick(40_000_000_000).iter().any(is_arp),
            "answered: no retry"
        );
        let refresh = n.tick(69_000_000_000);
        let arp = refresh.iter().find(|f| is_arp(f)).unwrap();
        assert_eq!(
            &arp[..6],
            &moved.0,
            "a refresh a refresh after the answered request"
        );
        // A refresh answered with the same MAC: no news, and no broadcast after it.
        assert_eq!(n.received(&arp_reply_to(arp, moved)), None);
        assert!(
            !n.tick(71_000_000_000).iter().any(is_arp),
            "answered: no broadcast"
        );
        assert!(
            n.tick(99_000_000_000).iter().any(is_arp),
            "the next refresh"
        );
    }

    /// A neighbour advertisement is believed only as RFC 4861 says (hop limit 255: sent on
    /// this link; checksum; a unicast target), no answer teaches a group, zero, node or cluster
    /// MAC, and one without the override flag does not change a known MAC.
    #[test]
    fn forged_answers_teach_nothing() {
        let mut n = neighbours();
        let src: Ipv6Addr = "2001:2::22".parse().unwrap();
        let dst: Ipv6Addr = "2001:2::11".parse().unwrap();
        let advert = |mac: EthernetAddress, hop: u8, overrides: bool| {
            let repr = icmpv6::NdiscRepr::NeighborAdvert {
                flags: icmpv6::NeighborFlags {
                    router: false,
                    solicited: true,
                    override_: overrides,
                },
                target_addr: src,
                lladdr: Some(mac),
            };
            let mut icmp = vec![0u8; repr.buffer_len()];
            repr.emit(&mut icmp, &src, &dst).unwrap();
            let mut f = vec![0u8; 54];
            f[..6].copy_from_slice(&NODE.0);
            f[6..12].copy_from_slice(&mac.0);
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            f[14] = 0x60;
            f[18..20].copy_from_slice(&(icmp.len() as u16).to_be_bytes());
            f[20] = 58;
            f[21] = hop;
            f[22..38].copy_from_slice(&src.octets());
            f[38..54].copy_from_slice(&dst.octets());
            f.extend_from_slice(&icmp);
            f
        };
        assert_eq!(
            n.received(&advert(B, 254, true)),
            None,
            "routed here: hop limit 254"
        );
        let mut broken = advert(B, 255, true);
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert_eq!(n.received(&broken), None, "bad checksum");
        for bad in [
            EthernetAddress([0xff; 6]),
            EthernetAddress([0x33, 0x33, 0, 0, 0, 1]),
            EthernetAddress([0; 6]),
            NODE,
            CLUSTER,
        ] {
            assert_eq!(n.received(&advert(bad, 255, true)), None, "{bad}");
        }
        assert_eq!(n.unresolved().count(), 2, "nothing learned");
        let learned = n.received(&advert(B, 255, true));
        assert_eq!(learned.map(|(m, _)| m), Some(B));
        let other = EthernetAddress([2, 0xbb, 0, 0, 0, 9]);
        assert_eq!(
            n.received(&advert(other, 255, false)),
            None,
            "no override flag"
        );
        assert_eq!(
            n.received(&advert(other, 255, true)).map(|(m, _)| m),
            Some(other)
        );
    }

    #[test]
    fn reloads_keep_what_was_learned() {
        let mut n = neighbours();
        let sent = n.tick(0);
        let arp = sent.iter().find(|f| f[12..14] == [0x08, 0x06]).unwrap();
        n.received(&arp_reply_to(arp, B));
        assert_eq!(
            n.update(&services()),
            [(2, B)],
            "services without the MAC learned: told"
        );
        assert_eq!(n.unresolved().count(), 1);
        assert!(n.received(&[0u8; 10]).is_none(), "garbage is ignored");
    }

    /// GUE backends on another network behind one router: the router is asked once for all of
    /// them, its answer is every one's next hop, and a backend a reload adds behind it has the
    /// MAC at once.
    #[test]
    fn backends_behind_a_router_share_its_mac() {
        let text = |extra: &str| {
            format!(
                r#"
cluster: {{ ip: 198.18.0.1, mac: "02:cc:00:00:00:01", secret_file: secret }}
node: {{ id: 1, mac: "02:00:00:00:00:01", ip: 198.18.0.11 }}
dataplane:
  wire_port: {{ vdev: "net_af_packet0,iface=eth0" }}
  host_port: {{ vdev: "net_tap0,iface=cc0" }}
services:
  - name: far
    addresses: [198.18.0.100]
    ports: [80]
    delivery: gue
    backends:
      - {{ ip: 198.19.5.21, via: 198.18.0.254 }}
      - {{ ip: 198.19.5.22, via: 198.18.0.254 }}
      - {{ ip: 198.18.0.23 }}
{extra}"#
            )
        };
        let compile = |t: &str, previous: Option<&Services>| {
            let c = Config::parse(t, "t.yaml").unwrap();
            c.validate("t.yaml").unwrap();
            Services::compile(&c, b"secret", previous)
        };
        let s = compile(&text(""), None);
        let mut n = Neighbours::new(&s, NODE, CLUSTER, Some(Ipv4Addr::new(198, 18, 0, 11)), None);
        assert_eq!(n.unresolved().collect::<Vec<_>>(), [1, 2, 3]);
        let sent = n.tick(0);
        let asked: Vec<[u8; 4]> = sent.iter().map(|f| f[38..42].try_into().unwrap()).collect();
        assert_eq!(
            asked,
            [[198, 18, 0, 254], [198, 18, 0, 23]],
            "the router once, the backend on the segment itself"
        );
        let router = EthernetAddress([2, 0xee, 0, 0, 0, 1]);
        assert_eq!(
            n.received(&arp_reply_to(&sent[0], router)),
            Some((router, &[1u16, 2][..]))
        );
        assert_eq!(n.unresolved().collect::<Vec<_>>(), [3]);
        // What the control thread publishes: the services with the router's MAC.
        let s = s
            .with_backend(b"secret", 1, |b| b.mac = Some(router))
            .with_backend(b"secret", 2, |b| b.mac = Some(router));
        // A reload adds a third backend behind the router.
        let s2 = compile(
            &text("      - { ip: 198.19.5.24, via: 198.18.0.254 }\n"),
            Some(&s),
        );
        let added = s2
            .backends()
            .find(|(_, b)| b.ip == "198.19.5.24".parse::<IpAddr>().unwrap())
            .map(|(_, b)| b.id)
            .unwrap();
        assert_eq!(n.update(&s2), [(added, router)], "known at once");
        assert!(!n.unresolved().any(|id| id == added));
    }
}
