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
    metrics::{Metrics, Snapshot},
    pins,
    state::{self, Saved, StateError, Verdicts},
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
    mode: crate::dataplane::AttachMode,
    attached_iface: String,
    writer: MapWriter,
    logger: Option<aya_log::EbpfLogger<crate::dataplane::EbpfLog>>,
    flow_counter: crate::dataplane::FlowCounter,
}

/// What `GET /api/v1/status` shows: where the daemon's services come from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct StatusView {
    pub version: String,
    pub config: String,
    /// Fingerprint of the config services in force.
    pub config_fingerprint: String,
    pub state_file: String,
    /// Services differ from the config file's by changes made through the API.
    pub api_changes: bool,
    /// API changes that were not re-applied because the config file changed
    /// since they were made (at start or at the last reload that dropped any).
    pub dropped_changes: Vec<String>,
    pub pin_path: Option<String>,
    /// Pins outlive this process (false: restarts reload the data plane).
    pub pins_outlive_daemon: bool,
    pub reloads: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    /// `[limits]` in force.
    pub limits: config::Limits,
}

/// What a reload did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// The config's services changed and were applied.
    pub applied: bool,
    /// API changes dropped because the config changed.
    pub dropped_changes: Vec<String>,
    /// Settings that changed but need a restart to take effect.
    pub needs_restart: Vec<String>,
}

/// One backend as the API shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BackendView {
    pub address: String,
    pub weight: u16,
    pub state: AdminState,
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What `GET /api/v1/stats` shows: per backend its share of the Maglev
/// table and its rates, with five minutes of history.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StatsView {
    pub interval_seconds: u64,
    pub samples: usize,
    pub services: Vec<ServiceStats>,
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ServiceStats {
    pub name: String,
    /// Slots of the installed Maglev table (0 before one is installed).
    pub table_size: u32,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BackendStats {
    pub address: String,
    /// Slots of the installed table that send new flows to this backend.
    pub slots: u32,
    #[serde(flatten)]
    pub rates: crate::rates::RateView,
}

/// One service as the API shows it: the model's fields in their wire
/// types, with health and fail-open state (built in `Daemon::views`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub listen: String,
    pub protocols: Vec<Protocol>,
    pub forwarding: Forwarding,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<config::RawHealth>,
    pub when_all_down: WhenAllDown,
    /// Every backend failed its health checks and the ones that were up
    /// last still take flows (`when_all_down = "keep_last"`).
    pub fail_open: bool,
    pub backends: Vec<BackendView>,
}

type AnyBox = Box<dyn std::any::Any + Send>;
type ChangeFn = Box<dyn FnOnce(&mut Vec<ServiceConfig>) -> Result<AnyBox, ChangeError> + Send>;

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

/// Locks `m` even when a thread panicked while holding it: readers see the
/// last state, and the reconcile task's next install rewrites the kernel
/// from the desired state anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

struct Shared {
    /// The config the daemon started with (what a reload compares to).
    config: Config,
    state_file: PathBuf,
    /// The pin directory's lock, held for the daemon's life.
    _lock: Option<std::fs::File>,
    /// Set when the pins die with this process.
    private_pins: Option<String>,
    /// `true` once `lb stop` asked the daemon to detach and exit.
    stop: tokio::sync::watch::Sender<bool>,
    /// Tasks whose death makes the daemon unhealthy.
    loops: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
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

/// For `nat`/`dsr` services: warns when this host does not forward IP (the
/// FIB lookup then fails and replies are not routed), and makes the kernel
/// resolve each backend's neighbour entry now, so the data plane's FIB
/// lookups find a MAC from the first packet on.
fn prepare_remote_backends(specs: &[ServiceSpec]) {
    use crate::dataplane::Forwarding;
    let remote: Vec<&ServiceSpec> = specs
        .iter()
        .filter(|s| s.forwarding != Forwarding::Local)
        .collect();
    if remote.is_empty() {
        return;
    }
    for (v6, file) in [
        (false, "/proc/sys/net/ipv4/ip_forward"),
        (true, "/proc/sys/net/ipv6/conf/all/forwarding"),
    ] {
        let used = remote.iter().any(|s| s.listen.is_ipv6() == v6);
        let on = std::fs::read_to_string(file)
            .map(|t| t.trim() == "1")
            .unwrap_or(false);
        if used && !on {
            warn!(
                "{file} is 0: nat and dsr services need IP forwarding on this host (sysctl -w {}=1)",
                file.trim_start_matches("/proc/sys/").replace('/', ".")
            );
        }
    }
    // Not from a service address: a dsr backend holds it too, so its
    // answer to the neighbour solicitation would never come back.
    let avoid: std::collections::HashSet<std::net::IpAddr> = specs
        .iter()
        .map(|s| s.listen.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    for s in remote {
        for b in &s.backends {
            let any: SocketAddr = if b.address.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .expect("address");
            let bind = crate::source::probe_source(b.address, &avoid).unwrap_or(any);
            // The discard port: nothing needs to answer, the neighbour
            // lookup happens on send.
            let target = SocketAddr::new(b.address.ip(), 9);
            if let Ok(sock) = std::net::UdpSocket::bind(bind) {
                let _ = sock.send_to(&[], target);
            }
        }
    }
}

/// Collects the verdicts that follow `first` within `BATCH_QUIET` of each
/// other, for at most `BATCH_MAX`; each with the time it arrived.
async fn collect_batch(
    first: HealthEvent,
    events: &mut mpsc::UnboundedReceiver<HealthEvent>,
) -> Vec<(HealthEvent, Instant)> {
    let start = Instant::now();
    let cap = start + BATCH_MAX;
    let mut batch = vec![(first, start)];
    loop {
        let until = (Instant::now() + BATCH_QUIET).min(cap);
        match tokio::time::timeout_at(until.into(), events.recv()).await {
            Ok(Some(ev)) => batch.push((ev, Instant::now())),
            _ => return batch,
        }
    }
}

/// The interfaces of the default routes in `/proc/net/route` (IPv4) or
/// `/proc/net/ipv6_route` (IPv6) text.
fn default_route_devices(text: &str, v6: bool) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = if v6 {
                f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00"
            } else {
                f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000"
            };
            let dev = if v6 { f.last() } else { f.first() };
            (default && dev != Some(&"lo")).then(|| dev.map(|d| d.to_string()))?
        })
        .collect()
}

