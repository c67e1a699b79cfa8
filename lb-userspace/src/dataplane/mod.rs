//! The only code that touches kernel maps: loads the eBPF object, attaches
//! its programs, and turns the desired services and backends into map
//! contents, diffing against what is installed and flipping Maglev tables
//! atomically.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions, TestRunResult,
    maps::{Array, DevMapHash, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    Addr, AddrKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_REWRITE_ADDR,
    BACKEND_UNUSED, BackendEntry, Counters, EVENT_COUNT, FWD_DSR, FWD_LOCAL, FWD_NAT, FlowKey,
    FlowValue, FragKey, FragValue, MAX_BACKENDS, MAX_SERVICES, MaglevSlot, NO_BACKEND,
    PORT_HAS_ADDR_SERVICES, PROTO_TCP, PROTO_UDP, PortEntry, REASON_COUNT, REV_HAS_ADDRS,
    REV_PORT_ONLY, RevAddrValue, RevPortEntry, STICKY_MISS_SECS, ServiceEntry, TABLES_PER_SERVICE,
    maglev_index, maps, port_slot, programs,
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::{maglev, mapstore::MapStore, pins};

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
        let slots = self.max_services as u64 * TABLES_PER_SERVICE as u64 * self.maglev_size as u64;
        if slots > u32::MAX as u64 {
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

/// Where the XDP program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native if the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Skb,
}

impl AttachMode {
    fn xdp(self) -> XdpMode {
        match self {
            Self::Auto => XdpMode::Default,
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }
}

/// The data plane's memory-mapped Maglev tables.
struct MaglevMmap {
    ptr: NonNull<MaglevSlot>,
    len: usize,
}

// The mapping is plain memory shared with the kernel; access goes through
// `&mut Dataplane`, so there is one writer.
// SAFETY: the pointer is to a MAP_SHARED mapping owned by this value and
// valid until drop; moving it to another thread changes nothing.
unsafe impl Send for MaglevMmap {}
// SAFETY: shared access only reads (`slots`); writes need `&mut self`.
unsafe impl Sync for MaglevMmap {}

impl MaglevMmap {
    fn new(map: &MapData, len: usize, writable: bool) -> Result<Self> {
        let bytes = len * size_of::<MaglevSlot>();
        let fd = map.fd().as_fd().as_raw_fd();
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping of an fd we hold; the kernel checks the
        // length against the map and the result is checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or(DataplaneError::Mmap(std::io::Error::other(
                "mmap returned null",
            )))?,
            len,
        })
    }

    fn slots(&self) -> &[MaglevSlot] {
        // SAFETY: `len` slots are mapped at `ptr` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Only for mappings made writable.
    fn slots_mut(&mut self) -> &mut [MaglevSlot] {
        // SAFETY: as `slots`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MaglevMmap {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made, once, at the end of its life.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * size_of::<MaglevSlot>()) };
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
    services: Array<MapData, ServiceEntry>,
    backends: Array<MapData, BackendEntry>,
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    rev_ports: Array<MapData, RevPortEntry>,
    rev_addrs: BpfHashMap<MapData, AddrKey, RevAddrValue>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    action_stats: PerCpuArray<MapData, u64>,
    reason_stats: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    drop_stats: PerCpuArray<MapData, u64>,
    frags: BpfHashMap<MapData, FragKey, FragValue>,
    tx_ports: DevMapHash<MapData>,
    /// Pinned links this process holds, with their pin files.
    links: Vec<(PathBuf, FdLink)>,
    /// The maps came from an earlier daemon's pins.
    adopted: bool,
    /// What is recorded about the pinned maps.
    record: pins::Record,
    /// The interface pinned links were attached to, if any were recorded.
    linked_interface: Option<String>,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DataplaneError::Missing(name))
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?.try_into().map_err(map_err($name))?
    };
}

impl Dataplane {
    /// Loads the object built into this binary and its two programs; nothing
    /// is attached yet.
    pub fn load(opts: Options) -> Result<Self> {
        Self::load_object(crate::EBPF_OBJECT, opts)
    }

