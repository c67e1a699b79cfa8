//! Announcing service addresses over BGP through the node's BIRD: which
//! services may be announced now (and why not), the TUN device the routes
//! hang on (it dies with the process, so BIRD withdraws a crashed daemon's
//! routes at once), and driving BIRD when the set changes.

pub mod bird;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::OwnedFd,
};

use serde::Serialize;
use tracing::{info, warn};

pub use bird::BirdError;

use crate::config::bgp::BgpConfig;

/// Why a service is or is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Every condition holds and BIRD took the route.
    Announced,
    /// The service listens on a wildcard address: nothing to announce.
    WildcardAddress,
    /// `lb stop` (or the daemon's shutdown) withdrew it.
    Stopping,
    /// The data plane is not attached to its interface.
    NotAttached,
    /// The daemon's loops died or stalled.
    NotAlive,
    /// No usable backend and not failing open: the table sends nowhere.
    NoUsableBackend,
    /// The conditions hold but BIRD did not take the new routes (see
    /// `last_error`); tried again every tick.
    BirdError,
    /// `[cluster]`: the daemon has not taken etcd's services since it
    /// started (restarted, rejoining, or etcd unreachable since): its
    /// tables may be stale.
    ClusterNotSynced,
    /// `[cluster] pin_sync`: the node has not yet taken a peer's pins of
    /// changed slots since it started (it announces once one peer answered
    /// whole, or no peer exists, or none answered within the join's bound).
    PinsNotSynced,
    /// `[cluster]`: the service's table fingerprint is not the cluster's
    /// (the one a majority of live nodes hold) for longer than
    /// [`TABLE_GRACE`].
    TableDiffers,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Announced => "announced",
            Reason::WildcardAddress => "wildcard_address",
            Reason::Stopping => "stopping",
            Reason::NotAttached => "not_attached",
            Reason::NotAlive => "not_alive",
            Reason::NoUsableBackend => "no_usable_backend",
            Reason::BirdError => "bird_error",
            Reason::ClusterNotSynced => "cluster_not_synced",
            Reason::PinsNotSynced => "pins_not_synced",
            Reason::TableDiffers => "table_differs",
        }
    }
}

/// One service's announce state, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AnnounceView {
    pub announced: bool,
    pub reason: Reason,
}

/// What the announcer is told about one service on each tick.
#[derive(Clone, Debug)]
pub struct ServiceInput {
    pub name: String,
    pub address: IpAddr,
    pub usable: bool,
    /// The table gate's verdict (always `Ok` without `[cluster]`).
    pub table: TableState,
}

/// Node-wide conditions.
#[derive(Clone, Copy, Debug)]
pub struct NodeInput {
    pub stopping: bool,
    pub attached: bool,
    pub alive: bool,
    /// The pin-sync join is done (always true without `pin_sync`).
    pub pins_synced: bool,
}

/// The reason for one service, before BIRD is asked.
pub fn decide(node: NodeInput, s: &ServiceInput) -> Reason {
    if s.address.is_unspecified() {
        Reason::WildcardAddress
    } else if node.stopping {
        Reason::Stopping
    } else if !node.attached {
        Reason::NotAttached
    } else if !node.alive {
        Reason::NotAlive
    } else if s.table == TableState::NotSynced {
        Reason::ClusterNotSynced
    } else if !node.pins_synced {
        Reason::PinsNotSynced
    } else if !s.usable {
        Reason::NoUsableBackend
    } else if s.table == TableState::Differs {
        Reason::TableDiffers
    } else {
        Reason::Announced
    }
}

/// Where a service's table stands against the cluster's, for [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableState {
    /// No objection: no `[cluster]`, or the table is the cluster's, or no
    /// fingerprint has a majority.
    Ok,
    NotSynced,
    Differs,
}

/// Every change reaches the nodes within ~100 ms and their fingerprints
/// are published within a few hundred more: a difference must outlast this
/// before a node is withdrawn for it (else every node would withdraw on
/// every change).
pub const TABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the gate knows of the node's link to the cluster on one tick.
#[derive(Clone, Copy, Debug)]
pub struct ClusterLink {
    /// The daemon has taken etcd's services since it started.
    pub synced: bool,
    /// etcd answers now.
    pub connected: bool,
}

