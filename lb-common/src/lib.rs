//! Types shared by the kernel programs (`lb-ebpf`) and the daemon (`lb-userspace`):
//! map keys and values, map names, sizes and limits, and the flow hash. One
//! definition for both sides; every layout is pinned by a size assertion.
#![no_std]

use core::mem::size_of;

/// Bumped whenever a map layout or the meaning of a field changes, so a daemon
/// never adopts pinned maps written by an incompatible version.
pub const LAYOUT_VERSION: u32 = 7;

/// Interfaces `nat` and `dsr` packets may be redirected to.
pub const MAX_TX_PORTS: u32 = 64;

/// Service ids are `0..MAX_SERVICES` unless the daemon asks for fewer.
pub const MAX_SERVICES: u32 = 64;
/// Backend ids are global across services: `0..MAX_BACKENDS`.
pub const MAX_BACKENDS: u32 = 8192;
/// Maglev tables per service: current, previous (still read by packets in
/// flight) and the one being written.
pub const TABLES_PER_SERVICE: u32 = 3;
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
pub const MAX_MAGLEV_SIZE: u32 = 1_048_573;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_048_576;
/// Services whose address is specific (not the wildcard) live in a hash map.
pub const MAX_ADDR_SERVICES: u32 = 4096;
/// Entries of the port-indexed arrays: one per (port, protocol).
pub const PORT_SLOTS: u32 = 65_536 * 2;
/// A Maglev slot or flow that points nowhere.
pub const NO_BACKEND: u32 = u32::MAX;
/// First fragments remembered until their later fragments arrive.
pub const MAX_FRAGS: u32 = 8192;

/// Map names, as the kernel object defines them (at most 15 bytes each).
pub mod maps {
    pub const PORTS: &str = "LB_PORTS";
    pub const ADDR_SERVICES: &str = "LB_ADDR_SVCS";
    pub const ADDR_SLOTS: &str = "LB_ADDR_SLOTS";
    pub const SERVICES: &str = "LB_SERVICES";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// IPv6 flows ([`crate::FlowKey`]).
    pub const FLOWS: &str = "LB_FLOWS";
    /// IPv4 flows ([`crate::FlowKey4`]).
    pub const FLOWS4: &str = "LB_FLOWS4";
    pub const REV_PORTS: &str = "LB_REV_PORTS";
    pub const REV_ADDRS: &str = "LB_REV_ADDRS";
    pub const SERVICE_STATS: &str = "LB_SVC_STATS";
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    pub const ACTION_STATS: &str = "LB_ACT_STATS";
    pub const REASON_STATS: &str = "LB_RSN_STATS";
    pub const TX_PORTS: &str = "LB_TX_PORTS";
    pub const EVENTS: &str = "LB_EVENTS";
    pub const FLOOD: &str = "LB_FLOOD";
    pub const UDP_SEEN: &str = "LB_UDP_SEEN";
    pub const FRAGS: &str = "LB_FRAGS";
    pub const DROP_STATS: &str = "LB_DROP_STATS";
    pub const FLOW_COUNT: &str = "LB_FLOW_COUNT";
    pub const NEXTHOPS: &str = "LB_NEXTHOPS";
    pub const NEXTHOP_STATS: &str = "LB_NH_STATS";
    pub const QUIC_SERVICES: &str = "LB_QUIC_SVCS";
    pub const QUIC_SERVER_IDS: &str = "LB_QUIC_SIDS";
    pub const QUIC_STATS: &str = "LB_QUIC_STATS";
    pub const AES_TABLES: &str = "LB_AES";
    /// Not pinned (not in `ALL`): each loaded program has its own, so an
    /// old program never tail-calls into a new one.
    pub const QUIC_SCRATCH: &str = "LB_QUIC_SCRATCH";
    pub const QUIC_PROGS: &str = "LB_QUIC_PROGS";
    /// Not pinned: pin reports ([`crate::PinReport`]) for the daemon that
    /// loaded this program; a new daemon reads its own program's ring.
    pub const PIN_RING: &str = "LB_PIN_RING";
    /// Not pinned: pin reports by [`crate::PinReportStat`], per CPU.
    pub const PIN_STATS: &str = "LB_PIN_STATS";
    pub const ALL: [&str; 27] = [
        PORTS,
        ADDR_SERVICES,
        ADDR_SLOTS,
        SERVICES,
        MAGLEV,
        BACKENDS,
        FLOWS,
        FLOWS4,
        REV_PORTS,
        REV_ADDRS,
        SERVICE_STATS,
        BACKEND_STATS,
        ACTION_STATS,
        REASON_STATS,
        TX_PORTS,
        EVENTS,
        FLOOD,
        UDP_SEEN,
        FRAGS,
        DROP_STATS,
        FLOW_COUNT,
        NEXTHOPS,
        NEXTHOP_STATS,
        QUIC_SERVICES,
        QUIC_SERVER_IDS,
        QUIC_STATS,
        AES_TABLES,
    ];
}

