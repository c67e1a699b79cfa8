//! The bench never silently rots: a CI-sized run of `lb-bench --smoke`
//! (every section, no package from outside) must finish and write every
//! figure, each a finite number that can be one. Speed is not judged here.
use std::{collections::HashSet, process::Command, time::Instant};

use lb_tests::daemon::TempDir;
use serde_json::Value;

/// Figures every smoke run must write, one or more per measurement.
const REQUIRED: &[&str] = &[
    "per_packet/baseline/ipv4/64B/ns",
    "per_packet/baseline/ipv6/1514B/ns",
    "per_packet/ipv4/tcp_syn/64B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv4/tcp_established/64B/3_backends/clean_slot/empty_table/x_baseline",
    "per_packet/ipv4/udp/1514B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv6/tcp_established/74B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv6/non_service/1514B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv4/icmp_frag_needed/70B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv6/icmp_frag_needed/1294B/3_backends/clean_slot/empty_table/x_baseline",
    "per_packet/ipv4/tcp_established/64B/1000_backends/clean_slot/empty_table/ns",
    "per_packet/ipv4/tcp_established/64B/4_backends/clean_slot/full_table/ns",
    "per_packet/ipv4/tcp_established/64B/4_backends/sticky_slot_pinned/full_table/ns",
    "per_packet/ipv4/udp/64B/4_backends/sticky_slot_pinned/empty_table/ns",
    "per_packet/ipv4/tcp_syn/64B/4_backends/sticky_slot_insert/full_table/ns",
    "per_packet/ipv4/tcp_established/64B/3_backends/dsr/empty_table/ns",
    "per_packet/ipv4/tcp_established/64B/3_backends/nat/empty_table/ns",
    "per_packet/ipv4/quic_short_plaintext/64B/3_backends/clean_slot/empty_table/ns",
    "per_packet/ipv4/quic_short_encrypted_4pass/64B/3_backends/clean_slot/empty_table/x_baseline",
    "per_packet/repeat1_overhead/ns",
    "per_packet/harness/ns",
    "pps/baseline/udp_64B/pps",
    "pps/lb/udp_64B/pps",
    "pps/lb/non_service_64B/ns",
    "pps/lb/dsr_udp_64B/pps",
    "pps/lb/nat_udp_64B/ns",
    "pps/lb/dsr_udp_64B_2_cores/pps",
    "e2e/direct/https_conn_per_s",
    "e2e/lb/https_conn_per_s",
    "e2e/lb/http_conn_per_s",
    "e2e/lb/latency_p999_us",
    "e2e/lb/bulk_gbit_per_s",
    "e2e/lb/upload_gbit_per_s",
    "e2e/lb/cpu_ms_per_upload_gb",
    "e2e/lb-tc/upload_x_direct",
    "e2e/lb/cpu_us_per_https_conn",
    "e2e/lb_vs_direct/https_conn_per_s",
    "e2e/lb_vs_direct/upload",
    "control/maglev_build/10_backends/ms",
    "control/maglev_build/5000_backends/ms",
    "control/flows_moved/100_backends/remove/with_flow_table",
    "control/flows_moved/10_backends/add/without_flow_table",
    "control/death_to_table/median_ms",
    "control/deaths50/table_installs",
    "control/deaths50/verdict_to_install_ms",
    "control/daemon_rss/idle_mib",
    "control/daemon_rss/after_api_changes_mib",
];

/// The cluster section's figures (`--only cluster`; BIRD and etcd).
const REQUIRED_CLUSTER: &[&str] = &[
    "cluster/failover/median_ms",
    "cluster/failover/max_ms",
    "cluster/change_to_all_nodes/median_ms",
    "cluster/cpu/1_node/ns_per_packet",
    "cluster/cpu/3_nodes/ns_per_packet",
    "cluster/cpu/1_node/busiest_node_share",
    "cluster/cpu/3_nodes/busiest_node_share",
    "cluster/cpu/3_nodes/busiest_node_ms_per_s",
];

/// One bench run at a time: the figures of two at once would be each
/// other's noise.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `lb-bench --smoke` with `args` into `dir`: results.json, parsed.
fn smoke_run(dir: &TempDir, args: &[&str]) -> Value {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .arg("--smoke")
        .args(args)
        .arg("--out")
        .arg(&dir.0)
        .output()
        .expect("run lb-bench");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "lb-bench --smoke {args:?} failed:\n{log}"
    );
    println!("lb-bench --smoke {args:?} took {:?}", started.elapsed());
    let text = std::fs::read_to_string(dir.path("results.json")).expect("results.json written");
    let v: Value = serde_json::from_str(&text).expect("results.json is JSON");
    assert_eq!(v["meta"]["mode"], "smoke");
    v
}

