//! What the appliance lab leaves in `--out`: one CSV per configuration, `results.json`,
//! `report.md` (ramp table, ratios, preconditions, scenarios, what the kernel offers and, where
//! it cannot decapsulate them, the GUE and IP-in-IP frames checked from a capture) and SVG
//! plots of throughput and mean response time against clients, one line per configuration.

use std::fmt::Write as _;
use std::path::Path;

use super::applab::{AppConfigResult, AppResults, ApplianceOptions};
use super::applab_checks::encap_failures;
use super::applab_encap::{EncapStep, GUE_PORT, GUE_SERVICE_PORT, IPIP_SERVICE_PORT};
use super::dispatch::Feature;
use super::load::Step;
use super::report::{line_plot, ms, per_node, slug, steps_csv};

/// Writes every file of the report into `opts.out`.
pub fn write_all(opts: &ApplianceOptions, r: &AppResults) -> Result<(), String> {
    let out = &opts.out;
    for c in &r.configs {
        write(out, &format!("{}.csv", slug(&c.name)), steps_csv(&c.steps))?;
    }
    let series = |value: &dyn Fn(&Step) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        r.configs
            .iter()
            .map(|c| {
                let points = c
                    .steps
                    .iter()
                    .map(|s| (f64::from(s.clients), value(s)))
                    .collect();
                (c.name.clone(), points)
            })
            .collect()
    };
    write(
        out,
        "throughput.svg",
        line_plot(
            "Throughput behind each dispatcher",
            "clients",
            "requests/s",
            &series(&|s| s.rps),
        )?,
    )?;
    write(
        out,
        "response_time.svg",
        line_plot(
            "Average response time",
            "clients",
            "ms",
            &series(&|s| s.mean_ms),
        )?,
    )?;
    write(out, "report.md", markdown(opts, r))?;
    write(
        out,
        "results.json",
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?,
    )
}

