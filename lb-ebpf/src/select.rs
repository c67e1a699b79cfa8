//! Service lookup, the Maglev pick and the flow table.
//!
//! Map lookups on the hot path, and why each is there:
//! - `LB_PORTS`, `LB_SERVICES`, `LB_MAGLEV`, `LB_BACKENDS`: arrays, inlined by
//!   the verifier, no helper call.
//! - `LB_ADDR_SLOTS`: an array, only for ports that have address-specific
//!   services; `LB_ADDR_SVCS` (hash) only for a slot several of them share.
//! - `LB_UDP_SEEN`: an array, read for UDP packets to count new flows.
//! - `LB_FLOWS4` / `LB_FLOWS` (LRU, IPv4 / IPv6): only in "sticky" slots,
//!   whose backend changed; flows in slots that never changed cannot be
//!   pinned anywhere else, so a SYN or an established packet in a clean slot
//!   costs no helper call at all.
//! - `LB_CLOCK` (per-CPU array): the second of the last clock read, for the
//!   sticky path and the next-hop cache; the clock itself (a helper) is read
//!   once a jiffy.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    ADDR_SLOT_SHARED, Addr, AddrKey, BACKEND_ACTIVE, BACKEND_REWRITE_ADDR, BackendEntry, Event,
    FlowKey, FlowKey4, FlowValue, MaglevSlot, NO_BACKEND, PORT_HAS_ADDR_SERVICES, PROTO_TCP,
    PinReport, PinReportStat, Reason, ServiceEntry, TABLES_PER_SERVICE, TCP_MISS_PREV_SECS,
    UDP_AFFINITY_SECS, UDP_SEEN_BITS, addr_slot, maglev_index, maglev_slot, port_slot,
};

use crate::{
    maps::{
        self, LB_ADDR_SLOTS, LB_ADDR_SVCS, LB_BACKENDS, LB_CLOCK, LB_FLOOD, LB_FLOWS, LB_FLOWS4,
        LB_MAGLEV, LB_PIN_RING, LB_PORTS, LB_SERVICES, LB_UDP_SEEN, flow_insert_rate, pin_report,
    },
    parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN},
    stats,
};

/// Finds the service for the packet's destination: the port array first
/// (wildcard services), the address hash only where the port needs it.
#[inline(always)]
pub fn service(p: &Packet) -> Result<(u32, &'static ServiceEntry), Reason> {
    let port = u16::from_be(p.dport);
    let entry = LB_PORTS
        .get(port_slot(port, p.proto))
        .ok_or(Reason::NoService)?;
    // Wildcards are per family: `0.0.0.0` serves IPv4, `[::]` IPv6.
    let mut id_plus_one = if p.v6 {
        entry.wildcard_v6
    } else {
        entry.wildcard_v4
    } as u32;
    if entry.flags & PORT_HAS_ADDR_SERVICES != 0 {
        let key = AddrKey {
            addr: p.dst,
            port,
            proto: p.proto,
            _pad: 0,
        };
        if let Some(id) = addr_service(&key) {
            id_plus_one = id + 1;
        }
    }
    if id_plus_one == 0 {
        return Err(Reason::NoService);
    }
    let id = id_plus_one - 1;
    let svc = LB_SERVICES.get(id).ok_or(Reason::NoService)?;
    Ok((id, svc))
}

/// The address-specific service of `key`: its slot of `LB_ADDR_SLOTS`
/// names it, or says the hash map must (`ADDR_SLOT_SHARED`). The slot's
/// service word is read before its key: the daemon writes a new key only
/// under `ADDR_SLOT_SHARED`, so a slot being rewritten is never taken for
/// a key it does not hold.
#[inline(always)]
fn addr_service(key: &AddrKey) -> Option<u32> {
    let slot = LB_ADDR_SLOTS.get(addr_slot(key))?;
    // SAFETY: a read of an aligned word of a map value.
    let service = unsafe { core::ptr::read_volatile(&slot.service) };
    match service {
        0 => None,
        ADDR_SLOT_SHARED => unsafe { LB_ADDR_SVCS.get(key) }.copied(),
        id_plus_one if same_key(&slot.key, key) => Some(id_plus_one - 1),
        _ => None,
    }
}

