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
}

/// Node-wide conditions.
#[derive(Clone, Copy, Debug)]
pub struct NodeInput {
    pub stopping: bool,
    pub attached: bool,
    pub alive: bool,
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
    } else if !s.usable {
        Reason::NoUsableBackend
    } else {
        Reason::Announced
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
        }
    }

    const UP: NodeInput = NodeInput {
        stopping: false,
        attached: true,
        alive: true,
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
}