    pub fn load_object(object: &[u8], opts: Options) -> Result<Self> {
        opts.validate()?;
        let maglev_len = opts.max_services * TABLES_PER_SERVICE * opts.maglev_size;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::MAGLEV, maglev_len)
            .map_max_entries(maps::FLOWS, opts.flow_table_size)
            .override_global("FLOW_INSERT_RATE", &opts.flow_insert_rate, true);
        let mut adopted = false;
        let mut record = None;
        let mut linked_interface = None;
        let map_paths: Vec<(&str, PathBuf)>;
        if let Some(pin) = &opts.pin_path {
            let pin_err = |message: String| DataplaneError::Pin {
                path: pin.clone(),
                message,
            };
            if opts.record_path.is_none() {
                return Err(pin_err("pinning needs a record_path".into()));
            }
            pins::ensure_bpffs(pin).map_err(pin_err)?;
            let wanted = Self::layout_for(&opts, None);
            let found = opts.record_path.as_deref().and_then(pins::read_record);
            let pinned = pins::maps_pinned(pin);
            // Links do not depend on the maps' layout, only on the interface.
            linked_interface = found.as_ref().and_then(|r| r.layout.interface.clone());
            match found {
                Some(r) if pinned && r.layout.same_maps(&wanted) => {
                    adopted = true;
                    record = Some(r);
                }
                Some(r) if pinned => {
                    let old = r.layout;
                    // Maps of another shape: new ones are made; the old
                    // ones stay with the running program until its links
                    // move to the new program in `attach`.
                    info!(?old, "pinned maps have another layout; replacing them");
                    let retired = pin.join(format!("maps.retired.{}", std::process::id()));
                    let _ = std::fs::rename(pins::maps_dir(pin), retired);
                }
                // No record of these pins: they cannot be read back safely.
                _ if pinned => {
                    warn!(pin = %pin.display(), "pinned maps without a record; replacing them");
                    let retired = pin.join(format!("maps.retired.{}", std::process::id()));
                    let _ = std::fs::rename(pins::maps_dir(pin), retired);
                }
                _ => {}
            }
            crate::files::create_private_dir_all(&pins::maps_dir(pin))
                .map_err(|e| pin_err(format!("creating the maps directory: {e}")))?;
            map_paths = maps::ALL
                .iter()
                .map(|name| (*name, pins::maps_dir(pin).join(name)))
                .collect();
            for (name, path) in &map_paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(object)?;
        for name in [programs::XDP, programs::TC_EGRESS] {
            let prog = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?;
            let res = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => return Err(DataplaneError::Missing(name)),
            };
            res.map_err(|source| DataplaneError::Program { name, source })?;
        }
        let opts_copy = opts.clone();
        let Map::Array(maglev_data) = take(&mut ebpf, maps::MAGLEV)? else {
            return Err(DataplaneError::Missing(maps::MAGLEV));
        };
        let maglev = MaglevMmap::new(&maglev_data, maglev_len as usize, true)?;
        let dp = Self {
            maglev,
            maglev_map: maglev_data,
            ports: typed!(&mut ebpf, maps::PORTS),
            addr_services: typed!(&mut ebpf, maps::ADDR_SERVICES),
            services: typed!(&mut ebpf, maps::SERVICES),
            backends: typed!(&mut ebpf, maps::BACKENDS),
            flows: typed!(&mut ebpf, maps::FLOWS),
            rev_ports: typed!(&mut ebpf, maps::REV_PORTS),
            rev_addrs: typed!(&mut ebpf, maps::REV_ADDRS),
            service_stats: typed!(&mut ebpf, maps::SERVICE_STATS),
            backend_stats: typed!(&mut ebpf, maps::BACKEND_STATS),
            action_stats: typed!(&mut ebpf, maps::ACTION_STATS),
            reason_stats: typed!(&mut ebpf, maps::REASON_STATS),
            events: typed!(&mut ebpf, maps::EVENTS),
            drop_stats: typed!(&mut ebpf, maps::DROP_STATS),
            frags: typed!(&mut ebpf, maps::FRAGS),
            tx_ports: typed!(&mut ebpf, maps::TX_PORTS),
            opts,
            ebpf,
            links: Vec::new(),
            adopted,
            linked_interface,
            record: record.unwrap_or_else(|| pins::Record {
                layout: Self::layout_for(&opts_copy, None),
                ids: pins::Ids::default(),
            }),
        };
        dp.write_record()?;
        Ok(dp)
    }

    /// Saves the layout and ids record (with pinning only).
    fn write_record(&self) -> Result<()> {
        if let (Some(_), Some(path)) = (&self.opts.pin_path, &self.opts.record_path) {
            pins::write_record(path, &self.record).map_err(|e| DataplaneError::Pin {
                path: path.clone(),
                message: format!("writing the record: {e}"),
            })?;
        }
        Ok(())
    }

    /// The ids recorded with the pinned maps when they were adopted.
    pub fn recorded_ids(&self) -> &pins::Ids {
        &self.record.ids
    }

    /// Records the ids the map writer uses, beside the pins.
    pub fn record_ids(&mut self, ids: pins::Ids) -> Result<()> {
        if self.record.ids == ids {
            return Ok(());
        }
        self.record.ids = ids;
        self.write_record()
    }

    fn layout_for(opts: &Options, interface: Option<String>) -> pins::Layout {
        pins::Layout {
            version: lb_common::LAYOUT_VERSION,
            maglev_size: opts.maglev_size,
            max_services: opts.max_services,
            flow_table_size: opts.flow_table_size,
            interface,
        }
    }

    /// Leaves the data plane running for the next daemon (with pins), or
    /// detaches it and removes every pin.
    pub fn shutdown(&mut self, keep: bool) {
        let Some(pin) = self.opts.pin_path.clone() else {
            return;
        };
        if keep {
            info!(pin = %pin.display(), "leaving the data plane attached for the next daemon");
            return;
        }
        for (path, _) in &self.links {
            let _ = std::fs::remove_file(path);
        }
        // Closing the last descriptor of an unpinned link detaches it.
        self.links.clear();
        pins::remove_all(&pin);
        if let Some(r) = &self.opts.record_path {
            let _ = std::fs::remove_file(r);
        }
        info!(pin = %pin.display(), "data plane detached and unpinned");
    }

    /// Starts reading the programs' aya-log records; each is forwarded to
    /// `tracing` at debug level (target `lb::ebpf`). Poll the returned
    /// logger's fd and call `flush` when it is readable.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<EbpfLog>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, EbpfLog)
            .map_err(|e| DataplaneError::Options(format!("eBPF logger: {e}")))
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn xdp(&self) -> Result<&Xdp> {
        let p = self
            .ebpf
            .program(programs::XDP)
            .ok_or(DataplaneError::Missing(programs::XDP))?;
        p.try_into().map_err(|source| DataplaneError::Program {
            name: programs::XDP,
            source,
        })
    }

    fn tc(&self) -> Result<&SchedClassifier> {
        let p = self
            .ebpf
            .program(programs::TC_EGRESS)
            .ok_or(DataplaneError::Missing(programs::TC_EGRESS))?;
        p.try_into().map_err(|source| DataplaneError::Program {
            name: programs::TC_EGRESS,
            source,
        })
    }

    /// Attaches XDP on ingress and the reply rewriter on TC egress of
    /// `iface`. Both detach when the `Dataplane` is dropped.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let prog_err = |name: &'static str| move |source| DataplaneError::Program { name, source };
        let link_err = |name: &'static str| {
            move |e: LinkError| DataplaneError::Pin {
                path: PathBuf::from(name),
                message: format!("link: {e}"),
            }
        };
        let pin = self.opts.pin_path.clone();
        let same_iface = self.linked_interface.as_deref() == Some(iface);
        // A pinned link on this interface is moved to the new program in
        // one step (bpf_link_update): packets never see no program.
        let adopt = |path: &std::path::Path| -> Option<FdLink> {
            if !same_iface {
                let _ = std::fs::remove_file(path);
                return None;
            }
            PinnedLink::from_pin(path).ok().map(FdLink::from)
        };

        let xdp_pin = pin.as_ref().map(|p| pins::link_path(p, "xdp"));
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(programs::XDP)
            .ok_or(DataplaneError::Missing(programs::XDP))?
            .try_into()
            .map_err(prog_err(programs::XDP))?;
        let existing = xdp_pin.as_deref().and_then(adopt);
        let id = match existing {
            Some(link) => {
                let link = XdpLink::try_from(link).map_err(link_err(programs::XDP))?;
                xdp.attach_to_link(link).map_err(prog_err(programs::XDP))?
            }
            None => xdp
                .attach(iface, mode.xdp())
                .map_err(prog_err(programs::XDP))?,
        };
        if let Some(path) = xdp_pin {
            let link = FdLink::try_from(xdp.take_link(id).map_err(prog_err(programs::XDP))?)
                .map_err(link_err(programs::XDP))?;
            self.links.push(self.keep_pinned(path, link)?);
        }

        let tc_pin = pin.as_ref().map(|p| pins::link_path(p, "tc_egress"));
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(programs::TC_EGRESS)
            .ok_or(DataplaneError::Missing(programs::TC_EGRESS))?
            .try_into()
            .map_err(prog_err(programs::TC_EGRESS))?;
        let existing = tc_pin.as_deref().and_then(adopt);
        let id = match existing {
            Some(link) => {
                let link =
                    SchedClassifierLink::try_from(link).map_err(link_err(programs::TC_EGRESS))?;
                tc.attach_to_link(link)
                    .map_err(prog_err(programs::TC_EGRESS))?
            }
            None => tc
                .attach(iface, TcAttachType::Egress)
                .map_err(prog_err(programs::TC_EGRESS))?,
        };
        if let Some(path) = tc_pin {
            let link = FdLink::try_from(tc.take_link(id).map_err(prog_err(programs::TC_EGRESS))?)
                .map_err(link_err(programs::TC_EGRESS))?;
            self.links.push(self.keep_pinned(path, link)?);
        }

        if let Some(pin) = &pin {
            self.record.layout = Self::layout_for(&self.opts, Some(iface.to_string()));
            self.write_record()?;
            // Maps retired by a layout change are no longer used by any
            // attached program.
            if let Ok(entries) = std::fs::read_dir(pin) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with("maps.retired") {
                        let _ = pins::remove_dir_files(&e.path());
                    }
                }
            }
        }
        self.sync_tx_ports()?;
        info!(iface, ?mode, adopted = self.adopted, "data plane attached");
        Ok(())
    }

    /// Attaches again to an interface that went away and came back (a new
    /// ifindex): the old links died with the old interface, so they are
    /// dropped and unpinned, and the programs attached afresh.
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        for (path, _) in &self.links {
            let _ = std::fs::remove_file(path);
        }
        self.links.clear();
        self.linked_interface = None;
        self.attach(iface, mode)
    }

    /// Pins `link` at `path` (unless it is pinned there already) and keeps
    /// a descriptor of it.
    fn keep_pinned(&self, path: PathBuf, link: FdLink) -> Result<(PathBuf, FdLink)> {
        if path.exists() {
            return Ok((path, link));
        }
        if let Some(dir) = path.parent() {
            let _ = crate::files::create_private_dir_all(dir);
        }
        let pinned = link.pin(&path).map_err(|e| DataplaneError::Pin {
            path: path.clone(),
            message: format!("pinning the link: {e}"),
        })?;
        Ok((path, FdLink::from(pinned)))
    }

    /// Lets `nat`/`dsr` packets be redirected to every interface of this
    /// network namespace (the FIB decides which one each packet takes), and
    /// to no interface that is gone. Called at attach and on every link
    /// event (see `links`).
    pub fn sync_tx_ports(&mut self) -> Result<usize> {
        let mut wanted = HashSet::new();
        for (ifindex, _) in interfaces()? {
            if ifindex == 1 || wanted.len() >= lb_common::MAX_TX_PORTS as usize {
                continue;
            }
            wanted.insert(ifindex);
        }
        let present: HashSet<u32> = self.tx_ports.keys().filter_map(|k| k.ok()).collect();
        for ifindex in &wanted {
            if present.contains(ifindex) {
                continue;
            }
            self.tx_ports
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|e| {
                    DataplaneError::Options(format!("redirect map, ifindex {ifindex}: {e}"))
                })?;
        }
        for gone in present.difference(&wanted) {
            // The kernel drops entries of unregistered devices itself.
            let _ = self.tx_ports.remove(*gone);
        }
        Ok(wanted.len())
    }

    /// The interfaces `LB_TX_PORTS` holds (ifindexes).
    pub fn tx_ports(&self) -> Vec<u32> {
        self.tx_ports.keys().filter_map(|k| k.ok()).collect()
    }

    /// Runs the XDP program once on `frame` with `BPF_PROG_TEST_RUN`;
    /// returns the action and the frame as the program left it.
    pub fn test_run_xdp(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(self.xdp()?, programs::XDP, frame, None, 1)?;
        Ok((action, out))
    }

    /// Like [`Self::test_run_xdp`], as if the frame arrived on interface
    /// `ingress_ifindex` of the calling thread's network namespace (the FIB
    /// lookups of `nat`/`dsr` depend on it).
    pub fn test_run_xdp_on(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let (action, out, _) = test_run(self.xdp()?, programs::XDP, frame, Some(&ctx), 1)?;
        Ok((action, out))
    }

    /// Runs the TC egress program once on `frame`.
    pub fn test_run_tc(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(self.tc()?, programs::TC_EGRESS, frame, None, 1)?;
        Ok((action, out))
    }

    /// Runs the XDP program `repeat` times on `frame` in the kernel and
    /// returns the mean time per run as the kernel measured it.
    pub fn bench_xdp(&self, frame: &[u8], repeat: u32) -> Result<std::time::Duration> {
        Ok(test_run(self.xdp()?, programs::XDP, frame, None, repeat)?.2)
    }

    /// (program, instructions after the verifier's rewrites, instructions
    /// the verifier walked) for each loaded program.
    pub fn program_sizes(&self) -> Vec<(&'static str, u32, u32)> {
        [programs::XDP, programs::TC_EGRESS]
            .into_iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((
                    name,
                    info.size_translated().unwrap_or(0) / 8,
                    info.verified_instruction_count().unwrap_or(0),
                ))
            })
            .collect()
    }

    fn write_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        self.backends
            .set(id, entry, 0)
            .map_err(map_err(maps::BACKENDS))
    }

    fn write_service(&mut self, id: u32, entry: &ServiceEntry) -> Result<()> {
        self.services
            .set(id, entry, 0)
            .map_err(map_err(maps::SERVICES))
    }

    fn service_entry(&self, id: u32) -> Result<ServiceEntry> {
        self.services.get(&id, 0).map_err(map_err(maps::SERVICES))
    }

    /// One table of one service, as the kernel sees it.
    pub fn table(&self, service: u32, table: u32) -> &[MaglevSlot] {
        let m = self.opts.maglev_size;
        let start = maglev_index(service, table, m, 0) as usize;
        &self.maglev.slots()[start..start + m as usize]
    }

    fn table_mut(&mut self, service: u32, table: u32) -> &mut [MaglevSlot] {
        let m = self.opts.maglev_size;
        let start = maglev_index(service, table, m, 0) as usize;
        &mut self.maglev.slots_mut()[start..start + m as usize]
    }

    /// The table packets read now, and its index.
    pub fn active_table(&self, service: u32) -> Result<(u32, &[MaglevSlot])> {
        let e = self.service_entry(service)?;
        Ok((e.active, self.table(service, e.active)))
    }

    /// Writes `slots` into the service's inactive table (never the active
    /// one, nor the one before it, which packets in flight may still read),
    /// then flips the service's one `active` word.
    pub fn install_table(
        &mut self,
        service: u32,
        slots: &[MaglevSlot],
        forwarding: u8,
    ) -> Result<u32> {
        let m = self.opts.maglev_size;
        if slots.len() != m as usize || service >= self.opts.max_services {
            return Err(DataplaneError::Options(format!(
                "table of {} slots for service {service}; expected {m} and id < {}",
                slots.len(),
                self.opts.max_services
            )));
        }
        let mut entry = self.service_entry(service)?;
        let next = if entry.table_size == 0 {
            0
        } else {
            (entry.active + 1) % TABLES_PER_SERVICE
        };
        let start = maglev_index(service, next, m, 0) as usize;
        self.maglev.slots_mut()[start..start + m as usize].copy_from_slice(slots);
        // The table must be visible before the word that points at it.
        fence(Ordering::SeqCst);
        entry.active = next;
        entry.generation = entry.generation.wrapping_add(1);
        entry.table_size = m;
        entry.forwarding = forwarding;
        self.write_service(service, &entry)?;
        Ok(next)
    }

    /// A second, read-only view of the Maglev tables and service entries,
    /// usable from another thread while this `Dataplane` keeps writing.
    pub fn reader(&self) -> Result<TableReader> {
        let fd = self.services_fd()?;
        let services = Array::try_from(Map::Array(
            MapData::from_fd(fd).map_err(map_err(maps::SERVICES))?,
        ))
        .map_err(map_err(maps::SERVICES))?;
        Ok(TableReader {
            maglev: MaglevMmap::new(&self.maglev_map, self.maglev.len, false)?,
            services,
            m: self.opts.maglev_size,
        })
    }

    fn services_fd(&self) -> Result<std::os::fd::OwnedFd> {
        aya::maps::IterableMap::map(&self.services)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DataplaneError::Mmap)
    }

    /// Summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.service_stats, id, maps::SERVICE_STATS)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, id, maps::BACKEND_STATS)
    }

    /// Packets per XDP action, indexed by the action's value.
    pub fn action_counts(&self) -> Result<[u64; 5]> {
        sums(&self.action_stats, maps::ACTION_STATS)
    }

    /// Packets passed to the stack unbalanced, per `lb_common::Reason`,
    /// indexed by the reason's value.
    pub fn reason_counts(&self) -> Result<[u64; REASON_COUNT as usize]> {
        sums(&self.reason_stats, maps::REASON_STATS)
    }

    /// Flow-table events per `lb_common::EVENT_*`, indexed by value.
    pub fn event_counts(&self) -> Result<[u64; EVENT_COUNT as usize]> {
        sums(&self.events, maps::EVENTS)
    }

    /// Packets dropped, per `lb_common::Reason`, indexed by the reason's value.
    pub fn drop_counts(&self) -> Result<[u64; REASON_COUNT as usize]> {
        sums(&self.drop_stats, maps::DROP_STATS)
    }

    /// Removes every pin, as an LRU under pressure would evict them; returns
    /// how many there were. For tests of what misses do.
    pub fn clear_flows(&mut self) -> usize {
        let keys: Vec<FlowKey> = self.flows.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            let _ = self.flows.remove(k);
        }
        keys.len()
    }

    /// Where the first fragment of datagram `key` went, if it is still
    /// remembered for the later fragments.
    pub fn fragment(&self, key: &FragKey) -> Option<FragValue> {
        self.frags.get(key, 0).ok()
    }

    /// Entries in the flow table (walks it).
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }

    /// A second handle on the flow table, to count it from another thread
    /// without holding up whoever writes maps (a walk of a full table takes
    /// about a second).
    pub fn flow_counter(&self) -> Result<FlowCounter> {
        let fd = aya::maps::IterableMap::map(&self.flows)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DataplaneError::Mmap)?;
        let map = MapData::from_fd(fd).map_err(map_err(maps::FLOWS))?;
        Ok(FlowCounter(
            BpfHashMap::try_from(Map::LruHashMap(map)).map_err(map_err(maps::FLOWS))?,
        ))
    }
}

