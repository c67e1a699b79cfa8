//! TC ingress: the balancer on the socket buffer, for `local` services on
//! interfaces (veth, containers) where native XDP would cost GRO/GSO. The
//! same parse, service lookup, Maglev pick, pins and fragments as `lb_xdp`;
//! rewrites go through the skb helpers, which keep its checksum state right.
use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Addr, BACKEND_REWRITE_ADDR, BackendEntry, FWD_LOCAL, PROTO_UDP, Reason, ServiceEntry,
    is_v4_mapped,
};

use crate::{
    frags, icmp,
    parse::{self, Bounds, FRAG_FIRST, FRAG_LATER, L3, Packet, TCP_CHECK_OFF, UDP_CHECK_OFF},
    quic, select,
    stats::{self, Fail},
};

/// BPF_F_MARK_MANGLED_0: keep a zero IPv4 UDP checksum zero.
const BPF_F_MARK_MANGLED_0: u64 = 32;
/// BPF_F_RECOMPUTE_CSUM: bytes stored change a CHECKSUM_COMPLETE sum.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;
/// Headers that are not in the linear data are pulled in up to here: the
/// deepest the parser and an ICMP quote read.
const PULL_LEN: u32 = 128;

/// The counters' actions are XDP's: `XDP_PASS` counts `TC_ACT_OK` (up the
/// stack, rewritten or not), `XDP_DROP` counts `TC_ACT_SHOT`.
#[classifier]
#[inline(always)]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let action = match ingress(&ctx) {
        Ok(action) => action,
        Err(fail) => fail.count(),
    };
    stats::action(action);
    if action == XDP_DROP {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[inline(always)]
fn bounds(ctx: &TcContext) -> Bounds {
    Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

/// The IP layer and (for TCP/UDP) the ports. A GSO packet's IP length
/// counts bytes outside the linear data, so the datagram is checked against
/// the socket buffer's length instead of `b`.
#[inline(always)]
fn headers(b: &Bounds, skb_len: usize) -> Result<(L3, Result<Packet, Reason>), Reason> {
    let l3 = parse::ip(b, false)?;
    if l3.ip_end > skb_len {
        return Err(Reason::Truncated);
    }
    let p = parse::ports(b, &l3, true);
    if let Err(Reason::Truncated) = p {
        return Err(Reason::Truncated);
    }
    Ok((l3, p))
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Result<u32, Fail> {
    let skb_len = ctx.len();
    let (b, l3, p) = match headers(&bounds(ctx), skb_len as usize) {
        // Headers outside the linear data: pull them in and look again.
        Err(Reason::Truncated) if bounds(ctx).len() < u64::from(skb_len) => {
            ctx.pull_data(skb_len.min(PULL_LEN))
                .map_err(|_| Reason::Truncated)?;
            let b = bounds(ctx);
            let (l3, p) = headers(&b, skb_len as usize)?;
            (b, l3, p)
        }
        r => {
            let (l3, p) = r?;
            (bounds(ctx), l3, p)
        }
    };
    let p = match p {
        Ok(p) => p,
        // Off the TCP/UDP path: an ICMP error may be about a service's flow.
        Err(Reason::NotTcpUdp) if icmp::is_icmp(&l3) => {
            let m = icmp::error_local(&b, &l3)?;
            stats::forwarded(m.id, m.pick.backend, u64::from(skb_len), false);
            return Ok(XDP_PASS);
        }
        Err(r) => return Err(r.into()),
    };
    if p.frag == FRAG_LATER {
        let r = frags::recall(&p)?;
        local(ctx, &p, r.svc, r.entry)?;
        stats::forwarded(r.service, r.backend, u64::from(skb_len), false);
        return Ok(XDP_PASS);
    }
    let (id, svc) = select::service(&p)?;
    if svc.forwarding != FWD_LOCAL {
        return Err(Fail::Drop(Reason::NoBackend));
    }
    let pick = quic::pick(&quic::NoDecrypt, &b, &p, id, svc)?;
    if p.frag == FRAG_FIRST {
        frags::remember(&p, id, pick.backend);
    }
    local(ctx, &p, svc, pick.entry)?;
    stats::forwarded(id, pick.backend, u64::from(skb_len), pick.new_flow);
    Ok(XDP_PASS)
}

/// `local` forwarding on the socket buffer: the destination port becomes
/// the backend's, and the address too when the backend has its own. The
/// checksum helpers handle CHECKSUM_PARTIAL (a local sender's GSO packet:
/// only the pseudo-header part changes) and CHECKSUM_COMPLETE alike. Only
/// `local` services run in TC mode (the daemon refuses the others).
#[inline(always)]
fn local(ctx: &TcContext, p: &Packet, svc: &ServiceEntry, be: &BackendEntry) -> Result<(), Fail> {
    if svc.forwarding != FWD_LOCAL {
        return Err(Fail::Drop(Reason::NoBackend));
    }
    let addr =
        be.flags & BACKEND_REWRITE_ADDR != 0 && be.addr != p.dst && is_v4_mapped(&be.addr) != p.v6;
    let fail = |_| Fail::Pass(Reason::BadHeader);
    if p.frag == FRAG_LATER {
        // No ports and no L4 checksum in this fragment.
        if addr {
            set_dst(ctx, p, &be.addr, None).map_err(fail)?;
        }
        return Ok(());
    }
    let udp = p.proto == PROTO_UDP;
    let csum_off = p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
    let new_port = be.port.to_be();
    ctx.l4_csum_replace(csum_off, p.dport as u64, new_port as u64, 2 | mangled)
        .map_err(fail)?;
    ctx.store(p.l4_off + 2, &new_port, 0).map_err(fail)?;
    if addr {
        set_dst(ctx, p, &be.addr, Some((csum_off, mangled))).map_err(fail)?;
    }
    Ok(())
}

/// Sets the destination address, with the IPv4 header checksum and, given
/// `l4` (checksum offset, flags), the L4 checksum's pseudo-header part.
#[inline(always)]
fn set_dst(ctx: &TcContext, p: &Packet, to: &Addr, l4: Option<(usize, u64)>) -> Result<(), i64> {
    if p.v6 {
        if let Some((off, mangled)) = l4 {
            let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
            for i in 0..4 {
                ctx.l4_csum_replace(off, p.dst[i] as u64, to[i] as u64, flags)?;
            }
        }
        // The IPv6 header has no checksum of its own: a CHECKSUM_COMPLETE
        // sum must follow the address bytes.
        ctx.store(p.l3_off + 24, to, BPF_F_RECOMPUTE_CSUM)?;
    } else {
        if let Some((off, mangled)) = l4 {
            let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
            ctx.l4_csum_replace(off, p.dst[3] as u64, to[3] as u64, flags)?;
        }
        // The header checksum moves opposite to the address: the header's
        // sum, and so a CHECKSUM_COMPLETE one, stays the same.
        ctx.l3_csum_replace(p.l3_off + 10, p.dst[3] as u64, to[3] as u64, 4)?;
        ctx.store(p.l3_off + 16, &to[3], 0)?;
    }
    Ok(())
}
