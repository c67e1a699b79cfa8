//! The daemon's side of cluster mode: seeding etcd, watching it and
//! handing each new revision to the reconcile loop, and API changes
//! written to etcd by compare-and-swap before they apply here.
use super::*;
use crate::cluster::{
    Cluster,
    etcd::{EtcdError, Kv},
    tables::{self, Fingerprints},
};

/// A failed sync is retried after this (every member is tried each time).
const RESYNC_AFTER: Duration = Duration::from_millis(300);
/// How often the member a watch streams from is asked for the key: a
/// stopped or cut-off member sends no error, only silence.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// A node's health verdicts outlive it by at most this.
const LEASE_TTL: Duration = Duration::from_secs(3);
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// How often this node's verdicts are compared with the published ones.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

impl Daemon {
    /// Keeps this node in step with etcd for the daemon's life: read,
    /// seed when empty, watch; on any failure, mark etcd unreachable (the
    /// node keeps its last applied state) and start over.
    pub(super) async fn cluster_sync(self, c: Arc<Cluster>) {
        let mut was_connected = true;
        loop {
            let e = self.sync_once(&c).await;
            if was_connected {
                warn!("etcd: {e}; serving the last applied state until it answers again");
            }
            was_connected = c.is_connected();
            c.disconnected(format!("etcd unreachable: {e}"));
            if was_connected {
                // The health rule falls back to this node's own checks.
                let _ = self.request(Request::ClusterHealth);
            }
            tokio::time::sleep(RESYNC_AFTER).await;
        }
    }

    /// Publishes this node's own health verdicts under
    /// `health/<node>` on a lease of `LEASE_TTL`, renewed every
    /// `LEASE_RENEW`: a dead node's verdicts vanish with its lease.
    /// Its table fingerprints go under `tables/<node>` on the same lease,
    /// once it has synced (a stale table is no vote on the cluster's).
    pub(super) async fn cluster_publish(self, c: Arc<Cluster>) {
        let key = c.health_key();
        let tables_key = c.tables_key();
        loop {
            let Ok(lease) = c.client.grant(LEASE_TTL.as_secs()).await else {
                tokio::time::sleep(RESYNC_AFTER).await;
                continue;
            };
            let mut published: Option<Verdicts> = None;
            let mut tables_published: Option<Fingerprints> = None;
            let mut renewed = Instant::now();
            loop {
                let local = self.shared.inner.lock().await.health.clone();
                if published.as_ref() != Some(&local) {
                    let value = Cluster::encode_verdicts(&local);
                    if let Err(e) = c.client.put_leased(&key, &value, lease).await {
                        debug!("publishing health verdicts: {e}");
                        break;
                    }
                    published = Some(local);
                }
                let tables = self.table_fingerprints();
                if c.is_synced() && tables_published.as_ref() != Some(&tables) {
                    let value = tables::encode(&tables);
                    if let Err(e) = c.client.put_leased(&tables_key, &value, lease).await {
                        debug!("publishing table fingerprints: {e}");
                        break;
                    }
                    tables_published = Some(tables);
                }
                if renewed.elapsed() >= LEASE_RENEW {
                    match c.client.keep_alive(lease).await {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => {
                            info!("the health lease expired; publishing under a new one");
                            break;
                        }
                        Err(e) => {
                            debug!("renewing the health lease: {e}");
                            break;
                        }
                    }
                }
                tokio::time::sleep(PUBLISH_EVERY).await;
            }
            tokio::time::sleep(RESYNC_AFTER).await;
        }
    }

