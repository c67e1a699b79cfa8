//! `LB_ADDR_SLOTS`, the direct-mapped front of `LB_ADDR_SVCS` that the
//! program reads first (`lb_common::AddrSlot`): which keys each slot holds,
//! and the writes that move a slot from what it says to what it should say
//! without ever naming a service for a key it does not hold.
use std::collections::HashMap;

use aya::maps::{Array, MapData};
use lb_common::{ADDR_SLOT_SHARED, AddrKey, AddrSlot, addr_slot, maps};

use super::{Dataplane, Result, map_err};
use crate::mapstore::MapStore;

/// The keys of `LB_ADDR_SVCS` by slot, and what each slot was last
/// written with.
#[derive(Debug, Default)]
pub struct AddrSlots {
    keys: HashMap<u32, HashMap<AddrKey, u32>>,
    written: HashMap<u32, AddrSlot>,
}

impl AddrSlots {
    /// The slots `entries` (the hash map's keys and service ids) need,
    /// with what the array holds now (`current`, by slot): the writes that
    /// bring it there, for a daemon that adopts pins a crash may have left
    /// between the hash map and the array.
    pub fn adopt(
        entries: &[(AddrKey, u32)],
        current: impl IntoIterator<Item = (u32, AddrSlot)>,
    ) -> (Self, Vec<(u32, AddrSlot)>) {
        let mut s = AddrSlots {
            written: current.into_iter().collect(),
            ..Self::default()
        };
        for (key, id) in entries {
            s.keys.entry(addr_slot(key)).or_default().insert(*key, *id);
        }
        let mut slots: Vec<u32> = s.keys.keys().chain(s.written.keys()).copied().collect();
        slots.sort_unstable();
        slots.dedup();
        let writes = slots.into_iter().flat_map(|slot| s.settle(slot)).collect();
        (s, writes)
    }

    /// `key` now serves service `id`; call after the hash map has it.
    pub fn set(&mut self, key: &AddrKey, id: u32) -> Vec<(u32, AddrSlot)> {
        let slot = addr_slot(key);
        self.keys.entry(slot).or_default().insert(*key, id);
        self.settle(slot)
    }

    /// `key` serves nothing; call before the hash map loses it.
    pub fn remove(&mut self, key: &AddrKey) -> Vec<(u32, AddrSlot)> {
        let slot = addr_slot(key);
        if let Some(keys) = self.keys.get_mut(&slot) {
            keys.remove(key);
            if keys.is_empty() {
                self.keys.remove(&slot);
            }
        }
        self.settle(slot)
    }

    /// What `slot` should say.
    fn wanted(&self, slot: u32) -> AddrSlot {
        let keys = self.keys.get(&slot);
        match keys.map(|k| (k.len(), k.iter().next())) {
            Some((1, Some((key, id)))) => AddrSlot {
                key: *key,
                service: id + 1,
            },
            Some((n, _)) if n > 1 => AddrSlot {
                key: self.current(slot).key,
                service: ADDR_SLOT_SHARED,
            },
            _ => AddrSlot::default(),
        }
    }

    fn current(&self, slot: u32) -> AddrSlot {
        self.written.get(&slot).copied().unwrap_or_default()
    }

    /// The writes from what `slot` says to what it should. The program
    /// reads the service word, then the key, and a write of the whole entry
    /// may land in any order, or show a key half old and half new. So a
    /// slot's key changes only while its service word is 0 or
    /// `ADDR_SLOT_SHARED` on both sides of the write: a reader then finds
    /// no service, or asks the hash map, which holds every key being added
    /// or removed (it gains a key before the array, and loses it after).
    fn settle(&mut self, slot: u32) -> Vec<(u32, AddrSlot)> {
        let want = self.wanted(slot);
        let cur = self.current(slot);
        if want == cur {
            return Vec::new();
        }
        let mut steps = Vec::new();
        if want.key != cur.key {
            if cur.service != 0 && cur.service != ADDR_SLOT_SHARED {
                steps.push(AddrSlot {
                    key: cur.key,
                    service: ADDR_SLOT_SHARED,
                });
            }
            if want.service != 0 {
                steps.push(AddrSlot {
                    key: want.key,
                    service: ADDR_SLOT_SHARED,
                });
            }
        }
        if steps.last() != Some(&want) {
            steps.push(want);
        }
        if want == AddrSlot::default() {
            self.written.remove(&slot);
        } else {
            self.written.insert(slot, want);
        }
        steps.into_iter().map(|s| (slot, s)).collect()
    }
}

