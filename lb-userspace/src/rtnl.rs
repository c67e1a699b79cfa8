//! Just enough rtnetlink for the next-hop resolver (the route to one
//! address, dumps of links and neighbours, a socket that wakes on their
//! changes) and for the attach mode `auto` picks (an interface's kind).
//! Fixed headers and attributes are encoded and decoded here by hand, as
//! `links.rs` does, over rustix sockets.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    time::Duration,
};

use rustix::{
    io::Errno,
    net::{self, netlink::SocketAddrNetlink, sockopt},
};

// From <linux/netlink.h> and <linux/rtnetlink.h>.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const RTM_F_FIB_MATCH: u32 = 0x2000;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_METRICS: u16 = 8;
const RTA_MULTIPATH: u16 = 9;
const RTA_VIA: u16 = 18;
const RTA_NH_ID: u16 = 30;
const RTAX_MTU: u16 = 2;
const RTN_UNICAST: u8 = 1;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Multicast groups, as the bitmask of `bind` (RTNLGRP_LINK = 1,
/// RTNLGRP_NEIGH = 3, RTNLGRP_IPV4_ROUTE = 7, RTNLGRP_IPV6_ROUTE = 11).
const GROUPS: u32 = 1 | (1 << 2) | (1 << 6) | (1 << 10);
const NLMSG_HDR: usize = 16;

/// What the routing table says about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `rtm_type`: only unicast routes forward.
    pub unicast: bool,
    pub oif: Option<u32>,
    /// The next hop; `None` when the destination is on-link.
    pub gateway: Option<IpAddr>,
    /// The route's MTU (a metric or a learned path MTU), if it has one.
    pub mtu: Option<u32>,
    /// The route has several next hops (or a next-hop object): the FIB
    /// picks one per flow, so no single cached hop stands for it.
    pub multipath: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub lladdr: Option<[u8; 6]>,
    /// `ndm_state` (NUD_*).
    pub state: u16,
}

/// A NETLINK_ROUTE socket for requests, bound in the network namespace of
/// the thread that opened it.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

