//! Pins another node of the cluster reported: finding this node's service,
//! backend id, generation and slot for them (ids differ between nodes),
//! refusing a pin to a backend that does not hold flows here, and choosing
//! the pins a joining node is sent.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use lb_common::{FlowKey, FlowValue, MaglevSlot, maglev_slot};

use super::{Dataplane, MapWriter, Result, words_addr};
use crate::mapstore::MapStore;

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
        if !entry.keeps_flows() {
            return Err(PinRefusal::NotLive);
        }
        let h = self
            .store()
            .flow_hash()
            .hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
        Ok(FlowValue {
            backend: id,
            service: inst.id,
            slot: maglev_slot(h, m),
            generation: entry.generation,
        })
    }
}

/// What a join answer needs from the writer, taken under its lock and used
/// without it while the flow table is walked.
#[derive(Debug, Default, Clone)]
pub struct JoinPlan {
    /// (service id, slot) of every changed (sticky) slot.
    pub changed: HashSet<(u32, u32)>,
    /// Backend id -> (service id, generation, address) for backends
    /// keeping flows.
    pub holders: HashMap<u32, (u32, u32, SocketAddr)>,
}

/// The pins a joining node needs: those in changed slots whose backend
/// still keeps them, by backend address. A joining node builds its tables
/// fresh (no slot remembers a previous backend), so a flow of a changed
/// slot pinned anywhere but the slot's current backend breaks there
/// without its pin; one on the current backend needs it for the next
/// change. Clean slots need none.
pub fn join_pins(
    plan: &JoinPlan,
    pins: impl Iterator<Item = (FlowKey, FlowValue)>,
) -> Vec<(FlowKey, SocketAddr)> {
    pins.filter_map(|(k, v)| {
        let (service, generation, addr) = plan.holders.get(&v.backend)?;
        let live = (*service, *generation) == (v.service, v.generation);
        (live && plan.changed.contains(&(v.service, v.slot))).then_some((k, *addr))
    })
    .collect()
}

impl<S: MapStore> MapWriter<S> {
    /// The program reads the flow table only in changed (sticky) slots: a
    /// replicated pin naming another backend than its slot's, in a slot
    /// this node holds clean (a node that joined builds its tables fresh,
    /// or swept the slot already), would be ignored. Such a slot becomes
    /// changed here, its previous backend the pinned one, as of now: the
    /// sender's slot changed away from that backend, and misses there go
    /// to it for the same window. The sweep makes it clean again once no
    /// pin needs it.
    fn make_sticky_for(&mut self, v: &FlowValue) -> Result<()> {
        let Some((name, s)) = self
            .services
            .iter()
            .find(|(_, i)| i.id == v.service)
            .and_then(|(name, i)| Some((name.clone(), *i.slots.get(v.slot as usize)?)))
        else {
            return Ok(());
        };
        if s.is_sticky() || s.backend == v.backend {
            return Ok(());
        }
        let sticky = MaglevSlot {
            backend: s.backend,
            prev: v.backend,
            changed: super::sticky::monotonic_secs(),
            prev_gen: v.generation,
        };
        self.rewrite_slots(&name, &[(v.slot as usize, sticky)])?;
        Ok(())
    }

    /// What [`join_pins`] needs.
    pub fn join_plan(&self) -> JoinPlan {
        let mut plan = JoinPlan::default();
        for inst in self.services.values() {
            for (i, s) in inst.slots.iter().enumerate() {
                if s.is_sticky() {
                    plan.changed.insert((inst.id, i as u32));
                }
            }
            for (addr, id) in &inst.backend_ids {
                if let Some(e) = self.backend_entries.get(id)
                    && e.keeps_flows()
                {
                    plan.holders.insert(*id, (e.service, e.generation, *addr));
                }
            }
        }
        plan
    }
}

impl<S: MapStore> MapWriter<S> {
    /// Makes every changed slot clean again, in the writer and in the
    /// active tables, on a data plane this process loaded fresh (not
    /// adopted): a node of a cluster installs its config file's tables
    /// first, then etcd's, before it announces. Those changes were never
    /// served; remembered, a miss within the window would go to the file's
    /// backend instead of the cluster's (and break the flow). Returns the
    /// slots cleaned (0 on an adopted data plane: its changes were served).
    pub fn forget_unserved_changes(&mut self) -> Result<usize> {
        if self.dp.adopted() {
            return Ok(0);
        }
        let mut cleaned = 0;
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let clean: Vec<(usize, MaglevSlot)> = self.services[&name]
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_sticky())
                .map(|(i, s)| (i, MaglevSlot::clean(s.backend)))
                .collect();
            cleaned += self.rewrite_slots(&name, &clean)?;
        }
        Ok(cleaned)
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
                self.dp.flows.insert(key, &v)?;
                self.make_sticky_for(&v)?;
                Ok(PinOutcome::Inserted)
            }
            Err(r) => Ok(PinOutcome::Refused(r)),
        }
    }
}
