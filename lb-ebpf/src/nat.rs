//! Header rewrites towards a backend, with incremental checksum updates,
//! and the next hop for backends on other hosts. For `nat` and `dsr` the
//! next hop is found and checked before anything in the frame changes, so
//! a packet that cannot be forwarded is dropped or passed as it came (the
//! one exception is documented on `nat`).
use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_TX},
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{Addr, BACKEND_REWRITE_ADDR, BackendEntry, PROTO_UDP, Reason, is_v4_mapped};

use crate::{
    csum,
    maps::LB_TX_PORTS,
    nexthop,
    parse::{
        Bounds, EthHdr, FRAG_LATER, Ipv4Hdr, Ipv6Hdr, Packet, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
    stats::Fail,
};

/// `local` forwarding: the backend is a port on this host. The destination
/// port changes, and the address when the backend has its own; the packet
/// then goes up the stack (`XDP_PASS`).
#[inline(always)]
pub fn local(b: &Bounds, p: &Packet, be: &BackendEntry) -> Result<(), Reason> {
    rewrite(b, p, be, be.flags & BACKEND_REWRITE_ADDR != 0)
}

/// Points the packet at the backend's port, and its address too when
/// `addr` is set, fixing the IP and L4 checksums. A non-first fragment has
/// no ports and no L4 checksum: only its address changes.
#[inline(always)]
fn rewrite(b: &Bounds, p: &Packet, be: &BackendEntry, addr: bool) -> Result<(), Reason> {
    let addr = addr && be.addr != p.dst && is_v4_mapped(&be.addr) != p.v6;
    if p.frag == FRAG_LATER {
        if addr {
            set_dst(b, p, &be.addr, 0)?;
        }
        return Ok(());
    }
    let udp = p.proto == PROTO_UDP;
    let check: *mut u16 = b.ptr_at(p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF })?;
    let ports: *mut Ports = b.ptr_at(p.l4_off)?;
    let old_csum = unsafe { *check };
    // An IPv4 UDP checksum of zero means "none": leave it so.
    let has_csum = !(udp && old_csum == 0 && !p.v6);
    let new_port = be.port.to_be();
    let mut c = csum::replace16(old_csum, p.dport, new_port);
    unsafe { (*ports).dst = new_port };
    if addr {
        c = set_dst(b, p, &be.addr, c)?;
    }
    if has_csum {
        unsafe { *check = if udp && c == 0 { 0xffff } else { c } };
    }
    Ok(())
}

/// Sets the destination address (fixing the IPv4 header checksum) and
/// returns the L4 checksum `c` updated for the pseudo-header change.
#[inline(always)]
fn set_dst(b: &Bounds, p: &Packet, to: &Addr, c: u16) -> Result<u16, Reason> {
    if p.v6 {
        let ip: *mut Ipv6Hdr = b.ptr_at(p.l3_off)?;
        unsafe { (*ip).dst = *to };
        Ok(csum::replace128(c, &p.dst, to))
    } else {
        let ip: *mut Ipv4Hdr = b.ptr_at(p.l3_off)?;
        let (old, new) = (p.dst[3], to[3]);
        unsafe {
            (*ip).check = csum::replace32((*ip).check, old, new);
            (*ip).dst = new;
        }
        Ok(csum::replace32(c, old, new))
    }
}

/// `nat` forwarding: the backend is another host. Destination address and
/// port become the backend's (the client's address stays), and the frame
/// goes to the next hop (`nexthop::find`: the daemon's cache, else the
/// FIB). Without a neighbour entry for the next hop the rewritten packet
/// goes to the stack (`fib_no_neigh`, passed), which forwards it and
/// resolves the neighbour for the packets after it.
#[inline(always)]
pub fn nat(
    ctx: &XdpContext,
    b: &Bounds,
    p: &Packet,
    id: u32,
    be: &BackendEntry,
) -> Result<u32, Fail> {
    let hop = match nexthop::find(ctx, b, p, id, be) {
        Ok(hop) => hop,
        Err(Reason::FibNoNeigh) => {
            rewrite(b, p, be, true)?;
            return Err(Fail::Pass(Reason::FibNoNeigh));
        }
        Err(r) => return Err(Fail::Drop(r)),
    };
    let action = egress(ctx, &hop)?;
    rewrite(b, p, be, true)?;
    set_macs(b, &hop)?;
    Ok(action)
}

/// `dsr` forwarding: the backend holds the service address itself; only the
/// MAC addresses change, and its replies go straight to the client. Every
/// failure drops: passed, the packet would reach the local service address.
#[inline(always)]
pub fn dsr(
    ctx: &XdpContext,
    b: &Bounds,
    p: &Packet,
    id: u32,
    be: &BackendEntry,
) -> Result<u32, Fail> {
    let hop = nexthop::find(ctx, b, p, id, be).map_err(Fail::Drop)?;
    let action = egress(ctx, &hop)?;
    set_macs(b, &hop)?;
    Ok(action)
}

/// Where a frame leaves for its next hop: egress interface and MACs.
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[repr(C, align(8))]
struct Aligned8<T>(T);
const _: () = assert!(size_of::<bpf_fib_lookup>() % 8 == 0);

/// Asks the kernel's FIB for the next hop towards `to`: egress interface
/// and MAC addresses. Reads the packet, changes nothing. The per-packet
/// path asks only when `LB_NEXTHOPS` has no usable entry (`nexthop`).
#[inline(always)]
pub fn fib(ctx: &XdpContext, b: &Bounds, p: &Packet, to: &Addr) -> Result<Hop, Reason> {
    // Zeroed by eight volatile word stores: a plain zeroing is merged into
    // a `memset`, which the BPF backend turns into a call to a byte loop
    // (64 iterations on every FIB lookup).
    let mut fib = MaybeUninit::<Aligned8<bpf_fib_lookup>>::uninit();
    let words = fib.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<bpf_fib_lookup>() / 8 {
        // SAFETY: within the 8-aligned 64 bytes of `fib`.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte is zero, a valid `bpf_fib_lookup`.
    let fib = unsafe { &mut (*fib.as_mut_ptr()).0 };
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
    // The helper call these modes need: where does the backend live?
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut c_void,
            fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc {
        r if r == BPF_FIB_LKUP_RET_SUCCESS as i64 => Ok(Hop {
            ifindex: fib.ifindex,
            smac: fib.smac,
            dmac: fib.dmac,
        }),
        r if r == BPF_FIB_LKUP_RET_NO_NEIGH as i64 => Err(Reason::FibNoNeigh),
        _ => Err(Reason::FibFail),
    }
}

/// The action that sends the frame out of the FIB's egress interface:
/// `XDP_TX` when it is the one the frame came in on, else `XDP_REDIRECT`
/// through `LB_TX_PORTS`. The redirect target is set here, before the frame
/// is touched (it is sent only after the program returns), and an egress
/// missing from the devmap drops it unchanged.
#[inline(always)]
pub fn egress(ctx: &XdpContext, hop: &Hop) -> Result<u32, Fail> {
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(XDP_TX);
    }
    LB_TX_PORTS
        .redirect(hop.ifindex, XDP_DROP as u64)
        .map_err(|_| Fail::Drop(Reason::NoTxPort))
}

#[inline(always)]
pub fn set_macs(b: &Bounds, hop: &Hop) -> Result<(), Reason> {
    let eth: *mut EthHdr = b.ptr_at(0)?;
    unsafe {
        (*eth).dst = hop.dmac;
        (*eth).src = hop.smac;
    }
    Ok(())
}
