//! Developer and user commands. Every command first makes sure the toolchain
//! is in place (`setup`), so a new machine needs nothing done by hand.
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
    /// Build, then run `lb` as root with the given arguments.
    Run {
        /// Arguments for `lb`, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, packet fixtures and namespace topologies.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the data plane's per-packet cost against a baseline program.
    Bench {
        /// Fewer repetitions, for a smoke run.
        #[arg(long)]
        quick: bool,
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
        Cmd::Run { args } => {
            build(&env)?;
            let lb = workspace().join("target/release/lb");
            require_root("cargo xtask run")?;
            let status = env
                .command(&lb)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", lb.display()))?;
            check(status, "lb")
        }
        Cmd::Test { args } => test(&env, &args),
        Cmd::Bench { quick } => {
            require_root("cargo xtask bench")?;
            let mut cmd = env.cargo();
            cmd.args([
                "run",
                "--release",
                "-p",
                "lb-tests",
                "--bin",
                "lb-bench",
                "--",
            ]);
            if quick {
                cmd.arg("--quick");
            }
            check(cmd.status()?, "lb-bench")
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn check(status: std::process::ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
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
    remove_stale_namespaces();
    // The daemon tests run the real `lb` binary.
    let status = env
        .cargo()
        .args(["build", "-p", "lb-userspace", "--bin", "lb"])
        .status()?;
    check(status, "cargo build of lb")?;
    let status = env.cargo().arg("test").args(args).status()?;
    check(status, "cargo test")?;
    remove_stale_namespaces();
    Ok(())
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
