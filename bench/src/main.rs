//! `cargo xtask bench`: how fast the balancer is, always next to a baseline
//! measured in the same run (these machines are shared and noisy):
//! - the data plane's cost per packet through `BPF_PROG_TEST_RUN`, next to
//!   a minimal XDP program (parse, swap MACs, `XDP_TX`);
//! - packets per second on one core through the program attached to a
//!   veth, driven by XDP live frames, next to the baseline attached the same
//!   way;
//! - end to end in network namespaces, the real `lb` daemon next to a direct
//!   connection and the gateways users run instead (nftables, HAProxy,
//!   nginx, Caddy);
//! - the control plane: Maglev builds, flows moved by a backend change, time
//!   from a backend's death to the new table, daemon memory under API load;
//! - several nodes behind an ECMP router (BIRD, etcd): failover time, time
//!   for a change to reach every node, per-node data-plane CPU with 1 and 3
//!   nodes.
//!
//! Writes `results.json` (every figure, with an id and a unit),
//! `BENCHMARKS.md` and a chart to the output directory (`target/bench`);
//! the full run also writes the last two to `docs/`.
//!
//! `--quick` is a shorter run of everything but `cluster`, `--smoke` a
//! CI-sized one of the same that needs no package from outside (no peers);
//! `--only SECTION,...` runs some of `per-packet`, `pps`, `e2e`, `control`,
//! `cluster` (a short form with `--quick` or `--smoke`).
mod chart;
mod cluster;
mod control;
mod e2e;
mod load;
mod markdown;
mod objects;
mod peers;
mod per_packet;
mod pps;
mod report;
mod results;
mod sys;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Smoke,
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// A part of the bench (`--only per-packet,e2e`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    PerPacket,
    Pps,
    E2e,
    Control,
    Cluster,
}

impl Section {
    const ALL: [Section; 5] = [
        Section::PerPacket,
        Section::Pps,
        Section::E2e,
        Section::Control,
        Section::Cluster,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::PerPacket => "per-packet",
            Section::Pps => "pps",
            Section::E2e => "e2e",
            Section::Control => "control",
            Section::Cluster => "cluster",
        }
    }

    fn parse(s: &str) -> Section {
        Section::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .unwrap_or_else(|| {
                panic!("unknown section {s:?}: per-packet, pps, e2e, control, cluster")
            })
    }
}

/// How much of everything a mode does.
pub struct Scale {
    pub mode: Mode,
    /// Per packet: runs per `BPF_PROG_TEST_RUN` call, calls per case.
    pub repeat: u32,
    pub rounds: usize,
    /// Flow-table entries, the share filled for "nearly full", and the
    /// distinct frames of a repeat=1 measurement.
    pub flow_table: u32,
    pub fill: f64,
    pub insert_samples: usize,
    /// Live frames per call and calls per case.
    pub pps_frames: u32,
    pub pps_rounds: usize,
    /// End to end: length of each load phase, the fixed offered load of the
    /// latency phase, and whether the peers run.
    pub phase: Duration,
    pub latency_rate: u32,
    pub peers: bool,
    /// Passes over all setups; each figure is the best of them.
    pub e2e_passes: usize,
    /// Only these setups (`--setups direct,lb,...`), for a partial run.
    pub setups: Option<Vec<peers::Setup>>,
    /// Control plane.
    pub maglev_reps: usize,
    pub share_flows: usize,
    pub death_trials: usize,
    pub api_changes: usize,
    /// Cluster: nodes killed (one at a time, brought back between), API
    /// changes timed, and the offered load of each CPU phase.
    pub failovers: usize,
    pub cluster_changes: usize,
    pub cluster_rate: u32,
    pub cluster_phase: Duration,
}

