use super::*;
use crate::config::Config;

const CONF: &str = r#"
cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
  ip: 198.18.0.11
dataplane:
  eal_args: [--no-huge, -m, "256"]
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
services:
  - name: web
    addresses: [198.18.0.100, "2001:2::100"]
    ports: [80, "8000-8001"]
    delivery: dsr
    backends:
      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { ip: 198.18.0.22, mac: 02:bb:00:00:00:02 }
      - { ip: "2001:2::22", mac: 02:bb:00:00:00:02 }
  - name: dns
    addresses: [198.18.0.100]
    protocol: udp
    ports: [53]
    mode: single
    priority: [2, 1]
    delivery: gue
    backends:
      - { ip: 198.18.1.21 }
  - name: closed
    addresses: [198.18.0.101]
    ports: [22]
    mode: disabled
"#;

fn config(text: &str) -> Config {
    let c = Config::parse(text, "t.yaml").unwrap();
    c.validate("t.yaml").unwrap();
    c
}

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn destinations_match_rules_by_address_protocol_and_port() {
    let s = Services::compile(&config(CONF), b"secret", None);
    assert!(s.active() && s.has_single());
    assert_eq!(s.lookup(v4("198.18.0.100"), 6, 80), Match::Rule(0));
    assert_eq!(s.lookup(v4("198.18.0.100"), 6, 8001), Match::Rule(0));
    assert_eq!(s.lookup(v4("2001:2::100"), 6, 8000), Match::Rule(0));
    assert_eq!(s.lookup(v4("198.18.0.100"), 17, 53), Match::Rule(1));
    assert_eq!(s.lookup(v4("198.18.0.100"), 6, 53), Match::NoRule);
    assert_eq!(s.lookup(v4("198.18.0.100"), 6, 8002), Match::NoRule);
    assert_eq!(s.lookup(v4("198.18.0.101"), 6, 22), Match::Rule(2));
    assert_eq!(s.lookup(v4("198.18.0.1"), 6, 80), Match::Cluster);
    assert!(s.is_address(v4("2001:2::100")) && !s.is_address(v4("198.18.0.1")));
    assert!(!Services::none().active());
}

/// The per-frame lookup by numbers answers as the lookup by `IpAddr` for every destination,
/// protocol and port, with up to 64 service addresses (its own table) and beyond (its
/// fallback).
#[test]
fn the_raw_lookup_answers_as_the_lookup() {
    let raw = |ip: IpAddr| match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    };
    let many: String = (0..70).map(|i| format!(", 198.18.3.{i}")).collect();
    let crowded = CONF.replace(
        "    addresses: [198.18.0.101]",
        &format!("    addresses: [198.18.0.101{many}]"),
    );
    for text in [CONF, crowded.as_str()] {
        let s = Services::compile(&config(text), b"secret", None);
        let mut dsts: Vec<IpAddr> = s.addresses().to_vec();
        dsts.extend(
            [
                "198.18.0.1",
                "2001:2::1",
                "::ffff:198.18.0.100",
                "198.18.3.200",
                "0.0.0.0",
            ]
            .map(v4),
        );
        for dst in dsts {
            for proto in [1, 6, 17] {
                for port in [0, 22, 53, 79, 80, 81, 7999, 8000, 8001, 8002, 65535] {
                    let (v6, n) = raw(dst);
                    assert_eq!(
                        s.lookup_raw(v6, n, proto, port),
                        s.lookup(dst, proto, port),
                        "{dst} {proto} {port}"
                    );
                }
            }
        }
        for none in [Services::none(), Arc::new(s.clone())] {
            assert_eq!(
                none.lookup_raw(false, 0xc612_0001, 6, 80),
                none.lookup(v4("198.18.0.1"), 6, 80)
            );
        }
    }
}

