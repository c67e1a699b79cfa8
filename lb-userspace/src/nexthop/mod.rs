//! Next hops of backends on other hosts (`nat`, `dsr`): resolves each one's
//! egress interface and MAC addresses from the kernel's routes, neighbours
//! and links, and keeps `LB_NEXTHOPS` in step, on their change events and
//! every second, so the program needs no FIB lookup per packet.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    net::IpAddr,
    sync::{Mutex, Weak},
    time::{Duration, Instant},
};

use lb_common::NextHop;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::dataplane::{Dataplane, DataplaneError, MapWriter, NextHopWriter, monotonic_secs};
use crate::rtnl::{self, Link, Neighbour, Route, Rtnl};

/// How often every backend is resolved again (and its entry's stamp
/// refreshed) when no event asked sooner.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Least time between two passes, so a burst of events costs one.
const PASS_GAP: Duration = Duration::from_millis(50);
/// How often the loop looks whether backends changed.
const TICK: Duration = Duration::from_millis(100);

/// Neighbour states the FIB forwards with (NUD_VALID): REACHABLE, STALE,
/// DELAY, PROBE, NOARP, PERMANENT.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

#[derive(Debug, Error)]
pub enum NextHopError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] io::Error),
    #[error(transparent)]
    Map(#[from] DataplaneError),
}

/// A backend of a `nat` or `dsr` service, as the map writer holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteBackend {
    pub id: u32,
    pub generation: u32,
    pub addr: IpAddr,
}

/// What the kernel's tables said in one pass.
#[derive(Default)]
struct Tables {
    routes: HashMap<IpAddr, Option<Route>>,
    links: HashMap<u32, Link>,
    neighbours: HashMap<(u32, IpAddr), Neighbour>,
    /// `net.ipv4.ip_forward` / `net.ipv6.conf.all.forwarding`: the FIB
    /// refuses to forward without them, so the cache must too.
    forward_v4: bool,
    forward_v6: bool,
}

/// The entry for `b` from `t`, or why there is none. `now` is the stamp.
fn hop_of(b: &RemoteBackend, t: &Tables, now: u32) -> Result<NextHop, &'static str> {
    let forwarding = if b.addr.is_ipv4() {
        t.forward_v4
    } else {
        t.forward_v6
    };
    if !forwarding {
        return Err("forwarding is off");
    }
    let route = t
        .routes
        .get(&b.addr)
        .and_then(Option::as_ref)
        .ok_or("no route")?;
    if !route.unicast {
        return Err("not a unicast route");
    }
    if route.multipath {
        return Err("a multipath route (the FIB picks per flow)");
    }
    let oif = route.oif.ok_or("no output interface")?;
    let link = t.links.get(&oif).ok_or("output interface unknown")?;
    if !link.up {
        return Err("output interface down");
    }
    let smac = link.mac.ok_or("output interface has no MAC address")?;
    let via = route.gateway.unwrap_or(b.addr);
    let n = t.neighbours.get(&(oif, via)).ok_or("no neighbour entry")?;
    if n.state & NUD_USABLE == 0 {
        return Err("neighbour not resolved");
    }
    let dmac = n.lladdr.ok_or("neighbour without a link-layer address")?;
    Ok(NextHop {
        ifindex: oif,
        generation: b.generation,
        resolved: now,
        mtu: route.mtu.unwrap_or(link.mtu),
        smac,
        dmac,
    })
}

fn sysctl_on(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1")
}

/// Resolves backends and writes their entries. Its sockets and the map
/// handle belong to the network namespace it was opened in.
pub struct Resolver {
    rtnl: Rtnl,
    map: NextHopWriter,
    /// Entries written, by backend id, stamps aside.
    written: HashMap<u32, NextHop>,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub cached: usize,
    pub uncached: usize,
}

impl Resolver {
    pub fn open(dp: &Dataplane) -> Result<Self, NextHopError> {
        Ok(Self {
            rtnl: Rtnl::open()?,
            map: dp.next_hop_writer()?,
            written: HashMap::new(),
        })
    }

