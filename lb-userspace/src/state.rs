//! The state file: what the daemon learnt while running that the config
//! file does not say. The config file is the source of truth for services;
//! changes made through the API are kept here together with a fingerprint
//! of the config services they were made on (and those services, so a
//! dropped change can be named), and re-applied only while that config is
//! unchanged. Each backend's last health verdict is kept too, so a restart
//! does not put a backend known down back in service. Written atomically
//! (temporary file, fsync, rename, fsync of the directory), mode 0600.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{self, RawService, Seg, ServiceConfig};

const VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Version 1 files: the services as last changed through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    services: Option<Vec<RawService>>,
    /// [`fingerprint`] of the config services the changes were made on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_fingerprint: Option<String>,
    /// The config services the changes were made on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<Vec<RawService>>,
    /// The services after the API changes (absent: no change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    changed: Option<Vec<RawService>>,
    /// Last health verdict by service, then backend.
    #[serde(default)]
    health: BTreeMap<String, BTreeMap<SocketAddr, bool>>,
    /// QUIC-LB server ids (hex) by service, then backend: the ones the
    /// daemon assigned stay with their backends across restarts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    server_ids: BTreeMap<String, BTreeMap<SocketAddr, String>>,
}

/// Health verdicts by (service, backend); a missing one counts as healthy.
pub type Verdicts = HashMap<(String, SocketAddr), bool>;

/// The state file's contents, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Saved {
    /// The fingerprint of `base`; `None` for a state file of an older lb.
    pub fingerprint: Option<String>,
    /// The config services the API changes were made on.
    pub base: Vec<ServiceConfig>,
    /// The services after the API changes, when there are any.
    pub changed: Option<Vec<ServiceConfig>>,
    pub health: Verdicts,
    /// Every backend's QUIC-LB server id when last saved.
    pub server_ids: config::quic::ServerIds,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} is damaged ({message}); fix or remove it, or start with --reset-state \
         to discard the changes it holds"
    )]
    Invalid { path: PathBuf, message: String },
}

/// A stable fingerprint of a config's services (FNV-1a of their canonical
/// JSON form): equal when the services are, whatever the file's layout,
/// comments or other sections.
pub fn fingerprint(services: &[ServiceConfig]) -> String {
    let raw: Vec<RawService> = services.iter().map(RawService::from).collect();
    #[expect(
        clippy::expect_used,
        reason = "plain structs with string keys: serde_json cannot fail on them"
    )]
    let text = serde_json::to_vec(&raw).expect("services serialize");
    format!("{:016x}", config::fnv1a(&text))
}

