//! Header rewrites towards a backend, with incremental checksum updates,
//! and the next hop for backends on other hosts.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{Addr, BACKEND_REWRITE_ADDR, BackendEntry, PROTO_UDP, Reason, is_v4_mapped};

use crate::{
    csum,
    maps::LB_TX_PORTS,
    parse::{Bounds, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF},
    stats,
};

/// `local` forwarding: the backend is a port on this host. The destination
/// port changes, and the address when the backend has its own; the packet
/// then goes up the stack (`XDP_PASS`).
#[inline(always)]
pub fn local(b: &Bounds, p: &Packet, be: &BackendEntry) -> Result<(), Reason> {
    rewrite(b, p, be, be.flags & BACKEND_REWRITE_ADDR != 0)
}

/// Points the packet at the backend's port, and its address too when
/// `addr` is set, fixing the IP and L4 checksums.
#[inline(always)]
fn rewrite(b: &Bounds, p: &Packet, be: &BackendEntry, addr: bool) -> Result<(), Reason> {
    let udp = p.proto == PROTO_UDP;
    let check: *mut u16 = b.ptr_at(p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF })?;
    let ports: *mut Ports = b.ptr_at(p.l4_off)?;
    let old_csum = unsafe { *check };
    // An IPv4 UDP checksum of zero means "none": leave it so.
    let has_csum = !(udp && old_csum == 0 && !p.v6);
    let new_port = be.port.to_be();
    let mut c = csum::replace16(old_csum, p.dport, new_port);
    unsafe { (*ports).dst = new_port };

    if addr && be.addr != p.dst && is_v4_mapped(&be.addr) != p.v6 {
        if p.v6 {
            let ip: *mut Ipv6Hdr = b.ptr_at(p.l3_off)?;
            c = csum::replace128(c, &p.dst, &be.addr);
            unsafe { (*ip).dst = be.addr };
        } else {
            let ip: *mut Ipv4Hdr = b.ptr_at(p.l3_off)?;
            let (old, new) = (p.dst[3], be.addr[3]);
            unsafe {
                (*ip).check = csum::replace32((*ip).check, old, new);
                (*ip).dst = new;
            }
            c = csum::replace32(c, old, new);
        }
    }
    if has_csum {
        unsafe { *check = if udp && c == 0 { 0xffff } else { c } };
    }
    Ok(())
}

/// `nat` forwarding: the backend is another host. Destination address and
/// port become the backend's (the client's address stays), then the packet
/// is routed to it.
#[inline(always)]
pub fn nat(ctx: &XdpContext, b: &Bounds, p: &Packet, be: &BackendEntry) -> u32 {
    if rewrite(b, p, be, true).is_err() {
        return XDP_PASS;
    }
    route(ctx, b, p, &be.addr)
}

/// `dsr` forwarding: the backend holds the service address itself; only the
/// MAC addresses change, and its replies go straight to the client.
#[inline(always)]
pub fn dsr(ctx: &XdpContext, b: &Bounds, p: &Packet, be: &BackendEntry) -> u32 {
    route(ctx, b, p, &be.addr)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Finds the next hop towards `to` in the kernel's FIB and sends the frame
/// there: `XDP_TX` out of the interface it came in on, `XDP_REDIRECT`
/// through `LB_TX_PORTS` to another. Without a route or neighbour the frame
/// goes to the stack (counted as `fib_miss`), never dropped.
#[inline(always)]
pub fn route(ctx: &XdpContext, b: &Bounds, p: &Packet, to: &Addr) -> u32 {
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = p.proto;
    fib.sport = p.sport;
    fib.dport = p.dport;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = (b.len() as usize - p.l3_off) as u16;
    if p.v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = p.src;
        fib.__bindgen_anon_4.ipv6_dst = *to;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = p.src[3];
        fib.__bindgen_anon_4.ipv4_dst = to[3];
    }
    // The one helper call of these modes: where does the backend live?
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut c_void,
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        stats::reason(Reason::FibMiss);
        return XDP_PASS;
    }
    let Ok(eth) = b.ptr_at::<EthHdr>(0) else {
        return XDP_PASS;
    };
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        LB_TX_PORTS
            .redirect(fib.ifindex, XDP_PASS as u64)
            .unwrap_or(XDP_PASS)
    }
}
