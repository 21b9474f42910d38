//! Helpers shared by the benchmarks that drive the engine and `dpdk-testpmd` as processes.

#![allow(dead_code)]

use std::process::{Child, Command};

/// An environment variable parsed as `T`, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Seconds per run (`CC_BENCH_SECS`, default 3).
pub fn secs() -> u64 {
    env_or("CC_BENCH_SECS", 3)
}

/// The forwarding core (`CC_BENCH_CORE`, default 1).
pub fn core() -> u32 {
    env_or("CC_BENCH_CORE", 1)
}

/// Rounds per program (`CC_BENCH_ROUNDS`, default 3).
pub fn rounds() -> usize {
    env_or("CC_BENCH_ROUNDS", 3)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Stops testpmd (SIGINT, by PID) and averages its per-second readings, the first (warm-up)
/// left out.
pub fn stop_and_average(child: &mut Child, readings: &[f64]) -> Option<f64> {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .ok()?;
    let _ = child.wait();
    let steady = readings.get(1..)?;
    if steady.is_empty() {
        return None;
    }
    Some(steady.iter().sum::<f64>() / steady.len() as f64)
}
