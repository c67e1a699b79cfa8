//! The kernel's maps as a `MapStore`: plain reads and writes of entries,
//! no decisions.

use aya::maps::{Array, MapData, MapError};
use lb_common::{
    AddrKey, BackendEntry, FlowKey, FlowValue, MaglevSlot, PortEntry, RevAddrValue, RevPortEntry,
    ServiceEntry, maps,
};

use super::{Dataplane, Options, Result, map_err};
use crate::{mapstore::MapStore, pins};

impl Dataplane {
    fn write_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        self.backends
            .set(id, entry, 0)
            .map_err(map_err(maps::BACKENDS))
    }

    pub(super) fn write_service(&mut self, id: u32, entry: &ServiceEntry) -> Result<()> {
        self.services
            .set(id, entry, 0)
            .map_err(map_err(maps::SERVICES))
    }

    pub(super) fn service_entry(&self, id: u32) -> Result<ServiceEntry> {
        self.services.get(&id, 0).map_err(map_err(maps::SERVICES))
    }
}

impl MapStore for Dataplane {
    fn options(&self) -> &Options {
        &self.opts
    }

    fn flow_hash(&self) -> lb_common::FlowHash {
        Dataplane::flow_hash(self)
    }

    fn adopted(&self) -> bool {
        self.adopted
    }

    fn recorded_ids(&self) -> &pins::Ids {
        Dataplane::recorded_ids(self)
    }

    fn record_ids(&mut self, ids: pins::Ids) -> Result<()> {
        Dataplane::record_ids(self, ids)
    }

    fn service_entry(&self, id: u32) -> Result<ServiceEntry> {
        Dataplane::service_entry(self, id)
    }

    fn write_service(&mut self, id: u32, entry: &ServiceEntry) -> Result<()> {
        Dataplane::write_service(self, id, entry)
    }

    fn write_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        Dataplane::write_backend(self, id, entry)
    }

    fn clear_next_hop(&mut self, id: u32) -> Result<()> {
        Dataplane::clear_next_hop(self, id)
    }

    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        Dataplane::reset_backend_counters(self, id)
    }

    fn install_table(&mut self, service: u32, slots: &[MaglevSlot], forwarding: u8) -> Result<u32> {
        Dataplane::install_table(self, service, slots, forwarding)
    }

    fn table(&self, service: u32, table: u32) -> &[MaglevSlot] {
        Dataplane::table(self, service, table)
    }

    fn table_mut(&mut self, service: u32, table: u32) -> &mut [MaglevSlot] {
        Dataplane::table_mut(self, service, table)
    }

    fn set_port(&mut self, slot: u32, entry: PortEntry) -> Result<()> {
        self.ports.set(slot, entry, 0).map_err(map_err(maps::PORTS))
    }

    /// The hash map first, then its front array (`addr_slots`).
    fn set_addr_service(&mut self, key: &AddrKey, id: u32) -> Result<()> {
        self.addr_services
            .insert(key, id, 0)
            .map_err(map_err(maps::ADDR_SERVICES))?;
        self.set_addr_slot(key, id)
    }

    /// The front array first, then the hash map.
    fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()> {
        self.remove_addr_slot(key)?;
        match self.addr_services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::ADDR_SERVICES)(e)),
        }
    }

    fn set_rev_port(&mut self, slot: u32, entry: RevPortEntry) -> Result<()> {
        self.rev_ports
            .set(slot, entry, 0)
            .map_err(map_err(maps::REV_PORTS))
    }

    fn set_rev_addr(&mut self, key: &AddrKey, value: &RevAddrValue) -> Result<()> {
        self.rev_addrs
            .insert(key, value, 0)
            .map_err(map_err(maps::REV_ADDRS))
    }

    fn delete_rev_addr(&mut self, key: &AddrKey) {
        let _ = self.rev_addrs.remove(key);
    }

    fn remove_flow_if(&mut self, key: &FlowKey, value: &FlowValue) -> bool {
        let removed = self.flows.get(key).as_ref() == Some(value) && self.flows.remove(key);
        // A failed count only makes the size read high until the next removal.
        if removed && let Err(e) = self.count_flows_removed(super::Family::of(key), 1) {
            tracing::warn!("counting a removed pin: {e}");
        }
        removed
    }

    fn read_ports(&self) -> Result<Vec<(u32, PortEntry)>> {
        set_entries(&self.ports, maps::PORTS)
    }

    fn read_rev_ports(&self) -> Result<Vec<(u32, RevPortEntry)>> {
        set_entries(&self.rev_ports, maps::REV_PORTS)
    }

    fn read_addr_services(&self) -> Result<Vec<(AddrKey, u32)>> {
        self.addr_services
            .iter()
            .map(|kv| kv.map_err(map_err(maps::ADDR_SERVICES)))
            .collect()
    }

    fn read_rev_addrs(&self) -> Result<Vec<(AddrKey, RevAddrValue)>> {
        self.rev_addrs
            .iter()
            .map(|kv| kv.map_err(map_err(maps::REV_ADDRS)))
            .collect()
    }

    fn read_backends(&self) -> Result<Vec<(u32, BackendEntry)>> {
        set_entries(&self.backends, maps::BACKENDS)
    }

    fn write_quic_service(
        &mut self,
        id: u32,
        entry: &lb_common::quic::QuicServiceEntry,
    ) -> Result<()> {
        Dataplane::write_quic_service(self, id, entry)
    }

    fn set_quic_server_id(
        &mut self,
        key: &lb_common::quic::QuicSidKey,
        value: &lb_common::quic::QuicSidValue,
    ) -> Result<()> {
        Dataplane::set_quic_server_id(self, key, value)
    }

    fn delete_quic_server_id(&mut self, key: &lb_common::quic::QuicSidKey) {
        Dataplane::delete_quic_server_id(self, key);
    }

    fn read_quic_server_ids(
        &self,
    ) -> Result<Vec<(lb_common::quic::QuicSidKey, lb_common::quic::QuicSidValue)>> {
        Dataplane::read_quic_server_ids(self)
    }
}

/// The entries of an array map that are not the default, with their index.
pub(super) fn set_entries<T: aya::Pod + Default + PartialEq>(
    map: &Array<MapData, T>,
    name: &'static str,
) -> Result<Vec<(u32, T)>> {
    let mut out = Vec::new();
    for (i, e) in map.iter().enumerate() {
        let e = e.map_err(map_err(name))?;
        if e != T::default() {
            out.push((i as u32, e));
        }
    }
    Ok(out)
}
