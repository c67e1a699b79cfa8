//! What the API shows of the daemon: status, services with their health,
//! stats with rates, and the Prometheus text.
use super::*;

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
    /// How ingress is attached: `tc`, or the XDP mode (`auto`: native if
    /// the driver supports it, generic otherwise).
    pub attach_mode: crate::dataplane::AttachMode,
    /// The flow hash the programs run: `fast` or `murmur3`
    /// (`dataplane.flow_hash`, or kept from the running data plane).
    #[serde(default)]
    pub flow_hash: String,
    /// `[cluster]`: etcd reachable or not, the revision applied, the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterView>,
    /// `[cluster] pin_sync`: flow pins shared with the other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sync: Option<crate::pinsync::PinSyncView>,
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
    /// QUIC-LB server id (hex) the backend's CIDs must carry: configured,
    /// or assigned by the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
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
    /// QUIC-LB services: UDP packets by route since the data plane loaded
    /// (`cid`, or the fallback's reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic_packets: Option<std::collections::BTreeMap<String, u64>>,
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
    /// QUIC-LB routing by connection ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<config::RawQuic>,
    /// Fingerprint (hex) of the installed Maglev table as slot -> backend
    /// address: nodes with the same table show the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_fingerprint: Option<String>,
    /// `[cluster]`: the fingerprint a strict majority of the live nodes
    /// hold for this service (absent: none has a majority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_fingerprint: Option<String>,
    /// With `[bgp]`: whether this node announces the service's address,
    /// and why (not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<crate::announce::AnnounceView>,
}

/// A QUIC-LB service's packets by route (`None`: not such a service).
fn quic_counts(
    w: &MapWriter,
    service: &str,
) -> Option<[u64; lb_common::quic::QUIC_ROUTE_COUNT as usize]> {
    if !w.routes_by_cid(service) {
        return None;
    }
    let id = w.service_id(service)?;
    w.dataplane().quic_route_counts(id).ok()
}

impl Daemon {
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
            attach_mode: self.shared.attach_mode,
            flow_hash: self.shared.flow_hash.name().to_string(),
            cluster: self.shared.cluster.as_ref().map(|c| c.view(&inner.health)),
            pin_sync: self.shared.pin_sync.as_ref().map(|s| s.view()),
        }
    }

    /// The services with each backend's health, for the API.
    pub async fn views(&self) -> Vec<ServiceView> {
        let announce = self.announce_states();
        let fingerprints = self.table_fingerprints();
        let cluster_fingerprints = self.cluster_fingerprints(&fingerprints);
        let inner = self.shared.inner.lock().await;
        let status = inner.checker.status();
        let fail_open = lock(&self.shared.fail_open).clone();
        let server_ids = lock(&self.shared.server_ids).clone();
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
                    quic: raw.quic,
                    table_fingerprint: fingerprints.get(&s.name).cloned(),
                    cluster_fingerprint: cluster_fingerprints.get(&s.name).cloned(),
                    announce: announce.get(&s.name).cloned(),
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
                                server_id: server_ids.get(&key).map(ToString::to_string),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Every service's name and backend addresses.
    pub(super) async fn backend_addresses(&self) -> Vec<(String, Vec<SocketAddr>)> {
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
    pub(super) async fn backend_counters(&self) -> Vec<(String, SocketAddr, lb_common::Counters)> {
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
    pub(super) async fn sample_rates(self) {
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
                    let quic = quic_counts(&w, &name);
                    (name, slots, table_size, quic)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let rates = lock(&self.shared.rates);
        let view = shares
            .into_iter()
            .map(|(name, slots, table_size, quic)| ServiceStats {
                quic_packets: quic.map(|counts| {
                    lb_common::quic::QUIC_ROUTE_NAMES
                        .iter()
                        .zip(counts)
                        .map(|(n, c)| ((*n).to_string(), c))
                        .collect()
                }),
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
                    let up = healthy && b.state != AdminState::Disabled;
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
            snap.next_hops = dp.next_hop_counts().unwrap_or_default();
            snap.quic = services
                .iter()
                .filter_map(|s| Some((s.name.clone(), quic_counts(&w, &s.name)?)))
                .collect();
            snap
        })
        .await
        .unwrap_or_default();
        snap.dataplane_attached = Some(
            self.shared
                .attached
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        snap.announced = self
            .announce_states()
            .into_iter()
            .map(|(s, v)| (s, v.announced))
            .collect();
        let own = self.table_fingerprints();
        let cluster = self.cluster_fingerprints(&own);
        snap.table_matches_cluster = cluster
            .iter()
            .map(|(s, fp)| (s.clone(), own.get(s) == Some(fp)))
            .collect();
        // In the service names' order (a BTreeMap).
        snap.table_fingerprints = own.into_iter().collect();
        snap.flow_capacity = u64::from(self.shared.config.dataplane.flow_table_size);
        (snap.reconcile_pending, snap.reconcile_stalled_seconds) =
            lock(&self.shared.progress).gauges(Instant::now());
        // Two counters, no walk of the table.
        snap.flow_entries =
            crate::dataplane::Family::ALL.map(|f| self.shared.flow_counter.count(f).unwrap_or(0));
        snap.pin_sync = self.shared.pin_sync.as_ref().map(|s| s.view());
        self.shared.metrics.render(&snap)
    }
}

impl Daemon {
    /// `[cluster]`: each service's cluster fingerprint given this node's
    /// (`own`); empty without `[cluster]`.
    fn cluster_fingerprints(
        &self,
        own: &crate::cluster::tables::Fingerprints,
    ) -> crate::cluster::tables::Fingerprints {
        self.shared
            .cluster
            .as_ref()
            .map_or_else(Default::default, |c| c.cluster_fingerprints(own))
    }
}
