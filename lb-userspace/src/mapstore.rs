//! What the map writer needs of the kernel maps, as a trait: `Dataplane` is
//! the real store; `MemStore` keeps the same maps in memory, so the map
//! writer's planning (ids, generations, tables, lookup maps, fail-open,
//! sweeps) is tested without root or a kernel.
use std::collections::{BTreeMap, HashMap};

use lb_common::quic::{QuicServiceEntry, QuicSidKey, QuicSidValue};
use lb_common::{
    AddrKey, BackendEntry, FlowHash, FlowKey, FlowValue, MaglevSlot, PortEntry, RevAddrValue,
    RevPortEntry, ServiceEntry, TABLES_PER_SERVICE,
};

use crate::{
    dataplane::{DataplaneError, Options},
    pins,
};

type Result<T> = std::result::Result<T, DataplaneError>;

/// The maps the map writer reads and writes. Writes of the lookup maps
/// (`set_*`) are idempotent; a default entry clears a slot.
pub trait MapStore {
    fn options(&self) -> &Options;
    /// The flow hash the programs run (a `MemStore`: the configured one, else
    /// `Fast`, as for a data plane new to its host).
    fn flow_hash(&self) -> FlowHash {
        self.options().flow_hash.unwrap_or(FlowHash::Fast)
    }
    /// The maps came from an earlier daemon (their contents can be read back).
    fn adopted(&self) -> bool;
    fn recorded_ids(&self) -> &pins::Ids;
    fn record_ids(&mut self, ids: pins::Ids) -> Result<()>;
    fn service_entry(&self, id: u32) -> Result<ServiceEntry>;
    fn write_service(&mut self, id: u32, entry: &ServiceEntry) -> Result<()>;
    fn write_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()>;
    /// Empties backend `id`'s `LB_NEXTHOPS` entry (its holder changed).
    fn clear_next_hop(&mut self, id: u32) -> Result<()>;
    /// Zeroes backend `id`'s counters (`LB_BE_STATS`): the id is handed to
    /// a new backend, which must not show its predecessor's packets.
    fn reset_backend_counters(&mut self, id: u32) -> Result<()>;
    /// Writes `slots` into a table no packet reads and flips the service to
    /// it; returns the table's index.
    fn install_table(&mut self, service: u32, slots: &[MaglevSlot], forwarding: u8) -> Result<u32>;
    fn table(&self, service: u32, table: u32) -> &[MaglevSlot];
    fn table_mut(&mut self, service: u32, table: u32) -> &mut [MaglevSlot];
    fn set_port(&mut self, slot: u32, entry: PortEntry) -> Result<()>;
    fn set_addr_service(&mut self, key: &AddrKey, id: u32) -> Result<()>;
    /// Absent already is fine.
    fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()>;
    fn set_rev_port(&mut self, slot: u32, entry: RevPortEntry) -> Result<()>;
    fn set_rev_addr(&mut self, key: &AddrKey, value: &RevAddrValue) -> Result<()>;
    fn delete_rev_addr(&mut self, key: &AddrKey);
    /// Removes the pin `key` if it still is `value`; true if it was removed.
    fn remove_flow_if(&mut self, key: &FlowKey, value: &FlowValue) -> bool;
    /// Adoption: every non-default entry of the port, reverse-port and
    /// backend arrays, and every entry of the two address hashes.
    fn read_ports(&self) -> Result<Vec<(u32, PortEntry)>>;
    fn read_rev_ports(&self) -> Result<Vec<(u32, RevPortEntry)>>;
    fn read_addr_services(&self) -> Result<Vec<(AddrKey, u32)>>;
    fn read_rev_addrs(&self) -> Result<Vec<(AddrKey, RevAddrValue)>>;
    fn read_backends(&self) -> Result<Vec<(u32, BackendEntry)>>;
    /// `LB_QUIC_SVCS[id]` (a default entry: no QUIC-LB).
    fn write_quic_service(&mut self, id: u32, entry: &QuicServiceEntry) -> Result<()>;
    fn set_quic_server_id(&mut self, key: &QuicSidKey, value: &QuicSidValue) -> Result<()>;
    /// Absent already is fine.
    fn delete_quic_server_id(&mut self, key: &QuicSidKey);
    /// Adoption: every entry of `LB_QUIC_SIDS`.
    fn read_quic_server_ids(&self) -> Result<Vec<(QuicSidKey, QuicSidValue)>>;
}

