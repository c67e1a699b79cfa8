//! Per-CPU counters, and the verdict of a packet that was not forwarded.
//! Array lookups are inlined by the verifier, so counting costs no helper
//! call.
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use lb_common::{
    Counters, Event, FLOW_COUNT_ADDED, NextHopVia, PinReportStat, Reason, flow_count_index,
};

use crate::maps::{
    LB_ACT_STATS, LB_BE_STATS, LB_DROP_STATS, LB_EVENTS, LB_FLOW_COUNT, LB_NH_STATS, LB_PIN_STATS,
    LB_RSN_STATS, LB_SVC_STATS,
};

/// A packet not forwarded to a backend: passed to the stack or dropped,
/// and why. Every stage returns `Result<_, Fail>`, so no failure is counted
/// as forwarded; a bare `Reason` (`?` on parse and lookup errors) passes.
#[derive(Clone, Copy)]
pub enum Fail {
    Pass(Reason),
    Drop(Reason),
}

impl From<Reason> for Fail {
    #[inline(always)]
    fn from(r: Reason) -> Self {
        Fail::Pass(r)
    }
}

impl Fail {
    /// Counts the packet under its reason and returns its XDP action.
    #[inline(always)]
    pub fn count(self) -> u32 {
        match self {
            Fail::Pass(r) => {
                bump(LB_RSN_STATS.get_ptr_mut(r as u32));
                XDP_PASS
            }
            Fail::Drop(r) => {
                bump(LB_DROP_STATS.get_ptr_mut(r as u32));
                XDP_DROP
            }
        }
    }
}

#[inline(always)]
fn bump(c: Option<*mut u64>) {
    if let Some(c) = c {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn action(action: u32) {
    bump(LB_ACT_STATS.get_ptr_mut(action));
}

/// One of the flow-table events.
#[inline(always)]
pub fn event(event: Event) {
    bump(LB_EVENTS.get_ptr_mut(event as u32));
}

/// A pin written under a key the flow table of its family did not hold.
#[inline(always)]
pub fn flow_added(v6: bool) {
    bump(LB_FLOW_COUNT.get_ptr_mut(flow_count_index(!v6, FLOW_COUNT_ADDED)));
}

/// A pin report written, or dropped on a full ring.
#[inline(always)]
pub fn pin_report(stat: PinReportStat) {
    bump(LB_PIN_STATS.get_ptr_mut(stat as u32));
}

/// Where a `nat`/`dsr` packet's next hop came from.
#[inline(always)]
pub fn next_hop(via: NextHopVia) {
    bump(LB_NH_STATS.get_ptr_mut(via as u32));
}

#[inline(always)]
fn count(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        if new_flow {
            c.new_flows += 1;
        }
    }
}

#[inline(always)]
pub fn forwarded(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    count(LB_SVC_STATS.get_ptr_mut(service), bytes, new_flow);
    count(LB_BE_STATS.get_ptr_mut(backend), bytes, new_flow);
}
