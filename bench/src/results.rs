//! The run's results as types: each figure's id (written to results.json as
//! its stable string, `per_packet/ipv4/tcp_syn/64B/...`) and unit, and each
//! section's rows, which the report, the markdown and the chart read.
use std::fmt;

use serde::{Serialize, Serializer};

use crate::{
    Mode, Section,
    peers::Setup,
    per_packet::{Fam, Kind},
    sys::Machine,
};

/// Writes a value through its `Display`: ids are strings in the JSON.
fn display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The traffic of a per-packet case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Traffic {
    Kind(Kind),
    UdpFirstFragment,
    UdpLaterFragment,
    /// UDP to a QUIC-LB service.
    Quic(QuicCase),
}

/// What a packet to a QUIC-LB service carries, and so which path it takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QuicCase {
    /// A long header: the 4-tuple pick, after the QUIC checks.
    LongHeader,
    /// A short header with a plaintext CID: routed by its server id.
    Plaintext,
    /// Encrypted CIDs: server id + nonce of 16 bytes (one AES decryption),
    /// of less with the nonce at least as long (three AES passes), and
    /// with the server id longer than the nonce (four passes).
    Encrypted1Pass,
    Encrypted3Pass,
    Encrypted4Pass,
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Traffic::Kind(k) => k.name(),
            Traffic::UdpFirstFragment => "udp_first_fragment",
            Traffic::UdpLaterFragment => "udp_later_fragment",
            Traffic::Quic(QuicCase::LongHeader) => "quic_long_header",
            Traffic::Quic(QuicCase::Plaintext) => "quic_short_plaintext",
            Traffic::Quic(QuicCase::Encrypted1Pass) => "quic_short_encrypted_1pass",
            Traffic::Quic(QuicCase::Encrypted3Pass) => "quic_short_encrypted_3pass",
            Traffic::Quic(QuicCase::Encrypted4Pass) => "quic_short_encrypted_4pass",
        })
    }
}

/// The Maglev slot a per-packet case's flow falls in, or the forwarding
/// mode that decides its cost.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Slot {
    /// A slot that never changed: no flow-table work.
    Clean,
    /// The same on a program loaded with the murmur3 flow hash (data
    /// planes and clusters that started before the fast hash).
    CleanMurmur3,
    /// A slot whose backend changed, the flow pinned in the flow table.
    StickyPinned,
    /// A slot whose backend changed, every run inserting a flow.
    StickyInsert,
    /// The same on a fresh pair of programs, one loaded with `pin_report`
    /// (each new pin also reported to the pin ring) and one without,
    /// measured interleaved.
    StickyInsertReportOff,
    StickyInsertReportOn,
    /// After 100 backend changes, before the sweep (pinned) and after it.
    AfterChangesPinned,
    AfterChangesSwept,
    /// Established packets of many flows spread over the table's slots, one
    /// run per distinct frame: a table that never changed, and one after
    /// 100 backend changes and the sweep.
    CleanSpread,
    AfterChangesSweptSpread,
    /// Backends on other hosts, the next hop from the daemon's cache.
    Dsr,
    Nat,
    /// The same with no cached next hop: the FIB's.
    DsrFib,
    NatFib,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::Clean => "clean_slot",
            Slot::CleanMurmur3 => "clean_slot_murmur3",
            Slot::StickyPinned => "sticky_slot_pinned",
            Slot::StickyInsert => "sticky_slot_insert",
            Slot::StickyInsertReportOff => "sticky_slot_insert_report_off",
            Slot::StickyInsertReportOn => "sticky_slot_insert_report_on",
            Slot::AfterChangesPinned => "after_100_changes_pinned",
            Slot::AfterChangesSwept => "after_100_changes_swept",
            Slot::CleanSpread => "clean_table_spread",
            Slot::AfterChangesSweptSpread => "after_100_changes_swept_spread",
            Slot::Dsr => "dsr",
            Slot::Nat => "nat",
            Slot::DsrFib => "dsr_fib",
            Slot::NatFib => "nat_fib",
        })
    }
}

