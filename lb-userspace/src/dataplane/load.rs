//! Loading the eBPF object with the sizes of `Options`, adopting or
//! replacing pinned maps, and the layout record kept beside the pins.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapError},
};
use lb_common::{FlowHash, TABLES_PER_SERVICE, maps, programs};
use tracing::{info, warn};

use super::{Dataplane, DataplaneError, Options, Result, map_err, tables::map_tables};
use crate::pins;

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DataplaneError::Missing(name))
}

/// Map `name` out of the loaded object, as the map type it is used as.
pub(super) fn take_as<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T> {
    take(ebpf, name)?.try_into().map_err(map_err(name))
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take_as($ebpf, $name)?
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
        let log_level = ebpf_log_level();
        let pin_report = u32::from(opts.pin_report);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::MAGLEV, maglev_len)
            .map_max_entries(maps::FLOWS, opts.flow_table_size)
            .map_max_entries(maps::FLOWS4, opts.flow_table_size)
            .override_global("FLOW_INSERT_RATE", &opts.flow_insert_rate, true)
            .override_global("PIN_REPORT", &pin_report, true)
            // Absent while the programs have no log calls.
            .override_global(aya_log::LEVEL, &log_level, false);
        let mut flow_hash = opts.flow_hash.unwrap_or(FlowHash::Fast);
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
            flow_hash = Self::choose_flow_hash(opts.flow_hash, found.as_ref());
            let pinned = pins::maps_pinned(pin);
            // Some of the maps but not all: pinned by a build with other
            // maps, whatever its record says.
            let partly = !pinned && pins::some_maps_pinned(pin);
            // Links do not depend on the maps' layout, only on the interface.
            linked_interface = found.as_ref().and_then(|r| r.layout.interface.clone());
            match found {
                Some(r) if pinned && r.layout.same_maps(&wanted) => {
                    adopted = true;
                    record = Some(r);
                }
                Some(r) if pinned || partly => {
                    let old = r.layout;
                    // Maps of another shape: new ones are made; the old
                    // ones stay with the running program until its links
                    // move to the new program in `attach`.
                    info!(?old, "pinned maps have another layout; replacing them");
                    let retired = pin.join(format!("maps.retired.{}", std::process::id()));
                    let _ = std::fs::rename(pins::maps_dir(pin), retired);
                }
                // No record of these pins: they cannot be read back safely.
                _ if pinned || partly => {
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
        let hash_word = flow_hash as u32;
        loader.override_global("FLOW_HASH", &hash_word, true);
        let mut ebpf = loader.load(object)?;
        for name in [
            programs::XDP,
            programs::TC_EGRESS,
            programs::TC_INGRESS,
            programs::XDP_QUIC_DECRYPT,
        ] {
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
        let maglev = map_tables(&maglev_data, maglev_len as usize, true)?;
        let mut dp = Self {
            maglev,
            maglev_map: maglev_data,
            ports: typed!(&mut ebpf, maps::PORTS),
            addr_services: typed!(&mut ebpf, maps::ADDR_SERVICES),
            addr_slots: typed!(&mut ebpf, maps::ADDR_SLOTS),
            addr_slot_keys: Default::default(),
            services: typed!(&mut ebpf, maps::SERVICES),
            backends: typed!(&mut ebpf, maps::BACKENDS),
            flows: super::flows::FlowTables::new(
                take(&mut ebpf, maps::FLOWS4)?,
                take(&mut ebpf, maps::FLOWS)?,
            )?,
            rev_ports: typed!(&mut ebpf, maps::REV_PORTS),
            rev_addrs: typed!(&mut ebpf, maps::REV_ADDRS),
            service_stats: typed!(&mut ebpf, maps::SERVICE_STATS),
            backend_stats: typed!(&mut ebpf, maps::BACKEND_STATS),
            action_stats: typed!(&mut ebpf, maps::ACTION_STATS),
            reason_stats: typed!(&mut ebpf, maps::REASON_STATS),
            events: typed!(&mut ebpf, maps::EVENTS),
            drop_stats: typed!(&mut ebpf, maps::DROP_STATS),
            frags: typed!(&mut ebpf, maps::FRAGS),
            flow_count: typed!(&mut ebpf, maps::FLOW_COUNT),
            tx_ports: typed!(&mut ebpf, maps::TX_PORTS),
            next_hops: typed!(&mut ebpf, maps::NEXTHOPS),
            next_hop_stats: typed!(&mut ebpf, maps::NEXTHOP_STATS),
            quic: super::quic::QuicMaps::take(&mut ebpf)?,
            opts,
            ebpf,
            links: Vec::new(),
            adopted,
            linked_interface,
            attach_mode: None,
            record: pins::Record {
                flow_hash: Some(flow_hash.name().to_string()),
                ..record.unwrap_or_else(|| pins::Record {
                    layout: Self::layout_for(&opts_copy, None),
                    ids: pins::Ids::default(),
                    flow_hash: None,
                })
            },
            flow_hash,
        };
        // New maps are empty, the array and the hash map alike.
        if dp.adopted {
            dp.adopt_addr_slots()?;
        }
        dp.write_record()?;
        Ok(dp)
    }

    /// The flow hash to load with: the configured one, else the one the
    /// record names (every flow in a clean slot keeps its backend only while
    /// the hash stays), else `Fast` for a data plane new to this host.
    /// The daemon logs the choice at start.
    fn choose_flow_hash(configured: Option<FlowHash>, found: Option<&pins::Record>) -> FlowHash {
        let recorded = found.map(pins::Record::flow_hash);
        match (configured, recorded) {
            (Some(h), Some(Some(r))) if h != r => {
                warn!(
                    from = r.name(),
                    to = h.name(),
                    "dataplane.flow_hash differs from the hash the data plane ran with: \
                     established flows in most Maglev slots move to other backends"
                );
                h
            }
            (Some(h), _) => h,
            (None, Some(Some(r))) => r,
            (None, Some(None)) => {
                warn!(
                    recorded = ?found.and_then(|r| r.flow_hash.as_deref()),
                    "the record names a flow hash this release does not know; using fast"
                );
                FlowHash::Fast
            }
            (None, None) => FlowHash::Fast,
        }
    }

    /// The flow hash the loaded programs run.
    pub fn flow_hash(&self) -> FlowHash {
        self.flow_hash
    }

    /// Saves the layout and ids record (with pinning only).
    pub(super) fn write_record(&self) -> Result<()> {
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

    pub(super) fn layout_for(opts: &Options, interface: Option<String>) -> pins::Layout {
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
    /// `tracing` at its level (target `lb::ebpf`). Poll the returned
    /// logger's fd and call `flush` when it is readable. `None`: the
    /// programs log nothing (an object without log calls has no log map).
    pub fn logger(&mut self) -> Result<Option<aya_log::EbpfLogger<EbpfLog>>> {
        match aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, EbpfLog) {
            Ok(logger) => Ok(Some(logger)),
            Err(aya_log::Error::MapNotFound) => Ok(None),
            Err(e) => Err(DataplaneError::Options(format!("eBPF logger: {e}"))),
        }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }
}

/// The most verbose level the tracing subscriber shows for the programs'
/// records (target `lb::ebpf`), as `aya_log::Level` (0: none). Set in the
/// object at load, so a disabled log call in the kernel costs one compare.
fn ebpf_log_level() -> u8 {
    use aya_log::Level as A;
    use tracing::{Level as T, enabled};
    let level = if enabled!(target: "lb::ebpf", T::TRACE) {
        A::Trace
    } else if enabled!(target: "lb::ebpf", T::DEBUG) {
        A::Debug
    } else if enabled!(target: "lb::ebpf", T::INFO) {
        A::Info
    } else if enabled!(target: "lb::ebpf", T::WARN) {
        A::Warn
    } else if enabled!(target: "lb::ebpf", T::ERROR) {
        A::Error
    } else {
        return 0;
    };
    level as u8
}

/// Forwards the eBPF programs' log records to `tracing` at their level.
pub struct EbpfLog;

impl log::Log for EbpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let args = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "lb::ebpf", "{args}"),
            log::Level::Warn => tracing::warn!(target: "lb::ebpf", "{args}"),
            log::Level::Info => tracing::info!(target: "lb::ebpf", "{args}"),
            log::Level::Debug => tracing::debug!(target: "lb::ebpf", "{args}"),
            log::Level::Trace => tracing::trace!(target: "lb::ebpf", "{args}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_log_level_follows_the_subscriber() {
        let level_with = |filter: &str| {
            let sub = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(sub, ebpf_log_level)
        };
        assert_eq!(level_with("off"), 0);
        assert_eq!(level_with("info"), aya_log::Level::Info as u8);
        assert_eq!(
            level_with("info,lb::ebpf=trace"),
            aya_log::Level::Trace as u8
        );
        assert_eq!(level_with("debug,lb::ebpf=off"), 0);
    }
}
