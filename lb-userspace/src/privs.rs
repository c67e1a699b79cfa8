//! Privileges: the capabilities the daemon keeps once its data plane is
//! loaded and attached, dropping every other one from all five sets, and
//! the one thread that keeps the start-up privileges for loading.
//!
//! Capabilities belong to threads, not processes: `lb run` drops them on
//! its main thread before it starts any other thread (so every thread of
//! the runtime inherits the small set), and loads and attaches on a
//! [`Loader`] thread made before the drop, which ends when that is done.
use std::{
    io,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
};

use rustix::thread::{self as rthread, CapabilitySet, CapabilitySets};
use thiserror::Error;

/// The number of `CAP_BPF` (kernels >= 5.8).
const CAP_BPF: u32 = 39;

/// Why the daemon cannot run with only the capabilities it keeps.
#[derive(Debug, Error)]
pub enum PrivsError {
    #[error("reading this thread's capabilities: {0}")]
    Read(io::Error),
    #[error("clearing the ambient capabilities: {0}")]
    Ambient(io::Error),
    #[error(
        "dropping {cap} from the bounding set: {err}; the daemon needs CAP_SETPCAP at start \
         to drop what it does not need (it keeps none of it)"
    )]
    Bounding { cap: String, err: io::Error },
    #[error("keeping only {kept} (effective, permitted; inheritable empty): {err}")]
    Set { kept: String, err: io::Error },
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("{path}: {err}")]
    Proc { path: PathBuf, err: io::Error },
    #[error("thread {tid} holds {set} {found}, not {expected}")]
    Leftover {
        tid: String,
        set: &'static str,
        found: String,
        expected: String,
    },
}

/// Whether the running kernel knows `CAP_BPF` (>= 5.8); before it, map
/// and program operations were gated on `CAP_SYS_ADMIN`.
pub fn kernel_has_cap_bpf() -> bool {
    last_cap().is_some_and(|last| last >= CAP_BPF)
}

/// The highest capability number the kernel knows.
fn last_cap() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What the attached daemon still needs: `CAP_BPF` for bpf(2) on its maps,
/// programs and links (kernels before 6.5 check it on every bpf(2) call
/// when unprivileged BPF is disabled, the usual setting), `CAP_NET_ADMIN`
/// to attach the programs again when the interface comes back and to
/// detach them on `lb stop` where that goes through netlink (XDP without
/// bpf links, before 5.9; TC without tcx, before 6.6); on a kernel without
/// `CAP_BPF` (before 5.8), `CAP_SYS_ADMIN` in its place. Newer kernels
/// need neither for what the running daemon does, but an older kernel or
/// a netlink fallback would then fail only later, at a re-attach or stop.
pub fn needed(has_cap_bpf: bool) -> CapabilitySet {
    let bpf = if has_cap_bpf {
        CapabilitySet::BPF
    } else {
        CapabilitySet::SYS_ADMIN
    };
    bpf | CapabilitySet::NET_ADMIN
}

/// Of what is `needed`, what the daemon holds (`permitted`): it keeps no
/// capability it was not given. A daemon given `CAP_SYS_ADMIN` but not
/// `CAP_BPF` on a kernel that has it keeps `CAP_SYS_ADMIN`, which the
/// kernel still accepts for BPF.
pub fn to_keep(permitted: CapabilitySet, has_cap_bpf: bool) -> CapabilitySet {
    let mut want = needed(has_cap_bpf);
    if has_cap_bpf
        && !permitted.contains(CapabilitySet::BPF)
        && permitted.contains(CapabilitySet::SYS_ADMIN)
    {
        want = CapabilitySet::SYS_ADMIN | CapabilitySet::NET_ADMIN;
    }
    want & permitted
}

