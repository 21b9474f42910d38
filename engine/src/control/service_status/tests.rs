use super::*;
use crate::appliance::BackendState;
use crate::config::tests::LAB;
use crate::config::Config;
use crate::control::operator::{Reply, Request, Status};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A DSR rule (one backend with a static MAC, one to resolve, one drained later), a GUE rule
/// on the same address, a `single` rule and a disabled one.
const SERVICES: &str = r#"
services:
  - name: web
    addresses: [198.18.0.100, "2001:2::100"]
    ports: [80, "8000-8099"]
    delivery: dsr
    backends:
      - { name: web-1, ip: 198.18.0.21, mac: 02:bb:00:00:00:01 }
      - { name: web-2, ip: 198.18.0.22 }
      - { name: web-3, ip: 198.18.0.23, mac: 02:bb:00:00:00:03, weight: 50 }
  - name: api
    addresses: [198.18.0.100]
    ports: [443]
    delivery: gue
    affinity: single
    backends:
      - { name: far, ip: 198.18.1.21, mac: 02:bb:00:00:01:01 }
  - name: dns
    addresses: [198.18.0.100]
    protocol: udp
    ports: [53]
    mode: single
    priority: [2, 1]
    delivery: dsr
    backends:
      - { name: ns, ip: 198.18.0.31, mac: 02:bb:00:00:00:31 }
  - name: ssh
    addresses: [198.18.0.100]
    ports: [22]
    mode: disabled
"#;

fn services() -> Services {
    let text = LAB.replace(
        "  mac: 02:00:00:00:00:01\n",
        "  mac: 02:00:00:00:00:01\n  ip: 198.18.0.11\n",
    ) + SERVICES;
    let c = Config::parse(&text, "t.yaml").unwrap();
    c.validate("t.yaml").unwrap();
    Services::compile(&c, SECRET, None)
}

#[test]
fn status_lists_every_rule_and_backend_with_state_and_share() {
    let s = services();
    // web-3 drained: its share goes to the others.
    let id = s.rules()[0].backends[2].id;
    let s = s.with_backend(SECRET, id, |b| b.state = BackendState::Drained);
    let status = services_status(&s);
    assert_eq!(status.len(), 4);
    let web = &status[0];
    assert_eq!(web.protocol, "tcp");
    assert_eq!(web.delivery, Delivery::Dsr);
    assert_eq!(web.backends.len(), 3);
    assert_eq!(web.backends[1].mac, None);
    assert_eq!(web.backends[2].state, "drained");
    assert_eq!(web.backends[2].table_entries, 0);
    let up: u32 = web.backends.iter().map(|b| b.table_entries).sum();
    assert_eq!(up, web.table_size, "the up backends share the whole table");
    let text = services_table(&status);
    for want in [
        "service web: 198.18.0.100,2001:2::100 tcp port 80,8000-8099 | multiple, delivery dsr, \
         affinity none",
        "service api: 198.18.0.100 tcp port 443 | multiple, delivery gue, affinity single",
        "service dns: 198.18.0.100 udp port 53 | single (priority 2,1), delivery dsr",
        "service ssh: 198.18.0.100 tcp port 22 | disabled, delivery local",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
    let line = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("web-1")[1..5],
        ["198.18.0.21", "02:bb:00:00:00:01", "100", "up"]
    );
    assert_eq!(line("web-2")[2], "unresolved");
    assert_eq!(line("web-3")[3..], ["50", "drained", "0.0%"]);
    assert_eq!(line("far")[4..], ["up", "100.0%"]);
    let shares: f64 = ["web-1", "web-2"]
        .iter()
        .map(|n| line(n)[5].trim_end_matches('%').parse::<f64>().unwrap())
        .sum();
    assert!((shares - 100.0).abs() < 0.2, "{shares}\n{text}");
    assert!(!text.contains('{') && !text.contains("Some("), "{text}");
}

