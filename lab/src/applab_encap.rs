//! The appliance lab's encapsulation step, run with the ramp where this kernel cannot
//! decapsulate GUE or IP-in-IP (so `gue` and `ipip` delivery cannot be run end to end): one
//! appliance in front of backend 1 with a `gue` service (port 8080 of the cluster address) and
//! an `ipip` service (port 8081), a capture on backend 1's port (tcpdump), a few requests (they
//! cannot be answered: nothing decapsulates them; curl gives up after 2 s), then every captured
//! frame checked by [`super::encap_check`]. The capture stays in the report's directory.
//!
//! A few seconds in all: the requests run side by side. Everything it starts is adopted by the
//! lab's [`super::Topology`] and stopped by PID (tcpdump with SIGTERM, so that its file is
//! complete), the namespaces removed, on success, failure and Ctrl-C alike.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::applab::ApplianceOptions;
use super::appliance::{node_ip, ApplianceLab, Dispatch, LabPlan};
use super::checks::tcpdump;
use super::encap_check::{check_frames, EncapCheck, Expect};
use super::run::interrupted;
use super::topology::{backend_ip, backend_mac, node_mac, CLIENT_IP, CLUSTER_IP};

/// The services' ports on the cluster address, and the backend's GUE port (the engine's
/// default `gue_port`).
pub const GUE_SERVICE_PORT: u16 = 8080;
pub const IPIP_SERVICE_PORT: u16 = 8081;
pub const GUE_PORT: u16 = 6080;
/// Requests to each service, side by side.
pub const REQUESTS_PER_SERVICE: usize = 2;
/// The capture's file in the report's directory.
pub const CAPTURE: &str = "encap-backend1.pcap";

/// What the step did and found.
#[derive(Debug, Clone, Serialize)]
pub struct EncapStep {
    /// The backend whose port was captured, and the appliance that sent to it.
    pub backend: u8,
    pub appliance: u8,
    /// Requests sent to each service (none can be answered).
    pub requests_per_service: usize,
    /// The capture's file name, in the report's directory.
    pub capture: String,
    pub check: EncapCheck,
    /// From starting the lab to the verdict, ms.
    pub took_ms: u128,
}

/// The `gue` and `ipip` services (entries of a `services:` list) to backend `index` (its MAC
/// given: nothing to resolve), on ports 8080 and 8081 of the cluster address.
pub fn encap_services(index: u8) -> String {
    let (b, m) = (backend_ip(index), backend_mac(index));
    format!(
        "  - {{ name: gue, addresses: [{CLUSTER_IP}], ports: [{GUE_SERVICE_PORT}], delivery: gue, \
         backends: [{{ ip: {b}, mac: \"{m}\" }}] }}\n\
         \x20 - {{ name: ipip, addresses: [{CLUSTER_IP}], ports: [{IPIP_SERVICE_PORT}], \
         delivery: ipip, backends: [{{ ip: {b}, mac: \"{m}\" }}] }}\n"
    )
}

/// What appliance `id`'s frames to backend `index` must carry (the lab's addresses).
pub fn expect(id: u8, index: u8) -> Expect {
    Expect {
        node_mac: node_mac(id).parse().unwrap_or_default(),
        node_ip: node_ip(id),
        backend_mac: backend_mac(index).parse().unwrap_or_default(),
        backend_ip: backend_ip(index),
        client_ip: CLIENT_IP,
        service_ip: CLUSTER_IP,
        gue_port: GUE_PORT,
        gue_service_port: GUE_SERVICE_PORT,
        ipip_service_port: IPIP_SERVICE_PORT,
    }
}

/// Runs the step on a lab of its own (torn down when it returns).
pub fn run(opts: &ApplianceOptions) -> Result<EncapStep, String> {
    let started = Instant::now();
    let (id, index) = (1, 1);
    let mut lab = ApplianceLab::start(
        &opts.programs,
        &opts.prefix,
        LabPlan {
            dispatch: Dispatch::Appliances,
            backends: 1,
            all_ids: &[id],
            start: &[],
            health: false,
        },
        opts.out.join("encap"),
    )?;
    lab.extra_services = encap_services(index);
    lab.start_node(id)?;
    lab.wait_formed(&[id], Duration::from_secs(30), &interrupted)?;
    lab.wait_serving(Duration::from_secs(20), &interrupted)?;
    let pcap = opts.out.join(CAPTURE);
    let _ = std::fs::remove_file(&pcap);
    let tcpdump = start_capture(&mut lab, index, &pcap)?;
    let sent = requests(&mut lab);
    // SIGTERM by PID: tcpdump closes its file; every frame was written as it came (-U).
    let stopped = stop(&mut lab, tcpdump.pid);
    drop(tcpdump.stderr);
    sent?;
    stopped?;
    let frames: Vec<Vec<u8>> = clonecluster::replay::read_pcap(&pcap)?
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    Ok(EncapStep {
        backend: index,
        appliance: id,
        requests_per_service: REQUESTS_PER_SERVICE,
        capture: CAPTURE.to_owned(),
        check: check_frames(&frames, &expect(id, index)),
        took_ms: started.elapsed().as_millis(),
    })
}

