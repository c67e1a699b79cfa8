//! The Debian package from `cargo xtask package` (which `cargo xtask test`
//! builds and passes in `LB_DEB`), installed on this machine with `dpkg -i`:
//! the binary runs from /usr/bin, the example config validates, the man
//! page, completions, unit, dashboard and rules are in place with the right
//! owners and modes, lintian reports no error, and `dpkg --purge` leaves
//! nothing behind. The package is purged in Drop even when a check fails.
use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Every file the package installs.
const FILES: &[&str] = &[
    "/usr/bin/lb",
    "/usr/lib/systemd/system/lb.service",
    "/etc/lb/lb.toml.example",
    "/usr/share/man/man1/lb.1.gz",
    "/usr/share/bash-completion/completions/lb",
    "/usr/share/zsh/vendor-completions/_lb",
    "/usr/share/fish/vendor_completions.d/lb.fish",
    "/usr/share/lb/grafana/lb.json",
    "/usr/share/lb/prometheus/lb-alerts.yml",
    "/usr/share/lb/prometheus/lb-alerts.test.yml",
    "/usr/share/doc/lb/copyright",
    "/usr/share/doc/lb/changelog.Debian.gz",
];

/// Directories only this package creates; gone after the purge, with the
/// state and runtime directories the daemon (or systemd for it) makes.
const OWN_DIRS: &[&str] = &[
    "/etc/lb",
    "/usr/share/lb",
    "/usr/share/doc/lb",
    "/var/lib/lb",
    "/run/lb",
];

/// Directories the purge removes that may hold something before the test
/// (an earlier `lb run` as root): moved aside for the test, put back after.
const MOVED_ASIDE: &[&str] = &["/var/lib/lb", "/run/lb"];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs and requires success; returns stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `(status word, maintainer)` of the installed `lb`, if dpkg knows it.
fn installed() -> Option<(String, String)> {
    let out = run(
        "dpkg-query",
        &["-W", "-f=${db:Status-Status}\n${Maintainer}", "lb"],
    );
    if !out.status.success() {
        return None;
    }
    let s = text(&out.stdout);
    let mut lines = s.lines();
    let status = lines.next().unwrap_or("").to_string();
    let maintainer = lines.next().unwrap_or("").to_string();
    (status != "not-installed").then_some((status, maintainer))
}

