//! The soak: a cluster under steady load for many minutes while the last node is killed and
//! restarted, cut off both networks and put back, has its wire cut (control network up) and
//! mended, is drained and undrained, over and over; every
//! node sampled on the way, and at the end the checks that say nothing leaked and nothing
//! drifted (`clonecluster-lab soak`).
//!
//! What it checks, and how:
//! - **mbufs**: each engine's `mbufs_in_use` once the load has stopped is back to the lowest it
//!   read in that engine's life (a frame that is never freed shows as a step that never comes
//!   back);
//! - **RSS**: each engine that ran the whole soak grew by at most [`RSS_BOUND_KIB`] between a
//!   quarter of the way in and the end (every table is allocated at start);
//! - **no duplicates**: the IPv4 packets the nodes' kernels received for the cluster address
//!   (an nftables counter on each node's host port, which survives engine restarts) add up to
//!   no more than the client sent to it (an nftables counter in the client);
//! - **only a crashed node's connections lost**: every probe failure is a connection the killed
//!   or cut node served, or a new connection that started while it was being detected;
//! - every event's move was seen in the nodes' timelines within [`SETTLE`], and no node
//!   declared a live peer dead.
//!
//! It owns the event schedule and the checks; the cluster, the load and the probe are the
//! lab's (`cluster`, `load`, `probe`), and the timings are `measure`'s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cluster::{Cluster, Kind};
use super::load::Wrk;
use super::measure::Observer;
use super::probe::{self, now_ms};
use super::report::{line_plot, node_list};
use super::scenario::Scenario;
use super::topology::CLUSTER_IP;
use super::Programs;

/// How long an event's move and the cluster's settling may take before the soak says so.
pub const SETTLE: Duration = Duration::from_secs(40);
/// The most an engine that ran the whole soak may grow, KiB, from a quarter of the way in.
pub const RSS_BOUND_KIB: u64 = 8 * 1024;
/// mbufs the pool may hold beyond an engine's lowest reading once the load has stopped (frames
/// in a TX queue, a heartbeat in flight).
pub const MBUF_SLACK: u64 = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The engine and the probe.
    pub programs: Programs,
    pub prefix: String,
    pub nodes: u8,
    pub minutes: f64,
    /// `wrk` connections for the whole soak.
    pub clients: u32,
    pub out: PathBuf,
    pub interrupted: fn() -> bool,
}

/// One node, once.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    pub node: u8,
    pub pid: Option<u32>,
    pub rss_kib: Option<u64>,
    pub mbufs: Option<u64>,
    pub flows: Option<u64>,
    pub refused: Option<u64>,
    pub epoch: Option<u64>,
    /// Frames dropped so far, by reason (reasons with none left out).
    pub drops: BTreeMap<String, u64>,
}

/// What the soak did to the last node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Kill,
    Restart,
    Cut,
    Restore,
    WireCut,
    WireBack,
    Drain,
    Undrain,
}

impl Action {
    const CYCLE: [Action; 8] = [
        Action::Kill,
        Action::Restart,
        Action::Cut,
        Action::Restore,
        Action::WireCut,
        Action::WireBack,
        Action::Drain,
        Action::Undrain,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill -9",
            Action::Restart => "restart",
            Action::Cut => "cut off both networks",
            Action::Restore => "networks back",
            Action::WireCut => "wire cut (control network up)",
            Action::WireBack => "wire back",
            Action::Drain => "drain",
            Action::Undrain => "undrain",
        }
    }

    /// The node stops serving at once (its connections may be lost).
    fn crashes(self) -> bool {
        matches!(self, Action::Kill | Action::Cut | Action::WireCut)
    }

    /// How the move is measured (`measure`): the node leaves, comes back, or drains.
    fn measured_as(self) -> Scenario {
        match self {
            Action::Kill | Action::Cut | Action::WireCut => Scenario::Failover,
            Action::Restart | Action::Restore | Action::WireBack | Action::Undrain => {
                Scenario::Join
            }
            Action::Drain => Scenario::Drain,
        }
    }
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub action: Action,
    pub node: u8,
    /// Wall-clock ms (the probe's axis).
    pub at_ms: u64,
    /// Seconds since the load started.
    pub t_s: f64,
    /// Until every node sent new flows to their final owners (the nodes' timelines).
    pub moved_ms: Option<u64>,
    /// The cluster settled (plan done, nothing moving) before the next event.
    pub settled: bool,
}