fn socket() -> io::Result<OwnedFd> {
    Ok(net::socket_with(
        net::AddressFamily::NETLINK,
        net::SocketType::RAW,
        net::SocketFlags::CLOEXEC,
        None, // NETLINK_ROUTE
    )?)
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let fd = socket()?;
        net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        // A kernel that never answers cannot hang the resolver.
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(2)))?;
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request and collects the payloads of its answers (type,
    /// bytes after the netlink header) until the dump ends or, without
    /// `dump`, the first answer.
    fn request(&mut self, kind: u16, dump: bool, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = NLMSG_HDR + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        net::sendto(
            &self.fd,
            &msg,
            net::SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) = net::recv(&self.fd, &mut buf[..], net::RecvFlags::empty())?;
            for (kind, mseq, payload) in messages(&buf[..n.min(buf.len())]) {
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => {
                        out.push((kind, payload.to_vec()));
                        if !dump {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }

    /// The route the kernel takes to `to` (`ip route get`), with whether
    /// the FIB entry it comes from has several next hops. `None`: no route
    /// (unreachable, prohibited, no entry).
    pub fn route(&mut self, to: IpAddr) -> io::Result<Option<Route>> {
        let Some(mut route) = self.get_route(to, 0)? else {
            return Ok(None);
        };
        if let Some(entry) = self.get_route(to, RTM_F_FIB_MATCH)? {
            route.multipath = entry.multipath;
        }
        Ok(Some(route))
    }

    fn get_route(&mut self, to: IpAddr, flags: u32) -> io::Result<Option<Route>> {
        let (family, addr) = family_bytes(to);
        // struct rtmsg { family, dst_len, src_len, tos, table, protocol,
        // scope, type, flags: u32 }
        let mut body = vec![family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&flags.to_ne_bytes());
        attr(&mut body, RTA_DST, &addr);
        let answers = match self.request(RTM_GETROUTE, false, &body) {
            Ok(a) => a,
            Err(e) => match Errno::from_io_error(&e) {
                // The socket's own trouble (a timeout, no memory).
                None | Some(Errno::AGAIN | Errno::NOBUFS | Errno::NOMEM | Errno::INTR) => {
                    return Err(e);
                }
                // The kernel's answer: no route, unreachable, prohibit, ...
                Some(_) => return Ok(None),
            },
        };
        Ok(answers
            .iter()
            .find(|(k, _)| *k == RTM_NEWROUTE)
            .and_then(|(_, p)| parse_route(p)))
    }

    /// Every link: up or not, its MAC address and MTU, by ifindex.
    pub fn links(&mut self) -> io::Result<HashMap<u32, Link>> {
        // struct ifinfomsg { family, pad, type: u16, index: i32, flags, change }
        let body = [0u8; 16];
        let mut links = HashMap::new();
        for (kind, p) in self.request(RTM_GETLINK, true, &body)? {
            if kind != RTM_NEWLINK || p.len() < 16 {
                continue;
            }
            let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            let flags = u32::from_ne_bytes([p[8], p[9], p[10], p[11]]);
            let mut link = Link {
                up: flags & IFF_UP != 0,
                mac: None,
                mtu: 0,
            };
            for (t, v) in attrs(&p[16..]) {
                match t {
                    IFLA_ADDRESS => link.mac = v.try_into().ok(),
                    IFLA_MTU => link.mtu = u32_of(v).unwrap_or(0),
                    _ => {}
                }
            }
            links.insert(index, link);
        }
        Ok(links)
    }

    /// The kind of link `index` (`IFLA_INFO_KIND`: `veth`, `bridge`, ...),
    /// `None` for one without (a physical device).
    pub fn link_kind(&mut self, index: u32) -> io::Result<Option<String>> {
        // struct ifinfomsg, with the index asked for.
        let mut body = [0u8; 16];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        Ok(self
            .request(RTM_GETLINK, false, &body)?
            .iter()
            .find(|(k, _)| *k == RTM_NEWLINK)
            .and_then(|(_, p)| kind_of(p)))
    }

    /// Every neighbour entry of both families, by (ifindex, address).
    pub fn neighbours(&mut self) -> io::Result<HashMap<(u32, IpAddr), Neighbour>> {
        // struct ndmsg { family, pad1, pad2: u16, ifindex: i32, state: u16,
        // flags, type }
        let body = [AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut out = HashMap::new();
        for (kind, p) in self.request(RTM_GETNEIGH, true, &body)? {
            if kind != RTM_NEWNEIGH || p.len() < 12 {
                continue;
            }
            let family = p[0];
            let ifindex = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            let state = u16::from_ne_bytes([p[8], p[9]]);
            let mut dst = None;
            let mut lladdr = None;
            for (t, v) in attrs(&p[12..]) {
                match t {
                    NDA_DST => dst = ip_of(family, v),
                    NDA_LLADDR => lladdr = v.try_into().ok(),
                    _ => {}
                }
            }
            if let Some(dst) = dst {
                out.insert((ifindex, dst), Neighbour { lladdr, state });
            }
        }
        Ok(out)
    }
}

/// A socket subscribed to link, neighbour and route changes.
pub struct Events {
    fd: OwnedFd,
}

impl Events {
    pub fn open() -> io::Result<Self> {
        let fd = socket()?;
        net::bind(&fd, &SocketAddrNetlink::new(0, GROUPS))?;
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for messages; true if one announced a change
    /// of a link, neighbour or route (or some were lost).
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, Some(timeout))?;
        let mut buf = vec![0u8; 64 * 1024];
        match net::recv(&self.fd, &mut buf[..], net::RecvFlags::empty()) {
            Ok((n, _)) => Ok(messages(&buf[..n.min(buf.len())]).any(|(k, _, _)| {
                matches!(
                    k,
                    RTM_NEWLINK
                        | RTM_DELLINK
                        | RTM_NEWROUTE
                        | RTM_DELROUTE
                        | RTM_NEWNEIGH
                        | RTM_DELNEIGH
                )
            })),
            Err(Errno::NOBUFS) => Ok(true),
            Err(Errno::INTR | Errno::AGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn family_bytes(ip: IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    }
}

fn ip_of(family: u8, v: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => <[u8; 4]>::try_from(v)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        AF_INET6 => <[u8; 16]>::try_from(v)
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// Appends one attribute (struct rtattr { len: u16, type: u16 }, padded).
fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (align4(len) - len), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The netlink messages of a datagram: (type, sequence, payload).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDR {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let payload = &buf[NLMSG_HDR..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, seq, payload))
    })
}

/// The attributes in `buf`: (type without the nested/byte-order flags, value).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        let value = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, value))
    })
}

/// The kind of interface `iface` in the calling thread's network
/// namespace, or `None` when it has none (a physical device) or cannot be
/// asked.
pub fn link_kind(iface: &str) -> Option<String> {
    let index = nix::net::if_::if_nametoindex(iface).ok()?;
    Rtnl::open().ok()?.link_kind(index).ok()?
}

/// `IFLA_INFO_KIND` inside `IFLA_LINKINFO` of an RTM_NEWLINK payload
/// (struct ifinfomsg, then attributes).
fn kind_of(p: &[u8]) -> Option<String> {
    let linkinfo = attrs(p.get(16..)?).find(|(t, _)| *t == IFLA_LINKINFO)?.1;
    let name = attrs(linkinfo).find(|(t, _)| *t == IFLA_INFO_KIND)?.1;
    let name = name.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

/// An RTM_NEWROUTE payload (struct rtmsg, then attributes).
fn parse_route(p: &[u8]) -> Option<Route> {
    if p.len() < 12 {
        return None;
    }
    let family = p[0];
    let mut route = Route {
        unicast: p[7] == RTN_UNICAST,
        oif: None,
        gateway: None,
        mtu: None,
        multipath: false,
    };
    for (t, v) in attrs(&p[12..]) {
        match t {
            RTA_OIF => route.oif = u32_of(v),
            RTA_GATEWAY => route.gateway = ip_of(family, v),
            // A gateway of the other family: not a hop this cache keeps.
            RTA_VIA => route.unicast = false,
            RTA_MULTIPATH | RTA_NH_ID => route.multipath = true,
            RTA_METRICS => {
                for (m, mv) in attrs(v) {
                    if m == RTAX_MTU {
                        route.mtu = u32_of(mv).filter(|m| *m > 0);
                    }
                }
            }
            _ => {}
        }
    }
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtmsg(family: u8, kind: u8) -> Vec<u8> {
        vec![family, 32, 0, 0, 254, 3, 0, kind, 0, 0, 0, 0]
    }

    #[test]
    fn routes_are_read_from_their_attributes() {
        let mut p = rtmsg(AF_INET, RTN_UNICAST);
        attr(&mut p, RTA_DST, &[10, 0, 0, 5]);
        attr(&mut p, RTA_OIF, &7u32.to_ne_bytes());
        attr(&mut p, RTA_GATEWAY, &[10, 0, 0, 1]);
        let mut metrics = Vec::new();
        attr(&mut metrics, RTAX_MTU, &1280u32.to_ne_bytes());
        attr(&mut p, RTA_METRICS | 0x8000, &metrics);
        assert_eq!(
            parse_route(&p),
            Some(Route {
                unicast: true,
                oif: Some(7),
                gateway: Some("10.0.0.1".parse().unwrap()),
                mtu: Some(1280),
                multipath: false,
            })
        );
        let mut m = rtmsg(AF_INET6, RTN_UNICAST);
        attr(&mut m, RTA_MULTIPATH, &[0; 8]);
        let r = parse_route(&m).unwrap();
        assert!(r.multipath && r.gateway.is_none() && r.oif.is_none());
        // Blackhole (6): no forwarding route.
        assert!(!parse_route(&rtmsg(AF_INET, 6)).unwrap().unicast);
        assert_eq!(parse_route(&[0; 4]), None);
    }

    #[test]
    fn loopback_has_no_kind() {
        assert_eq!(link_kind("lo"), None);
        assert_eq!(link_kind("no-such-if0"), None);
    }

    #[test]
    fn the_kind_is_read_from_the_nested_link_info() {
        // struct ifinfomsg, IFLA_MTU, then IFLA_LINKINFO { IFLA_INFO_KIND }.
        let mut p = vec![0u8; 16];
        attr(&mut p, IFLA_MTU, &1500u32.to_ne_bytes());
        let mut info = Vec::new();
        attr(&mut info, IFLA_INFO_KIND, b"veth\0");
        attr(&mut p, IFLA_LINKINFO | 0x8000, &info);
        assert_eq!(kind_of(&p).as_deref(), Some("veth"));
        assert_eq!(kind_of(&p[..16]), None);
    }

    #[test]
    fn a_bad_length_ends_the_walk() {
        let mut two = Vec::new();
        attr(&mut two, 1, &[1, 2, 3]);
        attr(&mut two, 2, &[4; 6]);
        let got: Vec<_> = attrs(&two).collect();
        assert_eq!(got, vec![(1, &[1u8, 2, 3][..]), (2, &[4u8; 6][..])]);
        let bogus = [2u8, 0, 1, 0, 9, 9];
        assert_eq!(attrs(&bogus).count(), 0);
        assert_eq!(messages(&[0u8; 15]).count(), 0);
    }
}