/// Metric names both the daemon and the tests read.
pub mod metrics {
    /// Packets passed to the local stack unbalanced, by `Reason`.
    pub const PASSED: &str = "lb_passed_total";
    /// Packets dropped, by `Reason`.
    pub const DROPPED: &str = "lb_dropped_total";
    /// `nat`/`dsr` packets by where their next hop came from (`NextHopVia`).
    pub const NEXT_HOPS: &str = "lb_next_hop_lookups_total";
    /// UDP packets of QUIC-LB services, by service and `QuicRoute`.
    pub const QUIC_PACKETS: &str = "lb_quic_packets_total";
}

/// Program names in the object.
pub mod programs {
    pub const XDP: &str = "lb_xdp";
    pub const TC_EGRESS: &str = "lb_tc_egress";
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// Decrypts a QUIC-LB CID for `lb_xdp`, entered by tail call.
    pub const XDP_QUIC_DECRYPT: &str = "lb_xdp_quic_decrypt";
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Index into the port arrays for a (host-order port, IP protocol) pair.
#[inline(always)]
pub fn port_slot(port: u16, proto: u8) -> u32 {
    u32::from(port) * 2 + if proto == PROTO_UDP { 1 } else { 0 }
}

/// Address words as they sit in the packet (network byte order, read natively).
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so one key type
/// serves both families.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address, in packet byte order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
pub fn v4_mapped(addr: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, addr]
}

#[inline(always)]
pub fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Value of `LB_PORTS[port_slot(port, proto)]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// Wildcard service on this port for IPv4 packets (`0.0.0.0`): service
    /// id + 1, 0 for none.
    pub wildcard_v4: u16,
    /// The same for IPv6 packets (`[::]`): each family has its own.
    pub wildcard_v6: u16,
    /// `PORT_HAS_ADDR_SERVICES` when `LB_ADDR_SVCS` holds services for this
    /// port; only then does the program pay for a hash lookup.
    pub flags: u32,
}
const _: () = assert!(size_of::<PortEntry>() == 8);
// Service id + 1 must fit the u16 wildcard fields.
const _: () = assert!(MAX_SERVICES < u16::MAX as u32);
pub const PORT_HAS_ADDR_SERVICES: u32 = 1;

/// Key of `LB_ADDR_SVCS` (value: service id) and `LB_REV_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// An entry of `LB_ADDR_SLOTS`, the direct-mapped front of `LB_ADDR_SVCS`
/// that the program reads first: an array read the verifier inlines, where
/// the hash map is a hashed lookup (about 45 ns a packet, measured).
/// Every key of `LB_ADDR_SVCS` is in the slot [`addr_slot`] gives it,
/// alone or, when keys share the slot, behind `ADDR_SLOT_SHARED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrSlot {
    pub key: AddrKey,
    /// 0: no address service has this slot; `ADDR_SLOT_SHARED`: several
    /// do, ask `LB_ADDR_SVCS`; else `key`'s service id + 1.
    pub service: u32,
}
const _: () = assert!(size_of::<AddrSlot>() == 24);
pub const ADDR_SLOT_SHARED: u32 = u32::MAX;
pub const ADDR_SLOT_BITS: u32 = 13;
/// Twice `MAX_ADDR_SERVICES`, so that few keys share a slot.
pub const ADDR_SLOTS: u32 = 1 << ADDR_SLOT_BITS;
const _: () = assert!(ADDR_SLOTS >= 2 * MAX_ADDR_SERVICES);

/// The slot of `LB_ADDR_SLOTS` for `key`: its words folded together,
/// then a multiplicative hash, whose top bits depend on every bit folded.
#[inline(always)]
pub fn addr_slot(key: &AddrKey) -> u32 {
    let a = &key.addr;
    let h = a[0]
        ^ a[1].rotate_left(7)
        ^ a[2].rotate_left(14)
        ^ a[3]
        ^ (u32::from(key.port) << 8 | u32::from(key.proto)).rotate_left(21);
    h.wrapping_mul(0x9e37_79b1) >> (32 - ADDR_SLOT_BITS)
}

/// How a service reaches its backends.
pub const FWD_LOCAL: u8 = 0;
pub const FWD_NAT: u8 = 1;
pub const FWD_DSR: u8 = 2;

