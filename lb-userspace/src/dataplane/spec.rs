//! The desired state the map writer installs: services, their backends and
//! how packets reach them. The enums are also the wire values of configs,
//! API bodies and the state file (their serde names are the config's).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, FWD_DSR, FWD_LOCAL, FWD_NAT, PROTO_TCP,
    PROTO_UDP,
};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Backends are ports on this host.
    #[default]
    Local,
    /// Backends are other hosts; destination rewritten, replies come back
    /// through this host and are translated back.
    Nat,
    /// Backends are other hosts on this L2 segment holding the service
    /// address; only MACs change, replies go straight to clients.
    Dsr,
}

impl Forwarding {
    pub(super) fn code(self) -> u8 {
        match self {
            Self::Local => FWD_LOCAL,
            Self::Nat => FWD_NAT,
            Self::Dsr => FWD_DSR,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Nat => "nat",
            Self::Dsr => "dsr",
        }
    }
}

/// What the operator asked of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    /// No new flows; existing flows stay.
    Draining,
    /// Out of service; existing flows are re-picked.
    Disabled,
}

impl AdminState {
    /// The name configs, the API and the state file use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Disabled => "disabled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: SocketAddr,
    pub weight: u16,
    pub state: AdminState,
    /// Health as the checker last decided it.
    pub healthy: bool,
}

impl BackendSpec {
    pub fn new(address: SocketAddr, weight: u16) -> Self {
        Self {
            address,
            weight,
            state: AdminState::Active,
            healthy: true,
        }
    }

    pub(super) fn dataplane_state(&self) -> u8 {
        match (self.state, self.healthy) {
            (AdminState::Disabled, _) | (_, false) => BACKEND_DOWN,
            (AdminState::Draining, true) => BACKEND_DRAINING,
            (AdminState::Active, true) => BACKEND_ACTIVE,
        }
    }

    /// Takes new flows: in the Maglev table.
    pub(super) fn in_table(&self) -> bool {
        self.dataplane_state() == BACKEND_ACTIVE && self.weight > 0
    }
}

/// What a service does when health checks take down every backend that
/// was taking new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllDown {
    /// Nothing takes new flows: connections are refused.
    Refuse,
    /// Fail open (Envoy's "panic mode"): the backends that were up last stay
    /// in the table and keep their flows until one backend is healthy again.
    #[default]
    KeepLast,
}

impl WhenAllDown {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::KeepLast => "keep_last",
        }
    }
}

/// A service as the map writer installs it: the model's
/// [`ServiceConfig`](crate::config::ServiceConfig) with each backend's
/// health, built by [`ServiceSpec::of`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// `0.0.0.0` (IPv4 packets) or `::` (IPv6 packets) for any local address.
    pub listen: SocketAddr,
    pub protocols: Vec<Protocol>,
    pub forwarding: Forwarding,
    pub backends: Vec<BackendSpec>,
    pub when_all_down: WhenAllDown,
}

impl ServiceSpec {
    /// The projection of the model: `healthy` says what the checker last
    /// decided of a backend.
    pub fn of(s: &crate::config::ServiceConfig, healthy: impl Fn(SocketAddr) -> bool) -> Self {
        Self {
            name: s.name.clone(),
            listen: s.listen,
            protocols: s.protocols.clone(),
            forwarding: s.forwarding,
            when_all_down: s.when_all_down,
            backends: s
                .backends
                .iter()
                .map(|b| BackendSpec {
                    address: b.address,
                    weight: b.weight,
                    state: b.state,
                    healthy: healthy(b.address),
                })
                .collect(),
        }
    }
}

// The cross-service rules read a spec as they read the config it was built
// from.
crate::config::service_shape!(ServiceSpec);
