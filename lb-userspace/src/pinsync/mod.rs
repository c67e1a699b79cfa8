//! Flow pins shared between the nodes of a cluster (`[cluster] pin_sync`):
//! the UDP wire format of a batch of pins and of the join exchange, its
//! HMAC-SHA256 under the shared key, the replay window each receiver keeps
//! per sender, the sender's rate cap, the join's state, and the counters. The daemon's tasks that use them are in
//! `daemon/pinsync.rs`.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use lb_common::FlowKey;

use crate::dataplane::{addr_octets, addr_words, octets_addr, words_addr};
use ring::hmac;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// First bytes of every datagram: the protocol and its version.
pub const MAGIC: [u8; 4] = *b"LBP1";
/// Pins in one datagram at most: 20 x 55 bytes plus the header and MAC
/// stay under 1,300 bytes, inside any path's MTU.
pub const MAX_PINS_PER_DATAGRAM: usize = 20;
/// One pin: source, destination and backend addresses (16 bytes each,
/// IPv4 as IPv4-mapped IPv6), source, destination and backend ports, the
/// protocol.
pub const PIN_BYTES: usize = 16 * 3 + 2 * 3 + 1;
pub const MAC_BYTES: usize = 32;
/// The shared key's length at least (HMAC-SHA256's block of entropy).
pub const MIN_KEY_BYTES: usize = 32;
/// A datagram stamped further than this from the receiver's clock is
/// dropped: with the sequence window, a captured datagram cannot be
/// replayed later, even to a receiver that restarted and forgot the
/// sequence numbers it saw.
pub const MAX_SKEW: Duration = Duration::from_secs(10);
/// Sequence numbers remembered per sender below the highest seen.
pub const REPLAY_WINDOW: u64 = 64;

/// A flow's pin as the nodes exchange it: the flow, and its backend by
/// address (backend ids differ between nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    pub key: FlowKey,
    pub backend: SocketAddr,
}

/// One datagram's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The sending node's name (`cluster.node`).
    pub node: String,
    /// Increasing per sender; starts at the sender's start time in
    /// microseconds, so a restarted sender continues above its last one.
    pub seq: u64,
    /// The sender's clock (Unix milliseconds) when it sent the batch.
    pub unix_ms: u64,
    pub pins: Vec<Pin>,
}

/// Why a datagram was dropped before its pins were looked at.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a pin-sync datagram (length or magic)")]
    Malformed,
    #[error("bad MAC (another key, or forged)")]
    BadMac,
}

/// Why an authenticated datagram was dropped.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("stamped {0} ms away from this node's clock")]
    Skew(u64),
    #[error("sequence number already seen or below the window")]
    Replayed,
}

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("pin_sync.key_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pin_sync.key_file {path}: {len} bytes; the shared key needs at least {MIN_KEY_BYTES} \
         (e.g. `head -c 32 /dev/urandom | base64 > {path}`, the same file on every node)"
    )]
    Short { path: PathBuf, len: usize },
}

/// The cluster's shared key.
pub struct Key(hmac::Key);

impl Key {
    /// The key from `path`: its bytes, surrounding whitespace trimmed.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_BYTES {
            return Err(KeyError::Short {
                path: path.to_path_buf(),
                len: trimmed.len(),
            });
        }
        Ok(Key::new(trimmed))
    }

    pub fn new(bytes: &[u8]) -> Key {
        Key(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }
}

/// What a datagram is. Each kind has its own magic; all share the batch's
/// layout (node, sequence number, stamp, pins) and MAC, so the replay rules
/// cover the join exchange too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// New pins the sender's program reported.
    Pins,
    /// A joining node asks for the receiver's pins of
    /// changed slots (no pins; its `seq` names the request).
    JoinRequest,
    /// Pins answering join request `request`.
    JoinPins { request: u64 },
    /// The answer to `request` is complete: `pins` pins were sent.
    JoinEnd { request: u64, pins: u64 },
}

impl Kind {
    fn magic(self) -> [u8; 4] {
        match self {
            Kind::Pins => MAGIC,
            Kind::JoinRequest => *b"LBQ1",
            Kind::JoinPins { .. } => *b"LBA1",
            Kind::JoinEnd { .. } => *b"LBE1",
        }
    }

    /// The words after the pin count: the request (and the total).
    fn extra(self) -> Vec<u64> {
        match self {
            Kind::Pins | Kind::JoinRequest => vec![],
            Kind::JoinPins { request } => vec![request],
            Kind::JoinEnd { request, pins } => vec![request, pins],
        }
    }
}

