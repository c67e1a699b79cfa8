//! `cargo xtask bench`: the data plane's cost per packet through
//! `BPF_PROG_TEST_RUN` on the real object, next to a baseline program
//! measured in the same run (parse, swap MACs, `XDP_TX`).
//!
//! With `repeat`, the kernel runs the program again on the buffer the last
//! run left. Every case here is built so that buffer is the input again: the
//! service's backends listen on the service port itself (127.0.0.x:443), so
//! the rewrite writes the bytes that were there and every run takes the full
//! forwarding path. The proof is checked, not assumed: one run's output must
//! equal its input, and the service's packet counter must advance by
//! exactly the number of runs.
use std::{fs, time::Duration};

use aya::{Ebpf, TestRun, TestRunOptions, programs::Xdp};
use lb_tests::packet::{Spec, TCP_ACK, TCP_SYN};
use lb_userspace::dataplane::{
    BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec, addr_words,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

struct Case {
    name: String,
    ns: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn per_packet(d: Duration, repeat: u32) -> f64 {
    // The kernel reports the mean per run already.
    let _ = repeat;
    d.as_nanos() as f64
}

fn service(n: usize) -> ServiceSpec {
    ServiceSpec {
        name: "bench".into(),
        listen: "0.0.0.0:443".parse().unwrap(),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        forwarding: Forwarding::Local,
        backends: (0..n)
            .map(|i| {
                let addr = format!("127.0.{}.{}:443", i / 250, i % 250 + 1);
                BackendSpec::new(addr.parse().unwrap(), 100)
            })
            .collect(),
    }
}

struct Bench {
    repeat: u32,
    rounds: usize,
}

impl Bench {
    fn baseline(&self, frame: &[u8]) -> f64 {
        let mut ebpf = Ebpf::load(lb_userspace::BASELINE_OBJECT).expect("baseline object");
        let prog: &mut Xdp = ebpf.program_mut("baseline").unwrap().try_into().unwrap();
        prog.load().expect("baseline loads");
        let mut out = vec![0u8; frame.len() + 256];
        let mut samples = Vec::new();
        for _ in 0..self.rounds {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    repeat: self.repeat,
                    ..Default::default()
                })
                .expect("baseline test run");
            assert_eq!(r.return_value, XDP_TX, "baseline must transmit");
            samples.push(per_packet(r.duration, self.repeat));
        }
        median(samples)
    }

    /// Measures `frame` through the balancer; `forwarded` says whether it is
    /// a service packet (its counter must then move by every run).
    fn lb(&self, w: &MapWriter, frame: &[u8], forwarded: bool) -> f64 {
        let dp = w.dataplane();
        let (action, out) = dp.test_run_xdp(frame).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame, "the bench frame must come out as it went in");
        let id = w.service_id("bench").unwrap();
        let mut samples = Vec::new();
        for _ in 0..self.rounds {
            let before = dp.service_counters(id).unwrap().packets;
            let d = dp.bench_xdp(frame, self.repeat).unwrap();
            let after = dp.service_counters(id).unwrap().packets;
            let expected = if forwarded { self.repeat as u64 } else { 0 };
            assert_eq!(
                after - before,
                expected,
                "every measured run took the path it claims"
            );
            samples.push(per_packet(d, self.repeat));
        }
        median(samples)
    }
}

fn writer(n: usize) -> MapWriter {
    let dp = Dataplane::load(Options {
        max_services: 2,
        ..Options::default()
    })
    .expect("load the data plane");
    let mut w = MapWriter::new(dp);
    w.apply(&[service(n)]).unwrap();
    w
}

/// A TCP flow of the bench service whose Maglev slot changed in the last
/// table (so it goes through the flow table).
fn sticky_flow(w: &MapWriter) -> Spec {
    let id = w.service_id("bench").unwrap();
    let (_, table) = w.dataplane().active_table(id).unwrap();
    for sport in 1024..65535u16 {
        let spec = Spec::tcp("10.9.0.2", "10.9.0.1", sport, 443, TCP_ACK);
        let p = lb_tests::packet::parse(&spec.build()).unwrap();
        let h = lb_common::flow_hash(
            &addr_words(p.src),
            &addr_words(p.dst),
            p.sport.to_be(),
            p.dport.to_be(),
            6,
        );
        let s = table[(h % table.len() as u32) as usize];
        if s.backend != s.prev {
            return spec;
        }
    }
    panic!("no sticky slot found");
}