/// Value of `LB_SERVICES[service id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Index (0..3) of the Maglev table packets read. Userspace writes an
    /// inactive table, then flips this one word.
    pub active: u32,
    /// Maglev table size M (prime); 0 means the service has no backends.
    pub table_size: u32,
    pub forwarding: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Counts table installs; the programs ignore it, readers use it to
    /// tell how many flips happened while they looked.
    pub generation: u32,
}
const _: () = assert!(size_of::<ServiceEntry>() == 16);

/// Index of a service's table `t` in `LB_MAGLEV`, whose every table has the
/// dataplane-wide size `m`.
#[inline(always)]
pub fn maglev_index(service: u32, table: u32, m: u32, slot: u32) -> u32 {
    (service * TABLES_PER_SERVICE + table) * m + slot
}

/// The slot of flow hash `h` in a table of `m` slots.
#[inline(always)]
pub fn maglev_slot(h: u32, m: u32) -> u32 {
    h % m
}

/// One slot of a Maglev table: the backend new flows take, and the backend
/// the slot held before its last change. While the two differ the slot is
/// "sticky": its flows may be pinned in the flow table and must look there.
/// The daemon makes a sticky slot clean again (`prev = backend`) once no
/// live pin needs its previous backend and misses no longer go there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevSlot {
    pub backend: u32,
    pub prev: u32,
    /// When the backend last changed, in seconds of CLOCK_MONOTONIC (the
    /// clock of `bpf_ktime_get_coarse_ns`); 0 if it never did.
    pub changed: u32,
    /// `BackendEntry::generation` of `prev` when the slot changed: a reused
    /// id of another generation is not the backend this slot remembers.
    pub prev_gen: u32,
}
const _: () = assert!(size_of::<MaglevSlot>() == 16);

impl MaglevSlot {
    pub const EMPTY: MaglevSlot = MaglevSlot {
        backend: NO_BACKEND,
        prev: NO_BACKEND,
        changed: 0,
        prev_gen: 0,
    };

    /// A slot whose backend never changed.
    pub const fn clean(backend: u32) -> MaglevSlot {
        MaglevSlot {
            backend,
            prev: backend,
            changed: 0,
            prev_gen: 0,
        }
    }

    /// The slot's backend changed and flows may be pinned elsewhere.
    pub const fn is_sticky(&self) -> bool {
        self.backend != self.prev
    }
}

/// How long after a slot changes a UDP packet with no pin, of a flow seen
/// before (its hash is in `LB_UDP_SEEN`), is still taken for one of a flow
/// that began before the change and kept on the slot's previous backend.
/// Later, such a packet is taken for a flow whose pin the LRU evicted and
/// goes to the current backend. Flows never seen are new: they take the
/// current backend at once, so backends added for UDP get their share and
/// draining backends get no new flows.
pub const UDP_AFFINITY_SECS: u32 = 30;
/// The same for TCP packets that are not a SYN: within this time of the
/// change a miss is most likely a connection established before it and
/// idle since (it goes to the previous backend); later, a miss is most
/// likely a pin the LRU evicted (it goes to the current backend). See the
/// README's "fast path" section for the measured trade-off.
pub const TCP_MISS_PREV_SECS: u32 = 120;
/// After this long no miss goes to a slot's previous backend any more, so
/// only pins can still need it: the daemon's sweep may make the slot clean.
pub const STICKY_MISS_SECS: u32 = if TCP_MISS_PREV_SECS > UDP_AFFINITY_SECS {
    TCP_MISS_PREV_SECS
} else {
    UDP_AFFINITY_SECS
};

impl Default for MaglevSlot {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Backend states as the data plane sees them.
pub const BACKEND_UNUSED: u8 = 0;
/// Takes new flows (it is in the current Maglev table) and keeps old ones.
pub const BACKEND_ACTIVE: u8 = 1;
/// Takes no new flows; flows already on it stay.
pub const BACKEND_DRAINING: u8 = 2;
/// Disabled by the operator or failed its health checks: flows are re-picked.
pub const BACKEND_DOWN: u8 = 3;

/// Rewrite the destination address too (the backend address differs from the
/// service address); otherwise only the port changes.
pub const BACKEND_REWRITE_ADDR: u8 = 1;

/// Value of `LB_BACKENDS[backend id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub state: u8,
    pub flags: u8,
    /// The service this id belongs to; a pin or slot that names the id
    /// from another service is stale.
    pub service: u32,
    /// Bumped each time the daemon hands the id to a backend, so pins and
    /// slots made for an earlier holder of a reused id never match it.
    pub generation: u32,
}
const _: () = assert!(size_of::<BackendEntry>() == 28);

