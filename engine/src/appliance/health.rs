//! Backend health, agreed (appliance mode): every node checks every backend, says what it sees
//! in its heartbeats, and the coordinator turns the reports into one epoch-numbered
//! [`BackendTable`] that every node applies, so that no two nodes choose from different pools.
//!
//! - [`Hysteresis`]: one backend's checks on one node, `rise` successes to come up, `fall`
//!   failures to go down. A backend starts down: it takes new flows once it has answered.
//! - [`agree`]: the coordinator's rule. A backend is down when at least half of the nodes that
//!   report verdicts see it down (one of two is enough: a backend one appliance cannot reach is
//!   one whose health is in doubt), drained when any node holds an operator's drain of it.
//! - [`Checks`]: one node's checks of every backend, which follow the services as `reload`
//!   changes them: a backend that stays keeps its verdict, one added (or whose id now names
//!   another server) starts down, one removed is forgotten.
//! - [`spawn_checker`]: the thread that runs the rounds of checks (the only I/O here: each
//!   round's checks side by side, on short-lived threads) and publishes each node's local
//!   verdicts.
//!
//! The table changes only what new flows choose: a flow keeps its backend (the flow table
//! remembers it) whatever the table says, as Maglev does.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{BackendHealthConfig, Config, HealthConfig};

/// The agreed state of the backends: which are down or drained, under an epoch that only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTable {
    pub epoch: u64,
    /// Backends the cluster takes as failing, by their place in the configuration file
    /// ([`super::Backend::agreed`]: the nodes' common names).
    pub down: BTreeSet<u16>,
    /// Backends an operator drained (`drain-backend`), by place.
    pub drained: BTreeSet<u16>,
}

/// One node's report: what it sees down and the drains it holds. Inside the node (its
/// checker's verdicts) it names backends by the node's own ids; sent to the others, by place
/// ([`super::Services::agreed_report`]).
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
            epoch: self.epoch.saturating_add(1),
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

    /// New `rise` and `fall` (a reload changed them): the verdict and the run so far stay.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
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
    /// The backends `down` speaks of, by id and address: the latest targets, which
    /// [`LocalVerdicts::retarget`] sets at once (the checker takes them up at its next round).
    /// Locked before `down` when both are.
    checked: Mutex<Vec<(u16, IpAddr)>>,
    down: Mutex<BTreeSet<u16>>,
    /// Every backend has been checked enough times (`rise` or `fall`) for its verdict to mean
    /// something: before that, the node reports nothing.
    settled: std::sync::atomic::AtomicBool,
    /// The checks of services changed since the checker last looked ([`LocalVerdicts::retarget`]).
    next: Mutex<Option<Vec<Target>>>,
}

