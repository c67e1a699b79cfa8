//! The map writer: turns the desired services into map contents, giving
//! out service and backend ids and generations, diffing against what is
//! installed, and reading back what an earlier daemon left in pinned maps.

mod lookup;
mod quic;
mod replicated;
mod sticky;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    AddrKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_REWRITE_ADDR, BACKEND_UNUSED, BackendEntry,
    MAX_BACKENDS, MaglevSlot, NO_BACKEND, PortEntry, RevAddrValue, RevPortEntry, ServiceEntry,
    TABLES_PER_SERVICE,
};
use tracing::{debug, info, warn};

pub use quic::{QuicSpec, QuicSpecs};
pub use replicated::{JoinPlan, PinOutcome, PinRefusal, join_pins};
pub use sticky::{SweepFound, SweepPlan, SweepReport, monotonic_secs, next_slots, walk_pins};

use super::{
    Dataplane, DataplaneError, Result, addr_words,
    spec::{AdminState, BackendSpec, Forwarding, ServiceSpec, WhenAllDown},
    words_addr,
};
use crate::{maglev, mapstore::MapStore, pins};

struct Installed {
    id: u32,
    spec: ServiceSpec,
    backend_ids: HashMap<SocketAddr, u32>,
    /// The slots last installed, with the previous backend of each slot.
    slots: Vec<MaglevSlot>,
    /// Slots of `slots` per backend id, counted when a table is installed
    /// (the status page's share of the table).
    slot_counts: HashMap<u32, u32>,
    /// What the installed table was built from: the same input needs no
    /// rebuild (empty when unknown, after adopting a pinned data plane).
    entries: Vec<maglev::Entry>,
    /// Failing open: every backend failed its checks and the table holds
    /// the ones that were up last (`WhenAllDown::KeepLast`).
    fail_open: bool,
    /// [`Installed::fingerprint`] as of the last apply (None: worked out
    /// when asked): cluster mode asks several times a second.
    fingerprint: Option<u64>,
}

impl Installed {
    /// See [`MapWriter::table_fingerprint`].
    fn fingerprint(&self) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let names: HashMap<u32, String> = self
            .backend_ids
            .iter()
            .map(|(a, i)| (*i, a.to_string()))
            .collect();
        let table: Vec<u32> = self.slots.iter().map(|s| s.backend).collect();
        Some(maglev::fingerprint(&table, &names))
    }
}

/// A free backend id for a new backend, its counters zeroed: an id comes
/// back to the free list when its backend goes (and, after a restart, may
/// be handed out first), and its `LB_BE_STATS` entry still holds the old
/// backend's packets. Ids of backends a restarted daemon adopts are not
/// taken here, so their counters carry on.
fn take_backend_id<S: MapStore>(free: &mut Vec<u32>, dp: &mut S) -> Result<u32> {
    let id = free.pop().ok_or(DataplaneError::Full("backends"))?;
    dp.reset_backend_counters(id)?;
    Ok(id)
}

/// Slots per backend id in a table (empty slots are not counted).
fn count_slots(slots: &[MaglevSlot]) -> HashMap<u32, u32> {
    let mut counts = HashMap::new();
    for s in slots {
        if s.backend != NO_BACKEND {
            *counts.entry(s.backend).or_insert(0) += 1;
        }
    }
    counts
}

/// Applies desired services to the data plane. Owns the map store: the
/// kernel's maps (`Dataplane`) or, in tests, `mapstore::MemStore`. What to
/// write (ids, generations, tables, lookup maps) is decided here; the store
/// only writes it.
pub struct MapWriter<S: MapStore = Dataplane> {
    dp: S,
    services: BTreeMap<String, Installed>,
    free_service_ids: Vec<u32>,
    free_backend_ids: Vec<u32>,
    ports: HashMap<u32, PortEntry>,
    addr_services: HashMap<AddrKey, u32>,
    rev_ports: HashMap<u32, RevPortEntry>,
    rev_addrs: HashMap<AddrKey, RevAddrValue>,
    /// Every backend entry as written to the kernel.
    backend_entries: HashMap<u32, BackendEntry>,
    /// The next `BackendEntry::generation` to hand out.
    next_generation: u32,
    /// What `apply_quic` last wrote.
    quic: quic::Written,
}