impl BackendEntry {
    /// Whether flows pinned to this backend stay on it: active or draining
    /// (not down, disabled or unused).
    #[inline(always)]
    pub fn keeps_flows(&self) -> bool {
        self.state == BACKEND_ACTIVE || self.state == BACKEND_DRAINING
    }
}

/// Value of `LB_NEXTHOPS[backend id]`: how to reach a backend on another
/// host (`nat`, `dsr`) without asking the FIB, as the daemon resolved it
/// from routes, neighbours and links. An array by backend id rather than
/// more fields in `BackendEntry`: the daemon's resolver rewrites these every
/// second on its own handle, never racing the map writer's backend entries,
/// and the backend entry the Maglev pick reads stays small.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface; 0: no entry (the FIB decides).
    pub ifindex: u32,
    /// `BackendEntry::generation` of the backend it was resolved for: an id
    /// handed to another backend never uses its predecessor's hop.
    pub generation: u32,
    /// When the daemon last confirmed it, in seconds of CLOCK_MONOTONIC (the
    /// clock of `bpf_ktime_get_coarse_ns`). Older than `NEXTHOP_FRESH_SECS`:
    /// stale (a daemon that stopped cannot leave a wrong MAC in use).
    pub resolved: u32,
    /// Largest IP packet the route takes; longer ones go to the FIB, which
    /// refuses them (fragmentation needed) as before.
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}
const _: () = assert!(size_of::<NextHop>() == 28);

/// How long a next hop stays usable after the daemon last confirmed it; the
/// daemon refreshes every entry every second.
pub const NEXTHOP_FRESH_SECS: u32 = 3;

/// A flow's 5-tuple: the key of the IPv6 flow table `LB_FLOWS`, and how
/// the daemon and pin reports name flows of either family (IPv4 addresses
/// mapped). IPv4 flows live in `LB_FLOWS4` under [`FlowKey4`]: the kernel
/// hashes and compares the whole key on every lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Packet byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key in `LB_FLOWS4`, for an IPv4 flow. The program keys a flow by
    /// its packet's family, and an IPv6 packet to an IPv4-mapped
    /// destination is never balanced, so the destination tells.
    pub fn v4(&self) -> Option<FlowKey4> {
        is_v4_mapped(&self.dst).then(|| FlowKey4 {
            src: self.src[3],
            dst: self.dst[3],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        })
    }
}

/// Key of the IPv4 flow table `LB_FLOWS4`: addresses in packet byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    /// Packet byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey4>() == 16);

impl From<FlowKey4> for FlowKey {
    fn from(k: FlowKey4) -> Self {
        FlowKey {
            src: v4_mapped(k.src),
            dst: v4_mapped(k.dst),
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of `LB_FLOWS` and `LB_FLOWS4`: where the flow is pinned, and the
/// slot that made it sticky (so userspace can tell which slots still have
/// pinned flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: u32,
    pub service: u32,
    pub slot: u32,
    /// The backend's generation when the flow was pinned.
    pub generation: u32,
}
const _: () = assert!(size_of::<FlowValue>() == 16);

/// Key of the LRU map `LB_FRAGS`: one fragmented datagram, as IP reassembly
/// knows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// Packet byte order: the IPv4 16-bit identification (widened) or the
    /// IPv6 fragment header's 32-bit one.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// Value of `LB_FRAGS`: where the first fragment went, so the later ones
/// (which carry no ports) follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub service: u32,
    pub backend: u32,
}
const _: () = assert!(size_of::<FragValue>() == 8);

/// Value of `LB_REV_PORTS[port_slot(backend port, proto)]`: replies leaving
/// from this port belong to a local backend and are rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevPortEntry {
    /// Service port (host order) for backends of wildcard services.
    pub service_port: u16,
    pub flags: u16,
}
const _: () = assert!(size_of::<RevPortEntry>() == 4);
/// Replies from this port go back out as `service_port`, address unchanged.
pub const REV_PORT_ONLY: u16 = 1;
/// `LB_REV_ADDRS` has entries for this port: look the source address up.
pub const REV_HAS_ADDRS: u16 = 2;

/// Value of `LB_REV_ADDRS[(backend addr, backend port, proto)]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevAddrValue {
    pub addr: Addr,
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<RevAddrValue>() == 20);

/// Per-CPU counters per service and per backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(size_of::<Counters>() == 24);

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

