//! `cargo xtask package`: the Debian package `lb_<version>_<arch>.deb` in
//! target/package/, assembled from the release `lb` and packaging/ with
//! `dpkg-deb --build --root-owner-group` (what cargo-deb does, without a
//! crate to compile). Reproducible: every mtime is `SOURCE_DATE_EPOCH`
//! (default: the last commit's time), gzip runs with `-n`, and dpkg-deb
//! sorts the archive and clamps its timestamps to the same epoch.
use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

use crate::setup::Env;

/// The Debian revision added to the workspace version (`0.1.0-1`): the
/// package is built outside Debian's source format, so it is not "native".
const DEBIAN_REVISION: &str = "1";
/// `Maintainer:` unless `DEBFULLNAME` and `DEBEMAIL` say otherwise.
const MAINTAINER: &str = "lb maintainers <maintainers@lb.invalid>";
/// Used when dpkg-shlibdeps (dpkg-dev) is missing: what the release binary
/// links (glibc 2.34 or later for its versioned symbols, libgcc_s for unwinding).
const FALLBACK_DEPENDS: &str = "libc6 (>= 2.34), libgcc-s1 (>= 4.2)";

const DESCRIPTION: &str = "\
XDP load balancer for port 443
 lb balances TCP and UDP connections to backends with an XDP program in
 the kernel: Maglev consistent hashing, a flow table so existing
 connections keep their backend, and local, NAT or direct server return
 forwarding. A daemon keeps the tables in step with the configuration,
 health checks and a REST API, and exports Prometheus metrics.
 .
 The data plane stays attached and pinned across daemon restarts and
 upgrades. The package installs the lb binary, a systemd unit (not enabled
 or started), an example configuration in /etc/lb, the man page, shell
 completions, a Grafana dashboard and Prometheus alert rules.";

const POSTINST: &str = "\
#!/bin/sh
set -e
# The unit is neither enabled nor started: there is no /etc/lb/lb.toml yet.
# On an upgrade a running daemon is restarted on the new binary; it adopts
# the pinned data plane without dropping traffic.
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
\tsystemctl --system daemon-reload >/dev/null || true
\tif [ -n \"$2\" ] && command -v deb-systemd-invoke >/dev/null; then
\t\tdeb-systemd-invoke try-restart lb.service >/dev/null || true
\tfi
fi
exit 0
";

/// On removal a running daemon is stopped like `systemctl stop`: the data
/// plane stays attached with its last tables (`lb stop` first removes it).
const PRERM: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ] && command -v deb-systemd-invoke >/dev/null; then
\tdeb-systemd-invoke stop lb.service >/dev/null || true
fi
exit 0
";

const POSTRM: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
\tsystemctl --system daemon-reload >/dev/null || true
fi
if [ \"$1\" = purge ]; then
\t# State (API changes, health verdicts) and the runtime directory.
\trm -rf /var/lib/lb /run/lb
\t# The link `systemctl enable lb` made, now dangling.
\trm -f /etc/systemd/system/multi-user.target.wants/lb.service
fi
exit 0
";

/// Builds the release `lb` and the package; returns the .deb's path.
pub fn package(env: &Env) -> Result<PathBuf> {
    super::build(env)?;
    let ws = super::workspace();
    let version = format!("{}-{DEBIAN_REVISION}", env!("CARGO_PKG_VERSION"));
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let epoch = source_date_epoch(&ws);
    let out_dir = ws.join("target/package");
    let root = out_dir.join(format!("lb_{version}_{arch}"));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    println!(
        "xtask: assembling the Debian package in {}...",
        root.display()
    );

    // The binary, stripped as dh_strip does.
    let lb = root.join("usr/bin/lb");
    fs::create_dir_all(root.join("usr/bin"))?;
    let status = Command::new("strip")
        .args(["--remove-section=.comment", "--remove-section=.note", "-o"])
        .arg(&lb)
        .arg(ws.join("target/release/lb"))
        .status()
        .context("running strip (binutils)")?;
    super::check(status, "strip")?;
    fs::set_permissions(&lb, fs::Permissions::from_mode(0o755))?;

    let packaging = ws.join("packaging");
    let copies = [
        ("lb.service", "usr/lib/systemd/system/lb.service"),
        ("lb.toml.example", "etc/lb/lb.toml.example"),
        ("grafana/lb.json", "usr/share/lb/grafana/lb.json"),
        (
            "prometheus/lb-alerts.yml",
            "usr/share/lb/prometheus/lb-alerts.yml",
        ),
        (
            "prometheus/lb-alerts.test.yml",
            "usr/share/lb/prometheus/lb-alerts.test.yml",
        ),
        ("copyright", "usr/share/doc/lb/copyright"),
    ];
    for (from, to) in copies {
        let data =
            fs::read(packaging.join(from)).with_context(|| format!("reading packaging/{from}"))?;
        write(&root.join(to), &data)?;
    }

    // Generated by the binary itself, so they match its arguments.
    let man = command_bytes(Command::new(&lb).arg("man"))?;
    write(&root.join("usr/share/man/man1/lb.1.gz"), &gzip(&man)?)?;
    for (shell, to) in [
        ("bash", "usr/share/bash-completion/completions/lb"),
        ("zsh", "usr/share/zsh/vendor-completions/_lb"),
        ("fish", "usr/share/fish/vendor_completions.d/lb.fish"),
    ] {
        let script = command_bytes(Command::new(&lb).args(["completions", shell]))?;
        write(&root.join(to), &script)?;
    }
    let changelog = format!(
        "lb ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask package`; the \
         project's history is in its\n    git log.\n\n -- {}  {}\n",
        maintainer(),
        rfc2822(epoch)?
    );
    write(
        &root.join("usr/share/doc/lb/changelog.Debian.gz"),
        &gzip(changelog.as_bytes())?,
    )?;

    let depends = depends(&out_dir, &lb);
    let md5sums = md5sums(&root)?;
    let control = format!(
        "Package: lb\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {}\n\
         Installed-Size: {}\nDepends: {depends}\nSection: net\nPriority: optional\n\
         Description: {DESCRIPTION}\n",
        maintainer(),
        installed_size(&root)?
    );
    let debian = root.join("DEBIAN");
    write(&debian.join("control"), control.as_bytes())?;
    write(&debian.join("md5sums"), md5sums.as_bytes())?;
    write(&debian.join("conffiles"), b"/etc/lb/lb.toml.example\n")?;
    for (name, script) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = debian.join(name);
        write(&path, script.as_bytes())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    normalize(&root, epoch)?;

    let deb = out_dir.join(format!("lb_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdout(Stdio::null())
        .status()
        .context("running dpkg-deb")?;
    super::check(status, "dpkg-deb --build")?;
    println!("xtask: built {}", deb.display());
    Ok(deb)
}

fn maintainer() -> String {
    match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(mail)) if !name.is_empty() && !mail.is_empty() => {
            format!("{name} <{mail}>")
        }
        _ => MAINTAINER.to_string(),
    }
}

/// `SOURCE_DATE_EPOCH`, else the last commit's time, else 0.
fn source_date_epoch(ws: &Path) -> u64 {
    if let Some(e) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return e;
    }
    command_output(
        Command::new("git")
            .arg("-C")
            .arg(ws)
            .args(["log", "-1", "--format=%ct"]),
    )
    .ok()
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}

