//! Sticky slots: a slot whose backend changed remembers the previous one
//! for `STICKY_MISS_SECS`, and the sweep makes it clean again once no pin
//! of the flow table needs it (and removes pins of backends gone since).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{Ordering, fence};

use lb_common::{FlowKey, FlowValue, MaglevSlot, NO_BACKEND, STICKY_MISS_SECS, TABLES_PER_SERVICE};

use super::MapWriter;
use crate::{dataplane::Result, mapstore::MapStore};

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

impl<S: MapStore> MapWriter<S> {
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
            if e.keeps_flows() {
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
            let inst = &self.services[&name];
            let Some(slots) = by_service.get(&inst.id) else {
                continue;
            };
            let clean: Vec<(usize, MaglevSlot)> = slots
                .iter()
                .filter_map(|&i| {
                    let s = inst.slots.get(i as usize)?;
                    // The table changed since the plan: the next sweep decides.
                    let planned = plan.candidates[&(inst.id, i)];
                    (s.is_sticky() && (s.backend, s.changed) == planned)
                        .then(|| (i as usize, MaglevSlot::clean(s.backend)))
                })
                .collect();
            report.slots_cleaned += self.rewrite_slots(&name, &clean)?;
        }
        Ok(report)
    }
}

impl<S: MapStore> MapWriter<S> {
    /// Rewrites slots of service `name`'s active table in place, in the
    /// writer's record and in the kernel's table: each `(index, slot)`
    /// keeps its backend and gets the new previous backend and window.
    /// `prev` goes last, so a packet that reads a slot halfway sees it as
    /// it was, or (turning clean) as a sticky slot past its window, which
    /// behaves the same. Nothing is written, and 0 returned, when the
    /// table cannot be rewritten in place (another size, none active).
    pub(super) fn rewrite_slots(
        &mut self,
        name: &str,
        slots: &[(usize, MaglevSlot)],
    ) -> Result<usize> {
        let Some(inst) = self.services.get_mut(name) else {
            return Ok(0);
        };
        let entry = self.dp.service_entry(inst.id)?;
        if slots.is_empty()
            || entry.table_size != self.dp.options().maglev_size
            || entry.active >= TABLES_PER_SERVICE
        {
            return Ok(0);
        }
        for &(i, new) in slots {
            inst.slots[i] = new;
        }
        let table = self.dp.table_mut(inst.id, entry.active);
        for &(i, new) in slots {
            let slot = &mut table[i];
            slot.changed = new.changed;
            slot.prev_gen = new.prev_gen;
            fence(Ordering::SeqCst);
            slot.prev = new.prev;
        }
        Ok(slots.len())
    }
}

/// Seconds of CLOCK_MONOTONIC_COARSE, the clock the data plane reads
/// (`bpf_ktime_get_coarse_ns`). The fine clock runs up to a tick ahead of
/// it: a stamp taken from it in the last tick of a second was a second in
/// the program's future.
pub fn monotonic_secs() -> u32 {
    rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse).tv_sec as u32
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