/// Declares a `#[repr(u32)]` enum whose values index a per-CPU counter map,
/// with its variant count and metric label names, so the kernel's map sizes
/// and userspace's label lists come from one list.
macro_rules! counted {
    (
        $(#[$meta:meta])*
        pub enum $name:ident [$count:ident, $names:ident] {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }
        /// How many variants: the size of the counter map.
        pub const $count: u32 = [$($value),+].len() as u32;
        /// Metric label of each variant, indexed by value.
        pub const $names: [&str; $count as usize] = [$($label),+];
        const _: () = {
            // Values are 0..COUNT in order, so a value indexes the names.
            let values = [$($value),+];
            let mut i = 0;
            while i < values.len() {
                assert!(values[i] == i as u32);
                i += 1;
            }
        };
        impl $name {
            /// Every variant, in value order.
            pub const ALL: [Self; $count as usize] = [$(Self::$variant),+];

            pub const fn name(self) -> &'static str {
                $names[self as usize]
            }
        }
    };
}

counted! {
    /// Flow-table events, indexed by their value in `LB_EVENTS` (per CPU).
    pub enum Event [EVENT_COUNT, EVENT_NAMES] {
        /// A pin written for a new flow in a changed slot.
        PinInserted = 0 => "pin_inserted",
        /// An insert refused because this CPU reached `FLOW_INSERT_RATE` this
        /// second.
        PinRefused = 1 => "pin_refused",
        /// A miss in a changed slot sent to the slot's previous backend.
        MissPrev = 2 => "miss_prev",
        /// A miss in a changed slot sent to the slot's current backend.
        MissCurrent = 3 => "miss_current",
        /// A pin that named a backend no longer holding it (down, removed, id
        /// reused): the flow was picked again.
        PinStale = 4 => "pin_stale",
    }
}

/// One new pin in a changed slot, as `LB_PIN_RING` reports it to the
/// daemon (which shares it with the other nodes of a cluster). The backend
/// is named by address, since backend ids differ between nodes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    pub key: FlowKey,
    pub backend_addr: Addr,
    /// Host byte order.
    pub backend_port: u16,
    pub _pad: u16,
    /// This node's service id (for logs; receivers look the service up).
    pub service: u32,
}
const _: () = assert!(size_of::<PinReport>() == 64);

/// Bytes of `LB_PIN_RING` (a power of two, a multiple of the page size):
/// 4096 reports of 64 bytes (plus the ring's 8-byte headers) between two
/// reads of the daemon.
pub const PIN_RING_BYTES: u32 = 512 * 1024;

counted! {
    /// Pin reports, indexed by value in `LB_PIN_STATS` (per CPU).
    pub enum PinReportStat [PIN_REPORT_STAT_COUNT, PIN_REPORT_STAT_NAMES] {
        /// A report written to the ring.
        Reported = 0 => "reported",
        /// A report dropped because the ring was full.
        RingFull = 1 => "ring_full",
    }
}

/// Entries of `LB_FLOW_COUNT`, which tells each flow table's size without
/// a walk: the program counts the pins it adds under a new key (per CPU),
/// the daemon the pins it removes, and at each walk of the table (the
/// sweep's) the entries the LRU evicted unseen until then (both in CPU 0's
/// value, each written by one writer). Added minus the other two, clamped
/// to the capacity, is the size; between walks the LRU's evictions are not
/// counted, so a table that evicted reads as full until the next walk.
/// These three count the IPv6 table; `FLOW_COUNT_V4` plus each counts the
/// IPv4 one.
pub const FLOW_COUNT_ADDED: u32 = 0;
pub const FLOW_COUNT_REMOVED: u32 = 1;
pub const FLOW_COUNT_EVICTED: u32 = 2;
pub const FLOW_COUNT_V4: u32 = 3;
pub const FLOW_COUNT_ENTRIES: u32 = 6;

/// The index of `LB_FLOW_COUNT` entry `which` (`FLOW_COUNT_ADDED`, ...) for
/// the IPv4 or the IPv6 flow table.
#[inline(always)]
pub const fn flow_count_index(v4: bool, which: u32) -> u32 {
    if v4 { FLOW_COUNT_V4 + which } else { which }
}

/// The flow table's size from the counts of `LB_FLOW_COUNT`.
pub fn flow_entries(added: u64, removed: u64, evicted: u64, capacity: u32) -> u64 {
    added
        .saturating_sub(removed)
        .saturating_sub(evicted)
        .min(u64::from(capacity))
}

counted! {
    /// Where a `nat`/`dsr` packet's next hop came from, indexed by value in
    /// `LB_NH_STATS` (per CPU).
    pub enum NextHopVia [NEXTHOP_VIA_COUNT, NEXTHOP_VIA_NAMES] {
        /// A fresh `LB_NEXTHOPS` entry of the backend's generation.
        Cache = 0 => "cache",
        /// No usable entry: `bpf_fib_lookup`.
        Fib = 1 => "fib",
    }
}

