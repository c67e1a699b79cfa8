//! The pin-report ring (`LB_PIN_RING`) and its counters (`LB_PIN_STATS`),
//! taken out of the loaded object so the daemon reads them without the map
//! writer's lock.

use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use lb_common::{PIN_REPORT_STAT_COUNT, PinReport, maps};

use super::{Dataplane, Result, counters::sums, load::take_as};

/// The ring the program reports new pins of changed slots to. Readable
/// (epoll) when it holds reports: wrap it in `tokio::io::unix::AsyncFd`.
pub struct PinRing {
    ring: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl Dataplane {
    /// Takes the pin-report ring out of the object (once: a second call
    /// fails with `Missing`). The program writes to it only when loaded
    /// with `Options::pin_report`.
    pub fn take_pin_ring(&mut self) -> Result<PinRing> {
        Ok(PinRing {
            ring: take_as(&mut self.ebpf, maps::PIN_RING)?,
            stats: take_as(&mut self.ebpf, maps::PIN_STATS)?,
        })
    }
}

impl PinRing {
    /// Moves up to `max` reports from the ring into `out`; returns how
    /// many. Records of another size (none today) are skipped.
    pub fn drain(&mut self, out: &mut Vec<PinReport>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            if item.len() < size_of::<PinReport>() {
                continue;
            }
            // SAFETY: the item holds at least a `PinReport`'s bytes, which
            // is `#[repr(C)]` of integers (any bit pattern is valid); the
            // read is unaligned because the ring gives no alignment promise.
            let r = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PinReport>()) };
            out.push(r);
            n += 1;
        }
        n
    }

    /// Reports written and dropped on a full ring, per
    /// `lb_common::PinReportStat`, summed over CPUs.
    pub fn counts(&self) -> Result<[u64; PIN_REPORT_STAT_COUNT as usize]> {
        sums(&self.stats, maps::PIN_STATS)
    }
}

impl AsRawFd for PinRing {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