    /// One connection's life: returns why it ended.
    async fn sync_once(&self, c: &Cluster) -> EtcdError {
        let key = c.services_key();
        let (kv, mut revision) = match c.client.get(&key).await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let member = c.client.current();
        if let Some(kv) = kv {
            self.offer(c, &kv).await;
        } else {
            let services = self.shared.inner.lock().await.services.clone();
            match c.client.put_if(&key, &Cluster::encode(&services), 0).await {
                Ok(r) if r.succeeded => {
                    info!(
                        key,
                        revision = r.revision,
                        services = services.len(),
                        "etcd held no services for this cluster: seeded them from this node's"
                    );
                    revision = r.revision;
                    self.offer_services(c, services, r.revision).await;
                }
                Ok(r) => {
                    revision = r.revision;
                    if let Some(kv) = r.current {
                        self.offer(c, &kv).await;
                    }
                }
                Err(e) => return e,
            }
        }
        let mut peers = std::collections::BTreeMap::new();
        let health_prefix = c.health_prefix();
        match c.client.list_on(member, &health_prefix).await {
            Ok(kvs) => {
                for kv in kvs {
                    let node = kv.key.trim_start_matches(&health_prefix).to_string();
                    match Cluster::decode_verdicts(&kv.value) {
                        Ok(v) => {
                            peers.insert(node, v);
                        }
                        Err(e) => warn!(node, "unreadable health verdicts in etcd: {e}"),
                    }
                }
            }
            Err(e) => return e,
        }
        c.set_peers(peers);
        let tables_prefix = c.tables_prefix();
        match c.client.list_on(member, &tables_prefix).await {
            Ok(kvs) => c.set_all_peer_tables(
                kvs.into_iter()
                    .filter_map(|kv| {
                        let node = kv.key.trim_start_matches(&tables_prefix).to_string();
                        tables::decode(&kv.value)
                            .inspect_err(|e| {
                                warn!(node, "unreadable table fingerprints in etcd: {e}");
                            })
                            .ok()
                            .map(|t| (node, t))
                    })
                    .collect(),
            ),
            Err(e) => return e,
        }
        c.connected(c.client.endpoint_name(member));
        let _ = self.request(Request::ClusterHealth);
        info!(
            endpoint = %c.client.endpoint_name(member),
            revision = c.applied(),
            "etcd: in step with the cluster's services, watching"
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<Kv>();
        let services_key = key.clone();
        let mut health_changed = false;
        let prefix = c.config.prefix();
        let watch = c
            .client
            .watch_on(member, &prefix, revision + 1, |ev| {
                for (kv, deleted) in ev.changes {
                    if let Some(node) = kv.key.strip_prefix(&health_prefix) {
                        let verdicts = if deleted {
                            None
                        } else {
                            match Cluster::decode_verdicts(&kv.value) {
                                Ok(v) => Some(v),
                                Err(e) => {
                                    warn!(node, "unreadable health verdicts in etcd: {e}");
                                    continue;
                                }
                            }
                        };
                        health_changed |= c.set_peer(node, verdicts);
                    } else if let Some(node) = kv.key.strip_prefix(&tables_prefix) {
                        let fingerprints = if deleted {
                            None
                        } else {
                            match tables::decode(&kv.value) {
                                Ok(t) => Some(t),
                                Err(e) => {
                                    warn!(node, "unreadable table fingerprints in etcd: {e}");
                                    continue;
                                }
                            }
                        };
                        c.set_peer_tables(node, fingerprints);
                    } else if kv.key != services_key {
                    } else if deleted {
                        warn!(key = %kv.key, revision = ev.revision, "the cluster's services key was deleted in etcd; keeping the services in force");
                    } else {
                        let _ = tx.send(kv);
                    }
                }
                if std::mem::take(&mut health_changed) {
                    let _ = self.request(Request::ClusterHealth);
                }
            });
        tokio::pin!(watch);
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ended = &mut watch => {
                    return ended.err().unwrap_or_else(|| EtcdError::Unreachable("the watch ended".into()));
                }
                Some(kv) = rx.recv() => self.offer(c, &kv).await,
                _ = beat.tick() => match c.client.get_on(member, &key).await {
                    Err(e) => return e,
                    // A change the watch did not bring (it should): applied all the same.
                    Ok((Some(kv), _)) if kv.mod_revision > c.seen() => self.offer(c, &kv).await,
                    Ok(_) => c.connected(c.client.endpoint_name(member)),
                },
            }
        }
    }

    /// Hands the services stored in `kv` to the reconcile loop, once per
    /// revision.
    async fn offer(&self, c: &Cluster, kv: &Kv) {
        if kv.mod_revision <= c.seen() {
            return;
        }
        match Cluster::decode(&kv.value) {
            Ok(services) => self.offer_services(c, services, kv.mod_revision).await,
            Err(e) => {
                c.offered(kv.mod_revision);
                // Taken, if not applied: the table gate decides from here.
                c.mark_synced();
                let msg = format!(
                    "the services etcd holds at revision {} are not valid, not applied: {e}",
                    kv.mod_revision
                );
                error!("{msg}");
                c.error(msg);
            }
        }
    }

    async fn offer_services(&self, c: &Cluster, services: Vec<ServiceConfig>, revision: i64) {
        c.offered(revision);
        let (ack, done) = oneshot::channel();
        if self
            .request(Request::Cluster {
                services,
                revision,
                ack,
            })
            .is_ok()
        {
            let _ = done.await;
        }
    }

    /// Run by the reconcile loop: makes the services of `revision` current
    /// here, unless a newer revision already is.
    pub(super) async fn apply_cluster(&self, services: Vec<ServiceConfig>, revision: i64) {
        let Some(c) = &self.shared.cluster else {
            return;
        };
        let mut inner = self.shared.inner.lock().await;
        if revision <= c.applied() {
            return;
        }
        if services == inner.services {
            c.set_applied(revision);
            return;
        }
        let limits = inner.limits;
        // Before the first sync the node is not announced (with `[bgp]`):
        // the file's tables it ran until now served nothing.
        let unserved = !c.is_synced() && self.shared.announcer.is_some();
        match self.commit(&mut inner, services, &limits).await {
            Ok(()) => {
                c.set_applied(revision);
                info!(revision, "applied the cluster's services from etcd");
                if unserved {
                    match lock(&self.shared.writer).forget_unserved_changes() {
                        Ok(n) if n > 0 => {
                            info!(
                                slots = n,
                                "changes from the config file's tables forgotten (never served)"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => warn!("forgetting the config file's table changes: {e}"),
                    }
                }
            }
            Err(e) => {
                // This node runs its old table: the table gate withdraws it
                // (`table_differs`) if the others run the new one.
                c.mark_synced();
                let msg = format!(
                    "the cluster's services at revision {revision} were not applied on this node: {e}"
                );
                error!("{msg}");
                c.error(msg);
            }
        }
    }

    /// An API change in cluster mode: validated here, written to etcd only
    /// if the services there are still the ones it was made on (their
    /// revision), then applied here; the other nodes apply it from their
    /// watch. Lost race: nothing written, the newer services applied here,
    /// 409. etcd unreachable: nothing written, 503.
    pub(super) async fn cluster_commit(
        &self,
        c: &Cluster,
        inner: &mut Inner,
        services: Vec<ServiceConfig>,
    ) -> Result<(), ChangeError> {
        let limits = inner.limits;
        config::check_set(&services, &limits, &self.shared.config.policy).map_err(|e| match e {
            config::SetError::Policy(_) => ChangeError::Invalid(e.to_string()),
            _ => ChangeError::Conflict(e.to_string()),
        })?;
        config::check_attach(&services, self.shared.attach_mode)
            .map_err(|e| ChangeError::Conflict(e.in_body().to_string()))?;
        // Known unreachable: refused before anything is sent (a request
        // sent to a stopped member may still commit when it resumes).
        // A lost member (the watch's) is not a lost cluster: ask the others.
        if !c.is_connected() && c.client.get(&c.services_key()).await.is_err() {
            return Err(ChangeError::Unavailable(format!(
                "{}; nothing changed (this node keeps serving the last applied state); retry \
                 when etcd is back",
                c.last_error()
                    .unwrap_or_else(|| "etcd unreachable: not connected yet".into())
            )));
        }
        let expect = c.applied();
        let written = c
            .client
            .put_if(&c.services_key(), &Cluster::encode(&services), expect)
            .await
            .map_err(|e| match e {
                EtcdError::Unreachable(_) | EtcdError::Endpoint { .. } => {
                    ChangeError::Unavailable(format!(
                        "etcd unreachable: {e}; not applied here (this node keeps serving the \
                         last applied state); a member that got the request before it stopped \
                         answering may still store it, and every node then applies it: check \
                         the services before retrying"
                    ))
                }
                e => ChangeError::Failed(format!("etcd refused the change: {e}")),
            })?;
        if !written.succeeded {
            let now = written.current.as_ref().map_or(0, |kv| kv.mod_revision);
            if written.current.is_none() {
                // Someone deleted the key: the retry creates it again.
                c.forget_revision();
            }
            if let Some(kv) = written.current {
                match Cluster::decode(&kv.value) {
                    Ok(newer) if kv.mod_revision > c.applied() => {
                        c.offered(kv.mod_revision);
                        if self.commit(inner, newer, &limits).await.is_ok() {
                            c.set_applied(kv.mod_revision);
                        }
                    }
                    _ => {}
                }
            }
            return Err(ChangeError::Raced(format!(
                "the cluster's services changed in etcd (revision {expect} -> {now}, a change \
                 made through another node) while this change was made on them: nothing of it \
                 was written"
            )));
        }
        c.offered(written.revision);
        let applied = self.commit(inner, services, &limits).await;
        // Stored in etcd either way: the other nodes apply it.
        c.set_applied(written.revision);
        applied.map_err(|e| {
            let msg = format!(
                "stored in etcd at revision {} but not applied on this node: {e}",
                written.revision
            );
            c.error(msg.clone());
            ChangeError::Failed(msg)
        })
    }
}
