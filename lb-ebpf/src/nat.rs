//! Header rewrites towards a backend, with incremental checksum updates.
use lb_common::{BACKEND_REWRITE_ADDR, BackendEntry, PROTO_UDP, Reason, is_v4_mapped};

use crate::{
    csum,
    parse::{Bounds, Ipv4Hdr, Ipv6Hdr, Packet, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF},
};

/// `local` forwarding: the backend is a port on this host. The destination
/// port changes, and the address when the backend has its own; the packet
/// then goes up the stack (`XDP_PASS`).
#[inline(always)]
pub fn local(b: &Bounds, p: &Packet, be: &BackendEntry) -> Result<(), Reason> {
    let udp = p.proto == PROTO_UDP;
    let check: *mut u16 = b.ptr_at(p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF })?;
    let ports: *mut Ports = b.ptr_at(p.l4_off)?;
    let old_csum = unsafe { *check };
    // An IPv4 UDP checksum of zero means "none": leave it so.
    let has_csum = !(udp && old_csum == 0 && !p.v6);
    let new_port = be.port.to_be();
    let mut c = csum::replace16(old_csum, p.dport, new_port);
    unsafe { (*ports).dst = new_port };

    if be.flags & BACKEND_REWRITE_ADDR != 0 && be.addr != p.dst && is_v4_mapped(&be.addr) != p.v6 {
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