/// Human descriptions of what `changed` changes in `base`: the API changes
/// a config edit dropped.
pub fn describe_changes(base: &[ServiceConfig], changed: &[ServiceConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for s in base {
        if !changed.iter().any(|c| c.name == s.name) {
            out.push(format!("service {}: removed", s.name));
        }
    }
    for c in changed {
        let Some(s) = base.iter().find(|s| s.name == c.name) else {
            out.push(format!(
                "service {}: added ({} backends)",
                c.name,
                c.backends.len()
            ));
            continue;
        };
        if s.listen != c.listen
            || s.protocols != c.protocols
            || s.forwarding != c.forwarding
            || s.health != c.health
        {
            out.push(format!(
                "service {}: listen, protocols, forwarding or health check replaced",
                c.name
            ));
        }
        for b in &s.backends {
            if !c.backends.iter().any(|x| x.address == b.address) {
                out.push(format!("service {}: backend {} removed", c.name, b.address));
            }
        }
        for b in &c.backends {
            match s.backends.iter().find(|x| x.address == b.address) {
                None => out.push(format!(
                    "service {}: backend {} added (weight {}, {})",
                    c.name,
                    b.address,
                    b.weight,
                    b.state.name()
                )),
                Some(old) => {
                    if old.weight != b.weight {
                        out.push(format!(
                            "service {}: backend {} weight {} -> {}",
                            c.name, b.address, old.weight, b.weight
                        ));
                    }
                    if old.state != b.state {
                        out.push(format!(
                            "service {}: backend {} {} -> {}",
                            c.name,
                            b.address,
                            old.state.name(),
                            b.state.name()
                        ));
                    }
                }
            }
        }
    }
    out
}

fn services(
    list: &[RawService],
    field: &str,
    invalid: &dyn Fn(String) -> StateError,
) -> Result<Vec<ServiceConfig>, StateError> {
    let mut out = Vec::new();
    for (i, raw) in list.iter().enumerate() {
        let path = [Seg::Key(field.into()), Seg::Index(i)];
        out.push(config::service(&path, raw).map_err(|e| invalid(e.in_body().to_string()))?);
    }
    Ok(out)
}

/// What `path` holds, or `None` when there is no state file yet.
pub fn load(path: &Path) -> Result<Option<Saved>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let invalid = |message: String| StateError::Invalid {
        path: path.into(),
        message,
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    match file.version {
        // Services only, made on a config nobody recorded.
        1 => Ok(Some(Saved {
            fingerprint: None,
            base: Vec::new(),
            changed: Some(services(
                file.services.as_deref().unwrap_or_default(),
                "services",
                &invalid,
            )?),
            health: Verdicts::new(),
            server_ids: config::quic::ServerIds::new(),
        })),
        VERSION => {
            let mut health = Verdicts::new();
            for (svc, backends) in file.health {
                for (b, up) in backends {
                    health.insert((svc.clone(), b), up);
                }
            }
            let mut server_ids = config::quic::ServerIds::new();
            for (svc, backends) in file.server_ids {
                for (b, hex) in backends {
                    let id = config::quic::ServerId::parse(&hex)
                        .map_err(|m| invalid(format!("server_ids.{svc}.{b}: {m}")))?;
                    server_ids.insert((svc.clone(), b), id);
                }
            }
            Ok(Some(Saved {
                server_ids,
                fingerprint: file.config_fingerprint,
                base: services(file.base.as_deref().unwrap_or_default(), "base", &invalid)?,
                changed: match &file.changed {
                    Some(c) => Some(services(c, "changed", &invalid)?),
                    None => None,
                },
                health,
            }))
        }
        v => Err(invalid(format!(
            "version {v} is not a version this lb reads (1 or {VERSION})"
        ))),
    }
}

/// Replaces the state file with `saved`, atomically and durably.
pub fn save(path: &Path, saved: &Saved) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.into(),
        source,
    };
    let mut health: BTreeMap<String, BTreeMap<SocketAddr, bool>> = BTreeMap::new();
    for ((svc, b), up) in &saved.health {
        health.entry(svc.clone()).or_default().insert(*b, *up);
    }
    let mut server_ids: BTreeMap<String, BTreeMap<SocketAddr, String>> = BTreeMap::new();
    for ((svc, b), id) in &saved.server_ids {
        server_ids
            .entry(svc.clone())
            .or_default()
            .insert(*b, id.to_string());
    }
    let file = StateFile {
        version: VERSION,
        services: None,
        config_fingerprint: Some(
            saved
                .fingerprint
                .clone()
                .unwrap_or_else(|| fingerprint(&saved.base)),
        ),
        base: Some(saved.base.iter().map(RawService::from).collect()),
        changed: saved
            .changed
            .as_ref()
            .map(|c| c.iter().map(RawService::from).collect()),
        health,
        server_ids,
    };
    let text = serde_json::to_vec_pretty(&file)
        .map_err(std::io::Error::other)
        .map_err(io)?;
    crate::files::write_private_atomic(path, &text).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, ServiceConfig};
    use crate::dataplane::{AdminState, Forwarding, Protocol};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn services() -> Vec<ServiceConfig> {
        vec![ServiceConfig {
            name: "web".into(),
            listen: "0.0.0.0:443".parse().unwrap(),
            protocols: vec![Protocol::Tcp],
            forwarding: Forwarding::Local,
            health: None,
            when_all_down: crate::dataplane::WhenAllDown::Refuse,
            allowed_backend_networks: Vec::new(),
            backends: vec![BackendConfig {
                address: "127.0.0.1:8001".parse().unwrap(),
                weight: 7,
                state: AdminState::Draining,
                server_id: None,
            }],
            quic: None,
        }]
    }

    #[test]
    fn saves_and_loads() {
        let d = dir("roundtrip");
        let p = d.join("sub/state.json");
        assert!(load(&p).unwrap().is_none());
        let mut changed = services();
        changed[0].backends[0].weight = 9;
        let saved = Saved {
            server_ids: [(
                ("web".to_string(), "127.0.0.1:8001".parse().unwrap()),
                config::quic::ServerId(vec![0, 7]),
            )]
            .into(),
            fingerprint: Some(fingerprint(&services())),
            base: services(),
            changed: Some(changed),
            health: [(
                ("web".to_string(), "127.0.0.1:8001".parse().unwrap()),
                false,
            )]
            .into(),
        };
        save(&p, &saved).unwrap();
        assert_eq!(load(&p).unwrap().unwrap(), saved);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damaged_files_are_refused_with_a_way_out() {
        let d = dir("damaged");
        fs::create_dir_all(&d).unwrap();
        let p = d.join("state.json");
        for bad in [
            "{",
            "{\"version\": 9, \"services\": []}",
            "{\"version\": 1, \"services\": [{\"name\": \"\"}]}",
            "{\"version\": 2, \"changed\": [{\"name\": \"\"}]}",
        ] {
            fs::write(&p, bad).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains("--reset-state"), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fingerprints_follow_the_services_and_changes_are_named() {
        let base = services();
        assert_eq!(fingerprint(&base), fingerprint(&services()));
        let mut changed = services();
        changed[0].backends[0].weight = 9;
        changed[0].backends.push(BackendConfig {
            address: "127.0.0.1:8002".parse().unwrap(),
            weight: 1,
            state: AdminState::Active,
            server_id: None,
        });
        assert_ne!(fingerprint(&base), fingerprint(&changed));
        assert_eq!(
            describe_changes(&base, &changed),
            [
                "service web: backend 127.0.0.1:8001 weight 7 -> 9",
                "service web: backend 127.0.0.1:8002 added (weight 1, active)",
            ]
        );
        assert_eq!(describe_changes(&changed, &[]), ["service web: removed"]);
    }
}
