//! Application health check of the node's own service (config `health`): an HTTP GET with an
//! expected status, or a TCP connect, every `interval`, with `rise`/`fall` hysteresis. It runs on
//! its own thread and only publishes a verdict; the control thread drains the node when the
//! verdict turns unhealthy and undrains it when it recovers, and its watchdog reports a checker
//! that stopped running.
//!
//! # Refused connections
//!
//! Between the moment a service stops and the moment `fall` checks have failed, new
//! connections still reach this node, and its kernel answers their SYN with RST: the client
//! sees "connection refused" although the other nodes would have served it. The engine closes
//! that window with three pieces, all on the health-checked TCP port only:
//!
//! 1. **Hold the refusal.** While some other live node takes new flows, the data path drops the
//!    kernel's RST to a connection whose SYN it delivered and nothing else (counted as
//!    `dropped_frames_total{reason="service-refused"}`) and forgets the flow. The client sees
//!    nothing and retransmits its SYN after about a second, as TCP does for a lost SYN.
//! 2. **Check now.** A refusal is live evidence: the control thread wakes the checker at once
//!    (like HAProxy's `observe layer4`), and while a verdict is changing the checker runs every
//!    `fast_interval` instead of `interval` (HAProxy's `fastinter`). The node is failing about
//!    `(fall - 1) x fast_interval` after the first refused SYN instead of up to
//!    `fall x (interval + timeout)` after the service stopped (the lab, with `fall: 3` and a
//!    100 ms fast interval: 0.1-0.3 s).
//! 3. **Refuse, announce, drain.** A failing node takes no new TCP connection (its SYNs are
//!    dropped: `refuse_new`), announces it in its heartbeats (`refusing`), and drains through the
//!    lossless handoff. Nodes learning its buckets do not count a SYN of an unknown flow as the
//!    failing node's (it refuses it), so after acquire they take the client's next SYN
//!    retransmission. Established connections keep going to the failing node until they end.
//!
//! The client's connection is delayed by one or two SYN retransmissions (1 s, then 2 s more)
//! instead of failing. With no other node to take the flow (a node alone, or every node
//! failing), nothing is held back and nothing is refused: a client is better served by a quick
//! RST than by a silent black hole. Both address families are covered: the refusals are held
//! on IPv4 and IPv6 alike, and a dual-stack service is checked on its IPv6 address too
//! (`health.address6`), so that a service that stops answering on one family only still
//! drains its node.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

pub(crate) use crate::config::HealthConfig;

impl HealthConfig {
    /// The interval between checks while a verdict is changing.
    pub(crate) fn fast_interval(&self) -> Duration {
        self.fast_interval
            .map_or(self.interval.0 / 4, |s| s.0)
            .clamp(Duration::from_millis(1), self.interval.0)
    }

    /// The addresses every check asks: `address`, and `address6` for a dual-stack service.
    pub(crate) fn addresses(&self) -> impl Iterator<Item = SocketAddr> {
        std::iter::once(self.address).chain(self.address6)
    }
}

/// What the checker publishes.
#[derive(Debug)]
pub(crate) struct Health {
    healthy: AtomicBool,
    /// The service has answered at least once.
    came_up: AtomicBool,
    /// Completed checks, and of those the failed ones.
    checks: AtomicU64,
    failures: AtomicU64,
    /// The checker thread, to wake it for an immediate check.
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// Milliseconds since the checker started, at its last completed check (the watchdog).
    last_check_ms: AtomicU64,
    started: Instant,
}

impl Health {
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Whether the service has answered at least once since the node started.
    pub(crate) fn came_up(&self) -> bool {
        self.came_up.load(Relaxed)
    }

    /// Completed checks and failed checks since the start.
    pub(crate) fn checks(&self) -> (u64, u64) {
        (self.checks.load(Relaxed), self.failures.load(Relaxed))
    }

    /// Runs the next check now (live traffic showed the service refusing a connection).
    pub(crate) fn check_now(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// How long ago the checker last completed a check.
    pub(crate) fn since_last_check(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_check_ms.load(Relaxed)))
    }
}

