//! What the lab leaves in `--out`: one CSV per configuration, `results.json`, `report.md`, and
//! SVG plots (plotters) of server throughput and mean response time against the number of
//! clients, one line per configuration, like the paper's figures 4-8.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::checks::Preconditions;
use super::load::Step;
use super::probe::Verdict;
use super::topology::{CLIENT_IP6, CLUSTER_IP, CLUSTER_IP6, CLUSTER_MAC};

/// One configuration's ramp.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub name: String,
    /// `engine` or `kernel` (the nftables clone cluster).
    pub kind: String,
    pub nodes: u8,
    pub policy: String,
    pub steps: Vec<Step>,
    /// Share of the frames (engine) or TCP segments (kernel) delivered to each node's kernel.
    pub node_shares: Vec<(u8, f64)>,
    pub preconditions: Preconditions,
    /// Time from starting the engines to a formed cluster.
    pub formed_in_ms: u128,
}

/// One scenario run: an event (kill -9, join, drain) in the middle of steady load.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub nodes: u8,
    pub policy: String,
    /// The node killed, drained or joined.
    pub node: u8,
    pub clients: u32,
    pub duration_s: u32,
    /// When the event happened, after the load started.
    pub event_after_ms: u64,
    /// From the event until the other nodes saw it (dead, draining, joined).
    pub detected_ms: Option<u64>,
    /// From the event until every node sent new flows to their final owners.
    pub moved_ms: Option<u64>,
    /// From the event until the plan was done (the old owner's connections ended, or the
    /// release deadline passed); None if not within the scenario.
    pub done_ms: Option<u64>,
    pub wrk: Step,
    pub probe: Verdict,
    /// Whether the switch held the cluster MAC at the end (it must not).
    pub cluster_mac_learned: bool,
    /// The client's neighbour entry for the cluster's IPv6 address at the end (`ip -6 neigh`;
    /// the scenarios run dual-stack), and whether it is the cluster MAC (it must be).
    pub ipv6_neighbour: String,
    pub ipv6_neighbour_is_cluster_mac: bool,
    /// Live peers declared dead before the event (must be 0: the scenario is then void).
    pub peer_deaths_before_event: usize,
    /// For a wire cut: whether the cut node said in its status that it was fenced.
    pub cut_node_fenced: Option<bool>,
    /// What the scenario promises, and whether it held.
    pub expectation: String,
    pub passed: bool,
}

/// A duration for a person: "244 ms", or "-" when there is none.
pub fn ms(v: Option<u64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v} ms"))
}

/// Node ids for a person: "1, 3", or "none".
pub fn node_list(ids: &[u8]) -> String {
    if ids.is_empty() {
        return "none".to_owned();
    }
    ids.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")
}

/// Counts per node for a person: "node 2: 2, node 3: 1", or "none".
pub fn per_node(counts: &[(u8, usize)]) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(n, c)| format!("node {n}: {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes every file of the report into `out`.
pub fn write_all(
    out: &Path,
    clients: &[u32],
    duration_s: u32,
    configs: &[ConfigResult],
    scenarios: &[ScenarioResult],
) -> Result<(), String> {
    for c in configs {
        write(out, &format!("{}.csv", slug(&c.name)), steps_csv(&c.steps))?;
    }
    write(
        out,
        "throughput.svg",
        plot("Server throughput", "requests/s", configs, |s| s.rps)?,
    )?;
    write(
        out,
        "response_time.svg",
        plot("Average response time", "ms", configs, |s| s.mean_ms)?,
    )?;
    write(
        out,
        "report.md",
        markdown(clients, duration_s, configs, scenarios),
    )?;
    #[derive(Serialize)]
    struct All<'a> {
        configs: &'a [ConfigResult],
        scenarios: &'a [ScenarioResult],
    }
    write(
        out,
        "results.json",
        serde_json::to_string_pretty(&All { configs, scenarios }).map_err(|e| e.to_string())?,
    )
}

