//! The health checker under load: 1,000 HTTP backends on loopback, a third
//! of them accepting connections and never answering. Measured over a
//! bounded window: the healthy ones keep their check interval (the hanging
//! ones, each holding a check slot for its whole timeout, do not stall
//! them), every verdict is right, and memory and file descriptors stay
//! bounded.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_userspace::health::{CheckKind, CheckSpec, Checker, ResultHook, Target};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::{Builder, Runtime},
    time::Instant,
};

const BACKENDS: usize = 1000;
const HANGING_EVERY: usize = 3;
const INTERVAL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_millis(300);
const MAX_CONCURRENT: usize = 256;
/// First checks start within one interval; the hanging ones fall after
/// three timeouts. Measure after that.
const WARMUP: Duration = Duration::from_millis(2500);
const WINDOW: Duration = Duration::from_secs(5);
/// A second window, to see that memory does not keep growing.
const SOAK: Duration = Duration::from_secs(3);

/// Raises the soft open-file limit to the hard one: the test holds 1,000
/// listeners plus the connections in flight.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Binds the backends on the servers' runtime: healthy ones answer 200,
/// every third one reads the request and never answers (it waits for the
/// checker to give up and close).
fn backends(rt: &Runtime) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    rt.block_on(async {
        let mut healthy = Vec::new();
        let mut hanging = Vec::new();
        for i in 0..BACKENDS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().unwrap();
            let hangs = i % HANGING_EVERY == HANGING_EVERY - 1;
            if hangs {
                hanging.push(addr);
            } else {
                healthy.push(addr);
            }
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if !read_head(&mut stream).await {
                            return;
                        }
                        if hangs {
                            let mut rest = [0u8; 64];
                            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                        } else {
                            let _ = stream
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\
                                      Connection: close\r\n\r\n",
                                )
                                .await;
                        }
                    });
                }
            });
        }
        (healthy, hanging)
    })
}

