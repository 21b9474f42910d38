//! `clonecluster lab`: the paper's experiment on one machine. For each configuration (1 node,
//! N nodes `hash`, N nodes `by-load`) it builds the namespace network, starts the engines and
//! nginx, waits until the cluster has formed, drives a ramp of client counts with `wrk` from the
//! client namespace, checks the Clone Cluster's preconditions, and tears everything down. It
//! writes one CSV per configuration, `report.md`, and SVG plots of throughput and mean response
//! time against clients, one line per configuration (like the paper's figures).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::services::{
    configure_host_port, engine_config, start_engine, start_nginx, EngineOptions,
};
use super::topology::{control_ip, remove_namespaces, Topology, CLUSTER_MAC};

/// What to run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub bin: PathBuf,
    pub nodes: u8,
    /// Policies to run with `nodes` nodes, after the 1-node baseline.
    pub policies: Vec<String>,
    pub clients: Vec<u32>,
    pub duration_s: u32,
    pub out: PathBuf,
    /// Namespace name prefix (short: interface names are made from it).
    pub prefix: String,
}

/// One load step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Step {
    pub clients: u32,
    pub rps: f64,
    pub transfer_mib_s: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// One configuration's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigResult {
    pub name: String,
    pub nodes: u8,
    pub policy: String,
    pub steps: Vec<Step>,
    /// Share of the frames delivered to each node's host over the whole run.
    pub node_shares: Vec<(u8, f64)>,
    /// Whether the learning switch ever held the cluster MAC (it must not).
    pub cluster_mac_learned: bool,
    pub formed_in_ms: u128,
}

/// Runs every configuration; returns the results and writes the report files into `out`.
pub fn run(opts: &LabOptions) -> Result<Vec<ConfigResult>, String> {
    let leftovers = remove_namespaces_preview(&opts.prefix);
    if !leftovers.is_empty() {
        return Err(format!(
            "namespaces from an earlier lab run are still there: {}\n  fix: run `clonecluster \
             lab --cleanup`",
            leftovers.join(", ")
        ));
    }
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("{}: cannot create: {e}", opts.out.display()))?;
    let mut configs = vec![(1u8, "hash".to_owned())];
    for p in &opts.policies {
        configs.push((opts.nodes, p.clone()));
    }
    let total_steps = configs.len() * opts.clients.len();
    let mut done = 0;
    let mut results = Vec::new();
    for (nodes, policy) in configs {
        let name = if nodes == 1 {
            "1 node".to_owned()
        } else {
            format!("{nodes} nodes {policy}")
        };
        let r = run_config(opts, &name, nodes, &policy, &mut |step: &Step| {
            done += 1;
            eprintln!(
                "[{done}/{total_steps}] {name}, {} clients: {:.0} req/s, mean {:.2} ms, p99 {:.2} ms, {} errors",
                step.clients, step.rps, step.mean_ms, step.p99_ms, step.errors
            );
        })?;
        write_csv(&opts.out, &r)?;
        results.push(r);
    }
    write_report(opts, &results)?;
    Ok(results)
}