/// Per-CPU state of the flow-insert rate cap (`LB_FLOOD[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodState {
    /// The second (CLOCK_MONOTONIC) `inserts` counts.
    pub second: u32,
    pub inserts: u32,
}
const _: () = assert!(size_of::<FloodState>() == 8);

/// Default cap on flow-table inserts per CPU per second.
pub const DEFAULT_FLOW_INSERT_RATE: u32 = 100_000;

/// Buckets of `LB_UDP_SEEN`, the cache of UDP flow hashes that tells a new
/// UDP flow from a known one: `UDP_SEEN_WAYS` hashes a bucket, picked by the
/// hash's top `UDP_SEEN_BITS` bits (4 MiB in all).
pub const UDP_SEEN_BITS: u32 = 18;
pub const UDP_SEEN_BUCKETS: u32 = 1 << UDP_SEEN_BITS;
pub const UDP_SEEN_WAYS: usize = 4;

counted! {
    /// XDP actions, with their kernel values, which index `LB_ACT_STATS`.
    pub enum Action [ACTION_COUNT, XDP_ACTIONS] {
        Aborted = 0 => "aborted",
        Drop = 1 => "drop",
        Pass = 2 => "pass",
        Tx = 3 => "tx",
        Redirect = 4 => "redirect",
    }
}

counted! {
    /// Why a packet was not forwarded to a backend. A packet passed to the stack
    /// bumps `LB_RSN_STATS[reason]`, a dropped one `LB_DROP_STATS[reason]`.
    /// Passed packets leave untouched, except `nat` packets passed for
    /// `FibNoNeigh` (already rewritten for the backend, so the stack forwards
    /// them and resolves the neighbour).
    pub enum Reason [REASON_COUNT, REASON_NAMES] {
        /// Not IPv4 or IPv6 (ARP, LLDP, ...).
        NotIp = 0 => "not_ip",
        /// IP, but neither TCP nor UDP (ICMP, ...).
        NotTcpUdp = 1 => "not_tcp_udp",
        /// No service on this address, port and protocol.
        NoService = 2 => "no_service",
        /// A non-first IP fragment whose first fragment was not balanced here:
        /// not a service's, not seen yet (arrived out of order), or forgotten
        /// (evicted from `LB_FRAGS`). Passed.
        FragmentUnknown = 3 => "fragment_unknown",
        /// The frame ends inside a header.
        Truncated = 4 => "truncated",
        /// A header that cannot be right (IP version, IHL < 5, ...).
        BadHeader = 5 => "bad_header",
        /// The service has no backend to take this flow.
        NoBackend = 6 => "no_backend",
        /// More IPv6 extension headers than the program walks.
        ExtHeaders = 7 => "ext_headers",
        /// `nat`/`dsr`: the FIB has a route to the backend but no neighbour
        /// (MAC) yet. `nat`: passed, rewritten, so the stack forwards it and
        /// resolves the neighbour. `dsr`: dropped (the packet is addressed to a
        /// local service address; the stack would answer it itself).
        FibNoNeigh = 8 => "fib_no_neigh",
        /// `nat`/`dsr`: any other FIB failure (no route, blackhole, unreachable,
        /// prohibit, fragmentation needed, forwarding off, ...). Dropped.
        FibFail = 9 => "fib_fail",
        /// `nat`/`dsr`: the backend is reached through an interface that is not
        /// in `LB_TX_PORTS`. Dropped, nothing rewritten.
        NoTxPort = 10 => "no_tx_port",
        /// `nat`/`dsr`: a VLAN-tagged frame (the tag cannot be carried safely to
        /// another interface). Dropped.
        VlanTagged = 11 => "vlan_tagged",
        /// An ICMP error (destination unreachable, fragmentation needed /
        /// packet too big, time exceeded) whose quoted packet is well formed
        /// but is no reply of a service's flow: not TCP/UDP (an IPv6 quote
        /// with extension headers counts as such), no service on its source
        /// address and port, or no backend.
        IcmpUnmatched = 12 => "icmp_unmatched",
        /// An ICMP error whose quoted packet is cut short (less than its IP
        /// header and 8 bytes of TCP/UDP) or has a bad header (IP version,
        /// IHL, a non-first fragment).
        IcmpBadQuote = 13 => "icmp_bad_quote",
    }
}
/// Most IPv6 extension headers walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Which function maps a flow's 5-tuple to its Maglev slot. Every node of
/// a cluster, and every daemon that adopts a running data plane, must use
/// the same one: flows in slots that never changed keep their backend only
/// while the hash stays the same.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowHash {
    /// A murmur3-style chain over the 5-tuple's words: every release before
    /// `Fast`, kept for data planes and clusters that started with it.
    Murmur3 = 0,
    /// Independent products of the words, summed and mixed once: the same
    /// spread without a serial chain.
    Fast = 1,
}

