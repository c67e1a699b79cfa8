//! Files the daemon writes or reads as root, made safe against other local
//! users: what it writes is private (0600 files in 0700 directories it
//! creates), replaced atomically through a temporary file with an
//! unpredictable name in the target directory (created with `O_EXCL`, so a
//! planted symlink is never followed); secrets it reads (token files) must be
//! private to root or to the daemon's user; other files it reads (CA files)
//! must be regular files of bounded size.
use std::{
    fs::{self, DirBuilder, File},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use rustix::{fs::OFlags, io::Errno};

/// Mode of the files the daemon writes.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories the daemon creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents with mode 0700 (existing ones are
/// left as they are).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file,
/// never a mix: a 0600 temporary file with a random name beside `path`
/// (`O_CREAT | O_EXCL`), fsync, rename over `path`, fsync of the directory.
/// A symlink at `path` is replaced, never followed.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)?;
    tmp.as_file_mut().write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Opens `path` for reading without following a symlink in its last
/// component and without blocking on a FIFO or device.
fn open_nofollow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)
}

/// Why a file the daemon reads was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(
        "is not a regular file (a FIFO, device, directory or symlink); point it at a regular file"
    )]
    NotRegular,
    #[error("is on {0}, whose files are not data files; copy the file to a regular filesystem")]
    Pseudo(&'static str),
    #[error("is {size} bytes, more than the {cap} allowed")]
    TooLarge { size: u64, cap: u64 },
    #[error("is empty")]
    Empty,
    #[error("is readable or writable by group or others (mode {mode:03o}); run `chmod 600` on it")]
    Exposed { mode: u32 },
    #[error(
        "is owned by uid {owner}, not by root or this process's uid {me}; run `chown root` on it"
    )]
    Owner { owner: u32, me: u32 },
}

/// The kind of pseudo filesystem `file` lies on, when it is one (procfs,
/// sysfs, debugfs...), whose "regular" files can block or have side effects
/// on read (`/proc/kmsg`).
fn pseudo_fs(file: &File) -> Option<&'static str> {
    let st = rustix::fs::fstatfs(file).ok()?;
    match st.f_type as i64 {
        0x9fa0 => Some("procfs"),
        0x6265_6572 => Some("sysfs"),
        0x6462_6720 => Some("debugfs"),
        0x7472_6163 => Some("tracefs"),
        0x0027_e0eb => Some("cgroupfs"),
        0x6367_7270 => Some("cgroup2fs"),
        0xcafe_4a11 => Some("a bpf filesystem"),
        _ => None,
    }
}

/// Reads a regular file of at most `cap` bytes (not a symlink in its last
/// component, not a FIFO or device, not on procfs/sysfs), checked on the
/// open descriptor. Blocking: call it off the async runtime.
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let (f, _) = open_regular(path, cap)?;
    let mut bytes = Vec::new();
    f.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            cap,
        });
    }
    Ok(bytes)
}

/// The certificates of a PEM CA file (a regular file of at most
/// `crate::health::MAX_CA_FILE` bytes), for a TLS client's roots. The error
/// is the reason, without the path.
pub fn read_ca_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = read_regular(path, crate::health::MAX_CA_FILE).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| format!("unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no PEM CERTIFICATE found".to_owned());
    }
    Ok(roots)
}

fn open_regular(path: &Path, cap: u64) -> Result<(File, fs::Metadata), ReadError> {
    let f = open_nofollow(path).map_err(|e| match e.raw_os_error() {
        Some(e) if e == Errno::LOOP.raw_os_error() => ReadError::NotRegular,
        _ => ReadError::Io(e),
    })?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular);
    }
    if let Some(fs) = pseudo_fs(&f) {
        return Err(ReadError::Pseudo(fs));
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    if meta.len() == 0 {
        return Err(ReadError::Empty);
    }
    Ok((f, meta))
}

/// Checks that `path` could be read by [`read_regular`] (for validation,
/// without reading it).
pub fn check_regular(path: &Path, cap: u64) -> Result<(), ReadError> {
    open_regular(path, cap).map(|_| ())
}

/// Largest token file accepted.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// Reads a secret (a token file): a regular file owned by root or by this
/// process's uid, with no group or other permission bits; returns its
/// contents trimmed, refusing an empty one.
pub fn read_secret(path: &Path) -> Result<String, ReadError> {
    let (mut f, meta) = open_regular(path, MAX_TOKEN_FILE)?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(ReadError::Owner {
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ReadError::Exposed { mode });
    }
    let mut text = String::new();
    (&mut f).take(MAX_TOKEN_FILE).read_to_string(&mut text)?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(ReadError::Empty);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lb-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn writes_are_private_atomic_and_do_not_follow_symlinks() {
        let d = dir("write");
        let p = d.join("a/b/state.json");
        write_private_atomic(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&d.join("a")), 0o700);
        assert_eq!(mode(&d.join("a/b")), 0o700);
        // A symlink planted at the target is replaced, its target untouched.
        let victim = d.join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_file());
        assert_eq!(mode(&p), 0o600);
        // Nothing else is left in the directory (no temporary files).
        assert_eq!(fs::read_dir(d.join("a/b")).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_regular_bounded_files_are_read() {
        let d = dir("read");
        create_private_dir_all(&d).unwrap();
        let ok = d.join("ca.pem");
        fs::write(&ok, "pem").unwrap();
        assert_eq!(read_regular(&ok, 1024).unwrap(), b"pem");
        let e = read_regular(&ok, 2).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge { size: 3, cap: 2 }), "{e}");
        let fifo = d.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_regular(&fifo, 1024),
            Err(ReadError::NotRegular)
        ));
        let link = d.join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 1024),
            Err(ReadError::NotRegular)
        ));
        let e = read_regular(Path::new("/proc/kmsg"), 1024).unwrap_err();
        assert!(matches!(e, ReadError::Pseudo("procfs")), "{e}");
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 1024),
            Err(ReadError::NotRegular)
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn secrets_must_be_private() {
        let d = dir("secret");
        create_private_dir_all(&d).unwrap();
        let t = d.join("token");
        fs::write(&t, "s3cret\n").unwrap();
        fs::set_permissions(&t, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret(&t).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        fs::set_permissions(&t, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_secret(&t),
            Err(ReadError::Exposed { mode: 0o640 })
        ));
        fs::set_permissions(&t, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&t).unwrap(), "s3cret");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&t, Some(4242), Some(4242)).unwrap();
            let e = read_secret(&t).unwrap_err();
            assert!(matches!(e, ReadError::Owner { owner: 4242, .. }), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