/// How full the flow table was.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum FlowTable {
    #[serde(rename = "empty")]
    Empty,
    #[serde(rename = "nearly full")]
    NearlyFull,
}

impl FlowTable {
    pub fn label(self) -> &'static str {
        match self {
            FlowTable::Empty => "empty",
            FlowTable::NearlyFull => "nearly full",
        }
    }

    fn id(self) -> &'static str {
        match self {
            FlowTable::Empty => "empty_table",
            FlowTable::NearlyFull => "full_table",
        }
    }
}

/// How a per-packet figure was measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Method {
    /// One `BPF_PROG_TEST_RUN` call repeating the frame.
    #[serde(rename = "repeat")]
    Repeat,
    /// One call per distinct frame, the fixed call cost subtracted.
    #[serde(rename = "repeat=1")]
    Once,
}

/// One per-packet case of the balancer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Case {
    pub fam: Fam,
    pub traffic: Traffic,
    pub frame_bytes: usize,
    pub backends: usize,
    pub slot: Slot,
    pub table: FlowTable,
    /// The repeat=1 cross-check of a case the repeat method measures.
    pub cross_check: bool,
}

impl Case {
    /// A case with an empty flow table, measured as itself.
    pub fn new(
        fam: Fam,
        traffic: Traffic,
        frame_bytes: usize,
        backends: usize,
        slot: Slot,
    ) -> Self {
        Case {
            fam,
            traffic,
            frame_bytes,
            backends,
            slot,
            table: FlowTable::Empty,
            cross_check: false,
        }
    }

    pub fn table(self, table: FlowTable) -> Self {
        Case { table, ..self }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}B/{}_backends/{}/{}",
            self.fam.name(),
            self.traffic,
            self.frame_bytes,
            self.backends,
            self.slot,
            self.table.id()
        )?;
        if self.cross_check {
            f.write_str("/repeat1")?;
        }
        Ok(())
    }
}

/// What a per-packet row measured: the baseline program or a case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PerPacketId {
    Baseline { fam: Fam, frame_bytes: usize },
    Case(Case),
}

impl fmt::Display for PerPacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PerPacketId::Baseline { fam, frame_bytes } => {
                write!(f, "per_packet/baseline/{}/{frame_bytes}B", fam.name())
            }
            PerPacketId::Case(c) => write!(f, "per_packet/{c}"),
        }
    }
}

/// A packets-per-second case: the program attached and its traffic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PpsCase {
    BaselineUdp,
    LbUdp,
    LbTcpEstablished,
    LbNonService,
    /// `dsr` and `nat` to a backend behind the receiving veth: `XDP_TX`.
    LbDsrUdp,
    LbNatUdp,
    /// Two generator threads on two cores, over a two-queue veth.
    BaselineUdp2Cores,
    LbDsrUdp2Cores,
}

impl PpsCase {
    pub fn is_baseline(self) -> bool {
        matches!(self, PpsCase::BaselineUdp | PpsCase::BaselineUdp2Cores)
    }
}

impl fmt::Display for PpsCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PpsCase::BaselineUdp => "pps/baseline/udp_64B",
            PpsCase::LbUdp => "pps/lb/udp_64B",
            PpsCase::LbTcpEstablished => "pps/lb/tcp_established_64B",
            PpsCase::LbNonService => "pps/lb/non_service_64B",
            PpsCase::LbDsrUdp => "pps/lb/dsr_udp_64B",
            PpsCase::LbNatUdp => "pps/lb/nat_udp_64B",
            PpsCase::BaselineUdp2Cores => "pps/baseline/udp_64B_2_cores",
            PpsCase::LbDsrUdp2Cores => "pps/lb/dsr_udp_64B_2_cores",
        })
    }
}