impl LocalVerdicts {
    /// The verdicts of a checker that starts on `targets`: every one down until it answers
    /// (see [`Hysteresis::new`]), nothing reported until the checks settle.
    pub fn new<'a>(targets: impl IntoIterator<Item = &'a Target>) -> LocalVerdicts {
        let checked: Vec<(u16, IpAddr)> = targets.into_iter().map(Target::server).collect();
        LocalVerdicts {
            down: Mutex::new(checked.iter().map(|&(id, _)| id).collect()),
            checked: Mutex::new(checked),
            ..LocalVerdicts::default()
        }
    }

    /// The services were published again (a `reload`, a MAC learned, an agreed table): from
    /// its next round, the checker checks the backends `config` and `services` name (the same
    /// ones, but after a reload).
    ///
    /// The verdicts follow at once, before the checker's next round: a backend the reload adds
    /// (or an id that now names another server) is down until it answers, one it removes is
    /// forgotten. (Until that round, the verdict of a new server on a reused id would otherwise
    /// be its predecessor's, and a new one would not be reported down.)
    pub fn retarget(&self, config: &Config, services: &super::Services) {
        self.retarget_to(targets(config, services));
    }

    /// [`LocalVerdicts::retarget`] to these targets.
    fn retarget_to(&self, next: Vec<Target>) {
        if let (Ok(mut checked), Ok(mut down)) = (self.checked.lock(), self.down.lock()) {
            let now: Vec<(u16, IpAddr)> = next.iter().map(Target::server).collect();
            down.retain(|id| now.iter().any(|(i, _)| i == id));
            down.extend(
                now.iter()
                    .filter(|server| !checked.contains(server))
                    .map(|(id, _)| *id),
            );
            *checked = now;
        }
        if let Ok(mut pending) = self.next.lock() {
            *pending = Some(next);
        }
    }

    /// After the checker took up new targets: `down` says each current target's verdict as
    /// `checks` has it. (Two reloads within one round: a server removed then put back on its
    /// id is new to [`LocalVerdicts::retarget`], down, but the checker never saw it leave and
    /// kept its verdict, up, which would never change again to clear it.)
    pub fn sync(&self, checks: &Checks) {
        if let (Ok(checked), Ok(mut down)) = (self.checked.lock(), self.down.lock()) {
            for (t, h) in &checks.states {
                if checked.contains(&t.server()) {
                    set_verdict(&mut down, t.id, h.up());
                }
            }
        }
    }

    /// A check of `t` changed its verdict to `up`: `down` follows unless `t` is no longer a
    /// target (a retarget came during the round: its verdict started over then).
    pub fn record(&self, t: &Target, up: bool) {
        if let (Ok(checked), Ok(mut down)) = (self.checked.lock(), self.down.lock()) {
            if checked.contains(&t.server()) {
                set_verdict(&mut down, t.id, up);
            }
        }
    }

    pub fn down(&self) -> BTreeSet<u16> {
        self.down.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The node's report: its verdicts once settled, else `None` (the drains it holds are the
    /// backend agreement's: [`crate::control::backends`]).
    pub fn report(&self) -> Option<Report> {
        self.settled
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| Report {
                down: self.down(),
                drained: BTreeSet::new(),
            })
    }
}

/// Backend `id` up or down in a node's set of those it sees down.
fn set_verdict(down: &mut BTreeSet<u16>, id: u16, up: bool) {
    if up {
        down.remove(&id);
    } else {
        down.insert(id);
    }
}

/// One backend to check: its id and the check (`rise` and `fall` in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: u16,
    pub name: String,
    pub check: HealthConfig,
}

impl Target {
    /// The server it checks: its id and address (the check's port and settings aside).
    fn server(&self) -> (u16, IpAddr) {
        (self.id, self.check.address.ip())
    }

