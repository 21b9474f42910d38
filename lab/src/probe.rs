//! The lab's connection probe: what a scenario (failover, join, drain) does to individual
//! connections, which `wrk`'s totals cannot tell.
//!
//! It runs in the client namespace (`clonecluster-lab lab-probe`, started by the lab) beside the
//! `wrk` load and records, per request, when it was sent, whether it succeeded and which node
//! answered (`GET /id` returns the node id):
//! - `keepalive`: a few long-lived keep-alive connections, each asking every `interval`; one that
//!   fails after a success is a *lost connection*, attributed to the node that served it last;
//!   the slot then reconnects;
//! - `new`: a few threads opening a fresh connection per request (`Connection: close`), so that
//!   new flows land on every bucket; a failure is a failed request, and a connect that took a
//!   SYN retransmission (≥ 900 ms) is counted as slow.
//!
//! Dual-stack (`--target6`, the cluster's IPv6 address): every other keep-alive slot (the odd
//! ones) and every other fresh connection of each `new` thread (the odd ones) go to the IPv6
//! target instead; each sample records its address family, and [`analyse`] counts the IPv6
//! requests apart ([`FamilyCounts`]) besides the totals, which cover both families.
//!
//! Times are wall-clock milliseconds since the Unix epoch, so the lab can put its own events
//! (the kill, the drain, the join) on the same axis. [`analyse`] turns a record into a verdict
//! and is plain Rust, unit-tested on made-up records.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Connect and read timeout of one probe request.
const TIMEOUT: Duration = Duration::from_secs(3);
/// A connect slower than this waited for a SYN retransmission (the first comes after 1 s).
pub const SLOW_CONNECT_MS: u64 = 900;

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub target: SocketAddr,
    /// The cluster's IPv6 address and port (dual-stack): half the connections go there.
    pub target6: Option<SocketAddr>,
    pub keepalive: usize,
    pub new_threads: usize,
    pub interval: Duration,
    pub duration: Duration,
}

/// One request of the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Wall-clock ms when the request (or the connect, for `new`) started.
    pub t_ms: u64,
    pub kind: Kind,
    /// Keep-alive slot, or the `new` thread.
    pub slot: u32,
    /// Which connection of the slot (a slot reconnects after a failure).
    pub conn: u32,
    /// The node that answered.
    pub node: Option<u8>,
    pub ok: bool,
    /// Connect time, for `new` requests.
    pub connect_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The address family of the connection (records without it are IPv4).
    #[serde(default)]
    pub family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Keepalive,
    New,
}

/// The address family of a probe connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv6() {
            Family::Ipv6
        } else {
            Family::Ipv4
        }
    }
}

