//! The configuration: TOML on disk, the same service shape as JSON in the
//! admin API and the state file. Everything is validated as a whole before
//! anything is applied; every error names the file, line and field.

pub mod bgp;
mod duration;
mod errors;
mod file;
mod model;
mod paths;
pub mod pin_sync;
pub mod quic;
mod spans;
mod validate;
mod wire;

pub use duration::{MAX_DURATION, WireDuration, format_duration, parse_duration};
pub use errors::{ConfigError, FieldError, LimitError, Seg};
pub use model::{
    AddressRule, AdminConfig, BackendConfig, Cidr, ClusterConfig, Config,
    DEFAULT_MAX_BACKENDS_PER_SERVICE, EtcdEndpoint, Limits, Policy, ServiceConfig,
    forbidden_backend_ip,
};
pub use paths::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_ADMIN_SOCKET, DEFAULT_PIN_PATH, DEFAULT_STATE_DIR, FNV1A_START,
    default_admin_socket, default_state_file, fnv1a, fnv1a_extend, legacy_record_path, record_path,
};
pub(crate) use validate::service_shape;
pub use validate::{
    ServiceShape, SetError, backend, check_attach, check_conflicts, check_limits, check_policy,
    check_services, check_set, ephemeral_port_range, local_port_warnings, service,
};
pub use wire::{
    AdminState, AttachMode, Forwarding, HealthKind, Protocol, RawAdmin, RawBackend, RawCluster,
    RawDataplane, RawFile, RawHealth, RawHealthGlobal, RawLimits, RawPolicy, RawQuic, RawService,
    WhenAllDown,
};

#[cfg(test)]
mod tests;
