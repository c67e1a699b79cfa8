//! Developer and user commands. Every command first makes sure the toolchain
//! is in place (`setup`), so a new machine needs nothing done by hand.
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark the load balancer"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need: rust-src, bpf-linker (built
    /// against rustc's own LLVM) and Debian packages. Fast when done.
    Setup,
    /// Build the eBPF object and the `lb` binary (release).
    Build,
    /// Build, then the Debian package target/package/lb_<version>_<arch>.deb:
    /// the binary, the systemd unit, an example config in /etc/lb, the man
    /// page, completions, the dashboard and the alert rules.
    Package,
    /// Build, then run the demo (no arguments, or `-- demo [--for SECONDS]`),
    /// the cluster demo (`-- --cluster N [--for SECONDS]`: N nodes with lb,
    /// BIRD and etcd behind an ECMP router), or the daemon on an interface
    /// (`-- --config FILE [--iface IF]`), or `lb` with any other arguments
    /// (`-- status`), as root.
    Run {
        /// Arguments after `--`: none for the demo, `--config FILE` for `lb run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, packet fixtures and namespace topologies.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark against same-run baselines and the usual gateways:
    /// per-packet cost, packets per second, end to end, control plane, and
    /// a 3-node cluster (failover, change propagation, per-node CPU).
    /// Writes target/bench/results.json; the full run also docs/BENCHMARKS.md.
    Bench {
        /// A shorter run of everything but the cluster (under 90 s).
        #[arg(long)]
        quick: bool,
        /// More arguments for lb-bench: `--only SECTION,...` of per-packet,
        /// pps, e2e, control, cluster; `--setups lb,nftables`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let env = setup::ensure()?;
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build => build(&env),
        Cmd::Package => package::package(&env).map(|_| ()),
        Cmd::Run { args } => run_cmd(&env, &args),
        Cmd::Test { args } => test(&env, &args),
        Cmd::Bench { quick, args } => {
            require_root("cargo xtask bench")?;
            remove_stale_namespaces();
            // The end-to-end part runs the real daemon.
            build(&env)?;
            let mut cmd = env.cargo();
            cmd.args(["run", "--release", "-p", "lb-bench", "--"]);
            if quick {
                cmd.arg("--quick");
            }
            cmd.args(&args);
            let status = cmd.status()?;
            remove_stale_namespaces();
            check(status, "lb-bench")
        }
    }
}

/// `cargo xtask run`: the demo with no arguments (or `demo ...`), the
/// cluster demo with `--cluster N` among the demo's arguments; `lb run`
/// when the arguments start with one of its flags (`--config`, `--iface`);
/// `lb` with the arguments as they are otherwise (`status`, `backends ...`).
fn run_cmd(env: &setup::Env, args: &[String]) -> Result<()> {
    require_root("cargo xtask run")?;
    build(env)?;
    let first = args.first().map(String::as_str);
    let demo_args = match first {
        None | Some("--for" | "--cluster") => Some(args),
        Some("demo") => Some(&args[1..]),
        _ => None,
    };
    if let Some(demo_args) = demo_args {
        // The cluster demo runs BIRD and etcd: `setup::ensure` above
        // installed them (bird2, etcd-server, etcd-client) if missing.
        let example = if demo_args.iter().any(|a| a == "--cluster") {
            "cluster_demo"
        } else {
            "demo"
        };
        println!(
            "xtask: building the demo (release; the first time takes a minute) and starting it..."
        );
        let mut cmd = env.cargo();
        cmd.args([
            "run",
            "--release",
            "-p",
            "lb-tests",
            "--example",
            example,
            "--",
        ]);
        cmd.args(demo_args);
        return run_until_done(cmd, "lb-demo");
    }
    let lb = workspace().join("target/release/lb");
    let mut cmd = env.command(&lb);
    let run_flag = |a: &str| {
        ["--config", "-c", "--iface", "--reset-state"]
            .iter()
            .any(|f| a == *f || a.starts_with(&format!("{f}=")))
    };
    if first.is_some_and(run_flag) {
        cmd.arg("run");
    }
    cmd.args(args);
    run_until_done(cmd, "lb")
}