impl Dataplane {
    /// Brings `LB_ADDR_SLOTS` in line with `LB_ADDR_SVCS` at load.
    pub(super) fn adopt_addr_slots(&mut self) -> Result<()> {
        let entries = MapStore::read_addr_services(self)?;
        let (slots, writes) = AddrSlots::adopt(&entries, self.addr_slots()?);
        self.addr_slot_keys = slots;
        write_slots(&mut self.addr_slots, &writes)
    }

    pub(super) fn set_addr_slot(&mut self, key: &AddrKey, id: u32) -> Result<()> {
        let writes = self.addr_slot_keys.set(key, id);
        write_slots(&mut self.addr_slots, &writes)
    }

    pub(super) fn remove_addr_slot(&mut self, key: &AddrKey) -> Result<()> {
        let writes = self.addr_slot_keys.remove(key);
        write_slots(&mut self.addr_slots, &writes)
    }

    /// The non-empty entries of `LB_ADDR_SLOTS`, by slot.
    pub fn addr_slots(&self) -> Result<Vec<(u32, AddrSlot)>> {
        super::store::set_entries(&self.addr_slots, maps::ADDR_SLOTS)
    }
}

fn write_slots(map: &mut Array<MapData, AddrSlot>, writes: &[(u32, AddrSlot)]) -> Result<()> {
    for (slot, entry) in writes {
        map.set(*slot, entry, 0)
            .map_err(map_err(maps::ADDR_SLOTS))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, port: u16) -> AddrKey {
        AddrKey {
            addr: crate::dataplane::addr_words(std::net::IpAddr::from([10, 0, 0, last])),
            port,
            proto: 6,
            _pad: 0,
        }
    }

    /// Two keys of one slot, found by search.
    fn colliding() -> (AddrKey, AddrKey) {
        let mut seen: HashMap<u32, AddrKey> = HashMap::new();
        for port in 1..u16::MAX {
            let k = key(7, port);
            if let Some(other) = seen.insert(addr_slot(&k), k) {
                return (other, k);
            }
        }
        unreachable!("8192 slots, 65534 keys")
    }

    /// The program's reading of a slot (`select::addr_service`), with the
    /// hash map `hash`.
    fn read(slot: &AddrSlot, hash: &HashMap<AddrKey, u32>, k: &AddrKey) -> Option<u32> {
        match slot.service {
            0 => None,
            ADDR_SLOT_SHARED => hash.get(k).copied(),
            s if slot.key == *k => Some(s - 1),
            _ => None,
        }
    }

    /// Every entry a write of `from` -> `to` may show a reader that takes
    /// the service word and the key each wholly old or new.
    fn mixes(from: &AddrSlot, to: &AddrSlot) -> [AddrSlot; 4] {
        [
            *from,
            *to,
            AddrSlot {
                key: from.key,
                service: to.service,
            },
            AddrSlot {
                key: to.key,
                service: from.service,
            },
        ]
    }

    /// Applies a change through `AddrSlots` in the daemon's order and checks
    /// that at every step, for every key, a reader finds the old answer or
    /// the new one (or none, for a key that is being added or removed).
    fn check_change(
        s: &mut AddrSlots,
        array: &mut HashMap<u32, AddrSlot>,
        hash: &mut HashMap<AddrKey, u32>,
        keys: &[AddrKey],
        change: (AddrKey, Option<u32>),
    ) {
        let (k, id) = change;
        let before: Vec<Option<u32>> = keys.iter().map(|x| hash.get(x).copied()).collect();
        let writes = match id {
            Some(id) => {
                hash.insert(k, id);
                s.set(&k, id)
            }
            None => s.remove(&k),
        };
        let mut after_hash = hash.clone();
        if id.is_none() {
            after_hash.remove(&k);
        }
        let after: Vec<Option<u32>> = keys.iter().map(|x| after_hash.get(x).copied()).collect();
        for (slot, entry) in writes {
            let from = array.get(&slot).copied().unwrap_or_default();
            // A key half old and half new is read only with no service or
            // a shared one.
            if from.key != entry.key {
                for e in [from, entry] {
                    assert!(
                        e.service == 0 || e.service == ADDR_SLOT_SHARED,
                        "the key of slot {slot} changes beside service {}",
                        e.service
                    );
                }
            }
            for seen in mixes(&from, &entry) {
                for (i, x) in keys.iter().enumerate() {
                    if addr_slot(x) != slot {
                        continue;
                    }
                    let got = read(&seen, hash, x);
                    let ok = got == before[i]
                        || got == after[i]
                        || (got.is_none() && (before[i].is_none() || after[i].is_none()));
                    assert!(
                        ok,
                        "{x:?}: read {got:?} of {seen:?} while {:?} -> {:?}",
                        before[i], after[i]
                    );
                }
            }
            array.insert(slot, entry);
        }
        *hash = after_hash;
        for x in keys {
            let slot = array.get(&addr_slot(x)).copied().unwrap_or_default();
            assert_eq!(read(&slot, hash, x), hash.get(x).copied(), "{x:?} after");
        }
    }

    #[test]
    fn every_step_of_a_shared_slot_reads_right() {
        let (a, b) = colliding();
        let c = key(9, 443);
        let keys = [a, b, c];
        let mut s = AddrSlots::default();
        let mut array = HashMap::new();
        let mut hash = HashMap::new();
        for change in [
            (a, Some(1)),
            (b, Some(2)),
            (c, Some(3)),
            (a, Some(4)),
            (a, None),
            (b, Some(5)),
            (a, Some(6)),
            (b, None),
            (a, None),
            (c, None),
        ] {
            check_change(&mut s, &mut array, &mut hash, &keys, change);
        }
        assert!(array.values().all(|e| *e == AddrSlot::default()));
    }

    #[test]
    fn adopting_repairs_a_slot_a_crash_left_behind() {
        let (a, b) = colliding();
        let c = key(9, 443);
        // The hash map holds a, b and c; the array only names c, with a
        // stale id, and an entry for a key that is gone.
        let entries = [(a, 1), (b, 2), (c, 3)];
        let gone = key(11, 443);
        let current = [
            (addr_slot(&c), AddrSlot { key: c, service: 9 }),
            (
                addr_slot(&gone),
                AddrSlot {
                    key: gone,
                    service: 5,
                },
            ),
        ];
        let (mut s, writes) = AddrSlots::adopt(&entries, current);
        let mut array: HashMap<u32, AddrSlot> = current.into_iter().collect();
        for (slot, e) in writes {
            array.insert(slot, e);
        }
        let hash: HashMap<AddrKey, u32> = entries.into_iter().collect();
        for k in [a, b, c, gone] {
            let slot = array.get(&addr_slot(&k)).copied().unwrap_or_default();
            assert_eq!(read(&slot, &hash, &k), hash.get(&k).copied(), "{k:?}");
        }
        assert!(s.set(&c, 3).is_empty(), "adopted state is what it wrote");
    }

    /// Twice as many slots as address services: a thousand addresses of a
    /// range on one port each get a slot of their own.
    #[test]
    fn consecutive_addresses_spread_over_the_slots() {
        let keys: Vec<AddrKey> = (0..1000u32)
            .map(|i| AddrKey {
                addr: crate::dataplane::addr_words(std::net::IpAddr::from(
                    (0x0a00_0000u32 + i).to_be_bytes(),
                )),
                port: 443,
                proto: 6,
                _pad: 0,
            })
            .collect();
        let mut slots: Vec<u32> = keys.iter().map(addr_slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), 1000, "1000 keys in {} slots", slots.len());
    }
}
