//! Source addresses for health probes. In `dsr` the balancer holds each
//! service address itself, and the kernel may prefer it as the source of a
//! probe; a backend holds the same address on its loopback and answers
//! itself, so the probe never completes. Probes whose preferred source is a
//! service address are bound to another address of the host instead.
use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    sync::{Mutex, OnceLock},
};

use tracing::{info, warn};

/// One address of this host: the interface it is on and the address (with
/// its scope id for IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    pub interface: String,
    pub addr: SocketAddr,
}

/// Every address of the calling thread's network namespace (getifaddrs).
pub fn host_addresses() -> io::Result<Vec<HostAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(a) = ifa.address else { continue };
        let addr = if let Some(sin) = a.as_sockaddr_in() {
            SocketAddr::new(IpAddr::V4(sin.ip()), 0)
        } else if let Some(sin6) = a.as_sockaddr_in6() {
            SocketAddr::V6(SocketAddrV6::new(sin6.ip(), 0, 0, sin6.scope_id()))
        } else {
            continue;
        };
        out.push(HostAddr {
            interface: ifa.interface_name,
            addr,
        });
    }
    Ok(out)
}

/// The source address the kernel would give a connection to `backend`:
/// the local address of a connected UDP socket (no packet is sent).
pub fn kernel_source(backend: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any)?;
    s.connect(backend)?;
    Ok(s.local_addr()?.ip())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Among `host`, an address to send probes to `backend` from instead of
/// `preferred` (a service address): same family, not a service address,
/// loopback or link-local only when the backend is, and on the interface
/// of `preferred` if one is there.
pub fn alternative(
    backend: SocketAddr,
    preferred: IpAddr,
    avoid: &HashSet<IpAddr>,
    host: &[HostAddr],
) -> Option<SocketAddr> {
    let fits = |a: &HostAddr| {
        let ip = a.addr.ip();
        ip.is_ipv4() == backend.is_ipv4()
            && !avoid.contains(&ip)
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && (!ip.is_loopback() || backend.ip().is_loopback())
            && (!is_link_local(ip) || is_link_local(backend.ip()))
    };
    let interface = host
        .iter()
        .find(|a| a.addr.ip() == preferred)
        .map(|a| a.interface.as_str());
    let mut candidates: Vec<&HostAddr> = host.iter().filter(|a| fits(a)).collect();
    candidates.sort_by_key(|a| Some(a.interface.as_str()) != interface);
    candidates.first().map(|a| a.addr)
}

/// The address to bind a probe to `backend` to, or `None` to let the
/// kernel choose: it would choose well, or there is nothing better (then a
/// warning, once per service address, says what to do).
pub fn probe_source(backend: SocketAddr, avoid: &HashSet<IpAddr>) -> Option<SocketAddr> {
    if avoid.is_empty() {
        return None;
    }
    let preferred = kernel_source(backend).ok()?;
    if !avoid.contains(&preferred) {
        return None;
    }
    let host = host_addresses().unwrap_or_default();
    let chosen = alternative(backend, preferred, avoid, &host);
    /// (service address, what was done about it) pairs already logged.
    type Told = Mutex<HashSet<(IpAddr, Option<SocketAddr>)>>;
    static TOLD: OnceLock<Told> = OnceLock::new();
    let first = TOLD
        .get_or_init(Default::default)
        .lock()
        .is_ok_and(|mut told| told.insert((preferred, chosen)));
    if first {
        if let Some(src) = chosen {
            info!(
                %backend,
                service_address = %preferred,
                source = %src.ip(),
                "health checks leave from another address: the kernel would use a service address, which backends answer themselves"
            );
        } else {
            warn!(
                %backend,
                service_address = %preferred,
                "health checks leave from the service address {preferred} (the kernel's choice) and the host has no other {} address to use: \
                 dsr backends hold that address and answer themselves, so they look down; add a non-service address to the interface towards the backends",
                if backend.is_ipv4() { "IPv4" } else { "IPv6" }
            );
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(list: &[(&str, &str)]) -> Vec<HostAddr> {
        list.iter()
            .map(|(i, a)| HostAddr {
                interface: i.to_string(),
                addr: SocketAddr::new(a.parse().unwrap(), 0),
            })
            .collect()
    }

    #[test]
    fn another_address_of_the_family_replaces_a_service_address() {
        let h = host(&[
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth1", "fd00:9::1"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00:204::100"),
            ("eth0", "fd00:204::1"),
            ("eth0", "10.0.0.1"),
        ]);
        let vip: IpAddr = "fd00:204::100".parse().unwrap();
        let avoid = HashSet::from([vip]);
        let b: SocketAddr = "[fd00:204::11]:443".parse().unwrap();
        // The same interface first, never loopback or link-local.
        assert_eq!(
            alternative(b, vip, &avoid, &h).map(|a| a.ip()),
            Some("fd00:204::1".parse().unwrap())
        );
        let only_vip = host(&[
            ("lo", "::1"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00:204::100"),
        ]);
        assert_eq!(alternative(b, vip, &avoid, &only_vip), None);
        // Another interface when that is all there is.
        let other = host(&[("eth0", "fd00:204::100"), ("eth1", "fd00:9::1")]);
        assert_eq!(
            alternative(b, vip, &avoid, &other).map(|a| a.ip()),
            Some("fd00:9::1".parse().unwrap())
        );
    }
}
