//! ICMP errors about balanced flows. A router that cannot deliver a reply
//! (fragmentation needed / packet too big, unreachable, time exceeded)
//! sends the error to the service address, quoting the reply's headers.
//! The flow the reply belongs to picks its backend exactly as the client's
//! next packet would, and the error is rewritten to look like it is about
//! what that backend sent, so path-MTU discovery works through the
//! balancer. Only protocol 1 / 58 packets that are not TCP/UDP come here.
use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use lb_common::{
    Addr, BACKEND_REWRITE_ADDR, BackendEntry, FWD_DSR, FWD_LOCAL, FWD_NAT, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason, ServiceEntry, is_v4_mapped, v4_mapped,
};

use crate::{
    csum, nat,
    parse::{
        Bounds, FRAG_NONE, Ipv4Hdr, Ipv6Hdr, L3, Packet, Ports, TCP_ACK, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
    select,
    stats::{self, Fail},
};

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    _code: u8,
    check: u16,
    _rest: u32,
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// The ICMP header before the quote, and the part of the quoted L4 header
/// every error carries (RFC 792): both ports.
const ICMP_HDR_LEN: usize = 8;
const QUOTED_L4_LEN: usize = 8;

/// The packet an error quotes: a reply from the service to a client.
struct Quote {
    l3_off: usize,
    l4_off: usize,
    proto: u8,
    /// The service address and port (packet byte order).
    src: Addr,
    sport: u16,
    /// The client.
    dst: Addr,
    dport: u16,
}

#[inline(always)]
pub fn is_icmp(l3: &L3) -> bool {
    l3.proto == if l3.v6 { PROTO_ICMPV6 } else { PROTO_ICMP }
}

/// The flow an ICMP error is about: its quote, service and backend.
pub struct Matched {
    q: Quote,
    pub id: u32,
    pub svc: &'static ServiceEntry,
    pub pick: select::Pick,
}

/// Finds the service flow an ICMP error quotes, and its backend. Echo and
/// other informational messages stay `NotTcpUdp`, as before.
#[inline(always)]
fn matched(b: &Bounds, l3: &L3) -> Result<Matched, Fail> {
    let icmp: *mut IcmpHdr = b.ptr_at(l3.l4_off).map_err(|_| Reason::NotTcpUdp)?;
    if l3.l4_off + ICMP_HDR_LEN > l3.ip_end {
        return Err(Reason::NotTcpUdp.into());
    }
    let kind = unsafe { (*icmp).kind };
    let is_error = if l3.v6 {
        kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PKT_TOOBIG || kind == ICMPV6_TIME_EXCEED
    } else {
        kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED
    };
    if !is_error {
        return Err(Reason::NotTcpUdp.into());
    }
    let q = quote(b, l3)?;
    // The flow as its client's packets name it; not a SYN, so a changed
    // slot's flow table answers as for the flow's next packet.
    let p = Packet {
        l3_off: q.l3_off,
        l4_off: q.l4_off,
        v6: l3.v6,
        proto: q.proto,
        src: q.dst,
        dst: q.src,
        sport: q.dport,
        dport: q.sport,
        tcp_flags: TCP_ACK,
        vlan: l3.vlan,
        frag: FRAG_NONE,
        frag_id: 0,
    };
    let (id, svc) = select::service(&p).map_err(|_| Reason::IcmpUnmatched)?;
    let pick = select::backend(&p, id, svc, false).map_err(|_| Reason::IcmpUnmatched)?;
    if svc.forwarding != FWD_LOCAL && l3.vlan {
        return Err(Fail::Drop(Reason::VlanTagged));
    }
    Ok(Matched { q, id, svc, pick })
}

/// Sends an ICMP error about a service's flow to that flow's backend.
#[inline(always)]
pub fn error(ctx: &XdpContext, b: &Bounds, l3: &L3) -> Result<u32, Fail> {
    let m = matched(b, l3)?;
    let (q, svc, pick, id) = (&m.q, m.svc, &m.pick, m.id);
    let be = pick.entry;
    let action = match svc.forwarding {
        FWD_LOCAL => {
            rewrite(b, l3, q, be, be.flags & BACKEND_REWRITE_ADDR != 0, false)?;
            XDP_PASS
        }
        // As for the flow's packets: the next hop first, nothing rewritten
        // before the egress is known.
        FWD_NAT => match nat::fib(ctx, b, &outer(l3), &be.addr) {
            Ok(hop) => {
                let action = nat::egress(ctx, &hop)?;
                rewrite(b, l3, q, be, true, true)?;
                nat::set_macs(b, &hop)?;
                action
            }
            Err(Reason::FibNoNeigh) => {
                rewrite(b, l3, q, be, true, true)?;
                return Err(Fail::Pass(Reason::FibNoNeigh));
            }
            Err(r) => return Err(Fail::Drop(r)),
        },
        FWD_DSR => {
            let hop = nat::fib(ctx, b, &outer(l3), &be.addr).map_err(Fail::Drop)?;
            let action = nat::egress(ctx, &hop)?;
            nat::set_macs(b, &hop)?;
            action
        }
        _ => return Err(Reason::IcmpUnmatched.into()),
    };
    stats::forwarded(id, pick.backend, b.len(), false);
    Ok(action)
}

/// The TC ingress program's `error`: a `local` service's flow only (the
/// daemon runs no `nat`/`dsr` service in TC mode). Every change is inside
/// the ICMP message and compensated in its checksum, so direct writes keep
/// a CHECKSUM_COMPLETE socket buffer's sum right. Returns the matched flow.
#[inline(always)]
pub fn error_local(b: &Bounds, l3: &L3) -> Result<Matched, Fail> {
    let m = matched(b, l3)?;
    if m.svc.forwarding != FWD_LOCAL {
        return Err(Fail::Drop(Reason::NoBackend));
    }
    let be = m.pick.entry;
    rewrite(b, l3, &m.q, be, be.flags & BACKEND_REWRITE_ADDR != 0, false)?;
    Ok(m)
}

/// The error's own headers, in the form the FIB lookup takes.
#[inline(always)]
fn outer(l3: &L3) -> Packet {
    Packet {
        l3_off: l3.l3_off,
        l4_off: l3.l4_off,
        v6: l3.v6,
        proto: l3.proto,
        src: l3.src,
        dst: l3.dst,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        vlan: l3.vlan,
        frag: FRAG_NONE,
        frag_id: 0,
    }
}

/// Reads the quoted IP header (same family as the error) and the first 8
/// bytes of its TCP/UDP header, all inside the error's datagram.
#[inline(always)]
fn quote(b: &Bounds, l3: &L3) -> Result<Quote, Reason> {
    let bad = |_| Reason::IcmpBadQuote;
    let in_off = l3.l4_off + ICMP_HDR_LEN;
    let (proto, l4_off, src, dst) = if l3.v6 {
        let ip: *mut Ipv6Hdr = b.ptr_at(in_off).map_err(bad)?;
        if unsafe { *(ip as *const u8) } >> 4 != 6 {
            return Err(Reason::IcmpBadQuote);
        }
        // Extension headers in a quote are not walked (replies carry
        // none): such a quote is not TCP/UDP here.
        (
            unsafe { (*ip).next },
            in_off + core::mem::size_of::<Ipv6Hdr>(),
            unsafe { (*ip).src },
            unsafe { (*ip).dst },
        )
    } else {
        let ip: *mut Ipv4Hdr = b.ptr_at(in_off).map_err(bad)?;
        let version_ihl = unsafe { (*ip).version_ihl };
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < core::mem::size_of::<Ipv4Hdr>() {
            return Err(Reason::IcmpBadQuote);
        }
        // A later fragment carries no ports.
        if u16::from_be(unsafe { (*ip).frag_off }) & 0x1fff != 0 {
            return Err(Reason::IcmpBadQuote);
        }
        let (s, d) = unsafe { ((*ip).src, (*ip).dst) };
        (
            unsafe { (*ip).proto },
            in_off + ihl,
            v4_mapped(s),
            v4_mapped(d),
        )
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::IcmpUnmatched);
    }
    let _: *mut [u8; QUOTED_L4_LEN] = b.ptr_at(l4_off).map_err(bad)?;
    if l4_off + QUOTED_L4_LEN > l3.ip_end {
        return Err(Reason::IcmpBadQuote);
    }
    let ports: *mut Ports = b.ptr_at(l4_off).map_err(bad)?;
    Ok(Quote {
        l3_off: in_off,
        l4_off,
        proto,
        src,
        sport: unsafe { (*ports).src },
        dst,
        dport: unsafe { (*ports).dst },
    })
}