    /// Its check's interval in nanoseconds.
    fn interval_ns(&self) -> u64 {
        u64::try_from(self.check.interval.0.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The checks `config` asks for, one per backend of a service with `backend_health`.
pub(super) fn targets(config: &Config, services: &super::Services) -> Vec<Target> {
    let mut out = Vec::new();
    for (s, rule) in config.services.iter().zip(services.rules()) {
        let Some(h) = &s.backend_health else {
            continue;
        };
        for b in &rule.backends {
            out.push(Target {
                id: b.id,
                name: b.name.clone(),
                check: check_config(h, SocketAddr::new(b.ip, h.port)),
            });
        }
    }
    out
}

/// One node's checks of the backends and their verdicts, sans I/O: the checker thread runs
/// each [`Target`]'s check and feeds the result to [`Checks::record`].
#[derive(Debug, Default)]
pub struct Checks {
    states: Vec<(Target, Hysteresis)>,
    /// Per server (id and address): when its next check is due (ns on the caller's clock) and
    /// how many checks it has had.
    schedule: std::collections::HashMap<(u16, IpAddr), (u64, u32)>,
}

/// What [`Checks::retarget`] changed in the verdicts: ids that start down (new backends, or ids
/// that now name another server: another address) and ids no longer checked (never down any
/// more).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retargeted {
    pub start_down: BTreeSet<u16>,
    pub forgotten: BTreeSet<u16>,
}

impl Checks {
    /// Checks of `targets`, every backend down until it answers.
    pub fn new(targets: Vec<Target>) -> Checks {
        let mut checks = Checks::default();
        checks.retarget(targets);
        checks
    }

    /// The targets to check from now on. A target with the id and the address it had keeps
    /// its verdict and its run (under the check's new settings, port included, if they
    /// changed); any other starts down, as at start-up.
    pub fn retarget(&mut self, targets: Vec<Target>) -> Retargeted {
        let mut old = std::mem::take(&mut self.states);
        let mut changes = Retargeted::default();
        for t in targets {
            // The same server (a new check port or path is still about it: its verdict goes on
            // rather than every backend of a service going down at once).
            let same = |o: &Target| o.id == t.id && o.check.address.ip() == t.check.address.ip();
            let state = match old.iter().position(|(o, _)| same(o)) {
                Some(i) => {
                    let mut h = old.swap_remove(i).1;
                    h.set_thresholds(t.check.rise, t.check.fall);
                    h
                }
                None => {
                    changes.start_down.insert(t.id);
                    Hysteresis::new(t.check.rise, t.check.fall)
                }
            };
            self.states.push((t, state));
        }
        for (o, _) in old {
            // An id still checked (under another address) started down above instead.
            if !self.states.iter().any(|(t, _)| t.id == o.id) {
                changes.forgotten.insert(o.id);
            }
        }
        let servers: BTreeSet<(u16, IpAddr)> =
            self.states.iter().map(|(t, _)| t.server()).collect();
        self.schedule.retain(|server, _| servers.contains(server));
        changes
    }

    /// The targets whose check is due at `now` (ns on the caller's clock), by index: each is
    /// checked every `interval` of its own service (on the grid of the caller's rounds, every
    /// [`Checks::interval`]), not at the shortest one, so that `rise` and `fall` count checks
    /// at the rate the configuration says.
    pub fn due(&self, now: u64) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&i| {
                let (t, _) = &self.states[i];
                // Due, or due later than its interval allows (a reload shortened it).
                self.schedule
                    .get(&t.server())
                    .is_none_or(|&(at, _)| at <= now || at - now > t.interval_ns())
            })
            .collect()
    }

    /// The `i`-th target's check started at `now`: the next one is due an interval later.
    pub fn checked(&mut self, i: usize, now: u64) {
        if let Some((t, _)) = self.states.get(i) {
            let entry = self.schedule.entry(t.server()).or_insert((0, 0));
            *entry = (
                now.saturating_add(t.interval_ns()),
                entry.1.saturating_add(1),
            );
        }
    }

    /// Every target has had enough checks (its `rise` or `fall`, the larger) for its verdict
    /// to mean something.
    pub fn settled(&self) -> bool {
        self.states.iter().all(|(t, _)| {
            self.schedule
                .get(&t.server())
                .is_some_and(|&(_, n)| n >= t.check.rise.max(t.check.fall))
        })
    }

    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.states.iter().map(|(t, _)| t)
    }

    /// Whether backend `id` is up by this node's checks (`None`: not checked).
    pub fn is_up(&self, id: u16) -> Option<bool> {
        self.states
            .iter()
            .find(|(t, _)| t.id == id)
            .map(|(_, h)| h.up())
    }

    /// The result of a check of the `i`-th target; `Some(up)` when its verdict changes.
    pub fn record(&mut self, i: usize, ok: bool) -> Option<bool> {
        self.states.get_mut(i)?.1.record(ok)
    }

    /// Time between rounds: the shortest interval of any target.
    pub fn interval(&self) -> Duration {
        self.states
            .iter()
            .map(|(t, _)| t.check.interval.0)
            .min()
            .unwrap_or(Duration::from_millis(500))
    }
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

/// Most backend checks a round runs side by side (on as many short-lived threads).
const CONCURRENT: usize = 64;

