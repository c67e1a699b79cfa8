//! The daemon's side of pin sharing (`[cluster] pin_sync`): reads the
//! program's reports of new pins in changed slots, sends them in batches to
//! the other nodes (found in etcd), writes theirs into this node's flow
//! table, and runs the join exchange: a starting node asks a peer for its
//! pins of changed slots before it announces, and answers others' asks.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UdpSocket,
};

use super::*;
use crate::{
    cluster::Cluster,
    config::pin_sync::PinSyncConfig,
    dataplane::{PinOutcome, PinRefusal, PinRing, words_addr},
    pinsync::{
        self as ps, Batch, Counters, Join, JoinOutcome, JoinStep, Key, Kind, Pin, PinSyncView,
        RateCap, ReplayWindow,
    },
};

/// A batch leaves this long after its first pin at the latest (sooner when
/// it fills a datagram).
const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Reports taken from the ring per wake-up at most.
const DRAIN_MAX: usize = 4096;
/// How often the peers' addresses are read from etcd.
const PEERS_EVERY: Duration = Duration::from_millis(500);
/// This node's address key outlives it by at most this.
const LEASE_TTL: Duration = Duration::from_secs(3);
const LEASE_RENEW: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(300);
/// A received pin naming a service or backend this node does not have yet
/// is tried again every `UNKNOWN_RETRY_EVERY` for this long (a change
/// reaches the nodes through etcd within about a second), at most
/// `UNKNOWN_RETRY_MAX` pins at once.
const UNKNOWN_RETRY_FOR: Duration = Duration::from_secs(2);
const UNKNOWN_RETRY_EVERY: Duration = Duration::from_millis(100);
const UNKNOWN_RETRY_MAX: usize = 65_536;
/// A join answer pauses this long after every `ANSWER_BURST` datagrams, so
/// a large flow table does not overrun the joining node's socket buffer.
const ANSWER_BURST: usize = 32;
const ANSWER_PAUSE: Duration = Duration::from_millis(1);
/// How often the join task looks again while it waits (an end marker
/// wakes it at once).
const JOIN_POLL: Duration = Duration::from_millis(50);

/// Pin sharing's state, shared with the API and the metrics.
pub(super) struct PinSync {
    config: PinSyncConfig,
    node: String,
    counters: Counters,
    /// The other nodes' pin-sync addresses, by node.
    peers: Mutex<BTreeMap<String, SocketAddr>>,
    /// Read from etcd at least once since this node published its own.
    peers_listed: AtomicBool,
    /// The last sequence number sent (reports, join requests and answers
    /// share it: the receivers keep one window per sender).
    seq: AtomicU64,
    /// This node's join; `None` until it starts asking.
    join: Mutex<Option<Join>>,
    join_wake: tokio::sync::Notify,
}

impl PinSync {
    pub(super) fn view(&self) -> PinSyncView {
        let peers = lock(&self.peers)
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        let join = lock(&self.join).as_ref().map_or_else(
            || ps::JoinView {
                state: "pending".into(),
                ..Default::default()
            },
            Join::view,
        );
        self.counters.view(self.config.listen, peers, join)
    }

    /// Whether the join lets the node announce: the peers' pins taken, or
    /// none to take (no peer), or the bound passed.
    pub(super) fn joined(&self) -> bool {
        lock(&self.join).as_ref().is_some_and(Join::done)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Relaxed) + 1
    }
}

/// What the loops own: the ring, the socket, the key.
pub(super) struct PinSyncIo {
    ring: PinRing,
    socket: Arc<UdpSocket>,
    key: Arc<Key>,
}

