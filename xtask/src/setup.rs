//! Bootstraps the toolchain (see ../shared/TOOLCHAIN.md): rust-src for
//! `-Z build-std=core`, bpf-linker built against rustc's own libLLVM, and the
//! Debian packages the tests use. Each step checks first and does nothing
//! when it is already done.
use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and benchmarks need, with the commands that
/// show each is there.
const PACKAGES: &[(&str, &[&str])] = &[
    ("iproute2", &["ip"]),
    // The demo's printed commands and the README's API examples.
    ("curl", &["curl"]),
    // Checksum offload and GRO settings of test veths (nat/dsr tests).
    ("ethtool", &["ethtool"]),
    // promtool checks the /metrics exposition and the alert rules; the
    // server evaluates the dashboard's and the rules' queries (the tests
    // run their own, in a test namespace).
    ("prometheus", &["promtool", "prometheus"]),
    // The status page's test drives a real headless browser over WebDriver.
    ("chromium", &["chromium"]),
    ("chromium-driver", &["chromedriver"]),
    // `cargo xtask package`: the Depends line (dpkg-shlibdeps); the package
    // test checks the .deb with lintian.
    ("dpkg-dev", &["dpkg-shlibdeps"]),
    ("lintian", &["lintian"]),
    // The cluster tests run a 3-member etcd cluster of their own.
    ("etcd-server", &["etcd"]),
    ("etcd-client", &["etcdctl"]),
    // BIRD 2: the BGP daemon the cluster tests run on every node and the
    // router (each its own, in a test namespace).
    ("bird2", &["bird", "birdc"]),
];

/// The environment every child cargo and program runs with.
pub struct Env {
    path: std::ffi::OsString,
}

impl Env {
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.env("PATH", &self.path).current_dir(super::workspace());
        c
    }

    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("PATH", &self.path);
        c
    }
}

fn home() -> PathBuf {
    env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ensure() -> Result<Env> {
    let started = Instant::now();
    let bin = cargo_home().join("bin");
    let mut paths = vec![bin.clone()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let env = Env {
        path: env::join_paths(paths)?,
    };
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    rust_src(&sysroot)?;
    lint_tools()?;
    bpf_linker(&env, &sysroot, &bin)?;
    packages()?;
    let spent = started.elapsed();
    if spent.as_secs() >= 2 {
        println!("xtask: setup done in {:.1}s", spent.as_secs_f64());
    }
    Ok(env)
}

/// rustfmt and clippy, which `cargo xtask test` runs before the tests.
fn lint_tools() -> Result<()> {
    let have = |sub: &str| {
        Command::new("cargo")
            .args([sub, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(sub, _)| !have(sub))
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "xtask: adding the {} component(s)...",
        missing.join(" and ")
    );
    let status = Command::new("rustup")
        .args(["component", "add"])
        .args(&missing)
        .status()
        .context("running rustup; is Rust installed with rustup?")?;
    if !status.success() {
        bail!("rustup component add {} failed", missing.join(" "));
    }
    Ok(())
}

fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Ok(());
    }
    println!("xtask: adding the rust-src component (needed to build core for BPF)...");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src"])
        .status()
        .context("running rustup; is Rust installed with rustup?")?;
    if !status.success() {
        bail!("rustup component add rust-src failed");
    }
    Ok(())
}

fn bpf_linker(env: &Env, sysroot: &Path, bin: &Path) -> Result<()> {
    let linker = bin.join("bpf-linker");
    let works = env
        .command(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if works {
        return Ok(());
    }
    // bpf-linker must link the same LLVM that rustc uses; rustc ships it as
    // a shared library, which we expose under the names the linker asks for.
    let verbose = output(Command::new("rustc").arg("-vV"))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV shows no LLVM version")?
        .to_string();
    let libdir = sysroot.join("lib");
    let lib = fs::read_dir(&libdir)?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM shared library in {}", libdir.display()))?;
    let prefix = home().join(".local/share/lb-toolchain/llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [
        OsStr::new("libLLVM.so"),
        lib.file_name().context("libLLVM has no file name")?,
    ] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {llvm_major} \
         (once; about three minutes)..."
    );
    let status = env
        .command("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("installing bpf-linker failed; see the cargo output above");
    }
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, cmds)| {
            !cmds.iter().all(|cmd| {
                ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                    .iter()
                    .any(|d| Path::new(d).join(cmd).exists())
            })
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "missing Debian packages {}: install them (apt-get install {}) or run as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("xtask: installing {} with apt-get...", missing.join(", "));
    let update = Command::new("apt-get")
        .args(["-q", "update"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["-q", "install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    if missing.contains(&"prometheus") {
        stop_service("prometheus", "9090");
    }
    if missing.contains(&"etcd-server") {
        stop_service("etcd", "2379");
    }
    if missing.contains(&"bird2") {
        stop_service("bird", "179 (BGP)");
    }
    Ok(())
}

/// Debian starts and enables the `prometheus`, `etcd` and `bird` services it
/// installs (unless a policy-rc.d forbids it, as in most containers). The
/// tests need neither: they start their own in test namespaces. So the
/// service we just installed does not stay running on its port or come
/// back at boot: through systemd where it runs, else through the
/// package's init script.
fn stop_service(name: &str, port: &str) {
    let quiet = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let stopped = if Path::new("/run/systemd/system").exists() {
        quiet(
            "systemctl",
            &["disable", "--now", &format!("{name}.service")],
        )
    } else if Path::new(&format!("/etc/init.d/{name}")).exists() {
        let stopped = quiet(&format!("/etc/init.d/{name}"), &["stop"]);
        quiet("update-rc.d", &[name, "disable"]) && stopped
    } else {
        return;
    };
    if stopped {
        println!("xtask: stopped and disabled the {name} service the package started");
    } else {
        println!(
            "xtask: could not disable the {name} service; `systemctl disable --now {name}` if \
             it holds port {port}"
        );
    }
}
