//! End to end in network namespaces: a client namespace and a balancer
//! namespace joined by a veth, backends in the balancer namespace. Each
//! setup (direct, lb, nftables, HAProxy, nginx, Caddy) gets a fresh
//! topology and fresh backends, then the same phases: new HTTPS
//! connections per second (one short request each, full handshake), the
//! same with plain HTTP, latency at a fixed offered load (open loop, new
//! connection per request), one bulk download and one bulk upload.
//!
//! CPU: the client, the backends and the balancer's processes each run in
//! a CPU-accounting cgroup. Packet processing in softirq is charged to
//! whatever task was running (on a veth, mostly the sender), so the
//! balancer's cost cannot be read off its own processes alone (for lb and
//! nftables there is no process on the path at all). The balancer side's
//! CPU is therefore the whole experiment's CPU (client + backends +
//! balancer groups) for the work, minus what the direct setup used for the
//! same work. The balancer processes' own CPU, and for lb the run time of
//! its XDP and TC programs (kernel BPF statistics), are shown beside it.
use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Scale,
    load::{self, Backends, Outcome, Tls},
    peers::{self, Setup},
    report::{Report, Table, num, ratio},
    results::{
        Bulk, CpuSeconds, E2eId, E2eMetric, E2eRow, FigureId, HttpsCpu, Latency, LbVs, LoadPhase,
        SideCpu,
    },
    sys::{self, CpuGroup},
};
use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::{daemon::TempDir, netns::Topology};

/// CPU seconds of the three groups.
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: f64,
    backends: f64,
    balancer: f64,
    /// lb's XDP and TC programs, from the kernel's BPF run-time counters.
    programs: f64,
}

impl Cpu {
    /// For results.json.
    fn seconds(&self) -> CpuSeconds {
        CpuSeconds {
            client: self.client,
            backends: self.backends,
            balancer: self.balancer,
            lb_programs: self.programs,
        }
    }

    fn total(&self) -> f64 {
        self.client + self.backends + self.balancer
    }
    fn minus(&self, o: &Cpu) -> Cpu {
        Cpu {
            client: self.client - o.client,
            backends: self.backends - o.backends,
            balancer: self.balancer - o.balancer,
            programs: self.programs - o.programs,
        }
    }
}

struct Groups {
    client: Arc<CpuGroup>,
    backends: Arc<CpuGroup>,
    balancer: Arc<CpuGroup>,
}

impl Groups {
    fn new(tag: &str) -> Option<Groups> {
        Some(Groups {
            client: Arc::new(CpuGroup::new(&format!("{tag}-client"))?),
            backends: Arc::new(CpuGroup::new(&format!("{tag}-backends"))?),
            balancer: Arc::new(CpuGroup::new(&format!("{tag}-balancer"))?),
        })
    }
    fn read(&self, programs: &[u32]) -> Cpu {
        Cpu {
            client: self.client.cpu_seconds(),
            backends: self.backends.cpu_seconds(),
            balancer: self.balancer.cpu_seconds(),
            programs: program_seconds(programs),
        }
    }
}

/// Sum of the kernel's run time of the given BPF programs, in seconds.
fn program_seconds(ids: &[u32]) -> f64 {
    if ids.is_empty() {
        return 0.0;
    }
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| ids.contains(&p.id()))
        .map(|p| p.run_time().as_secs_f64())
        .sum()
}