fn rfc2822(epoch: u64) -> Result<String> {
    command_output(
        Command::new("date")
            .args(["-u", "-R", "-d"])
            .arg(format!("@{epoch}"))
            .env("LC_ALL", "C"),
    )
}

/// The `Depends:` line from dpkg-shlibdeps, which wants a debian/control
/// in its working directory.
fn depends(out_dir: &Path, lb: &Path) -> String {
    let work = out_dir.join("shlibdeps");
    let found = (|| -> Result<String> {
        write(
            &work.join("debian/control"),
            b"Source: lb\n\nPackage: lb\nArchitecture: any\n",
        )?;
        let line = command_output(
            Command::new("dpkg-shlibdeps")
                .args(["-O", "-e"])
                .arg(lb)
                .current_dir(&work),
        )?;
        let deps = line
            .strip_prefix("shlibs:Depends=")
            .with_context(|| format!("unexpected dpkg-shlibdeps output {line:?}"))?;
        Ok(deps.to_string())
    })();
    let _ = fs::remove_dir_all(&work);
    found.unwrap_or_else(|e| {
        println!("xtask: dpkg-shlibdeps failed ({e:#}); Depends: {FALLBACK_DEPENDS}");
        FALLBACK_DEPENDS.to_string()
    })
}

/// Every file under `dir` (relative paths, sorted), directories apart.
fn walk(
    dir: &Path,
    prefix: &Path,
    files: &mut Vec<PathBuf>,
    dirs: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for e in entries {
        let rel = prefix.join(e.file_name());
        if e.file_type()?.is_dir() {
            dirs.push(rel.clone());
            walk(&e.path(), &rel, files, dirs)?;
        } else {
            files.push(rel);
        }
    }
    Ok(())
}

fn payload(root: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(root, Path::new(""), &mut files, &mut dirs)?;
    let outside = |p: &PathBuf| !p.starts_with("DEBIAN");
    files.retain(outside);
    dirs.retain(outside);
    Ok((files, dirs))
}

/// DEBIAN/md5sums: every file but the conffiles (dpkg keeps their sums).
fn md5sums(root: &Path) -> Result<String> {
    let (files, _) = payload(root)?;
    let files: Vec<_> = files.iter().filter(|f| !f.starts_with("etc")).collect();
    command_output(Command::new("md5sum").args(files).current_dir(root)).map(|s| s + "\n")
}

/// In KiB, as dpkg-gencontrol counts: each file rounded up, 1 per directory.
fn installed_size(root: &Path) -> Result<u64> {
    let (files, dirs) = payload(root)?;
    let mut kib = dirs.len() as u64;
    for f in files {
        kib += fs::metadata(root.join(f))?.len().div_ceil(1024);
    }
    Ok(kib)
}

/// Directories 0755 whatever the umask, and every mtime the epoch.
fn normalize(root: &Path, epoch: u64) -> Result<()> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(root, Path::new(""), &mut files, &mut dirs)?;
    dirs.push(PathBuf::new());
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    for rel in &dirs {
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(0o755))?;
    }
    // Files first: setting a file's time leaves its directory's alone.
    for rel in files.iter().chain(dirs.iter()) {
        let path = root.join(rel);
        fs::File::open(&path)
            .and_then(|f| f.set_modified(time))
            .with_context(|| format!("setting the mtime of {}", path.display()))?;
    }
    Ok(())
}

/// Writes a 0644 file, creating its directories.
fn write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// `gzip -9n`: best compression, no name or time stamp in the header.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the thread writing to gzip panicked"))??;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn command_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = command_bytes(cmd)?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}