/// `CAP_BPF CAP_NET_ADMIN`, or `none`; unnamed bits as `cap_<n>`.
pub fn names(set: CapabilitySet) -> String {
    let bits = set.bits();
    let mut out = Vec::new();
    for n in 0..64 {
        if bits & (1 << n) == 0 {
            continue;
        }
        let one = CapabilitySet::from_bits_retain(1 << n);
        match one.iter_names().next() {
            Some((name, _)) => out.push(format!("CAP_{name}")),
            None => out.push(format!("cap_{n}")),
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(" ")
    }
}

/// [`names`] of a mask as `/proc/<pid>/status` shows it (`CapEff` etc.).
pub fn mask_names(mask: u64) -> String {
    names(CapabilitySet::from_bits_retain(mask))
}

/// [`drop_to`] what the running daemon needs of what it holds
/// ([`to_keep`]); returns that set.
pub fn drop_to_needed() -> Result<CapabilitySet, PrivsError> {
    let held = rthread::capabilities(None)
        .map_err(|e| PrivsError::Read(e.into()))?
        .permitted;
    let keep = to_keep(held, kernel_has_cap_bpf());
    drop_to(keep)?;
    Ok(keep)
}

/// Drops, on the calling thread, every capability but `keep` from the
/// ambient, bounding, inheritable, permitted and effective sets, sets
/// `no_new_privs`, and reads the sets back. Threads started afterwards by
/// this thread inherit the result; threads started before keep theirs.
pub fn drop_to(keep: CapabilitySet) -> Result<(), PrivsError> {
    rthread::clear_ambient_capability_set().map_err(|e| PrivsError::Ambient(e.into()))?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // goes with the rest below.
    let last = last_cap().unwrap_or(63).min(63);
    for n in 0..=last {
        let cap = CapabilitySet::from_bits_retain(1 << n);
        if keep.contains(cap) {
            continue;
        }
        match rthread::capability_is_in_bounding_set(cap) {
            Ok(false) => continue,
            // A number this kernel does not know: nothing to drop.
            Err(e) if e == rustix::io::Errno::INVAL => continue,
            Err(e) => {
                return Err(PrivsError::Bounding {
                    cap: names(cap),
                    err: e.into(),
                });
            }
            Ok(true) => {}
        }
        rthread::remove_capability_from_bounding_set(cap).map_err(|e| PrivsError::Bounding {
            cap: names(cap),
            err: e.into(),
        })?;
    }
    rthread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| PrivsError::Set {
        kept: names(keep),
        err: e.into(),
    })?;
    rthread::set_no_new_privs(true).map_err(|e| PrivsError::NoNewPrivs(e.into()))?;
    check(
        &Status::read(Path::new("/proc/thread-self/status"))?,
        "self",
        keep,
    )
}