/// A figure of one end-to-end setup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum E2eMetric {
    HttpsConnPerS,
    HttpConnPerS,
    LatencyP50Us,
    LatencyP99Us,
    LatencyP999Us,
    BulkGbitPerS,
    CpuUsPerHttpsConn,
    CpuUsPerHttpConn,
    CpuMsPerBulkGb,
    HttpsConnPerSXDirect,
    BulkXDirect,
    /// One connection sending to the backend (the download is `Bulk*`).
    UploadGbitPerS,
    CpuMsPerUploadGb,
    UploadXDirect,
}

/// lb's figure divided by another setup's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LbVs {
    HttpsConnPerS,
    P99Latency,
    Bulk,
    Upload,
}

/// Weights of the Maglev build under skew.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    #[serde(rename = "one_65535_rest_1")]
    One65535Rest1,
    #[serde(rename = "spread_1_to_65535")]
    Spread1To65535,
    #[serde(rename = "half_65535_half_1")]
    Half65535Half1,
    #[serde(rename = "all_100")]
    All100,
}

impl Weights {
    pub const ALL: [Weights; 4] = [
        Weights::One65535Rest1,
        Weights::Spread1To65535,
        Weights::Half65535Half1,
        Weights::All100,
    ];

    /// Backend `i`'s weight.
    pub fn of(self, i: usize) -> u16 {
        match self {
            Weights::One65535Rest1 => {
                if i == 0 {
                    65535
                } else {
                    1
                }
            }
            Weights::Spread1To65535 => (i * 13 % 65535 + 1) as u16,
            Weights::Half65535Half1 => {
                if i.is_multiple_of(2) {
                    65535
                } else {
                    1
                }
            }
            Weights::All100 => 100,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Weights::One65535Rest1 => "one_65535_rest_1",
            Weights::Spread1To65535 => "spread_1_to_65535",
            Weights::Half65535Half1 => "half_65535_half_1",
            Weights::All100 => "all_100",
        }
    }
}

/// A backend change of the flow-move measurement.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Remove,
    Add,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Remove => "remove",
            Change::Add => "add",
        }
    }
}

/// The daemon's figures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DaemonMetric {
    DeathToTableMedianMs,
    DeathToTableMaxMs,
    Deaths50TableInstalls,
    Deaths50AllOutMs,
    Deaths50VerdictToInstallMs,
    RssIdleMib,
    RssAfterApiChangesMib,
    RssPeakMib,
    ApiChangesPerS,
}

/// Every figure of a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FigureId {
    /// The baseline program's ns per packet.
    PerPacketBaseline {
        fam: Fam,
        frame_bytes: usize,
    },
    PerPacketNs(Case),
    PerPacketXBaseline(Case),
    /// The fixed cost of one repeat=1 call.
    Repeat1Overhead,
    /// The test-run harness alone: a program that returns at once, per run.
    Harness,
    Pps(PpsCase),
    PpsNs(PpsCase),
    E2e(Setup, E2eMetric),
    LbVs(Setup, LbVs),
    /// A Maglev build with the default table size, or with `m`.
    MaglevBuild {
        backends: usize,
        m: Option<u32>,
    },
    MaglevSkew(Weights),
    FlowsMoved {
        backends: usize,
        change: Change,
        flow_table: bool,
    },
    Daemon(DaemonMetric),
    /// Reading the flow table's size with `entries` in it: the counters
    /// `/metrics` reads, or a walk of the table (what it did before).
    FlowTableSize {
        entries: usize,
        walk: bool,
    },
    Cluster(ClusterMetric),
}

/// "1_node", "3_nodes": how many nodes announced, in a cluster figure's id.
struct NodesId(usize);

impl fmt::Display for NodesId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("1_node"),
            n => write!(f, "{n}_nodes"),
        }
    }
}

