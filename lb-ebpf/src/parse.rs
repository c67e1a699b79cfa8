//! Header parsing with bounds checks. `Bounds::ptr_at` is the only place that
//! turns an offset into a pointer; everything else works on what it returns.
use core::mem::size_of;

use lb_common::{
    Addr, MAX_IPV6_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason, is_v4_mapped, v4_mapped,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next: u8,
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
}

/// The first two bytes of every walkable IPv6 extension header.
#[repr(C)]
pub struct Ipv6Ext {
    pub next: u8,
    pub len: u8,
}

#[repr(C)]
pub struct Ipv6Frag {
    pub next: u8,
    pub _reserved: u8,
    pub frag_off: u16,
    pub id: u32,
}

/// Source and destination ports, common to TCP and UDP.
#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

#[repr(C)]
pub struct TcpHdr {
    pub src: u16,
    pub dst: u16,
    pub seq: u32,
    pub ack: u32,
    pub off_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub src: u16,
    pub dst: u16,
    pub len: u16,
    pub check: u16,
}

/// Offsets of the checksum fields inside the L4 headers.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;

/// The packet's bounds, from an XDP or TC context.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
}

impl Bounds {
    #[inline(always)]
    pub fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }

    /// A pointer to a `T` at `off`, or `Truncated` when the frame is shorter.
    #[inline(always)]
    pub fn ptr_at<T>(&self, off: usize) -> Result<*mut T, Reason> {
        if self.start + off + size_of::<T>() > self.end {
            return Err(Reason::Truncated);
        }
        Ok((self.start + off) as *mut T)
    }
}

