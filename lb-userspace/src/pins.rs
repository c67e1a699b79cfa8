//! The pinned data plane on disk: where maps and links are pinned under the
//! pin directory, and a record (a regular file: bpffs holds no files) of the
//! layout they were made with (so a daemon adopts only maps it understands)
//! and of the ids the map writer gave services and backends (so a restarted
//! daemon reads the tables it left behind).
use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// What the maps under a pin directory were created for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub version: u32,
    pub maglev_size: u32,
    pub max_services: u32,
    pub flow_table_size: u32,
    /// The interface the pinned links are attached to.
    pub interface: Option<String>,
}

impl Layout {
    /// Maps of `self` can serve a daemon that wants `other`.
    pub fn same_maps(&self, other: &Layout) -> bool {
        self.version == other.version
            && self.maglev_size == other.maglev_size
            && self.max_services == other.max_services
            && self.flow_table_size == other.flow_table_size
    }
}

/// Ids the map writer handed out, by service name and backend address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ids {
    pub services: BTreeMap<String, ServiceIds>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIds {
    pub id: u32,
    pub forwarding: String,
    pub backends: BTreeMap<SocketAddr, u32>,
}

pub fn maps_dir(pin: &Path) -> PathBuf {
    pin.join("maps")
}

pub fn link_path(pin: &Path, name: &str) -> PathBuf {
    pin.join("links").join(name)
}

/// The layout and ids, kept together in one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub layout: Layout,
    pub ids: Ids,
    /// The flow hash the data plane runs with (`FlowHash::name`). Records
    /// of releases before the choice have none: they ran `murmur3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_hash: Option<String>,
}

impl Record {
    /// The flow hash the recorded data plane ran with; `None` for a name
    /// this release does not know.
    pub fn flow_hash(&self) -> Option<lb_common::FlowHash> {
        match &self.flow_hash {
            None => Some(lb_common::FlowHash::Murmur3),
            Some(name) => lb_common::FlowHash::from_name(name),
        }
    }
}

/// True when every map of the object is pinned under `pin`.
pub fn maps_pinned(pin: &Path) -> bool {
    lb_common::maps::ALL
        .iter()
        .all(|name| maps_dir(pin).join(name).exists())
}

/// True when any map of the object is pinned under `pin`.
pub fn some_maps_pinned(pin: &Path) -> bool {
    lb_common::maps::ALL
        .iter()
        .any(|name| maps_dir(pin).join(name).exists())
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file,
/// never a mix; the file is 0600 and its new directories 0700.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::files::write_private_atomic(path, bytes)
}

pub fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?,
    )
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == BPF_FS_MAGIC)
}

/// Makes sure `pin` lies on a bpf filesystem, mounting one at /sys/fs/bpf
/// when the pin directory is under it and nothing is mounted there yet.
pub fn ensure_bpffs(pin: &Path) -> Result<(), String> {
    let existing = pin
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return crate::files::create_private_dir_all(pin)
            .map_err(|e| format!("creating {}: {e}", pin.display()));
    }
    let root = Path::new("/sys/fs/bpf");
    if pin.starts_with(root) && !is_bpffs(root) {
        let mounted = rustix::mount::mount(
            c"bpf",
            c"/sys/fs/bpf",
            c"bpf",
            rustix::mount::MountFlags::empty(),
            None,
        );
        if let Err(e) = mounted {
            return Err(format!(
                "mounting a bpf filesystem at /sys/fs/bpf: {}",
                std::io::Error::from(e)
            ));
        }
        return crate::files::create_private_dir_all(pin)
            .map_err(|e| format!("creating {}: {e}", pin.display()));
    }
    Err(format!(
        "{} is not on a bpf filesystem; mount one (mount -t bpf bpf <dir>) or use a pin_path under /sys/fs/bpf",
        pin.display()
    ))
}

/// Why the pin directory could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another daemon holds it.
    Held,
    Other(String),
}

/// Takes an exclusive `flock` on the pin directory (created if needed, on a
/// bpf filesystem): one daemon per pin path. The lock lasts as long as the
/// returned file, and dies with the process however it ends.
pub fn lock(pin: &Path) -> Result<File, LockError> {
    ensure_bpffs(pin).map_err(LockError::Other)?;
    let dir =
        File::open(pin).map_err(|e| LockError::Other(format!("opening {}: {e}", pin.display())))?;
    match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(dir),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Held),
        Err(e) => Err(LockError::Other(format!(
            "locking {}: {}",
            pin.display(),
            std::io::Error::from(e)
        ))),
    }
}

/// The `major:minor` of the filesystem holding `path`.
fn device_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).ok()?.dev();
    Some(format!(
        "{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ))
}

/// Whether a mountinfo text (`/proc/PID/mountinfo`) shows a mount of the
/// filesystem `dev` (`major:minor`, the third field).
fn mountinfo_has_device(mountinfo: &str, dev: &str) -> bool {
    mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some(dev))
}

/// When the bpf filesystem holding `pin` is not mounted in PID 1's mount
/// namespace (e.g. a bpffs mounted by this daemon inside `ip netns exec`,
/// which gives the process a mount namespace of its own): pins there die
/// with the process, so restarts cannot adopt the data plane. Returns a
/// warning naming the fix, or `None` when the pins outlive the process
/// (or when PID 1's mounts cannot be read, which says nothing either way).
pub fn private_pins(pin: &Path) -> Option<String> {
    private_pins_against(pin, &fs::read_to_string("/proc/1/mountinfo").ok()?)
}

fn private_pins_against(pin: &Path, init_mountinfo: &str) -> Option<String> {
    let dev = device_of(pin)?;
    if mountinfo_has_device(init_mountinfo, &dev) {
        return None;
    }
    Some(format!(
        "pin_path {} is on a bpf filesystem (device {dev}) that only this daemon's mount \
         namespace sees (as under `ip netns exec`, which remounts /sys): the pins die with \
         this process, so a restart reloads the data plane instead of adopting it and open \
         connections can break. Mount a bpf filesystem outside the namespace and point \
         dataplane.pin_path there, e.g. `mkdir -p /run/lb/bpf && mount -t bpf bpf /run/lb/bpf` \
         and pin_path = \"/run/lb/bpf/lb\"",
        pin.display()
    ))
}

/// Removes everything pinned under `pin` (maps, links). Links detach once no
/// process holds them.
pub fn remove_all(pin: &Path) {
    for dir in [pin.join("links"), maps_dir(pin)] {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&dir);
    }
    if let Ok(entries) = fs::read_dir(pin) {
        for e in entries.flatten() {
            // Maps retired by a layout change, if any are left.
            if e.file_name().to_string_lossy().starts_with("maps.retired") {
                let _ = remove_dir_files(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(pin);
}

pub fn remove_dir_files(dir: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        fs::remove_file(e.path())?;
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_missing_from_init_mounts_is_private() {
        let dir = std::env::temp_dir();
        let dev = device_of(&dir).unwrap();
        let shared = format!("22 1 {dev} / /tmp rw - tmpfs tmpfs rw\n");
        assert!(private_pins_against(&dir, &shared).is_none());
        let other = "22 1 0:999 / /tmp rw - tmpfs tmpfs rw\n";
        let w = private_pins_against(&dir, other).unwrap();
        assert!(w.contains("mount -t bpf"), "{w}");
    }
}
