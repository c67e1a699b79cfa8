//! Several balancer nodes behind a router doing ECMP, each announcing the
//! service address over BGP through its own BIRD: client -- router (BIRD,
//! multipath into the kernel) -- one bridge joining the router, 3 nodes
//! (lb in dsr mode + BIRD) and the HTTPS backends (service address on
//! `lo`). Everything lives in namespaces and processes removed on drop.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::dataplane::{AttachMode, Dataplane, Options};

use crate::{
    daemon::{BpfFs, Lb, TempDir},
    etcd::{Etcd, Member},
    https::{Backend, ClientTls, Pki},
    netns::{self, Topology, run_in},
    topology::NsRuntime,
};

pub const VIP: &str = "10.215.0.100";
pub const ROUTER: &str = "10.213.0.1";
pub const CLIENT: &str = "10.214.0.2";
const API: &str = "127.0.0.1:9180";
const ROUTER_AS: u32 = 65000;
const NODE_AS: u32 = 65001;

/// A node's address on the shared segment (`i` from 0).
pub fn node_addr(i: usize) -> String {
    format!("10.213.0.{}", 11 + i)
}

/// The client's TCP connection from `sport` to the service, as the flow
/// table keys it.
pub fn client_flow_key(sport: u16) -> lb_common::FlowKey {
    use lb_userspace::dataplane::addr_words;
    lb_common::FlowKey {
        src: addr_words(CLIENT.parse().expect("an address")),
        dst: addr_words(VIP.parse().expect("an address")),
        sport: sport.to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// A backend's address on the shared segment (`i` from 0).
pub fn backend_addr(i: usize) -> String {
    format!("10.213.0.{}", 21 + i)
}

/// Fails loudly when a program the cluster needs is missing.
pub fn require_tool(name: &str, package: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists());
    assert!(
        found,
        "`{name}` is missing: `cargo xtask setup` installs it (Debian package {package})"
    );
}

/// `bird -f` in a namespace, with its own config, socket and log.
pub struct Bird {
    pub ns: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Bird {
    pub fn start(ns: &str, config: &Path) -> Bird {
        let socket = config.with_extension("ctl");
        let log = config.with_extension("log");
        let _ = fs::remove_file(&socket);
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(config)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(config.with_extension("pid"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn bird");
        let mut bird = Bird {
            ns: ns.to_string(),
            socket,
            config: config.to_path_buf(),
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !bird.birdc(&["show", "status"]).contains("Daemon is up") {
            if let Some(s) = bird.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bird exited ({s}):\n{}", bird.log());
            }
            assert!(
                Instant::now() < deadline,
                "bird did not come up:\n{}",
                bird.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bird
    }

    /// `birdc` on this BIRD's socket: its output (empty if it failed).
    pub fn birdc(&self, args: &[&str]) -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cluster. Fields drop in order: daemons and BIRDs first, then the
/// servers, the switch ports' programs and the namespaces.
pub struct Cluster {
    pub lbs: Vec<Option<Lb>>,
    pub node_birds: Vec<Bird>,
    pub router_bird: Bird,
    /// One etcd member per node (on the node's address), when the nodes
    /// share their services through etcd.
    pub etcd: Option<Etcd>,
    pub client_rt: NsRuntime,
    pub tls: ClientTls,
    pub backends: Vec<Backend>,
    /// The backends in the nodes' configs: the first `listed`; the others
    /// run, ready to be added through the API.
    pub listed: usize,
    _backend_rts: Vec<NsRuntime>,
    _ports: Vec<Dataplane>,
    pub router: String,
    pub client: String,
    pub nodes: Vec<String>,
    pub backend_ns: Vec<String>,
    pub dir: TempDir,
    _topo: Topology,
    bpf: BpfFs,
    /// The nodes share their flow pins (`[cluster] pin_sync`).
    pin_sync: bool,
}

/// Where node `i` takes the other nodes' flow pins.
pub fn pin_sync_addr(i: usize) -> String {
    format!("{}:7946", node_addr(i))
}

fn router_config(dir: &TempDir, nodes: usize) -> PathBuf {
    let mut text = format!(
        r#"router id {ROUTER};
protocol device {{ }}
protocol kernel {{
  ipv4 {{ import none; export all; }};
  merge paths on;
}}
protocol bfd {{
  interface "*" {{ min rx interval 100 ms; min tx interval 100 ms; idle tx interval 300 ms; multiplier 3; }};
}}
template bgp node {{
  local {ROUTER} as {ROUTER_AS};
  ipv4 {{ import all; export none; }};
  bfd on;
  hold time 3; keepalive time 1;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
}}
"#
    );
    for i in 0..nodes {
        text += &format!(
            "protocol bgp node{i} from node {{ neighbor {} as {NODE_AS}; }}\n",
            node_addr(i)
        );
    }
    let p = dir.path("router.conf");
    fs::write(&p, text).unwrap();
    p
}

fn node_bird_config(dir: &TempDir, i: usize) -> PathBuf {
    let include = dir.path(&format!("node{i}-routes.conf"));
    // BIRD reads it at start; lb rewrites it.
    fs::write(&include, "").unwrap();
    let me = node_addr(i);
    let text = format!(
        r#"router id {me};
protocol device {{ }}
protocol bfd {{
  interface "*" {{ min rx interval 100 ms; min tx interval 100 ms; idle tx interval 300 ms; multiplier 3; }};
}}
include "{include}";
protocol bgp uplink {{
  local {me} as {NODE_AS};
  neighbor {ROUTER} as {ROUTER_AS};
  ipv4 {{ import none; export where proto = "lb_services4"; }};
  bfd on;
  hold time 3; keepalive time 1;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
}}
"#,
        include = include.display()
    );
    let p = dir.path(&format!("node{i}-bird.conf"));
    fs::write(&p, text).unwrap();
    p
}

/// Node `i`'s lb config: the same service on every node, its backends
/// listed in another order on each.
fn lb_config(
    dir: &TempDir,
    bpf: &BpfFs,
    i: usize,
    backends: usize,
    etcd: Option<&Etcd>,
) -> PathBuf {
    let mut list: Vec<String> = (0..backends)
        .map(|b| format!("{{ address = \"{}:443\" }}", backend_addr(b)))
        .collect();
    list.rotate_left(i % backends.max(1));
    if i % 2 == 1 {
        list.reverse();
    }
    let text = format!(
        r#"[dataplane]
interface = "eth0"
xdp_mode = "native"
flow_table_size = 65536
max_services = 4
pin_path = "{pin}"

[admin]
listen = "{API}"
state_file = "{state}"

[bgp]
bird_socket = "{sock}"
include_file = "{include}"

[[services]]
name = "web"
listen = "{VIP}:443"
protocols = ["tcp"]
forwarding = "dsr"
when_all_down = "refuse"
health = {{ kind = "tcp", interval = "100ms", timeout = "100ms", rise = 1, fall = 2 }}
backends = [{list}]
"#,
        pin = bpf.0.join(format!("node{i}")).display(),
        state = dir.path(&format!("node{i}-state.json")).display(),
        sock = dir.path(&format!("node{i}-bird.ctl")).display(),
        include = dir.path(&format!("node{i}-routes.conf")).display(),
        list = list.join(", "),
    );
    let mut text = text;
    if let Some(etcd) = etcd {
        let endpoints: Vec<String> = (0..etcd.len())
            .map(|m| format!("{:?}", etcd.client_url(m)))
            .collect();
        text += &format!(
            "\n[cluster]\netcd_endpoints = [{}]\nnode = \"node{i}\"\nname = \"test\"\n",
            endpoints.join(", ")
        );
    }
    let p = dir.path(&format!("node{i}.toml"));
    fs::write(&p, text).unwrap();
    p
}

/// Frames a veth's sender left with a half-done checksum (TX offload)
/// would leave XDP_TX broken: finish them in software.
fn full_checksums(ns: &str, ifname: &str) {
    run_in(ns, &["ethtool", "-K", ifname, "tx", "off"]);
}

/// What a cluster has beyond BGP: spare backends (running, in no node's
/// config), an etcd member per node, pin sharing.
#[derive(Clone, Copy, Debug, Default)]
struct Extras {
    spare: usize,
    etcd: bool,
    pin_sync: bool,
}

impl Cluster {
    /// `nodes` nodes and `backends` HTTPS backends, every node announcing;
    /// each node has its services from its own config file.
    pub fn start(nodes: usize, backends: usize) -> Cluster {
        Cluster::launch(nodes, backends, Extras::default())
    }

    /// The issue's whole topology: as [`Cluster::start`], and each node
    /// also runs an etcd member, the nodes sharing their services and
    /// health verdicts through the 3-member (`nodes`-member) cluster.
    pub fn start_with_etcd(nodes: usize, backends: usize) -> Cluster {
        Cluster::launch(
            nodes,
            backends,
            Extras {
                etcd: true,
                ..Extras::default()
            },
        )
    }

    /// [`Cluster::start_with_etcd`] with `spare` more backend hosts (the
    /// last ones) running but in no node's config: backends to add
    /// through the API.
    pub fn start_with_etcd_and_spares(nodes: usize, backends: usize, spare: usize) -> Cluster {
        Cluster::launch(
            nodes,
            backends + spare,
            Extras {
                spare,
                etcd: true,
                pin_sync: false,
            },
        )
    }

    /// [`Cluster::start_with_etcd`], the nodes also sharing their flow
    /// pins (`[cluster] pin_sync`, one key file for all).
    pub fn start_with_pin_sync(nodes: usize, backends: usize) -> Cluster {
        Cluster::launch(
            nodes,
            backends,
            Extras {
                spare: 0,
                etcd: true,
                pin_sync: true,
            },
        )
    }

    /// [`Cluster::start_with_pin_sync`] with `spare` more backend hosts,
    /// as [`Cluster::start_with_etcd_and_spares`].
    pub fn start_with_pin_sync_and_spares(nodes: usize, backends: usize, spare: usize) -> Cluster {
        Cluster::launch(
            nodes,
            backends + spare,
            Extras {
                spare,
                etcd: true,
                pin_sync: true,
            },
        )
    }

    fn launch(nodes: usize, backends: usize, extras: Extras) -> Cluster {
        let Extras {
            spare,
            etcd: with_etcd,
            pin_sync,
        } = extras;
        require_tool("bird", "bird2");
        require_tool("birdc", "bird2");
        let mut topo = Topology::new();
        let dir = TempDir::new("cluster");
        // One bpffs per cluster: tests of one file run side by side.
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bpf = BpfFs::mount(&format!("cluster{n}"));
        let sw = topo.namespace("sw");
        let router = topo.namespace("rt");
        let client = topo.namespace("cl");
        let node_ns: Vec<String> = (0..nodes)
            .map(|i| topo.namespace(&format!("n{i}")))
            .collect();
        let backend_ns: Vec<String> = (0..backends)
            .map(|i| topo.namespace(&format!("b{i}")))
            .collect();
        run_in(&sw, &["ip", "link", "add", "br0", "type", "bridge"]);
        run_in(&sw, &["ip", "link", "set", "br0", "up"]);
        let seg = |ns: &str, port: &str, addr: &str| {
            topo.veth((&sw, port, &[]), (ns, "eth0", &[&format!("{addr}/24")]));
            run_in(&sw, &["ip", "link", "set", port, "master", "br0"]);
        };
        seg(&router, "swr", ROUTER);
        for (i, ns) in node_ns.iter().enumerate() {
            seg(ns, &format!("swn{i}"), &node_addr(i));
        }
        for (i, ns) in backend_ns.iter().enumerate() {
            seg(ns, &format!("swb{i}"), &backend_addr(i));
        }
        topo.veth(
            (&client, "eth0", &[&format!("{CLIENT}/24")]),
            (&router, "eth1", &["10.214.0.1/24"]),
        );
        run_in(
            &client,
            &["ip", "route", "add", "default", "via", "10.214.0.1"],
        );
        full_checksums(&client, "eth0");
        for ifname in ["eth0", "eth1"] {
            full_checksums(&router, ifname);
        }
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
        ] {
            run_in(&router, &["sysctl", "-qw", key]);
        }
        for ns in &node_ns {
            run_in(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            run_in(ns, &["ip", "route", "add", "default", "via", ROUTER]);
        }
        for ns in &backend_ns {
            run_in(
                ns,
                &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
            );
            run_in(ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"]);
            run_in(ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"]);
            run_in(ns, &["ip", "route", "add", "default", "via", ROUTER]);
        }
        // A veth hands XDP_TX frames to its peer only when the peer runs an
        // XDP program: the nodes' switch ports get one that passes all.
        let ports: Vec<Dataplane> = (0..nodes)
            .map(|i| {
                let port = format!("swn{i}");
                netns::within(&sw, move || {
                    let mut dp = Dataplane::load(Options {
                        max_services: 1,
                        maglev_size: 251,
                        flow_table_size: 1024,
                        ..Options::default()
                    })
                    .unwrap();
                    dp.attach(&port, AttachMode::Native)
                        .expect("attach to the switch port");
                    dp
                })
            })
            .collect();
        // Real HTTPS backends, each with a certificate of its own.
        let pki = Pki::new();
        let tls = pki.client(&[]);
        let mut rts = Vec::new();
        let mut servers = Vec::new();
        for (i, ns) in backend_ns.iter().enumerate() {
            let rt = NsRuntime::new(ns, 1);
            let identity = pki.issue(&format!("b{i}.test"));
            tls.learn(&identity);
            servers.push(Backend::start_with(&rt, 443, identity, false));
            rts.push(rt);
        }
        let router_bird = Bird::start(&router, &router_config(&dir, nodes));
        let node_birds: Vec<Bird> = node_ns
            .iter()
            .enumerate()
            .map(|(i, ns)| Bird::start(ns, &node_bird_config(&dir, i)))
            .collect();
        let etcd = with_etcd.then(|| {
            let etcd = Etcd::start(
                node_ns
                    .iter()
                    .enumerate()
                    .map(|(i, ns)| Member {
                        ns: ns.clone(),
                        ip: node_addr(i),
                    })
                    .collect(),
            );
            etcd.wait_healthy(Duration::from_secs(20));
            etcd
        });
        let mut cluster = Cluster {
            lbs: Vec::new(),
            node_birds,
            router_bird,
            etcd,
            client_rt: NsRuntime::new(&client, 4),
            tls,
            backends: servers,
            listed: backends - spare,
            _backend_rts: rts,
            _ports: ports,
            router,
            client,
            nodes: node_ns,
            backend_ns,
            dir,
            _topo: topo,
            bpf,
            pin_sync,
        };
        for i in 0..nodes {
            let lb = cluster.start_lb(i);
            cluster.lbs.push(Some(lb));
        }
        cluster
    }

    /// Starts backend `i` again after [`Backend::kill`].
    pub fn restart_backend(&mut self, i: usize) {
        let identity = self.backends[i].identity.clone();
        self.backends[i] = Backend::start_with(&self._backend_rts[i], 443, identity, false);
    }

    /// Writes node `i`'s config file afresh; its path.
    fn node_config(&self, i: usize) -> PathBuf {
        let config = lb_config(&self.dir, &self.bpf, i, self.listed, self.etcd.as_ref());
        if self.pin_sync {
            let key = self.dir.secret("pinsync.key", &"k".repeat(32));
            let mut text = fs::read_to_string(&config).unwrap();
            text += &format!(
                "pin_sync = {{ listen = \"{}\", key_file = \"{}\" }}\n",
                pin_sync_addr(i),
                key.display()
            );
            fs::write(&config, text).unwrap();
        }
        config
    }

    /// Starts node `i`'s lb (its config is the same at every start).
    pub fn start_lb(&self, i: usize) -> Lb {
        let config = self.node_config(i);
        Lb::start(&self.nodes[i], &config, API, &[])
    }

    /// Starts node `i`'s lb on its config as `edit` changes it: a
    /// node-local setting (the next [`Cluster::start_lb`] restores it).
    pub fn start_lb_edited(&self, i: usize, edit: impl FnOnce(String) -> String) -> Lb {
        let config = self.node_config(i);
        let text = fs::read_to_string(&config).unwrap();
        fs::write(&config, edit(text)).unwrap();
        Lb::start(&self.nodes[i], &config, API, &[])
    }

    /// Runs `f` in node `i`'s namespace on the node's data plane as its
    /// daemon left it in the kernel: the object loaded once more on the
    /// node's pinned maps (its live tables, pins and next-hop cache), not
    /// attached, with the ifindex of the node's `eth0` (packet fixtures
    /// arrive there). Works after the node died: the maps stay pinned.
    pub fn on_node_dataplane<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce(&Dataplane, u32) -> T + Send + 'static,
    ) -> T {
        let config = self.dir.path(&format!("node{i}.toml"));
        let ifindex: u32 = run_in(&self.nodes[i], &["cat", "/sys/class/net/eth0/ifindex"])
            .trim()
            .parse()
            .expect("eth0's ifindex");
        netns::within(&self.nodes[i], move || {
            let config = lb_userspace::config::Config::load(&config)
                .unwrap_or_else(|e| panic!("node {i}'s config: {e}"));
            assert!(
                config.dataplane.pin_path.is_some() && config.dataplane.record_path.is_some(),
                "node {i} pins its maps"
            );
            // The daemon's options, so the pinned maps are adopted as they
            // are (other sizes would make new ones).
            let dp =
                Dataplane::load(config.dataplane).expect("the object loads on the pinned maps");
            assert!(
                dp.recorded_ids().services.contains_key("web"),
                "node {i}'s record names web"
            );
            f(&dp, ifindex)
        })
    }

    /// New flows node `i`'s program counted (every service), read from its
    /// pinned stats map: one syscall per service, cheap enough to tell
    /// which node each new connection went through.
    pub fn pinned_new_flows(&self, i: usize) -> u64 {
        use aya::maps::{Map, MapData, PerCpuArray};
        let path = lb_userspace::pins::maps_dir(&self.bpf.0.join(format!("node{i}")))
            .join(lb_common::maps::SERVICE_STATS);
        let data = MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("node {i}'s stats map {}: {e}", path.display()));
        let stats: PerCpuArray<MapData, lb_common::Counters> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
        (0..stats.len())
            .filter_map(|k| stats.get(&k, 0).ok())
            .map(|per_cpu| per_cpu.iter().map(|c| c.new_flows).sum::<u64>())
            .sum()
    }

    /// Each backend host's MAC address on the segment (a `dsr` frame's
    /// destination names its backend).
    pub fn backend_macs(&self) -> Vec<[u8; 6]> {
        self.backend_ns
            .iter()
            .map(|ns| {
                let text = run_in(ns, &["cat", "/sys/class/net/eth0/address"]);
                let bytes: Vec<u8> = text
                    .trim()
                    .split(':')
                    .map(|b| u8::from_str_radix(b, 16).expect("a MAC address"))
                    .collect();
                bytes.try_into().expect("6 bytes")
            })
            .collect()
    }

    /// Kills node `i` whole, as when its machine dies: its link goes down
    /// first (the router learns it only through BFD), then its lb, BIRD
    /// and etcd member get SIGKILL.
    pub fn kill_node(&mut self, i: usize) {
        run_in(&self.nodes[i], &["ip", "link", "set", "eth0", "down"]);
        if let Some(mut lb) = self.lbs[i].take() {
            lb.kill();
        }
        self.node_birds[i].kill();
        if let Some(etcd) = self.etcd.as_mut() {
            etcd.kill(i);
        }
    }

    /// Node `i`'s view of the service `web` (`GET /api/v1/services/web`).
    pub fn web(&self, i: usize) -> serde_json::Value {
        let (status, body) = self.lb(i).get("/api/v1/services/web");
        assert_eq!(status, 200, "node {i}: {body}");
        body
    }

    /// Node `i`'s daemon status (`GET /api/v1/status`).
    pub fn status(&self, i: usize) -> serde_json::Value {
        let (status, body) = self.lb(i).get("/api/v1/status");
        assert_eq!(status, 200, "node {i}: {body}");
        body
    }

    /// Node `i`'s table fingerprint of `web` ("" when its lb is not
    /// running).
    pub fn fingerprint(&self, i: usize) -> String {
        match self.lbs[i] {
            Some(_) => self.web(i)["table_fingerprint"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        }
    }

    /// Each node's table fingerprint of `web` ([`Cluster::fingerprint`]).
    pub fn fingerprints(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.fingerprint(i)).collect()
    }

    /// Waits (up to `within`) until every node has the same table of `web`
    /// and it is not `before`: a change reached all of them. Returns how
    /// long it took.
    pub fn wait_new_table(&self, what: &str, before: &str, within: Duration) -> Duration {
        crate::wait_for(what, within, || {
            let f = self.fingerprints();
            f.iter().all(|x| *x == f[0] && x != before)
        })
    }

    /// Brings node `i` back after [`Cluster::kill_node`], as a machine that
    /// rebooted: its bpffs is empty (no pins, no attached program), its
    /// disk kept (etcd's data dir, lb's state file). Link up and its
    /// default route back, etcd member, BIRD, then lb, which must rejoin,
    /// take etcd's services and the peers' pins before it announces.
    /// Returns when lb answers (not when it announces).
    pub fn revive_node(&mut self, i: usize) {
        assert!(self.lbs[i].is_none(), "node {i} is running");
        lb_userspace::pins::remove_all(&self.bpf.0.join(format!("node{i}")));
        let ns = self.nodes[i].clone();
        run_in(&ns, &["ip", "link", "set", "eth0", "up"]);
        run_in(&ns, &["ip", "route", "replace", "default", "via", ROUTER]);
        if let Some(etcd) = self.etcd.as_mut() {
            etcd.spawn(i);
            etcd.wait_healthy(Duration::from_secs(20));
        }
        self.node_birds[i] = Bird::start(&ns, &node_bird_config(&self.dir, i));
        let lb = self.start_lb(i);
        self.lbs[i] = Some(lb);
    }

    pub fn lb(&self, i: usize) -> &Lb {
        self.lbs[i].as_ref().expect("node's lb is running")
    }

    /// The router's kernel next hops for the service address.
    pub fn next_hops(&self) -> Vec<String> {
        router_next_hops(&self.router)
    }

    /// Waits until the router's next hops are the nodes `want`; how long.
    pub fn wait_next_hops(&self, want: &[usize], within: Duration) -> Duration {
        let mut want: Vec<String> = want.iter().map(|i| node_addr(*i)).collect();
        want.sort();
        let start = Instant::now();
        loop {
            let hops = self.next_hops();
            if hops == want {
                return start.elapsed();
            }
            if start.elapsed() > within {
                panic!(
                    "the router's next hops for {VIP} are {hops:?}, not {want:?} after {within:?}\n\
                     router: {}\nnode BIRDs: {:?}",
                    self.router_bird.birdc(&["show", "protocols"]),
                    self.node_birds
                        .iter()
                        .map(|b| b.birdc(&["show", "route"]))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends the client's TCP connections from source port `sport` through
    /// node `node` only (a policy rule on the router), or (None) back to
    /// ECMP: the same 5-tuple through each node in turn.
    pub fn steer(&self, sport: u16, node: Option<usize>) {
        let port = sport.to_string();
        let rule = [
            "ip", "rule", "add", "iif", "eth1", "ipproto", "tcp", "sport", &port, "lookup", "100",
            "pref", "100",
        ];
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router,
                "ip",
                "rule",
                "del",
                "pref",
                "100",
            ])
            .output();
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router,
                "ip",
                "route",
                "flush",
                "table",
                "100",
            ])
            .output();
        if let Some(i) = node {
            run_in(&self.router, &rule);
            run_in(
                &self.router,
                &[
                    "ip",
                    "route",
                    "replace",
                    &format!("{VIP}/32"),
                    "via",
                    &node_addr(i),
                    "table",
                    "100",
                ],
            );
        }
    }

    /// One HTTPS GET from source port `sport`: the backend that answered.
    pub fn get_from(&self, sport: u16) -> String {
        let to: SocketAddr = format!("{VIP}:443").parse().unwrap();
        let tls = self.tls.clone();
        let reply = self
            .client_rt
            .run(async move { tls.get(to, "/", Some(sport)).await })
            .unwrap_or_else(|f| panic!("GET from port {sport}: {f}"));
        assert_eq!(reply.cert, reply.body);
        reply.cert
    }

    /// `n` HTTPS GETs to the service, each over a new connection from a new
    /// source port, 8 at a time. Returns (answers per backend, failures).
    pub fn spread(&self, n: usize) -> (Vec<usize>, Vec<String>) {
        const WORKERS: usize = 8;
        let to: SocketAddr = format!("{VIP}:443").parse().unwrap();
        let tls = self.tls.clone();
        let results = self
            .client_rt
            .run(async move { tls.get_many(to, n, WORKERS).await });
        let mut per = vec![0; self.backends.len()];
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(reply) => {
                    assert_eq!(reply.cert, reply.body, "TLS passed through untouched");
                    let i = self
                        .backends
                        .iter()
                        .position(|b| b.name == reply.cert)
                        .unwrap_or_else(|| panic!("{} is no backend", reply.cert));
                    per[i] += 1;
                }
                Err(f) => failures.push(f.to_string()),
            }
        }
        (per, failures)
    }
}

/// The next hops for the service address in the kernel of namespace
/// `router` (sorted; callable from another thread than the cluster's).
pub fn router_next_hops(router: &str) -> Vec<String> {
    let out = run_in(router, &["ip", "-4", "route", "show", &format!("{VIP}/32")]);
    let mut hops: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    hops
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a running process");
    rustix::process::kill_process(pid, sig).expect("signal");
}

/// New flows node `lb` balanced since its data plane loaded (all services,
/// all backends).
pub fn new_flows(lb: &Lb) -> u64 {
    crate::topology::Metrics::scrape(lb)
        .0
        .iter()
        .filter(|((name, _), _)| name == "lb_new_flows_total")
        .map(|(_, v)| *v as u64)
        .sum()
}