/// Whether a slot's key is `key`, read after the slot's service word:
/// volatile reads, which the compiler keeps in order, field by field (an
/// array comparison may become a `bcmp` call).
#[inline(always)]
fn same_key(slot: &AddrKey, key: &AddrKey) -> bool {
    // SAFETY: reads of aligned fields of a map value.
    unsafe {
        use core::ptr::read_volatile as read;
        read(&slot.addr[0]) == key.addr[0]
            && read(&slot.addr[1]) == key.addr[1]
            && read(&slot.addr[2]) == key.addr[2]
            && read(&slot.addr[3]) == key.addr[3]
            && read(&slot.port) == key.port
            && read(&slot.proto) == key.proto
    }
}

/// The packet's flow hash, by the function the daemon chose at load.
#[inline(always)]
fn hash(p: &Packet) -> u32 {
    maps::flow_hash().hash(&p.src, &p.dst, p.sport, p.dport, p.proto)
}

pub struct Pick {
    pub backend: u32,
    pub entry: &'static BackendEntry,
    pub new_flow: bool,
}

/// The entry of backend `id` if it still is the backend a pin or a slot
/// remembers: same service, same generation (ids are reused), and it keeps
/// its flows (active or draining).
#[inline(always)]
pub(crate) fn holder(id: u32, service: u32, generation: u32) -> Option<&'static BackendEntry> {
    let e = LB_BACKENDS.get(id)?;
    if e.keeps_flows() && e.service == service && e.generation == generation {
        Some(e)
    } else {
        None
    }
}

/// Picks the backend for the packet from the service's active Maglev table.
/// `pin` is false for a packet that only asks where its flow goes (an ICMP
/// error about it): the pick is the same as for the flow's next packet that
/// is not new, but nothing is written (no pin, no UDP flow seen, no new
/// flow counted).
#[inline(always)]
pub fn backend(p: &Packet, id: u32, svc: &ServiceEntry, pin: bool) -> Result<Pick, Reason> {
    let m = svc.table_size;
    let table = svc.active;
    if m == 0 || table >= TABLES_PER_SERVICE {
        return Err(Reason::NoBackend);
    }
    let h = hash(p);
    let slot = maglev_slot(h, m);
    let e = LB_MAGLEV
        .get(maglev_index(id, table, m, slot))
        .ok_or(Reason::NoBackend)?;
    let tcp = p.proto == PROTO_TCP;
    // A flow is new on a SYN (TCP) or when its hash is not in the cache of
    // UDP flows seen (an array read; written only for new flows).
    let new_flow = if !pin {
        false
    } else if tcp {
        p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        udp_new(h)
    };
    let (backend, entry) = if e.is_sticky() {
        sticky(p, id, slot, e, new_flow, pin)?
    } else {
        // The current table's backends are written before the table.
        let entry = LB_BACKENDS.get(e.backend).ok_or(Reason::NoBackend)?;
        (e.backend, entry)
    };
    Ok(Pick {
        backend,
        entry,
        new_flow,
    })
}

/// Whether a UDP packet starts a flow not seen before: its hash against the
/// four last seen in its bucket. One array read (a cache line); written only
/// for new flows. A full bucket forgets one of its four flows, which then
/// counts as new again: rare below about a million live UDP flows.
#[inline(always)]
fn udp_new(h: u32) -> bool {
    let tag = h | 1;
    let Some(b) = LB_UDP_SEEN.get_ptr_mut(h >> (32 - UDP_SEEN_BITS)) else {
        return false;
    };
    let b = unsafe { &mut *b };
    if b[0] == tag || b[1] == tag || b[2] == tag || b[3] == tag {
        return false;
    }
    let way = if b[0] == 0 {
        0
    } else if b[1] == 0 {
        1
    } else if b[2] == 0 {
        2
    } else if b[3] == 0 {
        3
    } else {
        (h as usize >> 1) & 3
    };
    b[way] = tag;
    true
}

/// The pin of the packet's flow, from the flow table of its family.
#[inline(always)]
fn pin_of(p: &Packet) -> Option<FlowValue> {
    let v = if p.v6 {
        LB_FLOWS.get_ptr(&flow_key(p))
    } else {
        LB_FLOWS4.get_ptr(&flow_key4(p))
    }?;
    Some(unsafe { *v })
}

/// Pins the packet's flow in the flow table of its family.
#[inline(always)]
fn pin_flow(p: &Packet, v: &FlowValue) -> bool {
    if p.v6 {
        LB_FLOWS.insert(&flow_key(p), v, 0).is_ok()
    } else {
        LB_FLOWS4.insert(&flow_key4(p), v, 0).is_ok()
    }
}

