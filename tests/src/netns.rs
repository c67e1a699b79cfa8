//! Network namespaces and veth links for tests. Every name carries the test
//! process id and a counter, so tests run in parallel without clashing, and
//! `Drop` deletes every namespace made (with the links, qdiscs and programs
//! inside), also when the test panics.
use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Prefix of every namespace the tests create; `cargo xtask test` removes
/// leftovers of killed runs by it.
pub const PREFIX: &str = "lbt-";

/// Runs a command, panicking with its output when it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command inside a namespace.
pub fn run_in(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// A MAC address as `ip` writes it.
pub fn mac_string(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sets a neighbour entry in namespace `ns`, e.g. `state` "permanent".
pub fn neighbour(ns: &str, addr: &str, mac: &str, dev: &str, state: &str) {
    run_in(
        ns,
        &[
            "ip", "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", state,
        ],
    );
}

/// A set of namespaces owned by one test.
pub struct Topology {
    tag: String,
    namespaces: Vec<String>,
}

impl Topology {
    pub fn new() -> Self {
        crate::require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Self {
            tag: format!("{PREFIX}{}-{n}", std::process::id()),
            namespaces: Vec::new(),
        }
    }

    /// Creates namespace `<tag>-<role>` with its loopback up.
    pub fn namespace(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.tag);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        run_in(&name, &["ip", "link", "set", "lo", "up"]);
        name
    }

    /// The daemon tests' host: namespaces `lb` and `cl` joined by a veth,
    /// `lb0` 10.`net`.0.1/24 and `cl0` 10.`net`.0.2/24. Returns their names.
    pub fn lb_and_client(&mut self, net: u8) -> (String, String) {
        let lb = self.namespace("lb");
        let client = self.namespace("cl");
        self.veth(
            (&lb, "lb0", &[&format!("10.{net}.0.1/24")]),
            (&client, "cl0", &[&format!("10.{net}.0.2/24")]),
        );
        (lb, client)
    }

    /// A veth pair between two namespaces, each end named and addressed
    /// (CIDR notation, IPv4 or IPv6), both up.
    pub fn veth(&self, a: (&str, &str, &[&str]), b: (&str, &str, &[&str])) {
        let (ns_a, if_a, addrs_a) = a;
        let (ns_b, if_b, addrs_b) = b;
        run(&[
            "ip", "link", "add", "name", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b,
        ]);
        for (ns, ifname, addrs) in [(ns_a, if_a, addrs_a), (ns_b, if_b, addrs_b)] {
            for addr in addrs {
                let mut args = vec!["ip"];
                if addr.contains(':') {
                    args.push("-6");
                }
                args.extend_from_slice(&["addr", "add", addr, "dev", ifname]);
                if addr.contains(':') {
                    args.push("nodad");
                }
                run_in(ns, &args);
            }
            run_in(ns, &["ip", "link", "set", ifname, "up"]);
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread into namespace `ns`.
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns} not found: {e}"));
    if let Err(e) = rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    ) {
        panic!("setns({ns}): {e}");
    }
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result.
/// Sockets and netlink calls made there belong to that namespace.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts `f` on a thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns);
        f()
    })
}