/// The datagram for `batch` (at most `MAX_PINS_PER_DATAGRAM` pins; the
/// node name at most 63 bytes, as the config allows), MAC last.
pub fn encode(key: &Key, batch: &Batch) -> Vec<u8> {
    encode_kind(key, Kind::Pins, batch)
}

/// [`encode`] for any kind: requests and end markers carry no pins.
pub fn encode_kind(key: &Key, kind: Kind, batch: &Batch) -> Vec<u8> {
    debug_assert!(batch.pins.len() <= MAX_PINS_PER_DATAGRAM);
    let name = &batch.node.as_bytes()[..batch.node.len().min(63)];
    let mut b = Vec::with_capacity(80 + name.len() + batch.pins.len() * PIN_BYTES + MAC_BYTES);
    b.extend_from_slice(&kind.magic());
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    b.extend_from_slice(&batch.seq.to_be_bytes());
    b.extend_from_slice(&batch.unix_ms.to_be_bytes());
    b.extend_from_slice(&(batch.pins.len() as u16).to_be_bytes());
    for w in kind.extra() {
        b.extend_from_slice(&w.to_be_bytes());
    }
    for p in &batch.pins {
        b.extend_from_slice(&addr_octets(&p.key.src));
        b.extend_from_slice(&addr_octets(&p.key.dst));
        // Packet byte order in the key: its bytes are the wire's.
        b.extend_from_slice(&p.key.sport.to_ne_bytes());
        b.extend_from_slice(&p.key.dport.to_ne_bytes());
        b.push(p.key.proto);
        b.extend_from_slice(&addr_octets(&addr_words(p.backend.ip())));
        b.extend_from_slice(&p.backend.port().to_be_bytes());
    }
    let tag = hmac::sign(&key.0, &b);
    b.extend_from_slice(tag.as_ref());
    b
}

/// [`decode_kind`] for pin batches ([`Kind::Pins`]) only; the wire tests'.
#[cfg(test)]
pub fn decode(key: &Key, d: &[u8]) -> Result<Batch, WireError> {
    match decode_kind(key, d)? {
        (Kind::Pins, b) => Ok(b),
        _ => Err(WireError::Malformed),
    }
}

/// Checks the MAC first (nothing unauthenticated is parsed further), then
/// reads the datagram: its kind and its batch.
pub fn decode_kind(key: &Key, d: &[u8]) -> Result<(Kind, Batch), WireError> {
    if d.len() < MAGIC.len() + 1 + 18 + MAC_BYTES {
        return Err(WireError::Malformed);
    }
    let magic: [u8; 4] = d[..4].try_into().map_err(|_| WireError::Malformed)?;
    // The kind's words are read below; here only which kind.
    let shape = [
        Kind::Pins,
        Kind::JoinRequest,
        Kind::JoinPins { request: 0 },
        Kind::JoinEnd {
            request: 0,
            pins: 0,
        },
    ]
    .into_iter()
    .find(|k| k.magic() == magic)
    .ok_or(WireError::Malformed)?;
    let (body, tag) = d.split_at(d.len() - MAC_BYTES);
    hmac::verify(&key.0, body, tag).map_err(|_| WireError::BadMac)?;
    let n = usize::from(body[4]);
    let rest = body.get(5..).ok_or(WireError::Malformed)?;
    let extra = 8 * shape.extra().len();
    if n == 0 || rest.len() < n + 18 + extra {
        return Err(WireError::Malformed);
    }
    let node = std::str::from_utf8(&rest[..n])
        .map_err(|_| WireError::Malformed)?
        .to_string();
    let rest = &rest[n..];
    let u64_at = |i: usize| u64::from_be_bytes(rest[i..i + 8].try_into().unwrap_or_default());
    let (seq, unix_ms) = (u64_at(0), u64_at(8));
    let count = usize::from(u16::from_be_bytes([rest[16], rest[17]]));
    let kind = match shape {
        Kind::Pins | Kind::JoinRequest => shape,
        Kind::JoinPins { .. } => Kind::JoinPins {
            request: u64_at(18),
        },
        Kind::JoinEnd { .. } => Kind::JoinEnd {
            request: u64_at(18),
            pins: u64_at(26),
        },
    };
    let pins_bytes = &rest[18 + extra..];
    let pins_allowed = match kind {
        Kind::Pins | Kind::JoinPins { .. } => MAX_PINS_PER_DATAGRAM,
        Kind::JoinRequest | Kind::JoinEnd { .. } => 0,
    };
    if count > pins_allowed || pins_bytes.len() != count * PIN_BYTES {
        return Err(WireError::Malformed);
    }
    let pins = pins_bytes
        .chunks_exact(PIN_BYTES)
        .map(|p| Pin {
            key: FlowKey {
                src: octets_addr(&p[0..16]),
                dst: octets_addr(&p[16..32]),
                sport: u16::from_ne_bytes([p[32], p[33]]),
                dport: u16::from_ne_bytes([p[34], p[35]]),
                proto: p[36],
                _pad: [0; 3],
            },
            backend: SocketAddr::new(
                words_addr(&octets_addr(&p[37..53])),
                u16::from_be_bytes([p[53], p[54]]),
            ),
        })
        .collect();
    Ok((
        kind,
        Batch {
            node,
            seq,
            unix_ms,
            pins,
        },
    ))
}

