//! Starting the daemon: loading and attaching the data plane, reading the
//! state file against the config, the first install and the tasks that
//! run beside the reconcile loop.
use super::*;

/// For `nat`/`dsr` services: warns when this host does not forward IP (the
/// FIB lookup then fails and replies are not routed), and makes the kernel
/// resolve each backend's neighbour entry now, so the data plane's FIB
/// lookups find a MAC from the first packet on.
pub(super) fn prepare_remote_backends(specs: &[ServiceSpec]) {
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
        let on = std::fs::read_to_string(file).is_ok_and(|t| t.trim() == "1");
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
            let any = if b.address.is_ipv6() {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            } else {
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
            };
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

/// The interfaces of the default routes in `/proc/net/route` (IPv4) or
/// `/proc/net/ipv6_route` (IPv6) text.
pub(super) fn default_route_devices(text: &str, v6: bool) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = if v6 {
                f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00"
            } else {
                f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000"
            };
            let dev = if v6 { f.last() } else { f.first() };
            (default && dev != Some(&"lo")).then(|| dev.map(ToString::to_string))?
        })
        .collect()
}

/// Replies of `local` and `nat` services are translated back by the TC
/// program on the attached interface only: warns when a default route
/// leaves by another one, since replies to clients would follow it
/// untranslated.
pub(super) fn check_reply_routes(iface: &str, specs: &[ServiceConfig]) {
    for (v6, file) in [(false, "/proc/net/route"), (true, "/proc/net/ipv6_route")] {
        let used = specs
            .iter()
            .any(|s| s.forwarding != Forwarding::Dsr && s.listen.is_ipv6() == v6);
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
pub(super) fn service_addresses(
    services: &[ServiceConfig],
) -> std::collections::HashSet<std::net::IpAddr> {
    services
        .iter()
        .map(|s| s.listen.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect()
}

/// The services in force at start, the API changes dropped, and the health
/// verdicts kept: the config wins unless the state file's API changes were
/// made on exactly these config services.
pub(super) fn resolve(
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
pub(super) fn retain_verdicts(health: &mut Verdicts, services: &[ServiceConfig]) {
    health.retain(|(s, b), _| {
        services.iter().any(|svc| {
            &svc.name == s && svc.health.is_some() && svc.backends.iter().any(|x| x.address == *b)
        })
    });
}

pub(super) fn targets(services: &[ServiceConfig]) -> Vec<Target> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.health else { continue };
        for b in &s.backends {
            if b.state != AdminState::Disabled {
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
        let prepared = match tokio::task::spawn_blocking(move || Self::prepare(&c, &r)).await {
            Ok(prepared) => prepared?,
            // A blocking task is never cancelled: the error is its panic.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
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
        let server_ids = saved
            .as_ref()
            .map(|s| s.server_ids.clone())
            .unwrap_or_default();
        let (services, dropped, mut health) = resolve(&config.services, saved);
        if services != config.services {
            info!(file = %state_file.display(), "re-applying the changes made through the API on this config");
            config::check_set(&services, &config.limits, &config.policy)
                .map_err(|e| StartError::StateConflict(e.to_string()))?;
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

        let mut opts = config.dataplane.clone();
        // The program reports new pins only when the daemon shares them.
        opts.pin_report = config
            .cluster
            .as_ref()
            .is_some_and(|c| c.pin_sync.is_some());
        // Nodes of a cluster must hash alike (a flow ECMP moves keeps its
        // backend only then): unless told, a node runs the hash of every
        // release before the choice, as a node that started with one does.
        if config.cluster.is_some() && opts.flow_hash.is_none() {
            opts.flow_hash = Some(lb_common::FlowHash::Murmur3);
        }
        let all_local = services.iter().all(|s| s.forwarding == Forwarding::Local);
        let (mode, why) = config.xdp_mode.resolve(&iface, all_local);
        info!(interface = %iface, mode = mode.name(), "attach mode: {why}");
        config::check_attach(&services, mode)
            .map_err(|e| StartError::StateConflict(e.in_body().to_string()))?;
        let services_for_check = services.clone();
        let attached_iface = iface.clone();
        let (writer, logger, flow_counter, pin_ring) = {
            let pin_report = opts.pin_report;
            let mut dp = Dataplane::load(opts)?;
            let pin_ring = pin_report.then(|| dp.take_pin_ring()).transpose()?;
            let logger = dp.logger().unwrap_or_else(|e| {
                warn!("eBPF log records will not be shown: {e}");
                None
            });
            let flow_counter = dp.flow_counter()?;
            dp.attach(&iface, mode)?;
            check_reply_routes(&iface, &services_for_check);
            (MapWriter::new(dp), logger, flow_counter, pin_ring)
        };
        Ok(Prepared {
            token,
            read_token,
            lock,
            private_pins,
            services,
            dropped,
            health,
            server_ids,
            mode,
            attached_iface,
            writer,
            logger,
            flow_counter,
            pin_ring,
        })
    }

    /// The rest of [`Daemon::start`], with what [`Daemon::prepare`] made:
    /// installs the services and starts the loops. Needs only what the
    /// running daemon keeps.
    pub async fn finish(config: &Config, p: Prepared) -> Result<Daemon, StartError> {
        if let Some(logger) = p.logger {
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

        let announcer = announce::announcer(config).await?;
        let cluster = config
            .cluster
            .as_ref()
            .map(crate::cluster::Cluster::new)
            .transpose()?
            .map(Arc::new);
        let pin_sync = pinsync::start(config, p.pin_ring).await?;
        let metrics = Metrics::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (stop, _) = tokio::sync::watch::channel(false);
        let flow_hash = p.writer.dataplane().flow_hash();
        info!(flow_hash = flow_hash.name(), "flow hash");
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let weak = weak.clone();
            let hook: health::ResultHook = Arc::new(move |svc, backend, result| {
                if let Some(s) = weak.upgrade() {
                    s.metrics.health_result(svc, &backend.to_string(), result);
                }
            });
            Shared {
                config: config.clone(),
                attach_mode: p.mode,
                flow_hash,
                state_file: config.admin.state_file.clone(),
                _lock: p.lock,
                private_pins: p.private_pins,
                stop,
                loops: Mutex::new(Vec::new()),
                token: p.token,
                read_token: p.read_token,
                metrics,
                writer: Arc::new(Mutex::new(p.writer)),
                fail_open: Mutex::new(Default::default()),
                attached: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                flow_counter: Arc::new(p.flow_counter),
                inner: tokio::sync::Mutex::new(Inner {
                    services: Vec::new(),
                    base: config.services.clone(),
                    base_fp: state::fingerprint(&config.services),
                    health: HashMap::new(),
                    checker: Checker::new(config.health_max_concurrent, tx, hook),
                    dropped: p.dropped,
                    reloads: 0,
                    last_reload_error: None,
                    limits: config.limits,
                }),
                requests,
                progress: Mutex::new(Progress::default()),
                rates: Mutex::new(Default::default()),
                server_ids: Mutex::new(p.server_ids),
                announcer,
                announce_states: Mutex::new(Default::default()),
                cluster: cluster.clone(),
                pin_sync: pin_sync.as_ref().map(|(s, _)| s.clone()),
            }
        });
        let daemon = Daemon { shared };
        // Interfaces that appear after attach become redirect targets too,
        // and the attached one is attached again if it goes and comes back.
        if let Err(e) = crate::links::spawn_watcher(
            p.attached_iface,
            p.mode,
            Arc::downgrade(&daemon.shared.writer),
            daemon.shared.attached.clone(),
        ) {
            warn!(
                "cannot watch link events ({e}): interfaces added from now on are no redirect targets until `lb run` restarts"
            );
        }
        // Next hops of nat/dsr backends, so their packets skip the FIB.
        if let Err(e) = crate::nexthop::spawn(Arc::downgrade(&daemon.shared.writer)) {
            warn!("cannot resolve next hops ({e}): every nat and dsr packet asks the kernel's FIB");
        }
        {
            let mut inner = daemon.shared.inner.lock().await;
            daemon
                .install(&p.services, &p.health)
                .await
                .map_err(|e| StartError::StateConflict(e.to_string()))?;
            inner
                .checker
                .set_service_addresses(service_addresses(&p.services));
            inner
                .checker
                .set_targets_from(targets(&p.services), |k| match p.health.get(k) {
                    Some(up) => Start::Known(*up),
                    None => Start::New,
                });
            inner.services = p.services;
            inner.health = p.health;
            // An existing file is rewritten at once: a reset or a dropped
            // change stays so, and the file names the config it now follows.
            // (No file yet: nothing to record until something changes.)
            // Server ids the daemon assigned are recorded at once.
            let assigned = inner.services.iter().any(|s| s.quic.is_some());
            if (daemon.shared.state_file.exists() || assigned)
                && let Err(e) = daemon.persist(&inner).await
            {
                warn!(
                    "{e}; API changes and health verdicts will not survive a restart until it can be written"
                );
            }
        }
        let mut loops = vec![
            tokio::spawn(daemon.clone().reconcile(request_rx, rx)),
            tokio::spawn(daemon.clone().sweeps()),
            tokio::spawn(daemon.clone().sample_rates()),
        ];
        if daemon.shared.announcer.is_some() {
            loops.push(tokio::spawn(daemon.clone().announce()));
        }
        if let Some(c) = cluster {
            loops.push(tokio::spawn(daemon.clone().cluster_publish(c.clone())));
            if let Some((state, io)) = pin_sync {
                loops.extend(daemon.clone().pin_sync_loops(c.clone(), state, io));
            }
            loops.push(tokio::spawn(daemon.clone().cluster_sync(c)));
        }
        *lock(&daemon.shared.loops) = loops;
        Ok(daemon)
    }
}
