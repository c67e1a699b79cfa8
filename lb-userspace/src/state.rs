//! The state file: the services as the operator last changed them through
//! the API, so a restart keeps every acknowledged change. Written atomically
//! (temporary file, fsync, rename, fsync of the directory).
use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{self, RawService, Seg, ServiceConfig};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    services: Vec<RawService>,
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

/// The services kept in `path`, or `None` when there is no state file yet.
pub fn load(path: &Path) -> Result<Option<Vec<ServiceConfig>>, StateError> {
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
    if file.version != VERSION {
        return Err(invalid(format!(
            "version {} is not the version {VERSION} this lb writes",
            file.version
        )));
    }
    let mut services = Vec::new();
    for (i, raw) in file.services.iter().enumerate() {
        let path = [Seg::Key("services".into()), Seg::Index(i)];
        services.push(config::service(&path, raw).map_err(|e| invalid(e.in_body().to_string()))?);
    }
    Ok(Some(services))
}

/// Replaces the state file with `services`, atomically and durably.
pub fn save(path: &Path, services: &[ServiceConfig]) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.into(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let file = StateFile {
        version: VERSION,
        services: services.iter().map(RawService::from).collect(),
    };
    let text = serde_json::to_vec_pretty(&file).expect("state serializes");
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
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
            backends: vec![BackendConfig {
                address: "127.0.0.1:8001".parse().unwrap(),
                weight: 7,
                state: AdminState::Draining,
            }],
        }]
    }

    #[test]
    fn saves_and_loads() {
        let d = dir("roundtrip");
        let p = d.join("sub/state.json");
        assert!(load(&p).unwrap().is_none());
        save(&p, &services()).unwrap();
        assert_eq!(load(&p).unwrap().unwrap(), services());
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
        ] {
            fs::write(&p, bad).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains("--reset-state"), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
