//! The real `lb` binary as a child process inside a test namespace, and an
//! HTTP client that reaches its admin API there.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netns;

/// The `lb` binary next to this test executable (`cargo xtask test` builds
/// it before the tests run).
pub fn lb_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            // Test binaries live in deps/, the demo in examples/.
            if d.ends_with("deps") || d.ends_with("examples") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target directory");
    let lb = dir.join("lb");
    assert!(
        lb.exists(),
        "{} is missing: build it first (`cargo build -p lb-userspace`; `cargo xtask test` does)",
        lb.display()
    );
    lb
}

/// A scratch directory: `.0` is its path, `.1` the `tempfile` guard that
/// removes it on drop.
pub struct TempDir(pub PathBuf, pub tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lbt-{tag}-"))
            .tempdir()
            .expect("a scratch directory");
        Self(dir.path().to_owned(), dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` with mode 0600 (what the daemon wants of
    /// token files); its path.
    pub fn secret(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p
    }
}

/// A bpf filesystem of the test's own, mounted where every `ip netns exec`
/// sees it, so pins outlive the daemon process that made them. Unmounted
/// (which detaches whatever is still pinned there) on drop.
pub struct BpfFs(pub PathBuf);

impl BpfFs {
    pub fn mount(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/run/lbt-{}-{tag}-bpf", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        crate::netns::run(&["mount", "-t", "bpf", "bpf", dir.to_str().unwrap()]);
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// `lb run` in a namespace. Stopped with SIGTERM (then SIGKILL) on drop.
pub struct Lb {
    pub ns: String,
    pub api: String,
    /// The daemon's admin socket: `admin.socket` from the config, else
    /// `lb.sock` in the runtime directory the harness gives each config.
    pub socket: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Lb {
    /// Starts `lb run --config <config>` in `ns` and waits for its API.
    pub fn start(ns: &str, config: &Path, api: &str, extra: &[&str]) -> Lb {
        Self::start_logging(ns, config, api, extra, "info")
    }

    /// Like [`Lb::start`], logging at `rust_log` (a `RUST_LOG` filter).
    pub fn start_logging(ns: &str, config: &Path, api: &str, extra: &[&str], rust_log: &str) -> Lb {
        Self::start_with(
            ns,
            config,
            api,
            extra,
            &Launch {
                rust_log: rust_log.into(),
                ..Launch::default()
            },
        )
    }

    /// `lb run` without waiting for its API: the caller watches it (it may
    /// be meant to fail).
    pub fn spawn(ns: &str, config: &Path, api: &str, extra: &[&str], launch: &Launch) -> Lb {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = config.with_extension(format!("{n}.log"));
        let out = fs::File::create(&log).unwrap();
        let (runtime_dir, socket) = admin_socket(config);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(&launch.prefix);
        let child = cmd
            .arg(lb_binary())
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .env(
                "RUST_LOG",
                if launch.rust_log.is_empty() {
                    "info"
                } else {
                    &launch.rust_log
                },
            )
            // As systemd's RuntimeDirectory= would: one per config, so
            // daemons of different tests never share a socket.
            .env("RUNTIME_DIRECTORY", &runtime_dir)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn lb");
        Lb {
            ns: ns.to_string(),
            api: api.to_string(),
            socket,
            child: Some(child),
            log,
        }
    }

    /// Like [`Lb::start`], with environment variables and a command prefix
    /// (e.g. `prlimit --nofile=512:`) for the daemon.
    pub fn start_with(ns: &str, config: &Path, api: &str, extra: &[&str], launch: &Launch) -> Lb {
        let mut lb = Self::spawn(ns, config, api, extra, launch);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = lb.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("lb exited early ({status}):\n{}", lb.log());
            }
            if lb.get("/healthz").0 == 200 {
                return lb;
            }
            assert!(
                Instant::now() < deadline,
                "lb did not come up:\n{}",
                lb.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kills the daemon outright (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("the daemon is running");
        let sig = rustix::process::Signal::from_named_raw(sig).expect("a named signal");
        let _ = rustix::process::kill_process(pid, sig);
    }

    /// Waits up to `within` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        sigterm(&child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("lb did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An API call from inside the namespace: (status, JSON body or Null).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let (status, text) = self.raw(method, path, body, token);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, None)
    }

    /// Like `call`, returning the body as text. Without a token the
    /// request goes through the admin socket (admin scope, as the CLI
    /// does); with one, over TCP to `api`.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, String) {
        match token {
            None => unix_http(&self.socket, method, path, body),
            Some(_) => self.tcp(method, path, body, token),
        }
    }

    /// One request over TCP to `api` from inside the namespace, with or
    /// without a token: (status, body text).
    pub fn tcp(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, String) {
        let url = format!("http://{}{path}", self.api);
        let method = method.to_string();
        let body = body.map(str::to_string);
        let token = token.map(str::to_string);
        netns::within(&self.ns, move || {
            http(&method, &url, body.as_deref(), token.as_deref())
        })
    }

    /// Runs the `lb` CLI against this daemon's admin socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = args.to_vec();
        let socket = self.socket.display().to_string();
        all.extend(["--socket", socket.as_str()]);
        lb_cli(&self.ns, &all)
    }
}

/// The runtime directory the harness gives a daemon of `config`, and the
/// admin socket that daemon serves: `admin.socket` when the config sets
/// it, else `lb.sock` in that directory.
pub fn admin_socket(config: &Path) -> (PathBuf, PathBuf) {
    let runtime = config.with_extension("run");
    let text = fs::read_to_string(config).unwrap_or_default();
    let mut in_admin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_admin = line == "[admin]";
        } else if in_admin
            && let Some(v) = line.strip_prefix("socket").map(str::trim_start)
            && let Some(v) = v.strip_prefix('=')
        {
            return (runtime, PathBuf::from(v.trim().trim_matches('"')));
        }
    }
    let socket = runtime.join("lb.sock");
    (runtime, socket)
}

/// One request over a Unix socket: (status, body text); 0 when the socket
/// cannot be reached.
pub fn unix_http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body = match (method, body) {
        ("GET" | "DELETE", None) => None,
        (_, b) => Some(b.unwrap_or("")),
    };
    match lb_userspace::client::request(
        &lb_userspace::client::Endpoint::Unix(socket.to_path_buf()),
        method,
        path,
        body.map(str::as_bytes),
        None,
        Duration::from_secs(10),
    ) {
        Ok(a) => (a.status, String::from_utf8_lossy(&a.body).into_owned()),
        Err(_) => (0, String::new()),
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c);
        }
    }
}

fn sigterm(c: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Ends `c`: SIGTERM, then SIGKILL after five seconds.
pub fn terminate(mut c: Child) {
    sigterm(&c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if c.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// How [`Lb::start_with`] runs the daemon.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    pub env: Vec<(String, String)>,
    /// Words before the `lb` binary, inside the namespace.
    pub prefix: Vec<String>,
    /// A `RUST_LOG` filter ("info" when empty).
    pub rust_log: String,
}

/// `lb validate --config <path>`: its exit code and what it wrote to
/// stderr.
pub fn lb_validate(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(path)
        .output()
        .expect("run lb validate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the `lb` CLI (`lb status`, `lb stop`, ...) inside `ns`.
pub fn lb_cli(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(lb_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run lb")
}

/// One HTTP request; connection errors are status 0.
pub fn http(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match method {
        "GET" => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "DELETE" => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        m => {
            let mut r = match m {
                "POST" => agent.post(url),
                "PUT" => agent.put(url),
                "PATCH" => agent.patch(url),
                other => panic!("method {other}"),
            };
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r = r.header("Content-Type", "application/json");
            r.send(body.unwrap_or(""))
        }
    };
    match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            (status, resp.body_mut().read_to_string().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}