/// The IPv6 flow table's key for a packet's 5-tuple (and the key pin
/// reports carry for either family), built as whole words: see
/// [`flow_key4`].
#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    let words: [u32; 10] = [
        p.src[0],
        p.src[1],
        p.src[2],
        p.src[3],
        p.dst[0],
        p.dst[1],
        p.dst[2],
        p.dst[3],
        ports_word(p),
        proto_word(p.proto),
    ];
    // SAFETY: `FlowKey` is `repr(C)`, 40 bytes of integers with no padding
    // (asserted in lb-common), and 4-aligned like `[u32; 10]`.
    unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
}

/// The IPv4 flow table's key for a packet's 5-tuple. Built as whole words:
/// written field by field (the ports as two 2-byte stores, which the
/// kernel's hash then reads back as one word), the same lookup measured
/// 12-15 ns slower (A/B, minimum of alternating runs), most likely the
/// word loads waiting on the narrower stores.
#[inline(always)]
fn flow_key4(p: &Packet) -> FlowKey4 {
    let words: [u32; 4] = [p.src[3], p.dst[3], ports_word(p), proto_word(p.proto)];
    // SAFETY: `FlowKey4` is `repr(C)`, 16 bytes of integers with no padding
    // (asserted in lb-common), and 4-aligned like `[u32; 4]`.
    unsafe { core::mem::transmute::<[u32; 4], FlowKey4>(words) }
}

/// A key's `sport` and `dport` (packet byte order each) as the one
/// little-endian word they form.
#[inline(always)]
fn ports_word(p: &Packet) -> u32 {
    u32::from(p.sport) | u32::from(p.dport) << 16
}

/// A key's `proto` byte and the three zero pad bytes after it, as the one
/// little-endian word they form. A `_pad: [0; 3]` field initializer makes
/// LLVM call a byte-loop `memset` (a BPF-to-BPF call on every sticky-slot
/// packet); one 4-byte store does the same.
#[inline(always)]
pub(crate) fn proto_word(proto: u8) -> u32 {
    u32::from_le_bytes([proto, 0, 0, 0])
}

/// Seconds of CLOCK_MONOTONIC (coarse, as the daemon's
/// `monotonic_secs`). The coarse clock moves once a tick, as jiffies do,
/// so a CPU reads it once a jiffy and keeps the second it gave: the
/// verifier inlines `bpf_jiffies64` to a plain load, where the clock is a
/// helper call and a 64-bit division (15-20 ns a packet on `nat`/`dsr`).
/// Just after a tick the clock may not have moved yet; the cached second
/// is then at most a tick behind until the next one.
#[inline(always)]
pub fn now_secs() -> u32 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = LB_CLOCK.get_ptr_mut(0) else {
        return clock_secs();
    };
    let c = unsafe { &mut *c };
    if c.jiffies != jiffies {
        c.jiffies = jiffies;
        c.secs = clock_secs();
    }
    c.secs
}

/// Seconds from the daemon's stamp `then` to `now` (`now_secs`). A stamp
/// one second ahead is taken as just now: the daemon reads the same clock,
/// but this CPU's second can lag it by up to a tick (`now_secs`), and a
/// plain difference would then wrap to "four billion seconds ago".
#[inline(always)]
pub fn secs_since(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d == u32::MAX { 0 } else { d }
}

#[inline(always)]
fn clock_secs() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Counts an insert against this CPU's per-second cap (Katran's
/// `is_under_flood`): a flood of new flows in changed slots cannot churn the
/// whole flow table. Refused flows are still forwarded, unpinned.
#[inline(always)]
fn may_insert(now: u32) -> bool {
    let cap = flow_insert_rate();
    if cap == 0 {
        return true;
    }
    let Some(f) = LB_FLOOD.get_ptr_mut(0) else {
        return true;
    };
    let f = unsafe { &mut *f };
    if f.second != now {
        f.second = now;
        f.inserts = 0;
    }
    if f.inserts >= cap {
        return false;
    }
    f.inserts += 1;
    true
}