fn remove_namespaces_preview(prefix: &str) -> Vec<String> {
    let list = super::topology::run(&["ip", "netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

/// Removes everything an earlier (crashed) lab run left; returns what it removed.
pub fn cleanup(prefix: &str) -> Vec<String> {
    remove_namespaces(prefix)
}

fn run_config(
    opts: &LabOptions,
    name: &str,
    nodes: u8,
    policy: &str,
    progress: &mut dyn FnMut(&Step),
) -> Result<ConfigResult, String> {
    let ids: Vec<u8> = (1..=nodes).collect();
    let mut topo = Topology::build(&opts.prefix, &ids)?;
    let dir = tempfile::Builder::new()
        .prefix("cclab")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let engine_opts = EngineOptions {
        policy: if policy == "by-load" {
            "by-load"
        } else {
            "hash"
        },
        ..EngineOptions::default()
    };
    for &id in &ids {
        let ns = topo.node(id).cloned().ok_or("node namespace")?;
        let cfg = engine_config(dir.path(), id, &ids, &engine_opts).map_err(|e| e.to_string())?;
        let log = opts.out.join(format!("{}-node{id}.log", slug(name)));
        let engine = start_engine(&opts.bin, &ns, &cfg, &log).map_err(|e| e.to_string())?;
        topo.adopt(engine);
        configure_host_port(&ns, Duration::from_secs(30))?;
        let nginx = start_nginx(&ns, dir.path(), id, 64).map_err(|e| e.to_string())?;
        topo.adopt(nginx);
    }
    let started = Instant::now();
    wait_formed(dir.path(), &ids, Duration::from_secs(30))?;
    let formed_in_ms = started.elapsed().as_millis();
    let before = host_frames(&topo, &ids);
    let mut steps = Vec::new();
    for &c in &opts.clients {
        let step = wrk(&topo, c, opts.duration_s)?;
        progress(&step);
        steps.push(step);
    }
    let after = host_frames(&topo, &ids);
    let delta: Vec<(u8, u64)> = ids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(&id, (b, a))| (id, a.saturating_sub(*b)))
        .collect();
    let sum: u64 = delta.iter().map(|(_, d)| d).sum();
    let node_shares = delta
        .iter()
        .map(|&(id, d)| (id, if sum == 0 { 0.0 } else { d as f64 / sum as f64 }))
        .collect();
    let cluster_mac_learned = topo
        .learned_macs()
        .unwrap_or_default()
        .iter()
        .any(|m| m == CLUSTER_MAC);
    Ok(ConfigResult {
        name: name.to_owned(),
        nodes,
        policy: policy.to_owned(),
        steps,
        node_shares,
        cluster_mac_learned,
        formed_in_ms,
    })
}

/// Waits until every node sees all `ids` as members with nothing moving.
fn wait_formed(dir: &Path, ids: &[u8], timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let ok = ids.iter().all(|id| {
            let sock = dir.join(format!("node{id}.sock"));
            crate::runtime::operator_command(&sock, "status")
                .ok()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                .is_some_and(|s| {
                    s["phase"] == "Done"
                        && s["moving"] == 0
                        && s["members"].as_array().map_or(0, |m| m.len()) == ids.len()
                })
        });
        if ok {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "the cluster of {ids:?} did not form within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Frames each node's engine delivered to its host, from its `/metrics`.
fn host_frames(topo: &Topology, ids: &[u8]) -> Vec<u64> {
    ids.iter()
        .map(|&id| {
            let Some(ns) = topo.node(id) else { return 0 };
            let url = format!("http://{}:9100/metrics", control_ip(id));
            let out = ns.run(&["curl", "-s", "-m", "3", &url]).unwrap_or_default();
            out.lines()
                .filter(|l| l.starts_with("clonecluster_host_tx_frames_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        })
        .collect()
}

/// One load step: `wrk` with `clients` connections for `secs` seconds.
fn wrk(topo: &Topology, clients: u32, secs: u32) -> Result<Step, String> {
    let threads = clients.clamp(1, 2).to_string();
    let out = topo
        .client
        .run(&[
            "wrk",
            "-t",
            &threads,
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{secs}s"),
            "--timeout",
            "3s",
            "--latency",
            "http://198.18.0.1/",
        ])
        .map_err(|e| format!("wrk: {e}"))?;
    parse_wrk(&out, clients).ok_or_else(|| format!("cannot read wrk's output:\n{out}"))
}

/// Reads wrk's summary.
pub fn parse_wrk(out: &str, clients: u32) -> Option<Step> {
    let mut s = Step {
        clients,
        ..Step::default()
    };
    let mut in_distribution = false;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", "Distribution", ..] => in_distribution = true,
            ["Latency", avg, ..] if !in_distribution => s.mean_ms = duration_ms(avg)?,
            ["99%", v] if in_distribution => s.p99_ms = duration_ms(v)?,
            ["Requests/sec:", v] => s.rps = v.parse().ok()?,
            ["Transfer/sec:", v] => s.transfer_mib_s = size_mib(v)?,
            ["Socket", "errors:", rest @ ..] => {
                s.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => s.errors += n.parse::<u64>().ok()?,
            _ => {}
        }
    }
    (s.rps > 0.0).then_some(s)
}

fn duration_ms(v: &str) -> Option<f64> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn size_mib(v: &str) -> Option<f64> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "B" => n / (1024.0 * 1024.0),
        "KB" => n / 1024.0,
        "MB" => n,
        "GB" => n * 1024.0,
        _ => return None,
    })
}

fn split_unit(v: &str) -> (&str, &str) {
    let i = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    v.split_at(i)
}

fn slug(name: &str) -> String {
    name.replace(' ', "-")
}

fn write_csv(out: &Path, r: &ConfigResult) -> Result<(), String> {
    let mut csv = String::from("step,clients,rps,transfer_mib_s,mean_ms,p99_ms,errors\n");
    for (i, s) in r.steps.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{},{},{:.1},{:.3},{:.3},{:.3},{}",
            i + 1,
            s.clients,
            s.rps,
            s.transfer_mib_s,
            s.mean_ms,
            s.p99_ms,
            s.errors
        );
    }
    let path = out.join(format!("{}.csv", slug(&r.name)));
    std::fs::write(&path, csv).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_report(opts: &LabOptions, results: &[ConfigResult]) -> Result<(), String> {
    let mut md = String::from("# clonecluster lab report\n\n");
    let _ = writeln!(
        md,
        "Clients per step: {:?}, {} s per step, wrk from the client namespace against \
         http://198.18.0.1/ (nginx per node behind the engine; learning Linux bridge).\n",
        opts.clients, opts.duration_s
    );
    let _ = writeln!(
        md,
        "![throughput](throughput.svg)\n\n![response time](response_time.svg)\n"
    );
    for r in results {
        let _ = writeln!(md, "## {}\n", r.name);
        let _ =
            writeln!(
            md,
            "Formed in {} ms. Preconditions: switch learned the cluster MAC: **{}**; shares of \
             delivered frames: {}.\n",
            r.formed_in_ms,
            if r.cluster_mac_learned { "YES (broken)" } else { "no" },
            r.node_shares
                .iter()
                .map(|(id, s)| format!("node {id} {:.1}%", s * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            md,
            "| clients | req/s | MiB/s | mean ms | p99 ms | errors |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
        for s in &r.steps {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
                s.clients, s.rps, s.transfer_mib_s, s.mean_ms, s.p99_ms, s.errors
            );
        }
        md.push('\n');
    }
    let w = |name: &str, text: String| {
        let path = opts.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    w("report.md", md)?;
    w(
        "throughput.svg",
        svg_chart("Server throughput", "requests/s", results, |s| s.rps),
    )?;
    w(
        "response_time.svg",
        svg_chart("Average response time", "ms", results, |s| s.mean_ms),
    )?;
    w(
        "results.json",
        serde_json::to_string_pretty(results).map_err(|e| e.to_string())?,
    )?;
    Ok(())
}

/// A line chart: clients on x, `value` on y, one polyline per configuration.
fn svg_chart(
    title: &str,
    unit: &str,
    results: &[ConfigResult],
    value: impl Fn(&Step) -> f64,
) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 70.0;
    const R: f64 = 170.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let xs: Vec<f64> = results
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| f64::from(s.clients)))
        .collect();
    let ys: Vec<f64> = results
        .iter()
        .flat_map(|r| r.steps.iter().map(&value))
        .collect();
    let xmax = xs.iter().copied().fold(1.0, f64::max);
    let ymax = ys.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let px = |x: f64| L + x / xmax * (W - L - R);
    let py = |y: f64| H - B - y / ymax * (H - T - B);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">clients</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{unit}</text>
"#,
        (W - R + L) / 2.0,
        H - B,
        W - R,
        H - B,
        H - B,
        (W - R + L) / 2.0,
        H - 12.0,
        (H - B + T) / 2.0,
        (H - B + T) / 2.0,
    );
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        let label = if y >= 100.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.2}")
        };
        let (x0, yy, xt, yt) = (L - 4.0, py(y), L - 6.0, py(y) + 4.0);
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{yy:.1}" x2="{L}" y2="{yy:.1}" stroke="black"/><text x="{xt}" y="{yt:.1}" text-anchor="end">{label}</text>"#
        );
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="black"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"#,
            px(x),
            H - B,
            H - B + 4.0,
            H - B + 18.0,
            x
        );
    }
    for (i, r) in results.iter().enumerate() {
        let c = colours[i % colours.len()];
        let points: Vec<String> = r
            .steps
            .iter()
            .map(|s| format!("{:.1},{:.1}", px(f64::from(s.clients)), py(value(s))))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let ly = T + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            W - R + 15.0,
            W - R + 40.0,
            W - R + 45.0,
            ly + 4.0,
            r.name
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 3s test @ http://198.18.0.1/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50ms  500.00us  20.00ms   90.00%
    Req/Sec    10.00k     1.00k   12.00k    70.00%
  Latency Distribution
     50%    1.20ms
     75%    1.80ms
     90%    2.50ms
     99%    5.00ms
  60000 requests in 3.00s, 15.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  20000.00
Transfer/sec:      5.00MB
";
        let s = parse_wrk(out, 50).unwrap();
        assert_eq!(s.clients, 50);
        assert!((s.mean_ms - 1.5).abs() < 1e-9);
        assert!((s.p99_ms - 5.0).abs() < 1e-9);
        assert!((s.rps - 20000.0).abs() < 1e-9);
        assert!((s.transfer_mib_s - 5.0).abs() < 1e-9);
        assert_eq!(s.errors, 10);
        assert!(parse_wrk("garbage", 1).is_none());
        assert!((duration_ms("250us").unwrap() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn charts_are_svg() {
        let r = ConfigResult {
            name: "2 nodes hash".into(),
            nodes: 2,
            policy: "hash".into(),
            steps: vec![
                Step {
                    clients: 10,
                    rps: 100.0,
                    ..Step::default()
                },
                Step {
                    clients: 50,
                    rps: 300.0,
                    ..Step::default()
                },
            ],
            node_shares: vec![],
            cluster_mac_learned: false,
            formed_in_ms: 1,
        };
        let svg = svg_chart("t", "req/s", &[r], |s| s.rps);
        assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.ends_with("</svg>\n"));
    }
}