/// The maps in memory, with the same table semantics as the kernel's: three
/// tables per service, the active one flipped by an install.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub opts: Options,
    /// Set when a store is handed to a new writer as a restarted daemon's.
    pub adopted: bool,
    pub ids: pins::Ids,
    pub services: BTreeMap<u32, ServiceEntry>,
    pub backends: BTreeMap<u32, BackendEntry>,
    pub tables: HashMap<(u32, u32), Vec<MaglevSlot>>,
    pub ports: BTreeMap<u32, PortEntry>,
    pub addr_services: HashMap<AddrKey, u32>,
    pub rev_ports: BTreeMap<u32, RevPortEntry>,
    pub rev_addrs: HashMap<AddrKey, RevAddrValue>,
    pub flows: HashMap<FlowKey, FlowValue>,
    pub quic_services: BTreeMap<u32, QuicServiceEntry>,
    pub quic_server_ids: BTreeMap<QuicSidKey, QuicSidValue>,
    /// Table installs, for tests that count them.
    pub installs: usize,
    /// The backend entries as they were when the last table went in.
    pub backends_at_install: BTreeMap<u32, BackendEntry>,
    /// Backend ids whose next hop was cleared, in order.
    pub next_hops_cleared: Vec<u32>,
    /// Backend ids whose counters were zeroed, in order.
    pub counters_reset: Vec<u32>,
}

impl MemStore {
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            ..Self::default()
        }
    }

    /// The store as a restarted daemon finds it: everything kept, adopted.
    pub fn restarted(&self) -> Self {
        Self {
            adopted: true,
            ..self.clone()
        }
    }

    /// The table packets read now for a service.
    pub fn active_table(&self, service: u32) -> &[MaglevSlot] {
        let e = self.services.get(&service).copied().unwrap_or_default();
        self.table(service, e.active)
    }
}

