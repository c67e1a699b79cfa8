//! The setups measured end to end: a direct connection to one backend, the
//! real `lb` daemon, and the gateways users would pick instead, each
//! installed from Debian on demand and run inside the balancer namespace
//! with a config written to a temporary directory.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::daemon::{Lb, TempDir};

use crate::{load, sys::CpuGroup};

/// Every setup serves HTTPS on :443 and plain HTTP on :80 of this address,
/// in front of backends on `HTTPS_PORTS` and `HTTP_PORTS`.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
pub const HTTPS_PORTS: [u16; 3] = [8441, 8442, 8443];
pub const HTTP_PORTS: [u16; 3] = [8081, 8082, 8083];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    Direct,
    Lb,
    /// lb attached on TC ingress (`xdp_mode = "tc"`), same services.
    LbTc,
    Nft,
    Haproxy,
    Nginx,
    Caddy,
}

impl Setup {
    pub const ALL: [Setup; 7] = [
        Setup::Direct,
        Setup::Lb,
        Setup::LbTc,
        Setup::Nft,
        Setup::Haproxy,
        Setup::Nginx,
        Setup::Caddy,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Lb => "lb",
            Setup::LbTc => "lb-tc",
            Setup::Nft => "nftables",
            Setup::Haproxy => "haproxy",
            Setup::Nginx => "nginx",
            Setup::Caddy => "caddy",
        }
    }

    /// lb in either attach mode.
    pub fn is_lb(self) -> bool {
        matches!(self, Setup::Lb | Setup::LbTc)
    }

    /// A setup named on the command line (`--setups lb,nftables`).
    pub fn parse(id: &str) -> Setup {
        Setup::ALL
            .into_iter()
            .find(|s| s.id() == id)
            .unwrap_or_else(|| {
                let all: Vec<&str> = Setup::ALL.iter().map(|s| s.id()).collect();
                panic!("unknown setup {id:?}: {}", all.join(", "))
            })
    }

    pub fn label(self) -> &'static str {
        match self {
            Setup::Direct => "direct to one backend",
            Setup::Lb => "lb (XDP, local mode)",
            Setup::LbTc => "lb (TC ingress, local mode)",
            Setup::Nft => "nftables DNAT, jhash",
            Setup::Haproxy => "HAProxy, mode tcp",
            Setup::Nginx => "nginx stream",
            Setup::Caddy => "Caddy reverse_proxy (terminates TLS)",
        }
    }

    /// Debian packages, with a file that shows each is there.
    pub fn packages(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Setup::Direct | Setup::Lb | Setup::LbTc => &[],
            Setup::Nft => &[("nftables", "nft")],
            Setup::Haproxy => &[("haproxy", "haproxy")],
            Setup::Nginx => &[
                ("nginx", "nginx"),
                (
                    "libnginx-mod-stream",
                    "/usr/lib/nginx/modules/ngx_stream_module.so",
                ),
            ],
            Setup::Caddy => &[("caddy", "caddy")],
        }
    }

    /// Where the client connects for HTTPS and for HTTP.
    pub fn targets(self) -> (SocketAddr, SocketAddr) {
        match self {
            Setup::Direct => (
                SocketAddr::from((SERVICE, HTTPS_PORTS[0])),
                SocketAddr::from((SERVICE, HTTP_PORTS[0])),
            ),
            _ => (
                SocketAddr::from((SERVICE, 443)),
                SocketAddr::from((SERVICE, 80)),
            ),
        }
    }
}

/// A started setup; stops its processes on drop.
pub struct Running {
    pub lb: Option<Lb>,
    child: Option<Child>,
    pub pid: Option<u32>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) takes no pointers; the child is ours.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn list(ports: &[u16], f: impl Fn(usize, u16) -> String) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| f(i, *p))
        .collect::<Vec<_>>()
        .join("")
}

