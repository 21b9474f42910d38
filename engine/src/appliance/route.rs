//! Per backend id, what a frame needs to reach that backend: its rule, whether it takes new
//! flows, and the way there (DSR's MAC pair, or the outer headers of its encapsulation).
//!
//! Compiled from the services and the node's own addresses whenever either changes (between
//! bursts), and read per frame with one index, instead of walking rules and backends. Owns
//! nothing but that copy: it never chooses a backend, never decides who owns a flow, and the
//! services stay the truth (a route is rebuilt, never changed in place).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::encap::{self, Outer, Tunnel};
use super::{BackendState, Services};
use crate::config::Delivery;
use crate::wire::EthernetAddress;

/// How frames reach one backend. An explicit one-byte tag (`repr(u8)`): without it the
/// variant was encoded in a spare value of `Outer`'s fields, and telling the three apart on the
/// packet path took a subtraction, a conditional move and two tests where one compare does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Way {
    /// They cannot: its MAC (or the next hop's) is not known yet, or the node has no address of
    /// the backend's IP version to encapsulate from.
    Unreachable,
    /// DSR: the frame's destination and source MACs become these 12 bytes (backend, node).
    Dsr([u8; 12]),
    /// IP-in-IP or GUE: these outer headers in front.
    Encap(Outer),
}

/// One backend's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The index of its rule in [`Services::rules`].
    pub rule: u16,
    /// It takes new flows (neither down nor drained, nor of weight 0).
    pub up: bool,
    /// Its rule's path MTU (encapsulation: a larger IPv4 packet without DF is cut to fit, any
    /// other is answered "too big").
    pub mtu: u16,
    pub way: Way,
}

/// Every backend's route, by id.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_id: Vec<Option<Route>>,
}

impl Routes {
    /// The routes of `services` from a node with MAC `node_mac` and addresses `node_ip`,
    /// `node_ip6` (the outer sources of encapsulations).
    pub fn build(
        services: &Services,
        node_mac: EthernetAddress,
        node_ip: Option<Ipv4Addr>,
        node_ip6: Option<Ipv6Addr>,
    ) -> Routes {
        let mut by_id: Vec<Option<Route>> = Vec::new();
        for (ri, b) in services.backends() {
            let rule = &services.rules()[ri];
            let tunnel = match rule.delivery {
                // `local` rules never forward; they would be DSR's if they did.
                Delivery::Dsr | Delivery::Local => None,
                Delivery::Ipip => Some(Tunnel::Ipip),
                Delivery::Gue => Some(Tunnel::Gue {
                    port: rule.gue_port,
                }),
            };
            let src = match b.ip {
                IpAddr::V4(_) => node_ip.map(IpAddr::V4),
                IpAddr::V6(_) => node_ip6.map(IpAddr::V6),
            };
            let way = match (b.mac, tunnel) {
                (None, _) => Way::Unreachable,
                (Some(mac), None) => Way::Dsr(encap::dsr_macs(node_mac, mac)),
                (Some(mac), Some(tunnel)) => src
                    .and_then(|src| Outer::new(tunnel, src, b.ip, node_mac, mac))
                    .map_or(Way::Unreachable, Way::Encap),
            };
            let id = usize::from(b.id);
            if by_id.len() <= id {
                by_id.resize(id + 1, None);
            }
            // Rules are bounded by MAX_BACKENDS (4095): the index fits in u16.
            by_id[id] = Some(Route {
                rule: ri as u16,
                up: b.state == BackendState::Up && b.weight > 0,
                mtu: rule.mtu,
                way,
            });
        }
        Routes { by_id }
    }