/// One check and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub held: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub minutes: f64,
    pub nodes: u8,
    pub clients: u32,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    /// IPv4 packets the client sent to the cluster address, and the nodes' kernels received.
    pub sent: u64,
    pub delivered: u64,
    pub probe_requests: usize,
    pub probe_failed: usize,
    pub checks: Vec<Check>,
    pub passed: bool,
}

/// Runs the soak and writes `soak.md`, `soak.json`, `soak.csv` and `soak.svg` into `out`.
pub fn run(o: &SoakOptions) -> Result<SoakResult, String> {
    std::fs::create_dir_all(&o.out)
        .map_err(|e| format!("{}: cannot create: {e}", o.out.display()))?;
    let ids: Vec<u8> = (1..=o.nodes).collect();
    let node = o.nodes;
    let others: Vec<u8> = ids.iter().copied().filter(|&i| i != node).collect();
    let mut c = Cluster::start(
        &o.programs,
        &o.prefix,
        Kind::Engine("hash".to_owned()),
        &ids,
        &ids,
        o.out.join("soak"),
    )?;
    c.wait_formed(&ids, Duration::from_secs(30), &o.interrupted)?;
    count_cluster_packets(&c)?;

    let total = Duration::from_secs_f64(o.minutes * 60.0);
    let sample_every = (total / 8).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let probe_file = c.dir().join("probe.jsonl");
    let probe_pid = c.start_probe(total, &probe_file)?;
    let wrk = Wrk::start(&c.topo.client, o.clients, total.as_secs() as u32, "/")?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = start;
    let mut sample = |c: &Cluster, samples: &mut Vec<Sample>, force: bool| {
        if force || Instant::now() >= next_sample {
            next_sample = Instant::now() + sample_every;
            let t_s = start.elapsed().as_secs_f64();
            samples.extend(ids.iter().map(|&id| sample_node(c, id, t_s)));
        }
    };
    sample(&c, &mut samples, true);

    // Events until 25 s before the end (the last one settles while the load still runs).
    let mut events = Vec::new();
    let stop_events = total.saturating_sub(Duration::from_secs(25));
    for action in Action::CYCLE.iter().cycle() {
        if start.elapsed() >= stop_events {
            break;
        }
        if (o.interrupted)() {
            return Err("interrupted".into());
        }
        let at_ms = now_ms();
        let t_s = start.elapsed().as_secs_f64();
        match action {
            Action::Kill => c.kill_engine(node)?,
            Action::Restart => c.restart_engine(node)?,
            Action::Cut => c.set_links(node, false)?,
            Action::Restore => c.set_links(node, true)?,
            Action::WireCut => c.set_wire(node, false)?,
            Action::WireBack => c.set_wire(node, true)?,
            Action::Drain => {
                c.drain(node, true)?;
            }
            Action::Undrain => {
                c.drain(node, false)?;
            }
        }
        let mut observer = Observer::new(action.measured_as(), node, &ids, at_ms);
        let (asked, settle_on): (&[u8], Vec<u8>) = match action {
            Action::Kill | Action::Cut | Action::WireCut | Action::Drain => (&ids, others.clone()),
            _ => (&ids, ids.clone()),
        };
        let begun = Instant::now();
        let mut settled = false;
        while begun.elapsed() < SETTLE {
            if (o.interrupted)() {
                return Err("interrupted".into());
            }
            for &id in asked {
                if let Some(st) = c.status(id) {
                    observer.observe(id, &st);
                }
            }
            let moved = observer.timings().moved_ms.is_some();
            settled = moved && c.formed(&settle_on);
            sample(&c, &mut samples, false);
            if settled {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let moved_ms = observer.timings().moved_ms;
        eprintln!(
            "soak: {:>6.1} s: {} of node {node}: moved after {}{}",
            t_s,
            action.name(),
            super::report::ms(moved_ms),
            if settled { "" } else { ", NOT SETTLED" }
        );
        events.push(Event {
            action: *action,
            node,
            at_ms,
            t_s,
            moved_ms,
            settled,
        });
        std::thread::sleep(Duration::from_secs(2));
    }
    // Back to full strength for the end (a cycle cut short leaves the node out).
    restore_node(&mut c, &events, node)?;
    while start.elapsed() < total {
        if (o.interrupted)() {
            return Err("interrupted".into());
        }
        sample(&c, &mut samples, false);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = wrk.finish(&o.interrupted)?;
    c.finish_probe(probe_pid, Duration::from_secs(15), &o.interrupted)?;
    // Quiet: every connection closed, held fragments expired; then the last reading.
    std::thread::sleep(Duration::from_secs(3));
    sample(&c, &mut samples, true);

    let probe_samples = probe::read(&probe_file)?;
    let (sent, delivered) = cluster_packets(&c)?;
    let false_deaths = false_deaths(&c, node);
    let checks = judge(
        &samples,
        &events,
        &probe_samples,
        node,
        (sent, delivered),
        &false_deaths,
        total,
    );
    let result = SoakResult {
        minutes: o.minutes,
        nodes: o.nodes,
        clients: o.clients,
        passed: checks.iter().all(|c| c.held),
        probe_requests: probe_samples.len(),
        probe_failed: probe_samples.iter().filter(|s| !s.ok).count(),
        samples,
        events,
        sent,
        delivered,
        checks,
    };
    std::fs::copy(&probe_file, o.out.join("soak-probe.jsonl"))
        .map_err(|e| format!("cannot keep the probe's record: {e}"))?;
    write(&o.out, &result)?;
    Ok(result)
}

/// If the cycle stopped with the node out, brings it back.
fn restore_node(c: &mut Cluster, events: &[Event], node: u8) -> Result<(), String> {
    match events.last().map(|e| e.action) {
        Some(Action::Kill) => c.restart_engine(node)?,
        Some(Action::Cut) => c.set_links(node, true)?,
        Some(Action::WireCut) => c.set_wire(node, true)?,
        Some(Action::Drain) => {
            c.drain(node, false)?;
        }
        _ => {}
    }
    Ok(())
}

fn sample_node(c: &Cluster, id: u8, t_s: f64) -> Sample {
    let text = c.metrics(id);
    let sum = |name: &str| -> Option<u64> {
        let prefix = format!("clonecluster_{name}{{");
        let mut any = false;
        let total = text
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .inspect(|_| any = true)
            .sum();
        any.then_some(total)
    };
    let mut drops = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("clonecluster_dropped_frames_total{"))
    {
        let reason = l
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let n = l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
        if let (Some(reason), Some(n)) = (reason, n) {
            if n > 0 {
                *drops.entry(reason.to_owned()).or_insert(0) += n;
            }
        }
    }
    Sample {
        t_s,
        node: id,
        pid: c.engine_pid(id),
        rss_kib: c.engine_rss_kib(id),
        mbufs: sum("mbufs_in_use"),
        flows: sum("flows_tracked"),
        refused: sum("control_refused_total"),
        epoch: sum("epoch"),
        drops,
    }
}

/// nftables counters of IPv4 packets to the cluster address: sent by the client, received by
/// each node's kernel from its host port.
fn count_cluster_packets(c: &Cluster) -> Result<(), String> {
    let table = |hook: &str, iface: &str| {
        format!(
            "table ip ccsoak {{\n counter tocluster {{}}\n chain c {{\n type filter hook {hook} \
             priority 0;\n {iface} ip daddr {CLUSTER_IP} counter name tocluster\n }}\n}}\n"
        )
    };
    let load = |ns: &super::topology::Ns, rules: String| -> Result<(), String> {
        let path = c.dir().join(format!("{}-soak.nft", ns.0));
        std::fs::write(&path, rules).map_err(|e| e.to_string())?;
        ns.run(&["nft", "-f", &path.to_string_lossy()]).map(|_| ())
    };
    load(&c.topo.client, table("output", "oifname \"eth0\""))?;
    for id in &c.all_ids {
        if let Some(ns) = c.topo.node(*id) {
            load(ns, table("prerouting", "iifname \"cc0\""))?;
        }
    }
    Ok(())
}

fn cluster_packets(c: &Cluster) -> Result<(u64, u64), String> {
    let read = |ns: &super::topology::Ns| -> Result<u64, String> {
        let out = ns.run(&["nft", "list", "counter", "ip", "ccsoak", "tocluster"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no packet count in `{}`", out.trim()))
    };
    let sent = read(&c.topo.client)?;
    let mut delivered = 0;
    for id in &c.all_ids {
        if let Some(ns) = c.topo.node(*id) {
            delivered += read(ns)?;
        }
    }
    Ok((sent, delivered))
}

/// "peer dead" lines, from the engine logs of every node but `victim`, that name a node other
/// than `victim` (cut off, the victim rightly finds everybody dead).
fn false_deaths(c: &Cluster, victim: u8) -> Vec<String> {
    let id_of = |v: &serde_json::Value| -> Option<u8> {
        v.as_u64().map(|n| n as u8).or_else(|| {
            let s = v.as_str()?;
            s.trim_start_matches("node ").parse().ok()
        })
    };
    c.logs()
        .iter()
        .flat_map(|(path, text)| {
            text.lines()
                .filter(|l| l.contains(r#""message":"peer dead""#))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| id_of(&v["node"]) != Some(victim) && id_of(&v["peer"]) != Some(victim))
                .map(|v| format!("{}: node {} found {} dead", path, v["node"], v["peer"]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The checks of the module doc, over what the soak recorded.
fn judge(
    samples: &[Sample],
    events: &[Event],
    probe: &[probe::Sample],
    victim: u8,
    (sent, delivered): (u64, u64),
    false_deaths: &[String],
    total: Duration,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let nodes: Vec<u8> = {
        let mut v: Vec<u8> = samples.iter().map(|s| s.node).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let last_t = samples.iter().map(|s| s.t_s).fold(0.0, f64::max);

    // mbufs back to the lowest reading of the engine's life.
    let mut detail = Vec::new();
    let mut held = true;
    for &n in &nodes {
        let end = samples
            .iter()
            .rev()
            .find(|s| s.node == n && s.t_s == last_t);
        let Some((pid, end_mbufs)) = end.and_then(|s| Some((s.pid?, s.mbufs?))) else {
            held = false;
            detail.push(format!("node {n}: no reading at the end"));
            continue;
        };
        let lowest = samples
            .iter()
            .filter(|s| s.node == n && s.pid == Some(pid))
            .filter_map(|s| s.mbufs)
            .min()
            .unwrap_or(end_mbufs);
        held &= end_mbufs <= lowest + MBUF_SLACK;
        detail.push(format!("node {n}: {end_mbufs} at the end, lowest {lowest}"));
    }
    checks.push(Check {
        what: format!("mbufs back to their baseline (within {MBUF_SLACK})"),
        held,
        detail: detail.join("; "),
    });

    // RSS flat for the engines that ran throughout.
    let quarter = total.as_secs_f64() / 4.0;
    let mut detail = Vec::new();
    let mut held = true;
    for &n in &nodes {
        let life: Vec<&Sample> = samples.iter().filter(|s| s.node == n).collect();
        let pids: Vec<Option<u32>> = life.iter().map(|s| s.pid).collect();
        if pids.iter().any(|p| *p != pids[0]) || pids[0].is_none() {
            continue;
        }
        let from = life
            .iter()
            .find(|s| s.t_s >= quarter)
            .and_then(|s| s.rss_kib);
        let to = life.last().and_then(|s| s.rss_kib);
        if let (Some(from), Some(to)) = (from, to) {
            let grew = to.saturating_sub(from);
            held &= grew <= RSS_BOUND_KIB;
            detail.push(format!("node {n}: {from} KiB -> {to} KiB (+{grew})"));
        }
    }
    checks.push(Check {
        what: format!(
            "RSS flat: engines that ran throughout grew by at most {} MiB after the first quarter",
            RSS_BOUND_KIB / 1024
        ),
        held: held && !detail.is_empty(),
        detail: if detail.is_empty() {
            "no engine ran throughout".into()
        } else {
            detail.join("; ")
        },
    });

    checks.push(Check {
        what: "no duplicates: packets delivered to the nodes' kernels <= packets sent".into(),
        held: delivered <= sent && sent > 0,
        detail: format!(
            "{sent} sent, {delivered} delivered ({} not delivered: those to a crashed node \
             before its takeover, SYNs in a handoff's release gap)",
            sent.saturating_sub(delivered)
        ),
    });

    // Probe failures: only the victim's connections while it crashed, or new connections
    // started while it was being detected.
    let windows: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e.action.crashes())
        // A probe request is stamped when it starts: one started up to its 3 s timeout before
        // the crash may fail because of it.
        .map(|e| {
            (
                e.at_ms.saturating_sub(3_000),
                e.at_ms + e.moved_ms.unwrap_or(10_000) + 3_000,
            )
        })
        .collect();
    let in_window = |t: u64| windows.iter().any(|&(a, b)| (a..=b).contains(&t));
    let mut last_node: BTreeMap<(u32, u32), u8> = BTreeMap::new();
    let mut expected = 0;
    let mut unexpected = Vec::new();
    for s in probe {
        let key = (s.slot, s.conn);
        match (s.kind, s.ok) {
            (probe::Kind::Keepalive, true) => {
                if let Some(n) = s.node {
                    last_node.insert(key, n);
                }
            }
            (probe::Kind::Keepalive, false) => {
                let served = last_node.get(&key).copied();
                if served.is_none_or(|n| n == victim) && in_window(s.t_ms) {
                    expected += 1;
                } else {
                    unexpected.push(format!(
                        "keep-alive connection of node {} failed at {} ms ({})",
                        served.map_or("-".into(), |n| n.to_string()),
                        s.t_ms,
                        s.error
                    ));
                }
            }
            (probe::Kind::New, false) if in_window(s.t_ms) => expected += 1,
            (probe::Kind::New, false) => unexpected.push(format!(
                "new connection at {} ms failed ({})",
                s.t_ms, s.error
            )),
            (probe::Kind::New, true) => {}
        }
    }
    checks.push(Check {
        what: format!("only the crashed node's connections lost (node {victim})"),
        held: unexpected.is_empty() && !probe.is_empty(),
        detail: format!(
            "{} probe requests; {expected} failures while node {victim} crashed; {} others{}",
            probe.len(),
            unexpected.len(),
            if unexpected.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    unexpected
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        ),
    });

    let unsettled: Vec<String> = events
        .iter()
        .filter(|e| !e.settled)
        .map(|e| format!("{} at {:.0} s", e.action.name(), e.t_s))
        .collect();
    checks.push(Check {
        what: format!("every event settled within {} s", SETTLE.as_secs()),
        held: unsettled.is_empty() && !events.is_empty(),
        detail: format!(
            "{} events{}",
            events.len(),
            if unsettled.is_empty() {
                String::new()
            } else {
                format!("; not settled: {}", unsettled.join(", "))
            }
        ),
    });
    checks.push(Check {
        what: "no live node declared dead".into(),
        held: false_deaths.is_empty(),
        detail: if false_deaths.is_empty() {
            "none".into()
        } else {
            false_deaths.join("; ")
        },
    });
    checks
}

fn write(out: &Path, r: &SoakResult) -> Result<(), String> {
    let put = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    put(
        "soak.json",
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?,
    )?;
    let mut csv = String::from("t_s,node,pid,rss_kib,mbufs,flows,refused,epoch,dropped\n");
    let opt = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    for s in &r.samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.node,
            s.pid.map_or(String::new(), |p| p.to_string()),
            opt(s.rss_kib),
            opt(s.mbufs),
            opt(s.flows),
            opt(s.refused),
            opt(s.epoch),
            s.drops.values().sum::<u64>()
        );
    }
    put("soak.csv", csv)?;
    let nodes: Vec<u8> = (1..=r.nodes).collect();
    let series = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        nodes
            .iter()
            .map(|&n| {
                let points = r
                    .samples
                    .iter()
                    .filter(|s| s.node == n)
                    .filter_map(|s| Some((s.t_s, f(s)?)))
                    .collect();
                (format!("node {n}"), points)
            })
            .collect()
    };
    put(
        "soak-rss.svg",
        line_plot(
            "Engine resident memory",
            "seconds",
            "MiB",
            &series(&|s| s.rss_kib.map(|k| k as f64 / 1024.0)),
        )?,
    )?;
    put(
        "soak-mbufs.svg",
        line_plot(
            "mbufs in use",
            "seconds",
            "mbufs",
            &series(&|s| s.mbufs.map(|m| m as f64)),
        )?,
    )?;
    put("soak.md", markdown(r))
}

fn markdown(r: &SoakResult) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# clonecluster soak\n\n{:.1} minutes, {} nodes (`hash`), {} `wrk` connections and the \
         connection probe throughout; node {} killed and restarted, cut off both networks and \
         put back, its wire cut (control network up) and mended, drained and undrained, in \
         turn. Result: **{}**.\n",
        r.minutes,
        r.nodes,
        r.clients,
        r.nodes,
        if r.passed { "held" } else { "FAILED" }
    );
    md.push_str("## Checks\n\n| check | result | detail |\n|---|---|---|\n");
    for c in &r.checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            c.what,
            if c.held { "held" } else { "**FAILED**" },
            c.detail
        );
    }
    md.push_str(
        "\n## Events\n\n| at s | event | node | moved | settled |\n|---:|---|---:|---:|---|\n",
    );
    for e in &r.events {
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {} | {} |",
            e.t_s,
            e.action.name(),
            e.node,
            super::report::ms(e.moved_ms),
            if e.settled { "yes" } else { "**no**" }
        );
    }
    md.push_str(
        "\n## Samples\n\n![RSS](soak-rss.svg)\n\n![mbufs](soak-mbufs.svg)\n\n| s | node | RSS \
         MiB | mbufs | flows | refused | epoch | drops by reason |\n|---:|---:|---:|---:|---:|---:\
         |---:|---|\n",
    );
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for s in &r.samples {
        let drops: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            s.t_s,
            s.node,
            s.rss_kib
                .map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
            opt(s.mbufs),
            opt(s.flows),
            opt(s.refused),
            opt(s.epoch),
            if drops.is_empty() {
                "none".to_owned()
            } else {
                drops.join(", ")
            }
        );
    }
    let _ = writeln!(
        md,
        "\nNodes: {}. Every sample is in `soak.csv`, every probe request in `soak-probe.jsonl`.",
        node_list(&(1..=r.nodes).collect::<Vec<_>>())
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, node: u8, pid: u32, rss: u64, mbufs: u64) -> Sample {
        Sample {
            t_s,
            node,
            pid: Some(pid),
            rss_kib: Some(rss),
            mbufs: Some(mbufs),
            flows: Some(0),
            refused: Some(0),
            epoch: Some(1),
            drops: BTreeMap::new(),
        }
    }

    fn ok(t_ms: u64, slot: u32, node: u8) -> probe::Sample {
        probe::Sample {
            t_ms,
            kind: probe::Kind::Keepalive,
            slot,
            conn: 0,
            node: Some(node),
            ok: true,
            connect_ms: 0,
            error: String::new(),
            family: probe::Family::Ipv4,
        }
    }

    fn failed(t_ms: u64, slot: u32) -> probe::Sample {
        probe::Sample {
            ok: false,
            node: None,
            error: "reset".into(),
            ..ok(t_ms, slot, 0)
        }
    }

    fn kill(at_ms: u64) -> Event {
        Event {
            action: Action::Kill,
            node: 2,
            at_ms,
            t_s: 1.0,
            moved_ms: Some(300),
            settled: true,
        }
    }

    fn held(checks: &[Check]) -> Vec<(String, bool)> {
        checks.iter().map(|c| (c.what.clone(), c.held)).collect()
    }

    #[test]
    fn a_clean_soak_holds_and_a_leak_or_a_stray_loss_does_not() {
        let total = Duration::from_secs(60);
        let clean = vec![
            sample(0.0, 1, 10, 50_000, 900),
            sample(20.0, 1, 10, 51_000, 1000),
            sample(63.0, 1, 10, 51_200, 905),
            sample(0.0, 2, 20, 50_000, 900),
            sample(63.0, 2, 30, 50_000, 880),
        ];
        let probe = vec![
            ok(1_000, 0, 2),
            failed(1_100, 0),
            ok(1_200, 1, 1),
            ok(5_000, 1, 1),
        ];
        let events = vec![kill(1_000)];
        let checks = judge(&clean, &events, &probe, 2, (100, 90), &[], total);
        assert!(checks.iter().all(|c| c.held), "{:?}", held(&checks));

        // mbufs that never come back: a leak.
        let mut leak = clean.clone();
        leak[2].mbufs = Some(2000);
        let checks = judge(&leak, &events, &probe, 2, (100, 90), &[], total);
        assert_eq!(checks.iter().filter(|c| !c.held).count(), 1);
        assert!(!checks[0].held);

        // More delivered than sent: a duplicate.
        let checks = judge(&clean, &events, &probe, 2, (100, 101), &[], total);
        assert!(!checks[2].held);

        // A connection of node 1 lost: not the crashed node's.
        let mut stray = probe.clone();
        stray.push(failed(5_100, 1));
        let checks = judge(&clean, &events, &stray, 2, (100, 90), &[], total);
        assert!(!checks[3].held, "{}", checks[3].detail);

        // Growing memory.
        let mut grow = clean.clone();
        grow[2].rss_kib = Some(51_000 + RSS_BOUND_KIB + 1);
        let checks = judge(&grow, &events, &probe, 2, (100, 90), &[], total);
        assert!(!checks[1].held);
    }
}