impl MapStore for Dataplane {
    fn options(&self) -> &Options {
        &self.opts
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

    fn set_addr_service(&mut self, key: &AddrKey, id: u32) -> Result<()> {
        self.addr_services
            .insert(key, id, 0)
            .map_err(map_err(maps::ADDR_SERVICES))
    }

    fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()> {
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
        self.flows.get(key, 0).ok().as_ref() == Some(value) && self.flows.remove(key).is_ok()
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
}

/// Forwards the eBPF programs' log records to `tracing` at debug level.
pub struct EbpfLog;

impl log::Log for EbpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "lb::ebpf", level = %record.level(), "{}", record.args());
    }

    fn flush(&self) {}
}

/// Counts flow-table entries beside a writing [`Dataplane`].
pub struct FlowCounter(BpfHashMap<MapData, FlowKey, FlowValue>);

impl FlowCounter {
    /// Walks the flow table for a sweep: which candidate slots live pins
    /// still need, and which pins name a backend that no longer holds them.
    pub fn walk(&self, plan: &SweepPlan) -> SweepFound {
        walk_pins(plan, self.0.iter().filter_map(|r| r.ok()))
    }

    pub fn count(&self) -> usize {
        self.0.keys().filter(|k| k.is_ok()).count()
    }
}

/// Reads tables and service entries beside a writing [`Dataplane`].
pub struct TableReader {
    maglev: MaglevMmap,
    services: Array<MapData, ServiceEntry>,
    m: u32,
}