    fn tables(&mut self, backends: &[RemoteBackend]) -> Result<Tables, NextHopError> {
        let mut t = Tables {
            forward_v4: sysctl_on("/proc/sys/net/ipv4/ip_forward"),
            forward_v6: sysctl_on("/proc/sys/net/ipv6/conf/all/forwarding"),
            ..Tables::default()
        };
        if backends.is_empty() {
            return Ok(t);
        }
        let addrs: BTreeSet<IpAddr> = backends.iter().map(|b| b.addr).collect();
        for a in addrs {
            t.routes.insert(a, self.rtnl.route(a)?);
        }
        t.links = self.rtnl.links()?;
        t.neighbours = self.rtnl.neighbours()?;
        Ok(t)
    }

    /// Resolves every backend and writes its entry with a fresh stamp;
    /// clears the entries of backends that cannot be resolved now and of
    /// ids no longer in `backends`.
    pub fn refresh(&mut self, backends: &[RemoteBackend]) -> Result<PassReport, NextHopError> {
        let t = self.tables(backends)?;
        let now = monotonic_secs();
        let mut report = PassReport::default();
        let mut seen = BTreeSet::new();
        for b in backends {
            seen.insert(b.id);
            match hop_of(b, &t, now) {
                Ok(hop) => {
                    let old = self.written.get(&b.id).map(|o| NextHop {
                        resolved: now,
                        ..*o
                    });
                    if old != Some(hop) {
                        info!(
                            backend = %b.addr,
                            ifindex = hop.ifindex,
                            smac = %mac(hop.smac),
                            dmac = %mac(hop.dmac),
                            mtu = hop.mtu,
                            "next hop cached"
                        );
                    }
                    self.map.set(b.id, &hop)?;
                    self.written.insert(b.id, hop);
                    report.cached += 1;
                }
                Err(why) => {
                    if self.written.remove(&b.id).is_some() {
                        info!(backend = %b.addr, "next hop no longer cached: {why}; the FIB decides");
                        self.map.clear(b.id)?;
                    } else {
                        debug!(backend = %b.addr, "next hop not cached: {why}");
                    }
                    report.uncached += 1;
                }
            }
        }
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.written.remove(&id);
            self.map.clear(id)?;
        }
        Ok(report)
    }

    /// Clears every entry this resolver wrote.
    pub fn clear(&mut self) -> Result<(), NextHopError> {
        for id in std::mem::take(&mut self.written).into_keys() {
            self.map.clear(id)?;
        }
        Ok(())
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Resolves next hops on a thread of its own until the writer is dropped:
/// at once when a link, neighbour or route changes or the writer's remote
/// backends (or their generations) change, and every [`REFRESH_EVERY`] anyway. Sockets are opened
/// here, in the caller's network namespace.
pub fn spawn(writer: Weak<Mutex<MapWriter>>) -> Result<(), NextHopError> {
    let events = rtnl::Events::open()?;
    let mut resolver = {
        let Some(w) = writer.upgrade() else {
            return Ok(());
        };
        let g = crate::lock(&w);
        Resolver::open(g.dataplane())?
    };
    std::thread::Builder::new()
        .name("lb-nexthop".into())
        .spawn(move || {
            let mut last: Option<Instant> = None;
            let mut known: Vec<RemoteBackend> = Vec::new();
            let mut pending = true;
            let mut failing = false;
            loop {
                match events.wait(TICK) {
                    Ok(changed) => pending |= changed,
                    Err(e) => {
                        warn!("next-hop events: {e}; next hops follow changes only every second");
                        std::thread::sleep(TICK);
                    }
                }
                let Some(w) = writer.upgrade() else {
                    return;
                };
                let backends = crate::lock(&w).remote_backends();
                drop(w);
                // Backends (or their generations) changed: resolve now.
                pending |= backends != known;
                let due = last.is_none_or(|l| l.elapsed() >= REFRESH_EVERY);
                if !(due || (pending && last.is_none_or(|l| l.elapsed() >= PASS_GAP))) {
                    continue;
                }
                last = Some(Instant::now());
                pending = false;
                let result = resolver.refresh(&backends);
                known = backends;
                match result {
                    Ok(r) => {
                        if failing {
                            info!("next hops resolved again");
                        }
                        failing = false;
                        debug!(cached = r.cached, uncached = r.uncached, "next hops refreshed");
                    }
                    Err(e) => {
                        if !failing {
                            warn!(
                                "resolving next hops: {e}; packets use the FIB while cached entries go stale"
                            );
                        }
                        failing = true;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LB: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const BE: [u8; 6] = [2, 0, 0, 0, 0, 3];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tables() -> Tables {
        let route = |oif, gw: Option<&str>| Route {
            unicast: true,
            oif: Some(oif),
            gateway: gw.map(ip),
            mtu: None,
            multipath: false,
        };
        let n = |m, state| Neighbour {
            lladdr: Some(m),
            state,
        };
        Tables {
            routes: [
                (ip("10.0.1.5"), Some(route(3, None))),
                (ip("10.9.0.5"), Some(route(3, Some("10.0.1.1")))),
                (ip("fd00::5"), Some(route(4, None))),
                (ip("10.0.1.6"), Some(route(3, None))),
                (ip("10.0.1.7"), Some(route(3, None))),
                (ip("10.8.0.1"), None),
            ]
            .into_iter()
            .collect(),
            links: [
                (
                    3,
                    Link {
                        up: true,
                        mac: Some(LB),
                        mtu: 1500,
                    },
                ),
                (
                    4,
                    Link {
                        up: false,
                        mac: Some(LB),
                        mtu: 1500,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            neighbours: [
                ((3, ip("10.0.1.5")), n(BE, 0x02)),
                ((3, ip("10.0.1.1")), n(GW, 0x04)),
                ((3, ip("10.0.1.6")), n(BE, 0x01)), // INCOMPLETE
                ((4, ip("fd00::5")), n(BE, 0x80)),
            ]
            .into_iter()
            .collect(),
            forward_v4: true,
            forward_v6: true,
        }
    }

    fn be(addr: &str) -> RemoteBackend {
        RemoteBackend {
            id: 7,
            generation: 9,
            addr: ip(addr),
        }
    }

    #[test]
    fn on_link_backends_use_their_own_neighbour_entry() {
        let hop = hop_of(&be("10.0.1.5"), &tables(), 100).unwrap();
        assert_eq!(
            hop,
            NextHop {
                ifindex: 3,
                generation: 9,
                resolved: 100,
                mtu: 1500,
                smac: LB,
                dmac: BE,
            }
        );
    }

    #[test]
    fn backends_behind_a_gateway_use_the_gateway_entry() {
        let hop = hop_of(&be("10.9.0.5"), &tables(), 100).unwrap();
        assert_eq!((hop.ifindex, hop.dmac), (3, GW));
        let mut t = tables();
        t.routes
            .get_mut(&ip("10.9.0.5"))
            .unwrap()
            .as_mut()
            .unwrap()
            .mtu = Some(1280);
        assert_eq!(hop_of(&be("10.9.0.5"), &t, 100).unwrap().mtu, 1280);
    }

    #[test]
    fn what_the_fib_would_refuse_is_not_cached() {
        let t = tables();
        for (addr, why) in [
            ("10.0.1.6", "neighbour not resolved"),
            ("10.0.1.7", "no neighbour entry"),
            ("10.8.0.1", "no route"),
            ("fd00::5", "output interface down"),
            ("10.7.7.7", "no route"),
        ] {
            assert_eq!(hop_of(&be(addr), &t, 1), Err(why), "{addr}");
        }
        let mut t = tables();
        t.forward_v4 = false;
        assert_eq!(hop_of(&be("10.0.1.5"), &t, 1), Err("forwarding is off"));
        let mut t = tables();
        t.routes
            .get_mut(&ip("10.0.1.5"))
            .unwrap()
            .as_mut()
            .unwrap()
            .multipath = true;
        assert!(hop_of(&be("10.0.1.5"), &t, 1).is_err());
    }
}