fn unset<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl MapStore for MemStore {
    fn options(&self) -> &Options {
        &self.opts
    }

    fn adopted(&self) -> bool {
        self.adopted
    }

    fn recorded_ids(&self) -> &pins::Ids {
        &self.ids
    }

    fn record_ids(&mut self, ids: pins::Ids) -> Result<()> {
        self.ids = ids;
        Ok(())
    }

    fn service_entry(&self, id: u32) -> Result<ServiceEntry> {
        Ok(self.services.get(&id).copied().unwrap_or_default())
    }

    fn write_service(&mut self, id: u32, entry: &ServiceEntry) -> Result<()> {
        self.services.insert(id, *entry);
        Ok(())
    }

    fn write_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        self.backends.insert(id, *entry);
        Ok(())
    }

    fn clear_next_hop(&mut self, id: u32) -> Result<()> {
        self.next_hops_cleared.push(id);
        Ok(())
    }

    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        self.counters_reset.push(id);
        Ok(())
    }

    fn install_table(&mut self, service: u32, slots: &[MaglevSlot], forwarding: u8) -> Result<u32> {
        let m = self.opts.maglev_size;
        if slots.len() != m as usize || service >= self.opts.max_services {
            return Err(DataplaneError::Options(format!(
                "table of {} slots for service {service}; expected {m}",
                slots.len()
            )));
        }
        let mut e = self.service_entry(service)?;
        let next = if e.table_size == 0 {
            0
        } else {
            (e.active + 1) % TABLES_PER_SERVICE
        };
        self.tables.insert((service, next), slots.to_vec());
        e.active = next;
        e.generation = e.generation.wrapping_add(1);
        e.table_size = m;
        e.forwarding = forwarding;
        self.services.insert(service, e);
        self.installs += 1;
        self.backends_at_install = self.backends.clone();
        Ok(next)
    }

    fn table(&self, service: u32, table: u32) -> &[MaglevSlot] {
        self.tables
            .get(&(service, table))
            .map_or(&[][..], Vec::as_slice)
    }

    fn table_mut(&mut self, service: u32, table: u32) -> &mut [MaglevSlot] {
        let m = self.opts.maglev_size as usize;
        self.tables
            .entry((service, table))
            .or_insert_with(|| vec![MaglevSlot::EMPTY; m])
    }

    fn set_port(&mut self, slot: u32, entry: PortEntry) -> Result<()> {
        if unset(&entry) {
            self.ports.remove(&slot);
        } else {
            self.ports.insert(slot, entry);
        }
        Ok(())
    }

    fn set_addr_service(&mut self, key: &AddrKey, id: u32) -> Result<()> {
        self.addr_services.insert(*key, id);
        Ok(())
    }

    fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()> {
        self.addr_services.remove(key);
        Ok(())
    }

    fn set_rev_port(&mut self, slot: u32, entry: RevPortEntry) -> Result<()> {
        if unset(&entry) {
            self.rev_ports.remove(&slot);
        } else {
            self.rev_ports.insert(slot, entry);
        }
        Ok(())
    }

    fn set_rev_addr(&mut self, key: &AddrKey, value: &RevAddrValue) -> Result<()> {
        self.rev_addrs.insert(*key, *value);
        Ok(())
    }

    fn delete_rev_addr(&mut self, key: &AddrKey) {
        self.rev_addrs.remove(key);
    }

    fn remove_flow_if(&mut self, key: &FlowKey, value: &FlowValue) -> bool {
        if self.flows.get(key) == Some(value) {
            self.flows.remove(key);
            return true;
        }
        false
    }

    fn read_ports(&self) -> Result<Vec<(u32, PortEntry)>> {
        Ok(self.ports.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_rev_ports(&self) -> Result<Vec<(u32, RevPortEntry)>> {
        Ok(self.rev_ports.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_addr_services(&self) -> Result<Vec<(AddrKey, u32)>> {
        Ok(self.addr_services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_rev_addrs(&self) -> Result<Vec<(AddrKey, RevAddrValue)>> {
        Ok(self.rev_addrs.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_backends(&self) -> Result<Vec<(u32, BackendEntry)>> {
        Ok(self
            .backends
            .iter()
            .filter(|(_, v)| !unset(*v))
            .map(|(k, v)| (*k, *v))
            .collect())
    }

    fn write_quic_service(&mut self, id: u32, entry: &QuicServiceEntry) -> Result<()> {
        if unset(entry) {
            self.quic_services.remove(&id);
        } else {
            self.quic_services.insert(id, *entry);
        }
        Ok(())
    }

    fn set_quic_server_id(&mut self, key: &QuicSidKey, value: &QuicSidValue) -> Result<()> {
        self.quic_server_ids.insert(*key, *value);
        Ok(())
    }

    fn delete_quic_server_id(&mut self, key: &QuicSidKey) {
        self.quic_server_ids.remove(key);
    }

    fn read_quic_server_ids(&self) -> Result<Vec<(QuicSidKey, QuicSidValue)>> {
        Ok(self.quic_server_ids.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use lb_common::{
        BACKEND_ACTIVE, BACKEND_DOWN, FlowKey, FlowValue, PORT_HAS_ADDR_SERVICES, PROTO_TCP,
        PROTO_UDP, REV_PORT_ONLY, STICKY_MISS_SECS, port_slot,
    };

    use super::*;
    use crate::dataplane::{
        BackendSpec, DataplaneError, Forwarding, MapWriter, Protocol, ServiceSpec, join_pins,
        walk_pins,
    };

    const M: u32 = 251;

    fn opts() -> Options {
        Options {
            maglev_size: M,
            max_services: 4,
            // A record is kept only with pins; the in-memory store keeps it.
            pin_path: Some("/nonexistent/lb".into()),
            ..Options::default()
        }
    }

    fn svc(name: &str, listen: &str, ports: &[u16]) -> ServiceSpec {
        let ip = if listen.starts_with('[') {
            "[::1]"
        } else {
            "127.0.0.1"
        };
        ServiceSpec {
            name: name.into(),
            listen: listen.parse().unwrap(),
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            forwarding: Forwarding::Local,
            backends: ports
                .iter()
                .map(|p| BackendSpec::new(format!("{ip}:{p}").parse().unwrap(), 100))
                .collect(),
            when_all_down: Default::default(),
        }
    }

    /// A pin of service `sid`'s slot `slot` (the flow keyed by its port).
    fn pin(sid: u32, slot: usize, backend: u32, generation: u32) -> (FlowKey, FlowValue) {
        (
            FlowKey {
                sport: slot as u16,
                ..FlowKey::default()
            },
            FlowValue {
                backend,
                service: sid,
                slot: slot as u32,
                generation,
            },
        )
    }

    fn writer(services: &[ServiceSpec]) -> MapWriter<MemStore> {
        let mut w = MapWriter::new(MemStore::new(opts()));
        w.apply(services).unwrap();
        w
    }

    fn ids(w: &MapWriter<MemStore>, s: &ServiceSpec) -> Vec<u32> {
        s.backends
            .iter()
            .map(|b| w.backend_id(&s.name, b.address).unwrap())
            .collect()
    }

    #[test]
    fn a_first_apply_installs_tables_backends_and_lookup_maps() {
        let web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        let w = writer(std::slice::from_ref(&web));
        let st = w.store();
        let sid = w.service_id("web").unwrap();
        let bids = ids(&w, &web);
        assert_eq!(bids.iter().collect::<HashSet<_>>().len(), 3);
        let table = st.active_table(sid);
        assert_eq!(table.len(), M as usize);
        for b in &bids {
            let n = table.iter().filter(|s| s.backend == *b).count();
            assert!((80..=88).contains(&n), "backend {b} holds {n} slots");
            let e = st.backends[b];
            assert_eq!((e.state, e.service), (BACKEND_ACTIVE, sid));
            assert!(e.generation > 0);
        }
        assert!(
            table.iter().all(|s| !s.is_sticky()),
            "a first table is clean"
        );
        for proto in [PROTO_TCP, PROTO_UDP] {
            let p = st.ports[&port_slot(443, proto)];
            assert_eq!((p.wildcard_v4, p.wildcard_v6), (sid as u16 + 1, 0));
            for port in [8001, 8002, 8003] {
                let r = st.rev_ports[&port_slot(port, proto)];
                assert_eq!((r.service_port, r.flags), (443, REV_PORT_ONLY));
            }
        }
        assert_eq!(st.ids.services["web"].id, sid, "ids recorded");
    }

    #[test]
    fn slot_shares_count_the_installed_table() {
        let mut web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        web.backends[2].weight = 200;
        let mut w = writer(std::slice::from_ref(&web));
        let sid = w.service_id("web").unwrap();
        let table = w.store().active_table(sid).to_vec();
        let mut sum = 0;
        for b in &web.backends {
            let id = w.backend_id("web", b.address).unwrap();
            let (n, total) = w.slot_share("web", b.address).unwrap();
            assert_eq!(total, M);
            assert_eq!(n as usize, table.iter().filter(|s| s.backend == id).count());
            sum += n;
        }
        assert_eq!(sum, M, "every slot belongs to one backend");
        let (heavy, _) = w.slot_share("web", web.backends[2].address).unwrap();
        assert!(
            (120..=131).contains(&heavy),
            "weight 200 of 400: {heavy} of {M}"
        );
        // Drained: out of the next table, 0 slots.
        web.backends[0].state = crate::dataplane::AdminState::Draining;
        w.apply(std::slice::from_ref(&web)).unwrap();
        assert_eq!(w.slot_share("web", web.backends[0].address), Some((0, M)));
        assert_eq!(w.slot_share("web", "127.0.0.1:9".parse().unwrap()), None);
        assert_eq!(w.slot_share("nope", web.backends[1].address), None);
    }

    #[test]
    fn an_unchanged_apply_writes_no_table() {
        let web = svc("web", "0.0.0.0:443", &[8001, 8002]);
        let mut w = writer(std::slice::from_ref(&web));
        let installs = w.store().installs;
        let report = w.apply(std::slice::from_ref(&web)).unwrap();
        assert_eq!(report.tables_installed, 0);
        assert_eq!(w.store().installs, installs);
    }

    #[test]
    fn a_removed_backend_goes_down_once_the_table_without_it_is_in() {
        let mut web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        let mut w = writer(std::slice::from_ref(&web));
        let sid = w.service_id("web").unwrap();
        let gone = w.backend_id("web", web.backends[1].address).unwrap();
        let before = w.store().active_table(sid).to_vec();
        let old_gen = w.store().backends[&gone].generation;
        web.backends.remove(1);
        assert_eq!(
            w.apply(std::slice::from_ref(&web))
                .unwrap()
                .tables_installed,
            1
        );
        // While the old table was read, its backend still held its flows.
        assert_eq!(
            w.store().backends_at_install[&gone].state,
            BACKEND_ACTIVE,
            "down before the table that leaves it out"
        );
        // Then down, with a new generation: the slots remember the one it
        // had, so neither they nor its pins hold it any more.
        let e = w.store().backends[&gone];
        assert_eq!(e.state, BACKEND_DOWN);
        assert_ne!(e.generation, old_gen);
        let mut moved = 0;
        for (old, new) in before.iter().zip(w.store().active_table(sid)) {
            if old.backend == gone {
                assert_ne!(new.backend, gone);
                assert_eq!((new.prev, new.prev_gen), (gone, old_gen));
            } else if new.backend != old.backend {
                // Maglev moves a few other slots too: each remembers its
                // previous backend, which keeps its flows.
                let g = w.store().backends[&old.backend].generation;
                assert_eq!((new.prev, new.prev_gen), (old.backend, g));
                moved += 1;
            } else {
                assert_eq!(new, old, "an unchanged slot changed");
            }
        }
        assert!(moved * 20 < before.len(), "{moved} other slots moved");
    }

    #[test]
    fn a_removed_backend_keeps_its_reverse_entry_and_the_last_holder_of_a_port_wins() {
        let rev = |w: &MapWriter<MemStore>| {
            w.store()
                .rev_ports
                .get(&port_slot(8003, PROTO_TCP))
                .copied()
        };
        let mut w = writer(&[
            svc("a", "0.0.0.0:443", &[8001, 8003]),
            svc("b", "0.0.0.0:8443", &[8004]),
        ]);
        assert_eq!(rev(&w).map(|r| r.service_port), Some(443));
        // 8003 leaves a: its replies still leave as a's.
        w.apply(&[
            svc("a", "0.0.0.0:443", &[8001]),
            svc("b", "0.0.0.0:8443", &[8004]),
        ])
        .unwrap();
        let r = rev(&w).expect("the leaving backend's entry");
        assert_eq!((r.flags, r.service_port), (REV_PORT_ONLY, 443));
        // b takes port 8003, then lets it go: two backends that left held
        // it, and the one that held it last (b's) keeps the entry.
        for b in [&[8004, 8003][..], &[8004]] {
            w.apply(&[
                svc("a", "0.0.0.0:443", &[8001]),
                svc("b", "0.0.0.0:8443", b),
            ])
            .unwrap();
            assert_eq!(rev(&w).map(|r| r.service_port), Some(8443));
        }
        // Once its service goes, nothing is left to answer for.
        w.apply(&[svc("a", "0.0.0.0:443", &[8001])]).unwrap();
        assert_eq!(rev(&w).map(|r| r.service_port), Some(443), "a's own leaver");
        w.apply(&[]).unwrap();
        assert_eq!(rev(&w).map_or(0, |r| r.flags), 0);
    }

    #[test]
    fn remote_backends_are_listed_and_an_id_that_changes_hands_loses_its_next_hop() {
        let mut web = svc("web", "10.0.0.1:443", &[8001, 8002]);
        web.forwarding = Forwarding::Nat;
        for (i, b) in web.backends.iter_mut().enumerate() {
            b.address = format!("10.0.1.{}:8443", i + 1).parse().unwrap();
        }
        let local = svc("local", "0.0.0.0:80", &[9001]);
        let mut w = writer(&[web.clone(), local.clone()]);
        let bids = ids(&w, &web);
        let remote = w.remote_backends();
        assert_eq!(
            remote.iter().map(|b| b.id).collect::<HashSet<_>>(),
            bids.iter().copied().collect::<HashSet<_>>(),
            "only the nat service's backends"
        );
        for b in &remote {
            assert_eq!(b.generation, w.store().backends[&b.id].generation);
            assert_eq!(
                b.addr.to_string(),
                format!(
                    "10.0.1.{}",
                    bids.iter().position(|i| *i == b.id).unwrap() + 1
                )
            );
        }
        assert!(w.store().next_hops_cleared.is_empty());
        let gone = bids[1];
        web.backends.remove(1);
        w.apply(&[web.clone(), local]).unwrap();
        assert_eq!(
            w.store().next_hops_cleared,
            vec![gone],
            "the removed backend's id"
        );
        assert_eq!(w.remote_backends().len(), 1);
    }

    #[test]
    fn ids_reused_after_a_restart_get_new_generations() {
        let a = svc("a", "0.0.0.0:443", &[8001, 8002, 8003]);
        let mut w = writer(std::slice::from_ref(&a));
        let old = ids(&w, &a);
        w.apply(&[]).unwrap();
        let top = w
            .store()
            .backends
            .values()
            .map(|e| e.generation)
            .max()
            .unwrap();
        // A restarted daemon reads back the maps and the (now empty) record.
        let mut w2 = MapWriter::new(w.store().restarted());
        let b = svc("b", "0.0.0.0:443", &[9001, 9002, 9003]);
        w2.apply(std::slice::from_ref(&b)).unwrap();
        let new = ids(&w2, &b);
        assert_eq!(
            new.iter().collect::<HashSet<_>>(),
            old.iter().collect::<HashSet<_>>(),
            "ids are reused lowest first"
        );
        for id in new {
            assert!(w2.store().backends[&id].generation > top);
        }
    }

    /// A new backend starts with zero counters, also on an id its
    /// predecessor's packets were counted under; an adopted backend keeps
    /// its counts across a restart.
    #[test]
    fn an_id_handed_to_a_new_backend_starts_with_zero_counters() {
        let web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        let mut w = writer(std::slice::from_ref(&web));
        let first = ids(&w, &web);
        assert_eq!(
            w.store().counters_reset.iter().collect::<HashSet<_>>(),
            first.iter().collect::<HashSet<_>>()
        );
        // 8002 goes; after a restart its id is the lowest free one, and
        // the new backend gets it.
        let mut fewer = web.clone();
        fewer.backends.remove(1);
        w.apply(std::slice::from_ref(&fewer)).unwrap();
        let gone = first[1];
        let mut restarted = w.store().restarted();
        restarted.counters_reset.clear();
        let mut w2 = MapWriter::new(restarted);
        let mut more = fewer.clone();
        more.backends
            .push(BackendSpec::new("127.0.0.1:8004".parse().unwrap(), 100));
        w2.apply(std::slice::from_ref(&more)).unwrap();
        let new_id = w2
            .backend_id("web", "127.0.0.1:8004".parse().unwrap())
            .unwrap();
        assert_eq!(new_id, gone, "the freed id is handed out again");
        assert_eq!(
            w2.store().counters_reset,
            vec![gone],
            "only the new backend's counters are zeroed; 8001 and 8003 keep theirs"
        );
    }

    #[test]
    fn a_restart_with_nothing_changed_writes_nothing() {
        let web = svc("web", "10.0.0.1:443", &[8001, 8002]);
        let w = writer(std::slice::from_ref(&web));
        let mut w2 = MapWriter::new(w.store().restarted());
        let report = w2.apply(std::slice::from_ref(&web)).unwrap();
        assert_eq!(report.tables_installed, 0);
        assert_eq!(ids(&w2, &web), ids(&w, &web));
        assert_eq!(w2.store().installs, w.store().installs);
    }

    #[test]
    fn another_table_size_rebuilds_every_table() {
        let web = svc("web", "0.0.0.0:443", &[8001, 8002]);
        let w = writer(std::slice::from_ref(&web));
        let mut bigger = w.store().restarted();
        bigger.opts.maglev_size = 257;
        let mut w2 = MapWriter::new(bigger);
        assert_eq!(
            w2.apply(std::slice::from_ref(&web))
                .unwrap()
                .tables_installed,
            1
        );
        let sid = w2.service_id("web").unwrap();
        assert_eq!(w2.store().active_table(sid).len(), 257);
    }

    #[test]
    fn services_fill_up_to_the_limit_and_free_their_ids() {
        let mut all: Vec<ServiceSpec> = (0..4)
            .map(|i| svc(&format!("s{i}"), &format!("10.0.0.{}:443", i + 1), &[8001]))
            .collect();
        let mut w = writer(&all);
        let extra = svc("s4", "10.0.0.9:443", &[8001]);
        let mut five = all.clone();
        five.push(extra.clone());
        assert!(matches!(
            w.apply(&five),
            Err(DataplaneError::Full("services"))
        ));
        // Nothing of the refused change was written.
        assert!(w.service_id("s4").is_none());
        let freed = w.service_id("s0").unwrap();
        all.remove(0);
        all.push(extra);
        w.apply(&all).unwrap();
        assert_eq!(w.service_id("s4"), Some(freed));
        assert_eq!(
            w.store().addr_services.len(),
            2 * 4,
            "tcp and udp per address"
        );
    }

    #[test]
    fn wildcards_and_addresses_share_a_port_by_family() {
        let services = [
            svc("v4", "0.0.0.0:443", &[8001]),
            svc("v6", "[::]:443", &[8001]),
            svc("a4", "10.0.0.1:443", &[8001]),
            svc("a6", "[fd00::1]:443", &[8001]),
        ];
        let w = writer(&services);
        let p = w.store().ports[&port_slot(443, PROTO_TCP)];
        assert_eq!(u32::from(p.wildcard_v4), w.service_id("v4").unwrap() + 1);
        assert_eq!(u32::from(p.wildcard_v6), w.service_id("v6").unwrap() + 1);
        assert_eq!(p.flags & PORT_HAS_ADDR_SERVICES, PORT_HAS_ADDR_SERVICES);
        let named: HashSet<u32> = w.store().addr_services.values().copied().collect();
        let want: HashSet<u32> = ["a4", "a6"]
            .iter()
            .map(|n| w.service_id(n).unwrap())
            .collect();
        assert_eq!(named, want);
    }

    #[test]
    fn when_all_fail_the_last_backends_stay() {
        let mut web = svc("web", "0.0.0.0:443", &[8001, 8002]);
        let mut w = writer(std::slice::from_ref(&web));
        let installs = w.store().installs;
        for b in &mut web.backends {
            b.healthy = false;
        }
        let report = w.apply(std::slice::from_ref(&web)).unwrap();
        assert!(w.fail_open("web"));
        assert_eq!(report.tables_installed, 0);
        assert_eq!(w.store().installs, installs);
        for id in ids(&w, &web) {
            assert_eq!(w.store().backends[&id].state, BACKEND_ACTIVE);
        }
        web.backends[0].healthy = true;
        w.apply(std::slice::from_ref(&web)).unwrap();
        assert!(!w.fail_open("web"));
        let down = w.backend_id("web", web.backends[1].address).unwrap();
        assert_eq!(w.store().backends[&down].state, BACKEND_DOWN);
    }

    #[test]
    fn a_sweep_cleans_what_no_pin_needs_and_removes_stale_pins() {
        let mut web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        let mut w = writer(std::slice::from_ref(&web));
        let sid = w.service_id("web").unwrap();
        web.backends
            .push(BackendSpec::new("127.0.0.1:8004".parse().unwrap(), 100));
        w.apply(std::slice::from_ref(&web)).unwrap();
        let table = w.store().active_table(sid).to_vec();
        let sticky: Vec<usize> = (0..table.len()).filter(|i| table[*i].is_sticky()).collect();
        assert!(sticky.len() > 20);
        // One live pin on a sticky slot's previous backend, one stale pin.
        let (kept, other) = (sticky[0], sticky[1]);
        let prev = table[kept].prev;
        let pin = |slot: usize, backend: u32, generation: u32| pin(sid, slot, backend, generation);
        let live_gen = w.store().backends[&prev].generation;
        let mut flows: Vec<(FlowKey, FlowValue)> =
            vec![pin(kept, prev, live_gen), pin(other, prev, live_gen + 100)];
        let now = table[kept].changed;
        assert!(w.sweep_plan(now).candidates.is_empty(), "too young");
        let plan = w.sweep_plan(now + STICKY_MISS_SECS);
        let found = walk_pins(&plan, flows.iter().copied());
        assert_eq!(found.needed.len(), 1);
        assert_eq!(found.stale.len(), 1);
        // The store holds the same pins, so the stale one can be removed.
        let mut st = w.store().clone();
        st.flows = flows.drain(..).collect();
        let mut w = MapWriter::new(st.restarted());
        w.apply(std::slice::from_ref(&web)).unwrap();
        let plan = w.sweep_plan(now + STICKY_MISS_SECS);
        let found = walk_pins(&plan, w.store().flows.clone().into_iter());
        let report = w.finish_sweep(&plan, &found).unwrap();
        assert_eq!(report.stale_pins_removed, 1);
        assert_eq!(report.slots_cleaned, sticky.len() - 1);
        let after = w.store().active_table(sid);
        assert!(after[kept].is_sticky(), "a slot a live pin needs stays");
        assert_eq!(after.iter().filter(|s| s.is_sticky()).count(), 1);
    }

    #[test]
    fn a_join_gets_the_live_pins_of_changed_slots_by_address() {
        let mut web = svc("web", "0.0.0.0:443", &[8001, 8002, 8003]);
        let mut w = writer(std::slice::from_ref(&web));
        let sid = w.service_id("web").unwrap();
        assert!(
            w.join_plan().changed.is_empty(),
            "a first table changed nothing"
        );
        web.backends
            .push(BackendSpec::new("127.0.0.1:8004".parse().unwrap(), 100));
        w.apply(std::slice::from_ref(&web)).unwrap();
        let table = w.store().active_table(sid).to_vec();
        let sticky: Vec<usize> = (0..table.len()).filter(|i| table[*i].is_sticky()).collect();
        let clean = (0..table.len()).find(|i| !table[*i].is_sticky()).unwrap();
        let plan = w.join_plan();
        assert_eq!(plan.changed.len(), sticky.len());
        let pin = |slot: usize, backend: u32, generation: u32| pin(sid, slot, backend, generation);
        let gen_of = |id: u32| w.store().backends[&id].generation;
        let (a, b) = (sticky[0], sticky[1]);
        let (prev, cur) = (table[a].prev, table[b].backend);
        let flows = [
            // On the changed slot's previous backend and on its new one.
            pin(a, prev, gen_of(prev)),
            pin(b, cur, gen_of(cur)),
            // A clean slot's pin, and a stale one (an old generation).
            pin(clean, table[clean].backend, gen_of(table[clean].backend)),
            pin(sticky[2], prev, gen_of(prev) + 100),
        ];
        let got = join_pins(&plan, flows.iter().copied());
        let addr = |id: u32| {
            web.backends
                .iter()
                .map(|b| b.address)
                .find(|x| w.backend_id("web", *x) == Some(id))
                .unwrap()
        };
        assert_eq!(got, vec![(flows[0].0, addr(prev)), (flows[1].0, addr(cur))]);
    }
}