/// One check: Ok if the service answered as expected on every address it is checked on
/// ([`HealthConfig::addresses`]: a dual-stack service must answer on both), one after the
/// other, each within `timeout`.
pub(crate) fn check_once(cfg: &HealthConfig) -> anyhow::Result<()> {
    cfg.addresses()
        .try_for_each(|address| check_at(cfg, address))
}

/// The check on one address, all of it (connect, request, answer) within `timeout`: a server
/// that answers a byte at a time fails it as one that never answers does (a timeout per read
/// would let it hold the check, and the round, for as long as it dribbles).
fn check_at(cfg: &HealthConfig, address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + cfg.timeout.0;
    let late = || {
        anyhow!(
            "{address}: no full answer within {}",
            humantime::format_duration(cfg.timeout.0)
        )
    };
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(late)
    };
    let mut stream = TcpStream::connect_timeout(&address, cfg.timeout.0)
        .with_context(|| format!("connect {address}"))?;
    let Some(path) = &cfg.http_path else {
        return Ok(());
    };
    stream
        .set_write_timeout(Some(left()?))
        .context("set the socket timeouts")?;
    // One write: the request in one segment.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: clonecluster-health\r\n\r\n",
        host = HostHeader(address.ip())
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send to {address}"))?;
    let mut head = [0u8; 64];
    // The status line may come in several segments (a server writing it piece by piece):
    // read until its end, a full buffer or the server's close, each read waiting only for what
    // is left of the check's time. (With a socket timeout set, the kernel never restarts a
    // read that a signal interrupted, whatever SA_RESTART says (signal(7)): it is read again.)
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        stream
            .set_read_timeout(Some(left()?))
            .context("set the socket timeouts")?;
        match stream.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("read from {address}"))),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "{address}: not an HTTP answer: `{}`",
                line.lines().next().unwrap_or("").escape_debug()
            )
        })?;
    if status == cfg.expect_status {
        Ok(())
    } else {
        Err(anyhow!(
            "{address}: status {status}, expected {}",
            cfg.expect_status
        ))
    }
}

/// An address as the `Host` header writes it: an IPv6 address in brackets (RFC 7230 5.4).
struct HostHeader(IpAddr);

