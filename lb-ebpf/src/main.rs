//! The balancer's kernel side: an XDP program that sends service packets to
//! a backend picked by Maglev (or its TC ingress twin, `tc`), and a TC
//! egress program that turns replies from local backends back into replies
//! from the service.
#![no_std]
#![no_main]

mod csum;
mod frags;
mod icmp;
mod maps;
mod nat;
mod nexthop;
mod parse;
mod quic;
mod select;
mod stats;
mod tc;

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    AddrKey, BackendEntry, FWD_DSR, FWD_LOCAL, FWD_NAT, PROTO_UDP, REV_HAS_ADDRS, REV_PORT_ONLY,
    Reason, ServiceEntry, port_slot,
};

use crate::{
    maps::{LB_REV_ADDRS, LB_REV_PORTS},
    parse::{Bounds, FRAG_FIRST, FRAG_LATER, Packet, TCP_CHECK_OFF, UDP_CHECK_OFF},
    stats::Fail,
};

#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let action = match balance(&ctx, &b) {
        Ok(action) => action,
        Err(fail) => fail.count(),
    };
    stats::action(action);
    action
}

#[inline(always)]
fn balance(ctx: &XdpContext, b: &Bounds) -> Result<u32, Fail> {
    let l3 = parse::ip(b, true)?;
    let p = match parse::ports(b, &l3, true) {
        Ok(p) => p,
        // Off the TCP/UDP path: an ICMP error may be about a service's flow.
        Err(Reason::NotTcpUdp) if icmp::is_icmp(&l3) => return icmp::error(ctx, b, &l3),
        Err(r) => return Err(r.into()),
    };
    if p.frag == FRAG_LATER {
        return later_fragment(ctx, b, &p);
    }
    let (id, svc) = select::service(&p)?;
    refuse_vlan(&p, svc)?;
    let pick = quic::pick(ctx, b, &p, id, svc)?;
    if p.frag == FRAG_FIRST {
        frags::remember(&p, id, pick.backend);
    }
    let action = forward(ctx, b, &p, svc, pick.backend, pick.entry)?;
    stats::forwarded(id, pick.backend, b.len(), pick.new_flow);
    Ok(action)
}

/// A non-first fragment goes where its first fragment went.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, b: &Bounds, p: &Packet) -> Result<u32, Fail> {
    let r = frags::recall(p)?;
    refuse_vlan(p, r.svc)?;
    let action = forward(ctx, b, p, r.svc, r.backend, r.entry)?;
    stats::forwarded(r.service, r.backend, b.len(), false);
    Ok(action)
}

/// `nat` and `dsr` send frames out of another interface or back out, where
/// the tag they came with may mean nothing (or another network): refused.
#[inline(always)]
fn refuse_vlan(p: &Packet, svc: &ServiceEntry) -> Result<(), Fail> {
    if p.vlan && svc.forwarding != FWD_LOCAL {
        return Err(Fail::Drop(Reason::VlanTagged));
    }
    Ok(())
}

#[inline(always)]
fn forward(
    ctx: &XdpContext,
    b: &Bounds,
    p: &Packet,
    svc: &ServiceEntry,
    id: u32,
    be: &BackendEntry,
) -> Result<u32, Fail> {
    match svc.forwarding {
        FWD_LOCAL => {
            nat::local(b, p, be)?;
            Ok(XDP_PASS)
        }
        FWD_NAT => nat::nat(ctx, b, p, id, be),
        FWD_DSR => nat::dsr(ctx, b, p, id, be),
        _ => Err(Reason::NoBackend.into()),
    }
}

/// BPF_F_MARK_MANGLED_0: keep a zero IPv4 UDP checksum zero.
const BPF_F_MARK_MANGLED_0: u64 = 32;

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    // Whatever happens, the packet goes on: a reply that cannot be rewritten
    // is still better delivered than dropped.
    let _ = reverse(&ctx);
    TC_ACT_OK as i32
}

/// Rewrites a reply leaving from a local backend's port back to the service
/// address and port.
#[inline(always)]
fn reverse(ctx: &TcContext) -> Result<(), Reason> {
    let bounds = |ctx: &TcContext| Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let p = match parse::parse(&bounds(ctx), false) {
        // Headers outside the linear data: pull them in and look again.
        Err(Reason::Truncated) if ctx.len() > 14 => {
            ctx.pull_data(ctx.len().min(128))
                .map_err(|_| Reason::Truncated)?;
            parse::parse(&bounds(ctx), false)?
        }
        r => r?,
    };
    // Ports (and the L4 checksum) are in the first fragment only.
    if p.frag == FRAG_LATER {
        return Err(Reason::FragmentUnknown);
    }
    let sport = u16::from_be(p.sport);
    let entry = LB_REV_PORTS
        .get(port_slot(sport, p.proto))
        .ok_or(Reason::NoService)?;
    if entry.flags == 0 {
        return Err(Reason::NoService);
    }
    let mut new_port = entry.service_port;
    let mut new_addr = None;
    if entry.flags & REV_HAS_ADDRS != 0 {
        let key = AddrKey {
            addr: p.src,
            port: sport,
            proto: p.proto,
            _pad: 0,
        };
        match unsafe { LB_REV_ADDRS.get(&key) } {
            Some(v) => {
                new_port = v.port;
                new_addr = Some(v.addr);
            }
            None if entry.flags & REV_PORT_ONLY == 0 => return Err(Reason::NoService),
            None => {}
        }
    }
    // Only replies of balanced flows: the host's own connections from a
    // backend port, and traffic it forwards, leave untouched.
    let fwd = parse::Packet {
        l3_off: p.l3_off,
        l4_off: p.l4_off,
        v6: p.v6,
        proto: p.proto,
        src: p.dst,
        dst: new_addr.unwrap_or(p.src),
        sport: p.dport,
        dport: new_port.to_be(),
        tcp_flags: 0,
        vlan: p.vlan,
        frag: p.frag,
        frag_id: p.frag_id,
    };
    if !select::answers(&fwd, sport, &p.src) {
        return Err(Reason::NoService);
    }
    let udp = p.proto == PROTO_UDP;
    let csum_off = p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
    let fail = |_| Reason::BadHeader;
    let new_sport = new_port.to_be();
    ctx.l4_csum_replace(csum_off, p.sport as u64, new_sport as u64, 2 | mangled)
        .map_err(fail)?;
    ctx.store(p.l4_off, &new_sport, 0).map_err(fail)?;
    if let Some(addr) = new_addr {
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        if p.v6 {
            for i in 0..4 {
                ctx.l4_csum_replace(csum_off, p.src[i] as u64, addr[i] as u64, pseudo)
                    .map_err(fail)?;
            }
            ctx.store(p.l3_off + 8, &addr, 0).map_err(fail)?;
        } else {
            ctx.l4_csum_replace(csum_off, p.src[3] as u64, addr[3] as u64, pseudo)
                .map_err(fail)?;
            ctx.l3_csum_replace(p.l3_off + 10, p.src[3] as u64, addr[3] as u64, 4)
                .map_err(fail)?;
            ctx.store(p.l3_off + 12, &addr[3], 0).map_err(fail)?;
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
