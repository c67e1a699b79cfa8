//! The data plane's QUIC-LB maps: each service's CID config and key, the
//! server ids of its backends, the per-service routing counters, and the
//! tail-call wiring of the decrypt program (set up once at load).

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray},
    programs::Xdp,
};
use lb_common::{
    maps, programs,
    quic::{
        AES_TABLES, AesTables, PROG_DECRYPT, PROG_XDP, QUIC_ROUTE_COUNT, QuicRoute,
        QuicServiceEntry, QuicSidKey, QuicSidValue, quic_stats_index,
    },
};

use super::{Dataplane, DataplaneError, Result, load::take_as as take, map_err};

pub(super) struct QuicMaps {
    services: Array<MapData, QuicServiceEntry>,
    server_ids: BpfHashMap<MapData, QuicSidKey, QuicSidValue>,
    stats: PerCpuArray<MapData, u64>,
    /// Held for the programs' life: the kernel empties a program array when
    /// its last user descriptor closes.
    _progs: ProgramArray<MapData>,
}

impl QuicMaps {
    /// Takes the maps out of the loaded object, writes the AES tables and
    /// fills the program array (both programs must be loaded).
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut aes: Array<MapData, AesTables> = take(ebpf, maps::AES_TABLES)?;
        aes.set(0, AES_TABLES, 0)
            .map_err(map_err(maps::AES_TABLES))?;
        let mut progs: ProgramArray<MapData> = take(ebpf, maps::QUIC_PROGS)?;
        for (slot, name) in [
            (PROG_DECRYPT, programs::XDP_QUIC_DECRYPT),
            (PROG_XDP, programs::XDP),
        ] {
            let prog: &Xdp = ebpf
                .program(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd = prog
                .fd()
                .map_err(|source| DataplaneError::Program { name, source })?;
            progs.set(slot, fd, 0).map_err(map_err(maps::QUIC_PROGS))?;
        }
        Ok(Self {
            services: take(ebpf, maps::QUIC_SERVICES)?,
            server_ids: take(ebpf, maps::QUIC_SERVER_IDS)?,
            stats: take(ebpf, maps::QUIC_STATS)?,
            _progs: progs,
        })
    }
}

impl Dataplane {
    pub(super) fn write_quic_service(&mut self, id: u32, entry: &QuicServiceEntry) -> Result<()> {
        self.quic
            .services
            .set(id, entry, 0)
            .map_err(map_err(maps::QUIC_SERVICES))
    }

    pub(super) fn set_quic_server_id(&mut self, key: &QuicSidKey, v: &QuicSidValue) -> Result<()> {
        self.quic
            .server_ids
            .insert(key, v, 0)
            .map_err(map_err(maps::QUIC_SERVER_IDS))
    }

    pub(super) fn delete_quic_server_id(&mut self, key: &QuicSidKey) {
        let _ = self.quic.server_ids.remove(key);
    }

    pub(super) fn read_quic_server_ids(&self) -> Result<Vec<(QuicSidKey, QuicSidValue)>> {
        self.quic
            .server_ids
            .iter()
            .map(|kv| kv.map_err(map_err(maps::QUIC_SERVER_IDS)))
            .collect()
    }

    /// Service `id`'s packets by `lb_common::quic::QuicRoute`, summed over CPUs.
    pub fn quic_route_counts(&self, id: u32) -> Result<[u64; QUIC_ROUTE_COUNT as usize]> {
        let mut out = [0u64; QUIC_ROUTE_COUNT as usize];
        for (route, slot) in QuicRoute::ALL.into_iter().zip(out.iter_mut()) {
            let index = quic_stats_index(id, route);
            let values = self
                .quic
                .stats
                .get(&index, 0)
                .map_err(map_err(maps::QUIC_STATS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}