/// The table gate (`[cluster]` only): per service, whether it passed (its
/// table was the cluster's, or no fingerprint had a majority) and since
/// when its table differs. A service starts out not passed, so a node
/// that comes up or rejoins announces only once its table has matched.
#[derive(Debug, Default)]
pub struct TableGate {
    passed: BTreeSet<String>,
    differs_since: BTreeMap<String, std::time::Instant>,
    /// The tables were compared with the cluster's at least once (synced
    /// and connected); before that the node counts as not synced.
    compared: bool,
}

impl TableGate {
    /// One service's state at `now`: `own` is its installed fingerprint,
    /// `cluster` the majority's (None: no majority).
    /// - not synced, or never compared with the cluster since: `NotSynced`;
    /// - etcd unreachable: the last verdict holds (nothing is known of
    ///   the others; traffic goes on as it was);
    /// - no majority: `Ok` (withdrawing every node would be an outage);
    /// - equal: `Ok`; different: the last verdict for [`TABLE_GRACE`]
    ///   from when the difference was first seen, then `Differs`.
    pub fn check(
        &mut self,
        service: &str,
        link: ClusterLink,
        own: Option<&str>,
        cluster: Option<&str>,
        now: std::time::Instant,
    ) -> TableState {
        if !link.synced || !(link.connected || self.compared) {
            self.passed.remove(service);
            self.differs_since.remove(service);
            return TableState::NotSynced;
        }
        if link.connected {
            self.compared = true;
            if cluster.is_none() || own == cluster {
                self.differs_since.remove(service);
                self.passed.insert(service.to_string());
            } else {
                let since = *self.differs_since.entry(service.to_string()).or_insert(now);
                if now.saturating_duration_since(since) >= TABLE_GRACE {
                    self.passed.remove(service);
                }
            }
        }
        if self.passed.contains(service) {
            TableState::Ok
        } else {
            TableState::Differs
        }
    }

