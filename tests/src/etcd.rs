//! Real etcd clusters for the cluster-mode tests: members started in the
//! test's namespaces (all in one, or one per balancer node), signalled,
//! killed and started again; every member is resumed and killed on drop.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::daemon::TempDir;

/// Member `i`'s client port (members sharing a namespace need their own).
pub fn client_port(i: usize) -> u16 {
    2379 + 10 * i as u16
}

/// Member `i`'s peer port.
pub fn peer_port(i: usize) -> u16 {
    2380 + 10 * i as u16
}

/// Where a member runs: its namespace and the address its peers and
/// clients use.
#[derive(Clone, Debug)]
pub struct Member {
    pub ns: String,
    pub ip: String,
}

pub struct Etcd {
    pub dir: TempDir,
    members: Vec<Member>,
    children: Vec<Option<Child>>,
}

/// Fails the test, naming the package, when etcd is not installed.
pub fn require_etcd() {
    let have = Command::new("etcd").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "etcd is missing: `cargo xtask setup` installs it (Debian's etcd-server)"
    );
}

impl Etcd {
    /// A new cluster of `members` (plain http, fast elections).
    pub fn start(members: Vec<Member>) -> Etcd {
        require_etcd();
        let mut e = Etcd {
            dir: TempDir::new("etcd"),
            children: members.iter().map(|_| None).collect(),
            members,
        };
        for i in 0..e.members.len() {
            e.spawn(i);
        }
        e
    }

    /// `n` members on loopback in one namespace.
    pub fn in_namespace(ns: &str, n: usize) -> Etcd {
        let member = Member {
            ns: ns.to_string(),
            ip: "127.0.0.1".to_string(),
        };
        Etcd::start(vec![member; n])
    }

    /// One member started by the caller (e.g. with TLS options), killed on
    /// drop like the others.
    pub fn adopt(ns: &str, dir: TempDir, child: Child) -> Etcd {
        Etcd {
            dir,
            members: vec![Member {
                ns: ns.to_string(),
                ip: "127.0.0.1".to_string(),
            }],
            children: vec![Some(child)],
        }
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client URL as its namespace's neighbours reach it.
    pub fn client_url(&self, i: usize) -> String {
        format!("http://{}:{}", self.members[i].ip, client_port(i))
    }

    /// Starts member `i` (again: its data directory is kept, so a killed
    /// member rejoins with what it had).
    pub fn spawn(&mut self, i: usize) {
        let peer = |j: usize| format!("http://{}:{}", self.members[j].ip, peer_port(j));
        let cluster: Vec<String> = (0..self.members.len())
            .map(|j| format!("m{j}={}", peer(j)))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path(&format!("m{i}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.members[i].ns, "etcd"])
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path(&format!("m{i}.data")))
            .args([
                "--listen-peer-urls",
                &peer(i),
                "--initial-advertise-peer-urls",
                &peer(i),
                "--listen-client-urls",
                &format!("http://0.0.0.0:{}", client_port(i)),
                "--advertise-client-urls",
                &self.client_url(i),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "lbt",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.children[i] = Some(child);
    }

    /// Waits until every running member answers as part of a cluster with
    /// a leader.
    pub fn wait_healthy(&self, within: Duration) {
        let start = Instant::now();
        let urls: Vec<String> = (0..self.members.len())
            .filter(|i| self.children[*i].is_some())
            .map(|i| self.client_url(i))
            .collect();
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.members[0].ns, "etcdctl"])
                .args(["--endpoints", &urls.join(","), "endpoint", "health"])
                .args(["--command-timeout", "1s"])
                .output()
                .expect("run etcdctl (Debian's etcd-client)");
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < within,
                "etcd is not healthy after {within:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, i: usize, sig: rustix::process::Signal) {
        if let Some(c) = &self.children[i] {
            // `ip netns exec` execs etcd: the child is etcd itself.
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path(&format!("m{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.signal(i, rustix::process::Signal::CONT);
            self.kill(i);
        }
    }
}