/// What an `apply` changed, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub tables_installed: usize,
    /// The services whose table was installed, one entry per install.
    pub installed: Vec<String>,
}

fn is_local_host(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

/// Whether packets of a service on `listen` to `backend` get their
/// destination address rewritten too (and replies their source address
/// back, found by backend address in `LB_REV_ADDRS`).
pub fn rewrites_address(forwarding: Forwarding, listen: SocketAddr, backend: SocketAddr) -> bool {
    forwarding != Forwarding::Dsr
        && !listen.ip().is_unspecified()
        && !is_local_host(backend.ip())
        && backend.ip() != listen.ip()
        && backend.is_ipv4() == listen.is_ipv4()
}

impl MapWriter<Dataplane> {
    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }
}

impl<S: MapStore> MapWriter<S> {
    pub fn new(dp: S) -> Self {
        let max_services = dp.options().max_services;
        let mut w = Self {
            dp,
            services: BTreeMap::new(),
            free_service_ids: (0..max_services).rev().collect(),
            free_backend_ids: (0..MAX_BACKENDS).rev().collect(),
            ports: HashMap::new(),
            addr_services: HashMap::new(),
            rev_ports: HashMap::new(),
            rev_addrs: HashMap::new(),
            backend_entries: HashMap::new(),
            next_generation: 1,
            quic: quic::Written::default(),
        };
        if w.dp.adopted() {
            match w.adopt() {
                Ok(n) => info!(services = n, "adopted the pinned data plane's services"),
                Err(e) => warn!("cannot read back the pinned data plane ({e}); rewriting it"),
            }
        }
        w
    }

    /// Reads back what an earlier daemon installed in adopted maps: the ids
    /// it recorded, each service's active table (with every slot's previous
    /// backend), and the lookup maps. An `apply` of unchanged services then
    /// changes nothing in the kernel.
    fn adopt(&mut self) -> Result<usize> {
        let ids = self.dp.recorded_ids().clone();
        let m = self.dp.options().maglev_size;
        for (name, sid) in &ids.services {
            let entry = self.dp.service_entry(sid.id)?;
            let slots = if entry.table_size == m && entry.active < TABLES_PER_SERVICE {
                self.dp.table(sid.id, entry.active).to_vec()
            } else {
                Vec::new()
            };
            let forwarding = match sid.forwarding.as_str() {
                "nat" => Forwarding::Nat,
                "dsr" => Forwarding::Dsr,
                _ => Forwarding::Local,
            };
            self.free_service_ids.retain(|i| *i != sid.id);
            let used: HashSet<u32> = sid.backends.values().copied().collect();
            self.free_backend_ids.retain(|i| !used.contains(i));
            self.services.insert(
                name.clone(),
                Installed {
                    id: sid.id,
                    spec: ServiceSpec {
                        name: name.clone(),
                        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                        protocols: Vec::new(),
                        forwarding,
                        backends: Vec::new(),
                        when_all_down: WhenAllDown::default(),
                    },
                    backend_ids: sid.backends.iter().map(|(a, i)| (*a, *i)).collect(),
                    slot_counts: count_slots(&slots),
                    slots,
                    entries: Vec::new(),
                    fail_open: false,
                    fingerprint: None,
                },
            );
        }
        self.ports.extend(self.dp.read_ports()?);
        self.rev_ports.extend(self.dp.read_rev_ports()?);
        self.addr_services.extend(self.dp.read_addr_services()?);
        self.rev_addrs.extend(self.dp.read_rev_addrs()?);
        self.quic.server_ids.extend(self.dp.read_quic_server_ids()?);
        // Generations go on from the highest in the maps, so no id handed
        // out from now on matches a pin or slot of an earlier holder.
        for (i, e) in self.dp.read_backends()? {
            self.next_generation = self.next_generation.max(e.generation.wrapping_add(1));
            self.backend_entries.insert(i, e);
        }
        Ok(ids.services.len())
    }

    /// Records the ids in use next to the pins (nothing without pins).
    fn persist_ids(&mut self) -> Result<()> {
        if self.dp.options().pin_path.is_none() {
            return Ok(());
        }
        let ids = pins::Ids {
            services: self
                .services
                .iter()
                .map(|(name, inst)| {
                    (
                        name.clone(),
                        pins::ServiceIds {
                            id: inst.id,
                            forwarding: inst.spec.forwarding.name().into(),
                            backends: inst.backend_ids.iter().map(|(a, i)| (*a, *i)).collect(),
                        },
                    )
                })
                .collect(),
        };
        self.dp.record_ids(ids)
    }

