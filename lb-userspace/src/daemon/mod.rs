//! The running daemon: owns the desired services, the map writer and the
//! health checker. One reconcile task applies every change (API calls,
//! reloads, batches of health verdicts) as one validated, persisted, atomic
//! step; callers send it requests and wait for its acknowledgement.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, Config, ServiceConfig},
    dataplane::{
        AdminState, Dataplane, DataplaneError, Forwarding, MapWriter, Protocol, ServiceSpec,
        WhenAllDown,
    },
    health::{self, Checker, HealthEvent, Start, Target},
    lock,
    metrics::{Metrics, Snapshot},
    pins,
    state::{self, Saved, StateError, Verdicts},
};

mod announce;
mod cluster;
mod pinsync;
mod reconcile;
mod start;
mod views;

use start::*;
pub use views::{
    BackendStats, BackendView, ReloadReport, ServiceStats, ServiceView, StatsView, StatusView,
};

/// Why a change was refused; the API turns these into status codes.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
    /// etcd (cluster mode) cannot take the change now: 503.
    #[error("{0}")]
    Unavailable(String),
    /// Cluster mode: another node's change reached etcd first (409).
    #[error("{0}")]
    Raced(String),
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Dataplane(#[from] DataplaneError),
    #[error("the configuration names no interface: set dataplane.interface or pass --iface")]
    NoInterface,
    #[error("services from the state file do not fit this configuration: {0}")]
    StateConflict(String),
    #[error("admin API token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: crate::files::ReadError,
    },
    #[error(
        "another lb daemon already runs on the pins at {0} (it holds their lock); stop it first \
         (`lb stop`, or SIGTERM to leave the data plane running), or give this one another \
         dataplane.pin_path"
    )]
    Locked(PathBuf),
    #[error("{0}")]
    Lock(String),
    #[error(transparent)]
    Announce(#[from] crate::announce::AnnounceError),
    #[error("[cluster]: {0}")]
    Cluster(#[from] crate::cluster::etcd::EtcdError),
    #[error("[cluster] pin_sync: {0}")]
    PinSyncKey(#[from] crate::pinsync::KeyError),
    #[error("[cluster] pin_sync: listening on {listen}: {source}")]
    PinSyncListen {
        listen: SocketAddr,
        source: std::io::Error,
    },
}

/// How `lb run` was asked to start.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides `dataplane.interface`.
    pub interface: Option<String>,
    /// Ignore (and overwrite) the state file.
    pub reset_state: bool,
}

/// What [`Daemon::prepare`] loaded and read, for [`Daemon::finish`].
pub struct Prepared {
    token: Option<String>,
    read_token: Option<String>,
    lock: Option<std::fs::File>,
    private_pins: Option<String>,
    services: Vec<ServiceConfig>,
    dropped: Vec<String>,
    health: Verdicts,
    server_ids: config::quic::ServerIds,
    mode: crate::dataplane::AttachMode,
    attached_iface: String,
    writer: MapWriter,
    logger: Option<aya_log::EbpfLogger<crate::dataplane::EbpfLog>>,
    flow_counter: crate::dataplane::FlowCounter,
    /// With `[cluster] pin_sync`: the program's pin reports.
    pin_ring: Option<crate::dataplane::PinRing>,
}

type AnyBox = Box<dyn std::any::Any + Send>;
/// A change to the services; run again on newer services when, in cluster
/// mode, another node's change won the race to etcd.
type ChangeFn = Box<dyn FnMut(&mut Vec<ServiceConfig>) -> Result<AnyBox, ChangeError> + Send>;

/// What the reconcile task is asked to do. The task runs each request to
/// its end whether or not anyone still waits for the answer.
enum Request {
    Change {
        change: ChangeFn,
        ack: oneshot::Sender<Result<AnyBox, ChangeError>>,
    },
    Reload {
        ack: oneshot::Sender<Result<ReloadReport, ChangeError>>,
    },
    /// Other nodes' health verdicts changed, or the link to etcd did
    /// (cluster mode): the tables are installed again under the rule.
    ClusterHealth,
    /// The services stored in etcd at `revision` (cluster mode).
    Cluster {
        services: Vec<ServiceConfig>,
        revision: i64,
        ack: oneshot::Sender<()>,
    },
}

/// Work waiting for the reconcile task, and since when it made no progress.
#[derive(Default)]
struct Progress {
    pending: usize,
    since: Option<Instant>,
}

/// Health verdicts arriving within this quiet time of each other (and
/// within `BATCH_MAX` of the first) are installed together.
const BATCH_QUIET: Duration = Duration::from_millis(50);
const BATCH_MAX: Duration = Duration::from_millis(250);
/// Attempts of one install, with backoff from `RETRY_FIRST` doubling.
const INSTALL_ATTEMPTS: u32 = 4;
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// After a health install failed every attempt, how often it is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// Work pending this long without progress makes `/healthz` unhealthy.
const STUCK_AFTER: Duration = Duration::from_secs(10);

fn loop_gone() -> ChangeError {
    ChangeError::Failed(
        "the reconcile loop is not running (see the daemon's log); restart the daemon".into(),
    )
}

struct Inner {
    services: Vec<ServiceConfig>,
    /// The config file's services (what API changes are made on) and
    /// their fingerprint.
    base: Vec<ServiceConfig>,
    base_fp: String,
    /// Health verdicts; a backend with no verdict yet counts as healthy.
    health: Verdicts,
    checker: Checker,
    dropped: Vec<String>,
    reloads: u64,
    last_reload_error: Option<String>,
    /// `[limits]` in force: the config's at start, a reloaded file's once
    /// the services in force fit them.
    limits: config::Limits,
}

/// How often the flow table is swept for changed slots that can be clean.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

struct Shared {
    /// The config the daemon started with (what a reload compares to).
    config: Config,
    /// How ingress is attached: `xdp_mode` with `auto` resolved.
    attach_mode: crate::dataplane::AttachMode,
    /// The flow hash the loaded programs run (`dataplane.flow_hash` resolved).
    flow_hash: lb_common::FlowHash,
    state_file: PathBuf,
    /// The pin directory's lock, held for the daemon's life.
    _lock: Option<std::fs::File>,
    /// Set when the pins die with this process.
    private_pins: Option<String>,
    /// `true` once `lb stop` asked the daemon to detach and exit.
    stop: tokio::sync::watch::Sender<bool>,
    /// Tasks whose death makes the daemon unhealthy.
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The admin scope's token.
    token: Option<String>,
    /// The read scope's token.
    read_token: Option<String>,
    metrics: Metrics,
    writer: Arc<Mutex<MapWriter>>,
    /// Services failing open after the last install.
    fail_open: Mutex<std::collections::HashSet<String>>,
    /// The interface the data plane is attached to still exists.
    attached: Arc<std::sync::atomic::AtomicBool>,
    flow_counter: Arc<crate::dataplane::FlowCounter>,
    inner: tokio::sync::Mutex<Inner>,
    /// Requests to the reconcile task.
    requests: mpsc::UnboundedSender<Request>,
    progress: Mutex<Progress>,
    /// Per-backend rates for the status page, sampled every
    /// `rates::SAMPLE_EVERY`.
    rates: Mutex<crate::rates::Rates>,
    /// Every QUIC-LB backend's server id as installed (configured or
    /// assigned); saved with the state file.
    server_ids: Mutex<config::quic::ServerIds>,
    /// With `[bgp]`: announces the service addresses through BIRD.
    announcer: Option<tokio::sync::Mutex<crate::announce::Announcer>>,
    /// The announcer's per-service state after its last tick (a copy, so
    /// the API never waits on a slow BIRD).
    announce_states: Mutex<std::collections::BTreeMap<String, crate::announce::AnnounceView>>,
    /// `[cluster]`: the services live in etcd.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// `[cluster] pin_sync`: flow pins shared with the other nodes.
    pin_sync: Option<Arc<pinsync::PinSync>>,
}

impl Progress {
    fn queued(&mut self) {
        self.pending += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn progressed(&mut self) {
        self.pending = self.pending.saturating_sub(1);
        self.since = (self.pending > 0).then(Instant::now);
    }

    /// Work waiting, and seconds it has waited without progress (0 when
    /// idle): `lb_reconcile_pending`, `lb_reconcile_stalled_seconds`.
    fn gauges(&self, now: Instant) -> (u64, f64) {
        let stalled = self
            .since
            .map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64());
        (self.pending as u64, stalled)
    }
}

impl Shared {
    /// Work for the reconcile task is waiting.
    fn queued(&self) {
        lock(&self.progress).queued();
    }

    /// The reconcile task finished one piece of work.
    fn progressed(&self) {
        lock(&self.progress).progressed();
    }

    /// How long pending work has waited without progress.
    fn stalled_for(&self) -> Option<Duration> {
        lock(&self.progress).since.map(|s| s.elapsed())
    }
}

/// A cheap handle on the daemon, shared by the API and the event loop.
#[derive(Clone)]
pub struct Daemon {
    shared: Arc<Shared>,
}

/// The QUIC-LB part of what the map writer installs.
fn quic_specs(
    services: &[ServiceConfig],
    ids: &config::quic::ServerIds,
) -> crate::dataplane::QuicSpecs {
    services
        .iter()
        .filter_map(|s| {
            let q = s.quic.as_ref()?;
            let server_ids = s
                .backends
                .iter()
                .filter_map(|b| {
                    let id = ids.get(&(s.name.clone(), b.address))?;
                    Some((b.address, id.0.clone()))
                })
                .collect();
            Some((
                s.name.clone(),
                crate::dataplane::QuicSpec {
                    cid: q.cid,
                    server_ids,
                },
            ))
        })
        .collect()
}

fn specs(
    services: &[ServiceConfig],
    health: &HashMap<(String, SocketAddr), bool>,
) -> Vec<ServiceSpec> {
    services
        .iter()
        .map(|s| {
            ServiceSpec::of(s, |b| {
                health.get(&(s.name.clone(), b)).copied().unwrap_or(true)
            })
        })
        .collect()
}

impl Daemon {
    /// Resolves once `lb stop` (`POST /api/v1/stop`) asks the daemon to
    /// detach and exit.
    pub async fn stop_requested(&self) {
        let mut rx = self.shared.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Asks the daemon to detach the data plane and exit.
    pub fn request_stop(&self) {
        self.shared.stop.send_replace(true);
    }

    /// True while the daemon's loops run and its state answers within
    /// `within` (what the systemd watchdog is fed on).
    pub async fn alive(&self, within: Duration) -> bool {
        let loops_ok = self
            .shared
            .loops
            .lock()
            .is_ok_and(|l| l.iter().all(|h| !h.is_finished()));
        let stalled = self.shared.stalled_for().filter(|d| *d > STUCK_AFTER);
        if let Some(d) = stalled {
            warn!(
                "the reconcile loop made no progress on pending work for {:.0} s",
                d.as_secs_f64()
            );
        }
        loops_ok
            && stalled.is_none()
            && tokio::time::timeout(within, self.shared.inner.lock())
                .await
                .is_ok()
    }

    /// The data plane is attached to its interface (false while the
    /// interface is gone).
    pub fn attached(&self) -> bool {
        self.shared
            .attached
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Re-reads the config file, validates it whole and applies what
    /// changed in its services; API changes made on the previous config are
    /// dropped (and named) when its services changed. New `[limits]` apply
    /// when the services then in force fit them. An invalid file changes
    /// nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ChangeError> {
        let (ack, done) = oneshot::channel();
        self.request(Request::Reload { ack })?;
        done.await.map_err(|_| loop_gone())?
    }

    /// Stops health checks and leaves the data plane pinned and running
    /// for the next daemon, or (`keep` false: `lb stop`) detaches and
    /// unpins it.
    pub async fn shutdown(&self, keep: bool) {
        // Routes first: no traffic should arrive at a node going away.
        self.withdraw_all().await;
        let mut inner = self.shared.inner.lock().await;
        inner.checker.set_targets(Vec::new());
        let writer = self.shared.writer.clone();
        let _ =
            tokio::task::spawn_blocking(move || lock(&writer).dataplane_mut().shutdown(keep)).await;
    }

    /// The admin scope's token, if one is configured.
    pub fn token(&self) -> Option<&str> {
        self.shared.token.as_deref()
    }

    /// The read scope's token, if one is configured.
    pub fn read_token(&self) -> Option<&str> {
        self.shared.read_token.as_deref()
    }

    /// The admin settings the daemon started with.
    pub fn admin_config(&self) -> &config::AdminConfig {
        &self.shared.config.admin
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
}

#[cfg(test)]
mod tests;
