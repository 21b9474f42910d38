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
    interrupt(child);
    let steady = readings.get(1..)?;
    if steady.is_empty() {
        return None;
    }
    Some(steady.iter().sum::<f64>() / steady.len() as f64)
}

/// Stops a testpmd by its PID as Ctrl-C would (it prints its final statistics and releases
/// its ports), and waits for it: killed if it has not exited after 20 s.
pub fn interrupt(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether the EAL can have `mem_mb` MiB on hugepages: a mounted hugetlbfs and enough free
/// pages of its size. `want == false` (for A/B runs) says no regardless.
pub fn use_hugepages(mem_mb: u32, want: bool) -> bool {
    if !want {
        return false;
    }
    match free_hugepage_mib() {
        Some(free) if free >= u64::from(mem_mb) + 64 => true,
        Some(free) => {
            eprintln!(
                "hugepages: {free} MiB free, {mem_mb} MiB needed: running with --no-huge \
                 (reserve more to use them)"
            );
            false
        }
        None => false,
    }
}

/// The EAL's memory arguments for `mem_mb` MiB, on hugepages or with `--no-huge` (4 KiB
/// pages). With hugepages, `--huge-unlink` leaves no files behind, so the pages return to the
/// pool when the process exits.
pub fn eal_memory(mem_mb: u32, huge: bool) -> Vec<String> {
    let first = if huge { "--huge-unlink" } else { "--no-huge" };
    vec![first.to_owned(), "-m".to_owned(), mem_mb.to_string()]
}

/// Free MiB of the default-size hugepages, if a hugetlbfs is mounted for them.
fn free_hugepage_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (free, size_kb) = (field("HugePages_Free:")?, field("Hugepagesize:")?);
    if free == 0 {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
    {
        eprintln!("hugepages: {free} free but no hugetlbfs mounted: running with --no-huge");
        return None;
    }
    Some(free * size_kb / 1024)
}
