//! QUIC-LB in the config: a service's `quic` table (the draft's limits, the
//! key file), backends' `server_id`s, and the ids the daemon assigns to
//! backends that have none (unique per service, kept across reloads).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use lb_common::quic::{CidConfig, CidMode};
use serde::{Deserialize, Serialize};

use super::{
    errors::{FieldError, Seg, index, key},
    model::ServiceConfig,
    wire::RawQuic,
};
use crate::dataplane::Protocol;

/// A service's QUIC-LB configuration, validated (the key read from its file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    pub cid: CidConfig,
    pub key_file: Option<PathBuf>,
}

/// `mode` in the config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuicMode {
    /// The server id is readable in the CID.
    #[default]
    Plaintext,
    /// AES-128 over server id and nonce (single pass when they make 16
    /// bytes, else the draft's four-pass Feistel network).
    Encrypted,
}

impl QuicMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Encrypted => "encrypted",
        }
    }
}

/// A backend's server id: `server_id_len` bytes, written as hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub Vec<u8>);

impl ServerId {
    pub fn parse(s: &str) -> Result<ServerId, String> {
        let s = s.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a server id: write its bytes as hex, two digits each (e.g. \"0a1b\")"
            ));
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| format!("{s:?}: {e}"))?;
        Ok(ServerId(bytes))
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Reads a QUIC-LB key file: 32 hex digits (16 bytes), whitespace around
/// them trimmed; a secret, so owned by root (or this user) and mode 0600.
pub fn read_key_file(path: &Path) -> Result<[u8; 16], String> {
    let text = crate::files::read_secret(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let id = ServerId::parse(&text).ok().filter(|k| k.0.len() == 16);
    let Some(ServerId(bytes)) = id else {
        return Err(format!(
            "{} must hold the 16-byte AES key as 32 hex digits",
            path.display()
        ));
    };
    let mut key = [0u8; 16];
    key.copy_from_slice(&bytes);
    Ok(key)
}

fn small(path: &[Seg], v: i64, lo: u8, hi: u8) -> Result<u8, FieldError> {
    super::validate::int_in(path, v, i64::from(lo), i64::from(hi)).map(|v| v as u8)
}

/// Validates a service's `quic` table.
pub fn quic(path: &[Seg], raw: &RawQuic, protocols: &[Protocol]) -> Result<QuicConfig, FieldError> {
    use lb_common::quic::{
        MAX_CONFIG_ID, MAX_NONCE_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN, MIN_SERVER_ID_LEN,
    };
    if !protocols.contains(&Protocol::Udp) {
        return Err(FieldError::new(
            path,
            "QUIC runs over UDP: add \"udp\" to the service's protocols, or remove quic",
        ));
    }
    let config_id = super::validate::int_in(&key(path, "config_id"), raw.config_id, 0, 7)? as u8;
    if config_id > MAX_CONFIG_ID {
        return Err(FieldError::new(
            &key(path, "config_id"),
            "7 (0b111) is reserved for unroutable CIDs (servers without a config); use 0..=6",
        ));
    }
    let server_id_len = small(
        &key(path, "server_id_len"),
        raw.server_id_len,
        MIN_SERVER_ID_LEN,
        MAX_SERVER_ID_LEN,
    )?;
    let nonce_len = small(
        &key(path, "nonce_len"),
        raw.nonce_len,
        MIN_NONCE_LEN,
        MAX_NONCE_LEN,
    )?;
    let mode = raw.mode.unwrap_or_default();
    let mut cid = CidConfig {
        config_id,
        server_id_len,
        nonce_len,
        mode: match mode {
            QuicMode::Plaintext => CidMode::Plaintext,
            QuicMode::Encrypted => CidMode::Encrypted,
        },
        key: [0; 16],
    };
    cid.check()
        .map_err(|e| FieldError::new(&key(path, "nonce_len"), e.to_string()))?;
    let key_file = match (mode, &raw.key_file) {
        (QuicMode::Plaintext, Some(_)) => {
            return Err(FieldError::new(
                &key(path, "key_file"),
                "plaintext CIDs use no key: remove key_file, or set mode = \"encrypted\"",
            ));
        }
        (QuicMode::Plaintext, None) => None,
        (QuicMode::Encrypted, None) => {
            return Err(FieldError::new(
                &key(path, "key_file"),
                "mode = \"encrypted\" needs key_file: a file with the 16-byte AES key as 32 hex digits",
            ));
        }
        (QuicMode::Encrypted, Some(f)) => {
            let p = PathBuf::from(f);
            cid.key = read_key_file(&p).map_err(|m| FieldError::new(&key(path, "key_file"), m))?;
            Some(p)
        }
    };
    Ok(QuicConfig { cid, key_file })
}

/// Checks a backend's `server_id` against its service's `quic`.
pub fn server_id(
    path: &[Seg],
    id: Option<&ServerId>,
    quic: Option<&QuicConfig>,
) -> Result<(), FieldError> {
    let Some(id) = id else {
        return Ok(());
    };
    let path = key(path, "server_id");
    let Some(q) = quic else {
        return Err(FieldError::new(
            &path,
            "a server id needs the service's quic table (QUIC-LB routing)",
        ));
    };
    let want = usize::from(q.cid.server_id_len);
    if id.0.len() != want {
        return Err(FieldError::new(
            &path,
            format!("{id} is {} bytes; quic.server_id_len is {want}", id.0.len()),
        ));
    }
    Ok(())
}

/// The backends' configured server ids are unique in the service.
pub fn check_unique(path: &[Seg], s: &ServiceConfig) -> Result<(), FieldError> {
    let mut seen: BTreeMap<&ServerId, usize> = BTreeMap::new();
    for (j, b) in s.backends.iter().enumerate() {
        if let Some(id) = &b.server_id
            && let Some(first) = seen.insert(id, j)
        {
            return Err(FieldError::new(
                &key(&index(&key(path, "backends"), j), "server_id"),
                format!("server id {id} is also backends[{first}]'s: each backend needs its own"),
            ));
        }
    }
    Ok(())
}

/// Every backend's server id in QUIC-LB services, by (service, backend).
pub type ServerIds = BTreeMap<(String, SocketAddr), ServerId>;

/// The server id of every backend of a QUIC-LB service: its configured one,
/// else the one it had in `prev` (if still free and of the right length),
/// else the lowest id free in its service. Unique per service.
pub fn assign(services: &[ServiceConfig], prev: &ServerIds) -> ServerIds {
    let mut out = ServerIds::new();
    for s in services {
        let Some(q) = &s.quic else {
            continue;
        };
        let len = usize::from(q.cid.server_id_len);
        let mut taken: BTreeSet<ServerId> = s
            .backends
            .iter()
            .filter_map(|b| b.server_id.clone())
            .collect();
        let mut pending = Vec::new();
        for b in &s.backends {
            let k = (s.name.clone(), b.address);
            if let Some(id) = &b.server_id {
                out.insert(k, id.clone());
                continue;
            }
            match prev.get(&k) {
                Some(id) if id.0.len() == len && !taken.contains(id) => {
                    taken.insert(id.clone());
                    out.insert(k, id.clone());
                }
                _ => pending.push(k),
            }
        }
        let mut next: u128 = 1;
        for k in pending {
            let id = loop {
                let bytes = next.to_be_bytes();
                let id = ServerId(bytes[16 - len..].to_vec());
                next += 1;
                if !taken.contains(&id) {
                    break id;
                }
            };
            taken.insert(id.clone());
            out.insert(k, id);
        }
    }
    out
}

/// Takes into `services` the keys `fresh` (the config file just re-read)
/// holds for the same service and key file: a key file's new contents,
/// which the services' fingerprint (it names the file, not the key) does not
/// see. Returns the names of the services whose key changed.
pub fn refresh_keys(services: &mut [ServiceConfig], fresh: &[ServiceConfig]) -> Vec<String> {
    let mut changed = Vec::new();
    for s in services.iter_mut() {
        let Some(q) = s.quic.as_mut() else {
            continue;
        };
        let new = fresh
            .iter()
            .find(|f| f.name == s.name)
            .and_then(|f| f.quic.as_ref())
            .filter(|f| f.key_file.is_some() && f.key_file == q.key_file);
        if let Some(f) = new
            && f.cid.key != q.cid.key
        {
            q.cid.key = f.cid.key;
            changed.push(s.name.clone());
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn svc(len: u8, ids: &[Option<&str>]) -> ServiceConfig {
        let mut s = ServiceConfig {
            name: "q".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            protocols: vec![Protocol::Udp],
            forwarding: crate::dataplane::Forwarding::Local,
            health: None,
            when_all_down: Default::default(),
            backends: Vec::new(),
            allowed_backend_networks: Vec::new(),
            quic: None,
        };
        s.quic = Some(QuicConfig {
            cid: CidConfig {
                config_id: 1,
                server_id_len: len,
                nonce_len: 8,
                mode: CidMode::Plaintext,
                key: [0; 16],
            },
            key_file: None,
        });
        s.backends = ids
            .iter()
            .enumerate()
            .map(|(i, id)| BackendConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 8000 + i as u16)),
                weight: 100,
                state: Default::default(),
                server_id: id.map(|h| ServerId::parse(h).unwrap()),
            })
            .collect();
        s
    }

    #[test]
    fn assigned_ids_are_unique_and_stable() {
        let s = svc(2, &[None, Some("0001"), None]);
        let ids = assign(std::slice::from_ref(&s), &ServerIds::new());
        let got: Vec<String> = s
            .backends
            .iter()
            .map(|b| ids[&(s.name.clone(), b.address)].to_string())
            .collect();
        assert_eq!(got, ["0002", "0001", "0003"]);
        // A backend added before the others keeps nobody else's id.
        let mut s2 = s.clone();
        s2.backends.insert(
            0,
            BackendConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 7999)),
                weight: 100,
                state: Default::default(),
                server_id: None,
            },
        );
        let again = assign(std::slice::from_ref(&s2), &ids);
        for b in &s.backends {
            let k = (s.name.clone(), b.address);
            assert_eq!(again[&k], ids[&k]);
        }
        assert_eq!(
            again[&(s.name.clone(), SocketAddr::from(([127, 0, 0, 1], 7999)))].to_string(),
            "0004"
        );
        // A configured id wins over an assigned one it collides with.
        let mut s3 = s.clone();
        s3.backends[1].server_id = Some(ServerId::parse("0002").unwrap());
        let third = assign(std::slice::from_ref(&s3), &ids);
        let set: BTreeSet<&ServerId> = third.values().collect();
        assert_eq!(set.len(), 3);
        assert_eq!(
            third[&(s.name.clone(), s.backends[1].address)].to_string(),
            "0002"
        );
    }

    #[test]
    fn server_ids_parse_as_hex_bytes() {
        assert_eq!(ServerId::parse("0a1B").unwrap().0, vec![0x0a, 0x1b]);
        assert_eq!(ServerId::parse("0x01").unwrap().0, vec![1]);
        assert!(ServerId::parse("abc").is_err());
        assert!(ServerId::parse("zz").is_err());
        assert!(ServerId::parse("").is_err());
        assert_eq!(ServerId(vec![0, 255]).to_string(), "00ff");
    }

    const QUIC: &str = r#"
