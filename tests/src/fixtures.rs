//! The fixtures the tests share: service specs, a map writer on a freshly
//! loaded data plane, and where the active table sends a flow.
use std::net::IpAddr;

use lb_common::MaglevSlot;
use lb_userspace::dataplane::{
    AdminState, BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec,
    addr_words,
};

/// A flow's key as the daemon names it (and pin reports carry it), for
/// either family.
pub fn flow_key(f: &crate::packet::Spec) -> lb_common::FlowKey {
    let p = crate::packet::parse(&f.build()).unwrap();
    lb_common::FlowKey {
        src: addr_words(p.src),
        dst: addr_words(p.dst),
        sport: p.sport.to_be(),
        dport: p.dport.to_be(),
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// The data plane options of the fixture tests: small tables.
pub fn options() -> Options {
    Options {
        max_services: 4,
        flow_table_size: 65_536,
        ..Options::default()
    }
}

/// A service with backends of weight 100 in the given admin states: the one
/// builder of service specs the tests share.
pub fn service_spec(
    name: &str,
    listen: &str,
    protocols: &[Protocol],
    forwarding: Forwarding,
    backends: &[(&str, AdminState)],
) -> ServiceSpec {
    ServiceSpec {
        when_all_down: Default::default(),
        name: name.into(),
        listen: listen.parse().unwrap(),
        protocols: protocols.to_vec(),
        forwarding,
        backends: backends
            .iter()
            .map(|(a, state)| {
                let mut b = BackendSpec::new(a.parse().unwrap(), 100);
                b.state = *state;
                b
            })
            .collect(),
    }
}

/// A `local` service of `protocols` with backends in the given states.
pub fn service_in_states(
    name: &str,
    listen: &str,
    protocols: &[Protocol],
    backends: &[(&str, AdminState)],
) -> ServiceSpec {
    service_spec(name, listen, protocols, Forwarding::Local, backends)
}

/// A TCP and UDP service forwarding with `forwarding` to active backends.
pub fn forwarded_service(
    name: &str,
    listen: &str,
    forwarding: Forwarding,
    backends: &[&str],
) -> ServiceSpec {
    let backends: Vec<(&str, AdminState)> =
        backends.iter().map(|b| (*b, AdminState::Active)).collect();
    service_spec(
        name,
        listen,
        &[Protocol::Tcp, Protocol::Udp],
        forwarding,
        &backends,
    )
}

/// A `local` TCP and UDP service with active backends of weight 100.
pub fn service(name: &str, listen: &str, backends: &[&str]) -> ServiceSpec {
    forwarded_service(name, listen, Forwarding::Local, backends)
}

/// SYNs of `n` client flows to 10.0.0.1:443, each from its own address
/// (10.1.x.y) and port (20000 + i).
pub fn client_flows(n: u16) -> Vec<crate::packet::Spec> {
    (0..n)
        .map(|i| {
            let src = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            crate::packet::Spec::tcp(&src, "10.0.0.1", 20000 + i, 443, crate::packet::TCP_SYN)
        })
        .collect()
}

/// A service of five backends, 127.0.0.1:8001-8005, on port 443.
pub fn five_backends() -> ServiceSpec {
    service(
        "web",
        "0.0.0.0:443",
        &[
            "127.0.0.1:8001",
            "127.0.0.1:8002",
            "127.0.0.1:8003",
            "127.0.0.1:8004",
            "127.0.0.1:8005",
        ],
    )
}

/// A map writer serving `services` on a data plane of its own.
pub fn writer(services: &[ServiceSpec]) -> MapWriter {
    crate::require_root();
    let dp = Dataplane::load(options()).expect("the eBPF object loads and verifies");
    let mut w = MapWriter::new(dp);
    w.apply(services).expect("services apply");
    w
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The active table's slot for a flow (addresses and ports as the client
/// sends them), by the hash the program runs.
pub fn slot_of(
    w: &MapWriter,
    svc: &ServiceSpec,
    addrs: (IpAddr, IpAddr),
    ports: (u16, u16),
    proto: u8,
) -> MaglevSlot {
    slot_by(w.dataplane().flow_hash(), w, svc, addrs, ports, proto)
}

/// [`slot_of`] by `hash`, whichever the program runs.
pub fn slot_by(
    hash: lb_common::FlowHash,
    w: &MapWriter,
    svc: &ServiceSpec,
    (src, dst): (IpAddr, IpAddr),
    (sport, dport): (u16, u16),
    proto: u8,
) -> MaglevSlot {
    let h = hash.hash(
        &addr_words(src),
        &addr_words(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    );
    let id = w.service_id(&svc.name).unwrap();
    let (_, table) = w.dataplane().active_table(id).unwrap();
    table[lb_common::maglev_slot(h, table.len() as u32) as usize]
}

/// The port of backend `id` of `svc`.
pub fn backend_port(w: &MapWriter, svc: &ServiceSpec, id: u32) -> u16 {
    svc.backends
        .iter()
        .find(|b| w.backend_id(&svc.name, b.address) == Some(id))
        .map(|b| b.address.port())
        .unwrap_or_else(|| panic!("backend id {id} is not in service {}", svc.name))
}

/// Installs the service's active table again with every change made
/// `secs` older, as if that much time had passed since.
pub fn age_table(w: &mut MapWriter, svc: &str, secs: u32) {
    restamp_table(w, svc, |changed| changed.wrapping_sub(secs));
}

/// Sets when each slot of `svc`'s active table changed to `stamp` of the
/// time it has.
pub fn restamp_table(w: &mut MapWriter, svc: &str, stamp: impl Fn(u32) -> u32) {
    let id = w.service_id(svc).unwrap();
    let restamped: Vec<MaglevSlot> = w
        .dataplane()
        .active_table(id)
        .unwrap()
        .1
        .iter()
        .map(|s| MaglevSlot {
            changed: stamp(s.changed),
            ..*s
        })
        .collect();
    w.dataplane_mut()
        .install_table(id, &restamped, lb_common::FWD_LOCAL)
        .unwrap();
}