/// One round: every target's check, side by side ([`CONCURRENT`] threads, each taking the next
/// target as soon as its check ends), so that a round lasts about one timeout however
/// many backends time out (up to [`CONCURRENT`] of them) and a failed backend goes down within
/// `fall` intervals. (In fixed chunks of 64, as before, a round lasted a timeout for every chunk
/// that held a dead backend.) The results are in the targets' order.
fn check_round(targets: &[Target]) -> Vec<anyhow::Result<()>> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<anyhow::Result<()>>>> =
        targets.iter().map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, Relaxed);
        let Some(t) = targets.get(i) else {
            return;
        };
        let r = crate::health::check_once(&t.check);
        if let Ok(mut slot) = results[i].lock() {
            *slot = Some(r);
        }
    };
    std::thread::scope(|scope| {
        // A thread the system cannot start leaves its share to the others (if none starts,
        // the checker runs them itself).
        let helpers: Vec<_> = (0..targets.len().min(CONCURRENT))
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("backend-check".into())
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        if helpers.is_empty() {
            work();
        }
        // Joined here, a check that panicked leaves its target without a result (below)
        // rather than taking the checker down with it.
        for h in helpers {
            let _ = h.join();
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(anyhow::anyhow!("the check's thread panicked")))
        })
        .collect()
}