/// Where connection `n` goes (a keep-alive slot's number, or a `new` thread's connection
/// count): the odd ones to `target6` if there is one, the rest to `target`.
pub fn target_for(opts: &ProbeOptions, n: u32) -> SocketAddr {
    match opts.target6 {
        Some(t6) if n % 2 == 1 => t6,
        _ => opts.target,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the probe for `opts.duration` (or until `stop` is set) and returns every sample, sorted
/// by time.
pub fn run(opts: &ProbeOptions, stop: &AtomicBool) -> Vec<Sample> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + opts.duration;
    std::thread::scope(|s| {
        for slot in 0..opts.keepalive {
            let samples = Arc::clone(&samples);
            s.spawn(move || keepalive_slot(opts, slot as u32, deadline, stop, &samples));
        }
        for slot in 0..opts.new_threads {
            let samples = Arc::clone(&samples);
            s.spawn(move || new_connections(opts, slot as u32, deadline, stop, &samples));
        }
    });
    let mut v = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    v.sort_by_key(|s| s.t_ms);
    v
}

fn running(deadline: Instant, stop: &AtomicBool) -> bool {
    Instant::now() < deadline && !stop.load(Ordering::Relaxed)
}

fn push(samples: &Mutex<Vec<Sample>>, s: Sample) {
    samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
}

fn keepalive_slot(
    opts: &ProbeOptions,
    slot: u32,
    deadline: Instant,
    stop: &AtomicBool,
    samples: &Mutex<Vec<Sample>>,
) {
    // A slot keeps its family across reconnects.
    let target = target_for(opts, slot);
    let family = Family::of(&target);
    let mut conn = 0;
    while running(deadline, stop) {
        let t_ms = now_ms();
        let stream = match connect(target) {
            Ok(s) => s,
            Err(e) => {
                push(
                    samples,
                    failure(t_ms, Kind::Keepalive, slot, conn, 0, e).of(family),
                );
                conn += 1;
                std::thread::sleep(opts.interval);
                continue;
            }
        };
        let mut reader = BufReader::new(stream);
        while running(deadline, stop) {
            let t_ms = now_ms();
            match request(&mut reader, true) {
                Ok(node) => push(
                    samples,
                    success(t_ms, Kind::Keepalive, slot, conn, node, 0).of(family),
                ),
                Err(e) => {
                    push(
                        samples,
                        failure(t_ms, Kind::Keepalive, slot, conn, 0, e).of(family),
                    );
                    break;
                }
            }
            std::thread::sleep(opts.interval);
        }
        conn += 1;
    }
}

fn new_connections(
    opts: &ProbeOptions,
    slot: u32,
    deadline: Instant,
    stop: &AtomicBool,
    samples: &Mutex<Vec<Sample>>,
) {
    let mut conn = 0;
    while running(deadline, stop) {
        let t_ms = now_ms();
        let target = target_for(opts, conn);
        let started = Instant::now();
        let result = connect(target).and_then(|s| {
            let connect_ms = started.elapsed().as_millis() as u64;
            let mut reader = BufReader::new(s);
            request(&mut reader, false).map(|node| (node, connect_ms))
        });
        let sample = match result {
            Ok((node, connect_ms)) => success(t_ms, Kind::New, slot, conn, node, connect_ms),
            Err(e) => failure(
                t_ms,
                Kind::New,
                slot,
                conn,
                started.elapsed().as_millis() as u64,
                e,
            ),
        };
        push(samples, sample.of(Family::of(&target)));
        conn += 1;
        std::thread::sleep(opts.interval);
    }
}

fn success(t_ms: u64, kind: Kind, slot: u32, conn: u32, node: u8, connect_ms: u64) -> Sample {
    Sample {
        t_ms,
        kind,
        slot,
        conn,
        node: Some(node),
        ok: true,
        connect_ms,
        error: String::new(),
        family: Family::Ipv4,
    }
}

fn failure(t_ms: u64, kind: Kind, slot: u32, conn: u32, connect_ms: u64, error: String) -> Sample {
    Sample {
        t_ms,
        kind,
        slot,
        conn,
        node: None,
        ok: false,
        connect_ms,
        error,
        family: Family::Ipv4,
    }
}

impl Sample {
    fn of(self, family: Family) -> Sample {
        Sample { family, ..self }
    }
}

fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// `GET /id` on an open connection; returns the node id in the body.
fn request(reader: &mut BufReader<TcpStream>, keep_alive: bool) -> Result<u8, String> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        reader.get_mut(),
        "GET /id HTTP/1.1\r\nHost: lab\r\nConnection: {connection}\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    let mut status = None;
    let mut length = None;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("read: connection closed".into());
        }
        let l = line.trim_end();
        if status.is_none() {
            status = l.split_whitespace().nth(1).map(str::to_owned);
        } else if l.is_empty() {
            break;
        } else if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    if status.as_deref() != Some("200") {
        return Err(format!("status {}", status.unwrap_or_default()));
    }
    let mut body = vec![0; length.ok_or("no content-length")?];
    std::io::Read::read_exact(reader, &mut body).map_err(|e| format!("read body: {e}"))?;
    String::from_utf8_lossy(&body)
        .trim()
        .parse()
        .map_err(|_| "the body is not a node id".into())
}

/// Writes samples as JSON lines.
pub fn write(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut out = String::new();
    for s in samples {
        out.push_str(&serde_json::to_string(s).map_err(std::io::Error::other)?);
        out.push('\n');
    }
    std::fs::write(path, out)
}