impl TableReader {
    pub fn service(&self, id: u32) -> Result<ServiceEntry> {
        self.services.get(&id, 0).map_err(map_err(maps::SERVICES))
    }

    pub fn table(&self, service: u32, table: u32) -> &[MaglevSlot] {
        let start = maglev_index(service, table, self.m, 0) as usize;
        &self.maglev.slots()[start..start + self.m as usize]
    }
}

fn sum_counters(
    map: &PerCpuArray<MapData, Counters>,
    id: u32,
    name: &'static str,
) -> Result<Counters> {
    let values = map.get(&id, 0).map_err(map_err(name))?;
    let mut total = Counters::default();
    for v in values.iter() {
        total.add(v);
    }
    Ok(total)
}

fn sum_u64(map: &PerCpuArray<MapData, u64>, id: u32, name: &'static str) -> Result<u64> {
    Ok(map.get(&id, 0).map_err(map_err(name))?.iter().sum())
}

/// The entries of an array map that are not the default, with their index.
fn set_entries<T: aya::Pod + Default + PartialEq>(
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

/// Every entry of a per-CPU counter array, summed over CPUs.
fn sums<const N: usize>(map: &PerCpuArray<MapData, u64>, name: &'static str) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = sum_u64(map, i as u32, name)?;
    }
    Ok(out)
}