/// Checks that every thread of this process holds exactly `keep` (in the
/// effective, permitted and bounding sets), nothing inheritable or ambient,
/// and `no_new_privs`.
pub fn check_all_threads(keep: CapabilitySet) -> Result<(), PrivsError> {
    let dir = Path::new("/proc/self/task");
    let entries = std::fs::read_dir(dir).map_err(|err| PrivsError::Proc {
        path: dir.into(),
        err,
    })?;
    for entry in entries {
        let entry = entry.map_err(|err| PrivsError::Proc {
            path: dir.into(),
            err,
        })?;
        let tid = entry.file_name().to_string_lossy().into_owned();
        match Status::read(&entry.path().join("status")) {
            Ok(status) => check(&status, &tid, keep)?,
            // A thread that ended since the listing.
            Err(PrivsError::Proc { err, .. })
                if err.kind() == io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn check(status: &Status, tid: &str, keep: CapabilitySet) -> Result<(), PrivsError> {
    let none = CapabilitySet::empty();
    for (set, found, expected) in [
        ("CapEff", status.eff, keep),
        ("CapPrm", status.prm, keep),
        ("CapBnd", status.bnd, keep),
        ("CapInh", status.inh, none),
        ("CapAmb", status.amb, none),
    ] {
        if found != expected {
            return Err(PrivsError::Leftover {
                tid: tid.into(),
                set,
                found: names(found),
                expected: names(expected),
            });
        }
    }
    if !status.no_new_privs {
        return Err(PrivsError::Leftover {
            tid: tid.into(),
            set: "NoNewPrivs",
            found: "0".into(),
            expected: "1".into(),
        });
    }
    Ok(())
}

/// The capability lines of a `/proc/.../status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub eff: CapabilitySet,
    pub prm: CapabilitySet,
    pub inh: CapabilitySet,
    pub bnd: CapabilitySet,
    pub amb: CapabilitySet,
    pub no_new_privs: bool,
}

impl Status {
    fn read(path: &Path) -> Result<Status, PrivsError> {
        let text = std::fs::read_to_string(path).map_err(|err| PrivsError::Proc {
            path: path.into(),
            err,
        })?;
        Status::parse(&text).ok_or_else(|| PrivsError::Proc {
            path: path.into(),
            err: io::Error::new(io::ErrorKind::InvalidData, "no capability lines"),
        })
    }

    /// The `CapInh`..`CapAmb` and `NoNewPrivs` lines of a status text.
    pub fn parse(text: &str) -> Option<Status> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let mask = |name: &str| {
            u64::from_str_radix(field(name)?, 16)
                .ok()
                .map(CapabilitySet::from_bits_retain)
        };
        Some(Status {
            eff: mask("CapEff")?,
            prm: mask("CapPrm")?,
            inh: mask("CapInh")?,
            bnd: mask("CapBnd")?,
            amb: mask("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that keeps the capabilities the daemon started with, runs one
/// job (loading and attaching the data plane) and ends, taking them along.
/// Made before [`drop_to`]; dropped unused, it ends too.
pub struct Loader {
    job: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

impl Loader {
    pub fn spawn() -> io::Result<Loader> {
        let (job, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("lb-loader".into())
            .spawn(move || {
                if let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Loader { job, thread })
    }

    /// Runs `f` on the loader thread and returns once that thread has
    /// ended (its capabilities with it). A panic in `f` is resumed here.
    pub async fn run<T: Send + 'static>(self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let Loader { job, thread } = self;
        // The thread lives until it got a job or the sender is gone.
        let _ = job.send(Box::new(move || {
            let _ = tx.send(f());
        }));
        drop(job);
        let out = rx.await;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            // The loader thread panicked in `f`.
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // A blocking task is never cancelled: the error is its panic.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
        #[expect(
            clippy::expect_used,
            reason = "the thread ran `f` to its end (it did not panic), so it sent an answer"
        )]
        out.expect("the loader thread ended without an answer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_is_needed_and_held() {
        let all = CapabilitySet::all();
        assert_eq!(names(to_keep(all, true)), "CAP_NET_ADMIN CAP_BPF");
        assert_eq!(names(to_keep(all, false)), "CAP_NET_ADMIN CAP_SYS_ADMIN");
        // Only what it was given.
        assert_eq!(
            names(to_keep(CapabilitySet::NET_ADMIN, true)),
            "CAP_NET_ADMIN"
        );
        // CAP_SYS_ADMIN stands in for a CAP_BPF it was not given.
        assert_eq!(
            names(to_keep(
                CapabilitySet::SYS_ADMIN | CapabilitySet::NET_ADMIN,
                true
            )),
            "CAP_NET_ADMIN CAP_SYS_ADMIN"
        );
        assert_eq!(names(CapabilitySet::empty()), "none");
    }

    #[test]
    fn status_lines_parse() {
        let text = "Name:\tlb\nCapInh:\t0000000000000000\nCapPrm:\t0000008000001000\n\
                    CapEff:\t0000008000001000\nCapBnd:\t0000008000001000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let s = Status::parse(text).unwrap();
        assert_eq!(names(s.eff), "CAP_NET_ADMIN CAP_BPF");
        assert_eq!(s.inh, CapabilitySet::empty());
        assert!(s.no_new_privs);
    }
}
