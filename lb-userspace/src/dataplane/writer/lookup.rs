//! The lookup maps beside the Maglev tables: wildcard services by port,
//! address-specific services, and the reverse translation of replies, all
//! rewritten from the desired services.

use std::collections::{HashMap, HashSet};

use lb_common::{
    AddrKey, BACKEND_REWRITE_ADDR, BackendEntry, PORT_HAS_ADDR_SERVICES, PortEntry, REV_HAS_ADDRS,
    REV_PORT_ONLY, RevAddrValue, RevPortEntry, port_slot,
};

use super::{Forwarding, MapWriter, ServiceSpec, addr_words};
use crate::{dataplane::Result, mapstore::MapStore};

impl<S: MapStore> MapWriter<S> {
    /// Rewrites the port, address-service and reverse-translation maps to
    /// match `desired`, restricted to the services installed so far.
    /// With `replies_only`, writes only the reverse-translation entries that
    /// are new or changed, and nothing else.
    pub(super) fn sync_lookup_maps(
        &mut self,
        desired: &[ServiceSpec],
        replies_only: bool,
    ) -> Result<()> {
        let mut ports: HashMap<u32, PortEntry> = HashMap::new();
        let mut addr_services: HashMap<AddrKey, u32> = HashMap::new();
        let mut reverse = Reverse::default();
        // Services whose backends' replies pass through here, by id.
        let mut answering: HashMap<u32, &ServiceSpec> = HashMap::new();
        for spec in desired {
            let Some(inst) = self.services.get(&spec.name) else {
                continue;
            };
            if spec.forwarding != Forwarding::Dsr {
                answering.insert(inst.id, spec);
            }
            for p in &spec.protocols {
                let proto = p.number();
                let slot = port_slot(spec.listen.port(), proto);
                let e = ports.entry(slot).or_default();
                if spec.listen.ip().is_unspecified() {
                    // `0.0.0.0` takes IPv4 packets only, `[::]` IPv6 only.
                    let id = (inst.id + 1) as u16;
                    if spec.listen.is_ipv4() {
                        e.wildcard_v4 = id;
                    } else {
                        e.wildcard_v6 = id;
                    }
                } else {
                    e.flags |= PORT_HAS_ADDR_SERVICES;
                    addr_services.insert(
                        AddrKey {
                            addr: addr_words(spec.listen.ip()),
                            port: spec.listen.port(),
                            proto,
                            _pad: 0,
                        },
                        inst.id,
                    );
                }
                // Replies of `dsr` backends never pass through here.
                if spec.forwarding == Forwarding::Dsr {
                    continue;
                }
                for b in &spec.backends {
                    let entry = self.backend_entry(spec, inst.id, b.address);
                    reverse.add(spec, proto, &entry);
                }
            }
        }
        // Backends that leave a service keep their reverse entries, from
        // before their table changes until their id is handed out again: a
        // reply on its way (or a handshake that began just before the
        // change) still leaves as the service, so the client gets it, or
        // the reset its next packet earns, instead of dropping it and
        // waiting for an answer. The program translates such a reply only
        // while the flow's slot remembers the backend (`select::answers`).
        // Entries of the desired backends win, then the backend that held
        // a port last (the highest generation).
        let mut claimed: HashSet<u32> = reverse.ports.keys().copied().collect();
        let mut left: Vec<(&BackendEntry, &ServiceSpec)> = self
            .backend_entries
            .values()
            .filter(|e| e.port != 0)
            .filter_map(|e| Some((e, *answering.get(&e.service)?)))
            .collect();
        left.sort_by_key(|(e, _)| std::cmp::Reverse(e.generation));
        for (entry, spec) in left {
            for p in &spec.protocols {
                let proto = p.number();
                if claimed.insert(port_slot(entry.port, proto)) {
                    reverse.add(spec, proto, entry);
                }
            }
        }
        let Reverse {
            ports: rev_ports,
            addrs: rev_addrs,
        } = reverse;
        // Additions and changes, then deletions of what is left over.
        if replies_only {
            ports.clear();
            addr_services.clear();
        }
        for (k, v) in &addr_services {
            if self.addr_services.get(k) != Some(v) {
                self.dp.set_addr_service(k, *v)?;
                self.addr_services.insert(*k, *v);
            }
        }
        for (k, v) in &ports {
            self.write_port(*k, *v)?;
        }
        for (k, v) in &rev_addrs {
            if self.rev_addrs.get(k) != Some(v) {
                self.dp.set_rev_addr(k, v)?;
                self.rev_addrs.insert(*k, *v);
            }
        }
        for (k, v) in &rev_ports {
            if self.rev_ports.get(k) != Some(v) {
                self.dp.set_rev_port(*k, *v)?;
                self.rev_ports.insert(*k, *v);
            }
        }
        if replies_only {
            return Ok(());
        }
        for k in self.ports.keys().copied().collect::<Vec<_>>() {
            if !ports.contains_key(&k) {
                self.write_port(k, PortEntry::default())?;
            }
        }
        for k in self.addr_services.keys().copied().collect::<Vec<_>>() {
            if !addr_services.contains_key(&k) {
                self.delete_addr_service(&k)?;
            }
        }
        for k in self.rev_ports.keys().copied().collect::<Vec<_>>() {
            if !rev_ports.contains_key(&k) {
                self.dp.set_rev_port(k, RevPortEntry::default())?;
                self.rev_ports.remove(&k);
            }
        }
        for k in self.rev_addrs.keys().copied().collect::<Vec<_>>() {
            if !rev_addrs.contains_key(&k) {
                self.dp.delete_rev_addr(&k);
                self.rev_addrs.remove(&k);
            }
        }
        Ok(())
    }

    pub(super) fn write_port(&mut self, slot: u32, entry: PortEntry) -> Result<()> {
        if self.ports.get(&slot).copied().unwrap_or_default() == entry {
            return Ok(());
        }
        self.dp.set_port(slot, entry)?;
        if entry == PortEntry::default() {
            self.ports.remove(&slot);
        } else {
            self.ports.insert(slot, entry);
        }
        Ok(())
    }

    pub(super) fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()> {
        self.dp.delete_addr_service(key)?;
        self.addr_services.remove(key);
        Ok(())
    }
}

/// The reverse-translation entries being built: by port slot, and by
/// backend address and port for backends whose address is rewritten.
#[derive(Default)]
struct Reverse {
    ports: HashMap<u32, RevPortEntry>,
    addrs: HashMap<AddrKey, RevAddrValue>,
}

impl Reverse {
    /// Replies from `backend` (its port, and its address where the program
    /// rewrites it) leave as `spec`'s listen address and port.
    fn add(&mut self, spec: &ServiceSpec, proto: u8, backend: &BackendEntry) {
        let r = self
            .ports
            .entry(port_slot(backend.port, proto))
            .or_default();
        if backend.flags & BACKEND_REWRITE_ADDR != 0 {
            r.flags |= REV_HAS_ADDRS;
            self.addrs.insert(
                AddrKey {
                    addr: backend.addr,
                    port: backend.port,
                    proto,
                    _pad: 0,
                },
                RevAddrValue {
                    addr: addr_words(spec.listen.ip()),
                    port: spec.listen.port(),
                    _pad: [0; 2],
                },
            );
        } else {
            r.flags |= REV_PORT_ONLY;
            r.service_port = spec.listen.port();
        }
    }
}