/// Every figure's id once, with a unit and a finite value that can be one.
fn check_figures(v: &Value, required: &[&str]) {
    let figures = v["figures"].as_array().expect("a figures array");
    let mut ids = HashSet::new();
    for f in figures {
        let id = f["id"].as_str().expect("every figure has an id");
        assert!(ids.insert(id.to_string()), "figure {id} written twice");
        let unit = f["unit"].as_str().unwrap_or("");
        assert!(!unit.is_empty(), "figure {id} has no unit");
        let value = f["value"]
            .as_f64()
            .unwrap_or_else(|| panic!("figure {id} is not a finite number: {}", f["value"]));
        // A share of flows moved may be none; everything else is a
        // duration, a rate, a size or a ratio of two.
        if unit == "share" {
            assert!((0.0..=1.0).contains(&value), "figure {id} = {value}");
        } else {
            assert!(value > 0.0, "figure {id} = {value} {unit}");
        }
    }
    for id in required {
        assert!(ids.contains(*id), "figure {id} missing; written:\n{ids:#?}");
    }
}

#[test]
fn a_smoke_run_of_the_bench_writes_every_figure() {
    lb_tests::require_root();
    let dir = TempDir::new("bench-smoke");
    let v = smoke_run(&dir, &[]);
    assert!(v["meta"]["machine"]["cpus"].as_u64().unwrap_or(0) >= 1);
    check_figures(&v, REQUIRED);
    assert!(
        v["sections"].get("cluster").is_none(),
        "the cluster section runs only when asked for"
    );
    // lb's programs ran on every connection, in XDP and in TC mode alike
    // (TC programs attached as tcx links are found too).
    let e2e = v["sections"]["e2e"].as_array().expect("an e2e section");
    for setup in ["lb", "lb-tc"] {
        let row = e2e
            .iter()
            .find(|r| r["setup"] == setup)
            .unwrap_or_else(|| panic!("no e2e row for {setup}"));
        let progs = row["cpu_us_per_https_conn"]["lb_programs"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(
            progs > 0.0,
            "{setup}: lb programs' CPU {progs} us per HTTPS connection"
        );
    }
    // The report beside it has every table.
    let md = std::fs::read_to_string(dir.path("BENCHMARKS.md")).expect("BENCHMARKS.md written");
    for title in [
        "Per-packet cost",
        "Packets per second",
        "End to end",
        "Maglev table build",
        "Flows that change backend",
        "Daemon",
    ] {
        assert!(md.contains(title), "BENCHMARKS.md lacks {title:?}");
    }
    // The chart, where the machine has its font (the bench installs it
    // when it can).
    if std::path::Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() {
        assert!(
            dir.path("benchmarks.png").exists(),
            "benchmarks.png written"
        );
    }
}

/// `--only cluster`: the topology (router, 3 nodes with lb + BIRD +
/// etcd member), its figures written, and the load spread as it should be:
/// every node carries some of it with 3 announcing, node0 most of it alone.
#[test]
fn a_smoke_run_of_the_cluster_rows_writes_every_figure() {
    lb_tests::require_root();
    lb_tests::cluster::require_tool("bird", "bird2");
    lb_tests::etcd::require_etcd();
    let dir = TempDir::new("bench-smoke-cluster");
    let v = smoke_run(&dir, &["--only", "cluster"]);
    check_figures(&v, REQUIRED_CLUSTER);
    let cpu = v["sections"]["cluster"]["cpu"]
        .as_array()
        .expect("per-node CPU rows");
    let load = |announcing: u64, node: u64| {
        cpu.iter()
            .find(|r| r["nodes_announcing"] == announcing && r["node"] == node)
            .and_then(|r| r["load_packets"].as_u64())
            .unwrap_or_else(|| panic!("no row for node{node} with {announcing} announcing"))
    };
    for node in 0..3 {
        assert!(load(3, node) > 0, "node{node}: {cpu:?}");
    }
    assert!(
        load(1, 0) > 2 * (load(1, 1) + load(1, 2)),
        "node0 alone should carry the load: {cpu:?}"
    );
    let md = std::fs::read_to_string(dir.path("BENCHMARKS.md")).expect("BENCHMARKS.md written");
    for title in ["failover and change propagation", "data-plane CPU per node"] {
        assert!(md.contains(title), "BENCHMARKS.md lacks {title:?}");
    }
}
