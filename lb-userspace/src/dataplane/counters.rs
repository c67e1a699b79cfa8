//! Reading the data plane's counters (per service, backend, action, reason,
//! event) and the flow and fragment tables; counting the pins the daemon
//! removes, so each flow table's size is known without a walk.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    Counters, EVENT_COUNT, FLOW_COUNT_ADDED, FLOW_COUNT_EVICTED, FLOW_COUNT_REMOVED, FlowKey,
    FragKey, FragValue, NEXTHOP_VIA_COUNT, REASON_COUNT, maps,
};

use super::{
    Dataplane, DataplaneError, Family, Result, SweepFound, SweepPlan, flows::FlowTables, map_err,
    walk_pins,
};

impl Dataplane {
    /// Summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.service_stats, id, maps::SERVICE_STATS)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, id, maps::BACKEND_STATS)
    }

    /// Zeroes backend `id`'s counters on every CPU.
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        set_per_cpu(
            &mut self.backend_stats,
            id,
            Counters::default(),
            maps::BACKEND_STATS,
            |e| DataplaneError::Options(format!("backend counters: {e}")),
        )
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

    /// Entries in both flow tables (walks them: exact, about a second for
    /// a million entries).
    pub fn flow_count(&self) -> usize {
        Family::ALL.iter().map(|f| self.flows.count(*f)).sum()
    }

    /// Entries in both flow tables from `LB_FLOW_COUNT` (no walk):
    /// [`Dataplane::flow_entries_of`] summed.
    pub fn flow_entries(&self) -> Result<u64> {
        Family::ALL.iter().map(|f| self.flow_entries_of(*f)).sum()
    }

    /// Entries in `family`'s flow table from `LB_FLOW_COUNT` (no walk):
    /// pins the program added under a new key minus those the daemon
    /// removed and those the last walk found evicted, at most the capacity.
    pub fn flow_entries_of(&self, family: Family) -> Result<u64> {
        entries(&self.flow_count, family, self.opts.flow_table_size)
    }

    /// Counts `n` pins this process removed from `family`'s flow table.
    /// Only the map writer writes this entry, so the read-modify-write
    /// races nothing.
    pub(super) fn count_flows_removed(&mut self, family: Family, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let index = family.count_index(FLOW_COUNT_REMOVED);
        let removed = sum_u64(&self.flow_count, index, maps::FLOW_COUNT)?;
        set_total(&mut self.flow_count, index, removed + n)
    }

    /// A second handle on the flow tables and their counts, to count and
    /// walk them from another thread without holding up whoever writes
    /// maps.
    pub fn flow_counter(&self) -> Result<FlowCounter> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
            fd.try_clone_to_owned().map_err(DataplaneError::FlowCount)
        };
        let counts = dup(aya::maps::IterableMap::map(&self.flow_count).fd().as_fd())?;
        let counts = MapData::from_fd(counts).map_err(map_err(maps::FLOW_COUNT))?;
        let counts =
            PerCpuArray::try_from(Map::PerCpuArray(counts)).map_err(map_err(maps::FLOW_COUNT))?;
        Ok(FlowCounter {
            flows: self.flows.try_clone()?,
            counts: Mutex::new(counts),
            capacity: self.opts.flow_table_size,
        })
    }
}

/// Counts flow-table entries beside a writing [`Dataplane`].
pub struct FlowCounter {
    flows: FlowTables,
    /// Written only by `walk` (`FLOW_COUNT_EVICTED`).
    counts: Mutex<PerCpuArray<MapData, u64>>,
    capacity: u32,
}

impl FlowCounter {
    /// Walks the flow table for a sweep: which candidate slots live pins
    /// still need, and which pins name a backend that no longer holds them.
    /// What the walk saw also corrects the count for the LRU's evictions
    /// (pins added while it walks may be counted twice, until the next).
    /// The lock is not held during the walk, so a scrape never waits on it.
    pub fn walk(&self, plan: &SweepPlan) -> SweepFound {
        // The guard ends with the statement: the walk runs without it.
        let before = Family::ALL.map(|f| added_net(&crate::lock(&self.counts), f));
        let mut seen = [0u64; 2];
        let found = walk_pins(
            plan,
            self.flows
                .iter()
                .inspect(|(k, _)| seen[Family::of(k) as usize] += 1),
        );
        for (family, net) in Family::ALL.into_iter().zip(before) {
            let corrected = net.and_then(|net| {
                let evicted = net.saturating_sub(seen[family as usize]);
                let index = family.count_index(FLOW_COUNT_EVICTED);
                set_total(&mut crate::lock(&self.counts), index, evicted)
            });
            if let Err(e) = corrected {
                tracing::warn!(
                    family = family.name(),
                    "correcting the flow table's count: {e}"
                );
            }
        }
        found
    }

    /// Walks the flow table for a joining node: its pins of changed
    /// slots, by backend address ([`super::join_pins`]).
    pub fn walk_join(&self, plan: &super::JoinPlan) -> Vec<(FlowKey, std::net::SocketAddr)> {
        super::join_pins(plan, self.flows.iter())
    }

    /// Entries in `family`'s flow table, as [`Dataplane::flow_entries_of`]
    /// (no walk).
    pub fn count(&self, family: Family) -> Result<u64> {
        entries(&crate::lock(&self.counts), family, self.capacity)
    }
}

/// Pins added to `family`'s table minus pins the daemon removed
/// (evictions not counted).
fn added_net(counts: &PerCpuArray<MapData, u64>, family: Family) -> Result<u64> {
    let sum = |i| sum_u64(counts, family.count_index(i), maps::FLOW_COUNT);
    Ok(sum(FLOW_COUNT_ADDED)?.saturating_sub(sum(FLOW_COUNT_REMOVED)?))
}

fn entries(counts: &PerCpuArray<MapData, u64>, family: Family, capacity: u32) -> Result<u64> {
    let sum = |i| sum_u64(counts, family.count_index(i), maps::FLOW_COUNT);
    Ok(lb_common::flow_entries(
        sum(FLOW_COUNT_ADDED)?,
        sum(FLOW_COUNT_REMOVED)?,
        sum(FLOW_COUNT_EVICTED)?,
        capacity,
    ))
}

/// Sets entry `index` of a per-CPU counter to `total` (in CPU 0's value).
fn set_total(map: &mut PerCpuArray<MapData, u64>, index: u32, total: u64) -> Result<()> {
    set_per_cpu(
        map,
        index,
        total,
        maps::FLOW_COUNT,
        DataplaneError::FlowCount,
    )
}

/// Sets entry `index` of per-CPU map `name` to `first` in CPU 0's value
/// and the default in every other CPU's.
fn set_per_cpu<T: aya::Pod + Clone + Default>(
    map: &mut PerCpuArray<MapData, T>,
    index: u32,
    first: T,
    name: &'static str,
    err: fn(std::io::Error) -> DataplaneError,
) -> Result<()> {
    let cpus = map.get(&index, 0).map_err(map_err(name))?.len();
    let mut values = vec![T::default(); cpus];
    if let Some(v) = values.first_mut() {
        *v = first;
    }
    let values = PerCpuValues::try_from(values).map_err(err)?;
    map.set(index, values, 0).map_err(map_err(name))
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
pub(super) fn sums<const N: usize>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = sum_u64(map, i as u32, name)?;
    }
    Ok(out)
}
