//! Pins another node of the cluster reported: finding this node's service,
//! backend id, generation and slot for them (ids differ between nodes), and
//! refusing a pin to a backend that does not hold flows here.

use std::net::SocketAddr;

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, FlowKey, FlowValue, flow_hash, maglev_slot, maps,
};

use super::{Dataplane, MapWriter, Result, words_addr};
use crate::{dataplane::map_err, mapstore::MapStore};

/// Why a replicated pin was not inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinRefusal {
    /// No installed service takes the flow's address, port and protocol, or
    /// its table is empty.
    NoService,
    /// The service has no backend at that address here.
    UnknownBackend,
    /// The backend is here but keeps no flows: down by the health rule,
    /// disabled, or its id freed.
    NotLive,
}

impl<S: MapStore> MapWriter<S> {
    /// The flow-table value for a pin of flow `key` to the backend at
    /// `backend`, as this node's maps name it; refused when this node would
    /// not keep the flow on that backend.
    pub fn replicated_pin(
        &self,
        key: &FlowKey,
        backend: SocketAddr,
    ) -> std::result::Result<FlowValue, PinRefusal> {
        let dst = words_addr(&key.dst);
        let port = u16::from_be(key.dport);
        // An address-specific service wins over a wildcard, as in the program.
        let mut wildcard = None;
        let mut found = None;
        for inst in self.services.values() {
            let l = inst.spec.listen;
            if l.port() != port || !inst.spec.protocols.iter().any(|p| p.number() == key.proto) {
                continue;
            }
            if l.ip() == dst {
                found = Some(inst);
                break;
            }
            if l.ip().is_unspecified() && l.is_ipv4() == dst.is_ipv4() {
                wildcard = Some(inst);
            }
        }
        let inst = found.or(wildcard).ok_or(PinRefusal::NoService)?;
        let m = u32::try_from(inst.slots.len()).unwrap_or(0);
        if m == 0 {
            return Err(PinRefusal::NoService);
        }
        let id = *inst
            .backend_ids
            .get(&backend)
            .ok_or(PinRefusal::UnknownBackend)?;
        let entry = self
            .backend_entries
            .get(&id)
            .ok_or(PinRefusal::UnknownBackend)?;
        if entry.state != BACKEND_ACTIVE && entry.state != BACKEND_DRAINING {
            return Err(PinRefusal::NotLive);
        }
        let h = flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
        Ok(FlowValue {
            backend: id,
            service: inst.id,
            slot: maglev_slot(h, m),
            generation: entry.generation,
        })
    }
}

/// What became of one replicated pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    Inserted,
    Refused(PinRefusal),
}

impl MapWriter<Dataplane> {
    /// Writes a pin another node reported into this node's flow table
    /// (replacing any pin of the same flow: the report is the newer news),
    /// unless [`MapWriter::replicated_pin`] refuses it.
    pub fn insert_replicated_pin(
        &mut self,
        key: &FlowKey,
        backend: SocketAddr,
    ) -> Result<PinOutcome> {
        match self.replicated_pin(key, backend) {
            Ok(v) => {
                self.dp
                    .flows
                    .insert(key, v, 0)
                    .map_err(map_err(maps::FLOWS))?;
                Ok(PinOutcome::Inserted)
            }
            Err(r) => Ok(PinOutcome::Refused(r)),
        }
    }
}