/// `status` of a running node: each backend's flows now, in the table and on the wire.
#[test]
fn status_shows_each_backends_current_flows() {
    let mut status = services_status(&services());
    add_flows(&mut status, |id| u64::from(id) * 1000);
    let text = services_table(&status);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("backend").last().map(String::as_str), Some("flows"));
    for b in status.iter().flat_map(|s| &s.backends) {
        let want = (u64::from(b.id) * 1000).to_string();
        assert_eq!(line(&b.name).last(), Some(&want), "{text}");
    }
    let reply = Reply::Status(Box::new(node_status(1, status, 0)));
    let line = reply.to_line();
    assert!(line.contains("\"flows\":1000"), "{line}");
    assert_eq!(Reply::decode(&Request::Status, &line), Ok(reply));
}

#[test]
fn status_with_services_reads_back_and_an_old_status_still_reads() {
    let status = node_status(4, services_status(&services()), 3);
    let line = Reply::Status(Box::new(status.clone())).to_line();
    assert!(line.contains("\"mac\":\"02:bb:00:00:00:01\""), "{line}");
    assert_eq!(
        Reply::decode(&Request::Status, &line),
        Ok(Reply::Status(Box::new(status)))
    );
    // A node without services (or of an older version) sends neither key.
    let old = r#"{"ok":true,"node":1,"epoch":1,"phase":"Done","moving":0,"draining":false,
        "drained":false,"refusing":false,"healthy":null,"members":[],"outside":[]}"#;
    let Ok(Reply::Status(s)) = Reply::decode(&Request::Status, old) else {
        panic!("an old status does not read");
    };
    assert!(s.services.is_empty() && s.services_epoch == 0);
}

fn ask(services: &Services, dst: &str, proto: u8, serving: u64) -> Option<OwnerService> {
    owner_of_service(
        services,
        &BucketHasher::new(SECRET),
        Affinity::None,
        || serving,
        "198.18.2.7:40000".parse().unwrap(),
        dst.parse().unwrap(),
        proto,
    )
}

#[test]
fn owner_of_says_what_becomes_of_a_flow_to_a_service() {
    let s = services();
    assert_eq!(ask(&s, "198.18.0.1:80", 6, 1), None, "the cluster's own");
    let web = ask(&s, "198.18.0.100:8050", 6, 1).unwrap();
    assert_eq!(web.rule.as_deref(), Some("web"));
    let b = web.backend.as_ref().expect("a backend");
    assert!(b.name.starts_with("web-"), "{web:?}");
    let text = web.to_string();
    assert!(
        text.contains(&format!("backend (new flow)  {} {}", b.name, b.address)),
        "{text}"
    );
    let nowhere = ask(&s, "198.18.0.100:8080", 17, 1).unwrap();
    assert_eq!((nowhere.rule, nowhere.backend), (None, None));
    assert!(nowhere.outcome.contains("no rule"), "{}", nowhere.outcome);
    let ssh = ask(&s, "198.18.0.100:22", 6, 1).unwrap();
    assert!(ssh.outcome.contains("disabled") && ssh.backend.is_none());
    // A single rule: the first serving node of its priority list takes it.
    let dns = ask(&s, "198.18.0.100:53", 17, 0b11).unwrap();
    assert_eq!(dns.rule_owner, Some(2));
    assert!(
        dns.to_string().contains("rule taken by       node 2"),
        "{dns}"
    );
    assert_eq!(
        ask(&s, "198.18.0.100:53", 17, 0b01).unwrap().rule_owner,
        Some(1)
    );
    let none = ask(&s, "198.18.0.100:53", 17, 0).unwrap();
    assert!(none.backend.is_none() && none.outcome.contains("no node"));
    // No MAC yet for the chosen backend: its frames wait.
    let mut s = s;
    for id in s.rules()[0]
        .backends
        .iter()
        .map(|b| b.id)
        .collect::<Vec<_>>()
    {
        s = s.with_backend(SECRET, id, |b| b.mac = None);
    }
    let waiting = ask(&s, "198.18.0.100:80", 6, 1).unwrap();
    assert!(waiting.outcome.contains("resolved"), "{}", waiting.outcome);
    // Every backend down: nothing takes the flow.
    for id in s.rules()[0]
        .backends
        .iter()
        .map(|b| b.id)
        .collect::<Vec<_>>()
    {
        s = s.with_backend(SECRET, id, |b| b.state = BackendState::Down);
    }
    let down = ask(&s, "198.18.0.100:80", 6, 1).unwrap();
    assert!(down.backend.is_none() && down.outcome.contains("no backend"));
}