proptest::proptest! {
    /// The per-frame lookup's port spans answer as the rules in order, for any rules (their
    /// ports overlapping too: `check` refuses that, the first rule in the file takes them), any
    /// address, protocol and port, at the spans' edges above all.
    #[test]
    fn the_port_spans_answer_as_the_rules_in_order(
        rules in proptest::collection::vec(
            (
                proptest::bool::ANY,
                proptest::collection::vec(0usize..3, 1..3),
                proptest::collection::vec((1u16..=65535, 0u16..40), 1..4),
            ),
            1..5,
        ),
        probes in proptest::collection::vec((0usize..4, proptest::bool::ANY, 0u16..=65535), 40),
    ) {
        const ADDRESSES: [&str; 4] = ["198.18.0.100", "2001:2::100", "198.18.0.101", "198.18.0.1"];
        let mut text = CONF[..CONF.find("services:").unwrap()].to_string() + "services:\n";
        let mut edges = Vec::new();
        for (i, (udp, addresses, ports)) in rules.iter().enumerate() {
            let addresses: Vec<String> =
                addresses.iter().map(|&a| format!("\"{}\"", ADDRESSES[a])).collect();
            let ports: Vec<String> = ports
                .iter()
                .map(|&(first, width)| {
                    let last = first.saturating_add(width);
                    edges.extend([first, last, first.saturating_sub(1), last.saturating_add(1)]);
                    format!("\"{first}-{last}\"")
                })
                .collect();
            text += &format!(
                "  - name: r{i}\n    addresses: [{}]\n    protocol: {}\n    ports: [{}]\n    \
                 delivery: local\n",
                addresses.join(", "),
                if *udp { "udp" } else { "tcp" },
                ports.join(", "),
            );
        }
        let config = Config::parse(&text, "t.yaml").unwrap();
        let s = Services::compile(&config, b"secret", None);
        let probes = probes
            .iter()
            .copied()
            .chain(edges.iter().flat_map(|&p| {
                (0..4).flat_map(move |a| [(a, false, p), (a, true, p)])
            }));
        for (a, udp, port) in probes {
            let dst = v4(ADDRESSES[a]);
            let (v6, n) = match dst {
                IpAddr::V4(x) => (false, u128::from(u32::from(x))),
                IpAddr::V6(x) => (true, u128::from(x)),
            };
            let proto = if udp { 17 } else { 6 };
            proptest::prop_assert_eq!(
                s.lookup_raw(v6, n, proto, port),
                s.lookup(dst, proto, port),
                "{} {} {}", dst, proto, port
            );
        }
    }
}

#[test]
fn single_rules_go_to_the_first_serving_node_by_priority() {
    let s = Services::compile(&config(CONF), b"secret", None);
    let dns = &s.rules()[1];
    let n = |i| NodeId::new(i).unwrap();
    assert_eq!(dns.single_owner(0b11), Some(n(2)));
    assert_eq!(dns.single_owner(0b01), Some(n(1)));
    assert_eq!(dns.single_owner(0b100), None, "node 3 is not in the list");
    let mut web = s.rules()[0].clone();
    web.priority.clear();
    assert_eq!(web.single_owner(0b110), Some(n(2)), "no list: lowest id");
}