/// One `BPF_PROG_TEST_RUN` of `prog`: its return value, the frame as the
/// last run left it, and the kernel's mean time per run.
fn test_run<P>(
    prog: &P,
    name: &'static str,
    frame: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> Result<(u32, Vec<u8>, std::time::Duration)>
where
    for<'a> P: TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 512];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat,
            ..Default::default()
        })
        .map_err(|source| DataplaneError::Program { name, source })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out, res.duration))
}

/// Converts an address to the data plane's form (IPv4 as IPv4-mapped).
/// The interfaces of the calling thread's network namespace: (ifindex,
/// name). `if_nameindex` asks netlink, which answers for the thread's
/// namespace (sysfs would show the mounter's).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a list ending with a zero index, or null.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(DataplaneError::Options(format!(
            "listing interfaces: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: within the list, up to and including its terminator.
        let entry = unsafe { *list.add(i) };
        if entry.if_index == 0 {
            break;
        }
        // SAFETY: if_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) }
            .to_string_lossy()
            .into_owned();
        out.push((entry.if_index, name));
        i += 1;
    }
    // SAFETY: the list came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(out)
}

pub fn addr_words(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The other way round.
pub fn words_addr(words: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

// ---------------------------------------------------------------------------
// Desired state and the map writer.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forwarding {
    /// Backends are ports on this host.
    #[default]
    Local,
    /// Backends are other hosts; destination rewritten, replies come back
    /// through this host and are translated back.
    Nat,
    /// Backends are other hosts on this L2 segment holding the service
    /// address; only MACs change, replies go straight to clients.
    Dsr,
}

impl Forwarding {
    fn code(self) -> u8 {
        match self {
            Self::Local => FWD_LOCAL,
            Self::Nat => FWD_NAT,
            Self::Dsr => FWD_DSR,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Nat => "nat",
            Self::Dsr => "dsr",
        }
    }
}

/// What the operator asked of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdminState {
    #[default]
    Active,
    /// No new flows; existing flows stay.
    Draining,
    /// Out of service; existing flows are re-picked.
    Disabled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: SocketAddr,
    pub weight: u16,
    pub state: AdminState,
    /// Health as the checker last decided it.
    pub healthy: bool,
}