/// The receiver's memory of each sender's sequence numbers: the highest
/// seen and a bitmap of the `REPLAY_WINDOW` below it (IPsec's window).
/// Entries exist only for senders that knew the key.
#[derive(Default)]
pub struct ReplayWindow {
    senders: HashMap<String, (u64, u64)>,
}

impl ReplayWindow {
    /// Accepts `batch` once: within `MAX_SKEW` of `now_unix_ms` and a
    /// sequence number not seen before and not below the window.
    pub fn accept(&mut self, batch: &Batch, now_unix_ms: u64) -> Result<(), ReplayError> {
        let skew = batch.unix_ms.abs_diff(now_unix_ms);
        if skew > MAX_SKEW.as_millis() as u64 {
            return Err(ReplayError::Skew(skew));
        }
        let seq = batch.seq;
        let Some((top, bits)) = self.senders.get_mut(&batch.node) else {
            self.senders.insert(batch.node.clone(), (seq, 1));
            return Ok(());
        };
        if seq > *top {
            let shift = seq - *top;
            *bits = if shift >= REPLAY_WINDOW {
                0
            } else {
                *bits << shift
            } | 1;
            *top = seq;
            return Ok(());
        }
        let back = *top - seq;
        if back >= REPLAY_WINDOW || *bits & (1 << back) != 0 {
            return Err(ReplayError::Replayed);
        }
        *bits |= 1 << back;
        Ok(())
    }
}

/// A token bucket of pins a second, a second's worth deep: a flood of new
/// flows sends at most the cap to the peers; the rest are dropped (and
/// counted) on the sender.
pub struct RateCap {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateCap {
    pub fn new(per_second: u32, now: Instant) -> RateCap {
        RateCap {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: now,
        }
    }

    /// How many of `n` pins may go now.
    pub fn take(&mut self, n: usize, now: Instant) -> usize {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.per_second);
        let ok = (n as f64).min(self.tokens.floor()).max(0.0);
        self.tokens -= ok;
        ok as usize
    }
}

/// How long a joining node waits for a peer's whole answer before it asks
/// that peer again (the answer may have lost a datagram).
pub const JOIN_ATTEMPT: Duration = Duration::from_secs(1);
/// How long a joining node holds its announcement for the peers' pins at
/// most: past this it announces with the answers it has (none: logged and
/// counted as timed out).
pub const JOIN_BOUND: Duration = Duration::from_secs(5);

/// Where a node's join stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Still asking: the node does not announce yet (`pins_not_synced`).
    Pending,
    /// `peers` answered whole, with `pins` pins in all; `missing` peers
    /// had not when the bound passed.
    Synced {
        peers: Vec<String>,
        pins: u64,
        missing: Vec<String>,
    },
    /// No other node has published its pin-sync address: the cluster's
    /// first node.
    NoPeer,
    /// No peer answered whole within [`JOIN_BOUND`].
    TimedOut,
}

/// What the join task does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinStep {
    /// Send a join request numbered `request` to each `peer` at `addr`.
    Ask(Vec<(String, SocketAddr, u64)>),
    /// Answers are awaited.
    Wait,
    /// Decided (see [`Join::outcome`]).
    Done,
}

/// One peer's part of a join.
#[derive(Clone, Copy, Debug)]
struct Asked {
    request: u64,
    /// When the request went (None: ask again at once).
    sent: Option<Instant>,
    got: u64,
    whole: bool,
}