impl std::fmt::Display for HostHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// Starts the checker thread. The service counts as failing until it has answered `rise`
/// checks in a row (a node whose service never came up must not take a share: DESIGN.md,
/// "Liveness"; failures until then count towards nothing), then healthy, and failing again
/// after `fall` checks in a row fail.
pub(crate) fn spawn(node: u8, cfg: HealthConfig) -> std::io::Result<Arc<Health>> {
    let health = Arc::new(Health {
        healthy: AtomicBool::new(false),
        came_up: AtomicBool::new(false),
        checks: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        thread: std::sync::OnceLock::new(),
        last_check_ms: AtomicU64::new(0),
        started: Instant::now(),
    });
    let shared = Arc::clone(&health);
    let handle = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            let (mut ok_run, mut fail_run) = (0u32, 0u32);
            // Until the service has answered `rise` times in a row it is starting: not healthy,
            // but its failures are not a transition (nothing to log, nothing towards `fall`).
            let mut came_up = false;
            loop {
                let result = check_once(&cfg);
                let healthy = shared.healthy.load(Relaxed);
                shared.checks.fetch_add(1, Relaxed);
                if result.is_err() {
                    shared.failures.fetch_add(1, Relaxed);
                }
                match &result {
                    Err(_) if !came_up => ok_run = 0,
                    Ok(()) if !came_up && ok_run + 1 < cfg.rise => ok_run += 1,
                    Ok(()) if !came_up => {
                        came_up = true;
                        ok_run += 1;
                        shared.healthy.store(true, Relaxed);
                        shared.came_up.store(true, Relaxed);
                        tracing::info!(
                            node,
                            from = "starting",
                            to = "healthy",
                            "health transition: service came up"
                        );
                    }
                    Ok(()) => {
                        ok_run += 1;
                        fail_run = 0;
                        if !healthy && ok_run >= cfg.rise {
                            shared.healthy.store(true, Relaxed);
                            tracing::info!(
                                node,
                                checks = ok_run,
                                from = "failing",
                                to = "healthy",
                                "health transition: service healthy again"
                            );
                        }
                    }
                    Err(e) => {
                        fail_run += 1;
                        ok_run = 0;
                        if healthy && fail_run >= cfg.fall {
                            shared.healthy.store(false, Relaxed);
                            tracing::warn!(
                                node,
                                checks = fail_run,
                                error = %format_args!("{e:#}"),
                                from = "healthy",
                                to = "failing",
                                "health transition: service failing"
                            );
                        }
                    }
                }
                shared
                    .last_check_ms
                    .store(shared.started.elapsed().as_millis() as u64, Relaxed);
                // A verdict on its way to change is confirmed quickly; a steady one is re-checked
                // every interval. `check_now` cuts the wait short.
                let changing = (healthy && fail_run > 0 && fail_run < cfg.fall)
                    || (!healthy && ok_run > 0 && ok_run < cfg.rise);
                let wait = if changing {
                    cfg.fast_interval()
                } else {
                    cfg.interval.0
                };
                std::thread::park_timeout(wait);
            }
        })?;
    let _ = health.thread.set(handle.thread().clone());
    Ok(health)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::config::Span;

    /// A one-connection-at-a-time HTTP server on `listener` answering `status`, on a thread.
    fn serve(listener: TcpListener, status: u16) {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                // The whole request first: closing with unread bytes would reset the connection.
                let mut request = Vec::new();
                let mut chunk = [0u8; 512];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(stream, "HTTP/1.0 {status} X\r\n\r\n");
            }
        });
    }

    fn config(address: SocketAddr, address6: Option<SocketAddr>) -> HealthConfig {
        HealthConfig {
            address,
            address6,
            http_path: Some("/".into()),
            expect_status: 200,
            interval: Span(Duration::from_millis(500)),
            fast_interval: None,
            timeout: Span(Duration::from_millis(500)),
            rise: 1,
            fall: 1,
        }
    }

    /// A server that answers one byte at a time, each within the timeout but the whole answer
    /// not, fails the check: the timeout bounds the check, not each read.
    #[test]
    fn a_dribbled_answer_fails_the_check() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut request = [0u8; 256];
            let _ = stream.read(&mut request);
            // 19 bytes 200 ms apart: 3.8 s in all, against a timeout of 500 ms.
            for b in b"HTTP/1.0 200 OK\r\n\r\n" {
                std::thread::sleep(Duration::from_millis(200));
                if stream.write_all(&[*b]).is_err() {
                    return;
                }
            }
        });
        let e = check_once(&config(address, None)).unwrap_err();
        assert!(format!("{e:#}").contains("no full answer within"), "{e:#}");
    }

    /// A dual-stack service answers only if it answers on both addresses: a service up on IPv4
    /// alone fails the check, which names the IPv6 address.
    #[test]
    fn a_dual_stack_check_needs_both_addresses() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let Ok(v6) = TcpListener::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        };
        let (a4, a6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
        serve(v4, 200);
        assert!(check_once(&config(a4, None)).is_ok());
        // The IPv6 service answers, then stops listening (refused).
        serve(v6, 200);
        check_once(&config(a4, Some(a6))).unwrap();
        let closed = TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap();
        let e = check_once(&config(a4, Some(closed))).unwrap_err();
        assert!(format!("{e:#}").contains(&closed.to_string()), "{e:#}");
        // A wrong status on IPv6 alone fails too.
        let wrong = TcpListener::bind("[::1]:0").unwrap();
        let wrong_at = wrong.local_addr().unwrap();
        serve(wrong, 503);
        let e = check_once(&config(a4, Some(wrong_at))).unwrap_err();
        assert!(format!("{e:#}").contains("status 503"), "{e:#}");
        assert_eq!(HostHeader(a6.ip()).to_string(), "[::1]");
    }
}