/// A figure of the cluster section (several nodes behind an ECMP router).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClusterMetric {
    /// A node killed whole to the router's withdrawal of its next hop.
    FailoverMedianMs,
    FailoverMinMs,
    FailoverMaxMs,
    /// A change through one node's API to equal new tables on every node.
    ChangeToAllNodesMedianMs,
    ChangeToAllNodesMaxMs,
    /// With `nodes` announcing, under the same offered load: the data
    /// plane's ns per packet over all nodes, the busiest node's share of
    /// the data plane's run time, and that node's run time per second.
    NsPerPacket {
        nodes: usize,
    },
    BusiestNodeShare {
        nodes: usize,
    },
    BusiestNodeMsPerS {
        nodes: usize,
    },
}

impl FigureId {
    pub fn unit(self) -> &'static str {
        use DaemonMetric as D;
        use E2eMetric as E;
        match self {
            FigureId::PerPacketBaseline { .. }
            | FigureId::PerPacketNs(_)
            | FigureId::Repeat1Overhead
            | FigureId::Harness
            | FigureId::PpsNs(_) => "ns",
            FigureId::PerPacketXBaseline(_) | FigureId::LbVs(..) => "ratio",
            FigureId::Pps(_) => "packets/s",
            FigureId::E2e(_, m) => match m {
                E::HttpsConnPerS | E::HttpConnPerS => "conn/s",
                E::LatencyP50Us
                | E::LatencyP99Us
                | E::LatencyP999Us
                | E::CpuUsPerHttpsConn
                | E::CpuUsPerHttpConn => "us",
                E::BulkGbitPerS | E::UploadGbitPerS => "Gbit/s",
                E::CpuMsPerBulkGb | E::CpuMsPerUploadGb => "ms",
                E::HttpsConnPerSXDirect | E::BulkXDirect | E::UploadXDirect => "ratio",
            },
            FigureId::MaglevBuild { .. }
            | FigureId::MaglevSkew(_)
            | FigureId::FlowTableSize { .. } => "ms",
            FigureId::FlowsMoved { .. } => "share",
            FigureId::Daemon(m) => match m {
                D::DeathToTableMedianMs
                | D::DeathToTableMaxMs
                | D::Deaths50AllOutMs
                | D::Deaths50VerdictToInstallMs => "ms",
                D::Deaths50TableInstalls => "installs",
                D::RssIdleMib | D::RssAfterApiChangesMib | D::RssPeakMib => "MiB",
                D::ApiChangesPerS => "changes/s",
            },
            FigureId::Cluster(m) => match m {
                ClusterMetric::FailoverMedianMs
                | ClusterMetric::FailoverMinMs
                | ClusterMetric::FailoverMaxMs
                | ClusterMetric::ChangeToAllNodesMedianMs
                | ClusterMetric::ChangeToAllNodesMaxMs => "ms",
                ClusterMetric::NsPerPacket { .. } => "ns",
                ClusterMetric::BusiestNodeShare { .. } => "share",
                ClusterMetric::BusiestNodeMsPerS { .. } => "ms/s",
            },
        }
    }
}