/// Starts the thread that checks every backend of `services` (by `config`'s `backend_health`)
/// and publishes the local verdicts; `None` when no service asks for checks (a `reload` that
/// adds some starts one then: `BackendWatch` in the runtime). A round every shortest `interval`
/// of the services checks the backends that are due ([`Checks::due`]) side by side;
/// [`LocalVerdicts::retarget`] changes what they check from the next round.
pub fn spawn_checker(
    config: &Config,
    services: &super::Services,
) -> std::io::Result<Option<Arc<LocalVerdicts>>> {
    let targets = targets(config, services);
    if targets.is_empty() {
        return Ok(None);
    }
    let mut checks = Checks::new(targets);
    let verdicts = Arc::new(LocalVerdicts::new(checks.targets()));
    let shared = Arc::clone(&verdicts);
    std::thread::Builder::new()
        .name("backend-health".into())
        .spawn(move || {
            let epoch = std::time::Instant::now();
            loop {
                let started = std::time::Instant::now();
                let now = u64::try_from(started.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
                if let Some(next) = shared.next.lock().ok().and_then(|mut n| n.take()) {
                    // The verdicts followed already (`LocalVerdicts::retarget`); `sync` mends
                    // what a second reload within the round made of them.
                    let changes = checks.retarget(next);
                    shared.sync(&checks);
                    for t in checks.targets() {
                        if changes.start_down.contains(&t.id) {
                            tracing::info!(backend = %t.name, "backend check: new, down until it answers");
                        }
                    }
                }
                let due = checks.due(now);
                let all: Vec<&Target> = checks.targets().collect();
                let targets: Vec<Target> = due.iter().map(|&i| all[i].clone()).collect();
                let results = check_round(&targets);
                for ((&i, t), result) in due.iter().zip(&targets).zip(results) {
                    checks.checked(i, now);
                    if let Some(up) = checks.record(i, result.is_ok()) {
                        shared.record(t, up);
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
                if checks.settled() {
                    shared
                        .settled
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(checks.interval().saturating_sub(started.elapsed()));
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

    /// An HTTP check of backend `id` at `address` every `interval`, `rise` and `fall` alike,
    /// with a generous timeout (the machine may be slow).
    fn target(id: u16, address: SocketAddr, interval: Duration, rise_fall: u32) -> Target {
        Target {
            id,
            name: format!("b{id}"),
            check: HealthConfig {
                address,
                address6: None,
                http_path: Some("/".into()),
                expect_status: 200,
                interval: crate::config::Span(interval),
                fast_interval: None,
                timeout: crate::config::Span(Duration::from_secs(20)),
                rise: rise_fall,
                fall: rise_fall,
            },
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

    /// A round runs its checks side by side: a server that answers only once every check of
    /// the round is connected at the same time passes them all (checked one after the other,
    /// the first would time out waiting, and no other would ever be answered).
    #[test]
    fn a_round_checks_every_backend_side_by_side() {
        use std::io::{Read, Write};
        const N: u16 = 6;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut waiting = Vec::new();
            while waiting.len() < usize::from(N) {
                let Ok((mut c, _)) = listener.accept() else {
                    return;
                };
                let mut request = [0u8; 256];
                let _ = c.read(&mut request);
                waiting.push(c);
            }
            for mut c in waiting {
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            }
        });
        // The timeout is generous: what matters is that all wait at once.
        let targets: Vec<Target> = (1..=N)
            .map(|id| target(id, address, Duration::from_millis(500), 1))
            .collect();
        let results = check_round(&targets);
        assert_eq!(results.len(), usize::from(N));
        for (t, r) in targets.iter().zip(&results) {
            assert!(r.is_ok(), "{}: {r:?}", t.name);
        }
        server.join().unwrap();
    }

    /// More targets than threads: every one checked, each result at its target's place (a
    /// refused port's failure where that backend is).
    #[test]
    fn a_round_of_more_backends_than_threads_keeps_their_order() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { return };
                let mut request = [0u8; 256];
                let _ = c.read(&mut request);
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            }
        });
        let n = CONCURRENT as u16 + 6;
        let targets: Vec<Target> = (1..=n)
            .map(|id| {
                let address = if id % 7 == 0 { down } else { up };
                target(id, address, Duration::from_millis(500), 1)
            })
            .collect();
        let results = check_round(&targets);
        assert_eq!(results.len(), usize::from(n));
        for (t, r) in targets.iter().zip(&results) {
            assert_eq!(r.is_ok(), t.id % 7 != 0, "{}: {r:?}", t.name);
        }
    }

    /// Each backend is checked at its own service's interval, not at the shortest one of any
    /// service (`rise` and `fall` count checks at the configured rate); the checks settle once
    /// every backend has had its `rise`/`fall` checks.
    #[test]
    fn each_backend_is_checked_at_its_own_interval() {
        let target = |id: u16, secs: u64| {
            let address = SocketAddr::from(([198, 18, 0, 20 + id as u8], 80));
            target(id, address, Duration::from_secs(secs), 2)
        };
        let mut checks = Checks::new(vec![target(1, 1), target(2, 3)]);
        assert_eq!(
            checks.interval(),
            Duration::from_secs(1),
            "rounds at the shortest"
        );
        let s = 1_000_000_000;
        let mut seen = Vec::new();
        for round in 0..7u64 {
            let due = checks.due(round * s);
            for &i in &due {
                checks.checked(i, round * s);
            }
            seen.push(due);
            if round == 2 {
                assert!(!checks.settled(), "backend 2 has had one check");
            }
        }
        assert_eq!(
            seen,
            [
                vec![0, 1],
                vec![0],
                vec![0],
                vec![0, 1],
                vec![0],
                vec![0],
                vec![0, 1]
            ]
        );
        assert!(checks.settled());
        // A reload's new server on id 2 starts its schedule over.
        let mut moved = target(2, 3);
        moved.check.address = SocketAddr::from(([198, 18, 0, 99], 80));
        checks.retarget(vec![target(1, 1), moved]);
        assert_eq!(checks.due(6 * s + s / 2), [1], "at once, backend 1 not yet");
        assert!(!checks.settled());
    }

    /// Two reloads within one round of checks: a backend removed, then put back on its id.
    /// The node's verdicts took it for new (down) at the second; the checker, which saw only
    /// the last targets, kept its verdict (up): `sync` makes them agree, else it stayed down.
    #[test]
    fn a_backend_removed_and_put_back_within_a_round_is_not_left_down() {
        let t = target(
            1,
            SocketAddr::from(([198, 18, 0, 21], 80)),
            Duration::from_secs(1),
            1,
        );
        let mut checks = Checks::new(vec![t.clone()]);
        let verdicts = LocalVerdicts::new(checks.targets());
        assert_eq!(checks.record(0, true), Some(true));
        verdicts.record(&t, true);
        assert!(verdicts.down().is_empty());
        verdicts.retarget_to(Vec::new());
        verdicts.retarget_to(vec![t.clone()]);
        assert_eq!(
            verdicts.down(),
            BTreeSet::from([1]),
            "new to the node's verdicts"
        );
        let changes = checks.retarget(vec![t]);
        assert!(changes.start_down.is_empty(), "the checker kept it");
        verdicts.sync(&checks);
        assert!(verdicts.down().is_empty(), "up, as its checks say");
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