/// Makes the quote read as the backend's own reply: its source port, and
/// its source address when `addr`; with `outer` (nat) the error itself is
/// addressed to the backend. Fixes the quoted IPv4 header checksum, the
/// quoted L4 checksum when the quote holds it, the outer IPv4 header
/// checksum and the ICMP checksum (for ICMPv6 its pseudo-header too).
#[inline(always)]
fn rewrite(
    b: &Bounds,
    l3: &L3,
    q: &Quote,
    be: &BackendEntry,
    addr: bool,
    outer: bool,
) -> Result<(), Reason> {
    let bad = |_| Reason::IcmpBadQuote;
    let icmp: *mut IcmpHdr = b.ptr_at(l3.l4_off).map_err(bad)?;
    let ports: *mut Ports = b.ptr_at(q.l4_off).map_err(bad)?;
    let udp = q.proto == PROTO_UDP;
    let check_off = q.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    let l4_check: Option<*mut u16> = if check_off + 2 <= l3.ip_end {
        b.ptr_at(check_off).ok()
    } else {
        None
    };
    let mut ic = unsafe { (*icmp).check };
    let old_l4c = match l4_check {
        Some(c) => unsafe { *c },
        None => 0,
    };
    // An IPv4 UDP checksum of zero means "none": leave it so.
    let has_l4c = l4_check.is_some() && !(udp && old_l4c == 0 && !l3.v6);

    let new_port = be.port.to_be();
    let mut l4c = csum::replace16(old_l4c, q.sport, new_port);
    ic = csum::replace16(ic, q.sport, new_port);
    unsafe { (*ports).src = new_port };

    let same_family = is_v4_mapped(&be.addr) != l3.v6;
    if addr && same_family && be.addr != q.src {
        if l3.v6 {
            let ip: *mut Ipv6Hdr = b.ptr_at(q.l3_off).map_err(bad)?;
            l4c = csum::replace128(l4c, &q.src, &be.addr);
            ic = csum::replace128(ic, &q.src, &be.addr);
            unsafe { (*ip).src = be.addr };
        } else {
            let ip: *mut Ipv4Hdr = b.ptr_at(q.l3_off).map_err(bad)?;
            let (old, new) = (q.src[3], be.addr[3]);
            let old_ipc = unsafe { (*ip).check };
            let new_ipc = csum::replace32(old_ipc, old, new);
            unsafe {
                (*ip).check = new_ipc;
                (*ip).src = new;
            }
            l4c = csum::replace32(l4c, old, new);
            ic = csum::replace32(ic, old, new);
            ic = csum::replace16(ic, old_ipc, new_ipc);
        }
    }
    if has_l4c {
        let new_l4c = if udp && l4c == 0 { 0xffff } else { l4c };
        if let Some(c) = l4_check {
            unsafe { *c = new_l4c };
        }
        ic = csum::replace16(ic, old_l4c, new_l4c);
    }
    if outer && same_family && be.addr != l3.dst {
        if l3.v6 {
            let ip: *mut Ipv6Hdr = b.ptr_at(l3.l3_off).map_err(bad)?;
            // ICMPv6 sums a pseudo-header with the destination in it.
            ic = csum::replace128(ic, &l3.dst, &be.addr);
            unsafe { (*ip).dst = be.addr };
        } else {
            let ip: *mut Ipv4Hdr = b.ptr_at(l3.l3_off).map_err(bad)?;
            unsafe {
                (*ip).check = csum::replace32((*ip).check, l3.dst[3], be.addr[3]);
                (*ip).dst = be.addr[3];
            }
        }
    }
    unsafe { (*icmp).check = ic };
    Ok(())
}