    /// Forgets services no longer configured.
    pub fn retain(&mut self, services: &BTreeSet<&str>) {
        self.passed.retain(|s| services.contains(s.as_str()));
        self.differs_since
            .retain(|s, _| services.contains(s.as_str()));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("cannot create the announce interface {name} (TUN, /dev/net/tun): {source}")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bird(#[from] BirdError),
}

/// The daemon's announcer: holds the TUN device and what BIRD was last
/// given.
pub struct Announcer {
    config: BgpConfig,
    tun: Option<OwnedFd>,
    /// Addresses in the include file BIRD last read (None: unknown).
    written: Option<BTreeSet<IpAddr>>,
    states: BTreeMap<String, AnnounceView>,
    last_error: Option<String>,
}

impl Announcer {
    /// Withdraws whatever an earlier daemon left in the include file (so
    /// its routes do not come back with the new TUN device before the
    /// conditions are checked), then creates the device.
    pub async fn start(config: BgpConfig) -> Result<Self, AnnounceError> {
        let mut a = Self {
            config,
            tun: None,
            written: None,
            states: BTreeMap::new(),
            last_error: None,
        };
        bird::write_include(
            &a.config.include_file,
            &bird::render(&[], &a.config.interface),
        )?;
        a.written = Some(BTreeSet::new());
        if let Err(e) = bird::configure(&a.config.bird_socket).await {
            // BIRD reads the (empty) file when it starts; keep going.
            warn!("{e}; announcing once BIRD answers");
            a.written = None;
        }
        let tun =
            crate::sys::tun_device(&a.config.interface).map_err(|source| AnnounceError::Tun {
                name: a.config.interface.clone(),
                source,
            })?;
        a.tun = Some(tun);
        info!(interface = %a.config.interface, "announce interface up");
        Ok(a)
    }

    /// Applies one tick: the services' reasons, the include file and
    /// BIRD when the address set changed (or the last attempt failed).
    pub async fn tick(&mut self, node: NodeInput, services: &[ServiceInput]) {
        let mut reasons: BTreeMap<String, (IpAddr, Reason)> = BTreeMap::new();
        for s in services {
            reasons.insert(s.name.clone(), (s.address, decide(node, s)));
        }
        let want: BTreeSet<IpAddr> = reasons
            .values()
            .filter(|(_, r)| *r == Reason::Announced)
            .map(|(a, _)| *a)
            .collect();
        let mut bird_ok = self.written.as_ref() == Some(&want);
        if !bird_ok {
            match self.push(&want).await {
                Ok(()) => {
                    bird_ok = true;
                    if self.last_error.take().is_some() {
                        info!("BIRD took the announce routes again");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.last_error.as_ref() != Some(&text) {
                        warn!("announcing: {text}");
                    }
                    self.last_error = Some(text);
                }
            }
        }
        let mut states = BTreeMap::new();
        for (name, (_, reason)) in reasons {
            let reason = if reason == Reason::Announced && !bird_ok {
                Reason::BirdError
            } else {
                reason
            };
            let view = AnnounceView {
                announced: reason == Reason::Announced,
                reason,
            };
            let before = self.states.get(&name);
            if before != Some(&view) {
                info!(
                    service = %name,
                    announced = view.announced,
                    reason = reason.name(),
                    "service {}",
                    if view.announced { "announced" } else { "not announced" }
                );
            }
            states.insert(name, view);
        }
        for gone in self.states.keys().filter(|n| !states.contains_key(*n)) {
            info!(service = %gone, "service removed: no longer announced");
        }
        self.states = states;
    }

    async fn push(&mut self, want: &BTreeSet<IpAddr>) -> Result<(), BirdError> {
        let list: Vec<IpAddr> = want.iter().copied().collect();
        // Unknown until BIRD has read it.
        self.written = None;
        bird::write_include(
            &self.config.include_file,
            &bird::render(&list, &self.config.interface),
        )?;
        bird::configure(&self.config.bird_socket).await?;
        self.written = Some(want.clone());
        Ok(())
    }

    /// Withdraws every route (`lb stop`, shutdown) and removes the TUN
    /// device, which withdraws them even if BIRD cannot be told.
    pub async fn withdraw_all(&mut self, services: &[ServiceInput]) {
        let node = NodeInput {
            stopping: true,
            attached: true,
            alive: true,
            pins_synced: true,
        };
        self.tun = None;
        self.tick(node, services).await;
    }

    /// Every service's state after the last tick.
    pub fn states(&self) -> &BTreeMap<String, AnnounceView> {
        &self.states
    }

    /// The last error talking to BIRD, cleared when it answers again.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(address: &str, usable: bool) -> ServiceInput {
        ServiceInput {
            name: "web".into(),
            address: address.parse().unwrap(),
            usable,
            table: TableState::Ok,
        }
    }

    const UP: NodeInput = NodeInput {
        stopping: false,
        attached: true,
        alive: true,
        pins_synced: true,
    };

    #[test]
    fn every_condition_must_hold() {
        assert_eq!(decide(UP, &svc("10.0.0.1", true)), Reason::Announced);
        assert_eq!(decide(UP, &svc("0.0.0.0", true)), Reason::WildcardAddress);
        assert_eq!(decide(UP, &svc("::", true)), Reason::WildcardAddress);
        assert_eq!(decide(UP, &svc("10.0.0.1", false)), Reason::NoUsableBackend);
        let stop = NodeInput {
            stopping: true,
            ..UP
        };
        assert_eq!(decide(stop, &svc("10.0.0.1", true)), Reason::Stopping);
        let detached = NodeInput {
            attached: false,
            ..UP
        };
        assert_eq!(
            decide(detached, &svc("10.0.0.1", true)),
            Reason::NotAttached
        );
        let dead = NodeInput { alive: false, ..UP };
        assert_eq!(decide(dead, &svc("10.0.0.1", true)), Reason::NotAlive);
    }

    #[test]
    fn the_table_gate_comes_after_liveness_and_usability() {
        let not_synced = ServiceInput {
            table: TableState::NotSynced,
            ..svc("10.0.0.1", false)
        };
        assert_eq!(decide(UP, &not_synced), Reason::ClusterNotSynced);
        let dead = NodeInput { alive: false, ..UP };
        assert_eq!(decide(dead, &not_synced), Reason::NotAlive);
        let differs = ServiceInput {
            table: TableState::Differs,
            ..svc("10.0.0.1", true)
        };
        assert_eq!(decide(UP, &differs), Reason::TableDiffers);
        let differs_unusable = ServiceInput {
            usable: false,
            ..differs
        };
        assert_eq!(decide(UP, &differs_unusable), Reason::NoUsableBackend);
    }

    #[test]
    fn the_pin_join_is_checked_after_the_cluster_sync() {
        let joining = NodeInput {
            pins_synced: false,
            ..UP
        };
        assert_eq!(
            decide(joining, &svc("10.0.0.1", true)),
            Reason::PinsNotSynced
        );
        // Before it: what the node is and whether its tables are etcd's.
        let not_synced = ServiceInput {
            table: TableState::NotSynced,
            ..svc("10.0.0.1", true)
        };
        assert_eq!(decide(joining, &not_synced), Reason::ClusterNotSynced);
        let dead = NodeInput {
            alive: false,
            ..joining
        };
        assert_eq!(decide(dead, &svc("10.0.0.1", true)), Reason::NotAlive);
        assert_eq!(
            decide(joining, &svc("0.0.0.0", true)),
            Reason::WildcardAddress
        );
        // After it: usability and the table comparison.
        assert_eq!(
            decide(joining, &svc("10.0.0.1", false)),
            Reason::PinsNotSynced
        );
        let differs = ServiceInput {
            table: TableState::Differs,
            ..svc("10.0.0.1", true)
        };
        assert_eq!(decide(joining, &differs), Reason::PinsNotSynced);
        assert_eq!(decide(UP, &differs), Reason::TableDiffers);
    }

    const SYNCED: ClusterLink = ClusterLink {
        synced: true,
        connected: true,
    };

    #[test]
    fn the_table_gate_waits_for_a_sync_and_a_match() {
        let t0 = std::time::Instant::now();
        let mut g = TableGate::default();
        let not_synced = ClusterLink {
            synced: false,
            connected: true,
        };
        assert_eq!(
            g.check("web", not_synced, Some("a"), Some("a"), t0),
            TableState::NotSynced
        );
        // Synced, but etcd went away before the tables were compared.
        let cut_off = ClusterLink {
            synced: true,
            connected: false,
        };
        assert_eq!(
            g.check("web", cut_off, Some("a"), Some("a"), t0),
            TableState::NotSynced
        );
        // Synced but different from the start (a rejoining node with a
        // stale or wrong table): never passes, grace or not.
        assert_eq!(
            g.check("web", SYNCED, Some("b"), Some("a"), t0),
            TableState::Differs
        );
        assert_eq!(
            g.check("web", SYNCED, Some("b"), Some("a"), t0 + TABLE_GRACE * 3),
            TableState::Differs
        );
        // Its table matches: it passes at once.
        assert_eq!(
            g.check("web", SYNCED, Some("a"), Some("a"), t0 + TABLE_GRACE * 3),
            TableState::Ok
        );
    }

    #[test]
    fn a_short_difference_does_not_withdraw_a_long_one_does() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut g = TableGate::default();
        assert_eq!(
            g.check("web", SYNCED, Some("a"), Some("a"), t0),
            TableState::Ok
        );
        // A change: this node has it first (or last) for a moment.
        assert_eq!(
            g.check("web", SYNCED, Some("b"), Some("a"), t0 + ms(100)),
            TableState::Ok
        );
        assert_eq!(
            g.check(
                "web",
                SYNCED,
                Some("b"),
                Some("a"),
                t0 + ms(100) + TABLE_GRACE - ms(1)
            ),
            TableState::Ok
        );
        assert_eq!(
            g.check("web", SYNCED, Some("b"), Some("b"), t0 + ms(500)),
            TableState::Ok
        );
        // The grace runs from when the difference was first seen again.
        let t1 = t0 + ms(1000);
        assert_eq!(
            g.check("web", SYNCED, Some("c"), Some("b"), t1),
            TableState::Ok
        );
        assert_eq!(
            g.check("web", SYNCED, Some("c"), Some("b"), t1 + TABLE_GRACE),
            TableState::Differs
        );
        // A node that never got a table differs too.
        let mut g = TableGate::default();
        assert_eq!(
            g.check("web", SYNCED, None, Some("b"), t0),
            TableState::Differs
        );
    }

    #[test]
    fn no_majority_withdraws_nobody_and_etcd_gone_keeps_the_last_verdict() {
        let t0 = std::time::Instant::now();
        let mut g = TableGate::default();
        assert_eq!(g.check("web", SYNCED, Some("a"), None, t0), TableState::Ok);
        assert_eq!(
            g.check("api", SYNCED, Some("x"), Some("y"), t0),
            TableState::Differs
        );
        let cut_off = ClusterLink {
            synced: true,
            connected: false,
        };
        let later = t0 + TABLE_GRACE * 10;
        // Whatever the (stale) cluster view says, the verdicts hold.
        assert_eq!(
            g.check("web", cut_off, Some("c"), Some("d"), later),
            TableState::Ok
        );
        assert_eq!(
            g.check("api", cut_off, Some("y"), Some("y"), later),
            TableState::Differs
        );
        // A service this node never checked while connected stays out.
        assert_eq!(
            g.check("new", cut_off, Some("y"), None, later),
            TableState::Differs
        );
        g.retain(&["api"].into());
        assert_eq!(
            g.check("web", cut_off, Some("a"), None, later),
            TableState::Differs
        );
    }
}