/// Reads the key and binds the socket (errors stop the start); `None`
/// without `pin_sync`.
pub(super) async fn start(
    config: &Config,
    ring: Option<PinRing>,
) -> Result<Option<(Arc<PinSync>, PinSyncIo)>, StartError> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let (Some(cfg), Some(ring)) = (&cluster.pin_sync, ring) else {
        return Ok(None);
    };
    let key = Key::from_file(&cfg.key_file)?;
    let socket = UdpSocket::bind(cfg.listen)
        .await
        .map_err(|source| StartError::PinSyncListen {
            listen: cfg.listen,
            source,
        })?;
    info!(listen = %cfg.listen, max_pins_per_second = cfg.max_pins_per_second, "sharing flow pins with the cluster's other nodes");
    Ok(Some((
        Arc::new(PinSync {
            config: cfg.clone(),
            node: cluster.node.clone(),
            counters: Counters::default(),
            peers: Mutex::new(BTreeMap::new()),
            peers_listed: AtomicBool::new(false),
            // Above anything this node sent before a restart.
            seq: AtomicU64::new(unix_now().as_micros() as u64),
            join: Mutex::new(None),
            join_wake: tokio::sync::Notify::new(),
        }),
        PinSyncIo {
            ring,
            socket: Arc::new(socket),
            key: Arc::new(key),
        },
    )))
}

