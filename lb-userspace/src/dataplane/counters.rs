//! Reading the data plane's counters (per service, backend, action, reason,
//! event) and the flow and fragment tables.

use std::os::fd::AsFd;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use lb_common::{
    Counters, EVENT_COUNT, FlowKey, FlowValue, FragKey, FragValue, NEXTHOP_VIA_COUNT, REASON_COUNT,
    maps,
};

use super::{Dataplane, DataplaneError, Result, SweepFound, SweepPlan, map_err, walk_pins};

impl Dataplane {
    /// Summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.service_stats, id, maps::SERVICE_STATS)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, id, maps::BACKEND_STATS)
    }

    /// Packets per XDP action, indexed by the action's value.
    pub fn action_counts(&self) -> Result<[u64; lb_common::ACTION_COUNT as usize]> {
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

    /// `nat`/`dsr` packets per `lb_common::NextHopVia` (cache or FIB),
    /// indexed by its value.
    pub fn next_hop_counts(&self) -> Result<[u64; NEXTHOP_VIA_COUNT as usize]> {
        sums(&self.next_hop_stats, maps::NEXTHOP_STATS)
    }

    /// Packets dropped, per `lb_common::Reason`, indexed by the reason's value.
    pub fn drop_counts(&self) -> Result<[u64; REASON_COUNT as usize]> {
        sums(&self.drop_stats, maps::DROP_STATS)
    }

    /// Where the first fragment of datagram `key` went, if it is still
    /// remembered for the later fragments.
    pub fn fragment(&self, key: &FragKey) -> Option<FragValue> {
        self.frags.get(key, 0).ok()
    }

    /// Entries in the flow table (walks it).
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(std::result::Result::is_ok).count()
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

/// Counts flow-table entries beside a writing [`Dataplane`].
pub struct FlowCounter(BpfHashMap<MapData, FlowKey, FlowValue>);

impl FlowCounter {
    /// Walks the flow table for a sweep: which candidate slots live pins
    /// still need, and which pins name a backend that no longer holds them.
    pub fn walk(&self, plan: &SweepPlan) -> SweepFound {
        walk_pins(plan, self.0.iter().filter_map(std::result::Result::ok))
    }

    pub fn count(&self) -> usize {
        self.0.keys().filter(std::result::Result::is_ok).count()
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

/// Every entry of a per-CPU counter array, summed over CPUs.
fn sums<const N: usize>(map: &PerCpuArray<MapData, u64>, name: &'static str) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = sum_u64(map, i as u32, name)?;
    }
    Ok(out)
}