impl fmt::Display for FigureId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DaemonMetric as D;
        use E2eMetric as E;
        match *self {
            FigureId::PerPacketBaseline { fam, frame_bytes } => {
                write!(f, "{}/ns", PerPacketId::Baseline { fam, frame_bytes })
            }
            FigureId::PerPacketNs(c) => write!(f, "{}/ns", PerPacketId::Case(c)),
            FigureId::PerPacketXBaseline(c) => write!(f, "{}/x_baseline", PerPacketId::Case(c)),
            FigureId::Repeat1Overhead => f.write_str("per_packet/repeat1_overhead/ns"),
            FigureId::Harness => f.write_str("per_packet/harness/ns"),
            FigureId::Pps(c) => write!(f, "{c}/pps"),
            FigureId::PpsNs(c) => write!(f, "{c}/ns"),
            FigureId::E2e(setup, m) => {
                let m = match m {
                    E::HttpsConnPerS => "https_conn_per_s",
                    E::HttpConnPerS => "http_conn_per_s",
                    E::LatencyP50Us => "latency_p50_us",
                    E::LatencyP99Us => "latency_p99_us",
                    E::LatencyP999Us => "latency_p999_us",
                    E::BulkGbitPerS => "bulk_gbit_per_s",
                    E::CpuUsPerHttpsConn => "cpu_us_per_https_conn",
                    E::CpuUsPerHttpConn => "cpu_us_per_http_conn",
                    E::CpuMsPerBulkGb => "cpu_ms_per_bulk_gb",
                    E::HttpsConnPerSXDirect => "https_conn_per_s_x_direct",
                    E::BulkXDirect => "bulk_x_direct",
                    E::UploadGbitPerS => "upload_gbit_per_s",
                    E::CpuMsPerUploadGb => "cpu_ms_per_upload_gb",
                    E::UploadXDirect => "upload_x_direct",
                };
                write!(f, "{}/{m}", E2eId(setup))
            }
            FigureId::LbVs(setup, m) => {
                let m = match m {
                    LbVs::HttpsConnPerS => "https_conn_per_s",
                    LbVs::P99Latency => "p99_latency",
                    LbVs::Bulk => "bulk",
                    LbVs::Upload => "upload",
                };
                write!(f, "e2e/lb_vs_{}/{m}", setup.id())
            }
            FigureId::MaglevBuild { backends, m: None } => {
                write!(f, "control/maglev_build/{backends}_backends/ms")
            }
            FigureId::MaglevBuild {
                backends,
                m: Some(m),
            } => write!(f, "control/maglev_build/{backends}_backends_m{m}/ms"),
            FigureId::MaglevSkew(w) => write!(f, "control/maglev_skew/{}/ms", w.name()),
            FigureId::FlowTableSize { entries, walk } => write!(
                f,
                "per_packet/flow_table_size/{entries}_entries/{}/ms",
                if walk { "walk" } else { "counters" }
            ),
            FigureId::FlowsMoved {
                backends,
                change,
                flow_table,
            } => write!(
                f,
                "control/flows_moved/{backends}_backends/{}/{}",
                change.name(),
                if flow_table {
                    "with_flow_table"
                } else {
                    "without_flow_table"
                }
            ),
            FigureId::Daemon(m) => f.write_str(match m {
                D::DeathToTableMedianMs => "control/death_to_table/median_ms",
                D::DeathToTableMaxMs => "control/death_to_table/max_ms",
                D::Deaths50TableInstalls => "control/deaths50/table_installs",
                D::Deaths50AllOutMs => "control/deaths50/all_out_ms",
                D::Deaths50VerdictToInstallMs => "control/deaths50/verdict_to_install_ms",
                D::RssIdleMib => "control/daemon_rss/idle_mib",
                D::RssAfterApiChangesMib => "control/daemon_rss/after_api_changes_mib",
                D::RssPeakMib => "control/daemon_rss/peak_mib",
                D::ApiChangesPerS => "control/api_changes_per_s",
            }),
            FigureId::Cluster(m) => match m {
                ClusterMetric::FailoverMedianMs => f.write_str("cluster/failover/median_ms"),
                ClusterMetric::FailoverMinMs => f.write_str("cluster/failover/min_ms"),
                ClusterMetric::FailoverMaxMs => f.write_str("cluster/failover/max_ms"),
                ClusterMetric::ChangeToAllNodesMedianMs => {
                    f.write_str("cluster/change_to_all_nodes/median_ms")
                }
                ClusterMetric::ChangeToAllNodesMaxMs => {
                    f.write_str("cluster/change_to_all_nodes/max_ms")
                }
                ClusterMetric::NsPerPacket { nodes } => {
                    write!(f, "cluster/cpu/{}/ns_per_packet", NodesId(nodes))
                }
                ClusterMetric::BusiestNodeShare { nodes } => {
                    write!(f, "cluster/cpu/{}/busiest_node_share", NodesId(nodes))
                }
                ClusterMetric::BusiestNodeMsPerS { nodes } => {
                    write!(f, "cluster/cpu/{}/busiest_node_ms_per_s", NodesId(nodes))
                }
            },
        }
    }
}