fn main() {
    lb_tests::require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let bench = Bench {
        repeat: if quick { 20_000 } else { 1_000_000 },
        rounds: if quick { 3 } else { 7 },
    };
    let syn4 = Spec::tcp("10.9.0.2", "10.9.0.1", 40000, 443, TCP_SYN).build();
    let mut cases = Vec::new();
    let floor = bench.baseline(&syn4);
    cases.push(Case {
        name: "baseline: parse, swap MACs, XDP_TX".into(),
        ns: floor,
    });

    let w = writer(3);
    for (name, xlated, verified) in w.dataplane().program_sizes() {
        println!(
            "program {name}: {xlated} instructions after the verifier's rewrites, {verified} verified"
        );
    }
    let est4 = Spec::tcp("10.9.0.2", "10.9.0.1", 40000, 443, TCP_ACK)
        .payload(&[0; 10])
        .build();
    let syn6 = Spec::tcp("fd00::2", "fd00::1", 40000, 443, TCP_SYN).build();
    let est6 = Spec::tcp("fd00::2", "fd00::1", 40000, 443, TCP_ACK).build();
    let udp4 = Spec::udp("10.9.0.2", "10.9.0.1", 40000, 443)
        .payload(&[0; 22])
        .build();
    let big4 = Spec::tcp("10.9.0.2", "10.9.0.1", 40000, 443, TCP_ACK)
        .payload(&[0; 1446])
        .build();
    let other = Spec::tcp("10.9.0.2", "10.9.0.1", 40000, 80, TCP_SYN).build();
    cases.push(Case {
        name: "lb: non-service packet (port 80)".into(),
        ns: bench.lb(&w, &other, false),
    });
    cases.push(Case {
        name: "lb: ipv4 tcp syn, 3 backends".into(),
        ns: bench.lb(&w, &syn4, true),
    });
    cases.push(Case {
        name: "lb: ipv4 tcp established, 3 backends".into(),
        ns: bench.lb(&w, &est4, true),
    });
    cases.push(Case {
        name: "lb: ipv6 tcp syn, 3 backends".into(),
        ns: bench.lb(&w, &syn6, true),
    });
    cases.push(Case {
        name: "lb: ipv6 tcp established, 3 backends".into(),
        ns: bench.lb(&w, &est6, true),
    });
    cases.push(Case {
        name: "lb: ipv4 udp, 3 backends".into(),
        ns: bench.lb(&w, &udp4, true),
    });
    cases.push(Case {
        name: "lb: ipv4 tcp 1500-byte frame".into(),
        ns: bench.lb(&w, &big4, true),
    });
    for n in [100, 1000] {
        let w = writer(n);
        cases.push(Case {
            name: format!("lb: ipv4 tcp established, {n} backends"),
            ns: bench.lb(&w, &est4, true),
        });
    }
    // A slot that changed: the flow is pinned in the LRU flow table.
    let mut w = writer(3);
    let mut more = service(4);
    more.backends.truncate(4);
    w.apply(&[more]).unwrap();
    let pinned = sticky_flow(&w).build();
    cases.push(Case {
        name: "lb: ipv4 tcp established, changed slot (flow table hit)".into(),
        ns: bench.lb(&w, &pinned, true),
    });

    println!(
        "\nper-packet cost through BPF_PROG_TEST_RUN ({} runs x {} rounds, median)",
        bench.repeat, bench.rounds
    );
    println!("{:<60} {:>9} {:>9}", "case", "ns/pkt", "x floor");
    let mut json = String::from("{\n  \"unit\": \"ns_per_packet\",\n  \"cases\": [\n");
    for (i, c) in cases.iter().enumerate() {
        println!("{:<60} {:>9.1} {:>9.2}", c.name, c.ns, c.ns / floor);
        json.push_str(&format!(
            "    {{\"name\": \"{}\", \"ns\": {:.1}, \"ratio_to_baseline\": {:.3}}}{}\n",
            c.name,
            c.ns,
            c.ns / floor,
            if i + 1 < cases.len() { "," } else { "" }
        ));
    }
    json.push_str("  ]\n}\n");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("results.json"), json).unwrap();
    println!("\nwritten to target/bench/results.json");
}