/// A running capture: tcpdump's PID (adopted) and its standard error, kept open until it ends
/// (it writes its counts there when it stops).
struct Capture {
    pid: u32,
    stderr: Option<std::io::Lines<BufReader<std::process::ChildStderr>>>,
}

/// Starts tcpdump on backend `index`'s port for the encapsulated frames; returns once it says
/// "listening on".
fn start_capture(
    lab: &mut ApplianceLab,
    index: u8,
    pcap: &std::path::Path,
) -> Result<Capture, String> {
    let ns = lab
        .topo
        .backend(index)
        .cloned()
        .ok_or_else(|| format!("no backend {index}"))?;
    let mut child = tcpdump(&ns, pcap, &format!("ip proto 4 or udp port {GUE_PORT}"))
        .spawn()
        .map_err(|e| format!("cannot start tcpdump: {e}"))?;
    let err = child.stderr.take();
    let mut capture = Capture {
        pid: lab.topo.adopt(child),
        stderr: err.map(|e| BufReader::new(e).lines()),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut said = Vec::new();
    while let Some(lines) = capture.stderr.as_mut() {
        if interrupted() {
            return Err("interrupted".into());
        }
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => return Ok(capture),
            Some(Ok(l)) if Instant::now() < deadline => said.push(l),
            _ => break,
        }
    }
    Err(format!(
        "tcpdump did not start capturing on backend {index}'s port: {}",
        said.join("; ")
    ))
}

/// Requests to both services, side by side: each curl's SYN (and its retransmission) goes
/// unanswered until curl gives up after 2 s.
fn requests(lab: &mut ApplianceLab) -> Result<(), String> {
    let mut pids = Vec::new();
    for port in [GUE_SERVICE_PORT, IPIP_SERVICE_PORT] {
        for _ in 0..REQUESTS_PER_SERVICE {
            let child = lab
                .topo
                .client
                .command(&[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "2",
                    &format!("http://{CLUSTER_IP}:{port}/"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start curl: {e}"))?;
            pids.push(lab.topo.adopt(child));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids {
        let Some(mut child) = lab.topo.release(pid) else {
            continue;
        };
        if !wait_until(&mut child, deadline) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if interrupted() {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Stops the adopted process `pid` with SIGTERM (SIGKILL if it lingers) and reaps it.
fn stop(lab: &mut ApplianceLab, pid: u32) -> Result<(), String> {
    let mut child = lab
        .topo
        .release(pid)
        .ok_or("tcpdump is no longer running")?;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    if !wait_until(&mut child, Instant::now() + Duration::from_secs(3)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err("tcpdump did not stop on SIGTERM".into());
    }
    Ok(())
}

/// Waits for `child` to exit until `deadline`; whether it did.
fn wait_until(child: &mut Child, deadline: Instant) -> bool {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_go_to_the_backend_by_both_tunnels() {
        let s = encap_services(1);
        assert!(
            s.starts_with(
                "  - { name: gue, addresses: [198.18.0.1], ports: [8080], delivery: gue, \
                 backends: [{ ip: 198.18.0.21, mac: \"02:bb:00:00:00:01\" }] }\n"
            ),
            "{s}"
        );
        assert!(
            s.ends_with(
                "  - { name: ipip, addresses: [198.18.0.1], ports: [8081], delivery: ipip, \
                 backends: [{ ip: 198.18.0.21, mac: \"02:bb:00:00:00:01\" }] }\n"
            ),
            "{s}"
        );
        let e = expect(1, 1);
        assert_eq!(e.node_mac.to_string(), "02:00:00:00:00:01");
        assert_eq!(e.node_ip, node_ip(1));
        assert_eq!(e.backend_mac.to_string(), "02:bb:00:00:00:01");
    }
}