fn unix_ms() -> u64 {
    unix_now().as_millis() as u64
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

impl Daemon {
    pub(super) fn pin_sync_loops(
        self,
        c: Arc<Cluster>,
        s: Arc<PinSync>,
        io: PinSyncIo,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(pin_reports(
                s.clone(),
                io.ring,
                io.socket.clone(),
                io.key.clone(),
            )),
            tokio::spawn(
                self.clone()
                    .pin_receive(s.clone(), io.socket.clone(), io.key.clone()),
            ),
            tokio::spawn(pin_join(c.clone(), s.clone(), io.socket, io.key)),
            tokio::spawn(pin_peers(c, s)),
        ]
    }

    /// Takes the other nodes' batches: authenticated (MAC), fresh (stamp
    /// and sequence window), then each pin into the flow table unless this
    /// node does not keep flows on its backend. A pin whose service or
    /// backend this node does not have yet (a change that reached the
    /// sender first through etcd) is tried again for `UNKNOWN_RETRY_FOR`.
    async fn pin_receive(self, s: Arc<PinSync>, socket: Arc<UdpSocket>, key: Arc<Key>) {
        let mut window = ReplayWindow::default();
        let mut buf = vec![0u8; 2048];
        let mut later: Vec<(Instant, Pin)> = Vec::new();
        let mut tick = tokio::time::interval(UNKNOWN_RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut pins: Vec<(Instant, Pin)> = Vec::new();
            tokio::select! {
                got = socket.recv_from(&mut buf) => {
                    let (n, from) = match got {
                        Ok(got) => got,
                        Err(e) => {
                            debug!("pin sync: receiving: {e}");
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                    };
                    let Some((kind, batch)) = accept(&s, &key, &mut window, &buf[..n]) else {
                        continue;
                    };
                    match kind {
                        Kind::Pins => {}
                        Kind::JoinPins { request } => {
                            if let Some(j) = lock(&s.join).as_mut() {
                                j.on_pins(&batch.node, request, batch.pins.len() as u64);
                            }
                        }
                        Kind::JoinRequest => {
                            self.answer_join(&s, &socket, &key, &batch.node, from, batch.seq);
                            continue;
                        }
                        Kind::JoinEnd { request, pins } => {
                            if let Some(j) = lock(&s.join).as_mut() {
                                j.on_end(&batch.node, request, pins);
                            }
                            s.join_wake.notify_one();
                            continue;
                        }
                    }
                    add(&s.counters.received, batch.pins.len());
                    let now = Instant::now();
                    pins.extend(batch.pins.into_iter().map(|p| (now, p)));
                }
                _ = tick.tick(), if !later.is_empty() => {}
            }
            pins.append(&mut later);
            let writer = self.shared.writer.clone();
            let done = tokio::task::spawn_blocking(move || {
                let mut w = lock(&writer);
                pins.into_iter()
                    .map(|(t, p)| (t, p, w.insert_replicated_pin(&p.key, p.backend)))
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(outcomes) = done else { continue };
            for (first, pin, o) in outcomes {
                match o {
                    Ok(PinOutcome::Inserted) => add(&s.counters.inserted, 1),
                    Ok(PinOutcome::Refused(PinRefusal::NotLive)) => {
                        add(&s.counters.dropped_not_live, 1);
                    }
                    Ok(PinOutcome::Refused(PinRefusal::UnknownBackend | PinRefusal::NoService)) => {
                        if first.elapsed() < UNKNOWN_RETRY_FOR && later.len() < UNKNOWN_RETRY_MAX {
                            later.push((first, pin));
                        } else {
                            add(&s.counters.dropped_unknown_backend, 1);
                        }
                    }
                    Err(e) => warn!("pin sync: writing a pin: {e}"),
                }
            }
        }
    }
}

/// The message in datagram `d` if it is authentic, another node's, and
/// fresh; counts why not otherwise.
fn accept(s: &PinSync, key: &Key, window: &mut ReplayWindow, d: &[u8]) -> Option<(Kind, Batch)> {
    let (kind, batch) = match ps::decode_kind(key, d) {
        Ok(b) => b,
        Err(ps::WireError::BadMac) => {
            add(&s.counters.dropped_bad_mac, 1);
            return None;
        }
        Err(ps::WireError::Malformed) => {
            add(&s.counters.dropped_malformed, 1);
            return None;
        }
    };
    if batch.node == s.node {
        return None;
    }
    if let Err(e) = window.accept(&batch, unix_ms()) {
        debug!(node = %batch.node, seq = batch.seq, "pin sync: dropped: {e}");
        add(&s.counters.dropped_replay, 1);
        return None;
    }
    Some((kind, batch))
}

/// Reads the program's reports and sends them to every peer: full
/// datagrams at once, a partial one `BATCH_WAIT` after its first pin,
/// within the rate cap (the rest dropped and counted).
async fn pin_reports(s: Arc<PinSync>, ring: PinRing, socket: Arc<UdpSocket>, key: Arc<Key>) {
    // SAFETY: the ring owns its map's fd and keeps it open, and the same,
    // for as long as it lives inside the AsyncFd.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut fd = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            error!("pin sync: cannot poll the pin-report ring: {e}; no pins are shared");
            return;
        }
    };
    let mut cap = RateCap::new(s.config.max_pins_per_second, Instant::now());
    let mut reports = Vec::new();
    let mut first: Option<tokio::time::Instant> = None;
    loop {
        let wait = first.map(|t| t + BATCH_WAIT);
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else {
                    error!("pin sync: the pin-report ring failed; no pins are shared");
                    return;
                };
                let n = guard.get_inner_mut().drain(&mut reports, DRAIN_MAX);
                if n < DRAIN_MAX {
                    guard.clear_ready();
                }
            }
            () = async { tokio::time::sleep_until(wait.unwrap_or_else(tokio::time::Instant::now)).await }, if wait.is_some() => {}
        }
        if reports.is_empty() {
            continue;
        }
        let now = tokio::time::Instant::now();
        let t = *first.get_or_insert(now);
        let due = now >= t + BATCH_WAIT;
        if reports.len() < ps::MAX_PINS_PER_DATAGRAM && !due {
            continue;
        }
        // Full datagrams now; a partial one only once due.
        let take = if due {
            reports.len()
        } else {
            reports.len() / ps::MAX_PINS_PER_DATAGRAM * ps::MAX_PINS_PER_DATAGRAM
        };
        let batch: Vec<lb_common::PinReport> = reports.drain(..take).collect();
        first = (!reports.is_empty()).then_some(now);
        if let Ok(c) = fd.get_ref().counts() {
            s.counters
                .dropped_ring_full
                .store(c[lb_common::PinReportStat::RingFull as usize], Relaxed);
        }
        let allowed = cap.take(batch.len(), Instant::now());
        add(&s.counters.dropped_rate_cap, batch.len() - allowed);
        let peers: Vec<SocketAddr> = lock(&s.peers).values().copied().collect();
        if peers.is_empty() {
            continue;
        }
        for chunk in batch[..allowed].chunks(ps::MAX_PINS_PER_DATAGRAM) {
            let d = ps::encode(
                &key,
                &Batch {
                    node: s.node.clone(),
                    seq: s.next_seq(),
                    unix_ms: unix_ms(),
                    pins: chunk
                        .iter()
                        .map(|r| Pin {
                            key: r.key,
                            backend: SocketAddr::new(words_addr(&r.backend_addr), r.backend_port),
                        })
                        .collect(),
                },
            );
            for p in &peers {
                match socket.send_to(&d, p).await {
                    Ok(_) => add(&s.counters.datagrams_sent, 1),
                    Err(e) => {
                        debug!(peer = %p, "pin sync: sending: {e}");
                        add(&s.counters.send_errors, 1);
                    }
                }
            }
            add(&s.counters.sent, chunk.len());
        }
    }
}

