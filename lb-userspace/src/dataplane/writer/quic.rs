//! The QUIC-LB maps: each service's CID config (`LB_QUIC_SVCS`) and its
//! backends' server ids (`LB_QUIC_SIDS`), written after `apply` has given
//! out backend ids and generations.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use lb_common::quic::{AES_TABLES, CidConfig, QuicServiceEntry, QuicSidKey, QuicSidValue};

use super::{MapWriter, Result};
use crate::mapstore::MapStore;

/// A QUIC-LB service as the writer installs it: its config and every
/// backend's server id (configured or assigned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicSpec {
    pub cid: CidConfig,
    pub server_ids: Vec<(SocketAddr, Vec<u8>)>,
}

/// QUIC-LB services by name.
pub type QuicSpecs = BTreeMap<String, QuicSpec>;

/// What was last written, to write only changes.
#[derive(Default)]
pub(super) struct Written {
    services: HashMap<u32, QuicServiceEntry>,
    pub(super) server_ids: HashMap<QuicSidKey, QuicSidValue>,
}

impl<S: MapStore> MapWriter<S> {
    /// Whether the service's QUIC-LB config is installed.
    pub fn routes_by_cid(&self, service: &str) -> bool {
        self.services
            .get(service)
            .and_then(|inst| self.quic.services.get(&inst.id))
            .is_some_and(|e| e.flags & lb_common::quic::QUIC_ENABLED != 0)
    }

    /// Makes the QUIC-LB maps match `quic` for the services installed:
    /// server ids first (a config names only ids that are there), then the
    /// configs, then the ids that went. A server id names its backend's id
    /// and generation, so one left over for a backend gone never matches.
    pub fn apply_quic(&mut self, quic: &QuicSpecs) -> Result<()> {
        let mut services = HashMap::new();
        let mut server_ids = HashMap::new();
        for (name, inst) in &self.services {
            let Some(q) = quic.get(name) else {
                services.insert(inst.id, QuicServiceEntry::DISABLED);
                continue;
            };
            services.insert(inst.id, QuicServiceEntry::new(&AES_TABLES, &q.cid));
            for (addr, sid) in &q.server_ids {
                let Some(&backend) = inst.backend_ids.get(addr) else {
                    continue;
                };
                let Some(key) = QuicSidKey::new(inst.id, sid) else {
                    continue;
                };
                let value = QuicSidValue {
                    backend,
                    generation: self.backend_generation(backend),
                };
                server_ids.insert(key, value);
            }
        }
        for (k, v) in &server_ids {
            if self.quic.server_ids.get(k) != Some(v) {
                self.dp.set_quic_server_id(k, v)?;
                self.quic.server_ids.insert(*k, *v);
            }
        }
        for (id, e) in &services {
            if self.quic.services.get(id) != Some(e) {
                self.dp.write_quic_service(*id, e)?;
                self.quic.services.insert(*id, *e);
            }
        }
        let gone: Vec<u32> = self
            .quic
            .services
            .keys()
            .filter(|id| !services.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.dp
                .write_quic_service(id, &QuicServiceEntry::DISABLED)?;
            self.quic.services.remove(&id);
        }
        let stale: Vec<QuicSidKey> = self
            .quic
            .server_ids
            .keys()
            .filter(|k| !server_ids.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.dp.delete_quic_server_id(&k);
            self.quic.server_ids.remove(&k);
        }
        Ok(())
    }
}
