//! Every kernel map the programs use. Sizes here are defaults: the daemon
//! resizes the Maglev and flow tables at load time from its config.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::quic::{
    AesTables, QUIC_ROUTE_COUNT, QuicScratch, QuicServiceEntry, QuicSidKey, QuicSidValue,
};
use lb_common::{
    ACTION_COUNT, ADDR_SLOTS, AddrKey, AddrSlot, BackendEntry, Counters, DEFAULT_FLOW_INSERT_RATE,
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, EVENT_COUNT, FloodState, FlowHash, FlowKey,
    FlowKey4, FlowValue, FragKey, FragValue, MAX_ADDR_SERVICES, MAX_BACKENDS, MAX_FRAGS,
    MAX_SERVICES, MAX_TX_PORTS, MaglevSlot, NEXTHOP_VIA_COUNT, NextHop, PIN_REPORT_STAT_COUNT,
    PIN_RING_BYTES, PORT_SLOTS, PortEntry, REASON_COUNT, RevAddrValue, RevPortEntry, ServiceEntry,
    TABLES_PER_SERVICE, UDP_SEEN_BUCKETS, UDP_SEEN_WAYS,
};

#[map]
pub static LB_PORTS: Array<PortEntry> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
pub static LB_ADDR_SVCS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_ADDR_SERVICES, 0);

/// The direct-mapped front of `LB_ADDR_SVCS` (`AddrSlot`), read first.
#[map]
pub static LB_ADDR_SLOTS: Array<AddrSlot> = Array::with_max_entries(ADDR_SLOTS, 0);

#[map]
pub static LB_SERVICES: Array<ServiceEntry> = Array::with_max_entries(MAX_SERVICES, 0);

/// Mapped into the daemon's memory so a whole table is written without a
/// system call per slot.
#[map]
pub static LB_MAGLEV: Array<MaglevSlot> = Array::with_max_entries(
    MAX_SERVICES * TABLES_PER_SERVICE * DEFAULT_MAGLEV_SIZE,
    BPF_F_MMAPABLE,
);

#[map]
pub static LB_BACKENDS: Array<BackendEntry> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Pins of IPv6 flows.
#[map]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Pins of IPv4 flows, under a 16-byte key: the kernel hashes and compares
/// the whole key on every lookup, and a 40-byte one cost a pinned IPv4
/// packet about 10 ns more (A/B, minimum of alternating runs: 54 -> 43 ns).
#[map]
pub static LB_FLOWS4: LruHashMap<FlowKey4, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Pins added under a new key (`FLOW_COUNT_ADDED`, by the program), and
/// the daemon's counts of pins removed and evicted: each flow table's size
/// without a walk.
#[map]
pub static LB_FLOW_COUNT: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(lb_common::FLOW_COUNT_ENTRIES, 0);

#[map]
pub static LB_REV_PORTS: Array<RevPortEntry> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
pub static LB_REV_ADDRS: HashMap<AddrKey, RevAddrValue> =
    HashMap::with_max_entries(MAX_ADDR_SERVICES, 0);

#[map]
pub static LB_SVC_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static LB_BE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static LB_ACT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ACTION_COUNT, 0);

/// Packets passed to the stack unbalanced, by `Reason`.
#[map]
pub static LB_RSN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Packets dropped, by `Reason`.
#[map]
pub static LB_DROP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Egress interfaces for `nat`/`dsr` redirects, keyed by ifindex.
#[map]
pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
pub static LB_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

/// This CPU's flow-insert count in the current second (one entry).
#[map]
pub static LB_FLOOD: PerCpuArray<FloodState> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's last clock read: the jiffy it was made in and the second it
/// gave ([`crate::select::now_secs`]). Not pinned: a cache, each loaded
/// program has its own.
#[map]
pub static LB_CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClockCache {
    pub jiffies: u64,
    pub secs: u32,
    pub _pad: u32,
}