/// One number of the run; the unit follows from the id.
#[derive(Serialize)]
pub struct Figure {
    #[serde(serialize_with = "display")]
    pub id: FigureId,
    pub value: f64,
    pub unit: &'static str,
}

/// A per-packet row: the baseline's, or a case's with how it compares.
#[derive(Serialize)]
pub struct PerPacketRow {
    #[serde(serialize_with = "display")]
    pub id: PerPacketId,
    pub label: String,
    pub frame_bytes: usize,
    pub ns: f64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub case: Option<CaseDetail>,
}

#[derive(Serialize)]
pub struct CaseDetail {
    pub backends: usize,
    pub flow_table: FlowTable,
    pub baseline_ns: f64,
    pub x_baseline: f64,
    pub method: Method,
    pub runs: u64,
}

#[derive(Serialize)]
pub struct PpsRow {
    #[serde(serialize_with = "display")]
    pub id: PpsCase,
    pub label: &'static str,
    pub pps: f64,
    pub ns_per_packet: f64,
    pub x_baseline_pps: f64,
    pub delivered: u64,
    pub sent: u64,
}

/// `e2e/<setup>`, the id of a setup's row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct E2eId(pub Setup);

impl fmt::Display for E2eId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e2e/{}", self.0.id())
    }
}

fn setup_id<S: Serializer>(v: &Setup, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.id())
}

#[derive(Serialize)]
pub struct E2eRow {
    #[serde(serialize_with = "display")]
    pub id: E2eId,
    #[serde(serialize_with = "setup_id")]
    pub setup: Setup,
    pub label: &'static str,
    pub https: LoadPhase,
    pub http: LoadPhase,
    pub latency: Latency,
    /// The download.
    pub bulk: Bulk,
    pub upload: Bulk,
    pub cpu_us_per_https_conn: HttpsCpu,
    pub cpu_us_per_http_conn: SideCpu,
    pub cpu_ms_per_bulk_gb: SideCpu,
    pub cpu_ms_per_upload_gb: SideCpu,
}

/// CPU seconds of a phase, by whom.
#[derive(Serialize, Clone, Copy, Default)]
pub struct CpuSeconds {
    pub client: f64,
    pub backends: f64,
    pub balancer: f64,
    pub lb_programs: f64,
}

#[derive(Serialize)]
pub struct LoadPhase {
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    pub conn_per_s: f64,
    pub cpu_s: CpuSeconds,
}

