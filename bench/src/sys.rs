//! What the bench needs from the machine: Debian packages installed on
//! demand, CPU accounting groups, CPU pinning, and a description of the
//! machine for the report.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Once,
};

/// Installs Debian packages whose command is missing (`(package, command)`),
/// with one `apt-get update` first. Returns the packages it could not get.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Vec<String> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    println!("bench: installing {} from Debian...", missing.join(" "));
    static UPDATE: Once = Once::new();
    UPDATE.call_once(|| {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    });
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("bench: apt-get install {} failed", missing.join(" "));
    }
    wanted
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| pkg.to_string())
        .collect()
}

/// Whether `cmd` is an executable on PATH or an absolute path that exists.
pub fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(cmd).is_file())
}

/// Pins the calling thread to one CPU, so a measurement is not moved
/// between CPUs half way.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is a plain bit set (all zeroes is empty) and lives
    // across the call that reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run anywhere again. Every CPU the set can name
/// (the kernel keeps the ones that exist): `nproc()` of a pinned thread
/// is 1, so it cannot say how many there are.
pub fn unpin() {
    // SAFETY: as in `pin_to_cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

pub fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// A cgroup (v1 `cpuacct`, or v2) that counts the CPU time of the threads
/// and processes put in it; removed on drop.
pub struct CpuGroup {
    dir: PathBuf,
    v2: bool,
}

fn cgroup_root() -> Option<(PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup/cpuacct");
    if v1.join("cpuacct.usage").exists() {
        return Some((v1.to_path_buf(), false));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    if v2.join("cgroup.controllers").exists() {
        return Some((v2.to_path_buf(), true));
    }
    None
}

impl CpuGroup {
    /// `None` where the machine has no usable CPU accounting.
    pub fn new(name: &str) -> Option<CpuGroup> {
        let (root, v2) = cgroup_root()?;
        let dir = root.join(format!("lb-bench-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).ok()?;
        Some(CpuGroup { dir, v2 })
    }

    /// Moves one thread of this process (v1) or the whole process (v2,
    /// which has no per-thread membership outside threaded groups).
    pub fn add_thread(&self, tid: i32) {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        let _ = fs::write(self.dir.join(file), tid.to_string());
    }

    /// The file a child writes its pid into to join (`sh -c 'echo $$ > F;
    /// exec ...'`), so it and everything it forks are counted.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// CPU time used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        if self.v2 {
            let text = fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|us| us / 1e6)
                .unwrap_or(0.0)
        } else {
            fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|ns| ns / 1e9)
                .unwrap_or(0.0)
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Whatever is left in it goes back to the parent first.
        let parent = self.dir.parent().unwrap().join("cgroup.procs");
        let tasks = if self.v2 { "cgroup.procs" } else { "tasks" };
        if let Ok(list) = fs::read_to_string(self.dir.join(tasks)) {
            for id in list.lines() {
                let target = if self.v2 {
                    parent.clone()
                } else {
                    self.dir.parent().unwrap().join("tasks")
                };
                let _ = fs::write(target, id);
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Resident set size of a process, in KiB (`VmRSS`), and its peak (`VmHWM`).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The machine, as the report states it.
#[derive(serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    Machine {
        cpus: nproc(),
        cpu_model,
        kernel,
        memory_gib,
    }
}

/// Load average over the last minute, to say how busy the machine was.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Median of a sample (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}