/// Runs `cmd` and waits for it even through Ctrl-C: the child (in the same
/// process group) gets the signal too and cleans up (detaches, removes its
/// namespaces) before it exits; SIGINT or SIGTERM sent to xtask alone is
/// passed on to it.
fn run_until_done(mut cmd: Command, what: &str) -> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    // A handler (unlike SIG_IGN) is reset to the default in the child.
    let signalled = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, Arc::clone(&signalled), sig as usize)
            .with_context(|| format!("installing a handler for signal {sig}"))?;
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = rustix::process::Pid::from_raw(child.id() as i32);
    loop {
        if let Some(status) = child.try_wait()? {
            return check(status, what);
        }
        let sig = match signalled.swap(0, Ordering::SeqCst) as i32 {
            0 => None,
            signal_hook::consts::SIGINT => Some(rustix::process::Signal::INT),
            _ => Some(rustix::process::Signal::TERM),
        };
        if let (Some(pid), Some(sig)) = (pid, sig) {
            let _ = rustix::process::kill_process(pid, sig);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The workspace root: xtask's parent folder.
fn workspace() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn check(status: std::process::ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("{what} loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn build(env: &setup::Env) -> Result<()> {
    println!("xtask: building the eBPF object and lb (release)...");
    let status = env
        .cargo()
        .args(["build", "--release", "-p", "lb-userspace"])
        .status()?;
    check(status, "cargo build")
}

fn test(env: &setup::Env, args: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    // Formatting and lints are part of the test: either failing fails it.
    println!("xtask: cargo fmt --check");
    let status = env
        .cargo()
        .args(["fmt", "--all", "--", "--check"])
        .status()?;
    check(status, "cargo fmt --check (run `cargo fmt`)")?;
    println!("xtask: cargo clippy --all-targets -- -D warnings");
    let status = env
        .cargo()
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .status()?;
    check(status, "cargo clippy --all-targets -- -D warnings")?;
    remove_stale_namespaces();
    // The daemon tests run the real `lb` binary.
    let status = env
        .cargo()
        .args(["build", "-p", "lb-userspace", "--bin", "lb"])
        .status()?;
    check(status, "cargo build of lb")?;
    // tests/tests/e2e.rs runs the demos (tests/examples/demo.rs and
    // cluster_demo.rs).
    let status = env
        .cargo()
        .args([
            "build",
            "-p",
            "lb-tests",
            "--example",
            "demo",
            "--example",
            "cluster_demo",
        ])
        .status()?;
    check(status, "cargo build of the demos")?;
    // tests/tests/package.rs installs the package (release build); skipped
    // when `--test` selects other test files only.
    let mut cargo_test = env.cargo();
    if selects_package_test(args) {
        let deb = package::package(env)?;
        cargo_test.env("LB_DEB", deb);
    } else {
        println!("xtask: not building the Debian package (tests/tests/package.rs is not selected)");
    }
    let mut child = cargo_test
        .arg("test")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Pass the output through and add up every test binary's result line,
    // so the run ends with one line that counts all of them.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    remove_stale_namespaces();
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    check(status, "cargo test")
}

/// Whether `cargo test <args>` may run tests/tests/package.rs: not when
/// `--test` names other test files only, `-p` other packages only, or
/// `--lib`/`--bins`/`--doc` leave the test files out.
fn selects_package_test(args: &[String]) -> bool {
    let (mut tests, mut packages, mut other_targets) = (Vec::new(), Vec::new(), false);
    let mut it = args.iter().take_while(|a| *a != "--");
    while let Some(a) = it.next() {
        let mut value = |flag: &str, short: Option<&str>| -> Option<String> {
            if a == flag || Some(a.as_str()) == short {
                it.next().cloned()
            } else {
                a.strip_prefix(&format!("{flag}=")).map(str::to_string)
            }
        };
        if let Some(t) = value("--test", None) {
            tests.push(t);
        } else if let Some(p) = value("--package", Some("-p")) {
            packages.push(p);
        } else if [
            "--lib",
            "--bins",
            "--doc",
            "--bin",
            "--examples",
            "--benches",
        ]
        .contains(&a.as_str())
        {
            other_targets = true;
        }
    }
    let package_ok = packages.is_empty() || packages.iter().any(|p| p == "lb-tests");
    let test_ok = if tests.is_empty() {
        !other_targets
    } else {
        tests.iter().any(|t| t == "package" || t.contains('*'))
    };
    package_ok && test_ok
}

/// Namespaces left by test runs that were killed (their pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("lbt-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("xtask: removing namespace {name} left by a killed test run");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::selects_package_test;

    fn selects(args: &str) -> bool {
        let args: Vec<String> = args.split_whitespace().map(String::from).collect();
        selects_package_test(&args)
    }

    #[test]
    fn the_package_is_built_only_when_its_test_may_run() {
        for yes in [
            "",
            "some_filter",
            "--test package",
            "--test=package",
            "--test packets --test package",
            "-p lb-tests",
            "--test '*'",
            "-- --nocapture --test x",
        ] {
            assert!(selects(yes), "{yes:?}");
        }
        for no in [
            "--test packets",
            "--test=packets some_filter",
            "-p lb-userspace",
            "--package=xtask",
            "--lib",
            "--doc",
        ] {
            assert!(!selects(no), "{no:?}");
        }
    }
}