impl BackendSpec {
    pub fn new(address: SocketAddr, weight: u16) -> Self {
        Self {
            address,
            weight,
            state: AdminState::Active,
            healthy: true,
        }
    }

    fn dataplane_state(&self) -> u8 {
        match (self.state, self.healthy) {
            (AdminState::Disabled, _) | (_, false) => BACKEND_DOWN,
            (AdminState::Draining, true) => BACKEND_DRAINING,
            (AdminState::Active, true) => BACKEND_ACTIVE,
        }
    }

    /// Takes new flows: in the Maglev table.
    fn in_table(&self) -> bool {
        self.dataplane_state() == BACKEND_ACTIVE && self.weight > 0
    }
}

/// What a service does when health checks take down every backend that
/// was taking new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenAllDown {
    /// Nothing takes new flows: connections are refused.
    Refuse,
    /// Fail open (Envoy's "panic mode"): the backends that were up last stay
    /// in the table and keep their flows until one backend is healthy again.
    #[default]
    KeepLast,
}

impl WhenAllDown {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::KeepLast => "keep_last",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// `0.0.0.0` (IPv4 packets) or `::` (IPv6 packets) for any local address.
    pub listen: SocketAddr,
    pub protocols: Vec<Protocol>,
    pub forwarding: Forwarding,
    pub backends: Vec<BackendSpec>,
    pub when_all_down: WhenAllDown,
}

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
}

/// What an `apply` changed, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub tables_installed: usize,
    /// The services whose table was installed, one entry per install.
    pub installed: Vec<String>,
}

/// What a sweep of the flow table looks for, taken under the writer's lock
/// and used without it: sticky slots old enough to become clean, and the
/// backends that still hold flows.
#[derive(Debug, Default, Clone)]
pub struct SweepPlan {
    /// (service id, slot) -> (current backend, when the slot changed).
    pub candidates: HashMap<(u32, u32), (u32, u32)>,
    /// Backend id -> (service id, generation) for backends keeping flows.
    pub holders: HashMap<u32, (u32, u32)>,
}

/// Sorts the pins of a flow table for a sweep: which candidate slots live
/// pins still need, and which pins name a backend that no longer holds them.
pub fn walk_pins(plan: &SweepPlan, pins: impl Iterator<Item = (FlowKey, FlowValue)>) -> SweepFound {
    let mut found = SweepFound::default();
    for (k, v) in pins {
        let live = plan.holders.get(&v.backend) == Some(&(v.service, v.generation));
        if !live {
            found.stale.push((k, v));
            continue;
        }
        let key = (v.service, v.slot);
        if let Some((current, _)) = plan.candidates.get(&key)
            && *current != v.backend
        {
            found.needed.insert(key);
        }
    }
    found
}

/// What a walk of the flow table found for a `SweepPlan`.
#[derive(Debug, Default, Clone)]
pub struct SweepFound {
    /// Candidate slots a live pin still needs (it names another backend).
    pub needed: HashSet<(u32, u32)>,
    /// Pins naming a backend that no longer holds them.
    pub stale: Vec<(FlowKey, FlowValue)>,
}

