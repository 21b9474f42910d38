//! Application health check of the node's own service (config `health`): an HTTP GET with an
//! expected status, or a TCP connect, every `interval`, with `rise`/`fall` hysteresis. It runs on
//! its own thread and only publishes a verdict; the control thread drains the node when the
//! verdict turns unhealthy and undrains it when it recovers, and its watchdog reports a checker
//! that stopped running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Span;

/// The `health` section of a node's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `GET path` on `address` must answer with `expect_status`. Leave out `http_path` for a
    /// plain TCP connect check.
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    #[serde(default = "default_status")]
    pub expect_status: u16,
    #[serde(default = "default_interval")]
    pub interval: Span,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Consecutive successes that make a failing service healthy again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy service failing.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_status() -> u16 {
    200
}
fn default_interval() -> Span {
    Span(Duration::from_millis(500))
}
fn default_timeout() -> Span {
    Span(Duration::from_millis(300))
}
fn default_rise() -> u32 {
    3
}
fn default_fall() -> u32 {
    2
}

/// What the checker publishes.
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    /// Milliseconds since the checker started, at its last completed check (the watchdog).
    last_check_ms: AtomicU64,
    started: Instant,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// How long ago the checker last completed a check.
    pub fn since_last_check(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_check_ms.load(Relaxed)))
    }
}

/// One check: Ok if the service answered as expected.
pub fn check_once(cfg: &HealthConfig) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&cfg.address, cfg.timeout.0)
        .map_err(|e| format!("connect {}: {e}", cfg.address))?;
    let Some(path) = &cfg.http_path else {
        return Ok(());
    };
    stream
        .set_read_timeout(Some(cfg.timeout.0))
        .and_then(|_| stream.set_write_timeout(Some(cfg.timeout.0)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: clonecluster-health\r\n\r\n",
        cfg.address.ip()
    )
    .map_err(|e| format!("send: {e}"))?;
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
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if status == cfg.expect_status {
        Ok(())
    } else {
        Err(format!("status {status}, expected {}", cfg.expect_status))
    }
}

/// Starts the checker thread. The service counts as healthy until, after it first answered,
/// `fall` checks in a row fail.
pub fn spawn(node: u8, cfg: HealthConfig) -> std::io::Result<Arc<Health>> {
    let health = Arc::new(Health {
        healthy: AtomicBool::new(true),
        last_check_ms: AtomicU64::new(0),
        started: Instant::now(),
    });
    let shared = Arc::clone(&health);
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            let (mut ok_run, mut fail_run) = (0u32, 0u32);
            // Until the service has answered once it is starting, not failing: a node whose
            // engine starts before its service must not drain itself at once.
            let mut came_up = false;
            loop {
                let result = check_once(&cfg);
                let healthy = shared.healthy.load(Relaxed);
                came_up |= result.is_ok();
                match &result {
                    Err(_) if !came_up => {}
                    Ok(()) => {
                        ok_run += 1;
                        fail_run = 0;
                        if !healthy && ok_run >= cfg.rise {
                            shared.healthy.store(true, Relaxed);
                            tracing::info!(node, checks = ok_run, "health check: service healthy again");
                        }
                    }
                    Err(e) => {
                        fail_run += 1;
                        ok_run = 0;
                        if healthy && fail_run >= cfg.fall {
                            shared.healthy.store(false, Relaxed);
                            tracing::warn!(node, checks = fail_run, error = %e, "health check: service failing");
                        }
                    }
                }
                shared
                    .last_check_ms
                    .store(shared.started.elapsed().as_millis() as u64, Relaxed);
                std::thread::sleep(cfg.interval.0);
            }
        })?;
    Ok(health)
}
