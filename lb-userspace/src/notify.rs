//! The systemd notification protocol (`sd_notify(3)`), by hand: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). No
//! libsystemd. Without `$NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`) every call does nothing.
use std::{
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
    time::Duration,
};

/// Where notifications go, read once from the environment.
#[derive(Debug)]
pub struct Notifier {
    target: Option<std::os::unix::net::SocketAddr>,
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; an unusable value is reported once in the log
    /// and ignored.
    pub fn from_env() -> Notifier {
        Self::from_value(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// From a `$NOTIFY_SOCKET` value (tests give one without touching the
    /// environment).
    fn from_value(value: Option<std::ffi::OsString>) -> Notifier {
        let target = value.and_then(|v| {
            let v = v.to_string_lossy().to_string();
            let addr = match v.strip_prefix('@') {
                Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
                None if v.starts_with('/') => std::os::unix::net::SocketAddr::from_pathname(&v),
                None => {
                    tracing::warn!(value = %v, "NOTIFY_SOCKET is neither a path nor @abstract; not notifying systemd");
                    return None;
                }
            };
            addr.map_err(|e| tracing::warn!("NOTIFY_SOCKET {v}: {e}")).ok()
        });
        let socket = target.as_ref().and_then(|_| UnixDatagram::unbound().ok());
        Notifier { target, socket }
    }

    /// True when systemd (or a test) listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines); errors are
    /// logged at debug level, never fatal.
    pub fn send(&self, state: &str) {
        if let (Some(sock), Some(addr)) = (&self.socket, &self.target)
            && let Err(e) = sock.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!("sd_notify {state:?}: {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic time systemd asks for.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config",
            monotonic_usec()
        ));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// `CLOCK_MONOTONIC` in microseconds.
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is set
/// for this process (`$WATCHDOG_PID` absent or ours), else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy().trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("lb-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let name = format!("lb-notify-test-{}", std::process::id());
        let abs = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        for (listener, value) in [
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            ),
            (UnixDatagram::bind_addr(&abs).unwrap(), format!("@{name}")),
        ] {
            listener
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let n = Notifier::from_value(Some(value.clone().into()));
            assert!(n.enabled());
            n.ready("serving");
            let mut buf = [0u8; 256];
            let len = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving", "{value}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!Notifier::from_env().enabled());
    }
}
