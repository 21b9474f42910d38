//! Backend health, agreed (appliance mode): every node checks every backend, says what it sees
//! in its heartbeats, and the coordinator turns the reports into one epoch-numbered
//! [`BackendTable`] that every node applies, so that no two nodes choose from different pools.
//!
//! - [`Hysteresis`]: one backend's checks on one node, `rise` successes to come up, `fall`
//!   failures to go down. A backend starts down: it takes new flows once it has answered.
//! - [`agree`]: the coordinator's rule. A backend is down when at least half of the nodes that
//!   report verdicts see it down (one of two is enough: a backend one appliance cannot reach is
//!   one whose health is in doubt), drained when any node's operator drained it.
//! - [`spawn_checker`]: the thread that runs the checks (the only I/O here) and publishes each
//!   node's local verdicts.
//!
//! The table changes only what new flows choose: a flow keeps its backend (the flow table
//! remembers it) whatever the table says, as Maglev does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{BackendHealthConfig, Config, HealthConfig};

/// The agreed state of the backends: which are down or drained, under an epoch that only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTable {
    pub epoch: u64,
    /// Backend ids the cluster takes as failing.
    pub down: BTreeSet<u16>,
    /// Backend ids an operator drained (`drain-backend`).
    pub drained: BTreeSet<u16>,
}

/// One node's report: what it sees down and what its operator drained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub down: BTreeSet<u16>,
    pub drained: BTreeSet<u16>,
}

/// The coordinator's rule over the reports of the live nodes that check (see the module doc).
/// `None` when nobody reports (the table stays as it is).
pub fn agree<'a>(reports: impl IntoIterator<Item = &'a Report>) -> Option<Report> {
    let reports: Vec<&Report> = reports.into_iter().collect();
    if reports.is_empty() {
        return None;
    }
    let mut votes = std::collections::BTreeMap::<u16, usize>::new();
    let mut drained = BTreeSet::new();
    for r in &reports {
        for id in &r.down {
            *votes.entry(*id).or_default() += 1;
        }
        drained.extend(r.drained.iter().copied());
    }
    let n = reports.len();
    let down = votes
        .into_iter()
        .filter(|(_, v)| 2 * v >= n)
        .map(|(id, _)| id)
        .collect();
    Some(Report { down, drained })
}

impl BackendTable {
    /// The next table if `agreed` differs from this one (the epoch moves on), else `None`.
    pub fn next(&self, agreed: &Report) -> Option<BackendTable> {
        (agreed.down != self.down || agreed.drained != self.drained).then(|| BackendTable {
            epoch: self.epoch + 1,
            down: agreed.down.clone(),
            drained: agreed.drained.clone(),
        })
    }
}

/// One backend's check results on one node, with `rise`/`fall` hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    up: bool,
    run: u32,
    rise: u32,
    fall: u32,
}

impl Hysteresis {
    /// Down until `rise` checks in a row succeed.
    pub fn new(rise: u32, fall: u32) -> Hysteresis {
        Hysteresis {
            up: false,
            run: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn up(&self) -> bool {
        self.up
    }

    /// One check's result; `Some(up)` when the verdict changes.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.run >= needed {
            self.up = ok;
            self.run = 0;
            return Some(ok);
        }
        None
    }
}

/// What a node's checker publishes: the backends it sees down (ids). Backends of services
/// without `backend_health` are never checked and never down.
#[derive(Debug, Default)]
pub struct LocalVerdicts {
    down: Mutex<BTreeSet<u16>>,
    /// Every backend has been checked enough times (`rise` or `fall`) for its verdict to mean
    /// something: before that, the node reports nothing.
    settled: std::sync::atomic::AtomicBool,
}

impl LocalVerdicts {
    pub fn down(&self) -> BTreeSet<u16> {
        self.down.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The node's report: its verdicts once settled (with `drained`), else `None`.
    pub fn report(&self, drained: &BTreeSet<u16>) -> Option<Report> {
        self.settled
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| Report {
                down: self.down(),
                drained: drained.clone(),
            })
    }
}

/// One backend to check: its id and the check.
#[derive(Debug, Clone)]
struct Target {
    id: u16,
    name: String,
    check: HealthConfig,
}

