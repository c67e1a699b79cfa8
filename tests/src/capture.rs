//! A packet capture on one interface of a test namespace (AF_PACKET), for
//! tests that must see which MAC a frame came from.
use std::{
    ffi::CString,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Vec<u8>>>,
}

const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET socket that sees every frame of interface `ifname` in the
/// calling thread's namespace, in and out. The caller closes it.
pub fn packet_socket(ifname: &std::ffi::CStr) -> i32 {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ALL.to_be()) as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `ifname` is a valid NUL-terminated string for the call.
    let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    assert!(ifindex > 0, "no interface {ifname:?}");
    // SAFETY: sockaddr_ll is plain integers; all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a live sockaddr_ll and the length given is its size.
    let rc = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

impl Capture {
    /// Starts capturing every frame on `ifname` in namespace `ns`.
    pub fn start(ns: &str, ifname: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ifname = CString::new(ifname).unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = crate::netns::spawn_in(ns, move || {
            let fd = packet_socket(&ifname);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: `tv` is a live timeval and the length given is its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            // Bounded: at most a million frames.
            while !flag.load(Ordering::Relaxed) && frames.len() < 1_000_000 {
                // SAFETY: `buf` is writable for the `buf.len()` bytes given.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            // SAFETY: `fd` is this thread's own socket, closed once.
            unsafe { libc::close(fd) };
            frames
        });
        ready_rx.recv().expect("capture started");
        Capture { stop, handle }
    }

    /// Stops and returns every frame seen.
    pub fn stop(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("capture thread")
    }
}