#[derive(Serialize)]
pub struct Latency {
    pub offered_per_s: u32,
    pub ok: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

#[derive(Serialize)]
pub struct Bulk {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_s: f64,
    pub cpu_s: CpuSeconds,
}

#[derive(Serialize)]
pub struct HttpsCpu {
    pub all: f64,
    pub balancer_side: f64,
    pub balancer_processes: f64,
    pub lb_programs: f64,
}

#[derive(Serialize)]
pub struct SideCpu {
    pub all: f64,
    pub balancer_side: f64,
}

#[derive(Serialize)]
pub struct MaglevBuildRow {
    pub backends: usize,
    pub m: u32,
    pub ms: f64,
    pub big_m: u32,
    pub big_m_ms: f64,
    pub min_slots: usize,
    pub max_slots: usize,
}

#[derive(Serialize)]
pub struct MaglevSkewRow {
    pub weights: Weights,
    pub backends: usize,
    pub m: u32,
    pub ms: f64,
    pub steps: u64,
}

#[derive(Serialize)]
pub struct FlowsMovedRow {
    pub backends: usize,
    pub change: Change,
    pub ideal: f64,
    pub without_flow_table: f64,
    pub with_flow_table: f64,
}

#[derive(Serialize)]
pub struct DaemonRow {
    pub death_to_table_ms: Vec<f64>,
    pub death_median_ms: f64,
    pub rss_idle_kib: u64,
    pub rss_after_kib: u64,
    pub rss_peak_kib: u64,
    pub api_changes: u64,
    pub api_seconds: f64,
}

/// Detailed rows per section; a section that did not run is left out.
#[derive(Serialize, Default)]
pub struct Sections {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_packet: Vec<PerPacketRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pps: Vec<PpsRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub e2e: Vec<E2eRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub maglev_build: Vec<MaglevBuildRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub maglev_skew: Vec<MaglevSkewRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flows_moved: Vec<FlowsMovedRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub daemon: Vec<DaemonRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRow>,
}

/// The cluster section: every sample, and each node's data-plane CPU.
#[derive(Serialize)]
pub struct ClusterRow {
    pub nodes: usize,
    pub failover_ms: Vec<f64>,
    pub change_to_all_nodes_ms: Vec<f64>,
    /// The offered load of the CPU phases.
    pub load_conn_per_s: u32,
    pub load_seconds: f64,
    pub cpu: Vec<NodeCpuRow>,
}

/// One node's XDP (and TC, where attached) programs during a load phase,
/// from the kernel's BPF run-time statistics.
#[derive(Serialize)]
pub struct NodeCpuRow {
    pub nodes_announcing: usize,
    pub node: usize,
    /// Everything the programs saw in the phase, and their run time.
    pub packets: u64,
    pub run_time_ms: f64,
    pub ns_per_packet: f64,
    /// Packets the node's programs saw a second without the load (BGP,
    /// BFD, etcd, health checks), measured before the load phases.
    pub idle_packets_per_s: f64,
    /// The phase's packets and run time less the idle rate's (at least 0):
    /// the load's part.
    pub load_packets: u64,
    pub load_run_time_ms: f64,
    /// This node's share of all nodes' load run time in the phase.
    pub share: f64,
}

/// The run itself: what ran, where, for how long.
#[derive(Serialize)]
pub struct Meta {
    pub mode: Mode,
    pub command: String,
    pub sections: Vec<Section>,
    pub machine: Machine,
    pub load_average_before: f64,
    pub load_average_after: f64,
    pub unix_time: u64,
    pub duration_s: f64,
}

/// results.json.
#[derive(Serialize)]
pub struct Results<'a> {
    pub schema: u32,
    pub meta: &'a Meta,
    pub skipped: &'a [String],
    pub sections: &'a Sections,
    pub figures: &'a [Figure],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids are results.json's contract with earlier runs: they stay
    /// the strings they were.
    #[test]
    fn figure_ids_are_the_stable_strings() {
        let est = Traffic::Kind(Kind::Est);
        let syn = Traffic::Kind(Kind::Syn);
        let cases = [
            (
                FigureId::PerPacketBaseline {
                    fam: Fam::V6,
                    frame_bytes: 1514,
                },
                "per_packet/baseline/ipv6/1514B/ns",
            ),
            (
                FigureId::PerPacketXBaseline(Case::new(Fam::V4, est, 64, 3, Slot::Clean)),
                "per_packet/ipv4/tcp_established/64B/3_backends/clean_slot/empty_table/x_baseline",
            ),
            (
                FigureId::PerPacketNs(
                    Case::new(Fam::V4, syn, 64, 4, Slot::StickyInsert).table(FlowTable::NearlyFull),
                ),
                "per_packet/ipv4/tcp_syn/64B/4_backends/sticky_slot_insert/full_table/ns",
            ),
            (
                FigureId::PerPacketNs(Case {
                    cross_check: true,
                    ..Case::new(Fam::V4, syn, 64, 4, Slot::Clean).table(FlowTable::NearlyFull)
                }),
                "per_packet/ipv4/tcp_syn/64B/4_backends/clean_slot/full_table/repeat1/ns",
            ),
            (
                FigureId::PerPacketNs(Case::new(
                    Fam::V4,
                    Traffic::UdpLaterFragment,
                    60,
                    3,
                    Slot::Nat,
                )),
                "per_packet/ipv4/udp_later_fragment/60B/3_backends/nat/empty_table/ns",
            ),
            (
                FigureId::PerPacketNs(Case::new(Fam::V4, est, 64, 10, Slot::AfterChangesPinned)),
                "per_packet/ipv4/tcp_established/64B/10_backends/after_100_changes_pinned/empty_table/ns",
            ),
            (
                FigureId::PerPacketNs(Case::new(
                    Fam::V4,
                    Traffic::Quic(QuicCase::Encrypted4Pass),
                    64,
                    3,
                    Slot::Clean,
                )),
                "per_packet/ipv4/quic_short_encrypted_4pass/64B/3_backends/clean_slot/empty_table/ns",
            ),
            (FigureId::Repeat1Overhead, "per_packet/repeat1_overhead/ns"),
            (FigureId::Harness, "per_packet/harness/ns"),
            (
                FigureId::Pps(PpsCase::BaselineUdp),
                "pps/baseline/udp_64B/pps",
            ),
            (
                FigureId::PpsNs(PpsCase::LbNonService),
                "pps/lb/non_service_64B/ns",
            ),
            (
                FigureId::E2e(Setup::Lb, E2eMetric::LatencyP999Us),
                "e2e/lb/latency_p999_us",
            ),
            (
                FigureId::E2e(Setup::Nft, E2eMetric::HttpsConnPerSXDirect),
                "e2e/nftables/https_conn_per_s_x_direct",
            ),
            (
                FigureId::LbVs(Setup::Direct, LbVs::HttpsConnPerS),
                "e2e/lb_vs_direct/https_conn_per_s",
            ),
            (
                FigureId::E2e(Setup::LbTc, E2eMetric::UploadXDirect),
                "e2e/lb-tc/upload_x_direct",
            ),
            (
                FigureId::LbVs(Setup::Direct, LbVs::Upload),
                "e2e/lb_vs_direct/upload",
            ),
            (
                FigureId::MaglevBuild {
                    backends: 5000,
                    m: None,
                },
                "control/maglev_build/5000_backends/ms",
            ),
            (
                FigureId::MaglevBuild {
                    backends: 5000,
                    m: Some(500_009),
                },
                "control/maglev_build/5000_backends_m500009/ms",
            ),
            (
                FigureId::MaglevSkew(Weights::All100),
                "control/maglev_skew/all_100/ms",
            ),
            (
                FigureId::FlowsMoved {
                    backends: 100,
                    change: Change::Remove,
                    flow_table: true,
                },
                "control/flows_moved/100_backends/remove/with_flow_table",
            ),
            (
                FigureId::Daemon(DaemonMetric::RssAfterApiChangesMib),
                "control/daemon_rss/after_api_changes_mib",
            ),
            (
                FigureId::Cluster(ClusterMetric::FailoverMedianMs),
                "cluster/failover/median_ms",
            ),
            (
                FigureId::Cluster(ClusterMetric::ChangeToAllNodesMedianMs),
                "cluster/change_to_all_nodes/median_ms",
            ),
            (
                FigureId::Cluster(ClusterMetric::BusiestNodeShare { nodes: 3 }),
                "cluster/cpu/3_nodes/busiest_node_share",
            ),
            (
                FigureId::Cluster(ClusterMetric::NsPerPacket { nodes: 1 }),
                "cluster/cpu/1_node/ns_per_packet",
            ),
        ];
        for (id, want) in cases {
            assert_eq!(id.to_string(), want);
        }
    }

    #[test]
    fn a_figure_is_written_with_its_unit_and_a_string_id() {
        let f = Figure {
            id: FigureId::Pps(PpsCase::LbUdp),
            value: 1.5e6,
            unit: FigureId::Pps(PpsCase::LbUdp).unit(),
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!({"id": "pps/lb/udp_64B/pps", "value": 1.5e6, "unit": "packets/s"})
        );
    }
}