impl Scale {
    fn of(mode: Mode) -> Scale {
        match mode {
            Mode::Full => Scale {
                mode,
                repeat: 1_000_000,
                rounds: 7,
                flow_table: lb_common::DEFAULT_FLOW_TABLE_SIZE,
                fill: 0.95,
                insert_samples: 20_000,
                pps_frames: 4_000_000,
                pps_rounds: 5,
                phase: Duration::from_secs(5),
                latency_rate: 1000,
                peers: true,
                e2e_passes: 3,
                setups: None,
                maglev_reps: 5,
                share_flows: 50_000,
                death_trials: 5,
                api_changes: 10_000,
                failovers: 5,
                cluster_changes: 20,
                cluster_rate: 100,
                cluster_phase: Duration::from_secs(5),
            },
            Mode::Quick => Scale {
                mode,
                repeat: 200_000,
                rounds: 3,
                flow_table: 65_536,
                fill: 0.95,
                insert_samples: 3_000,
                pps_frames: 500_000,
                pps_rounds: 3,
                // Seven setups of five phases each: most of the run.
                phase: Duration::from_millis(1000),
                latency_rate: 500,
                peers: true,
                e2e_passes: 1,
                setups: None,
                maglev_reps: 2,
                share_flows: 10_000,
                death_trials: 2,
                // Each change rebuilds a table and writes the state file
                // (~70 a second here).
                api_changes: 300,
                failovers: 3,
                cluster_changes: 10,
                cluster_rate: 100,
                cluster_phase: Duration::from_secs(3),
            },
            Mode::Smoke => Scale {
                mode,
                repeat: 20_000,
                rounds: 2,
                flow_table: 4_096,
                fill: 0.9,
                insert_samples: 300,
                pps_frames: 100_000,
                pps_rounds: 1,
                phase: Duration::from_millis(300),
                latency_rate: 200,
                peers: false,
                e2e_passes: 1,
                setups: None,
                maglev_reps: 1,
                share_flows: 2_000,
                death_trials: 1,
                api_changes: 100,
                failovers: 1,
                cluster_changes: 3,
                cluster_rate: 100,
                cluster_phase: Duration::from_secs(1),
            },
        }
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn main() {
    lb_tests::require_root();
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mode = if flag("--smoke") {
        Mode::Smoke
    } else if flag("--quick") {
        Mode::Quick
    } else {
        Mode::Full
    };
    let mut scale = Scale::of(mode);
    scale.setups = value("--setups").map(|v| v.split(',').map(peers::Setup::parse).collect());
    // The cluster (BIRD, etcd, ~30 s of start and failovers) runs in a
    // full run, or when asked for.
    let sections: Vec<Section> = value("--only")
        .map(|v| v.split(',').map(Section::parse).collect())
        .unwrap_or_else(|| match mode {
            Mode::Full => Section::ALL.to_vec(),
            Mode::Quick | Mode::Smoke => Section::ALL
                .into_iter()
                .filter(|s| *s != Section::Cluster)
                .collect(),
        });
    let out = value("--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/bench"));
    std::fs::create_dir_all(&out).expect("output directory");

    let started = Instant::now();
    let load_before = sys::loadavg();
    let mut report = report::Report::default();
    let machine = sys::machine();
    println!(
        "lb-bench ({} mode) on {} x {}, kernel {}, load average {:.2}",
        mode.name(),
        machine.cpus,
        machine.cpu_model,
        machine.kernel,
        load_before
    );
    for &s in &sections {
        let t = Instant::now();
        match s {
            Section::PerPacket => per_packet::run(&scale, &mut report),
            Section::Pps => pps::run(&scale, &mut report),
            Section::E2e => e2e::run(&scale, &mut report),
            Section::Control => control::run(&scale, &mut report),
            Section::Cluster => cluster::run(&scale, &mut report),
        }
        println!(
            "bench: {} took {:.0} s",
            s.name(),
            t.elapsed().as_secs_f64()
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let command = match mode {
        Mode::Full => "cargo xtask bench".to_string(),
        Mode::Quick => "cargo xtask bench --quick".to_string(),
        Mode::Smoke => format!("lb-bench {}", args[1..].join(" ")),
    };
    let meta = results::Meta {
        mode,
        command,
        sections: sections.clone(),
        machine,
        load_average_before: load_before,
        load_average_after: sys::loadavg(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        duration_s: elapsed,
    };
    let json_path = out.join("results.json");
    report.write_json(&json_path, &meta).unwrap();
    let png = out.join("benchmarks.png");
    if let Err(e) = chart::draw(&report, &png) {
        report.skip(format!("chart: {e}"));
    }
    let md_path = out.join("BENCHMARKS.md");
    markdown::write(&report, &meta, &md_path, "benchmarks.png");
    if mode == Mode::Full && sections.len() == Section::ALL.len() {
        let docs = workspace().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let _ = std::fs::copy(&png, docs.join("benchmarks.png"));
        markdown::write(
            &report,
            &meta,
            &docs.join("BENCHMARKS.md"),
            "benchmarks.png",
        );
        println!("\nwritten to docs/BENCHMARKS.md and docs/benchmarks.png");
    }
    println!(
        "\nwritten to {} (and BENCHMARKS.md, benchmarks.png beside it) in {:.0} s",
        json_path.display(),
        elapsed
    );
}