impl FlowHash {
    const ALL: [FlowHash; 2] = [FlowHash::Murmur3, FlowHash::Fast];

    /// The name the config and the status use.
    pub const fn name(self) -> &'static str {
        match self {
            FlowHash::Murmur3 => "murmur3",
            FlowHash::Fast => "fast",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.name() == name)
    }

    /// The hash of a 5-tuple; addresses and ports in packet byte order.
    #[inline(always)]
    pub fn hash(self, src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
        match self {
            FlowHash::Murmur3 => flow_hash(src, dst, sport, dport, proto),
            FlowHash::Fast => flow_hash_fast(src, dst, sport, dport, proto),
        }
    }
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// [`FlowHash::Murmur3`]: a murmur3-style mix of the 5-tuple, one word
/// after another (each step waits for the one before). Addresses and ports
/// are in packet byte order.
#[inline(always)]
pub fn flow_hash(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9747_b28c ^ u32::from(proto);
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, (u32::from(sport) << 16) | u32::from(dport));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Odd 64-bit multipliers of [`flow_hash_fast`], one per input word
/// (splitmix64 outputs with the low bit set).
const FAST_HASH_WORDS: [u64; 10] = [
    0x71ab_40c1_0f86_a633,
    0x19b2_e702_a299_0689,
    0x1635_0ce1_4921_4c11,
    0xdca7_2d4c_6f9b_a2a9,
    0xb8ea_93a5_7cdc_be17,
    0xe9a9_d669_ba82_6353,
    0x5885_3721_892d_b713,
    0xecf7_9bb6_d738_cff9,
    0x3fc9_af69_99be_d8ef,
    0x1322_bfa2_7e5e_4b4b,
];
/// The multiplier of the final step.
const FAST_HASH_FINAL: u64 = 0x8df0_1952_5b74_7b3b;

/// [`FlowHash::Fast`]: each 32-bit word of the 5-tuple times its own odd
/// 64-bit constant, the products summed, the sum's halves folded and
/// multiplied once more; the result is the top 32 bits. The ten products
/// are independent, so the CPU overlaps them: the chain is a multiply, four
/// additions, a fold and a multiply, against nine dependent rounds for
/// [`flow_hash`]. Not keyed: like `Murmur3`, it spreads flows, it does not
/// resist a sender who picks tuples to collide.
#[inline(always)]
pub fn flow_hash_fast(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let w = |x: u32, i: usize| u64::from(x).wrapping_mul(FAST_HASH_WORDS[i]);
    let ports = (u32::from(sport) << 16) | u32::from(dport);
    let a = w(src[0], 0).wrapping_add(w(src[1], 1));
    let b = w(src[2], 2).wrapping_add(w(src[3], 3));
    let c = w(dst[0], 4).wrapping_add(w(dst[1], 5));
    let d = w(dst[2], 6).wrapping_add(w(dst[3], 7));
    let e = w(ports, 8).wrapping_add(w(u32::from(proto), 9));
    let sum = a
        .wrapping_add(b)
        .wrapping_add(c.wrapping_add(d))
        .wrapping_add(e);
    ((sum ^ (sum >> 32)).wrapping_mul(FAST_HASH_FINAL) >> 32) as u32
}

// After `counted!`, which it uses.
pub mod quic;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for PortEntry {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for AddrSlot {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for ServiceEntry {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for MaglevSlot {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for BackendEntry {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FlowKey4 {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for PinReport {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FragValue {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for RevPortEntry {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for RevAddrValue {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for FloodState {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for NextHop {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for quic::QuicServiceEntry {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for quic::QuicSidKey {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for quic::QuicSidValue {}
    // SAFETY: #[repr(C)], integer fields only, every byte pattern valid.
    unsafe impl aya::Pod for quic::QuicScratch {}
    // SAFETY: #[repr(C)], integer arrays only, every byte pattern valid.
    unsafe impl aya::Pod for quic::AesTables {}
}

#[cfg(test)]
mod flow_hash_tests {
    use super::*;

    /// Pearson's chi-square of `n` hashes over `k` buckets (`k - 1` degrees
    /// of freedom: about `k` for a uniform hash, give or take `sqrt(2k)`).
    fn chi_square(k: u32, hashes: impl Iterator<Item = u32>, bucket: impl Fn(u32) -> u32) -> f64 {
        let mut counts = [0u32; 256];
        let mut n = 0u32;
        for h in hashes {
            counts[bucket(h) as usize] += 1;
            n += 1;
        }
        let expected = f64::from(n) / f64::from(k);
        counts[..k as usize]
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum()
    }