/// What a sweep changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub slots_cleaned: usize,
    pub stale_pins_removed: usize,
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
                },
            );
        }
        self.ports.extend(self.dp.read_ports()?);
        self.rev_ports.extend(self.dp.read_rev_ports()?);
        self.addr_services.extend(self.dp.read_addr_services()?);
        self.rev_addrs.extend(self.dp.read_rev_addrs()?);
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
            let inst = self.services.remove(name).expect("listed above");
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
                    },
                );
            }
            let inst = self.services.get_mut(&spec.name).expect("inserted above");
            for b in &spec.backends {
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    inst.backend_ids.entry(b.address)
                {
                    let bid = self
                        .free_backend_ids
                        .pop()
                        .ok_or(DataplaneError::Full("backends"))?;
                    slot.insert(bid);
                }
            }
        }
        self.persist_ids()?;
        // Replies of backends that join are translated before any table
        // sends them a flow: the reverse entries go in first.
        self.sync_lookup_maps(desired, true)?;

        for spec in desired {
            let mut inst = self.services.remove(&spec.name).expect("allocated above");
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
            self.backend_entries.insert(id, e);
        }
        Ok(())
    }

    /// The generation the data plane holds for backend id `id` (0: none).
    pub fn backend_generation(&self, id: u32) -> u32 {
        self.backend_entries.get(&id).map_or(0, |e| e.generation)
    }

    /// What the next sweep of the flow table must look at.
    pub fn sweep_plan(&self, now: u32) -> SweepPlan {
        let mut plan = SweepPlan::default();
        for inst in self.services.values() {
            for (i, s) in inst.slots.iter().enumerate() {
                if s.is_sticky() && now.wrapping_sub(s.changed) >= STICKY_MISS_SECS {
                    plan.candidates
                        .insert((inst.id, i as u32), (s.backend, s.changed));
                }
            }
        }
        for (id, e) in &self.backend_entries {
            if e.state == BACKEND_ACTIVE || e.state == BACKEND_DRAINING {
                plan.holders.insert(*id, (e.service, e.generation));
            }
        }
        plan
    }

    /// Ends a sweep: removes the stale pins it found (unless the program
    /// replaced them meanwhile) and makes every candidate slot that no live
    /// pin needs clean again, in the active table and in the next one.
    /// Past `STICKY_MISS_SECS` no miss goes to a slot's previous backend, so
    /// no pin made after the walk can need it either.
    pub fn finish_sweep(&mut self, plan: &SweepPlan, found: &SweepFound) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        for (k, v) in &found.stale {
            if self.dp.remove_flow_if(k, v) {
                report.stale_pins_removed += 1;
            }
        }
        let mut by_service: HashMap<u32, Vec<u32>> = HashMap::new();
        for key in plan.candidates.keys() {
            if !found.needed.contains(key) {
                by_service.entry(key.0).or_default().push(key.1);
            }
        }
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let inst = self.services.get_mut(&name).expect("listed above");
            let Some(slots) = by_service.get(&inst.id) else {
                continue;
            };
            let entry = self.dp.service_entry(inst.id)?;
            if entry.table_size != self.dp.options().maglev_size
                || entry.active >= TABLES_PER_SERVICE
            {
                continue;
            }
            let mut cleaned = Vec::new();
            for &i in slots {
                let planned = plan.candidates[&(inst.id, i)];
                let Some(s) = inst.slots.get_mut(i as usize) else {
                    continue;
                };
                // The table changed since the plan: the next sweep decides.
                if !s.is_sticky() || (s.backend, s.changed) != planned {
                    continue;
                }
                *s = MaglevSlot::clean(s.backend);
                cleaned.push(i);
            }
            let table = self.dp.table_mut(inst.id, entry.active);
            for &i in &cleaned {
                let slot = &mut table[i as usize];
                // `prev` last: a packet that reads the slot halfway sees
                // a sticky slot past its window, which behaves the same.
                slot.changed = 0;
                slot.prev_gen = 0;
                fence(Ordering::SeqCst);
                slot.prev = slot.backend;
            }
            report.slots_cleaned += cleaned.len();
        }
        Ok(report)
    }

    fn check(&self, desired: &[ServiceSpec]) -> Result<()> {
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
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
        let mut backends = 0usize;
        for s in desired {
            if !names.insert(&s.name) {
                return Err(DataplaneError::Conflict(format!(
                    "service name {:?} is used twice",
                    s.name
                )));
            }
            for p in &s.protocols {
                if !listens.insert((s.listen, *p)) {
                    return Err(DataplaneError::Conflict(format!(
                        "two services listen on {} {:?}",
                        s.listen, p
                    )));
                }
            }
            let mut seen = HashSet::new();
            for b in &s.backends {
                if !seen.insert(b.address) {
                    return Err(DataplaneError::Conflict(format!(
                        "service {:?} lists backend {} twice",
                        s.name, b.address
                    )));
                }
            }
            backends += s.backends.len();
        }
        if backends > MAX_BACKENDS as usize {
            return Err(DataplaneError::Full("backends"));
        }
        // Reverse translation keys on the backend port: two services whose
        // backends share a port must agree on the service port.
        let mut rev: HashMap<(u16, u8), u16> = HashMap::new();
        for s in desired.iter().filter(|s| s.forwarding != Forwarding::Dsr) {
            for b in &s.backends {
                for p in &s.protocols {
                    if let Some(port) = rev.insert((b.address.port(), p.number()), s.listen.port())
                        && port != s.listen.port()
                    {
                        return Err(DataplaneError::Conflict(format!(
                            "backend port {} {:?} serves service ports {} and {}; \
                             replies could not be told apart",
                            b.address.port(),
                            p,
                            port,
                            s.listen.port()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_service(
        &mut self,
        inst: &mut Installed,
        spec: &ServiceSpec,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let id = inst.id;
        // Backends that left the service: down first, so flows are re-picked.
        let wanted: HashSet<SocketAddr> = spec.backends.iter().map(|b| b.address).collect();
        let leaving: Vec<SocketAddr> = inst
            .backend_ids
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        let mut released = Vec::new();
        for addr in leaving {
            let bid = inst.backend_ids.remove(&addr).expect("listed above");
            let mut e = self.backend_entry(spec, id, addr);
            e.state = BACKEND_DOWN;
            self.put_backend(bid, e)?;
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
            let bid = match inst.backend_ids.get(&b.address) {
                Some(bid) => *bid,
                None => {
                    let bid = self
                        .free_backend_ids
                        .pop()
                        .ok_or(DataplaneError::Full("backends"))?;
                    inst.backend_ids.insert(b.address, bid);
                    bid
                }
            };
            let mut e = self.backend_entry(spec, id, b.address);
            e.state = if kept.contains(&b.address) {
                BACKEND_ACTIVE
            } else {
                b.dataplane_state()
            };
            self.put_backend(bid, e)?;
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
        // A released id stays down (flows still pinned to it, or slots that
        // remember it, re-pick) and is handed out again last.
        for bid in released {
            self.free_backend_ids.insert(0, bid);
        }
        inst.spec = spec.clone();
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

    /// Rewrites the port, address-service and reverse-translation maps to
    /// match `desired`, restricted to the services installed so far.
    /// With `replies_only`, writes only the reverse-translation entries that
    /// are new or changed, and nothing else.
    fn sync_lookup_maps(&mut self, desired: &[ServiceSpec], replies_only: bool) -> Result<()> {
        let mut ports: HashMap<u32, PortEntry> = HashMap::new();
        let mut addr_services: HashMap<AddrKey, u32> = HashMap::new();
        let mut rev_ports: HashMap<u32, RevPortEntry> = HashMap::new();
        let mut rev_addrs: HashMap<AddrKey, RevAddrValue> = HashMap::new();
        for spec in desired {
            let Some(inst) = self.services.get(&spec.name) else {
                continue;
            };
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
                let backends = if spec.forwarding == Forwarding::Dsr {
                    &[][..]
                } else {
                    &spec.backends[..]
                };
                for b in backends {
                    let rslot = port_slot(b.address.port(), proto);
                    let r = rev_ports.entry(rslot).or_default();
                    let entry = self.backend_entry(spec, inst.id, b.address);
                    if entry.flags & BACKEND_REWRITE_ADDR != 0 {
                        r.flags |= REV_HAS_ADDRS;
                        rev_addrs.insert(
                            AddrKey {
                                addr: entry.addr,
                                port: b.address.port(),
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
        }
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

    fn write_port(&mut self, slot: u32, entry: PortEntry) -> Result<()> {
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

    fn delete_addr_service(&mut self, key: &AddrKey) -> Result<()> {
        self.dp.delete_addr_service(key)?;
        self.addr_services.remove(key);
        Ok(())
    }
}

/// Seconds of CLOCK_MONOTONIC, the clock the data plane reads.
pub fn monotonic_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// The slots to install for a freshly built table: a slot whose backend
/// changed remembers the backend it had, and when (`now`), so flows
/// established there before the change can stay; an unchanged slot keeps
/// what it remembered.
pub fn next_slots(
    installed: &[MaglevSlot],
    table: &[u32],
    now: u32,
    generation: impl Fn(u32) -> u32,
) -> Vec<MaglevSlot> {
    table
        .iter()
        .enumerate()
        .map(|(i, &backend)| match installed.get(i) {
            Some(old) if old.backend == backend => *old,
            Some(old) if old.backend != NO_BACKEND => MaglevSlot {
                backend,
                prev: old.backend,
                changed: now,
                prev_gen: generation(old.backend),
            },
            // First table, or the slot had no backend: nothing to remember.
            _ => MaglevSlot::clean(backend),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for ip in ["10.1.2.3", "fd00::1", "::", "0.0.0.0", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_addr(&addr_words(ip)), ip);
        }
        let w = addr_words("10.1.2.3".parse().unwrap());
        assert!(lb_common::is_v4_mapped(&w));
        assert_eq!(w[3].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn changed_slots_remember_their_previous_backend() {
        let next_slots = |i: &[MaglevSlot], t: &[u32], now| next_slots(i, t, now, |b| b + 10);
        let first = next_slots(&[], &[1, 2, 3], 100);
        assert!(first.iter().all(|s| *s == MaglevSlot::clean(s.backend)));
        let second = next_slots(&first, &[1, 4, 3], 200);
        assert_eq!(
            (second[1].backend, second[1].prev, second[1].changed),
            (4, 2, 200)
        );
        assert_eq!(second[1].prev_gen, 12, "the previous backend's generation");
        assert_eq!(second[0], first[0]);
        // A slot that changes again remembers only the last backend.
        let third = next_slots(&second, &[1, 5, 3], 300);
        assert_eq!(
            (third[1].backend, third[1].prev, third[1].changed),
            (5, 4, 300)
        );
        // Unchanged sticky slots stay sticky, with their time.
        let fourth = next_slots(&third, &[1, 5, 3], 400);
        assert_eq!(fourth[1], third[1]);
    }
}