/// The checks `config` asks for, one per backend of a service with `backend_health`.
fn targets(config: &Config, services: &super::Services) -> Vec<(Target, u32, u32)> {
    let mut out = Vec::new();
    for (s, rule) in config.services.iter().zip(services.rules()) {
        let Some(h) = &s.backend_health else {
            continue;
        };
        for b in &rule.backends {
            out.push((
                Target {
                    id: b.id,
                    name: b.name.clone(),
                    check: check_config(h, SocketAddr::new(b.ip, h.port)),
                },
                h.rise,
                h.fall,
            ));
        }
    }
    out
}

fn check_config(h: &BackendHealthConfig, address: SocketAddr) -> HealthConfig {
    HealthConfig {
        address,
        address6: None,
        http_path: h.http_path.clone(),
        expect_status: h.expect_status,
        interval: h.interval,
        fast_interval: None,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
    }
}

/// Starts the thread that checks every backend of `services` (by `config`'s `backend_health`)
/// and publishes the local verdicts; `None` when no service asks for checks. Checks run one
/// after the other, each backend every `interval` of its service.
pub fn spawn_checker(
    config: &Config,
    services: &super::Services,
) -> std::io::Result<Option<Arc<LocalVerdicts>>> {
    let targets = targets(config, services);
    if targets.is_empty() {
        return Ok(None);
    }
    let verdicts = Arc::new(LocalVerdicts {
        // Down until they answer (see `Hysteresis::new`).
        down: Mutex::new(targets.iter().map(|(t, _, _)| t.id).collect()),
        settled: Default::default(),
    });
    let rounds_to_settle = targets
        .iter()
        .map(|(_, rise, fall)| (*rise).max(*fall))
        .max()
        .unwrap_or(1);
    let shared = Arc::clone(&verdicts);
    let interval = targets
        .iter()
        .map(|(t, _, _)| t.check.interval.0)
        .min()
        .unwrap_or(Duration::from_millis(500));
    std::thread::Builder::new()
        .name("backend-health".into())
        .spawn(move || {
            let mut states: Vec<(Target, Hysteresis)> = targets
                .into_iter()
                .map(|(t, rise, fall)| (t, Hysteresis::new(rise, fall)))
                .collect();
            let mut rounds = 0u32;
            loop {
                let started = std::time::Instant::now();
                for (t, h) in states.iter_mut() {
                    let result = crate::health::check_once(&t.check);
                    if let Some(up) = h.record(result.is_ok()) {
                        if let Ok(mut down) = shared.down.lock() {
                            if up {
                                down.remove(&t.id);
                            } else {
                                down.insert(t.id);
                            }
                        }
                        match &result {
                            Ok(()) => tracing::info!(backend = %t.name, "backend check: up"),
                            Err(e) => tracing::warn!(
                                backend = %t.name,
                                error = %format_args!("{e:#}"),
                                "backend check: down"
                            ),
                        }
                    }
                }
                rounds = rounds.saturating_add(1);
                if rounds == rounds_to_settle {
                    shared
                        .settled
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        })?;
    Ok(Some(verdicts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(down: &[u16], drained: &[u16]) -> Report {
        Report {
            down: down.iter().copied().collect(),
            drained: drained.iter().copied().collect(),
        }
    }

    #[test]
    fn hysteresis_starts_down_and_needs_runs() {
        let mut h = Hysteresis::new(2, 3);
        assert!(!h.up());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the failure run");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
    }

    #[test]
    fn half_the_checkers_take_a_backend_down_any_operator_drains_it() {
        let (a, b, c) = (report(&[1, 2], &[]), report(&[2], &[7]), report(&[], &[]));
        let agreed = agree([&a, &b, &c]).unwrap();
        assert_eq!(
            agreed,
            report(&[2], &[7]),
            "1 of 3 is not enough, 2 of 3 is"
        );
        let agreed = agree([&a, &c]).unwrap();
        assert_eq!(agreed.down, report(&[1, 2], &[]).down, "1 of 2 is half");
        assert_eq!(agree([]), None);
    }

    #[test]
    fn the_epoch_moves_only_on_change() {
        let t = BackendTable::default();
        let next = t.next(&report(&[3], &[])).unwrap();
        assert_eq!(next.epoch, 1);
        assert_eq!(next.next(&report(&[3], &[])), None);
        assert_eq!(next.next(&report(&[], &[])).unwrap().epoch, 2);
    }
}