/// Ids of the XDP program on `dev` and of the TC programs on its ingress
/// and egress. aya attaches TC programs as tcx links where the kernel has
/// them, which `tc filter show` does not list: those come from the kernel's
/// tcx query, the netlink (clsact) ones from `tc`.
pub(crate) fn attached_programs(ns: &str, dev: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(out) = Command::new("ip")
        .args(["-n", ns, "-j", "-d", "link", "show", dev])
        .output()
    {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v[0]["xdp"]["prog"]["id"].as_u64() {
            ids.push(id as u32);
        }
    }
    let tcx_dev = dev.to_string();
    ids.extend(lb_tests::netns::within(ns, move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .filter_map(|dir| SchedClassifier::query_tcx(&tcx_dev, dir).ok())
            .flat_map(|(_, progs)| progs.into_iter().map(|p| p.id()))
            .collect::<Vec<u32>>()
    }));
    for dir in ["ingress", "egress"] {
        if let Ok(out) = Command::new("tc")
            .args(["-n", ns, "-j", "filter", "show", "dev", dev, dir])
            .output()
        {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for f in v.as_array().into_iter().flatten() {
                if let Some(id) = f["options"]["prog"]["id"].as_u64() {
                    ids.push(id as u32);
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One measured phase: what it did and the CPU it took.
#[derive(Clone, Copy, Default)]
struct Phase {
    out: Outcome,
    cpu: Cpu,
}

#[derive(Default)]
struct Row {
    https: Phase,
    http: Phase,
    lat: Vec<f64>,
    lat_out: Outcome,
    bulk: Transfer,
    upload: Transfer,
}

/// A bulk phase: one connection moving data for the phase's length.
#[derive(Clone, Copy, Default)]
struct Transfer {
    phase: Phase,
    bps: f64,
    bytes: u64,
}

fn measure(setup: Setup, scale: &Scale, tls: &Tls) -> Result<Row, String> {
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("e2e-lb");
    let cl_ns = topo.namespace("e2e-cl");
    topo.veth(
        (&lb_ns, "lb0", &[&format!("{}/24", peers::SERVICE)]),
        (&cl_ns, "cl0", &[&format!("{}/24", peers::CLIENT)]),
    );
    for ns in [&lb_ns, &cl_ns] {
        for kv in [
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
            "net.core.somaxconn=8192",
        ] {
            lb_tests::netns::run_in(ns, &["sysctl", "-qw", kv]);
        }
    }
    let groups = Groups::new(setup.id()).ok_or("no CPU accounting cgroup on this machine")?;
    let dir = TempDir::new(&format!("bench-{}", setup.id()));
    let backends = Backends::start(
        &lb_ns,
        &peers::HTTP_PORTS,
        &peers::HTTPS_PORTS,
        tls,
        Some(groups.backends.clone()),
    );
    let running = peers::start(setup, &lb_ns, &cl_ns, &dir, tls, Some(&groups.balancer))?;
    // lb's programs: the kernel counts their run time while this is held.
    let (_stats, programs) = if setup.is_lb() {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        (fd, attached_programs(&lb_ns, "lb0"))
    } else {
        (None, Vec::new())
    };
    let (https_to, http_to) = setup.targets();
    let client = Some(groups.client.clone());
    // Warm up (ARP, caches, the peers' worker pools).
    load::closed_loop(
        &cl_ns,
        None,
        http_to,
        None,
        4,
        Duration::from_millis(200),
        u64::MAX,
    );

    let phase = |f: &dyn Fn() -> Outcome| {
        let before = groups.read(&programs);
        let out = f();
        Phase {
            out,
            cpu: groups.read(&programs).minus(&before),
        }
    };
    let conc = 16;
    let mut row = Row {
        https: phase(&|| {
            load::closed_loop(
                &cl_ns,
                client.clone(),
                https_to,
                Some(tls.client.clone()),
                conc,
                scale.phase,
                u64::MAX,
            )
        }),
        http: phase(&|| {
            load::closed_loop(
                &cl_ns,
                client.clone(),
                http_to,
                None,
                conc,
                scale.phase,
                u64::MAX,
            )
        }),
        ..Row::default()
    };
    let (lat, lat_out) = load::open_loop(
        &cl_ns,
        client.clone(),
        http_to,
        scale.latency_rate,
        scale.phase,
    );
    row.lat = lat;
    row.lat_out = lat_out;
    let transfer = |f: &dyn Fn() -> (f64, u64)| {
        let before = groups.read(&programs);
        let started = Instant::now();
        let (bps, bytes) = f();
        Transfer {
            phase: Phase {
                out: Outcome {
                    ok: 1,
                    errors: 0,
                    seconds: started.elapsed().as_secs_f64(),
                },
                cpu: groups.read(&programs).minus(&before),
            },
            bps,
            bytes,
        }
    };
    row.bulk = transfer(&|| load::bulk(&cl_ns, client.clone(), http_to, scale.phase));
    row.upload = transfer(&|| load::upload(&cl_ns, client.clone(), http_to, scale.phase));
    if row.https.out.ok == 0
        || row.http.out.ok == 0
        || row.lat.is_empty()
        || row.bulk.bytes == 0
        || row.upload.bytes == 0
    {
        return Err(format!(
            "{}: no successful requests (https {} ok/{} errors, http {}/{}, bulk {} bytes, upload {} bytes)",
            setup.id(),
            row.https.out.ok,
            row.https.out.errors,
            row.http.out.ok,
            row.http.out.errors,
            row.bulk.bytes,
            row.upload.bytes
        ));
    }
    let served = backends.served.load(std::sync::atomic::Ordering::Relaxed);
    if served < row.https.out.ok + row.http.out.ok {
        return Err(format!(
            "{}: the backends served {served} requests, fewer than the client's {}",
            setup.id(),
            row.https.out.ok + row.http.out.ok
        ));
    }
    drop(running);
    Ok(row)
}

/// The best of several measurements of one setup, figure by figure: the
/// fastest phases (with the CPU they took) and the lowest p99 latency.
fn best(mut v: Vec<Row>) -> Row {
    let max_by = |v: &[Row], f: &dyn Fn(&Row) -> f64| {
        (0..v.len())
            .max_by(|a, b| f(&v[*a]).partial_cmp(&f(&v[*b])).unwrap())
            .unwrap()
    };
    let https = v[max_by(&v, &|r| r.https.out.rate())].https;
    let http = v[max_by(&v, &|r| r.http.out.rate())].http;
    let bulk = v[max_by(&v, &|r| r.bulk.bps)].bulk;
    let upload = v[max_by(&v, &|r| r.upload.bps)].upload;
    let l = max_by(&v, &|r| -sys::percentile(&r.lat, 99.0));
    let lat_out = v[l].lat_out;
    let lat = std::mem::take(&mut v[l].lat);
    Row {
        https,
        http,
        lat,
        lat_out,
        bulk,
        upload,
    }
}

fn us_per(cpu_s: f64, n: u64) -> f64 {
    cpu_s * 1e6 / n as f64
}

pub fn run(scale: &Scale, report: &mut Report) {
    let tls = Tls::new();
    let setups: Vec<Setup> = if scale.peers {
        Setup::ALL.to_vec()
    } else {
        vec![Setup::Direct, Setup::Lb, Setup::LbTc]
    };
    // Each pass measures every setup, in alternating order; each figure is
    // the best of the passes, since on a shared machine noise only slows.
    let mut samples: Vec<(Setup, Vec<Row>)> = Vec::new();
    for setup in setups {
        // A partial run still measures the direct setup: everything is
        // relative to it.
        if let Some(only) = &scale.setups
            && setup != Setup::Direct
            && !only.contains(&setup)
        {
            continue;
        }
        let missing = sys::ensure_packages(setup.packages());
        if !missing.is_empty() {
            report.skip(format!(
                "{}: could not install {}",
                setup.id(),
                missing.join(", ")
            ));
            continue;
        }
        samples.push((setup, Vec::new()));
    }
    for pass in 0..scale.e2e_passes {
        let order: Vec<usize> = if pass % 2 == 0 {
            (0..samples.len()).collect()
        } else {
            (0..samples.len()).rev().collect()
        };
        for i in order {
            let setup = samples[i].0;
            let t = Instant::now();
            match measure(setup, scale, &tls) {
                Ok(r) => {
                    println!(
                        "bench: e2e {} (pass {}) done in {:.0} s",
                        setup.id(),
                        pass + 1,
                        t.elapsed().as_secs_f64()
                    );
                    samples[i].1.push(r);
                }
                Err(e) => {
                    if setup == Setup::Direct || setup.is_lb() {
                        panic!("end to end, {}: {e}", setup.id());
                    }
                    report.skip(format!("{} (pass {}): {e}", setup.id(), pass + 1));
                }
            }
        }
    }
    let rows: Vec<(Setup, Row)> = samples
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| (s, best(v)))
        .collect();
    let direct = &rows
        .iter()
        .find(|(s, _)| *s == Setup::Direct)
        .expect("the direct setup ran")
        .1;
    let d_https = direct.https.cpu.total() / direct.https.out.ok as f64;
    let d_http = direct.http.cpu.total() / direct.http.out.ok as f64;
    let per_gb = |t: &Transfer| t.phase.cpu.total() * 1e3 / (t.bytes as f64 / 1e9);
    let (d_bulk, d_upload) = (per_gb(&direct.bulk), per_gb(&direct.upload));

    let mut perf = Table::new(
        format!(
            "End to end, client and balancer namespaces ({} s phases, best of {} passes; latency at {} new connections/s)",
            scale.phase.as_secs_f64(),
            scale.e2e_passes,
            scale.latency_rate
        ),
        &[
            "setup",
            "HTTPS conn/s",
            "x direct",
            "HTTP conn/s",
            "x direct",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "download Gbit/s",
            "x direct",
            "upload Gbit/s",
            "x direct",
            "errors",
        ],
    );
    let mut cpu_t = Table::new(
        "End to end, CPU: microseconds per connection (HTTPS, HTTP) and ms per GB (bulk download, upload)",
        &[
            "setup",
            "HTTPS all",
            "HTTPS balancer side",
            "HTTP all",
            "HTTP balancer side",
            "download all",
            "download balancer side",
            "upload all",
            "upload balancer side",
            "balancer processes, HTTPS",
            "lb programs, HTTPS",
        ],
    );
    let mut json_rows = Vec::new();
    for (setup, r) in &rows {
        let p50 = sys::percentile(&r.lat, 50.0);
        let p99 = sys::percentile(&r.lat, 99.0);
        let p999 = sys::percentile(&r.lat, 99.9);
        let https_rate = r.https.out.rate();
        let http_rate = r.http.out.rate();
        let gbps = r.bulk.bps * 8.0 / 1e9;
        let up_gbps = r.upload.bps * 8.0 / 1e9;
        let errors = r.https.out.errors + r.http.out.errors + r.lat_out.errors;
        perf.row(vec![
            setup.label().to_string(),
            num(https_rate),
            ratio(https_rate / direct.https.out.rate()),
            num(http_rate),
            ratio(http_rate / direct.http.out.rate()),
            num(p50),
            num(p99),
            num(p999),
            format!("{gbps:.2}"),
            ratio(r.bulk.bps / direct.bulk.bps),
            format!("{up_gbps:.2}"),
            ratio(r.upload.bps / direct.upload.bps),
            errors.to_string(),
        ]);
        let https_all = us_per(r.https.cpu.total(), r.https.out.ok);
        let http_all = us_per(r.http.cpu.total(), r.http.out.ok);
        let bulk_all = per_gb(&r.bulk);
        let upload_all = per_gb(&r.upload);
        let https_side = https_all - d_https * 1e6;
        let http_side = http_all - d_http * 1e6;
        let bulk_side = bulk_all - d_bulk;
        let upload_side = upload_all - d_upload;
        let procs = us_per(r.https.cpu.balancer, r.https.out.ok);
        let progs = us_per(r.https.cpu.programs, r.https.out.ok);
        let is_direct = *setup == Setup::Direct;
        let side = |v: f64| if is_direct { "-".to_string() } else { num(v) };
        cpu_t.row(vec![
            setup.label().to_string(),
            num(https_all),
            side(https_side),
            num(http_all),
            side(http_side),
            num(bulk_all),
            side(bulk_side),
            num(upload_all),
            side(upload_side),
            if is_direct { "-".into() } else { num(procs) },
            if setup.is_lb() {
                num(progs)
            } else {
                "-".into()
            },
        ]);
        use E2eMetric as M;
        let mut figures = vec![
            (M::HttpsConnPerS, https_rate),
            (M::HttpConnPerS, http_rate),
            (M::LatencyP50Us, p50),
            (M::LatencyP99Us, p99),
            (M::LatencyP999Us, p999),
            (M::BulkGbitPerS, gbps),
            (M::CpuUsPerHttpsConn, https_all),
            (M::CpuUsPerHttpConn, http_all),
            (M::CpuMsPerBulkGb, bulk_all),
            (M::UploadGbitPerS, up_gbps),
            (M::CpuMsPerUploadGb, upload_all),
        ];
        if !is_direct {
            figures.push((
                M::HttpsConnPerSXDirect,
                https_rate / direct.https.out.rate(),
            ));
            figures.push((M::BulkXDirect, r.bulk.bps / direct.bulk.bps));
            figures.push((M::UploadXDirect, r.upload.bps / direct.upload.bps));
        }
        for (metric, value) in figures {
            report.figure(FigureId::E2e(*setup, metric), value);
        }
        let phase = |p: &Phase, conn_per_s: f64| LoadPhase {
            ok: p.out.ok,
            errors: p.out.errors,
            seconds: p.out.seconds,
            conn_per_s,
            cpu_s: p.cpu.seconds(),
        };
        json_rows.push(E2eRow {
            id: E2eId(*setup),
            setup: *setup,
            label: setup.label(),
            https: phase(&r.https, https_rate),
            http: phase(&r.http, http_rate),
            latency: Latency {
                offered_per_s: scale.latency_rate,
                ok: r.lat_out.ok,
                errors: r.lat_out.errors,
                p50_us: p50,
                p99_us: p99,
                p999_us: p999,
            },
            bulk: Bulk {
                bytes: r.bulk.bytes,
                seconds: r.bulk.phase.out.seconds,
                gbit_per_s: gbps,
                cpu_s: r.bulk.phase.cpu.seconds(),
            },
            upload: Bulk {
                bytes: r.upload.bytes,
                seconds: r.upload.phase.out.seconds,
                gbit_per_s: up_gbps,
                cpu_s: r.upload.phase.cpu.seconds(),
            },
            cpu_us_per_https_conn: HttpsCpu {
                all: https_all,
                balancer_side: https_side,
                balancer_processes: procs,
                lb_programs: progs,
            },
            cpu_us_per_http_conn: SideCpu {
                all: http_all,
                balancer_side: http_side,
            },
            cpu_ms_per_bulk_gb: SideCpu {
                all: bulk_all,
                balancer_side: bulk_side,
            },
            cpu_ms_per_upload_gb: SideCpu {
                all: upload_all,
                balancer_side: upload_side,
            },
        });
    }
    perf.note(
        "conn/s: 16 client threads, each a new TCP connection with one request (HTTPS: a full \
         TLS 1.3 handshake with an ECDSA P-256 certificate, no resumption); latency: new \
         connections started at a fixed rate whatever the responses do (open loop), timed from \
         when each was due; download: one connection reading a response for the phase's \
         length; upload: one connection sending a chunked POST body for the phase's length, \
         which the backend reads and drops, timed until the backend's answer (the bytes it \
         read); every setup is measured in each pass (alternating order) and each figure is its best pass",
    );
    perf.note(
        "backends: 3 HTTPS and 3 HTTP listeners in the balancer namespace; TLS passes through \
         lb, nftables, HAProxy and nginx to the backends; Caddy has no layer-4 proxy in Debian's \
         package (2.6, no layer4 module), so it terminates TLS itself and speaks plain HTTP to \
         the backends",
    );
    cpu_t.note(
        "all: CPU of the client, backends and balancer processes, including the kernel work \
         (softirq) charged to them; balancer side: \"all\" minus the direct setup's for the same \
         work, i.e. everything the extra hop costs wherever it runs",
    );
    cpu_t.note(
        "balancer processes: the balancer's own cgroup (lb's daemon is idle on the data path); \
         lb programs: run time of lb's XDP and TC programs (kernel BPF statistics), already \
         inside \"all\"",
    );
    report.sections.e2e = json_rows;
    report.table(perf);
    report.table(cpu_t);

    // lb against each peer.
    if let Some((_, lb)) = rows.iter().find(|(s, _)| *s == Setup::Lb) {
        let mut t = Table::new(
            "lb relative to each setup (>1 means lb is better)",
            &[
                "vs",
                "HTTPS conn/s",
                "HTTP conn/s",
                "p99 latency",
                "download",
                "upload",
                "HTTPS CPU (all)",
            ],
        );
        for (setup, r) in rows.iter().filter(|(s, _)| *s != Setup::Lb) {
            if *setup == Setup::LbTc {
                continue;
            }
            let cpu_ratio = (r.https.cpu.total() / r.https.out.ok as f64)
                / (lb.https.cpu.total() / lb.https.out.ok as f64);
            let cells = [
                lb.https.out.rate() / r.https.out.rate(),
                lb.http.out.rate() / r.http.out.rate(),
                sys::percentile(&r.lat, 99.0) / sys::percentile(&lb.lat, 99.0),
                lb.bulk.bps / r.bulk.bps,
                lb.upload.bps / r.upload.bps,
                cpu_ratio,
            ];
            let mut row = vec![setup.label().to_string()];
            row.extend(cells.iter().map(|c| ratio(*c)));
            t.row(row);
            report.figure(FigureId::LbVs(*setup, LbVs::HttpsConnPerS), cells[0]);
            report.figure(FigureId::LbVs(*setup, LbVs::P99Latency), cells[2]);
            report.figure(FigureId::LbVs(*setup, LbVs::Bulk), cells[3]);
            report.figure(FigureId::LbVs(*setup, LbVs::Upload), cells[4]);
        }
        report.table(t);
    }
}
