//! The check scheduler: one tokio task per target on a jittered interval,
//! consecutive results counted against rise/fall, threshold crossings sent
//! as `HealthEvent`s; a shared semaphore bounds checks in flight.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, Hash, Hasher, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{Semaphore, mpsc::UnboundedSender},
    task::JoinHandle,
    time::Instant,
};
use tracing::{Instrument, debug, info, warn};

use super::{CheckError, CheckSpec, Probe, Target, sanitize_reason};

/// Floor for the check interval, so a zero in the config cannot spin a core.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// A change of a backend's health, sent when rise/fall thresholds are crossed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: String,
    pub backend: SocketAddr,
    pub healthy: bool,
    pub reason: String,
}

/// Every check result: (service, backend, "success" | "failure" | "timeout").
pub type ResultHook = Arc<dyn Fn(&str, SocketAddr, &'static str) + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// The most recent failure, kept after later successes.
    pub last_error: Option<String>,
    /// Checks completed since the target (or its spec) was set.
    pub checks: u64,
}

impl BackendHealth {
    fn new(healthy: bool) -> Self {
        BackendHealth {
            healthy,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
            checks: 0,
        }
    }
}

/// What a target's task shares with the `Checker`. `retired` is set under
/// the lock before the task is aborted, so a task caught mid-check can
/// neither change the view nor send an event afterwards.
struct Shared {
    health: BackendHealth,
    retired: bool,
    /// Check at once, and let the first result decide the verdict (a fresh
    /// verdict, reported as an event when it differs from the assumed one).
    decisive: bool,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    // Nothing panics while holding this lock, but never cascade a panic.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Running {
    spec: CheckSpec,
    shared: SharedRef,
    task: JoinHandle<()>,
}

impl Running {
    fn stop(self) {
        lock(&self.shared).retired = true;
        self.task.abort();
    }
}

/// Where a target that starts (or restarts with another spec) begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Healthy, first check after a jittered delay: a backend never seen.
    New,
    /// A verdict known from before (kept across a restart): counted from
    /// zero against rise and fall, so a backend known down needs `rise`
    /// passing checks to come back.
    Known(bool),
    /// Assumed `healthy` until the first check, which runs at once and
    /// decides the verdict on its own (reported as an event when it differs):
    /// a backend re-activated, or whose check changed.
    Fresh(bool),
}

/// Owns one check task per target.
pub struct Checker {
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    on_result: ResultHook,
    targets: HashMap<(String, SocketAddr), Running>,
    /// Service addresses probes must not leave from (see `source`).
    avoid: ServiceAddrs,
}

type ServiceAddrs = Arc<std::sync::RwLock<Arc<HashSet<IpAddr>>>>;

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("targets", &self.targets.len())
            .field("available_permits", &self.semaphore.available_permits())
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// `max_concurrent` bounds checks in flight across all targets (0 is
    /// taken as 1).
    pub fn new(
        max_concurrent: usize,
        events: UnboundedSender<HealthEvent>,
        on_result: ResultHook,
    ) -> Self {
        let permits = max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        Checker {
            semaphore: Arc::new(Semaphore::new(permits)),
            events,
            on_result,
            targets: HashMap::new(),
            avoid: Default::default(),
        }
    }

    /// The service addresses of this host: a probe the kernel would send
    /// from one of them is bound to another address instead.
    pub fn set_service_addresses(&self, addrs: HashSet<IpAddr>) {
        if let Ok(mut a) = self.avoid.write() {
            *a = Arc::new(addrs);
        }
    }

    /// Replaces the set of targets: starts tasks for new ones, stops removed
    /// ones, restarts changed ones (a changed spec resets the counters but
    /// keeps the healthy flag and last error); unchanged targets keep running
    /// undisturbed. If a (service, backend) pair appears twice, the last one
    /// wins. Must be called from within a tokio runtime.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        self.set_targets_from(targets, |_| Start::New);
    }

    /// Like [`Checker::set_targets`], with `start` telling where a target
    /// that is not running yet begins; a running target whose spec changed
    /// keeps its healthy flag, and gets a decisive first check at once when
    /// `start` says [`Start::Fresh`].
    pub fn set_targets_from(
        &mut self,
        targets: Vec<Target>,
        start: impl Fn(&(String, SocketAddr)) -> Start,
    ) {
        let mut wanted: HashMap<(String, SocketAddr), Target> = HashMap::new();
        for target in targets {
            let key = (target.service.clone(), target.backend);
            if let Some(dup) = wanted.insert(key, target) {
                warn!(
                    service = %dup.service,
                    backend = %dup.backend,
                    "duplicate health check target; the last one wins"
                );
            }
        }

        let mut old = std::mem::take(&mut self.targets);
        for (key, target) in wanted {
            let begin = start(&key);
            let (healthy, last_error, decisive) = match old.remove(&key) {
                Some(running) if running.spec == target.spec => {
                    self.targets.insert(key, running);
                    continue;
                }
                Some(running) => {
                    let carried = {
                        let s = lock(&running.shared);
                        (
                            s.health.healthy,
                            s.health.last_error.clone(),
                            matches!(begin, Start::Fresh(_)),
                        )
                    };
                    running.stop();
                    carried
                }
                // A new target starts healthy so traffic flows at once.
                None => match begin {
                    Start::New => (true, None, false),
                    Start::Known(h) => (h, None, false),
                    Start::Fresh(h) => (h, None, true),
                },
            };
            let mut health = BackendHealth::new(healthy);
            health.last_error = last_error;
            let running = self.start(target, health, decisive);
            self.targets.insert(key, running);
        }
        for (_, running) in old {
            running.stop();
        }
    }

    /// Current view of every target, keyed by (service, backend).
    pub fn status(&self) -> HashMap<(String, SocketAddr), BackendHealth> {
        self.targets
            .iter()
            .map(|(key, running)| (key.clone(), lock(&running.shared).health.clone()))
            .collect()
    }

    fn start(&self, target: Target, health: BackendHealth, decisive: bool) -> Running {
        let shared = Arc::new(Mutex::new(Shared {
            health,
            retired: false,
            decisive,
        }));
        let span = tracing::info_span!(
            "health",
            service = %target.service,
            backend = %target.backend,
        );
        let spec = target.spec.clone();
        let task = tokio::spawn(
            run_target(
                target,
                shared.clone(),
                self.semaphore.clone(),
                self.events.clone(),
                self.on_result.clone(),
                self.avoid.clone(),
            )
            .instrument(span),
        );
        Running { spec, shared, task }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, running) in self.targets.drain() {
            running.stop();
        }
    }
}