fn write(out: &Path, name: &str, text: String) -> Result<(), String> {
    let path = out.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The throughput of `c` at `clients`.
fn rps(c: &AppConfigResult, clients: u32) -> Option<f64> {
    c.steps.iter().find(|s| s.clients == clients).map(|s| s.rps)
}

/// The report's Markdown.
pub fn markdown(opts: &ApplianceOptions, r: &AppResults) -> String {
    let mut md = String::from("# clonecluster appliance lab report\n\n");
    let _ = writeln!(
        md,
        "Run {} on {} CPU(s), Linux {}, clonecluster {}; {:.0} s in all; load average at the \
         end: {}.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        env!("CARGO_PKG_VERSION"),
        r.took_s,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let _ = writeln!(
        md,
        "{} backends (nginx, the cluster address 198.18.0.1 on loopback, `arp_ignore=1`, \
         `arp_announce=2`; `/id` names the backend: 11, 12, ...) on a learning Linux bridge with \
         the client. In front of them: nothing (*1 backend alone*: backend 1 answers for the \
         address itself); the *kernel director* (one namespace, an nftables `netdev` ingress rule: \
         `jhash` of client address and port over the backends, destination MAC rewritten, `fwd` \
         out of the same port: DSR, no conntrack); *HAProxy* in TCP mode (round robin; replies \
         through it); a clone cluster of engine *appliances* (`net_af_packet` wire port, `dsr` \
         delivery; replies go from the backends to the client directly). `wrk` (keep-alive) \
         steps of {} clients, {} s each, against http://198.18.0.1/.\n",
        opts.backends,
        opts.clients
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        opts.duration_s
    );
    kernel_section(&mut md, r);
    if !r.configs.is_empty() {
        ramp_tables(&mut md, &opts.clients, &r.configs);
        ratio_table(&mut md, opts, &r.configs);
        for c in &r.configs {
            config_section(&mut md, c);
        }
    }
    if !r.scenarios.is_empty() {
        scenario_table(&mut md, r);
    }
    md
}

fn kernel_section(md: &mut String, r: &AppResults) {
    md.push_str(
        "## What this kernel offers\n\n| capability | present | how found |\n|---|---|---|\n",
    );
    let row = |md: &mut String, what: &str, f: &Feature| {
        let _ = writeln!(md, "| {what} | {} | {} |", f.words(), f.how);
    };
    row(md, "IPVS (`CONFIG_IP_VS`)", &r.kernel.ipvs);
    row(
        md,
        "IP-in-IP decapsulation (`CONFIG_NET_IPIP`)",
        &r.kernel.ipip,
    );
    row(
        md,
        "FOU/GUE decapsulation (`CONFIG_NET_FOU`)",
        &r.kernel.fou,
    );
    md.push('\n');
    if r.kernel.ipvs.present != Some(true) {
        md.push_str(
            "IPVS is not in this kernel: the kernel director baseline is nftables (above), not \
             IPVS-DR.\n",
        );
    }
    if r.kernel.decapsulates() {
        md.push_str(
            "This kernel could decapsulate IP-in-IP and GUE; the lab does not run encapsulated \
             delivery end to end yet (the frames are checked by `tests/appliance_netns.rs`).\n",
        );
    } else if let Some(e) = &r.encap {
        encap_paragraph(md, e);
    } else {
        md.push_str(
            "This kernel cannot decapsulate both IP-in-IP and GUE: encapsulated delivery was not \
             run end to end here. The lab checks the frames the appliances send from a capture \
             on a backend's port with the ramp (not asked for in this run); \
             `tests/appliance_netns.rs` checks them too.\n",
        );
    }
    md.push('\n');
}

/// The encapsulation step's verdict: what was sent, what was captured, what held.
fn encap_paragraph(md: &mut String, e: &EncapStep) {
    let c = &e.check;
    let _ = writeln!(
        md,
        "This kernel cannot decapsulate both IP-in-IP and GUE: encapsulated delivery was not run \
         end to end here. Instead the GUE and IP-in-IP frames an appliance sends were checked \
         frame by frame from a capture on a backend's port: appliance {a} with a `gue` service \
         (port {gp} of 198.18.0.1) and an `ipip` service (port {ip}) to backend {b}, {n} \
         requests to each (unanswered: nothing decapsulates them), tcpdump on backend {b}'s port \
         ([`{cap}`]({cap})), {s:.1} s in all.\n",
        a = e.appliance,
        b = e.backend,
        gp = GUE_SERVICE_PORT,
        ip = IPIP_SERVICE_PORT,
        n = e.requests_per_service,
        cap = e.capture,
        s = e.took_ms as f64 / 1000.0,
    );
    let failures = encap_failures(e);
    if failures.is_empty() {
        let _ = writeln!(
            md,
            "**{} GUE and {} IP-in-IP frames captured and checked: every one well formed** \
             (outer Ethernet from the appliance's node MAC to the backend's MAC; outer IPv4 from \
             the appliance's own address to the backend's, header checksum valid, not a \
             fragment; GUE: UDP to port {GUE_PORT} from an entropy port of 49152 and up, UDP \
             length and checksum valid, GUE header version 0 carrying IPv4; inside: the client's \
             packet unchanged, from 198.18.0.100 to 198.18.0.1, to the service's port, IPv4 and \
             TCP checksums valid).",
            c.gue, c.ipip
        );
    } else {
        let _ = writeln!(
            md,
            "{} GUE and {} IP-in-IP frames captured and checked ({} frames in all): \
             **FAILED**: {}.",
            c.gue,
            c.ipip,
            c.frames,
            failures.join("; ")
        );
    }
}

fn ramp_tables(md: &mut String, clients: &[u32], configs: &[AppConfigResult]) {
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
        for &c in clients {
            match rps(r, c) {
                Some(v) => {
                    let _ = write!(md, " {v:.0} |");
                }
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');
}

/// The appliance cluster against each dispatcher, and K against 1 appliance.
fn ratio_table(md: &mut String, opts: &ApplianceOptions, configs: &[AppConfigResult]) {
    let find = |dispatch: &str, nodes: u8| {
        configs
            .iter()
            .find(|c| c.dispatch == dispatch && c.nodes == nodes)
    };
    let k = opts.nodes;
    let Some(top) = find("appliances", k) else {
        return;
    };
    let mut pairs = Vec::new();
    for (dispatch, nodes) in [
        ("director", 0),
        ("haproxy", 0),
        ("appliances", 1),
        ("alone", 0),
    ] {
        if let Some(base) = find(dispatch, nodes).filter(|b| b.name != top.name) {
            pairs.push(base);
        }
    }
    if pairs.is_empty() {
        return;
    }
    md.push_str("## Ratios (throughput, same clients)\n\n| ratio |");
    for c in &opts.clients {
        let _ = write!(md, " {c} clients |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(opts.clients.len()));
    md.push('\n');
    for base in pairs {
        let _ = write!(md, "| {} / {} |", top.name, base.name);
        for &c in &opts.clients {
            match (rps(top, c), rps(base, c)) {
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

fn shares(v: &[(u8, f64)], what: &str) -> String {
    v.iter()
        .map(|(id, s)| format!("{what} {id} {:.1}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn config_section(md: &mut String, c: &AppConfigResult) {
    let _ = writeln!(md, "## {}\n", c.name);
    let k = &c.checks;
    let _ = writeln!(
        md,
        "{}{}Backends' shares of received TCP segments: {}. ARP replies for the cluster address \
         seen by the client: {}{}; backends answering ARP for it: {}. Preconditions: {}.\n",
        if c.nodes > 0 {
            format!("Formed in {} ms. ", c.formed_in_ms)
        } else {
            String::new()
        },
        if c.nodes > 0 {
            format!(
                "Appliances' shares of forwarded frames: {}. ",
                shares(&c.appliance_shares, "appliance")
            )
        } else {
            String::new()
        },
        shares(&c.backend_shares, "backend"),
        k.arp_replies,
        if c.nodes > 0 {
            format!(
                " (from appliance {})",
                super::report::node_list(&k.arp_answered_by)
            )
        } else {
            String::new()
        },
        super::report::node_list(&k.backends_answering_arp),
        if c.failures.is_empty() {
            "all hold".to_owned()
        } else {
            format!("**FAILED**: {}", c.failures.join("; "))
        }
    );
    md.push_str("| clients | req/s | MiB/s | mean ms | p99 ms | errors | timeouts |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for s in &c.steps {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            s.clients, s.rps, s.transfer_mib_s, s.mean_ms, s.p99_ms, s.errors, s.timeouts
        );
    }
    md.push('\n');
}

fn scenario_table(md: &mut String, r: &AppResults) {
    md.push_str(
        "## Scenarios\n\nSteady `wrk` load, the connection probe (keep-alive connections and \
         fresh ones asking `GET /id`, which names the backend) and long downloads (2 MiB at \
         256 KiB/s; for a kill, half of them from client ports whose bucket the victim holds; for a \
         backend killed or drained, half from client ports the appliances send to that backend); \
         the event comes a third of the way in. *Takeover*: from the kill until every other \
         appliance sent the victim's new flows on (the appliances' own timelines); for a backend \
         killed or drained, *detected* and *moved* are when the first and the last appliance \
         showed it `down` or `drained` in its status (from then on it gets no new flow). *Lost*: probe \
         keep-alive connections that failed after the event (by the backend that served them) and \
         downloads not complete. *Slow connects*: fresh connections that waited for a SYN \
         retransmission (1 s: their SYN was lost, e.g. to a dead appliance before the takeover). \
         *Served again*: from the event until a probe request was served again (nothing was \
         served in between).\n\n\
         | scenario | in front | detected | takeover / moved | lost: probe | lost: downloads | \
         wrk req/s | wrk errors | probe failed | new after moved failed | slow connects | \
         served again | expectation | result |\n\
         |---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for s in &r.scenarios {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} of {} ({} through the {}) | {:.0} | {} | {} of {} | \
             {} of {} | {} | {} | {} | {} |",
            s.scenario,
            s.config,
            ms(s.detected_ms),
            ms(s.moved_ms),
            per_node(&s.probe.lost_by_node).replace("node", "backend"),
            s.downloads - s.downloads_complete,
            s.downloads,
            s.downloads_through_node,
            match s.scenario.as_str() {
                "director-kill" => "director".to_owned(),
                "appliance-kill" | "appliance-wire-cut" => {
                    format!("victim, appliance {}", s.node)
                }
                "backend-kill" => format!("dead backend {}", s.node),
                "backend-drain" => format!("drained backend {}", s.node),
                _ => format!("new appliance {}: none pinned", s.node),
            },
            s.wrk.rps,
            s.wrk.errors,
            s.probe.failed,
            s.probe.requests,
            s.probe.new_failed_after_settled,
            s.probe.new_after_settled,
            s.probe.slow_connects,
            s.served_again_ms
                .map_or("never (within the run)".to_owned(), |v| format!("{v} ms")),
            s.expectation,
            if s.passed { "held" } else { "**FAILED**" }
        );
    }
    md.push('\n');
}
