//! `BENCHMARKS.md`: the run's tables, the machine, the command, and the
//! hand-written notes of the previous version of the file, kept as they
//! were.
use std::{fmt::Write as _, fs, path::Path};

use crate::{
    report::{NOTES_BEGIN, NOTES_END, Report, preserved_notes},
    results::Meta,
};

pub fn write(report: &Report, meta: &Meta, path: &Path, png: &str) {
    let existing = fs::read_to_string(path).unwrap_or_default();
    let notes = preserved_notes(&existing).unwrap_or_else(|| {
        format!(
            "{NOTES_BEGIN}\n## Reading the numbers\n\n(Notes on this run: where lb wins, where it loses and why.)\n{NOTES_END}"
        )
    });
    let m = &meta.machine;
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(
        "Written by `cargo xtask bench` from a real run; every figure sits next to a baseline \
         measured in the same run, because the machines are shared and noisy. \
         `target/bench/results.json` holds every figure of the run with an id and a unit.\n\n",
    );
    let _ = writeln!(s, "- Command: `{}` (as root)", meta.command);
    let _ = writeln!(
        s,
        "- Machine: {} x {}, {:.0} GiB, Linux {}",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel
    );
    let _ = writeln!(
        s,
        "- Load average (1 min) before and after: {:.2}, {:.2}; the run took {:.0} s",
        meta.load_average_before, meta.load_average_after, meta.duration_s
    );
    let _ = writeln!(s, "- Mode: {}", meta.mode.name());
    if !report.skipped.is_empty() {
        let _ = writeln!(s, "- Not measured: {}", report.skipped.join("; "));
    }
    let _ = writeln!(s, "\n![benchmarks]({png})\n");
    s.push_str(&notes);
    s.push_str("\n\n## Results\n\n");
    for t in &report.tables {
        s.push_str(&t.markdown());
    }
    s.push_str(METHOD);
    if let Err(e) = fs::write(path, s) {
        eprintln!("bench: writing {}: {e}", path.display());
    }
}

const METHOD: &str = "## Method\n\n\
- **Per packet**: `BPF_PROG_TEST_RUN` with a large repeat count on the real \
  object, loaded as the daemon loads it. The service's backends listen on \
  the service port itself, so the local-mode rewrite leaves the frame as it \
  was and every repeated run takes the full path; each measurement is \
  proven by the data plane's own counters (service packets, new flows, \
  actions, drop reasons advance by exactly the number of runs) and by runs \
  before and after it whose output is checked. A SYN that must insert into \
  the flow table runs once per distinct frame; the fixed cost of such a \
  call is measured on the baseline and subtracted. Baseline: \
  `test-ebpf/src/baseline.rs` (parse Ethernet/IP/TCP, swap MACs, `XDP_TX`). \
  A repeated row's baseline is measured in rounds alternating with its \
  own (a round of the baseline, then a round of the row), on the baseline \
  frame of the row's family and size. Its ratio (x baseline) is the median \
  of the rounds' ratios, each round over the baseline round just before \
  it; ns/pkt and baseline ns are the medians of each. The machine moves \
  between speed levels for seconds at a time, and a baseline measured once \
  per run would give a row that ran on another level a ratio it does not \
  have. Rows measured once per call (the fixed cost subtracted) use the \
  baseline rows at the top, measured once at the start.\n\
- **Packets per second**: live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`) sent \
  from a generator namespace out of a veth into the program attached \
  (native XDP) to its peer; one pinned core does all the work; the \
  baseline is attached the same way.\n\
- **End to end**: a client namespace and a balancer namespace joined by a \
  veth, three HTTPS and three HTTP backends (the bench's own, threads) in \
  the balancer namespace. lb is the real daemon (`target/release/lb`) \
  with a config file; the peers are Debian's packages, installed by the \
  bench when missing, with configs it writes. CPU is counted with cgroups \
  (client, backends, balancer); the balancer side's CPU is the whole \
  experiment's CPU minus the direct setup's for the same work, because \
  the kernel charges packet processing to whichever task is running.\n\
- **Control plane**: `maglev::build` timed in-process; flow moves through \
  the real program; backend death and memory with the real daemon and its \
  HTTP API.\n";
