//! The flow tables: pins of IPv4 flows in `LB_FLOWS4` under a 16-byte key,
//! of IPv6 flows in `LB_FLOWS`. The daemon names a flow of either family by
//! its [`FlowKey`] (IPv4 addresses mapped), as pin reports and other nodes
//! do; the family decides the table.

use std::os::fd::AsFd;

use aya::maps::{HashMap as BpfHashMap, IterableMap, Map, MapData};
use lb_common::{FlowKey, FlowKey4, FlowValue, maps};

use super::{DataplaneError, Result, map_err};

/// The address family of a flow table; `as usize`, its index in
/// [`Family::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The table that holds `key`'s pin.
    pub fn of(key: &FlowKey) -> Family {
        if key.v4().is_some() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// As metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The index of `LB_FLOW_COUNT` entry `which` (`FLOW_COUNT_ADDED`, ...)
    /// for this family's table.
    pub fn count_index(self, which: u32) -> u32 {
        lb_common::flow_count_index(self == Family::V4, which)
    }
}

/// Both flow tables.
pub struct FlowTables {
    v4: BpfHashMap<MapData, FlowKey4, FlowValue>,
    v6: BpfHashMap<MapData, FlowKey, FlowValue>,
}

impl FlowTables {
    pub(super) fn new(v4: Map, v6: Map) -> Result<Self> {
        Ok(FlowTables {
            v4: v4.try_into().map_err(map_err(maps::FLOWS4))?,
            v6: v6.try_into().map_err(map_err(maps::FLOWS))?,
        })
    }

    /// A second handle on both tables, for a reader on another thread.
    pub(super) fn try_clone(&self) -> Result<Self> {
        let dup = |map: &MapData, name: &'static str| -> Result<Map> {
            let fd = map
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(DataplaneError::FlowCount)?;
            let data = MapData::from_fd(fd).map_err(map_err(name))?;
            Ok(Map::LruHashMap(data))
        };
        Self::new(
            dup(self.v4.map(), maps::FLOWS4)?,
            dup(self.v6.map(), maps::FLOWS)?,
        )
    }

    /// The pin of `key`'s flow, if there is one.
    pub fn get(&self, key: &FlowKey) -> Option<FlowValue> {
        match key.v4() {
            Some(k) => self.v4.get(&k, 0).ok(),
            None => self.v6.get(key, 0).ok(),
        }
    }

    /// Pins `key`'s flow (replacing its pin, if any).
    pub fn insert(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        match key.v4() {
            Some(k) => self.v4.insert(k, value, 0).map_err(map_err(maps::FLOWS4)),
            None => self.v6.insert(key, value, 0).map_err(map_err(maps::FLOWS)),
        }
    }

    /// Removes `key`'s pin; whether there was one.
    pub fn remove(&mut self, key: &FlowKey) -> bool {
        match key.v4() {
            Some(k) => self.v4.remove(&k).is_ok(),
            None => self.v6.remove(key).is_ok(),
        }
    }

    /// Every pin of both tables (entries that cannot be read, as the LRU
    /// evicts them during the walk, are skipped).
    pub fn iter(&self) -> impl Iterator<Item = (FlowKey, FlowValue)> + '_ {
        let v4 = self
            .v4
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(k, v)| (FlowKey::from(k), v));
        let v6 = self.v6.iter().filter_map(std::result::Result::ok);
        v4.chain(v6)
    }

    /// Entries in each table, by a walk of it.
    pub fn count(&self, family: Family) -> usize {
        match family {
            Family::V4 => self.v4.keys().filter(std::result::Result::is_ok).count(),
            Family::V6 => self.v6.keys().filter(std::result::Result::is_ok).count(),
        }
    }
}