/// Node 1's status at `epoch`, settled, with `services` at `services_epoch`.
fn node_status(epoch: u64, services: Vec<ServiceStatus>, services_epoch: u64) -> Status {
    Status {
        node: 1,
        epoch,
        phase: crate::control::Phase::Done,
        moving: 0,
        draining: false,
        drained: false,
        refusing: false,
        fenced: false,
        fence_reasons: vec![],
        drain_cut: false,
        owed_buckets: 0,
        protocol_version: 2,
        healthy: None,
        members: vec![],
        outside: vec![],
        timeline: vec![],
        services,
        services_epoch,
        services_differ: vec![],
    }
}

/// `status` names who takes a `single` rule, or that nobody does: its priority list names no
/// node that owns buckets (a typo, or nodes that left), and every node drops its frames.
#[test]
fn a_single_rule_names_its_taker_or_nobody() {
    let s = services();
    let bits = |ids: &[u8]| ids.iter().fold(0u64, |b, id| b | 1 << (id - 1));
    let header = |serving: u64| {
        let mut status = services_status(&s);
        add_takers(&mut status, &s, serving);
        let text = services_table(&status);
        let line = text
            .lines()
            .find(|l| l.starts_with("service dns:"))
            .unwrap_or_else(|| panic!("no dns line:\n{text}"))
            .to_owned();
        // Only the single rule says who takes it.
        assert!(
            !text
                .lines()
                .filter(|l| l.starts_with("service ") && !l.starts_with("service dns:"))
                .any(|l| l.contains("taken by")),
            "{text}"
        );
        (line, status)
    };
    // Node 2 first, then 1.
    let (line, _) = header(bits(&[1, 2]));
    assert!(
        line.contains("single (priority 2,1), taken by node 2,"),
        "{line}"
    );
    let (line, _) = header(bits(&[1, 3]));
    assert!(line.contains("taken by node 1,"), "{line}");
    assert!(unserved_single_rules(&s, bits(&[1, 3])).is_empty());
    // Neither serves: nobody takes it, and that is what the warning names.
    let (line, status) = header(bits(&[3, 4]));
    assert!(line.contains("taken by NOBODY"), "{line}");
    let unserved: Vec<&str> = unserved_single_rules(&s, bits(&[3, 4]))
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(unserved, ["dns"]);
    // No node serves at all (alone, not yet serving): no rule is singled out.
    assert!(unserved_single_rules(&s, 0).is_empty());
    // The reply reads back, and one without the new fields (an older node's) still reads.
    let reply = Reply::Status(Box::new(node_status(1, status, 0)));
    let json = reply.to_line();
    assert!(json.contains("\"taken_by\":\"nobody\""), "{json}");
    assert_eq!(Reply::decode(&Request::Status, &json), Ok(reply));
    let older = json
        .replace(",\"priority\":[2,1]", "")
        .replace(",\"taken_by\":\"nobody\"", "");
    assert!(
        !older.contains("priority") && !older.contains("taken_by"),
        "{older}"
    );
    let Ok(Reply::Status(read)) = Reply::decode(&Request::Status, &older) else {
        panic!("an older status does not read: {older}");
    };
    let dns = read.services.iter().find(|s| s.name == "dns").unwrap();
    assert_eq!((dns.priority.len(), dns.taken_by), (0, None));
    // `check` (no cluster): the priority list, no taker.
    let text = services_table(&services_status(&s));
    assert!(
        text.contains("single (priority 2,1), delivery dsr"),
        "{text}"
    );
}