/// Hashes of UDP flows seen, in 4-way buckets picked by the hash's top
/// bits: a packet whose hash is not in its bucket starts a new flow.
#[map]
pub static LB_UDP_SEEN: Array<[u32; UDP_SEEN_WAYS]> = Array::with_max_entries(UDP_SEEN_BUCKETS, 0);

/// Flow-table inserts allowed per CPU per second; set by the daemon at load
/// time (`dataplane.flow_insert_rate`), 0 for no cap.
#[unsafe(no_mangle)]
pub static FLOW_INSERT_RATE: u32 = DEFAULT_FLOW_INSERT_RATE;

#[inline(always)]
pub fn flow_insert_rate() -> u32 {
    // SAFETY: a plain read of a global the loader may have rewritten; the
    // volatile read keeps the compiler from folding the default in.
    unsafe { core::ptr::read_volatile(&FLOW_INSERT_RATE) }
}

/// The flow hash (`FlowHash` as u32); set by the daemon at load time. The
/// verifier sees the loaded value (a frozen global), so the branch between
/// the two hashes is gone from the program that runs.
#[unsafe(no_mangle)]
pub static FLOW_HASH: u32 = FlowHash::Murmur3 as u32;

#[inline(always)]
pub fn flow_hash() -> FlowHash {
    // SAFETY: as for `flow_insert_rate`: a global the loader may rewrite.
    if unsafe { core::ptr::read_volatile(&FLOW_HASH) } == FlowHash::Fast as u32 {
        FlowHash::Fast
    } else {
        FlowHash::Murmur3
    }
}

/// New pins in changed slots, for the daemon to share with its peers
/// (`PinReport`). Not pinned: each loaded program has its own ring.
#[map]
pub static LB_PIN_RING: RingBuf = RingBuf::with_byte_size(PIN_RING_BYTES, 0);

/// Pin reports written and dropped on a full ring (`PinReportStat`).
#[map]
pub static LB_PIN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PIN_REPORT_STAT_COUNT, 0);

/// Non-zero: new pins are reported to `LB_PIN_RING`; set by the daemon at
/// load time when it shares pins (`[cluster] pin_sync`).
#[unsafe(no_mangle)]
pub static PIN_REPORT: u32 = 0;

#[inline(always)]
pub fn pin_report() -> bool {
    // SAFETY: as for `flow_insert_rate`: a global the loader may rewrite.
    unsafe { core::ptr::read_volatile(&PIN_REPORT) != 0 }
}
/// Where the first fragment of a fragmented datagram went, for its later
/// fragments (which carry no ports). Written and read only for fragments.
#[map]
pub static LB_FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// The next hop of each remote backend by backend id, resolved and kept
/// fresh by the daemon; `nat` and `dsr` use it instead of the FIB.
#[map]
pub static LB_NEXTHOPS: Array<NextHop> = Array::with_max_entries(MAX_BACKENDS, 0);

/// `nat`/`dsr` packets by where their next hop came from (`NextHopVia`).
#[map]
pub static LB_NH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NEXTHOP_VIA_COUNT, 0);

/// Each service's QUIC-LB config (flags 0: none), by service id.
#[map]
pub static LB_QUIC_SVCS: Array<QuicServiceEntry> = Array::with_max_entries(MAX_SERVICES, 0);

/// (service id, server id) -> the backend holding the server id.
#[map]
pub static LB_QUIC_SIDS: HashMap<QuicSidKey, QuicSidValue> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

/// UDP packets of QUIC-LB services by `QuicRoute`, per service.
#[map]
pub static LB_QUIC_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * QUIC_ROUTE_COUNT, 0);

/// The AES tables (one entry), written by the daemon at load.
#[map]
pub static LB_AES: Array<AesTables> = Array::with_max_entries(1, 0);

/// `lb_xdp` <-> `lb_xdp_quic_decrypt` hand-over (one entry per CPU).
#[map]
pub static LB_QUIC_SCRATCH: PerCpuArray<QuicScratch> = PerCpuArray::with_max_entries(1, 0);

/// The decrypt program and `lb_xdp`, for their tail calls to each other.
#[map]
pub static LB_QUIC_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);