#[test]
fn backends_keep_their_ids_across_reloads() {
    let c = config(CONF);
    let s = Services::compile(&c, b"secret", None);
    let ids: Vec<u16> = s.backends().map(|(_, b)| b.id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    // Drop the first backend of `web`, add one: the others keep their ids, the new one takes
    // a free id, and a learned MAC and a state carry over.
    let learned = s.with_backend(b"secret", 4, |b| {
        b.mac = Some(EthernetAddress([2, 0xbb, 0, 0, 0, 9]));
        b.state = BackendState::Down;
    });
    let text = CONF
        .replace("      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }\n", "")
        .replace(
            "      - { ip: 198.18.1.21 }\n",
            "      - { ip: 198.18.1.21 }\n      - { ip: 198.18.1.22, mac: 02:bb:00:00:00:07 }\n",
        );
    let r = Services::compile(&config(&text), b"secret", Some(&learned));
    let got: Vec<(IpAddr, u16)> = r.backends().map(|(_, b)| (b.ip, b.id)).collect();
    assert_eq!(
        got,
        [
            (v4("198.18.0.22"), 2),
            (v4("2001:2::22"), 3),
            (v4("198.18.1.21"), 4),
            (v4("198.18.1.22"), 1)
        ]
    );
    let dns = r.backend(1, 4).unwrap();
    assert_eq!(dns.mac, Some(EthernetAddress([2, 0xbb, 0, 0, 0, 9])));
    assert_eq!(dns.state, BackendState::Down);
    assert!(r.backend(0, 4).is_none(), "id 4 is not web's");
    assert!(r.backend(0, 1).is_none(), "id 1 is dns's now");
}

#[test]
fn a_backend_out_of_service_gets_no_new_flows() {
    let s = Services::compile(&config(CONF), b"secret", None);
    let chosen = |s: &Services| {
        let mut n = [0u32; 5];
        for x in 0..20_000u64 {
            let h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            n[usize::from(s.choose(0, h).unwrap().id)] += 1;
        }
        n
    };
    let all = chosen(&s);
    assert!(all[1] > 0 && all[2] > 0 && all[3] > 0);
    let drained = s.with_backend(b"secret", 2, |b| b.state = BackendState::Drained);
    let n = chosen(&drained);
    assert_eq!(n[2], 0);
    assert!(n[1] > 0 && n[3] > 0);
    // Same table on every node: the secret decides, not the order of construction.
    let again = Services::compile(&config(CONF), b"secret", None);
    assert_eq!(chosen(&again), all);
}

#[test]
fn the_agreed_table_sets_every_state_and_the_epoch() {
    let s = Services::compile(&config(CONF), b"secret", None);
    let table = health::BackendTable {
        epoch: 7,
        down: [1].into_iter().collect(),
        drained: [2].into_iter().collect(),
    };
    let t = s.with_table(b"secret", &table);
    let states: Vec<BackendState> = t.backends().map(|(_, b)| b.state).collect();
    assert_eq!(
        states,
        [
            BackendState::Down,
            BackendState::Drained,
            BackendState::Up,
            BackendState::Up
        ]
    );
    assert_eq!(t.epoch, 7);
    for x in 0..2000u64 {
        let id = t
            .choose(0, x.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .unwrap()
            .id;
        assert_eq!(id, 3, "only the backend that is up takes new flows of web");
    }
    // Back up: the next table restores it.
    let up = t.with_table(
        b"secret",
        &health::BackendTable {
            epoch: 8,
            ..Default::default()
        },
    );
    assert!(up.backends().all(|(_, b)| b.state == BackendState::Up));
}

#[test]
fn the_backend_checks_follow_a_reload() {
    use super::health::{targets, Checks};
    use std::collections::BTreeSet;
    let checked = CONF
        .replace(
            "    delivery: dsr\n",
            "    delivery: dsr\n    backend_health: { port: 80 }\n",
        )
        .replace(
            "    delivery: gue\n",
            "    delivery: gue\n    backend_health: { port: 53 }\n",
        );
    let (c, s) = {
        let c = config(&checked);
        let s = Services::compile(&c, b"secret", None);
        (c, s)
    };
    let mut checks = Checks::new(targets(&c, &s));
    let verdicts = super::health::LocalVerdicts::new(checks.targets());
    let ids: BTreeSet<u16> = checks.targets().map(|t| t.id).collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(verdicts.down(), ids, "down until they answer");
    // Every backend answers twice (rise 2): all up.
    for _ in 0..2 {
        for i in 0..4 {
            if checks.record(i, true) == Some(true) {
                verdicts.record(checks.targets().nth(i).unwrap(), true);
            }
        }
    }
    assert!((1..=4).all(|id| checks.is_up(id) == Some(true)));
    assert!(verdicts.down().is_empty());
    let old_first = checks.targets().find(|t| t.id == 1).unwrap().clone();

    // The reload of `backends_keep_their_ids_across_reloads`: web's first backend goes, dns
    // gets a new one, which takes the freed id 1.
    let text = checked
        .replace("      - { ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }\n", "")
        .replace(
            "      - { ip: 198.18.1.21 }\n",
            "      - { ip: 198.18.1.21 }\n      - { ip: 198.18.1.22, mac: 02:bb:00:00:00:07 }\n",
        );
    let c2 = config(&text);
    let s2 = Services::compile(&c2, b"secret", Some(&s));
    // The node's verdicts follow the reload at once, before the checker's next round: the new
    // server on id 1 is down; a result of the round under way about the server that left
    // changes nothing.
    verdicts.retarget(&c2, &s2);
    assert_eq!(verdicts.down(), BTreeSet::from([1]));
    verdicts.record(&old_first, true);
    assert_eq!(verdicts.down(), BTreeSet::from([1]), "a stale result");
    let changes = checks.retarget(targets(&c2, &s2));
    assert_eq!(
        changes.start_down,
        BTreeSet::from([1]),
        "id 1 names another server now: down until it answers"
    );
    assert!(changes.forgotten.is_empty(), "every id is still checked");
    let new = checks.targets().find(|t| t.id == 1).unwrap();
    assert_eq!(new.check.address, "198.18.1.22:53".parse().unwrap());
    assert_eq!(checks.is_up(1), Some(false));
    for id in [2, 3, 4] {
        assert_eq!(checks.is_up(id), Some(true), "{id} kept its verdict");
    }
    let i = checks.targets().position(|t| t.id == 1).unwrap();
    assert_eq!(checks.record(i, true), None);
    assert_eq!(
        checks.record(i, true),
        Some(true),
        "the new backend rises like any"
    );

    // The reload's services: id 1 is a new server, up as compiled. The agreed table in force
    // had the server that left down (198.18.0.21, the file's first backend): renumbered for the
    // new file, as the node applies it on reload, that place names nobody now; the new server
    // on the freed id is down (its service checks its backends: it has not answered yet), and
    // the others stay as they were.
    assert_eq!(s2.backend(1, 1).map(|b| b.state), Some(BackendState::Up));
    let table = super::health::BackendTable {
        epoch: 3,
        down: BTreeSet::from([1]),
        drained: BTreeSet::new(),
    };
    let checked = |ri: usize| c2.services[ri].backend_health.is_some();
    let renumbered = s.renumbered(&table, &s2, checked);
    let new_place = s2.by_id(1).unwrap().1.agreed;
    assert_eq!(renumbered.down, BTreeSet::from([new_place]));
    assert_eq!(renumbered.epoch, 3);
    let applied = s2.with_table(b"secret", &renumbered);
    assert!(applied.backends().all(|(_, b)| b.state
        == if b.id == 1 {
            BackendState::Down
        } else {
            BackendState::Up
        }));

    // New check settings (port, interval, rise, path) keep every verdict...
    let tuned = text.replace(
        "    backend_health: { port: 80 }\n",
        "    backend_health: { port: 8080, interval: 2s, rise: 5, http_path: /up }\n",
    );
    let c_tuned = config(&tuned);
    let s_tuned = Services::compile(&c_tuned, b"secret", Some(&s2));
    let changes = checks.retarget(targets(&c_tuned, &s_tuned));
    assert_eq!(
        changes,
        super::health::Retargeted::default(),
        "no verdict starts over"
    );
    assert!((1..=4).all(|id| checks.is_up(id) == Some(true)));
    // ... under the new settings: web's backend 2 now needs 5 answers to come back up.
    let i = checks.targets().position(|t| t.id == 2).unwrap();
    assert_eq!(checks.targets().nth(i).unwrap().check.rise, 5);
    assert_eq!(checks.record(i, false), None);
    assert_eq!(checks.record(i, false), Some(false), "fall 2");
    for _ in 0..4 {
        assert_eq!(checks.record(i, true), None);
    }
    assert_eq!(checks.record(i, true), Some(true), "rise 5");
    // A backend at another address is another server: its verdict starts over.
    let moved = tuned.replace("198.18.0.22", "198.18.0.29");
    let c_moved = config(&moved);
    let s_moved = Services::compile(&c_moved, b"secret", Some(&s_tuned));
    let changes = checks.retarget(targets(&c_moved, &s_moved));
    let new_id = s_moved
        .backends()
        .find(|(_, b)| b.ip == v4("198.18.0.29"))
        .map(|(_, b)| b.id)
        .unwrap();
    assert_eq!(changes.start_down, BTreeSet::from([new_id]));
    assert_eq!(checks.is_up(new_id), Some(false));

    // dns loses its checks: its backends are forgotten (never down again), web's stay.
    let unchecked = moved.replace("    backend_health: { port: 53 }\n", "");
    let c3 = config(&unchecked);
    let s3 = Services::compile(&c3, b"secret", Some(&s_moved));
    let changes = checks.retarget(targets(&c3, &s3));
    assert_eq!(changes.forgotten, BTreeSet::from([1, 4]));
    assert!(changes.start_down.is_empty());
    assert!(s3
        .rules()
        .iter()
        .flat_map(|r| r.backends.iter())
        .filter(|b| b.id != 1 && b.id != 4)
        .all(|b| checks.is_up(b.id).is_some()));
    assert_eq!(checks.is_up(1), None);
}
