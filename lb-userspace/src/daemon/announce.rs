//! The daemon's announce task: every tick it gathers the node's and each
//! service's conditions and hands them to the announcer (`crate::announce`),
//! which keeps BIRD's routes in step.
use super::*;
use crate::announce::{
    AnnounceView, Announcer, ClusterLink, NodeInput, ServiceInput, TableGate, TableState,
};

/// How often the conditions are checked: a lost condition is withdrawn
/// within this (plus BIRD's and BGP's own delays).
const TICK: Duration = Duration::from_millis(100);
/// `alive`'s bound on the wait for the daemon's state.
const ALIVE_WITHIN: Duration = Duration::from_millis(500);

impl Daemon {
    /// Each service's address and whether its table sends new flows.
    async fn announce_inputs(&self) -> Vec<ServiceInput> {
        let listen: Vec<(String, std::net::IpAddr)> = {
            let inner = self.shared.inner.lock().await;
            inner
                .services
                .iter()
                .map(|s| (s.name.clone(), s.listen.ip()))
                .collect()
        };
        let w = lock(&self.shared.writer);
        listen
            .into_iter()
            .map(|(name, address)| ServiceInput {
                usable: w.has_usable_backend(&name),
                name,
                address,
                table: TableState::Ok,
            })
            .collect()
    }

    /// `[cluster]`: each service's table against the cluster's, through
    /// the gate (its grace and memory live in `gate`).
    fn gate_tables(&self, gate: &mut TableGate, services: &mut [ServiceInput]) {
        let Some(c) = &self.shared.cluster else {
            return;
        };
        let own = self.table_fingerprints();
        let cluster = c.cluster_fingerprints(&own);
        let link = ClusterLink {
            synced: c.is_synced(),
            connected: c.is_connected(),
        };
        let now = Instant::now();
        for s in services.iter_mut() {
            s.table = gate.check(
                &s.name,
                link,
                own.get(&s.name).map(String::as_str),
                cluster.get(&s.name).map(String::as_str),
                now,
            );
        }
        gate.retain(&services.iter().map(|s| s.name.as_str()).collect());
    }

    /// The announce loop, for the daemon's life (only with `[bgp]`).
    pub(super) async fn announce(self) {
        let Some(announcer) = self.shared.announcer.as_ref() else {
            return;
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gate = TableGate::default();
        loop {
            tick.tick().await;
            let stopping = *self.shared.stop.borrow();
            let node = NodeInput {
                stopping,
                attached: self.attached(),
                alive: self.alive(ALIVE_WITHIN).await,
                pins_synced: self.shared.pin_sync.as_ref().is_none_or(|s| s.joined()),
            };
            let mut services = self.announce_inputs().await;
            self.gate_tables(&mut gate, &mut services);
            let mut a = announcer.lock().await;
            a.tick(node, &services).await;
            *lock(&self.shared.announce_states) = a.states().clone();
        }
    }

    /// Withdraws every announced address (shutdown, `lb stop`).
    pub(super) async fn withdraw_all(&self) {
        let Some(announcer) = self.shared.announcer.as_ref() else {
            return;
        };
        let services = self.announce_inputs().await;
        let mut a = announcer.lock().await;
        a.withdraw_all(&services).await;
        *lock(&self.shared.announce_states) = a.states().clone();
    }

    /// Each service's announce state after the last tick (empty without
    /// `[bgp]`); never waits for BIRD.
    pub fn announce_states(&self) -> std::collections::BTreeMap<String, AnnounceView> {
        lock(&self.shared.announce_states).clone()
    }

    /// Each service's installed table fingerprint (hex).
    pub(super) fn table_fingerprints(&self) -> crate::cluster::tables::Fingerprints {
        let w = lock(&self.shared.writer);
        w.service_names()
            .filter_map(|n| Some((n.to_string(), format!("{:016x}", w.table_fingerprint(n)?))))
            .collect()
    }
}

/// Starts the announcer when the config has `[bgp]`, and says which
/// services it will never announce.
pub(super) async fn announcer(
    config: &Config,
) -> Result<Option<tokio::sync::Mutex<Announcer>>, StartError> {
    let Some(bgp) = config.bgp.clone() else {
        return Ok(None);
    };
    for s in config
        .services
        .iter()
        .filter(|s| s.listen.ip().is_unspecified())
    {
        warn!(
            service = %s.name,
            "listens on a wildcard address ({}): not announced over BGP; give it the service address",
            s.listen
        );
    }
    let a = Announcer::start(bgp).await?;
    Ok(Some(tokio::sync::Mutex::new(a)))
}