/// Replies of `local` and `nat` services are translated back by the TC
/// program on the attached interface only: warns when a default route
/// leaves by another one, since replies to clients would follow it
/// untranslated.
fn check_reply_routes(iface: &str, specs: &[ServiceConfig]) {
    for (v6, file) in [(false, "/proc/net/route"), (true, "/proc/net/ipv6_route")] {
        let used = specs
            .iter()
            .any(|s| s.forwarding != crate::dataplane::Forwarding::Dsr && s.listen.is_ipv6() == v6);
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for dev in default_route_devices(&text, v6) {
            if used && dev != iface {
                warn!(
                    "the default {} route leaves by {dev}, but the balancer is attached to \
                     {iface}: replies of local and nat services routed by {dev} are not \
                     translated back to the service address (route clients by {iface})",
                    if v6 { "IPv6" } else { "IPv4" }
                );
            }
        }
    }
}

/// The services' own addresses (not wildcards): health probes must not
/// leave from them.
fn service_addresses(services: &[ServiceConfig]) -> std::collections::HashSet<std::net::IpAddr> {
    services
        .iter()
        .map(|s| s.listen.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect()
}

/// The services in force at start, the API changes dropped, and the health
/// verdicts kept: the config wins unless the state file's API changes were
/// made on exactly these config services.
fn resolve(
    config_services: &[ServiceConfig],
    saved: Option<Saved>,
) -> (Vec<ServiceConfig>, Vec<String>, Verdicts) {
    let Some(saved) = saved else {
        return (config_services.to_vec(), Vec::new(), Verdicts::new());
    };
    let fp = state::fingerprint(config_services);
    match saved.changed {
        None => (config_services.to_vec(), Vec::new(), saved.health),
        Some(changed) if saved.fingerprint.as_deref() == Some(fp.as_str()) => {
            (changed, Vec::new(), saved.health)
        }
        Some(changed) => {
            let dropped = if saved.fingerprint.is_none() {
                vec![format!(
                    "every API change kept by an older lb (state file version 1, {} services): \
                     it recorded no config to check them against",
                    changed.len()
                )]
            } else {
                state::describe_changes(&saved.base, &changed)
            };
            (config_services.to_vec(), dropped, saved.health)
        }
    }
}

/// Keeps the verdicts of backends that are still there and still checked
/// (a disabled backend keeps its last verdict for when it comes back).
fn retain_verdicts(health: &mut Verdicts, services: &[ServiceConfig]) {
    health.retain(|(s, b), _| {
        services.iter().any(|svc| {
            &svc.name == s && svc.health.is_some() && svc.backends.iter().any(|x| x.address == *b)
        })
    });
}

fn targets(services: &[ServiceConfig]) -> Vec<Target> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.health else { continue };
        for b in &s.backends {
            if b.state != crate::dataplane::AdminState::Disabled {
                out.push(Target {
                    service: s.name.clone(),
                    backend: b.address,
                    spec: spec.clone(),
                });
            }
        }
    }
    out
}

impl Daemon {
    /// Loads the data plane, attaches it, installs the services (from the
    /// state file when there is one) and starts health checks. Must run
    /// inside a tokio runtime.
    pub async fn start(config: &Config, run: &RunOptions) -> Result<Daemon, StartError> {
        let (c, r) = (config.clone(), run.clone());
        let prepared = tokio::task::spawn_blocking(move || Self::prepare(&c, &r))
            .await
            .expect("loader task")?;
        Self::finish(config, prepared).await
    }