/// Reads what [`write`] wrote.
pub fn read(path: &Path) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// What a scenario did to connections, seen from the client.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdict {
    pub requests: usize,
    pub failed: usize,
    /// Keep-alive connections that failed after a success, after the event, by the node that
    /// served them last.
    pub lost_by_node: Vec<(u8, usize)>,
    /// `new` requests that failed.
    pub new_failed: usize,
    /// `new` requests that started after `settled_ms` and failed (must be 0).
    pub new_failed_after_settled: usize,
    /// `new` requests that started after `settled_ms`.
    pub new_after_settled: usize,
    /// `new` connects that waited for a SYN retransmission.
    pub slow_connects: usize,
    /// Last start of a failed or slow `new` request, in ms after the event (None: none).
    pub last_disturbed_ms: Option<u64>,
    /// Nodes that answered `new` requests after `settled_ms`.
    pub nodes_after_settled: Vec<u8>,
    /// The IPv6 requests among all these (a dual-stack probe; all zero otherwise).
    pub ipv6: FamilyCounts,
}

/// One address family's share of a record: the counts of [`Verdict`] for its requests alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FamilyCounts {
    /// Requests (keep-alive and `new`), and those that failed.
    pub requests: usize,
    pub failed: usize,
    /// `new` requests (a fresh connection each), and those that failed.
    pub new: usize,
    pub new_failed: usize,
    /// `new` requests that started after `settled_ms`, and those that failed (must be 0).
    pub new_after_settled: usize,
    pub new_failed_after_settled: usize,
    /// Keep-alive connections lost after the event (counted in `lost_by_node` too).
    pub lost: usize,
}

impl FamilyCounts {
    /// Keep-alive requests.
    pub fn keepalive(&self) -> usize {
        self.requests.saturating_sub(self.new)
    }
}