    fn v4(bytes: [u8; 4]) -> Addr {
        v4_mapped(u32::from_ne_bytes(bytes))
    }

    const VIP: [u8; 4] = [10, 0, 0, 1];

    /// Tuples as they come: one client's consecutive source ports, many
    /// clients' consecutive addresses, IPv6 clients differing in one word.
    /// The `i`th source address and port of each.
    type Family = (&'static str, fn(u32) -> (Addr, u16));

    const FAMILIES: [Family; 4] = [
        ("one client's source ports", |i| {
            (v4([192, 0, 2, 7]), 1024 + i as u16)
        }),
        ("consecutive IPv4 clients", |i| {
            (v4((0x0a00_0000u32 + i).to_be_bytes()), 40_000)
        }),
        ("IPv6 clients, last word", |i| {
            ([0x0000_80fd, 0, 0, i.to_be()], 40_000)
        }),
        ("IPv6 clients, /56 prefixes", |i| {
            ([0x0000_80fd, (i << 8).to_be(), 0, 0x0100_0000], 40_000)
        }),
    ];

    #[test]
    fn both_hashes_spread_real_looking_tuples_evenly() {
        for hash in [FlowHash::Murmur3, FlowHash::Fast] {
            for (what, tuple) in FAMILIES {
                let hashes = || {
                    (0..60_000).map(move |i| {
                        let (src, sport) = tuple(i);
                        hash.hash(&src, &v4(VIP), sport.to_be(), 443u16.to_be(), PROTO_TCP)
                    })
                };
                // Low bits (a prime modulus, as Maglev takes the slot) and
                // high bits (the UDP flow cache's bucket).
                let modulo = chi_square(251, hashes(), |h| h % 251);
                let top = chi_square(256, hashes(), |h| h >> 24);
                let slots = chi_square(3, hashes(), |h| maglev_slot(h, 65_537) % 3);
                // 250 and 255 degrees of freedom: a bound ~6 sigma out.
                assert!(
                    modulo < 400.0,
                    "{hash:?}, {what}: chi-square mod 251 = {modulo}"
                );
                assert!(top < 400.0, "{hash:?}, {what}: chi-square top byte = {top}");
                assert!(
                    slots < 30.0,
                    "{hash:?}, {what}: chi-square of 3 slot classes = {slots}"
                );
            }
        }
    }

    #[test]
    fn every_input_bit_moves_about_half_the_output() {
        for hash in [FlowHash::Murmur3, FlowHash::Fast] {
            let base_src = v4([192, 0, 2, 7]);
            let base = |src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8| {
                hash.hash(src, dst, sport, dport, proto)
            };
            // Every bit of the addresses, the ports and the protocol, from
            // 64 starting tuples each.
            let mut flips = 0u32;
            let mut tries = 0u32;
            let mut worst = 32u32;
            for seed in 0..64u16 {
                let sport = 1024u16.wrapping_add(seed.wrapping_mul(7919)).to_be();
                let vip = v4(VIP);
                let h0 = base(&base_src, &vip, sport, 443u16.to_be(), PROTO_TCP);
                let mut moved = |h: u32| {
                    let d = (h ^ h0).count_ones();
                    flips += d;
                    tries += 1;
                    worst = worst.min(d);
                };
                for word in 0..4 {
                    for bit in 0..32 {
                        let mut src = base_src;
                        src[word] ^= 1 << bit;
                        moved(base(&src, &vip, sport, 443u16.to_be(), PROTO_TCP));
                        let mut dst = vip;
                        dst[word] ^= 1 << bit;
                        moved(base(&base_src, &dst, sport, 443u16.to_be(), PROTO_TCP));
                    }
                }
                for bit in 0..16 {
                    moved(base(
                        &base_src,
                        &vip,
                        sport ^ (1 << bit),
                        443u16.to_be(),
                        PROTO_TCP,
                    ));
                    moved(base(
                        &base_src,
                        &vip,
                        sport,
                        443u16.to_be() ^ (1 << bit),
                        PROTO_TCP,
                    ));
                }
                moved(base(&base_src, &vip, sport, 443u16.to_be(), PROTO_UDP));
            }
            let mean = f64::from(flips) / f64::from(tries);
            assert!(
                (15.0..17.0).contains(&mean),
                "{hash:?}: {mean} output bits move a flip"
            );
            assert!(
                worst >= 3,
                "{hash:?}: a flip moved only {worst} output bits"
            );
        }
    }
}