type Log = Arc<Mutex<HashMap<SocketAddr, Vec<(Instant, &'static str)>>>>;

/// Per target: checks completed inside `[from, to)`, and the gaps between
/// consecutive completions that end inside it.
fn pace(log: &[(Instant, &'static str)], from: Instant, to: Instant) -> (usize, Vec<Duration>) {
    let n = log.iter().filter(|(t, _)| *t >= from && *t < to).count();
    let gaps = log
        .windows(2)
        .filter(|w| w[1].0 >= from && w[1].0 < to)
        .map(|w| w[1].0 - w[0].0)
        .collect();
    (n, gaps)
}

struct Pace {
    counts: Vec<usize>,
    gaps: Vec<Duration>,
}

impl Pace {
    fn of(
        log: &HashMap<SocketAddr, Vec<(Instant, &'static str)>>,
        targets: &[SocketAddr],
        from: Instant,
        to: Instant,
    ) -> Self {
        let mut counts = Vec::new();
        let mut gaps = Vec::new();
        for t in targets {
            let (n, g) = pace(log.get(t).map(Vec::as_slice).unwrap_or(&[]), from, to);
            counts.push(n);
            gaps.extend(g);
        }
        Pace { counts, gaps }
    }

    fn mean_gap(&self) -> Duration {
        self.gaps.iter().sum::<Duration>() / self.gaps.len().max(1) as u32
    }

    fn max_gap(&self) -> Duration {
        self.gaps.iter().max().copied().unwrap_or_default()
    }

    fn min_count(&self) -> usize {
        self.counts.iter().min().copied().unwrap_or(0)
    }

    fn max_count(&self) -> usize {
        self.counts.iter().max().copied().unwrap_or(0)
    }

    fn mean_count(&self) -> f64 {
        self.counts.iter().sum::<usize>() as f64 / self.counts.len().max(1) as f64
    }
}

#[test]
fn a_thousand_backends_a_third_hanging_keep_their_interval() {
    let nofile = raise_nofile();
    assert!(
        nofile >= 4096,
        "the open-file limit is {nofile}; this test needs 4096 (ulimit -n)"
    );
    // Backends on a runtime of their own, like hosts of their own.
    let servers = Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (healthy, hanging) = backends(&servers);
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let rss_before = rss_kib();
    let fds_before = open_fds();
    let log: Log = Arc::new(Mutex::new(HashMap::new()));
    let hook: ResultHook = {
        let log = log.clone();
        Arc::new(move |_, backend, outcome| {
            let now = Instant::now();
            log.lock()
                .unwrap()
                .entry(backend)
                .or_default()
                .push((now, outcome));
        })
    };
    let spec = CheckSpec {
        kind: CheckKind::Http {
            path: "/healthz".into(),
            host: None,
        },
        interval: INTERVAL,
        timeout: TIMEOUT,
        rise: 2,
        fall: 3,
    };
    let targets: Vec<Target> = healthy
        .iter()
        .chain(&hanging)
        .map(|b| Target {
            service: "web".into(),
            backend: *b,
            spec: spec.clone(),
        })
        .collect();

    let (window, rss_window, fds_peak, status, events, rss_soak) = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut checker = Checker::new(MAX_CONCURRENT, tx, hook);
        let started = Instant::now();
        checker.set_targets(targets);
        tokio::time::sleep(WARMUP).await;
        let from = Instant::now();
        let mut fds_peak = 0;
        while from.elapsed() < WINDOW {
            fds_peak = fds_peak.max(open_fds());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let to = Instant::now();
        let rss_window = rss_kib();
        let status = checker.status();
        tokio::time::sleep(SOAK).await;
        let rss_soak = rss_kib();
        drop(checker);
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        let _ = started;
        ((from, to), rss_window, fds_peak, status, events, rss_soak)
    });
    let (from, to) = window;
    let log = log.lock().unwrap();
    let good = Pace::of(&log, &healthy, from, to);
    let hung = Pace::of(&log, &hanging, from, to);
    let expected = WINDOW.as_secs_f64() / INTERVAL.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{} backends ({} healthy, {} hanging), http checks every {} ms, timeout {} ms, \
         at most {MAX_CONCURRENT} at once; window {:.1} s:",
        BACKENDS,
        healthy.len(),
        hanging.len(),
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        WINDOW.as_secs_f64()
    );
    for (what, p) in [("healthy", &good), ("hanging", &hung)] {
        println!(
            "  {what}: checks per target {}..{} (mean {:.2}, expected {expected:.0}); \
             gap between checks mean {:.0} ms, max {:.0} ms",
            p.min_count(),
            p.max_count(),
            p.mean_count(),
            ms(p.mean_gap()),
            ms(p.max_gap())
        );
    }
    println!(
        "  memory: VmRSS {} KiB before, {} KiB after the window, {} KiB {:.0} s later; \
         open files {fds_before} before, at most {fds_peak} during",
        rss_before,
        rss_window,
        rss_soak,
        SOAK.as_secs_f64()
    );

    // The interval holds for the healthy two thirds: about window/interval
    // checks each, never a long pause (jitter is ±10%).
    assert!(
        good.min_count() >= 8 && good.max_count() <= 12,
        "healthy checks per target {}..{}, expected about {expected}",
        good.min_count(),
        good.max_count()
    );
    let mean = ms(good.mean_gap());
    assert!(
        (450.0..=575.0).contains(&mean),
        "mean gap {mean:.0} ms for a {} ms interval",
        INTERVAL.as_millis()
    );
    assert!(
        good.max_gap() < INTERVAL * 2,
        "a healthy backend went {:.0} ms without a check",
        ms(good.max_gap())
    );
    // Hanging ones are checked on time too, each failing by its timeout.
    assert!(
        hung.min_count() >= 7,
        "hanging backends checked {} times",
        hung.min_count()
    );
    // Every verdict is right, and only the hanging ones changed state.
    for b in &healthy {
        let h = &status[&("web".to_string(), *b)];
        assert!(h.healthy, "{b}: {:?}", h.last_error);
        assert!(
            log[b].iter().all(|(_, o)| *o == "success"),
            "{b} failed a check"
        );
    }
    for b in &hanging {
        assert!(
            !status[&("web".to_string(), *b)].healthy,
            "{b} still healthy"
        );
        assert!(
            log[b].iter().all(|(_, o)| *o == "timeout"),
            "{b} did not time out"
        );
    }
    assert_eq!(events.len(), hanging.len());
    assert!(events.iter().all(|e| !e.healthy));
    // Bounded: check slots hold at most one connection each (two file
    // descriptors on loopback, plus the servers' side of hung ones).
    assert!(
        fds_peak <= fds_before + 3 * MAX_CONCURRENT + 64,
        "open files went from {fds_before} to {fds_peak}"
    );
    assert!(
        rss_window < rss_before + 128 * 1024,
        "VmRSS grew from {rss_before} to {rss_window} KiB"
    );
    assert!(
        rss_soak < rss_window + 16 * 1024,
        "VmRSS kept growing: {rss_window} to {rss_soak} KiB in {} s",
        SOAK.as_secs()
    );
    drop(rt);
    drop(servers);
}
