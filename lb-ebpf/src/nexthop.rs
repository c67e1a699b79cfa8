//! The next hop of a remote backend (`nat`, `dsr`): the daemon's entry in
//! `LB_NEXTHOPS` when it is the backend's own and fresh, else the FIB. The
//! entry saves the `bpf_fib_lookup` call, most of these modes' cost.
use aya_ebpf::programs::XdpContext;
use lb_common::{BackendEntry, NEXTHOP_FRESH_SECS, NextHopVia, Reason};

use crate::{
    maps::LB_NEXTHOPS,
    nat::{Hop, fib},
    parse::{Bounds, Packet},
    select::{now_secs, secs_since},
    stats,
};

/// The next hop towards backend `id`, counted by where it came from.
#[inline(always)]
pub fn find(
    ctx: &XdpContext,
    b: &Bounds,
    p: &Packet,
    id: u32,
    be: &BackendEntry,
) -> Result<Hop, Reason> {
    if let Some(hop) = cached(b, p, id, be) {
        stats::next_hop(NextHopVia::Cache);
        return Ok(hop);
    }
    stats::next_hop(NextHopVia::Fib);
    fib(ctx, b, p, &be.addr)
}

/// The cached hop if it may stand for the FIB's answer: written for this
/// holder of the id (generation), the packet fits the route's MTU (else
/// the FIB refuses it, as before), and confirmed by the daemon within
/// `NEXTHOP_FRESH_SECS`. An array read (inlined) and the clock, which a CPU
/// reads once a jiffy (`now_secs`).
#[inline(always)]
fn cached(b: &Bounds, p: &Packet, id: u32, be: &BackendEntry) -> Option<Hop> {
    let e = LB_NEXTHOPS.get(id)?;
    if e.ifindex == 0 || e.generation != be.generation {
        return None;
    }
    if b.len() as usize - p.l3_off > e.mtu as usize {
        return None;
    }
    if secs_since(now_secs(), e.resolved) > NEXTHOP_FRESH_SECS {
        return None;
    }
    Some(Hop {
        ifindex: e.ifindex,
        smac: e.smac,
        dmac: e.dmac,
    })
}