    /// The part of [`Daemon::start`] that may need more privileges than the
    /// running daemon keeps (see `privs`): reads the token and state files,
    /// takes the pin lock (mounting a bpf filesystem if needed), loads the
    /// data plane and attaches it. Blocks; runs on any thread.
    pub fn prepare(config: &Config, run: &RunOptions) -> Result<Prepared, StartError> {
        let iface = run
            .interface
            .clone()
            .or_else(|| config.interface.clone())
            .ok_or(StartError::NoInterface)?;
        let secret = |p: &Option<PathBuf>| -> Result<Option<String>, StartError> {
            p.as_ref()
                .map(|p| {
                    crate::files::read_secret(p).map_err(|source| StartError::Token {
                        path: p.clone(),
                        source,
                    })
                })
                .transpose()
        };
        let token = secret(&config.admin.token_file)?;
        let read_token = secret(&config.admin.read_token_file)?;
        // One daemon per pin path, decided before anything is touched.
        let lock = match &config.dataplane.pin_path {
            Some(pin) => Some(pins::lock(pin).map_err(|e| match e {
                pins::LockError::Held => StartError::Locked(pin.clone()),
                pins::LockError::Other(m) => StartError::Lock(m),
            })?),
            None => None,
        };
        let private_pins = config
            .dataplane
            .pin_path
            .as_deref()
            .and_then(pins::private_pins);
        if let Some(w) = &private_pins {
            warn!("{w}");
        }
        let state_file = &config.admin.state_file;
        // A record kept by an older lb beside the state file moves to its
        // per-pin name, so its pins are adopted, not replaced.
        if let Some(record) = &config.dataplane.record_path {
            let legacy = config::legacy_record_path(state_file);
            if !record.exists() && legacy.exists() && std::fs::rename(&legacy, record).is_ok() {
                // Older versions wrote it 0644.
                let _ = std::fs::set_permissions(
                    record,
                    std::os::unix::fs::PermissionsExt::from_mode(crate::files::FILE_MODE),
                );
                info!(from = %legacy.display(), to = %record.display(), "moved the record of the pinned data plane");
            }
        }
        let legacy = std::path::Path::new("/var/lib/lb/state.json");
        if state_file != legacy && legacy.exists() && !state_file.exists() {
            warn!(
                old = %legacy.display(),
                new = %state_file.display(),
                "the state file is per config file now; the shared one of older versions is not read \
                 (set admin.state_file to it to keep its changes)"
            );
        }
        let saved = if run.reset_state {
            info!(file = %state_file.display(), "state file reset (--reset-state): API changes and health verdicts discarded");
            None
        } else {
            state::load(state_file)?
        };
        let (services, dropped, mut health) = resolve(&config.services, saved);
        if services != config.services {
            info!(file = %state_file.display(), "re-applying the changes made through the API on this config");
            config::check_limits(&services, &config.limits)
                .map_err(|e| StartError::StateConflict(e.to_string()))?;
            config::check_services(&services, &config.limits)
                .map_err(|e| StartError::StateConflict(e.in_body().to_string()))?;
            config::check_policy(&services, &config.policy)
                .map_err(|e| StartError::StateConflict(e.in_body().to_string()))?;
        }
        for d in &dropped {
            warn!(file = %state_file.display(), "API change dropped: the config file changed since it was made: {d}");
        }
        retain_verdicts(&mut health, &services);
        let down = health.values().filter(|up| !**up).count();
        if down > 0 {
            info!(
                backends = down,
                "backends known down before this start stay out until their checks pass"
            );
        }

        let opts = config.dataplane.clone();
        let mode = config.xdp_mode;
        let services_for_check = services.clone();
        let attached_iface = iface.clone();
        let (writer, logger, flow_counter) = {
            let mut dp = Dataplane::load(opts)?;
            let logger = dp.logger().unwrap_or_else(|e| {
                warn!("eBPF log records will not be shown: {e}");
                None
            });
            let flow_counter = dp.flow_counter()?;
            dp.attach(&iface, mode)?;
            check_reply_routes(&iface, &services_for_check);
            (MapWriter::new(dp), logger, flow_counter)
        };
        Ok(Prepared {
            token,
            read_token,
            lock,
            private_pins,
            services,
            dropped,
            health,
            mode,
            attached_iface,
            writer,
            logger,
            flow_counter,
        })
    }

