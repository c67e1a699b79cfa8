//! The pinned data plane on disk: where maps and links are pinned under the
//! pin directory, and a record (a regular file: bpffs holds no files) of the
//! layout they were made with (so a daemon adopts only maps it understands)
//! and of the ids the map writer gave services and backends (so a restarted
//! daemon reads the tables it left behind).
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
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
}

/// True when every map of the object is pinned under `pin`.
pub fn maps_pinned(pin: &Path) -> bool {
    lb_common::maps::ALL
        .iter()
        .all(|name| maps_dir(pin).join(name).exists())
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file,
/// never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

pub fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec_pretty(record).expect("record serializes"),
    )
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin` lies on a bpf filesystem, mounting one at /sys/fs/bpf
/// when the pin directory is under it and nothing is mounted there yet.
pub fn ensure_bpffs(pin: &Path) -> Result<(), String> {
    let existing = pin
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return fs::create_dir_all(pin).map_err(|e| format!("creating {}: {e}", pin.display()));
    }
    let root = Path::new("/sys/fs/bpf");
    if pin.starts_with(root) && !is_bpffs(root) {
        let (src, dst, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mounting a bpf filesystem at /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            ));
        }
        return fs::create_dir_all(pin).map_err(|e| format!("creating {}: {e}", pin.display()));
    }
    Err(format!(
        "{} is not on a bpf filesystem; mount one (mount -t bpf bpf <dir>) or use a pin_path under /sys/fs/bpf",
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