    /// Backend `id`'s route (`None`: no backend has that id).
    #[inline(always)]
    pub fn get(&self, id: u16) -> Option<&Route> {
        self.by_id.get(usize::from(id))?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const NODE_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

    fn services(text: &str) -> Services {
        let config = Config::parse(text, "t.yaml").unwrap();
        config.validate("t.yaml").unwrap();
        Services::compile(&config, b"route-test-secret-0123456789abcd", None)
    }

    const CONFIG: &str = "cluster:\n  ip: 198.18.0.1\n  mac: 02:cc:00:00:00:01\n  \
        secret_file: secret\nnode:\n  id: 1\n  mac: 02:00:00:00:00:01\n  ip: 198.18.0.2\n  \
        ip6: \"2001:2::2\"\n\
        dataplane:\n  wire_port: { vdev: net_null0 }\n  host_port: { vdev: net_null1 }\n\
        services:\n\
        \x20 - name: web\n    addresses: [198.18.0.1]\n    protocol: tcp\n    ports: [80]\n    \
        delivery: dsr\n    backends:\n      - { ip: 198.18.1.1, mac: \"02:bb:00:00:00:01\" }\n      \
        - { ip: 198.18.1.2 }\n\
        \x20 - name: dns\n    addresses: [198.18.0.1]\n    protocol: udp\n    ports: [53]\n    \
        delivery: gue\n    backends:\n      - { ip: 198.18.2.1, mac: \"02:bb:00:00:01:01\" }\n      \
        - { ip: \"2001:2:1::1\", mac: \"02:bb:00:00:01:02\" }\n";

    /// Each backend's route says its rule, state and way as the services do.
    #[test]
    fn routes_follow_the_services() {
        let s = services(CONFIG);
        let routes = Routes::build(&s, NODE_MAC, Some(Ipv4Addr::new(198, 18, 0, 2)), None);
        for (ri, b) in s.backends() {
            let r = routes.get(b.id).expect("every backend has a route");
            assert_eq!((usize::from(r.rule), r.up), (ri, true), "{}", b.name);
            assert_eq!(r.mtu, s.rules()[ri].mtu);
            let way = match (b.name.as_str(), r.way) {
                (_, Way::Dsr(macs)) => {
                    assert_eq!(&macs[..6], &b.mac.unwrap().0);
                    assert_eq!(&macs[6..], &NODE_MAC.0);
                    "dsr"
                }
                (_, Way::Encap(o)) => {
                    assert_eq!(o.overhead(), 20 + 8 + 4);
                    "gue"
                }
                (_, Way::Unreachable) => "unreachable",
            };
            let want = match b.ip.to_string().as_str() {
                "198.18.1.1" => "dsr",
                // No MAC learned yet.
                "198.18.1.2" => "unreachable",
                "198.18.2.1" => "gue",
                // No node IPv6 address given to the routes to encapsulate from.
                "2001:2:1::1" => "unreachable",
                other => panic!("unexpected backend {other}"),
            };
            assert_eq!(way, want, "{}", b.ip);
        }
        assert!(routes.get(0).is_none(), "id 0 is never a backend's");
        assert!(routes.get(4095).is_none());
    }

    /// A backend down or drained keeps its route and takes no new flows; one whose MAC is
    /// learned becomes reachable.
    #[test]
    fn state_and_learned_macs_change_the_route() {
        let s = services(CONFIG);
        let id = |ip: &str| {
            s.backends()
                .find(|(_, b)| b.ip.to_string() == ip)
                .unwrap()
                .1
                .id
        };
        let (a, b) = (id("198.18.1.1"), id("198.18.1.2"));
        let s = s.with_backend(b"k", a, |b| b.state = BackendState::Drained);
        let s = s.with_backend(b"k", b, |b| {
            b.mac = Some(EthernetAddress([2, 0xbb, 0, 0, 0, 2]))
        });
        let routes = Routes::build(&s, NODE_MAC, None, None);
        let ra = routes.get(a).unwrap();
        assert!(!ra.up && matches!(ra.way, Way::Dsr(_)));
        let rb = routes.get(b).unwrap();
        assert!(rb.up && matches!(rb.way, Way::Dsr(m) if m[5] == 2));
    }
}