/// What the balancer needs to know about a TCP or UDP packet.
pub struct Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub v6: bool,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Packet byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// The frame carries an 802.1Q/802.1ad tag.
    pub vlan: bool,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`. A later fragment has no
    /// ports (`sport`, `dport` and `tcp_flags` are 0).
    pub frag: u8,
    /// Fragment identification, packet byte order (IPv4: 16 bits widened);
    /// 0 when not a fragment.
    pub frag_id: u32,
}

/// Not a fragment (or an IPv6 atomic fragment: offset 0, no more).
pub const FRAG_NONE: u8 = 0;
/// Offset 0, more fragments follow: has the ports.
pub const FRAG_FIRST: u8 = 1;
/// Offset > 0: no ports.
pub const FRAG_LATER: u8 = 2;

/// The IP layer of a frame: where its headers are and what it carries.
pub struct L3 {
    pub l3_off: usize,
    pub l4_off: usize,
    /// Where the IP datagram ends (the frame may carry padding past it).
    pub ip_end: usize,
    pub v6: bool,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub vlan: bool,
    pub frag: u8,
    pub frag_id: u32,
}

/// Parses Ethernet (one VLAN tag), IPv4 or IPv6, and the TCP or UDP ports.
/// Unknown protocols and short frames are errors: the caller passes them on
/// untouched. A non-first TCP or UDP fragment comes back without ports
/// (`frag == FRAG_LATER`); one of another protocol is `FragmentUnknown`.
/// `whole` also requires the IP datagram to be inside the frame; on TC
/// egress a GSO packet's IP length counts bytes that are not in the linear
/// data, so that check is left out there.
#[inline(always)]
pub fn parse(b: &Bounds, whole: bool) -> Result<Packet, Reason> {
    let l3 = ip(b, whole)?;
    ports(b, &l3, whole)
}

/// Parses Ethernet (one VLAN tag) and IPv4 or IPv6 with its extension
/// headers, up to the upper-layer protocol.
#[inline(always)]
pub fn ip(b: &Bounds, whole: bool) -> Result<L3, Reason> {
    let eth: *mut EthHdr = b.ptr_at(0)?;
    let mut proto = u16::from_be(unsafe { (*eth).proto });
    let mut l3_off = size_of::<EthHdr>();
    let vlan = proto == ETH_P_8021Q || proto == ETH_P_8021AD;
    if vlan {
        let tag: *mut VlanHdr = b.ptr_at(l3_off)?;
        proto = u16::from_be(unsafe { (*tag).proto });
        l3_off += size_of::<VlanHdr>();
    }
    match proto {
        ETH_P_IP => {
            let ip: *mut Ipv4Hdr = b.ptr_at(l3_off)?;
            let version_ihl = unsafe { (*ip).version_ihl };
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
                return Err(Reason::BadHeader);
            }
            // The whole datagram, options included, must be in the frame.
            let total = u16::from_be(unsafe { (*ip).tot_len }) as usize;
            if total < ihl {
                return Err(Reason::BadHeader);
            }
            if whole && b.start + l3_off + total > b.end {
                return Err(Reason::Truncated);
            }
            // Flags and offset: more fragments (0x2000), offset (0x1fff).
            let frag_off = u16::from_be(unsafe { (*ip).frag_off });
            let frag = if frag_off & 0x1fff != 0 {
                FRAG_LATER
            } else if frag_off & 0x2000 != 0 {
                FRAG_FIRST
            } else {
                FRAG_NONE
            };
            let frag_id = if frag == FRAG_NONE {
                0
            } else {
                u32::from(unsafe { (*ip).id })
            };
            let (s, d) = unsafe { ((*ip).src, (*ip).dst) };
            Ok(L3 {
                l3_off,
                l4_off: l3_off + ihl,
                ip_end: l3_off + total,
                v6: false,
                proto: unsafe { (*ip).proto },
                src: v4_mapped(s),
                dst: v4_mapped(d),
                vlan,
                frag,
                frag_id,
            })
        }
        ETH_P_IPV6 => {
            let ip: *mut Ipv6Hdr = b.ptr_at(l3_off)?;
            if unsafe { *(ip as *const u8) } >> 4 != 6 {
                return Err(Reason::BadHeader);
            }
            // An IPv4-mapped destination is not an IPv6 address anyone
            // serves; it must not reach IPv4 services.
            if is_v4_mapped(unsafe { &(*ip).dst }) {
                return Err(Reason::BadHeader);
            }
            let payload = u16::from_be(unsafe { (*ip).payload_len }) as usize;
            if whole && b.start + l3_off + size_of::<Ipv6Hdr>() + payload > b.end {
                return Err(Reason::Truncated);
            }
            let (next, off, frag, frag_id) =
                walk_ipv6_ext(b, unsafe { (*ip).next }, l3_off + size_of::<Ipv6Hdr>())?;
            let (s, d) = unsafe { ((*ip).src, (*ip).dst) };
            Ok(L3 {
                l3_off,
                l4_off: off,
                ip_end: l3_off + size_of::<Ipv6Hdr>() + payload,
                v6: true,
                proto: next,
                src: s,
                dst: d,
                vlan,
                frag,
                frag_id,
            })
        }
        _ => Err(Reason::NotIp),
    }
}

/// Reads the TCP or UDP ports (and TCP flags) above `l3`; a later fragment
/// comes back without them.
#[inline(always)]
pub fn ports(b: &Bounds, l3: &L3, whole: bool) -> Result<Packet, Reason> {
    let l4_off = l3.l4_off;
    let tcp_or_udp = l3.proto == PROTO_TCP || l3.proto == PROTO_UDP;
    let (sport, dport, tcp_flags) = if l3.frag == FRAG_LATER {
        // No ports here: the first fragment's pick decides (see `frags`).
        if !tcp_or_udp {
            return Err(Reason::FragmentUnknown);
        }
        (0, 0, 0)
    } else {
        match l3.proto {
            PROTO_TCP => {
                let tcp: *mut TcpHdr = b.ptr_at(l4_off)?;
                if whole && l4_off + size_of::<TcpHdr>() > l3.ip_end {
                    return Err(Reason::Truncated);
                }
                if unsafe { (*tcp).off_res } >> 4 < 5 {
                    return Err(Reason::BadHeader);
                }
                unsafe { ((*tcp).src, (*tcp).dst, (*tcp).flags) }
            }
            PROTO_UDP => {
                let udp: *mut UdpHdr = b.ptr_at(l4_off)?;
                if whole && l4_off + size_of::<UdpHdr>() > l3.ip_end {
                    return Err(Reason::Truncated);
                }
                unsafe { ((*udp).src, (*udp).dst, 0) }
            }
            _ => return Err(Reason::NotTcpUdp),
        }
    };
    Ok(Packet {
        l3_off: l3.l3_off,
        l4_off,
        v6: l3.v6,
        proto: l3.proto,
        src: l3.src,
        dst: l3.dst,
        sport,
        dport,
        tcp_flags,
        vlan: l3.vlan,
        frag: l3.frag,
        frag_id: l3.frag_id,
    })
}

/// Skips hop-by-hop, routing, destination-options and fragment headers, at
/// most `MAX_IPV6_EXT_HEADERS` of them. Returns the upper-layer protocol, its
/// offset, and the fragment kind and id. A non-first fragment stops the walk:
/// what follows its fragment header is payload.
#[inline(always)]
fn walk_ipv6_ext(b: &Bounds, mut next: u8, mut off: usize) -> Result<(u8, usize, u8, u32), Reason> {
    let mut frag = FRAG_NONE;
    let mut id = 0;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let ext: *mut Ipv6Ext = b.ptr_at(off)?;
                next = unsafe { (*ext).next };
                off += (unsafe { (*ext).len } as usize + 1) * 8;
            }
            44 => {
                let fh: *mut Ipv6Frag = b.ptr_at(off)?;
                // Offset (upper 13 bits), more fragments (bit 0).
                let fo = u16::from_be(unsafe { (*fh).frag_off });
                next = unsafe { (*fh).next };
                off += size_of::<Ipv6Frag>();
                if fo & 0xfff8 != 0 {
                    return Ok((next, off, FRAG_LATER, unsafe { (*fh).id }));
                }
                if fo & 1 != 0 {
                    frag = FRAG_FIRST;
                    id = unsafe { (*fh).id };
                }
            }
            _ => return Ok((next, off, frag, id)),
        }
    }
    match next {
        0 | 43 | 60 | 44 => Err(Reason::ExtHeaders),
        _ => Ok((next, off, frag, id)),
    }
}