    /// The rest of [`Daemon::start`], with what [`Daemon::prepare`] made:
    /// installs the services and starts the loops. Needs only what the
    /// running daemon keeps.
    pub async fn finish(config: &Config, prepared: Prepared) -> Result<Daemon, StartError> {
        let Prepared {
            token,
            read_token,
            lock,
            private_pins,
            services,
            dropped,
            health,
            mode,
            attached_iface,
            writer,
            logger,
            flow_counter,
        } = prepared;
        if let Some(logger) = logger {
            let registered = crate::sys::async_ebpf_logger(logger);
            match registered {
                Ok(mut logger) => {
                    tokio::spawn(async move {
                        while let Ok(mut guard) = logger.readable_mut().await {
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
                Err(e) => warn!("eBPF log records will not be shown: {e}"),
            }
        }

        let metrics = Metrics::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (stop, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let weak = weak.clone();
            let hook: health::ResultHook = Arc::new(move |svc, backend, result| {
                if let Some(s) = weak.upgrade() {
                    s.metrics.health_result(svc, &backend.to_string(), result);
                }
            });
            Shared {
                config: config.clone(),
                state_file: config.admin.state_file.clone(),
                _lock: lock,
                private_pins,
                stop,
                loops: std::sync::Mutex::new(Vec::new()),
                token,
                read_token,
                metrics,
                writer: Arc::new(Mutex::new(writer)),
                fail_open: Mutex::new(Default::default()),
                attached: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                flow_counter: Arc::new(flow_counter),
                inner: tokio::sync::Mutex::new(Inner {
                    services: Vec::new(),
                    base: config.services.clone(),
                    base_fp: state::fingerprint(&config.services),
                    health: HashMap::new(),
                    checker: Checker::new(config.health_max_concurrent, tx, hook),
                    dropped,
                    reloads: 0,
                    last_reload_error: None,
                    limits: config.limits,
                }),
                requests,
                progress: Mutex::new(Progress::default()),
                rates: Mutex::new(Default::default()),
            }
        });
        let daemon = Daemon { shared };
        // Interfaces that appear after attach become redirect targets too,
        // and the attached one is attached again if it goes and comes back.
        if let Err(e) = crate::links::spawn_watcher(
            attached_iface,
            mode,
            Arc::downgrade(&daemon.shared.writer),
            daemon.shared.attached.clone(),
        ) {
            warn!(
                "cannot watch link events ({e}): interfaces added from now on are no redirect targets until `lb run` restarts"
            );
        }
        {
            let mut inner = daemon.shared.inner.lock().await;
            daemon
                .install(&services, &health)
                .await
                .map_err(|e| StartError::StateConflict(e.to_string()))?;
            inner
                .checker
                .set_service_addresses(service_addresses(&services));
            inner
                .checker
                .set_targets_from(targets(&services), |k| match health.get(k) {
                    Some(up) => Start::Known(*up),
                    None => Start::New,
                });
            inner.services = services;
            inner.health = health;
            // An existing file is rewritten at once: a reset or a dropped
            // change stays so, and the file names the config it now follows.
            // (No file yet: nothing to record until something changes.)
            if daemon.shared.state_file.exists()
                && let Err(e) = daemon.persist(&inner).await
            {
                warn!(
                    "{e}; API changes and health verdicts will not survive a restart until it can be written"
                );
            }
        }
        let loops = vec![
            tokio::spawn(daemon.clone().reconcile(request_rx, rx)),
            tokio::spawn(daemon.clone().sweeps()),
            tokio::spawn(daemon.clone().sample_rates()),
        ];
        *daemon.shared.loops.lock().expect("loops") = loops;
        Ok(daemon)
    }

    /// The state file's contents for `inner`.
    fn saved(inner: &Inner, services: &[ServiceConfig], health: &Verdicts) -> Saved {
        Saved {
            fingerprint: Some(inner.base_fp.clone()),
            base: inner.base.clone(),
            changed: (services != inner.base.as_slice()).then(|| services.to_vec()),
            health: health.clone(),
        }
    }

    /// Writes `inner` to the state file (off the async runtime).
    async fn persist(&self, inner: &Inner) -> Result<(), StateError> {
        let saved = Self::saved(inner, &inner.services, &inner.health);
        let path = self.shared.state_file.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &saved))
            .await
            .unwrap_or_else(|e| {
                Err(StateError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

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
            .map(|l| l.iter().all(|h| !h.is_finished()))
            .unwrap_or(false);
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

    /// Where the services come from, for `GET /api/v1/status`.
    pub async fn status(&self) -> StatusView {
        let inner = self.shared.inner.lock().await;
        let cfg = &self.shared.config;
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: cfg.path.display().to_string(),
            config_fingerprint: inner.base_fp.clone(),
            state_file: self.shared.state_file.display().to_string(),
            api_changes: inner.services != inner.base,
            dropped_changes: inner.dropped.clone(),
            pin_path: cfg
                .dataplane
                .pin_path
                .as_ref()
                .map(|p| p.display().to_string()),
            pins_outlive_daemon: cfg.dataplane.pin_path.is_some()
                && self.shared.private_pins.is_none(),
            reloads: inner.reloads,
            last_reload_error: inner.last_reload_error.clone(),
            limits: inner.limits,
        }
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

    /// Hands `req` to the reconcile task.
    fn request(&self, req: Request) -> Result<(), ChangeError> {
        self.shared.queued();
        self.shared.requests.send(req).map_err(|_| {
            self.shared.progressed();
            loop_gone()
        })
    }

    /// The reload itself, run by the reconcile task.
    async fn reload_now(&self) -> Result<ReloadReport, ChangeError> {
        let path = self.shared.config.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ChangeError::Failed(e.to_string()))?;
        let mut inner = self.shared.inner.lock().await;
        inner.reloads += 1;
        let cfg = match loaded {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("reload refused, nothing changed: {e}");
                inner.last_reload_error = Some(msg.clone());
                return Err(ChangeError::Invalid(msg));
            }
        };
        let old = &self.shared.config;
        let mut needs_restart = Vec::new();
        for (changed, what) in [
            (
                cfg.interface != old.interface || cfg.xdp_mode != old.xdp_mode,
                "dataplane.interface / xdp_mode",
            ),
            (cfg.dataplane != old.dataplane, "dataplane settings"),
            (cfg.admin != old.admin, "admin settings"),
            (cfg.policy != old.policy, "policy settings"),
            (
                cfg.health_max_concurrent != old.health_max_concurrent,
                "health.max_concurrent",
            ),
        ] {
            if changed {
                needs_restart.push(format!("{what} changed: restart the daemon to apply"));
            }
        }
        // New `[limits]` apply with the reload, within the maps loaded at
        // start (a larger `dataplane.max_services` needs a restart).
        let mut limits = cfg.limits;
        let capacity = old.dataplane.max_services as usize;
        if limits.max_services > capacity {
            needs_restart.push(format!(
                "limits.max_services = {} is more than the {capacity} services the loaded maps \
                 hold: {capacity} until a restart",
                limits.max_services
            ));
            limits.max_services = capacity;
        }
        let fp = state::fingerprint(&cfg.services);
        if fp == inner.base_fp {
            // The services in force (with API changes) must fit them.
            if let Err(e) = config::check_limits(&inner.services, &limits) {
                let msg = format!(
                    "reload refused, nothing changed: the services in force (the config file's \
                     and API changes) do not fit the new limits: {e}"
                );
                inner.last_reload_error = Some(msg.clone());
                return Err(ChangeError::Invalid(msg));
            }
            inner.limits = limits;
            inner.last_reload_error = None;
            return Ok(ReloadReport {
                applied: false,
                dropped_changes: Vec::new(),
                needs_restart,
            });
        }
        let dropped = if inner.services != inner.base {
            state::describe_changes(&inner.base, &inner.services)
        } else {
            Vec::new()
        };
        let (old_base, old_fp) = (inner.base.clone(), inner.base_fp.clone());
        inner.base = cfg.services.clone();
        inner.base_fp = fp;
        if let Err(e) = self.commit(&mut inner, cfg.services.clone(), &limits).await {
            inner.base = old_base;
            inner.base_fp = old_fp;
            let msg = format!("reload failed, nothing changed: {e}");
            inner.last_reload_error = Some(msg.clone());
            return Err(match e {
                ChangeError::Failed(_) => ChangeError::Failed(msg),
                _ => ChangeError::Invalid(msg),
            });
        }
        for d in &dropped {
            warn!("API change dropped: the config file changed since it was made: {d}");
        }
        inner.dropped = dropped.clone();
        inner.limits = limits;
        inner.last_reload_error = None;
        Ok(ReloadReport {
            applied: true,
            dropped_changes: dropped,
            needs_restart,
        })
    }

    /// Every `SWEEP_INTERVAL`, when some changed slot is past the time in
    /// which misses go to its previous backend: walks the flow table
    /// (without the writer's lock), then makes the slots no live pin needs
    /// clean again and removes pins whose backend no longer holds them.
    async fn sweeps(self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let writer = self.shared.writer.clone();
            let counter = self.shared.flow_counter.clone();
            let swept = tokio::task::spawn_blocking(move || {
                let plan = match writer.lock() {
                    Ok(w) => w.sweep_plan(crate::dataplane::monotonic_secs()),
                    Err(_) => return None,
                };
                if plan.candidates.is_empty() {
                    return None;
                }
                let found = counter.walk(&plan);
                let report = writer.lock().ok()?.finish_sweep(&plan, &found);
                Some(report)
            })
            .await;
            match swept {
                Ok(Some(Ok(r))) => {
                    if r.slots_cleaned > 0 || r.stale_pins_removed > 0 {
                        debug!(
                            slots = r.slots_cleaned,
                            stale_pins = r.stale_pins_removed,
                            "flow table swept"
                        );
                    }
                    self.shared
                        .metrics
                        .sweep(r.slots_cleaned, r.stale_pins_removed);
                }
                Ok(Some(Err(e))) => warn!("flow table sweep failed: {e}"),
                Ok(None) => {}
                Err(e) => warn!("flow table sweep task: {e}"),
            }
        }
    }

    /// Stops health checks and leaves the data plane pinned and running
    /// for the next daemon, or (`keep` false: `lb stop`) detaches and
    /// unpins it.
    pub async fn shutdown(&self, keep: bool) {
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
    pub fn admin_config(&self) -> &crate::config::AdminConfig {
        &self.shared.config.admin
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Writes the services to the data plane, retrying a failed write
    /// with backoff; every failed attempt is logged and counted.
    async fn install(
        &self,
        services: &[ServiceConfig],
        health: &HashMap<(String, SocketAddr), bool>,
    ) -> Result<(), ChangeError> {
        let mut delay = RETRY_FIRST;
        let mut attempt = 1;
        loop {
            match self.install_once(services, health).await {
                Ok(()) => return Ok(()),
                Err(ChangeError::Failed(e)) if attempt < INSTALL_ATTEMPTS => {
                    self.shared.metrics.reconcile_error();
                    warn!(
                        attempt,
                        "installing the tables failed, retrying in {delay:?}: {e}"
                    );
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    self.shared.metrics.reconcile_error();
                    return Err(e);
                }
            }
        }
    }

    /// Writes the services to the data plane off the async runtime.
    async fn install_once(
        &self,
        services: &[ServiceConfig],
        health: &HashMap<(String, SocketAddr), bool>,
    ) -> Result<(), ChangeError> {
        let specs = specs(services, health);
        let writer = self.shared.writer.clone();
        let started = Instant::now();
        let (report, fail_open) = tokio::task::spawn_blocking(move || {
            let mut w = lock(&writer);
            let report = w.apply(&specs);
            let fail_open: std::collections::HashSet<String> = specs
                .iter()
                .filter(|s| w.fail_open(&s.name))
                .map(|s| s.name.clone())
                .collect();
            drop(w);
            if report.is_ok() {
                prepare_remote_backends(&specs);
            }
            (report, fail_open)
        })
        .await
        .map_err(|e| ChangeError::Failed(format!("map writer task: {e}")))?;
        *lock(&self.shared.fail_open) = fail_open;
        let report = report.map_err(|e| match e {
            DataplaneError::Full(_) | DataplaneError::Conflict(_) => {
                ChangeError::Conflict(e.to_string())
            }
            e => ChangeError::Failed(e.to_string()),
        })?;
        for service in &report.installed {
            self.shared.metrics.table_installed(service);
        }
        if report.tables_installed > 0 {
            let secs = started.elapsed().as_secs_f64();
            for _ in 0..report.tables_installed {
                self.shared
                    .metrics
                    .observe_rebuild(secs / report.tables_installed as f64);
            }
        }
        Ok(())
    }

    /// The reconcile task: the one writer of the services, the health
    /// verdicts, the kernel tables and the state file. API changes and
    /// reloads are served in arrival order, each to its end; health
    /// verdicts are collected into batches, each installed once.
    async fn reconcile(
        self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut events: mpsc::UnboundedReceiver<HealthEvent>,
    ) {
        // A health install failed every attempt: the kernel lags the
        // verdicts until a retry succeeds.
        let mut behind = false;
        loop {
            tokio::select! {
                biased;
                req = requests.recv() => {
                    let Some(req) = req else { return };
                    self.serve(req).await;
                    self.shared.progressed();
                }
                ev = events.recv() => {
                    let Some(first) = ev else { return };
                    let batch = collect_batch(first, &mut events).await;
                    if !behind {
                        self.shared.queued();
                    }
                    behind = !self.apply_verdicts(batch).await;
                    if !behind {
                        self.shared.progressed();
                    }
                }
                () = tokio::time::sleep(RETRY_EVERY), if behind => {
                    let inner = self.shared.inner.lock().await;
                    let services = inner.services.clone();
                    behind = self.install(&services, &inner.health).await.is_err();
                    drop(inner);
                    if !behind {
                        info!("tables installed after earlier failures");
                        self.shared.progressed();
                    }
                }
            }
        }
    }

    /// Serves one request; its answer goes to whoever still waits for it.
    async fn serve(&self, req: Request) {
        match req {
            Request::Change { change, ack } => {
                let mut inner = self.shared.inner.lock().await;
                let mut services = inner.services.clone();
                let out = match change(&mut services) {
                    Ok(out) => {
                        let limits = inner.limits;
                        self.commit(&mut inner, services, &limits)
                            .await
                            .map(|()| out)
                    }
                    Err(e) => Err(e),
                };
                drop(inner);
                // The client may have gone: the change stands all the same.
                let _ = ack.send(out);
            }
            Request::Reload { ack } => {
                let _ = ack.send(self.reload_now().await);
            }
        }
    }

    /// Records a batch of verdicts, saves them, and installs the tables
    /// once for the whole batch. False when the install failed (the
    /// verdicts stand and are retried).
    async fn apply_verdicts(&self, batch: Vec<(HealthEvent, Instant)>) -> bool {
        let mut inner = self.shared.inner.lock().await;
        let mut applied = Vec::new();
        for (ev, at) in batch {
            let known = inner.services.iter().any(|s| {
                s.name == ev.service && s.backends.iter().any(|b| b.address == ev.backend)
            });
            if known {
                inner
                    .health
                    .insert((ev.service.clone(), ev.backend), ev.healthy);
                applied.push((ev, at));
            }
        }
        if applied.is_empty() {
            return true;
        }
        self.shared.metrics.health_batch();
        // Saved before the install: a crash in between still restarts
        // with the verdicts the checks reached.
        if let Err(e) = self.persist(&inner).await {
            self.shared.metrics.reconcile_error();
            warn!("{e}; these health verdicts will not survive a restart");
        }
        let services = inner.services.clone();
        match self.install(&services, &inner.health).await {
            Ok(()) => {
                for (ev, at) in &applied {
                    let waited = at.elapsed();
                    self.shared.metrics.verdict_installed(waited.as_secs_f64());
                    info!(
                        service = %ev.service,
                        backend = %ev.backend,
                        healthy = ev.healthy,
                        reason = %ev.reason,
                        batch = applied.len(),
                        install_ms = waited.as_secs_f64() * 1e3,
                        "backend health changed; table installed"
                    );
                }
                true
            }
            Err(e) => {
                error!(
                    verdicts = applied.len(),
                    "installing after health changes failed: {e}; retrying every {RETRY_EVERY:?}"
                );
                false
            }
        }
    }

    /// Has the reconcile task apply `change` to a copy of the services,
    /// validate the result, install it, persist it, and only then make it
    /// current; on any failure nothing changes. A caller that stops
    /// waiting does not stop the change: it happens whole or not at all.
    pub async fn change<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Vec<ServiceConfig>) -> Result<T, ChangeError> + Send + 'static,
    ) -> Result<T, ChangeError> {
        let (ack, done) = oneshot::channel();
        let change: ChangeFn = Box::new(move |s| change(s).map(|t| Box::new(t) as AnyBox));
        self.request(Request::Change { change, ack })?;
        let out = done.await.map_err(|_| loop_gone())??;
        out.downcast::<T>()
            .map(|t| *t)
            .map_err(|_| ChangeError::Failed("the reconcile loop answered another request".into()))
    }

    /// Validates `services`, installs them, persists them, and only then
    /// makes them current; on any failure nothing changes. Backends that
    /// come back (re-activated, or a health check added or changed) get a
    /// fresh verdict: checked at once, the first result decides.
    async fn commit(
        &self,
        inner: &mut Inner,
        services: Vec<ServiceConfig>,
        limits: &config::Limits,
    ) -> Result<(), ChangeError> {
        // Over `[limits]`: 409 naming the key, before anything is touched.
        config::check_limits(&services, limits)
            .map_err(|e| ChangeError::Conflict(e.to_string()))?;
        config::check_services(&services, limits)
            .map_err(|e| ChangeError::Conflict(e.in_body().to_string()))?;
        config::check_policy(&services, &self.shared.config.policy)
            .map_err(|e| ChangeError::Invalid(e.in_body().to_string()))?;
        let mut health = inner.health.clone();
        retain_verdicts(&mut health, &services);
        let old_targets: HashMap<(String, SocketAddr), health::CheckSpec> =
            targets(&inner.services)
                .into_iter()
                .map(|t| ((t.service, t.backend), t.spec))
                .collect();
        let new_targets = targets(&services);
        let mut starts: HashMap<(String, SocketAddr), Start> = HashMap::new();
        for t in &new_targets {
            let key = (t.service.clone(), t.backend);
            let existed = inner
                .services
                .iter()
                .any(|s| s.name == t.service && s.backends.iter().any(|b| b.address == t.backend));
            let start = match old_targets.get(&key) {
                Some(spec) if *spec == t.spec => continue,
                // The check changed: keep the verdict until a fresh one.
                Some(_) => Start::Fresh(health.get(&key).copied().unwrap_or(true)),
                // Back in service, or newly checked: its last verdict
                // (if any) until the first check, at once, decides.
                None if existed => Start::Fresh(health.get(&key).copied().unwrap_or(true)),
                None => Start::New,
            };
            if let Start::Fresh(assumed) = start {
                health.insert(key.clone(), assumed);
            }
            starts.insert(key, start);
        }
        self.install(&services, &health).await?;
        let saved = Self::saved(inner, &services, &health);
        let path = self.shared.state_file.clone();
        let persisted = tokio::task::spawn_blocking(move || state::save(&path, &saved))
            .await
            .map_err(|e| ChangeError::Failed(e.to_string()))?;
        if let Err(e) = persisted {
            self.shared.metrics.reconcile_error();
            error!("{e}; rolling the change back");
            let old = inner.services.clone();
            if let Err(e2) = self.install(&old, &inner.health).await {
                error!("rolling back failed too: {e2}");
            }
            return Err(ChangeError::Failed(format!(
                "the change could not be saved: {e}"
            )));
        }
        // Warn about what the change brought in, not what was there.
        let range = config::ephemeral_port_range();
        let before: std::collections::HashSet<String> =
            config::local_port_warnings(&inner.services, range)
                .into_iter()
                .map(|w| w.message)
                .collect();
        for w in config::local_port_warnings(&services, range) {
            if !before.contains(&w.message) {
                warn!("API change: {}", w.in_body());
            }
        }
        inner
            .checker
            .set_service_addresses(service_addresses(&services));
        inner.checker.set_targets_from(new_targets, |k| {
            starts.get(k).copied().unwrap_or(Start::New)
        });
        inner.services = services;
        inner.health = health;
        Ok(())
    }

    /// The services with each backend's health, for the API.
    pub async fn views(&self) -> Vec<ServiceView> {
        let inner = self.shared.inner.lock().await;
        let status = inner.checker.status();
        let fail_open = lock(&self.shared.fail_open).clone();
        inner
            .services
            .iter()
            .map(|s| {
                let raw = config::RawService::from(s);
                ServiceView {
                    name: raw.name,
                    listen: raw.listen,
                    protocols: raw.protocols,
                    forwarding: raw.forwarding,
                    health: raw.health,
                    when_all_down: s.when_all_down,
                    fail_open: fail_open.contains(&s.name),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let key = (s.name.clone(), b.address);
                            BackendView {
                                address: b.address.to_string(),
                                weight: b.weight,
                                state: b.state,
                                healthy: inner.health.get(&key).copied().unwrap_or(true),
                                last_error: status.get(&key).and_then(|h| h.last_error.clone()),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Every service's name and backend addresses.
    async fn backend_addresses(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let inner = self.shared.inner.lock().await;
        inner
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.backends.iter().map(|b| b.address).collect(),
                )
            })
            .collect()
    }

    /// Every backend's kernel counters, by service and address.
    async fn backend_counters(&self) -> Vec<(String, SocketAddr, lb_common::Counters)> {
        let services = self.backend_addresses().await;
        let writer = self.shared.writer.clone();
        tokio::task::spawn_blocking(move || {
            let w = lock(&writer);
            let dp = w.dataplane();
            let mut out = Vec::new();
            for (name, backends) in services {
                for address in backends {
                    if let Some(id) = w.backend_id(&name, address)
                        && let Ok(c) = dp.backend_counters(id)
                    {
                        out.push((name.clone(), address, c));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// Samples the backends' counters for the status page's rates, for the
    /// daemon's life.
    async fn sample_rates(self) {
        let mut tick = tokio::time::interval(crate::rates::SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let counters = self.backend_counters().await;
            lock(&self.shared.rates).record(Instant::now(), &counters);
        }
    }

    /// Slot shares and rates of every backend, for the status page.
    pub async fn stats(&self) -> StatsView {
        let services = self.backend_addresses().await;
        let writer = self.shared.writer.clone();
        // (service, [(backend, slots)], table size), read under the writer's lock.
        let shares = tokio::task::spawn_blocking(move || {
            let w = lock(&writer);
            services
                .into_iter()
                .map(|(name, backends)| {
                    let mut table_size = 0;
                    let slots: Vec<(SocketAddr, u32)> = backends
                        .into_iter()
                        .map(|address| {
                            let (slots, total) = w.slot_share(&name, address).unwrap_or((0, 0));
                            table_size = table_size.max(total);
                            (address, slots)
                        })
                        .collect();
                    (name, slots, table_size)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let rates = lock(&self.shared.rates);
        let view = shares
            .into_iter()
            .map(|(name, slots, table_size)| ServiceStats {
                backends: slots
                    .into_iter()
                    .map(|(address, slots)| BackendStats {
                        address: address.to_string(),
                        slots,
                        rates: rates.view(&name, address),
                    })
                    .collect(),
                name,
                table_size,
            })
            .collect();
        StatsView {
            interval_seconds: crate::rates::SAMPLE_EVERY.as_secs(),
            samples: crate::rates::SAMPLES,
            services: view,
        }
    }

    /// Reads the kernel counters and renders `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let (services, health) = {
            let inner = self.shared.inner.lock().await;
            (inner.services.clone(), inner.health.clone())
        };
        let writer = self.shared.writer.clone();
        let mut snap = tokio::task::spawn_blocking(move || {
            let w = lock(&writer);
            let dp = w.dataplane();
            let mut snap = Snapshot::default();
            for s in &services {
                for b in &s.backends {
                    let name = b.address.to_string();
                    if let Some(id) = w.backend_id(&s.name, b.address)
                        && let Ok(c) = dp.backend_counters(id)
                    {
                        snap.backends.push((s.name.clone(), name.clone(), c));
                    }
                    let healthy = health
                        .get(&(s.name.clone(), b.address))
                        .copied()
                        .unwrap_or(true);
                    let up = healthy && b.state != crate::dataplane::AdminState::Disabled;
                    snap.backend_state
                        .push((s.name.clone(), name, b.weight, up));
                }
            }
            snap.fail_open = services
                .iter()
                .map(|s| (s.name.clone(), w.fail_open(&s.name)))
                .collect();
            snap.actions = dp.action_counts().unwrap_or_default();
            snap.passed = dp.reason_counts().unwrap_or_default();
            snap.dropped = dp.drop_counts().unwrap_or_default();
            snap.events = dp.event_counts().unwrap_or_default();
            snap
        })
        .await
        .unwrap_or_default();
        snap.dataplane_attached = Some(
            self.shared
                .attached
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        snap.flow_capacity = u64::from(self.shared.config.dataplane.flow_table_size);
        (snap.reconcile_pending, snap.reconcile_stalled_seconds) =
            lock(&self.shared.progress).gauges(Instant::now());
        // Walking the flow table happens without the writer's lock.
        let counter = self.shared.flow_counter.clone();
        snap.flow_entries = tokio::task::spawn_blocking(move || counter.count() as u64)
            .await
            .unwrap_or(0);
        self.shared.metrics.render(&snap)
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        config::{BackendConfig, ServiceConfig},
        dataplane::{AdminState, Forwarding, Protocol},
        state::{self, Saved},
    };

    fn svc(weights: &[u16]) -> Vec<ServiceConfig> {
        vec![ServiceConfig {
            name: "web".into(),
            listen: "0.0.0.0:443".parse().unwrap(),
            protocols: vec![Protocol::Tcp],
            forwarding: Forwarding::Local,
            health: None,
            when_all_down: Default::default(),
            allowed_backend_networks: Vec::new(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| BackendConfig {
                    address: format!("127.0.0.1:{}", 8001 + i).parse().unwrap(),
                    weight: *w,
                    state: AdminState::Active,
                })
                .collect(),
        }]
    }

    #[test]
    fn api_changes_apply_only_on_the_config_they_were_made_on() {
        let (base, changed) = (svc(&[100, 100]), svc(&[7, 100]));
        let saved = |base: &[ServiceConfig]| Saved {
            fingerprint: Some(state::fingerprint(base)),
            base: base.to_vec(),
            changed: Some(changed.clone()),
            health: Default::default(),
        };
        // Same config: the changes come back.
        let (services, dropped, _) = super::resolve(&base, Some(saved(&base)));
        assert_eq!((services, dropped.len()), (changed.clone(), 0));
        // Edited config: it wins and the dropped change is named.
        let edited = svc(&[100, 100, 100]);
        let (services, dropped, _) = super::resolve(&edited, Some(saved(&base)));
        assert_eq!(services, edited);
        assert_eq!(
            dropped,
            ["service web: backend 127.0.0.1:8001 weight 100 -> 7"]
        );
        // A version 1 file (no fingerprint): the config wins, said once.
        let mut old = saved(&base);
        old.fingerprint = None;
        let (services, dropped, _) = super::resolve(&base, Some(old));
        assert_eq!((services, dropped.len()), (base.clone(), 1));
        // No file, or no change: the config.
        assert_eq!(super::resolve(&base, None).0, base);
    }

    fn event(port: u16) -> super::HealthEvent {
        super::HealthEvent {
            service: "web".into(),
            backend: format!("127.0.0.1:{port}").parse().unwrap(),
            healthy: false,
            reason: "test".into(),
        }
    }

    /// Verdicts close together make one batch; a pause ends it; a steady
    /// stream is cut at `BATCH_MAX`.
    #[tokio::test]
    async fn health_verdicts_are_batched_by_time() {
        use std::time::{Duration, Instant};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let feed = tokio::spawn(async move {
            // 10 verdicts 5 ms apart, a 200 ms pause, then one every 20 ms
            // for 600 ms.
            for i in 0..10 {
                tx.send(event(i)).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            for i in 0..30 {
                tx.send(event(100 + i)).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let first = rx.recv().await.unwrap();
        let batch = super::collect_batch(first, &mut rx).await;
        assert_eq!(batch.len(), 10);
        let first = rx.recv().await.unwrap();
        let started = Instant::now();
        let batch = super::collect_batch(first, &mut rx).await;
        let took = started.elapsed();
        assert!(
            took < super::BATCH_MAX + Duration::from_millis(40),
            "{took:?}"
        );
        assert!((8..=14).contains(&batch.len()), "{}", batch.len());
        feed.abort();
    }

    #[test]
    fn progress_stalls_only_while_work_waits() {
        let mut p = super::Progress::default();
        assert!(p.since.is_none());
        p.queued();
        p.queued();
        assert_eq!(p.pending, 2);
        let first = p.since.unwrap();
        p.progressed();
        assert!(p.since.unwrap() >= first, "progress restarts the clock");
        p.progressed();
        assert!(p.since.is_none());
        p.progressed();
        assert_eq!(p.pending, 0);
    }

    #[test]
    fn progress_gauges_are_zero_when_idle_and_age_while_work_waits() {
        let mut p = super::Progress::default();
        let now = std::time::Instant::now();
        assert_eq!(p.gauges(now), (0, 0.0));
        p.queued();
        let queued = p.since.unwrap();
        let later = queued + std::time::Duration::from_millis(2500);
        assert_eq!(p.gauges(later), (1, 2.5));
        p.queued();
        assert_eq!(p.gauges(later), (2, 2.5), "the oldest wait counts");
        p.progressed();
        p.progressed();
        assert_eq!(p.gauges(later), (0, 0.0));
    }

    #[test]
    fn finds_the_default_routes_devices() {
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                  eth1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(super::default_route_devices(v4, false), ["eth1"]);
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                  fd000000000000000000000000000001 00000400 00000002 00000000 00000003 eth2\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(super::default_route_devices(v6, true), ["eth2"]);
    }
}
