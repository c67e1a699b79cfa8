//! The crate's only `unsafe` code, behind safe functions: a shared memory
//! mapping of a map (the Maglev tables) and handing the eBPF logger's
//! descriptor to tokio, and the ioctls that make the announce TUN device.
//! Every other system call goes through `rustix`/`nix`.

use std::{io, os::fd::AsFd, ptr::NonNull};

use rustix::mm::{MapFlags, ProtFlags};
use tokio::io::{Interest, unix::AsyncFd};

use crate::dataplane::EbpfLog;

/// `len` values of `T` mapped `MAP_SHARED` from a map's descriptor: memory
/// the eBPF programs read while this process writes it.
pub struct SharedMapping<T: aya::Pod> {
    ptr: NonNull<T>,
    len: usize,
    writable: bool,
}

// SAFETY: the pointer is to a mapping owned by this value and valid until
// drop; moving it to another thread changes nothing.
unsafe impl<T: aya::Pod + Send> Send for SharedMapping<T> {}
// SAFETY: shared access only reads (`as_slice`); writes need `&mut self`.
unsafe impl<T: aya::Pod + Sync> Sync for SharedMapping<T> {}

impl<T: aya::Pod> SharedMapping<T> {
    /// Maps the first `len` values of the map behind `fd` (a map made with
    /// `BPF_F_MMAPABLE`), read-only unless `writable`.
    pub fn new(fd: impl AsFd, len: usize, writable: bool) -> io::Result<Self> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        let bytes = len * size_of::<T>();
        // SAFETY: a fresh mapping at an address the kernel picks, so nothing
        // else is overlaid; the kernel checks the length against the map.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), bytes, prot, MapFlags::SHARED, fd, 0)
        }?;
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, writable })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` values are mapped at `ptr` for as long as `self`
        // lives, and any bytes are a valid `T` (`Pod`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Panics on a read-only mapping (a write there would fault).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        assert!(self.writable, "write to a read-only mapping");
        // SAFETY: as `as_slice`, the mapping is writable, and `&mut self`
        // makes this the only access from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: aya::Pod> Drop for SharedMapping<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made, once, at the end of its
        // life; no slice of it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len * size_of::<T>()) };
    }
}

type EbpfLogger = aya_log::EbpfLogger<EbpfLog>;

/// Registers the eBPF logger with tokio's reactor, to be woken when its
/// ring buffer has records.
pub fn async_ebpf_logger(logger: EbpfLogger) -> io::Result<AsyncFd<EbpfLogger>> {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, and
    // the same, for as long as it lives inside the AsyncFd.
    unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// `struct ifreq` with the `short` flags member of its union (40 bytes on
/// Linux), for the TUN and interface-flags ioctls.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> io::Result<Self> {
        let mut n = [0u8; 16];
        if name.is_empty() || name.len() >= n.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name must be 1 to 15 bytes",
            ));
        }
        n[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Self {
            name: n,
            flags,
            _pad: [0; 22],
        })
    }
}

const IFF_UP: i16 = 0x1;
const IFF_TUN: i16 = 0x1;
const IFF_NO_PI: i16 = 0x1000;
const TUNSETIFF: rustix::ioctl::Opcode = rustix::ioctl::opcode::write::<i32>(b'T', 202);
const SIOCGIFFLAGS: rustix::ioctl::Opcode = 0x8913;
const SIOCSIFFLAGS: rustix::ioctl::Opcode = 0x8914;

/// Creates the TUN device `name` (not persistent: the kernel removes it
/// when the returned descriptor closes, the process's death included) and
/// sets it up.
pub fn tun_device(name: &str) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::{
        fs::{Mode, OFlags},
        ioctl::{Setter, Updater, ioctl},
        net::{AddressFamily, SocketType},
    };
    let fd = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let req = IfReq::new(name, IFF_TUN | IFF_NO_PI)?;
    // SAFETY: TUNSETIFF reads a `struct ifreq` (name and short flags), which
    // `IfReq` lays out; the kernel copies it and keeps no pointer.
    unsafe { ioctl(&fd, Setter::<TUNSETIFF, IfReq>::new(req)) }?;
    let sock = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    let mut req = IfReq::new(name, 0)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of the
    // `struct ifreq` it is given, which lives until the call returns.
    unsafe { ioctl(&sock, Updater::<SIOCGIFFLAGS, IfReq>::new(&mut req)) }?;
    req.flags |= IFF_UP;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq` (name and flags).
    unsafe { ioctl(&sock, Setter::<SIOCSIFFLAGS, IfReq>::new(req)) }?;
    Ok(fd)
}