/// A slot whose backend changed: the flow table decides.
/// - A flow pinned to a backend that still holds it stays there, except a
///   SYN (a new connection on a reused port) to a draining backend.
/// - A new flow (a SYN, a UDP flow not seen before) takes the current
///   backend.
/// - A miss (no pin, not new) within `TCP_MISS_PREV_SECS` (TCP) or
///   `UDP_AFFINITY_SECS` (UDP) of the change is taken for a flow that began
///   before it and goes to the previous backend if that still keeps flows
///   (active or draining); later misses are taken for pins the LRU evicted
///   and go to the current backend.
///
/// Every decision is pinned so it survives the next change, except for a
/// RST (which ends the flow) and inserts over the per-CPU rate cap. A RST
/// never removes a pin: an unverified RST could be spoofed to move a live
/// flow, so pins of closed flows age out of the LRU instead.
#[inline(always)]
fn sticky(
    p: &Packet,
    id: u32,
    slot: u32,
    e: &MaglevSlot,
    new_flow: bool,
    pin: bool,
) -> Result<(u32, &'static BackendEntry), Reason> {
    let tcp = p.proto == PROTO_TCP;
    // A pin written below replaces this one rather than adding an entry.
    let mut held = false;
    if let Some(v) = pin_of(p) {
        held = true;
        match holder(v.backend, id, v.generation) {
            // A SYN on the 4-tuple of a pinned flow is a new connection
            // from a reused client port (or a retransmitted SYN, which
            // may go anywhere): it follows the pin only to a backend that
            // takes new flows, never to a draining one.
            Some(entry) if !(tcp && new_flow) || entry.state == BACKEND_ACTIVE => {
                return Ok((v.backend, entry));
            }
            Some(_) => {}
            None => stats::event(Event::PinStale),
        }
    }
    let now = now_secs();
    let mut choice = e.backend;
    if !new_flow {
        let window = if tcp {
            TCP_MISS_PREV_SECS
        } else {
            UDP_AFFINITY_SECS
        };
        let prev = if secs_since(now, e.changed) < window {
            holder(e.prev, id, e.prev_gen)
        } else {
            None
        };
        if prev.is_some() {
            choice = e.prev;
        }
        if pin {
            stats::event(if prev.is_some() {
                Event::MissPrev
            } else {
                Event::MissCurrent
            });
        }
    }
    if choice == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    let entry = LB_BACKENDS.get(choice).ok_or(Reason::NoBackend)?;
    let rst = tcp && p.tcp_flags & TCP_RST != 0;
    if pin && !rst {
        if may_insert(now) {
            let v = FlowValue {
                backend: choice,
                service: id,
                slot,
                generation: entry.generation,
            };
            if pin_flow(p, &v) {
                if !held {
                    stats::flow_added(p.v6);
                }
                if pin_report() {
                    report(p, entry, id);
                }
            }
            stats::event(Event::PinInserted);
        } else {
            stats::event(Event::PinRefused);
        }
    }
    Ok((choice, entry))
}

/// Reports a pin just written to the daemon (which shares it with the
/// cluster's other nodes), written in place in the ring: no stack copy.
/// A full ring drops the report and counts it.
#[inline(always)]
fn report(p: &Packet, entry: &BackendEntry, service: u32) {
    match LB_PIN_RING.reserve::<PinReport>(0) {
        Some(mut slot) => {
            slot.write(PinReport {
                key: flow_key(p),
                backend_addr: entry.addr,
                backend_port: entry.port,
                _pad: 0,
                service,
            });
            slot.submit(0);
            stats::pin_report(PinReportStat::Reported);
        }
        None => stats::pin_report(PinReportStat::RingFull),
    }
}

/// Whether a reply leaving from backend port `port` (host order) and
/// address `addr` answers a flow this program balanced: `fwd`, the flow it
/// answers, maps in its service's active table to a backend with that port
/// (and address, where the address was rewritten), as the slot's current or
/// previous backend or the backend the flow is pinned to. Replies of the
/// host's own connections that happen to use a backend port do not.
#[inline(always)]
pub fn answers(fwd: &Packet, port: u16, addr: &Addr) -> bool {
    let Ok((id, svc)) = service(fwd) else {
        return false;
    };
    // A QUIC flow may reach any backend by its CID, whatever its 4-tuple.
    if crate::quic::routes_by_cid(fwd, id) {
        return true;
    }
    let m = svc.table_size;
    if m == 0 || svc.active >= TABLES_PER_SERVICE {
        return false;
    }
    let slot = maglev_slot(hash(fwd), m);
    let Some(e) = LB_MAGLEV.get(maglev_index(id, svc.active, m, slot)) else {
        return false;
    };
    let is = |backend: u32| match LB_BACKENDS.get(backend) {
        Some(b) => {
            b.service == id
                && b.port == port
                && (b.flags & BACKEND_REWRITE_ADDR == 0 || b.addr == *addr)
        }
        None => false,
    };
    if is(e.backend) {
        return true;
    }
    if !e.is_sticky() {
        return false;
    }
    if is(e.prev) {
        return true;
    }
    match pin_of(fwd) {
        Some(v) => is(v.backend),
        None => false,
    }
}
