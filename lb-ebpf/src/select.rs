//! Service lookup, the Maglev pick and the flow table.
//!
//! Map lookups on the hot path, and why each is there:
//! - `LB_PORTS`, `LB_SERVICES`, `LB_MAGLEV`, `LB_BACKENDS`: arrays, inlined by
//!   the verifier, no helper call.
//! - `LB_ADDR_SVCS` (hash): only for ports that have address-specific services.
//! - `LB_FLOWS` (LRU): only in "sticky" slots, whose backend changed; flows in
//!   slots that never changed cannot be pinned anywhere else, so a SYN or an
//!   established packet in a clean slot costs no helper call at all.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    AddrKey, BACKEND_ACTIVE, BACKEND_DRAINING, BackendEntry, FlowKey, FlowValue, MaglevSlot,
    NO_BACKEND, PORT_HAS_ADDR_SERVICES, PROTO_TCP, Reason, ServiceEntry, TABLES_PER_SERVICE,
    UDP_AFFINITY_SECS, flow_hash, maglev_index, port_slot,
};

use crate::{
    maps::{LB_ADDR_SVCS, LB_BACKENDS, LB_FLOWS, LB_MAGLEV, LB_PORTS, LB_SERVICES},
    parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN},
};

/// Finds the service for the packet's destination: the port array first
/// (wildcard services), the address hash only where the port needs it.
#[inline(always)]
pub fn service(p: &Packet) -> Result<(u32, &'static ServiceEntry), Reason> {
    let port = u16::from_be(p.dport);
    let entry = LB_PORTS
        .get(port_slot(port, p.proto))
        .ok_or(Reason::NoService)?;
    let mut id_plus_one = entry.wildcard;
    if entry.flags & PORT_HAS_ADDR_SERVICES != 0 {
        let key = AddrKey {
            addr: p.dst,
            port,
            proto: p.proto,
            _pad: 0,
        };
        if let Some(id) = unsafe { LB_ADDR_SVCS.get(&key) } {
            id_plus_one = *id + 1;
        }
    }
    if id_plus_one == 0 {
        return Err(Reason::NoService);
    }
    let id = id_plus_one - 1;
    let svc = LB_SERVICES.get(id).ok_or(Reason::NoService)?;
    Ok((id, svc))
}

pub struct Pick {
    pub backend: u32,
    pub entry: &'static BackendEntry,
    pub new_flow: bool,
}

#[inline(always)]
fn state(backend: u32) -> u8 {
    match LB_BACKENDS.get(backend) {
        Some(b) => b.state,
        None => 0,
    }
}

/// Existing flows may stay on an active or draining backend.
#[inline(always)]
fn keeps_flows(backend: u32) -> bool {
    let s = state(backend);
    s == BACKEND_ACTIVE || s == BACKEND_DRAINING
}

/// Picks the backend for the packet from the service's active Maglev table.
/// `pin` is false for a packet that only asks where its flow goes (an ICMP
/// error about it): the pick is the same, but nothing is written to the
/// flow table.
#[inline(always)]
pub fn backend(
    ctx: &XdpContext,
    p: &Packet,
    id: u32,
    svc: &ServiceEntry,
    pin: bool,
) -> Result<Pick, Reason> {
    let m = svc.table_size;
    let table = svc.active;
    if m == 0 || table >= TABLES_PER_SERVICE {
        return Err(Reason::NoBackend);
    }
    let slot = flow_hash(&p.src, &p.dst, p.sport, p.dport, p.proto) % m;
    let e = LB_MAGLEV
        .get(maglev_index(id, table, m, slot))
        .ok_or(Reason::NoBackend)?;
    let syn = p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (backend, new_flow) = if e.backend == e.prev {
        (e.backend, syn)
    } else {
        sticky(ctx, p, id, slot, e, syn, pin)
    };
    if backend == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    let entry = LB_BACKENDS.get(backend).ok_or(Reason::NoBackend)?;
    Ok(Pick {
        backend,
        entry,
        new_flow,
    })
}

/// The slot changed less than `UDP_AFFINITY_SECS` ago. A clock read, but
/// only for UDP packets with no flow entry in a changed slot.
#[inline(always)]
fn recently(changed: u32) -> bool {
    let now = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    now.wrapping_sub(changed) < UDP_AFFINITY_SECS
}

/// A slot whose backend changed: the flow table decides. A flow pinned to a
/// live backend stays there; an unpinned TCP flow that is not a SYN was
/// established before the change and stays on the slot's previous backend
/// (if that still takes flows); a SYN takes the current backend. UDP has no
/// SYN: a flow without a pin stays on the previous backend while it is
/// active, for `UDP_AFFINITY_SECS` after the change; later ones are new
/// flows. Every decision here is pinned (when `pin`) so it survives the
/// next change.
#[inline(always)]
fn sticky(
    ctx: &XdpContext,
    p: &Packet,
    id: u32,
    slot: u32,
    e: &MaglevSlot,
    syn: bool,
    pin: bool,
) -> (u32, bool) {
    let (cur, prev) = (e.backend, e.prev);
    let key = FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    };
    let rst = p.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0;
    if let Some(v) = LB_FLOWS.get_ptr(&key) {
        let pinned = unsafe { (*v).backend };
        if keeps_flows(pinned) {
            if rst {
                let _ = LB_FLOWS.remove(&key);
            }
            return (pinned, false);
        }
        // Rare (the daemon purges such flows): worth a line in its log.
        debug!(
            ctx,
            "service {}: flow pinned to backend {}, which takes no flows; re-picked", id, pinned
        );
    }
    let choice = if syn {
        cur
    } else if p.proto == PROTO_TCP {
        if keeps_flows(prev) { prev } else { cur }
    } else if state(prev) == BACKEND_ACTIVE && recently(e.changed) {
        prev
    } else {
        cur
    };
    if pin && choice != NO_BACKEND && !rst {
        let v = FlowValue {
            backend: choice,
            service: id,
            slot,
            _pad: 0,
        };
        let _ = LB_FLOWS.insert(&key, &v, 0);
    }
    (choice, syn || p.proto != PROTO_TCP)
}