/// Runs `args` in namespace `ns` as a member of `group`: a shell joins the
/// group and then becomes the program, so everything it forks is counted.
fn spawn(
    ns: &str,
    group: Option<&CpuGroup>,
    args: &[&str],
    env: &[(&str, String)],
    log: &std::path::Path,
) -> Child {
    let join = group
        .map(|g| format!("echo $$ > {} && ", g.procs_file().display()))
        .unwrap_or_default();
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    // Room for every connection the load can hold open (HAProxy checks).
    let script = format!(
        "{join}ulimit -n 65536 2>/dev/null; exec ip netns exec {ns} {}",
        quoted.join(" ")
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn a peer")
}

/// Starts `setup` in `ns`; `Err` says why it cannot run.
pub fn start(
    setup: Setup,
    ns: &str,
    client_ns: &str,
    dir: &TempDir,
    tls: &load::Tls,
    group: Option<&CpuGroup>,
) -> Result<Running, String> {
    let svc = SERVICE;
    let mut running = Running {
        lb: None,
        child: None,
        pid: None,
    };
    let log = dir.path(&format!("{}.log", setup.id()));
    match setup {
        Setup::Direct => {}
        Setup::Lb | Setup::LbTc => {
            let backends = |ports: &[u16]| {
                ports
                    .iter()
                    .map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let config = format!(
                r#"[dataplane]
interface = "lb0"
xdp_mode = "{mode}"
flow_table_size = 1048576
max_services = 4

[admin]
listen = "127.0.0.1:9180"
state_file = {state:?}

[[services]]
name = "https"
listen = "0.0.0.0:443"
protocols = ["tcp"]
backends = [{https}]

[[services]]
name = "http"
listen = "0.0.0.0:80"
protocols = ["tcp"]
backends = [{http}]
"#,
                mode = if setup == Setup::LbTc { "tc" } else { "native" },
                state = dir.path("lb-state.json").display().to_string(),
                https = backends(&HTTPS_PORTS),
                http = backends(&HTTP_PORTS),
            );
            let path = dir.path("lb.toml");
            fs::write(&path, config).unwrap();
            let lb = Lb::start(ns, &path, "127.0.0.1:9180", &["--reset-state"]);
            if let Some(g) = group {
                let _ = fs::write(g.procs_file(), lb.pid().to_string());
            }
            running.pid = Some(lb.pid());
            running.lb = Some(lb);
        }
        Setup::Nft => {
            let rule = |port: u16, ports: &[u16]| {
                format!(
                    "\t\tip daddr {svc} tcp dport {port} dnat ip to jhash ip saddr . tcp sport mod {} map {{ {} }}\n",
                    ports.len(),
                    ports
                        .iter()
                        .enumerate()
                        .map(|(i, p)| format!("{i} : {svc} . {p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let text = format!(
                "table ip lbbench {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{}{}\t}}\n}}\n",
                rule(443, &HTTPS_PORTS),
                rule(80, &HTTP_PORTS)
            );
            let path = dir.path("lb.nft");
            fs::write(&path, text).unwrap();
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "nft", "-f"])
                .arg(&path)
                .output()
                .map_err(|e| format!("nft: {e}"))?;
            if !out.status.success() {
                return Err(format!("nft -f: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        Setup::Haproxy => {
            let text = format!(
                "global\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
                 frontend https\n    bind {svc}:443\n    default_backend https_be\n\nbackend https_be\n    balance roundrobin\n{}\n\
                 frontend http\n    bind {svc}:80\n    default_backend http_be\n\nbackend http_be\n    balance roundrobin\n{}",
                list(&HTTPS_PORTS, |i, p| format!(
                    "    server s{i} 127.0.0.1:{p}\n"
                )),
                list(&HTTP_PORTS, |i, p| format!(
                    "    server s{i} 127.0.0.1:{p}\n"
                )),
            );
            let path = dir.path("haproxy.cfg");
            fs::write(&path, text).unwrap();
            let cfg = path.display().to_string();
            running.child = Some(spawn(ns, group, &["haproxy", "-db", "-f", &cfg], &[], &log));
        }
        Setup::Nginx => {
            let d = dir.0.display().to_string();
            let text = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 20000; }}\n\
                 stream {{\n\
                 \x20   upstream https_be {{\n{}    }}\n\
                 \x20   upstream http_be {{\n{}    }}\n\
                 \x20   server {{ listen {svc}:443; proxy_pass https_be; }}\n\
                 \x20   server {{ listen {svc}:80; proxy_pass http_be; }}\n}}\n",
                list(&HTTPS_PORTS, |_, p| format!(
                    "        server 127.0.0.1:{p};\n"
                )),
                list(&HTTP_PORTS, |_, p| format!(
                    "        server 127.0.0.1:{p};\n"
                )),
            );
            let path = dir.path("nginx.conf");
            fs::write(&path, text).unwrap();
            let (cfg, err) = (
                path.display().to_string(),
                dir.path("nginx-error.log").display().to_string(),
            );
            running.child = Some(spawn(
                ns,
                group,
                &["nginx", "-p", &d, "-e", &err, "-c", &cfg],
                &[],
                &log,
            ));
        }
        Setup::Caddy => {
            fs::write(dir.path("cert.pem"), &tls.cert_pem).unwrap();
            fs::write(dir.path("key.pem"), &tls.key_pem).unwrap();
            let upstreams = HTTP_PORTS
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(" ");
            let text = format!(
                "{{\n\tadmin off\n\tauto_https off\n\tlog {{\n\t\tlevel ERROR\n\t}}\n}}\n\n\
                 https://{sni}:443 {{\n\tbind {svc}\n\ttls {cert} {key}\n\treverse_proxy {upstreams}\n}}\n\n\
                 http://:80 {{\n\tbind {svc}\n\treverse_proxy {upstreams}\n}}\n",
                sni = load::SNI,
                cert = dir.path("cert.pem").display(),
                key = dir.path("key.pem").display(),
            );
            let path = dir.path("Caddyfile");
            fs::write(&path, text).unwrap();
            let cfg = path.display().to_string();
            let home = dir.0.display().to_string();
            running.child = Some(spawn(
                ns,
                group,
                &["caddy", "run", "--adapter", "caddyfile", "--config", &cfg],
                &[
                    ("HOME", home.clone()),
                    ("XDG_DATA_HOME", format!("{home}/data")),
                    ("XDG_CONFIG_HOME", format!("{home}/config")),
                ],
                &log,
            ));
        }
    }
    if let Some(c) = &running.child {
        running.pid = Some(c.id());
    }
    // Up when both ports answer the client (the balancer's own namespace
    // would not go through XDP or the prerouting hook).
    let (https, http) = setup.targets();
    for to in [https, http] {
        if !load::wait_listening(client_ns, to, Duration::from_secs(15)) {
            let log = fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{} did not come up on {to}: {log}", setup.id()));
        }
    }
    Ok(running)
}
