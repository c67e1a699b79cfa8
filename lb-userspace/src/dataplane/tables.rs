//! The Maglev tables, memory-mapped: reading them, and installing a new
//! table beside the active one before flipping the service's `active` word.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use aya::maps::{Array, Map, MapData};
use lb_common::{MaglevSlot, ServiceEntry, TABLES_PER_SERVICE, maglev_index, maps};

use super::{Dataplane, DataplaneError, Result, map_err};

/// The data plane's memory-mapped Maglev tables.
pub(super) struct MaglevMmap {
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
    pub(super) fn new(map: &MapData, len: usize, writable: bool) -> Result<Self> {
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

impl Dataplane {
    /// One table of one service, as the kernel sees it.
    pub fn table(&self, service: u32, table: u32) -> &[MaglevSlot] {
        let m = self.opts.maglev_size;
        let start = maglev_index(service, table, m, 0) as usize;
        &self.maglev.slots()[start..start + m as usize]
    }

    pub(super) fn table_mut(&mut self, service: u32, table: u32) -> &mut [MaglevSlot] {
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
