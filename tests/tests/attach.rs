//! The data plane attached in native mode to a veth in a namespace of its
//! own, with real TCP connections from a client namespace to port 443 that
//! must reach both backend ports on the balancer's host.
use std::{collections::HashMap, net::SocketAddr};

use lb_tests::{
    netns::{self, Topology},
    servers::{EchoName, ask},
};
use lb_userspace::dataplane::{
    AttachMode, BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec,
};

#[test]
fn tcp_connections_to_443_reach_both_backend_ports() {
    let mut topo = Topology::new();
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    topo.veth(
        (&lb, "lb0", &["10.200.0.1/24", "fd00:200::1/64"]),
        (&client, "cl0", &["10.200.0.2/24", "fd00:200::2/64"]),
    );
    let servers = [
        EchoName::start(&lb, "[::]:8001".parse().unwrap(), "8001"),
        EchoName::start(&lb, "[::]:8002".parse().unwrap(), "8002"),
    ];

    let spec = ServiceSpec {
        when_all_down: Default::default(),
        name: "web".into(),
        listen: "0.0.0.0:443".parse().unwrap(),
        protocols: vec![Protocol::Tcp],
        forwarding: Forwarding::Local,
        backends: vec![
            BackendSpec::new("127.0.0.1:8001".parse().unwrap(), 100),
            BackendSpec::new("127.0.0.1:8002".parse().unwrap(), 100),
        ],
    };
    let writer: MapWriter = netns::within(&lb, move || {
        let opts = Options {
            max_services: 2,
            flow_table_size: 65_536,
            ..Options::default()
        };
        let mut dp = Dataplane::load(opts).expect("load");
        dp.attach("lb0", AttachMode::Native)
            .expect("native XDP attach on a veth");
        let mut w = MapWriter::new(dp);
        // A wildcard serves one family: `[::]:443` for the IPv6 clients.
        let spec6 = ServiceSpec {
            name: "web6".into(),
            listen: "[::]:443".parse().unwrap(),
            ..spec.clone()
        };
        w.apply(&[spec, spec6]).expect("apply");
        w
    });

    let results: Vec<Result<String, String>> = netns::within(&client, || {
        let mut out = Vec::new();
        for i in 0..60 {
            let to: SocketAddr = if i % 3 == 0 {
                "[fd00:200::1]:443".parse().unwrap()
            } else {
                "10.200.0.1:443".parse().unwrap()
            };
            out.push(ask(to));
        }
        out
    });
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(name) => *per_backend.entry(name.clone()).or_default() += 1,
            Err(e) => panic!("connection {i} failed: {e}"),
        }
    }
    println!("connections per backend: {per_backend:?}");
    assert_eq!(per_backend.values().sum::<usize>(), 60);
    assert!(
        per_backend.get("8001").copied().unwrap_or(0) > 0,
        "8001 unused"
    );
    assert!(
        per_backend.get("8002").copied().unwrap_or(0) > 0,
        "8002 unused"
    );
    assert_eq!(servers[0].served() + servers[1].served(), 60);

    // The kernel counters saw every connection's SYN: 40 over IPv4 on
    // `web`, 20 over IPv6 on `web6`.
    let dp = writer.dataplane();
    let new_flows = |name: &str| {
        dp.service_counters(writer.service_id(name).unwrap())
            .unwrap()
            .new_flows
    };
    assert_eq!(
        (new_flows("web"), new_flows("web6")),
        (40, 20),
        "SYNs counted"
    );
    drop(writer);
    drop(servers);
}