/// The life of one target: a random first delay, then a check every
/// interval (±10%), measured from the start of the previous one.
async fn run_target(
    target: Target,
    shared: SharedRef,
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    on_result: ResultHook,
    avoid: ServiceAddrs,
) {
    let spec = &target.spec;
    let interval = spec.interval.max(MIN_INTERVAL);
    if !lock(&shared).decisive {
        tokio::time::sleep(scale(interval, random_fraction(&target, 0))).await;
    }

    // Built once (TLS config, CA file) and kept while it works.
    let mut probe: Option<Probe> = None;
    for round in 1u64.. {
        let started = Instant::now();
        let Ok(permit) = semaphore.acquire().await else {
            return;
        };
        let prepared = match probe.take() {
            Some(p) => Ok(p),
            None => Probe::prepare_off_runtime(&spec.kind, target.backend).await,
        };
        let result = match prepared {
            Ok(p) => {
                let avoid = avoid.read().map(|a| a.clone()).unwrap_or_default();
                let source = crate::source::probe_source(target.backend, &avoid);
                let result = p.run(target.backend, spec.timeout, source).await;
                probe = Some(p);
                result
            }
            Err(e) => Err(e),
        };
        drop(permit);

        let Some(outcome) = record(&target, &shared, &events, result) else {
            return;
        };
        on_result(&target.service, target.backend, outcome);

        let period = scale(interval, 0.9 + 0.2 * random_fraction(&target, round));
        tokio::time::sleep(period.saturating_sub(started.elapsed())).await;
    }
}

/// Applies one result to the shared state and sends an event when a
/// threshold is crossed. Returns the hook's outcome, or `None` if the target
/// has been retired.
fn record(
    target: &Target,
    shared: &SharedRef,
    events: &UnboundedSender<HealthEvent>,
    result: Result<(), CheckError>,
) -> Option<&'static str> {
    let rise = target.spec.rise.max(1);
    let fall = target.spec.fall.max(1);
    let mut s = lock(shared);
    if s.retired {
        return None;
    }
    let decisive = std::mem::take(&mut s.decisive);
    let h = &mut s.health;
    h.checks = h.checks.saturating_add(1);
    let (outcome, change) = match result {
        Ok(()) if decisive => {
            h.consecutive_ok = h.consecutive_ok.saturating_add(1);
            h.consecutive_fail = 0;
            let up = !h.healthy;
            (
                "success",
                up.then(|| "the first check of a fresh verdict passed".to_string()),
            )
        }
        Ok(()) => {
            h.consecutive_ok = h.consecutive_ok.saturating_add(1);
            h.consecutive_fail = 0;
            let up = !h.healthy && h.consecutive_ok >= rise;
            (
                "success",
                up.then(|| format!("{rise} consecutive checks passed")),
            )
        }
        Err(e) => {
            h.consecutive_fail = h.consecutive_fail.saturating_add(1);
            h.consecutive_ok = 0;
            let outcome = match e {
                CheckError::Timeout(_) => "timeout",
                _ => "failure",
            };
            debug!(error = %e, label = e.label(), "health check failed");
            let down = h.healthy && (decisive || h.consecutive_fail >= fall);
            let reason = down.then(|| {
                sanitize_reason(&if decisive {
                    format!("the first check of a fresh verdict failed: {e}")
                } else {
                    format!("{fall} consecutive checks failed; last: {e}")
                })
            });
            h.last_error = Some(sanitize_reason(&e.to_string()));
            (outcome, reason)
        }
    };
    if let Some(reason) = change {
        h.healthy = !h.healthy;
        if h.healthy {
            info!(%reason, "backend is healthy");
        } else {
            warn!(%reason, "backend is unhealthy");
        }
        // Sent under the lock so events for one target keep their order and
        // none escapes after the target is retired. A closed receiver means
        // the daemon is shutting down; nothing to do then.
        let _ = events.send(HealthEvent {
            service: target.service.clone(),
            backend: target.backend,
            healthy: h.healthy,
            reason,
        });
    }
    Some(outcome)
}

/// A uniform-enough value in [0, 1) from the target, a counter and the
/// clock, hashed with a randomly keyed SipHash.
pub(super) fn random_fraction(target: &Target, counter: u64) -> f64 {
    let mut h = RandomState::new().build_hasher();
    target.service.hash(&mut h);
    target.backend.hash(&mut h);
    counter.hash(&mut h);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `d * factor`, falling back to `d` when the product is not representable.
pub(super) fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}