/// A joining node's exchange. Every peer is asked, since a pin is reported
/// only when it is made in a changed slot: a pin made before its slot
/// changed is on its own node only, and that node alone can send it. The
/// join is done once every listed peer answered whole (its end marker and
/// every pin it counts), or no peer exists, or [`JOIN_BOUND`] passes.
#[derive(Debug)]
pub struct Join {
    started: Instant,
    outcome: JoinOutcome,
    asked: BTreeMap<String, Asked>,
    /// Requests sent.
    pub requests: u64,
    /// When the outcome was decided.
    pub decided: Option<Instant>,
}

impl Join {
    pub fn new(now: Instant) -> Join {
        Join {
            started: now,
            outcome: JoinOutcome::Pending,
            asked: BTreeMap::new(),
            requests: 0,
            decided: None,
        }
    }

    pub fn outcome(&self) -> &JoinOutcome {
        &self.outcome
    }

    /// Whether the node may announce as far as pins go.
    pub fn done(&self) -> bool {
        self.outcome != JoinOutcome::Pending
    }

    fn decide(&mut self, outcome: JoinOutcome, now: Instant) {
        self.outcome = outcome;
        self.decided = Some(now);
    }

    /// The next step at `now`, given the peers (by name); a new request
    /// takes its number from `request`.
    pub fn next(
        &mut self,
        peers: &[(String, SocketAddr)],
        mut request: impl FnMut() -> u64,
        now: Instant,
    ) -> JoinStep {
        if self.done() {
            return JoinStep::Done;
        }
        if peers.is_empty() && self.asked.is_empty() {
            self.decide(JoinOutcome::NoPeer, now);
            return JoinStep::Done;
        }
        let whole: Vec<String> = peers
            .iter()
            .filter(|(n, _)| self.asked.get(n).is_some_and(|a| a.whole))
            .map(|(n, _)| n.clone())
            .collect();
        let pins = |j: &Join, names: &[String]| -> u64 {
            names
                .iter()
                .filter_map(|n| j.asked.get(n))
                .map(|a| a.got)
                .sum()
        };
        if !peers.is_empty() && whole.len() == peers.len() {
            let pins = pins(self, &whole);
            self.decide(
                JoinOutcome::Synced {
                    peers: whole,
                    pins,
                    missing: Vec::new(),
                },
                now,
            );
            return JoinStep::Done;
        }
        if now.saturating_duration_since(self.started) >= JOIN_BOUND {
            // Answers of peers that left the list since still count.
            let whole: Vec<String> = self
                .asked
                .iter()
                .filter(|(_, a)| a.whole)
                .map(|(n, _)| n.clone())
                .collect();
            let outcome = if whole.is_empty() {
                JoinOutcome::TimedOut
            } else {
                JoinOutcome::Synced {
                    pins: pins(self, &whole),
                    missing: peers
                        .iter()
                        .map(|(n, _)| n.clone())
                        .filter(|n| !whole.contains(n))
                        .collect(),
                    peers: whole,
                }
            };
            self.decide(outcome, now);
            return JoinStep::Done;
        }
        let mut ask = Vec::new();
        for (peer, addr) in peers {
            let due = match self.asked.get(peer) {
                None => true,
                Some(a) if a.whole => false,
                Some(a) => a
                    .sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= JOIN_ATTEMPT),
            };
            if due {
                let r = request();
                self.asked.insert(
                    peer.clone(),
                    Asked {
                        request: r,
                        sent: Some(now),
                        got: 0,
                        whole: false,
                    },
                );
                self.requests += 1;
                ask.push((peer.clone(), *addr, r));
            }
        }
        if ask.is_empty() {
            JoinStep::Wait
        } else {
            JoinStep::Ask(ask)
        }
    }

    /// `n` pins answering `request` arrived from `node`.
    pub fn on_pins(&mut self, node: &str, request: u64, n: u64) {
        if let Some(a) = self.asked.get_mut(node)
            && a.request == request
            && !a.whole
        {
            a.got += n;
        }
    }

    /// `node`'s end marker for `request`, announcing `pins` pins: that peer
    /// answered whole if every one arrived; else it is asked again at the
    /// next step.
    pub fn on_end(&mut self, node: &str, request: u64, pins: u64) {
        if let Some(a) = self.asked.get_mut(node)
            && a.request == request
            && !a.whole
        {
            if a.got >= pins {
                a.whole = true;
            } else {
                a.sent = None;
            }
        }
    }

    /// The join as the status shows it.
    pub fn view(&self) -> JoinView {
        let (state, peers, pins, missing) = match &self.outcome {
            JoinOutcome::Pending => ("pending", Vec::new(), 0, Vec::new()),
            JoinOutcome::Synced {
                peers,
                pins,
                missing,
            } => ("synced", peers.clone(), *pins, missing.clone()),
            JoinOutcome::NoPeer => ("no_peer", Vec::new(), 0, Vec::new()),
            JoinOutcome::TimedOut => ("timed_out", Vec::new(), 0, Vec::new()),
        };
        JoinView {
            state: state.to_string(),
            peers,
            missing,
            pins,
            requests: self.requests,
            took_ms: self
                .decided
                .map(|d| d.saturating_duration_since(self.started).as_millis() as u64),
        }
    }
}