[dataplane]
interface = "eth0"

[[services]]
name = "h3"
listen = "0.0.0.0:443"
protocols = ["udp"]
quic = { config_id = 1, server_id_len = 2, nonce_len = 8 }
backends = [
  { address = "127.0.0.1:8001", server_id = "0a01" },
  { address = "127.0.0.1:8002" },
]
"#;

    fn parse(text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(Path::new("lb.toml"), text)
    }

    /// (field, message) of the error for `QUIC` with `from` replaced by `to`.
    fn refused(from: &str, to: &str) -> (String, String) {
        let text = QUIC.replacen(from, to, 1);
        assert_ne!(text, QUIC, "{from}");
        let e = parse(&text).expect_err(to);
        (e.field, e.message)
    }

    #[test]
    fn quic_configs_follow_the_drafts_limits() {
        let c = parse(QUIC).unwrap();
        let q = c.services[0].quic.as_ref().unwrap();
        assert_eq!(q.cid, plaintext_cid(1, 2, 8));
        assert_eq!(
            c.services[0].backends[0].server_id,
            Some(ServerId(vec![10, 1]))
        );
        assert_eq!(c.services[0].backends[1].server_id, None);
        let cases = [
            (
                "config_id = 1",
                "config_id = 7",
                "services[0].quic.config_id",
                "reserved",
            ),
            (
                "config_id = 1",
                "config_id = -1",
                "services[0].quic.config_id",
                "out of range",
            ),
            (
                "server_id_len = 2",
                "server_id_len = 0",
                "services[0].quic.server_id_len",
                "1..=15",
            ),
            (
                "server_id_len = 2",
                "server_id_len = 16",
                "services[0].quic.server_id_len",
                "1..=15",
            ),
            (
                "nonce_len = 8",
                "nonce_len = 3",
                "services[0].quic.nonce_len",
                "4..=18",
            ),
            (
                "nonce_len = 8",
                "nonce_len = 19",
                "services[0].quic.nonce_len",
                "4..=18",
            ),
            (
                "nonce_len = 8",
                "nonce_len = 18",
                "services[0].quic.nonce_len",
                "exceeds 19",
            ),
            (
                "protocols = [\"udp\"]",
                "protocols = [\"tcp\"]",
                "services[0].quic",
                "UDP",
            ),
            (
                "nonce_len = 8 }",
                "nonce_len = 8, key_file = \"/k\" }",
                "services[0].quic.key_file",
                "plaintext",
            ),
            (
                "nonce_len = 8 }",
                "nonce_len = 8, mode = \"encrypted\" }",
                "services[0].quic.key_file",
                "needs key_file",
            ),
            (
                "nonce_len = 8 }",
                "nonce_len = 8, mode = \"encrypted\", key_file = \"/nonexistent/k\" }",
                "services[0].quic.key_file",
                "/nonexistent/k",
            ),
            (
                "server_id = \"0a01\"",
                "server_id = \"0a\"",
                "services[0].backends[0].server_id",
                "server_id_len is 2",
            ),
            (
                "server_id = \"0a01\"",
                "server_id = \"0a0\"",
                "services[0].backends[0].server_id",
                "hex",
            ),
            (
                "{ address = \"127.0.0.1:8002\" }",
                "{ address = \"127.0.0.1:8002\", server_id = \"0A01\" }",
                "services[0].backends[1].server_id",
                "also backends[0]",
            ),
            (
                "quic = { config_id = 1, server_id_len = 2, nonce_len = 8 }\n",
                "",
                "services[0].backends[0].server_id",
                "needs the service's quic",
            ),
        ];
        for (from, to, field, msg) in cases {
            let (f, m) = refused(from, to);
            assert_eq!(f, field, "{to}: {m}");
            assert!(m.contains(msg), "{to}: {m}");
        }
    }

    fn plaintext_cid(config_id: u8, server_id_len: u8, nonce_len: u8) -> CidConfig {
        CidConfig {
            config_id,
            server_id_len,
            nonce_len,
            mode: CidMode::Plaintext,
            key: [0; 16],
        }
    }

    #[test]
    fn key_files_hold_32_hex_digits_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lb-quic-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("key");
        let text = QUIC.replacen(
            "nonce_len = 8 }",
            &format!(
                "nonce_len = 8, mode = \"encrypted\", key_file = {:?} }}",
                k.display().to_string()
            ),
            1,
        );
        let write = |body: &str, mode: u32| {
            std::fs::write(&k, body).unwrap();
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("8f95f09245765f80256934e50c66207f\n", 0o600);
        let c = parse(&text).unwrap();
        let q = c.services[0].quic.as_ref().unwrap();
        assert_eq!(q.cid.mode, CidMode::Encrypted);
        assert_eq!(q.cid.key[0], 0x8f);
        assert_eq!(q.key_file.as_deref(), Some(k.as_path()));
        write("  8f95f09245765f80256934e50c66207f  ", 0o644);
        assert!(parse(&text).unwrap_err().message.contains("chmod 600"));
        for bad in [
            "8f95f092",
            "8f95f09245765f80256934e50c66207fxx",
            "zz95f09245765f80256934e50c66207f",
        ] {
            write(bad, 0o600);
            let e = parse(&text).unwrap_err();
            assert_eq!(e.field, "services[0].quic.key_file");
            assert!(e.message.contains("32 hex digits"), "{bad}: {}", e.message);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_wire_form_round_trips() {
        let c = parse(QUIC).unwrap();
        let raw = crate::config::RawService::from(&c.services[0]);
        let json = serde_json::to_string(&raw).unwrap();
        assert!(
            json.contains(
                r#""quic":{"config_id":1,"server_id_len":2,"nonce_len":8,"mode":"plaintext"}"#
            ),
            "{json}"
        );
        assert!(json.contains(r#""server_id":"0a01""#), "{json}");
        let back: crate::config::RawService = serde_json::from_str(&json).unwrap();
        assert_eq!(crate::config::service(&[], &back).unwrap(), c.services[0]);
    }
}