/// Judges a record: `event_ms` is when the lab acted, `settled_ms` when the engines said the
/// move was complete.
pub fn analyse(samples: &[Sample], event_ms: u64, settled_ms: u64) -> Verdict {
    let mut v = Verdict {
        requests: samples.len(),
        failed: samples.iter().filter(|s| !s.ok).count(),
        ..Verdict::default()
    };
    let v6 = |s: &&Sample| s.family == Family::Ipv6;
    v.ipv6.requests = samples.iter().filter(v6).count();
    v.ipv6.failed = samples.iter().filter(v6).filter(|s| !s.ok).count();
    // Keep-alive connections: (slot, conn) -> last node that answered.
    let mut last_node: std::collections::BTreeMap<(u32, u32), u8> = Default::default();
    for s in samples.iter().filter(|s| s.kind == Kind::Keepalive) {
        match (s.ok, s.node) {
            (true, Some(n)) => {
                last_node.insert((s.slot, s.conn), n);
            }
            (false, _) if s.t_ms >= event_ms => {
                if let Some(&n) = last_node.get(&(s.slot, s.conn)) {
                    if s.family == Family::Ipv6 {
                        v.ipv6.lost += 1;
                    }
                    match v.lost_by_node.iter_mut().find(|(id, _)| *id == n) {
                        Some(e) => e.1 += 1,
                        None => v.lost_by_node.push((n, 1)),
                    }
                }
            }
            _ => {}
        }
    }
    v.lost_by_node.sort_unstable();
    for s in samples.iter().filter(|s| s.kind == Kind::New) {
        let slow = s.connect_ms >= SLOW_CONNECT_MS;
        let ipv6 = s.family == Family::Ipv6;
        if ipv6 {
            v.ipv6.new += 1;
            if !s.ok {
                v.ipv6.new_failed += 1;
            }
        }
        if !s.ok {
            v.new_failed += 1;
        }
        if slow {
            v.slow_connects += 1;
        }
        if (!s.ok || slow) && s.t_ms >= event_ms {
            let after = s.t_ms - event_ms;
            v.last_disturbed_ms = Some(v.last_disturbed_ms.map_or(after, |m| m.max(after)));
        }
        if s.t_ms >= settled_ms {
            v.new_after_settled += 1;
            if !s.ok {
                v.new_failed_after_settled += 1;
            }
            if ipv6 {
                v.ipv6.new_after_settled += 1;
                if !s.ok {
                    v.ipv6.new_failed_after_settled += 1;
                }
            }
            if let Some(n) = s.node {
                if !v.nodes_after_settled.contains(&n) {
                    v.nodes_after_settled.push(n);
                }
            }
        }
    }
    v.nodes_after_settled.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_ms: u64, kind: Kind, slot: u32, conn: u32, node: Option<u8>, connect_ms: u64) -> Sample {
        Sample {
            t_ms,
            kind,
            slot,
            conn,
            node,
            ok: node.is_some(),
            connect_ms,
            error: if node.is_some() {
                String::new()
            } else {
                "read: reset".into()
            },
            family: Family::Ipv4,
        }
    }

    fn s6(t_ms: u64, kind: Kind, slot: u32, conn: u32, node: Option<u8>) -> Sample {
        Sample {
            family: Family::Ipv6,
            ..s(t_ms, kind, slot, conn, node, 1)
        }
    }

    #[test]
    fn every_other_connection_goes_to_the_ipv6_target() {
        let mut opts = ProbeOptions {
            target: "198.18.0.1:80".parse().unwrap(),
            target6: None,
            keepalive: 8,
            new_threads: 4,
            interval: Duration::from_millis(20),
            duration: Duration::from_secs(1),
        };
        assert!((0..6).all(|n| target_for(&opts, n) == opts.target));
        opts.target6 = Some("[2001:2::1]:80".parse().unwrap());
        let families: Vec<Family> = (0..4).map(|n| Family::of(&target_for(&opts, n))).collect();
        use Family::*;
        assert_eq!(families, [Ipv4, Ipv6, Ipv4, Ipv6]);
    }

    #[test]
    fn ipv6_requests_are_counted_apart_and_in_the_totals() {
        use Kind::*;
        let samples = vec![
            s(100, Keepalive, 0, 0, Some(1), 0),
            s6(100, Keepalive, 1, 0, Some(2)),
            s6(110, Keepalive, 3, 0, Some(1)),
            s6(150, New, 0, 1, Some(2)),
            // The event at 200: node 2's IPv6 keep-alive connection is lost, one IPv6 connect
            // to its buckets fails before the move, none after.
            s6(260, Keepalive, 1, 0, None),
            s6(270, Keepalive, 3, 0, Some(1)),
            s6(220, New, 1, 1, None),
            s(230, New, 0, 2, Some(1), 1),
            s6(400, New, 0, 3, Some(1)),
            s6(410, New, 1, 3, Some(1)),
            s(420, New, 1, 4, Some(1), 1),
        ];
        let v = analyse(&samples, 200, 350);
        assert_eq!((v.requests, v.failed), (11, 2));
        assert_eq!(v.lost_by_node, vec![(2, 1)]);
        assert_eq!((v.new_after_settled, v.new_failed_after_settled), (3, 0));
        assert_eq!(
            v.ipv6,
            FamilyCounts {
                requests: 8,
                failed: 2,
                new: 4,
                new_failed: 1,
                new_after_settled: 2,
                new_failed_after_settled: 0,
                lost: 1,
            }
        );
        assert_eq!(v.ipv6.keepalive(), 4);
        // A failed IPv6 connection after the move fails the totals too.
        let mut late = samples.clone();
        late.push(s6(500, New, 2, 0, None));
        let v = analyse(&late, 200, 350);
        assert_eq!(v.new_failed_after_settled, 1);
        assert_eq!(v.ipv6.new_failed_after_settled, 1);
        // An IPv4-only record has no IPv6 counts.
        let v4: Vec<Sample> = samples
            .iter()
            .map(|x| Sample {
                family: Family::Ipv4,
                ..x.clone()
            })
            .collect();
        assert_eq!(analyse(&v4, 200, 350).ipv6, FamilyCounts::default());
    }

    #[test]
    fn records_without_a_family_are_ipv4() {
        let line = r#"{"t_ms":1,"kind":"new","slot":0,"conn":0,"node":3,"ok":true,"connect_ms":2}"#;
        let sample: Sample = serde_json::from_str(line).unwrap();
        assert_eq!(sample.family, Family::Ipv4);
        let v6 = serde_json::to_string(&s6(1, Kind::New, 0, 1, Some(3))).unwrap();
        assert!(v6.contains(r#""family":"ipv6""#), "{v6}");
    }

    #[test]
    fn lost_connections_are_attributed_to_their_last_node() {
        use Kind::*;
        let samples = vec![
            s(100, Keepalive, 0, 0, Some(1), 0),
            s(100, Keepalive, 1, 0, Some(2), 0),
            s(150, Keepalive, 2, 0, Some(2), 0),
            // A failure before the event is not the event's doing.
            s(160, Keepalive, 2, 0, None, 0),
            s(250, Keepalive, 0, 0, Some(1), 0),
            s(260, Keepalive, 1, 0, None, 0),
            s(300, Keepalive, 1, 1, Some(1), 0),
            s(210, New, 0, 0, Some(1), 1000),
            s(220, New, 1, 0, None, 3000),
            s(400, New, 0, 1, Some(1), 1),
            s(420, New, 1, 1, Some(1), 1),
        ];
        let v = analyse(&samples, 200, 350);
        assert_eq!(v.requests, 11);
        assert_eq!(v.failed, 3);
        assert_eq!(v.lost_by_node, vec![(2, 1)]);
        assert_eq!(v.new_failed, 1);
        assert_eq!(v.slow_connects, 2);
        assert_eq!(v.last_disturbed_ms, Some(20));
        assert_eq!(v.new_after_settled, 2);
        assert_eq!(v.new_failed_after_settled, 0);
        assert_eq!(v.nodes_after_settled, vec![1]);
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("probe.jsonl");
        let samples = vec![
            s(1, Kind::New, 0, 0, Some(3), 2),
            s(2, Kind::Keepalive, 1, 0, None, 0),
            s6(3, Kind::New, 0, 1, Some(2)),
        ];
        write(&p, &samples).unwrap();
        assert_eq!(read(&p).unwrap(), samples);
        std::fs::write(&p, "{").unwrap();
        assert!(read(&p).unwrap_err().contains("probe.jsonl:1"));
    }

    #[test]
    fn the_probe_reads_node_ids_from_a_server() {
        // A tiny server on loopback answering like nginx serving /id, on IPv6 loopback too
        // where the machine has it (the probe is then dual-stack).
        let addr = serve_id("127.0.0.1:0").unwrap();
        let target6 = serve_id("[::1]:0");
        let opts = ProbeOptions {
            target: addr,
            target6,
            keepalive: 2,
            new_threads: 1,
            interval: Duration::from_millis(10),
            duration: Duration::from_millis(200),
        };
        let samples = run(&opts, &AtomicBool::new(false));
        assert!(samples.iter().any(|s| s.kind == Kind::Keepalive));
        assert!(samples.iter().any(|s| s.kind == Kind::New));
        assert!(
            samples.iter().all(|s| s.ok && s.node == Some(7)),
            "{samples:?}"
        );
        for kind in [Kind::Keepalive, Kind::New] {
            let v6 = samples
                .iter()
                .any(|s| s.kind == kind && s.family == Family::Ipv6);
            let v4 = samples
                .iter()
                .any(|s| s.kind == kind && s.family == Family::Ipv4);
            assert!(v4 && v6 == target6.is_some(), "{kind:?}: {samples:?}");
        }
    }

    /// A server on `bind` answering every request with node id 7; its address, or None if it
    /// cannot bind.
    fn serve_id(bind: &str) -> Option<SocketAddr> {
        let listener = std::net::TcpListener::bind(bind).ok()?;
        let addr = listener.local_addr().ok()?;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            let _ = r
                                .get_mut()
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n7\n");
                        }
                    }
                });
            }
        });
        Some(addr)
    }
}
