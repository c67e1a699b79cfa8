//! Per-CPU counters. Array lookups are inlined by the verifier, so counting
//! costs no helper call.
use lb_common::{Counters, Reason};

use crate::maps::{LB_ACT_STATS, LB_BE_STATS, LB_EVENTS, LB_RSN_STATS, LB_SVC_STATS};

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

/// One of the flow-table events (`lb_common::EVENT_*`).
#[inline(always)]
pub fn event(event: u32) {
    bump(LB_EVENTS.get_ptr_mut(event));
}

#[inline(always)]
pub fn reason(reason: Reason) {
    bump(LB_RSN_STATS.get_ptr_mut(reason as u32));
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