/// Purges `lb` and puts back what was moved aside, even on panic.
struct Installation {
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Drop for Installation {
    fn drop(&mut self) {
        if installed().is_some() {
            let out = run("dpkg", &["--purge", "lb"]);
            if !out.status.success() {
                eprintln!("cleanup: dpkg --purge lb failed: {}", text(&out.stderr));
            }
        }
        for (original, aside) in self.moved.drain(..) {
            if original.exists() {
                eprintln!(
                    "cleanup: {} exists again; its earlier contents are in {}",
                    original.display(),
                    aside.display()
                );
            } else if let Err(e) = fs::rename(&aside, &original) {
                eprintln!(
                    "cleanup: moving {} back to {}: {e}",
                    aside.display(),
                    original.display()
                );
            }
        }
    }
}

#[test]
fn the_package_installs_runs_and_purges_cleanly() {
    lb_tests::require_root();
    let deb = PathBuf::from(std::env::var_os("LB_DEB").unwrap_or_else(|| {
        panic!(
            "LB_DEB is not set: run this test through `cargo xtask test` (it builds the \
             package), or `cargo xtask package` and LB_DEB=target/package/lb_<version>_amd64.deb"
        )
    }));
    assert!(deb.exists(), "{} is missing", deb.display());
    let deb_s = deb.to_str().unwrap();

    // The package's own fields.
    let fields = ok(
        "dpkg-deb",
        &[
            "-f",
            deb_s,
            "Package",
            "Version",
            "Architecture",
            "Maintainer",
        ],
    );
    println!("{}:\n{fields}", deb.display());
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} field in {fields}"))
            .to_string()
    };
    let version = field("Version");
    let upstream = env!("CARGO_PKG_VERSION");
    assert_eq!(field("Package"), "lb");
    assert!(
        version.starts_with(&format!("{upstream}-")),
        "version {version} is not {upstream}-<revision>"
    );
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("lb_{version}_{}.deb", field("Architecture"))
    );

    // Never replace what is not ours.
    match installed() {
        Some((status, maintainer)) if maintainer != field("Maintainer") => panic!(
            "a package named lb from another maintainer ({maintainer}, {status}) is on this \
             machine: this test would replace and purge it; remove it or run elsewhere"
        ),
        Some((status, _)) => println!("lb {status} from an earlier run: replaced, then purged"),
        None => {
            for path in ["/usr/bin/lb", "/etc/lb"] {
                assert!(
                    !Path::new(path).exists(),
                    "{path} exists and no package owns it: this test would overwrite or purge \
                     it; move it away first"
                );
            }
        }
    }
    assert!(
        !Path::new("/run/lb/lb.sock").exists(),
        "/run/lb/lb.sock exists: a daemon may be running with the default socket, and the \
         purge removes /run/lb; stop it first"
    );

    // Archive members: root-owned, 0755 directories and binary, 0644
    // files, and one mtime for all (reproducible).
    let listing = ok("dpkg-deb", &["--contents", deb_s]);
    let mut mtimes = std::collections::BTreeSet::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(cols.len() >= 6, "odd listing line {line}");
        let (mode, owner, path) = (cols[0], cols[1], cols[5]);
        assert_eq!(owner, "root/root", "{line}");
        let want = if path.ends_with('/') {
            "drwxr-xr-x"
        } else if path == "./usr/bin/lb" {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want, "{line}");
        mtimes.insert(format!("{} {}", cols[3], cols[4]));
    }
    assert_eq!(mtimes.len(), 1, "members with different mtimes: {mtimes:?}");

    // lintian: warnings shown, errors fail.
    let lint = run("lintian", &["--tag-display-limit", "0", deb_s]);
    let report = text(&lint.stdout);
    println!("lintian ({}):\n{report}{}", lint.status, text(&lint.stderr));
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(lint.status.success(), "lintian failed: {}", lint.status);

    let mut guard = Installation { moved: Vec::new() };
    for dir in MOVED_ASIDE {
        let original = PathBuf::from(dir);
        if original.exists() {
            let aside = PathBuf::from(format!("{dir}.lbt-{}-aside", std::process::id()));
            fs::rename(&original, &aside).expect("moving aside");
            println!("moved {dir} aside to {} for the test", aside.display());
            guard.moved.push((original, aside));
        }
    }

    println!("{}", ok("dpkg", &["-i", deb_s]));
    let (status, _) = installed().expect("lb is not installed after dpkg -i");
    assert_eq!(status, "installed");

    // The binary from /usr/bin: its version, and the example config valid.
    let shown = ok("/usr/bin/lb", &["--version"]);
    assert_eq!(shown.trim(), format!("lb {upstream}"));
    let valid = run(
        "/usr/bin/lb",
        &["validate", "--config", "/etc/lb/lb.toml.example"],
    );
    println!(
        "lb validate: {} {}{}",
        valid.status,
        text(&valid.stdout),
        text(&valid.stderr)
    );
    assert!(valid.status.success());
    assert!(text(&valid.stdout).contains("valid ("));
    assert!(
        text(&valid.stderr).trim().is_empty(),
        "the example config has warnings"
    );
    let sections = ok("readelf", &["-S", "--wide", "/usr/bin/lb"]);
    assert!(!sections.contains(".symtab"), "/usr/bin/lb is not stripped");

    // Every file listed by dpkg, in place, root-owned, with its mode.
    let listed = ok("dpkg", &["-L", "lb"]);
    for file in FILES {
        assert!(
            listed.lines().any(|l| l == *file),
            "dpkg -L lb lacks {file}"
        );
        let meta = fs::metadata(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{file} not owned by root");
        let want = if *file == "/usr/bin/lb" { 0o755 } else { 0o644 };
        assert_eq!(meta.permissions().mode() & 0o7777, want, "{file}");
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "lb"]);
    assert!(
        conffiles.contains("/etc/lb/lb.toml.example"),
        "not a conffile: {conffiles}"
    );

    // The man page: gzip, one page per command, and man renders it.
    let roff = ok("zcat", &["/usr/share/man/man1/lb.1.gz"]);
    assert!(roff.contains(".TH lb 1 "), "no .TH lb 1 in the man page");
    for page in ["lb-run", "lb-validate", "lb-status", "lb-backends"] {
        assert!(
            roff.contains(&format!(".TH {page} ")),
            "no {page} in the man page"
        );
    }
    if Path::new("/usr/bin/man").exists() {
        let out = Command::new("man")
            .args(["-l", "/usr/share/man/man1/lb.1.gz"])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let page = text(&out.stdout);
        assert!(out.status.success(), "man -l: {}", text(&out.stderr));
        assert!(page.contains("SYNOPSIS") && page.contains("EXIT STATUS"));
        println!("man -l: {} lines", page.lines().count());
    } else {
        println!("man not installed: `man -l` SKIPPED (zcat checked)");
    }

    // Completions: bash parses, each names lb.
    ok("bash", &["-n", "/usr/share/bash-completion/completions/lb"]);
    let bash = fs::read_to_string("/usr/share/bash-completion/completions/lb").unwrap();
    assert!(bash.contains("complete -F _lb"), "bash completion");
    let zsh = fs::read_to_string("/usr/share/zsh/vendor-completions/_lb").unwrap();
    assert!(zsh.starts_with("#compdef lb"), "zsh completion");
    let fish = fs::read_to_string("/usr/share/fish/vendor_completions.d/lb.fish").unwrap();
    assert!(fish.contains("complete -c lb"), "fish completion");

    // The unit as installed, against the installed binary.
    let unit = fs::read_to_string("/usr/lib/systemd/system/lb.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/lb run --config /etc/lb/lb.toml"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = run(
            "systemd-analyze",
            &["verify", "--man=no", "/usr/lib/systemd/system/lb.service"],
        );
        let err = text(&out.stderr);
        println!("systemd-analyze verify: {} {}", out.status, err.trim());
        let own: Vec<&str> = err.lines().filter(|l| l.contains("lb.service")).collect();
        assert!(out.status.success() && own.is_empty(), "{err}");
    } else {
        println!("systemd-analyze not found: `systemd-analyze verify` SKIPPED");
    }

    // Installing again (a reinstall) keeps working.
    ok("dpkg", &["-i", deb_s]);

    // What a running daemon leaves: state and runtime directories.
    fs::create_dir_all("/var/lib/lb").unwrap();
    fs::write("/var/lib/lb/web-0000.state.json", "{}").unwrap();
    fs::create_dir_all("/run/lb").unwrap();

    println!("{}", ok("dpkg", &["--purge", "lb"]));
    assert!(
        installed().is_none(),
        "lb still known to dpkg after the purge"
    );
    for path in FILES.iter().chain(OWN_DIRS) {
        assert!(!Path::new(path).exists(), "{path} left after the purge");
    }
    drop(guard);
}