/// A node's join as `GET /api/v1/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinView {
    /// `pending` (not announced yet for it), `synced` (a peer answered
    /// whole), `no_peer` (the cluster's first node), `timed_out` (no peer
    /// answered whole within the bound; announced without).
    pub state: String,
    /// The peers whose pins this node took (each answered whole).
    pub peers: Vec<String>,
    /// Peers listed that had not answered whole when the bound passed.
    pub missing: Vec<String>,
    /// Pins those peers sent.
    pub pins: u64,
    /// Join requests sent.
    pub requests: u64,
    /// From the daemon's readiness to ask until decided.
    pub took_ms: Option<u64>,
}

/// What pin sharing did since the daemon started (the program's ring-full
/// count is since the program was loaded).
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub received: AtomicU64,
    pub inserted: AtomicU64,
    pub dropped_rate_cap: AtomicU64,
    pub dropped_bad_mac: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_replay: AtomicU64,
    pub dropped_unknown_backend: AtomicU64,
    pub dropped_not_live: AtomicU64,
    pub dropped_ring_full: AtomicU64,
    /// Join requests this node answered, and the pins it sent in answers.
    pub join_answers: AtomicU64,
    pub join_pins_sent: AtomicU64,
}

/// Pin sharing as `GET /api/v1/status` and `lb status` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PinSyncView {
    /// Where this node takes pins.
    pub listen: String,
    /// The other nodes' pin-sync addresses, from etcd.
    pub peers: Vec<String>,
    /// Pins sent (each counted once, whatever the number of peers).
    pub sent: u64,
    pub datagrams_sent: u64,
    pub send_errors: u64,
    /// Pins received in authenticated, fresh datagrams.
    pub received: u64,
    /// Pins written into this node's flow table.
    pub inserted: u64,
    /// Pins or datagrams dropped, by reason: `rate_cap` (sender over
    /// `max_pins_per_second`), `ring_full` (the program's report ring was
    /// full), `bad_mac`, `malformed`, `replay` (datagrams), `unknown_backend`
    /// (no such service or backend here, after 2 s of retries), `not_live` (the backend keeps no
    /// flows here: down, disabled).
    pub dropped: BTreeMap<String, u64>,
    /// This node's join: the pins of changed slots it took from a peer
    /// before announcing.
    pub join: JoinView,
    /// Join requests this node answered, and the pins it sent in answers.
    pub join_answers: u64,
    pub join_pins_sent: u64,
}

/// The reasons of [`PinSyncView::dropped`], in metric-label order.
pub const DROP_REASONS: [&str; 7] = [
    "rate_cap",
    "ring_full",
    "bad_mac",
    "malformed",
    "replay",
    "unknown_backend",
    "not_live",
];

impl Counters {
    pub fn view(&self, listen: SocketAddr, peers: Vec<String>, join: JoinView) -> PinSyncView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let dropped = DROP_REASONS
            .iter()
            .zip([
                &self.dropped_rate_cap,
                &self.dropped_ring_full,
                &self.dropped_bad_mac,
                &self.dropped_malformed,
                &self.dropped_replay,
                &self.dropped_unknown_backend,
                &self.dropped_not_live,
            ])
            .map(|(r, c)| (r.to_string(), g(c)))
            .collect();
        PinSyncView {
            listen: listen.to_string(),
            peers,
            sent: g(&self.sent),
            datagrams_sent: g(&self.datagrams_sent),
            send_errors: g(&self.send_errors),
            received: g(&self.received),
            inserted: g(&self.inserted),
            dropped,
            join,
            join_answers: g(&self.join_answers),
            join_pins_sent: g(&self.join_pins_sent),
        }
    }
}

#[cfg(test)]
mod tests;
