//! `LB_NEXTHOPS`, the next hop of each remote backend by backend id: the
//! resolver's own handle on it (written beside the map writer, without its
//! lock) and the map writer's clearing of an id that changes hands.

use std::os::fd::AsFd;

use aya::maps::{Array, Map, MapData};
use lb_common::{NextHop, maps};

use super::{Dataplane, DataplaneError, Result, map_err};

impl Dataplane {
    /// A second handle on `LB_NEXTHOPS` for the resolver
    /// ([`crate::nexthop`]), which refreshes entries every second without
    /// holding up whoever writes the other maps.
    pub fn next_hop_writer(&self) -> Result<NextHopWriter> {
        let fd = aya::maps::IterableMap::map(&self.next_hops)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DataplaneError::Mmap)?;
        let map = MapData::from_fd(fd).map_err(map_err(maps::NEXTHOPS))?;
        Ok(NextHopWriter(
            Array::try_from(Map::Array(map)).map_err(map_err(maps::NEXTHOPS))?,
        ))
    }

    /// The next hop cached for backend `id` (all zero: none).
    pub fn next_hop(&self, id: u32) -> Result<NextHop> {
        self.next_hops.get(&id, 0).map_err(map_err(maps::NEXTHOPS))
    }

    /// Forgets the next hop of backend `id`: its generation changed, so
    /// the entry is not its holder's any more (the program would ignore it
    /// anyway; this keeps the map honest).
    pub(super) fn clear_next_hop(&mut self, id: u32) -> Result<()> {
        self.next_hops
            .set(id, NextHop::default(), 0)
            .map_err(map_err(maps::NEXTHOPS))
    }
}

/// Writes `LB_NEXTHOPS` entries.
pub struct NextHopWriter(Array<MapData, NextHop>);

impl NextHopWriter {
    pub fn set(&mut self, id: u32, hop: &NextHop) -> Result<()> {
        self.0.set(id, hop, 0).map_err(map_err(maps::NEXTHOPS))
    }

    pub fn clear(&mut self, id: u32) -> Result<()> {
        self.set(id, &NextHop::default())
    }
}