/// The stored form of a node's pin-sync address.
#[derive(serde::Serialize, serde::Deserialize)]
struct Published {
    listen: SocketAddr,
}

/// Publishes this node's address under `/lb/<name>/pinsync/<node>` on a
/// lease (gone `LEASE_TTL` after the node), and reads the others' every
/// `PEERS_EVERY`. While etcd is unreachable the last peers are kept.
async fn pin_peers(c: Arc<Cluster>, s: Arc<PinSync>) {
    let prefix = format!("{}pinsync/", c.config.prefix());
    let key = format!("{prefix}{}", c.config.node);
    let value = serde_json::to_vec(&Published {
        listen: s.config.listen,
    })
    .unwrap_or_default();
    loop {
        let lease = match c.client.grant(LEASE_TTL.as_secs()).await {
            Ok(l) => l,
            Err(e) => {
                debug!("pin sync: lease: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if let Err(e) = c.client.put_leased(&key, &value, lease).await {
            debug!("pin sync: publishing this node's address: {e}");
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let mut renewed = Instant::now();
        loop {
            match c.client.list_on(c.client.current(), &prefix).await {
                Ok(kvs) => {
                    let peers: BTreeMap<String, SocketAddr> = kvs
                        .iter()
                        .filter_map(|kv| {
                            let node = kv.key.strip_prefix(&prefix)?;
                            if node == c.config.node {
                                return None;
                            }
                            let p: Published = serde_json::from_slice(&kv.value).ok()?;
                            Some((node.to_string(), p.listen))
                        })
                        .collect();
                    let mut cur = lock(&s.peers);
                    if *cur != peers {
                        info!(peers = ?peers, "pin sync: peers");
                        *cur = peers;
                    }
                    s.peers_listed.store(true, Relaxed);
                }
                Err(e) => debug!("pin sync: reading the peers: {e}"),
            }
            if renewed.elapsed() >= LEASE_RENEW {
                match c.client.keep_alive(lease).await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) | Err(_) => break,
                }
            }
            tokio::time::sleep(PEERS_EVERY).await;
        }
        tokio::time::sleep(RETRY).await;
    }
}

impl Daemon {
    /// Answers `node`'s join request `request` (from `from`, its pin-sync
    /// socket): takes `node` as a peer at once, so pins made from now on
    /// reach it even before etcd lists it here, then walks the flow table
    /// for its pins of changed slots and sends them, then the end marker.
    fn answer_join(
        &self,
        s: &Arc<PinSync>,
        socket: &Arc<UdpSocket>,
        key: &Arc<Key>,
        node: &str,
        from: SocketAddr,
        request: u64,
    ) {
        lock(&s.peers).insert(node.to_string(), from);
        let (s, socket, key, node) = (s.clone(), socket.clone(), key.clone(), node.to_string());
        let writer = self.shared.writer.clone();
        let counter = self.shared.flow_counter.clone();
        tokio::spawn(async move {
            let walked = tokio::task::spawn_blocking(move || {
                let plan = lock(&writer).join_plan();
                counter.walk_join(&plan)
            })
            .await;
            let Ok(pins) = walked else {
                warn!(node = %node, "pin sync: walking the flow table for a join failed");
                return;
            };
            let batch = |pins: Vec<Pin>| Batch {
                node: s.node.clone(),
                seq: s.next_seq(),
                unix_ms: unix_ms(),
                pins,
            };
            for (i, chunk) in pins.chunks(ps::MAX_PINS_PER_DATAGRAM).enumerate() {
                let pins = chunk
                    .iter()
                    .map(|(key, backend)| Pin {
                        key: *key,
                        backend: *backend,
                    })
                    .collect();
                let d = ps::encode_kind(&key, Kind::JoinPins { request }, &batch(pins));
                if let Err(e) = socket.send_to(&d, from).await {
                    debug!(peer = %from, "pin sync: sending a join answer: {e}");
                    add(&s.counters.send_errors, 1);
                }
                if (i + 1) % ANSWER_BURST == 0 {
                    tokio::time::sleep(ANSWER_PAUSE).await;
                }
            }
            let end = Kind::JoinEnd {
                request,
                pins: pins.len() as u64,
            };
            if let Err(e) = socket
                .send_to(&ps::encode_kind(&key, end, &batch(Vec::new())), from)
                .await
            {
                debug!(peer = %from, "pin sync: sending a join answer's end: {e}");
                add(&s.counters.send_errors, 1);
            }
            add(&s.counters.join_answers, 1);
            add(&s.counters.join_pins_sent, pins.len());
            info!(node = %node, pins = pins.len(), "pin sync: answered a join");
        });
    }
}

/// This node's join: once its services are etcd's and the peers were read
/// (after its own address was published, so a peer that answers has it
/// too), asks every peer for its pins of changed slots until all answered
/// whole, none exists, or `JOIN_BOUND` passes. The announce gate
/// holds the node's addresses until then (`pins_not_synced`).
async fn pin_join(c: Arc<Cluster>, s: Arc<PinSync>, socket: Arc<UdpSocket>, key: Arc<Key>) {
    while !(c.is_synced() && s.peers_listed.load(Relaxed)) {
        tokio::time::sleep(JOIN_POLL).await;
    }
    *lock(&s.join) = Some(Join::new(Instant::now()));
    loop {
        let peers: Vec<(String, SocketAddr)> = lock(&s.peers)
            .iter()
            .map(|(n, a)| (n.clone(), *a))
            .collect();
        let Some(step) = lock(&s.join)
            .as_mut()
            .map(|j| j.next(&peers, || s.next_seq(), Instant::now()))
        else {
            // Not reached: the join is set above and never taken.
            return std::future::pending().await;
        };
        match step {
            JoinStep::Ask(asks) => {
                for (peer, addr, request) in asks {
                    debug!(peer = %peer, %addr, request, "pin sync: asking for pins of changed slots");
                    let ask = Batch {
                        node: s.node.clone(),
                        seq: request,
                        unix_ms: unix_ms(),
                        pins: Vec::new(),
                    };
                    if let Err(e) = socket
                        .send_to(&ps::encode_kind(&key, Kind::JoinRequest, &ask), addr)
                        .await
                    {
                        debug!(peer = %peer, "pin sync: sending a join request: {e}");
                        add(&s.counters.send_errors, 1);
                    }
                }
            }
            JoinStep::Wait => {}
            JoinStep::Done => {
                let Some((outcome, view)) = lock(&s.join)
                    .as_ref()
                    .map(|j| (j.outcome().clone(), j.view()))
                else {
                    return std::future::pending().await;
                };
                match outcome {
                    JoinOutcome::Synced {
                        peers,
                        pins,
                        missing,
                    } if missing.is_empty() => info!(
                        peers = ?peers, pins, took_ms = view.took_ms, requests = view.requests,
                        "pin sync: took the peers' pins of changed slots; may announce"
                    ),
                    JoinOutcome::Synced {
                        peers,
                        pins,
                        missing,
                    } => warn!(
                        peers = ?peers, pins, missing = ?missing, requests = view.requests,
                        "pin sync: some peers did not answer whole within {:?}; announcing with \
                         the others' pins",
                        ps::JOIN_BOUND
                    ),
                    JoinOutcome::NoPeer => info!(
                        "pin sync: no other node publishes pins (the cluster's first node); may announce"
                    ),
                    JoinOutcome::TimedOut => warn!(
                        requests = view.requests,
                        "pin sync: no peer answered whole within {:?}; announcing without their pins",
                        ps::JOIN_BOUND
                    ),
                    JoinOutcome::Pending => {}
                }
                // A loop of the daemon's: its end would read as a dead daemon.
                return std::future::pending().await;
            }
        }
        tokio::select! {
            () = s.join_wake.notified() => {}
            () = tokio::time::sleep(JOIN_POLL) => {}
        }
    }
}
