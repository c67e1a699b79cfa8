//! The reconcile loop: the one task that applies changes, reloads and
//! batches of health verdicts to the map writer, persists them, and sweeps
//! changed slots clean.
use super::*;

/// Collects the verdicts that follow `first` within `BATCH_QUIET` of each
/// other, for at most `BATCH_MAX`; each with the time it arrived.
pub(super) async fn collect_batch(
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

impl Daemon {
    /// The state file's contents for `inner`.
    pub(super) fn saved(
        &self,
        inner: &Inner,
        services: &[ServiceConfig],
        health: &Verdicts,
    ) -> Saved {
        Saved {
            fingerprint: Some(inner.base_fp.clone()),
            base: inner.base.clone(),
            changed: (services != inner.base.as_slice()).then(|| services.to_vec()),
            health: health.clone(),
            server_ids: lock(&self.shared.server_ids).clone(),
        }
    }

    /// Writes `inner` to the state file (off the async runtime).
    pub(super) async fn persist(&self, inner: &Inner) -> Result<(), StateError> {
        let saved = self.saved(inner, &inner.services, &inner.health);
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

    /// Hands `req` to the reconcile task.
    pub(super) fn request(&self, req: Request) -> Result<(), ChangeError> {
        self.shared.queued();
        self.shared.requests.send(req).map_err(|_| {
            self.shared.progressed();
            loop_gone()
        })
    }

    /// The reload itself, run by the reconcile task.
    pub(super) async fn reload_now(&self) -> Result<ReloadReport, ChangeError> {
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
            (cfg.bgp != old.bgp, "bgp settings"),
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
        // In cluster mode etcd holds the services: the file's seed it once.
        if fp == inner.base_fp || self.shared.cluster.is_some() {
            // The services in force (with API changes) must fit them.
            if let Err(e) = config::check_limits(&inner.services, &limits) {
                let msg = format!(
                    "reload refused, nothing changed: the services in force (the config file's \
                     and API changes) do not fit the new limits: {e}"
                );
                inner.last_reload_error = Some(msg.clone());
                return Err(ChangeError::Invalid(msg));
            }
            // A QUIC-LB key file with a new key: the services in force
            // (API changes kept) take it.
            let mut services = inner.services.clone();
            let rekeyed = config::quic::refresh_keys(&mut services, &cfg.services);
            if !rekeyed.is_empty() {
                if let Err(e) = self.commit(&mut inner, services, &limits).await {
                    let msg = format!("reload failed, nothing changed: {e}");
                    inner.last_reload_error = Some(msg.clone());
                    return Err(ChangeError::Failed(msg));
                }
                config::quic::refresh_keys(&mut inner.base, &cfg.services);
                info!(services = ?rekeyed, "reload: new QUIC-LB keys applied");
            }
            inner.limits = limits;
            inner.last_reload_error = None;
            return Ok(ReloadReport {
                applied: !rekeyed.is_empty(),
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
    pub(super) async fn sweeps(self) {
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

    /// Writes the services to the data plane, retrying a failed write
    /// with backoff; every failed attempt is logged and counted.
    pub(super) async fn install(
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
    pub(super) async fn install_once(
        &self,
        services: &[ServiceConfig],
        health: &HashMap<(String, SocketAddr), bool>,
    ) -> Result<(), ChangeError> {
        // Cluster mode: the cluster's rule over every live node's verdicts.
        let merged;
        let health = match &self.shared.cluster {
            Some(c) => {
                merged = c.merged(health);
                &merged
            }
            None => health,
        };
        let specs = specs(services, health);
        let server_ids = config::quic::assign(services, &lock(&self.shared.server_ids));
        let quic = quic_specs(services, &server_ids);
        let writer = self.shared.writer.clone();
        let started = Instant::now();
        let (report, fail_open) = tokio::task::spawn_blocking(move || {
            let mut w = lock(&writer);
            let report = w
                .apply(&specs)
                .and_then(|r| w.apply_quic(&quic).map(|()| r));
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
        *lock(&self.shared.server_ids) = server_ids;
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
    pub(super) async fn reconcile(
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

    /// Makes `change` on the services in force and commits the result (in
    /// cluster mode, to etcd first).
    async fn change_once(
        &self,
        inner: &mut Inner,
        change: &mut ChangeFn,
    ) -> Result<AnyBox, ChangeError> {
        let mut services = inner.services.clone();
        let out = change(&mut services)?;
        let limits = inner.limits;
        match &self.shared.cluster {
            Some(c) => self.cluster_commit(c, inner, services).await,
            None => self.commit(inner, services, &limits).await,
        }
        .map(|()| out)
    }

    /// Serves one request; its answer goes to whoever still waits for it.
    pub(super) async fn serve(&self, req: Request) {
        match req {
            Request::Change { mut change, ack } => {
                let mut inner = self.shared.inner.lock().await;
                let mut out = self.change_once(&mut inner, &mut change).await;
                // Lost the race to etcd: the winner is applied here now;
                // the change is made once more on it.
                if let Err(ChangeError::Raced(first)) = &out {
                    info!("{first}; making the change again on the new services");
                    out = self.change_once(&mut inner, &mut change).await;
                    if let Err(ChangeError::Raced(again)) = out {
                        out = Err(ChangeError::Raced(format!(
                            "{again}, twice (it was made again once on the newer services); \
                             retry it"
                        )));
                    }
                }
                drop(inner);
                // The client may have gone: the change stands all the same.
                let _ = ack.send(out);
            }
            Request::Reload { ack } => {
                let _ = ack.send(self.reload_now().await);
            }
            Request::ClusterHealth => {
                let inner = self.shared.inner.lock().await;
                let services = inner.services.clone();
                if let Err(e) = self.install(&services, &inner.health).await {
                    error!("installing after the cluster's health verdicts changed failed: {e}");
                }
            }
            Request::Cluster {
                services,
                revision,
                ack,
            } => {
                self.apply_cluster(services, revision).await;
                let _ = ack.send(());
            }
        }
    }

    /// Records a batch of verdicts, saves them, and installs the tables
    /// once for the whole batch. False when the install failed (the
    /// verdicts stand and are retried).
    pub(super) async fn apply_verdicts(&self, batch: Vec<(HealthEvent, Instant)>) -> bool {
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
        mut change: impl FnMut(&mut Vec<ServiceConfig>) -> Result<T, ChangeError> + Send + 'static,
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
    pub(super) async fn commit(
        &self,
        inner: &mut Inner,
        services: Vec<ServiceConfig>,
        limits: &config::Limits,
    ) -> Result<(), ChangeError> {
        // Over `[limits]`: 409 naming the key, before anything is touched.
        config::check_set(&services, limits, &self.shared.config.policy).map_err(|e| match e {
            config::SetError::Policy(_) => ChangeError::Invalid(e.to_string()),
            _ => ChangeError::Conflict(e.to_string()),
        })?;
        config::check_attach(&services, self.shared.attach_mode)
            .map_err(|e| ChangeError::Conflict(e.in_body().to_string()))?;
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
        let saved = self.saved(inner, &services, &health);
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
}