fn write(out: &Path, name: &str, text: String) -> Result<(), String> {
    let path = out.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn slug(name: &str) -> String {
    name.replace(' ', "-")
}

/// One configuration's ramp as CSV.
pub fn steps_csv(steps: &[Step]) -> String {
    let mut csv = String::from("step,clients,rps,transfer_mib_s,mean_ms,p99_ms,errors,timeouts\n");
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{},{},{:.1},{:.3},{:.3},{:.3},{},{}",
            i + 1,
            s.clients,
            s.rps,
            s.transfer_mib_s,
            s.mean_ms,
            s.p99_ms,
            s.errors,
            s.timeouts
        );
    }
    csv
}

fn markdown(
    clients: &[u32],
    duration_s: u32,
    configs: &[ConfigResult],
    scenarios: &[ScenarioResult],
) -> String {
    let mut md = String::from("# clonecluster lab report\n\n");
    let _ = writeln!(
        md,
        "Run {} on {} CPU(s), Linux {}, clonecluster {}.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        env!("CARGO_PKG_VERSION"),
    );
    let _ = writeln!(
        md,
        "Clients per step: {}, {duration_s} s per step; `wrk` (keep-alive) from the client \
         namespace against http://198.18.0.1/ (nginx per node; a learning Linux bridge as the \
         switch). Engine nodes: the engine on an `net_af_packet` wire port with a `net_tap` host \
         port into the node's kernel. Kernel nodes: the paper's method on today's kernel (nftables \
         `jhash` ingress filter and egress MAC rewrite), no engine.\n",
        clients
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !configs.is_empty() {
        md.push_str("![throughput](throughput.svg)\n\n![response time](response_time.svg)\n\n");
        md.push_str("## Throughput (requests/s)\n\n| configuration |");
        for c in clients {
            let _ = write!(md, " {c} clients |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(clients.len()));
        md.push('\n');
        for r in configs {
            let _ = write!(md, "| {} |", r.name);
            for c in clients {
                match r.steps.iter().find(|s| s.clients == *c) {
                    Some(s) => {
                        let _ = write!(md, " {:.0} |", s.rps);
                    }
                    None => md.push_str(" - |"),
                }
            }
            md.push('\n');
        }
        md.push('\n');
        // The engine beside the kernel-only clone cluster with as many nodes.
        let mut pairs = Vec::new();
        for k in configs.iter().filter(|c| c.kind == "kernel") {
            for e in configs
                .iter()
                .filter(|c| c.kind == "engine" && c.nodes == k.nodes)
            {
                pairs.push((e, k));
            }
        }
        ratio_table(
            &mut md,
            "Engine / kernel clone cluster (throughput ratio, same clients)",
            "kernel",
            &pairs,
            clients,
        );
        // The engine beside testpmd io on the same ports: what the engine costs over the ports.
        let mut pairs = Vec::new();
        for t in configs.iter().filter(|c| c.kind == "testpmd") {
            for e in configs.iter().filter(|c| c.kind == "engine") {
                pairs.push((e, t));
            }
        }
        ratio_table(
            &mut md,
            "Engine / testpmd io ceiling (throughput ratio, same clients; testpmd io forwards \
             between the same af_packet and tap ports of one node, busy polling a core)",
            "ceiling",
            &pairs,
            clients,
        );
    }
    for r in configs {
        let _ = writeln!(md, "## {}\n", r.name);
        let failures = r.preconditions.failures();
        let _ = writeln!(
            md,
            "{}Shares of delivered traffic: {}. ARP replies seen by the client: {} (from node {}). \
             Preconditions: {}.\n",
            match r.kind.as_str() {
                "engine" => format!("Formed in {} ms. ", r.formed_in_ms),
                "testpmd" => "testpmd io passes every frame as it is (the node's kernel answers \
                              ARP from the cluster MAC, and the switch learns it): a ceiling for \
                              the ports, not judged as a clone cluster. "
                    .to_owned(),
                _ => String::new(),
            },
            r.node_shares
                .iter()
                .map(|(id, s)| format!("node {id} {:.1}%", s * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            r.preconditions.arp_replies,
            node_list(&r.preconditions.arp_answered_by),
            if failures.is_empty() {
                "all hold".to_owned()
            } else {
                format!("**FAILED**: {}", failures.join("; "))
            }
        );
        md.push_str("| clients | req/s | MiB/s | mean ms | p99 ms | errors | timeouts |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &r.steps {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
                s.clients, s.rps, s.transfer_mib_s, s.mean_ms, s.p99_ms, s.errors, s.timeouts
            );
        }
        md.push('\n');
    }
    if !scenarios.is_empty() {
        md.push_str(
            "## Scenarios\n\nSteady `wrk` load plus the connection probe (keep-alive connections \
             and fresh connections asking `GET /id`, which names the node that answered); the \
             event happens a third of the way in. *Detected*: until the other nodes saw it; \
             *moved*: until every new flow went to its final owner; *done*: until the plan finished (the \
             old owner's keep-alive connections keep it open until they end or for \
             `release_deadline`, 10 s in the lab, often after the scenario; those still open then \
             stay with the old owner). *Lost*: probe keep-alive \
             connections that failed after the event, by the node that served them.\n\n",
        );
        md.push_str(&dual_stack_paragraph());
        md.push_str(
            "| scenario | node | detected ms | moved ms | done ms | wrk req/s | wrk errors | probe requests | \
             probe failed | lost | new conn. failed after moved | slow connects | \
             IPv6 new conn. (failed) | IPv6 keep-alive req. (lost conn.) | expectation | result |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|\n",
        );
        for s in scenarios {
            md.push_str(&scenario_row(s));
            md.push('\n');
        }
        md.push('\n');
        md.push_str(&neighbour_line(scenarios));
        for s in scenarios {
            if let Some(f) = s.cut_node_fenced {
                let _ = writeln!(
                    md,
                    "{}: node {} {} in its status that it was fenced.\n",
                    s.scenario,
                    s.node,
                    if f { "said" } else { "did **not** say" }
                );
            }
        }
        let takeovers: Vec<String> = scenarios
            .iter()
            .filter(|s| s.scenario == "failover" || s.scenario == "wire-cut")
            .map(|s| format!("{} {}", s.scenario, ms(s.moved_ms)))
            .collect();
        if !takeovers.is_empty() {
            let _ = writeln!(md, "Takeover (moved): {}.\n", takeovers.join(", "));
        }
    }
    md
}

/// What the report says of the scenarios' second family.
fn dual_stack_paragraph() -> String {
    format!(
        "The scenarios run dual-stack: every node holds the cluster's IPv6 address {CLUSTER_IP6} \
         beside {CLUSTER_IP} (`cluster.ip6`; its health check asks the service on both), the \
         client has {CLIENT_IP6}, and the engines answer the client's neighbour solicitations \
         with the cluster MAC as they answer ARP (NDP through the engines). `wrk` stays on IPv4; \
         every other probe keep-alive slot and every other fresh probe connection goes to \
         [{CLUSTER_IP6}]:80. The probe columns count both families, the IPv6 columns the IPv6 \
         requests alone; the promises hold for both.\n\n"
    )
}

/// One scenario's row of the scenarios table (without its newline).
pub fn scenario_row(s: &ScenarioResult) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let v6 = &s.probe.ipv6;
    format!(
        "| {} ({} nodes {}) | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} / {} | {} | {} ({}) | {} ({}) | {} | {} |",
        s.scenario,
        s.nodes,
        s.policy,
        s.node,
        opt(s.detected_ms),
        opt(s.moved_ms),
        opt(s.done_ms),
        s.wrk.rps,
        s.wrk.errors,
        s.probe.requests,
        s.probe.failed,
        per_node(&s.probe.lost_by_node),
        s.probe.new_failed_after_settled,
        s.probe.new_after_settled,
        s.probe.slow_connects,
        v6.new,
        v6.new_failed,
        v6.keepalive(),
        v6.lost,
        s.expectation,
        if s.passed { "held" } else { "**FAILED**" }
    )
}

/// The NDP precondition of the scenarios in one line: whether the client's neighbour entry for
/// the cluster's IPv6 address was the cluster MAC after each.
pub fn neighbour_line(scenarios: &[ScenarioResult]) -> String {
    let (good, bad): (Vec<_>, Vec<_>) = scenarios
        .iter()
        .partition(|s| s.ipv6_neighbour_is_cluster_mac);
    let mut line = String::from("NDP: ");
    if !good.is_empty() {
        let names: Vec<&str> = good.iter().map(|s| s.scenario.as_str()).collect();
        let _ = write!(
            line,
            "the client's neighbour entry for {CLUSTER_IP6} was the cluster MAC {CLUSTER_MAC} \
             after {}",
            names.join(", ")
        );
    }
    for (i, s) in bad.iter().enumerate() {
        let _ = write!(
            line,
            "{}after {} it was **not** the cluster MAC: `{}`",
            if i == 0 && good.is_empty() { "" } else { "; " },
            s.scenario,
            if s.ipv6_neighbour.is_empty() {
                "no entry"
            } else {
                s.ipv6_neighbour.as_str()
            }
        );
    }
    line.push_str(".\n\n");
    line
}

/// A table of `engine / base` throughput ratios per client count (nothing if no pairs).
fn ratio_table(
    md: &mut String,
    title: &str,
    base: &str,
    pairs: &[(&ConfigResult, &ConfigResult)],
    clients: &[u32],
) {
    if pairs.is_empty() {
        return;
    }
    let _ = write!(md, "## {title}\n\n| engine | {base} |");
    for c in clients {
        let _ = write!(md, " {c} clients |");
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---:|".repeat(clients.len()));
    md.push('\n');
    for (e, k) in pairs {
        let _ = write!(md, "| {} | {} |", e.name, k.name);
        for c in clients {
            let rps = |r: &ConfigResult| r.steps.iter().find(|s| s.clients == *c).map(|s| s.rps);
            match (rps(e), rps(k)) {
                (Some(a), Some(b)) if b > 0.0 => {
                    let _ = write!(md, " {:.2} |", a / b);
                }
                _ => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');
}

/// A line chart: clients on x, `value` on y, one line per configuration.
fn plot(
    title: &str,
    unit: &str,
    results: &[ConfigResult],
    value: impl Fn(&Step) -> f64,
) -> Result<String, String> {
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            let points = r
                .steps
                .iter()
                .map(|s| (f64::from(s.clients), value(s)))
                .collect();
            (r.name.clone(), points)
        })
        .collect();
    line_plot(title, "clients", unit, &series)
}

/// An SVG line chart: one line (with its points marked) per named series of (x, y).
pub fn line_plot(
    title: &str,
    x_desc: &str,
    unit: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| format!("plot {title}: {e}");
        root.fill(&WHITE).map_err(e)?;
        let all = || series.iter().flat_map(|(_, p)| p.iter());
        let xmax = all().map(|p| p.0).fold(0.0, f64::max).max(1.0);
        let ymax = all().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax * 1.05, 0f64..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(unit)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if ymax >= 100.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()
            .map_err(e)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(e)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, rps: &[(u32, f64)]) -> ConfigResult {
        ConfigResult {
            name: name.into(),
            kind: "engine".into(),
            nodes: 2,
            policy: "hash".into(),
            steps: rps
                .iter()
                .map(|&(clients, rps)| Step {
                    clients,
                    rps,
                    ..Step::default()
                })
                .collect(),
            node_shares: vec![(1, 0.5), (2, 0.5)],
            preconditions: Preconditions {
                arp_replies: 1,
                arp_answered_by: vec![1],
                ..Preconditions::default()
            },
            formed_in_ms: 10,
        }
    }

    #[test]
    fn the_report_has_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let configs = [
            config("1 node", &[(10, 100.0), (50, 300.0)]),
            config("2 nodes hash", &[(10, 150.0), (50, 500.0)]),
        ];
        write_all(dir.path(), &[10, 50], 3, &configs, &[]).unwrap();
        for f in [
            "1-node.csv",
            "2-nodes-hash.csv",
            "report.md",
            "results.json",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        for f in ["throughput.svg", "response_time.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("2 nodes hash"),
                "{f}: {svg}"
            );
        }
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| 2 nodes hash | 150 | 500 |"), "{md}");
        let csv = std::fs::read_to_string(dir.path().join("1-node.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3);
    }

    fn scenario(name: &str, neighbour_ok: bool) -> ScenarioResult {
        ScenarioResult {
            scenario: name.into(),
            nodes: 2,
            policy: "hash".into(),
            node: 2,
            clients: 10,
            duration_s: 9,
            event_after_ms: 3000,
            detected_ms: Some(900),
            moved_ms: Some(1000),
            done_ms: None,
            wrk: Step {
                rps: 1234.4,
                ..Step::default()
            },
            probe: Verdict {
                requests: 900,
                failed: 5,
                lost_by_node: vec![(2, 4)],
                new_after_settled: 300,
                ipv6: crate::probe::FamilyCounts {
                    requests: 450,
                    failed: 3,
                    new: 200,
                    new_failed: 1,
                    new_after_settled: 150,
                    new_failed_after_settled: 0,
                    lost: 2,
                },
                ..Verdict::default()
            },
            cluster_mac_learned: false,
            ipv6_neighbour: if neighbour_ok {
                "2001:2::1 lladdr 02:cc:00:00:00:01 REACHABLE".into()
            } else {
                String::new()
            },
            ipv6_neighbour_is_cluster_mac: neighbour_ok,
            peer_deaths_before_event: 0,
            cut_node_fenced: None,
            expectation: "only the dead node's connections lost".into(),
            passed: neighbour_ok,
        }
    }

    #[test]
    fn the_scenarios_name_their_ipv6_requests() {
        let row = scenario_row(&scenario("failover", true));
        assert_eq!(
            row,
            "| failover (2 nodes hash) | 2 | 900 | 1000 | - | 1234 | 0 | 900 | 5 | node 2: 4 | \
             0 / 300 | 0 | 200 (1) | 250 (2) | only the dead node's connections lost | held |"
        );
        assert_eq!(
            neighbour_line(&[scenario("failover", true), scenario("join", true)]),
            "NDP: the client's neighbour entry for 2001:2::1 was the cluster MAC \
             02:cc:00:00:00:01 after failover, join.\n\n"
        );
        assert_eq!(
            neighbour_line(&[scenario("failover", true), scenario("drain", false)]),
            "NDP: the client's neighbour entry for 2001:2::1 was the cluster MAC \
             02:cc:00:00:00:01 after failover; after drain it was **not** the cluster MAC: \
             `no entry`.\n\n"
        );
        let md = markdown(&[10], 3, &[], &[scenario("failover", true)]);
        assert!(
            md.contains("The scenarios run dual-stack")
                && md.contains("NDP through the engines")
                && md.contains("| IPv6 new conn. (failed) | IPv6 keep-alive req. (lost conn.) |")
                && md.contains(&row),
            "{md}"
        );
        // The table's separator has a cell per column.
        let header = md.lines().find(|l| l.starts_with("| scenario |")).unwrap();
        let separator = md.lines().find(|l| l.starts_with("|---|---:|")).unwrap();
        assert_eq!(header.matches('|').count(), separator.matches('|').count());
        assert_eq!(row.matches('|').count(), header.matches('|').count());
    }
}
