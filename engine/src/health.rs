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
//! RST than by a silent black hole. IPv4 only for the held refusals (the IPv6 path delivers the
//! RST).

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// One check: Ok if the service answered as expected.
pub(crate) fn check_once(cfg: &HealthConfig) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&cfg.address, cfg.timeout.0)
        .with_context(|| format!("connect {}", cfg.address))?;
    let Some(path) = &cfg.http_path else {
        return Ok(());
    };
    stream
        .set_read_timeout(Some(cfg.timeout.0))
        .and_then(|_| stream.set_write_timeout(Some(cfg.timeout.0)))
        .context("set the socket timeouts")?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: clonecluster-health\r\n\r\n",
        cfg.address.ip()
    )
    .context("send")?;
    let mut head = [0u8; 64];
    // With a socket timeout set, the kernel never restarts a read that a signal interrupted
    // (signal(7)), whatever SA_RESTART says: any signal to the process would fail the check.
    let deadline = std::time::Instant::now() + cfg.timeout.0;
    let n = loop {
        match stream.read(&mut head) {
            Ok(n) => break n,
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    && std::time::Instant::now() < deadline => {}
            Err(e) => return Err(anyhow::Error::new(e).context("read")),
        }
    };
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "not an HTTP answer: `{}`",
                line.lines().next().unwrap_or("").escape_debug()
            )
        })?;
    if status == cfg.expect_status {
        Ok(())
    } else {
        Err(anyhow!("status {status}, expected {}", cfg.expect_status))
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