    /// The map store (tests read a `MemStore` through it).
    pub fn store(&self) -> &S {
        &self.dp
    }

    /// The id the data plane uses for a service.
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(|s| s.id)
    }

    /// Whether the service fails open: all its backends failed their
    /// health checks and the ones that were up last still take flows.
    pub fn fail_open(&self, name: &str) -> bool {
        self.services.get(name).is_some_and(|s| s.fail_open)
    }

    /// The backend's slots in the service's installed Maglev table, and
    /// the table's size (0 before a table is installed).
    pub fn slot_share(&self, service: &str, address: SocketAddr) -> Option<(u32, u32)> {
        let inst = self.services.get(service)?;
        let id = inst.backend_ids.get(&address)?;
        let total = u32::try_from(inst.slots.len()).unwrap_or(u32::MAX);
        Some((inst.slot_counts.get(id).copied().unwrap_or(0), total))
    }

    /// The fingerprint of the service's installed Maglev table as slot ->
    /// backend address ([`maglev::fingerprint`]): the same on every node
    /// that installed the same table. `None` before a table is installed.
    pub fn table_fingerprint(&self, service: &str) -> Option<u64> {
        let inst = self.services.get(service)?;
        inst.fingerprint.or_else(|| inst.fingerprint())
    }

    /// The names of the installed services.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The service's installed table sends new flows somewhere: it has a
    /// usable backend, or fails open on the ones that were up last.
    pub fn has_usable_backend(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| !s.slot_counts.is_empty())
    }

    /// The id the data plane uses for a backend of a service.
    pub fn backend_id(&self, service: &str, address: SocketAddr) -> Option<u32> {
        self.services
            .get(service)?
            .backend_ids
            .get(&address)
            .copied()
    }

    /// Makes the data plane serve exactly `desired`. Checks everything that
    /// can fail on input before writing anything.
    pub fn apply(&mut self, desired: &[ServiceSpec]) -> Result<ApplyReport> {
        self.check(desired)?;
        let mut report = ApplyReport::default();
        let wanted: HashSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();

        // Services that go: unpublish first, then free their backends.
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in &gone {
            let Some(inst) = self.services.remove(name) else {
                continue;
            };
            self.dp.write_service(inst.id, &ServiceEntry::default())?;
            for id in inst.backend_ids.values() {
                let down = BackendEntry {
                    state: BACKEND_DOWN,
                    ..Default::default()
                };
                self.put_backend(*id, down)?;
                self.free_backend_ids.insert(0, *id);
            }
            self.free_service_ids.push(inst.id);
            info!(service = %name, "service removed");
        }
        // Unpublish removed services before their ids can be reused below.
        self.sync_lookup_maps(desired, false)?;

        // Hand out every new id first and record them before any table can
        // name them, so a daemon killed halfway still reads its maps right.
        for spec in desired {
            if !self.services.contains_key(&spec.name) {
                let id = self
                    .free_service_ids
                    .pop()
                    .ok_or(DataplaneError::Full("services"))?;
                self.services.insert(
                    spec.name.clone(),
                    Installed {
                        id,
                        spec: spec.clone(),
                        backend_ids: HashMap::new(),
                        slots: Vec::new(),
                        slot_counts: HashMap::new(),
                        entries: Vec::new(),
                        fail_open: false,
                        fingerprint: None,
                    },
                );
            }
            let Some(inst) = self.services.get_mut(&spec.name) else {
                continue;
            };
            for b in &spec.backends {
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    inst.backend_ids.entry(b.address)
                {
                    slot.insert(take_backend_id(&mut self.free_backend_ids, &mut self.dp)?);
                }
            }
        }
        self.persist_ids()?;
        // Replies of backends that join are translated before any table
        // sends them a flow: the reverse entries go in first.
        self.sync_lookup_maps(desired, true)?;

        for spec in desired {
            let Some(mut inst) = self.services.remove(&spec.name) else {
                continue;
            };
            let installed = self.apply_service(&mut inst, spec, &mut report);
            self.services.insert(spec.name.clone(), inst);
            installed?;
        }
        self.sync_lookup_maps(desired, false)?;
        self.persist_ids()?;
        Ok(report)
    }

    /// Writes a backend entry, with a new generation when the id gets a new
    /// holder or its backend goes down: pins and slots made before then no
    /// longer match it, so no walk of the flow table is needed to end them.
    fn put_backend(&mut self, id: u32, mut e: BackendEntry) -> Result<()> {
        let old = self.backend_entries.get(&id).copied();
        let fresh = match old {
            None => true,
            Some(o) => {
                o.service != e.service
                    || o.addr != e.addr
                    || o.port != e.port
                    || (e.state == BACKEND_DOWN && o.state != BACKEND_DOWN)
            }
        };
        e.generation = match old {
            Some(o) if !fresh => o.generation,
            _ => {
                let g = self.next_generation;
                self.next_generation = g.wrapping_add(1).max(1);
                g
            }
        };
        if old != Some(e) {
            self.dp.write_backend(id, &e)?;
            if old.is_some_and(|o| o.generation != e.generation) {
                // The resolver writes the new holder's hop; the old one's
                // would be ignored (generation) but should not linger.
                self.dp.clear_next_hop(id)?;
            }
            self.backend_entries.insert(id, e);
        }
        Ok(())
    }

    /// Every backend of a `nat` or `dsr` service with the generation it
    /// holds, by id: what the next-hop resolver keeps entries for.
    pub fn remote_backends(&self) -> Vec<crate::nexthop::RemoteBackend> {
        let mut out: Vec<crate::nexthop::RemoteBackend> = self
            .services
            .values()
            .filter(|s| s.spec.forwarding != Forwarding::Local)
            .flat_map(|s| s.backend_ids.iter())
            .map(|(addr, id)| crate::nexthop::RemoteBackend {
                id: *id,
                generation: self.backend_generation(*id),
                addr: addr.ip().to_canonical(),
            })
            .collect();
        out.sort_by_key(|b| b.id);
        out
    }

    /// The generation the data plane holds for backend id `id` (0: none).
    pub fn backend_generation(&self, id: u32) -> u32 {
        self.backend_entries.get(&id).map_or(0, |e| e.generation)
    }
    /// What only the maps know: their capacity. The rules between services
    /// are the config's own ([`crate::config::check_conflicts`]), so a spec
    /// the config would refuse is refused here with the same words.
    fn check(&self, desired: &[ServiceSpec]) -> Result<()> {
        let new_services = desired
            .iter()
            .filter(|s| !self.services.contains_key(&s.name))
            .count();
        let kept = self
            .services
            .keys()
            .filter(|n| desired.iter().any(|s| &s.name == *n))
            .count();
        if kept + new_services > self.dp.options().max_services as usize {
            return Err(DataplaneError::Full("services"));
        }
        let backends: usize = desired.iter().map(|s| s.backends.len()).sum();
        if backends > MAX_BACKENDS as usize {
            return Err(DataplaneError::Full("backends"));
        }
        crate::config::check_conflicts(desired).map_err(|e| DataplaneError::Conflict(e.to_string()))
    }

    fn apply_service(
        &mut self,
        inst: &mut Installed,
        spec: &ServiceSpec,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let id = inst.id;
        inst.fingerprint = None;
        // Backends that go down (they left the service, or failed their
        // checks) are written down only once the new table, which no
        // longer names them, is in: until then the installed table keeps
        // sending them its flows, whole. Written first, a SYN in a changed
        // slot would still go to such a backend, and the handshake's next
        // packet, no longer pinned to a holder, to the slot's previous one,
        // which resets it. Once down, their flows are re-picked: pins and
        // slots name the generation they had.
        let wanted: HashSet<SocketAddr> = spec.backends.iter().map(|b| b.address).collect();
        let leaving: Vec<SocketAddr> = inst
            .backend_ids
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        let mut going_down = Vec::new();
        let mut released = Vec::new();
        for addr in leaving {
            let Some(bid) = inst.backend_ids.remove(&addr) else {
                continue;
            };
            let mut e = self.backend_entry(spec, id, addr);
            e.state = BACKEND_DOWN;
            going_down.push((bid, e));
            released.push(bid);
        }
        // Fail open: when health checks (not the operator) leave no backend
        // for new flows, the ones that were up last stay, as they are.
        let kept = self.kept_last(inst, spec);
        let fail_open = !kept.is_empty();
        if fail_open != inst.fail_open {
            if fail_open {
                warn!(
                    service = %spec.name,
                    backends = ?kept,
                    "every backend failed its health checks; failing open: the last ones keep taking flows (when_all_down = \"keep_last\")"
                );
            } else {
                info!(service = %spec.name, "a backend is up again; no longer failing open");
            }
            inst.fail_open = fail_open;
        }
        for b in &spec.backends {
            let bid = if let Some(bid) = inst.backend_ids.get(&b.address) {
                *bid
            } else {
                let bid = take_backend_id(&mut self.free_backend_ids, &mut self.dp)?;
                inst.backend_ids.insert(b.address, bid);
                bid
            };
            let mut e = self.backend_entry(spec, id, b.address);
            e.state = if kept.contains(&b.address) {
                BACKEND_ACTIVE
            } else {
                b.dataplane_state()
            };
            if e.state == BACKEND_DOWN {
                going_down.push((bid, e));
            } else {
                self.put_backend(bid, e)?;
            }
        }

        let entries: Vec<maglev::Entry> = spec
            .backends
            .iter()
            .filter(|b| b.in_table() || kept.contains(&b.address))
            .map(|b| maglev::Entry {
                name: b.address.to_string(),
                id: inst.backend_ids[&b.address],
                weight: b.weight,
            })
            .collect();
        let forwarding_changed = inst.spec.forwarding != spec.forwarding;
        if entries != inst.entries || inst.slots.is_empty() || forwarding_changed {
            let table = maglev::build(&entries, self.dp.options().maglev_size);
            let same = table.len() == inst.slots.len()
                && table.iter().zip(&inst.slots).all(|(b, s)| *b == s.backend);
            if !same || forwarding_changed {
                let slots = next_slots(&inst.slots, &table, monotonic_secs(), |b| {
                    self.backend_generation(b)
                });
                let t = self.dp.install_table(id, &slots, spec.forwarding.code())?;
                debug!(service = %spec.name, table = t, backends = entries.len(), "Maglev table installed");
                inst.slot_counts = count_slots(&slots);
                inst.slots = slots;
                report.tables_installed += 1;
                report.installed.push(spec.name.clone());
            }
            inst.entries = entries;
        }
        for (bid, e) in going_down {
            self.put_backend(bid, e)?;
        }
        // A released id stays down (flows still pinned to it, or slots that
        // remember it, re-pick) and is handed out again last.
        for bid in released {
            self.free_backend_ids.insert(0, bid);
        }
        inst.spec = spec.clone();
        inst.fingerprint = inst.fingerprint();
        Ok(())
    }

    /// With `KeepLast`, when no backend is fit for the table, the backends
    /// to keep there: those of the installed table that are down only by
    /// their health checks (not disabled, draining or weighted 0 by the
    /// operator); or, if the installed table is unknown (adopted), every
    /// such backend. Empty when the service does not fail open.
    fn kept_last(&self, inst: &Installed, spec: &ServiceSpec) -> HashSet<SocketAddr> {
        if spec.when_all_down != WhenAllDown::KeepLast
            || spec.backends.iter().any(BackendSpec::in_table)
        {
            return HashSet::new();
        }
        let health_only =
            |b: &&BackendSpec| !b.healthy && b.state == AdminState::Active && b.weight > 0;
        let last: HashSet<u32> = inst.entries.iter().map(|e| e.id).collect();
        let kept: HashSet<SocketAddr> = spec
            .backends
            .iter()
            .filter(health_only)
            .filter(|b| {
                inst.backend_ids
                    .get(&b.address)
                    .is_some_and(|id| last.contains(id))
            })
            .map(|b| b.address)
            .collect();
        if !kept.is_empty() || !inst.entries.is_empty() {
            return kept;
        }
        spec.backends
            .iter()
            .filter(health_only)
            .map(|b| b.address)
            .collect()
    }

    fn backend_entry(&self, spec: &ServiceSpec, service: u32, addr: SocketAddr) -> BackendEntry {
        let rewrite = rewrites_address(spec.forwarding, spec.listen, addr);
        BackendEntry {
            addr: addr_words(addr.ip()),
            port: addr.port(),
            state: BACKEND_UNUSED,
            flags: if rewrite { BACKEND_REWRITE_ADDR } else { 0 },
            service,
            generation: 0,
        }
    }
}
