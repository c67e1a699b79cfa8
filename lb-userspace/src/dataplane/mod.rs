//! The only code that touches kernel maps: loads the eBPF object, attaches
//! its programs, and turns the desired services and backends into map
//! contents, diffing against what is installed and flipping Maglev tables
//! atomically. This file holds the errors, the load-time options and the
//! `Dataplane` handle; each concern lives in its own module below.

mod addr;
mod addr_slots;
mod attach;
mod counters;
mod flows;
mod load;
mod nexthop;
mod pin_ring;
mod quic;
mod spec;
mod store;
mod tables;
#[cfg(feature = "test-helpers")]
mod test_run;
mod writer;

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, links::FdLink},
};
use lb_common::{
    AddrKey, BackendEntry, Counters, FlowHash, FragKey, FragValue, MAX_SERVICES, NextHop,
    PortEntry, RevAddrValue, RevPortEntry, ServiceEntry, TABLES_PER_SERVICE,
};
use thiserror::Error;

pub use addr::{addr_octets, addr_words, octets_addr, words_addr};
pub use attach::{AttachMode, interfaces};
pub use counters::FlowCounter;
pub use flows::Family;
pub use load::EbpfLog;
pub use nexthop::NextHopWriter;
pub use pin_ring::PinRing;
pub use spec::{AdminState, BackendSpec, Forwarding, Protocol, ServiceSpec, WhenAllDown};
pub use tables::TableReader;
pub use writer::{
    ApplyReport, JoinPlan, MapWriter, PinOutcome, PinRefusal, QuicSpec, QuicSpecs, SweepFound,
    SweepPlan, SweepReport, join_pins, monotonic_secs, next_slots, rewrites_address, walk_pins,
};

use crate::{maglev, pins};
use tables::MaglevMmap;

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed: {0} (is this root on Linux >= 5.15 with BTF?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("the eBPF object has no {0}; it does not match this build")]
    Missing(&'static str),
    #[error("mapping the Maglev table map into memory failed: {0}")]
    Mmap(std::io::Error),
    #[error("invalid data plane options: {0}")]
    Options(String),
    #[error("too many {0}: raise the limit or remove some")]
    Full(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the flow table's count of removed pins: {0}")]
    FlowCount(std::io::Error),
    #[error("pinned data plane under {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Sizes fixed when the object is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Maglev table size M, a prime.
    pub maglev_size: u32,
    /// Most services at once (each holds three tables of M slots).
    pub max_services: u32,
    /// Entries of the LRU flow table.
    pub flow_table_size: u32,
    /// Flow-table inserts allowed per CPU per second (0: no cap). Flows
    /// over the cap are forwarded unpinned and counted (`pin_refused`).
    pub flow_insert_rate: u32,
    /// The flow hash (`dataplane.flow_hash`). `None`: the one recorded
    /// beside the pins (a data plane already running keeps its hash), else
    /// `FlowHash::Fast`.
    pub flow_hash: Option<FlowHash>,
    /// The program reports each new pin in a changed slot to `LB_PIN_RING`
    /// (cluster pin sharing); off, it costs nothing.
    pub pin_report: bool,
    /// Where maps and links are pinned so the data plane outlives the
    /// daemon (restarts, crashes) and a new daemon adopts it. `None`: the
    /// data plane lives and dies with this process.
    pub pin_path: Option<PathBuf>,
    /// With `pin_path`: the regular file that records the pinned maps'
    /// layout and the ids in them.
    pub record_path: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            maglev_size: lb_common::DEFAULT_MAGLEV_SIZE,
            // 8 x 3 tables x 65537 slots x 16 bytes: 25 MiB of tables.
            max_services: 8,
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
            flow_insert_rate: lb_common::DEFAULT_FLOW_INSERT_RATE,
            flow_hash: None,
            pin_report: false,
            pin_path: None,
            record_path: None,
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<()> {
        maglev::check_size(self.maglev_size).map_err(|e| DataplaneError::Options(e.to_string()))?;
        if self.max_services == 0 || self.max_services > MAX_SERVICES {
            return Err(DataplaneError::Options(format!(
                "max_services must be 1..={MAX_SERVICES}, got {}",
                self.max_services
            )));
        }
        let slots = u64::from(self.max_services)
            * u64::from(TABLES_PER_SERVICE)
            * u64::from(self.maglev_size);
        if slots > u64::from(u32::MAX) {
            return Err(DataplaneError::Options(format!(
                "max_services x 3 x maglev_size = {slots} slots is more than one map holds; \
                 lower max_services or maglev_size"
            )));
        }
        if self.flow_table_size < 1024 {
            return Err(DataplaneError::Options(format!(
                "flow_table_size must be at least 1024, got {}",
                self.flow_table_size
            )));
        }
        Ok(())
    }
}

/// The loaded object and typed handles on every map.
pub struct Dataplane {
    opts: Options,
    ebpf: Ebpf,
    maglev: MaglevMmap,
    maglev_map: MapData,
    ports: Array<MapData, PortEntry>,
    addr_services: BpfHashMap<MapData, AddrKey, u32>,
    addr_slots: Array<MapData, lb_common::AddrSlot>,
    /// The keys behind each slot of `addr_slots`.
    addr_slot_keys: addr_slots::AddrSlots,
    services: Array<MapData, ServiceEntry>,
    backends: Array<MapData, BackendEntry>,
    flows: flows::FlowTables,
    rev_ports: Array<MapData, RevPortEntry>,
    rev_addrs: BpfHashMap<MapData, AddrKey, RevAddrValue>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    action_stats: PerCpuArray<MapData, u64>,
    reason_stats: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    drop_stats: PerCpuArray<MapData, u64>,
    frags: BpfHashMap<MapData, FragKey, FragValue>,
    /// Pins added and removed (`lb_common::FLOW_COUNT_*`).
    flow_count: PerCpuArray<MapData, u64>,
    tx_ports: DevMapHash<MapData>,
    next_hops: Array<MapData, NextHop>,
    next_hop_stats: PerCpuArray<MapData, u64>,
    quic: quic::QuicMaps,
    /// Pinned links this process holds, with their pin files.
    links: Vec<(PathBuf, FdLink)>,
    /// The maps came from an earlier daemon's pins.
    adopted: bool,
    /// What is recorded about the pinned maps.
    record: pins::Record,
    /// The interface pinned links were attached to, if any were recorded.
    linked_interface: Option<String>,
    /// How ingress is attached (`auto` resolved), once attached.
    attach_mode: Option<AttachMode>,
    /// The flow hash the loaded programs run (`Options::flow_hash` resolved).
    flow_hash: FlowHash,
}

impl Dataplane {
    /// How ingress is attached (`tc`, or an XDP mode), once it is.
    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.attach_mode
    }

    /// The program `name` as its kind (`Xdp`, `SchedClassifier`).
    #[cfg(feature = "test-helpers")]
    fn program<'a, T>(&'a self, name: &'static str) -> Result<&'a T>
    where
        &'a T: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
    {
        let p = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::Missing(name))?;
        p.try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// [`Dataplane::program`], to attach.
    fn program_mut<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let p = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?;
        p.try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }
}
