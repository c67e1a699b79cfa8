//! Prometheus metrics, prefix `lb_`. Traffic counters come from the kernel's
//! per-CPU maps at scrape time; health results and table rebuilds are
//! counted as they happen.
use std::{collections::HashSet, sync::Mutex};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder, core::Collector,
};

/// Kernel counters read under the map writer's lock.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (service, backend, counters)
    pub backends: Vec<(String, String, lb_common::Counters)>,
    /// (service, weight, up) per backend, for the gauges.
    pub backend_state: Vec<(String, String, u16, bool)>,
    pub actions: [u64; lb_common::ACTION_COUNT as usize],
    pub events: [u64; lb_common::EVENT_COUNT as usize],
    /// `nat`/`dsr` packets by where their next hop came from.
    pub next_hops: [u64; lb_common::NEXTHOP_VIA_COUNT as usize],
    /// Packets passed to the stack unbalanced, by reason.
    pub passed: [u64; lb_common::REASON_COUNT as usize],
    /// Packets dropped, by reason.
    pub dropped: [u64; lb_common::REASON_COUNT as usize],
    /// Entries in each flow table, indexed by `Family as usize`.
    pub flow_entries: [u64; 2],
    /// (service, failing open) per service.
    pub fail_open: Vec<(String, bool)>,
    /// (service, announced over BGP) per service; empty without `[bgp]`.
    pub announced: Vec<(String, bool)>,
    /// (service, fingerprint of its installed Maglev table, hex).
    pub table_fingerprints: Vec<(String, String)>,
    /// `[cluster]`: (service, its table is the cluster's) for the services
    /// whose fingerprint a majority of live nodes hold.
    pub table_matches_cluster: Vec<(String, bool)>,
    /// Whether the interface the data plane is attached to still exists.
    pub dataplane_attached: Option<bool>,
    /// Entries each family's flow table holds at most (`flow_table_size`).
    pub flow_capacity: u64,
    /// Pieces of work waiting for the reconcile loop.
    pub reconcile_pending: u64,
    /// Seconds the reconcile loop has had work waiting without finishing
    /// any of it (0 when idle).
    pub reconcile_stalled_seconds: f64,
    /// QUIC-LB services' UDP packets by `lb_common::quic::QuicRoute`.
    pub quic: Vec<(String, [u64; lb_common::quic::QUIC_ROUTE_COUNT as usize])>,
    /// `[cluster] pin_sync`'s counters.
    pub pin_sync: Option<crate::pinsync::PinSyncView>,
}

pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    new_flows: IntCounterVec,
    actions: IntCounterVec,
    flow_events: IntCounterVec,
    next_hops: IntCounterVec,
    sweep_slots: IntCounter,
    sweep_stale: IntCounter,
    passed: IntCounterVec,
    dropped: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_weight: IntGaugeVec,
    health_checks: IntCounterVec,
    flow_entries: IntGaugeVec,
    rebuild: Histogram,
    fail_open: IntGaugeVec,
    announced: IntGaugeVec,
    table_info: IntGaugeVec,
    table_matches_cluster: IntGaugeVec,
    attached: IntGauge,
    reconcile_errors: IntCounter,
    table_installs: IntCounterVec,
    verdict_to_install: Histogram,
    health_batches: IntCounter,
    api_changes: IntCounterVec,
    api_refused: IntCounterVec,
    flow_capacity: IntGaugeVec,
    reconcile_pending: IntGauge,
    reconcile_stalled: Gauge,
    quic_packets: IntCounterVec,
    pin_sync_pins: IntCounterVec,
    pin_sync_dropped: IntCounterVec,
    pin_sync_join: IntGaugeVec,
    /// Label sets currently exported per backend, to drop removed ones.
    exported: Mutex<HashSet<(String, String)>>,
}

/// Registers a metric built from static names and help texts: an error
/// here is a typo in this file, found by every test that builds `Metrics`.
fn register<M: Collector + Clone + 'static>(r: &Registry, metric: prometheus::Result<M>) -> M {
    #[expect(clippy::expect_used, reason = "static metric definitions")]
    let metric = metric.expect("metric definition");
    #[expect(clippy::expect_used, reason = "static metric names")]
    r.register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())),
    )
}

/// Sets a counter to an absolute value read from the kernel.
fn set(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v >= cur {
        c.inc_by(v - cur);
    } else {
        // The kernel counters restarted (a new data plane): start over.
        c.reset();
        c.inc_by(v);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let sb = &["service", "backend"];
        let rebuild = histogram(
            &r,
            "lb_maglev_rebuild_seconds",
            "Time to build and install a service's Maglev tables",
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        );
        let attached = gauge(
            &r,
            "lb_dataplane_attached",
            "1 while the interface the data plane is attached to exists",
        );
        let flow_entries = gauge_vec(
            &r,
            "lb_flow_table_entries",
            "Entries in the LRU flow table of each address family",
            &["family"],
        );
        let verdict_to_install = histogram(
            &r,
            "lb_health_verdict_to_install_seconds",
            "Time from a health verdict to the install of the tables it changed",
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        );
        Self {
            packets: counter_vec(&r, "lb_packets_total", "Packets forwarded to a backend", sb),
            bytes: counter_vec(&r, "lb_bytes_total", "Bytes forwarded to a backend", sb),
            new_flows: counter_vec(
                &r,
                "lb_new_flows_total",
                "New flows (TCP SYNs, UDP flows given a flow entry) sent to a backend",
                sb,
            ),
            actions: counter_vec(
                &r,
                "lb_xdp_actions_total",
                "Packets by XDP action",
                &["action"],
            ),
            passed: counter_vec(
                &r,
                lb_common::metrics::PASSED,
                "Packets not balanced and passed to the local stack, by reason",
                &["reason"],
            ),
            dropped: counter_vec(
                &r,
                lb_common::metrics::DROPPED,
                "Packets dropped, by reason",
                &["reason"],
            ),
            flow_events: counter_vec(
                &r,
                "lb_flow_events_total",
                "Flow-table events in changed Maglev slots: pins inserted or refused by the \
                 per-CPU insert cap, misses sent to the previous or current backend, stale pins",
                &["event"],
            ),
            next_hops: counter_vec(
                &r,
                lb_common::metrics::NEXT_HOPS,
                "nat and dsr packets by where their next hop came from: the daemon's cache \
                 (cache) or a FIB lookup (fib: no fresh entry)",
                &["via"],
            ),
            sweep_slots: counter(
                &r,
                "lb_sweep_slots_cleaned_total",
                "Changed Maglev slots made clean again by the sweep (no live pin needed them)",
            ),
            sweep_stale: counter(
                &r,
                "lb_sweep_stale_pins_total",
                "Pins removed by the sweep because their backend no longer holds them",
            ),
            backend_up: gauge_vec(&r, "lb_backend_up", "1 if the backend takes traffic", sb),
            backend_weight: gauge_vec(&r, "lb_backend_weight", "Configured backend weight", sb),
            health_checks: counter_vec(
                &r,
                "lb_health_checks_total",
                "Health check results",
                &["service", "backend", "result"],
            ),
            fail_open: gauge_vec(
                &r,
                "lb_service_fail_open",
                "1 while every backend of the service failed its checks and the last ones still take flows",
                &["service"],
            ),
            announced: gauge_vec(
                &r,
                "lb_service_announced",
                "1 while this node announces the service's address over BGP ([bgp] only)",
                &["service"],
            ),
            pin_sync_pins: counter_vec(
                &r,
                "lb_pin_sync_pins_total",
                "Flow pins shared with the cluster's other nodes ([cluster] pin_sync): sent \
                 (once each, whatever the number of peers), received (in authenticated, fresh \
                 datagrams), inserted into this node's flow table; datagrams_sent per peer; \
                 join_fetched (taken from a peer when this node joined), join_sent (sent \
                 answering other nodes' joins)",
                &["what"],
            ),
            pin_sync_dropped: counter_vec(
                &r,
                "lb_pin_sync_dropped_total",
                "Flow pins (datagrams for bad_mac, malformed, replay) not shared or not \
                 inserted, by reason",
                &["reason"],
            ),
            pin_sync_join: gauge_vec(
                &r,
                "lb_pin_sync_join",
                "1 for this node's pin-sync join state ([cluster] pin_sync): pending (not \
                 announcing for it yet), synced (a peer's pins of changed slots taken), no_peer \
                 (the cluster's first node), timed_out (announced without a peer's pins)",
                &["state"],
            ),
            table_info: gauge_vec(
                &r,
                "lb_service_table_info",
                "1, labelled with the fingerprint of the installed Maglev table (slot -> backend \
                 address): equal on nodes with the same table",
                &["service", "fingerprint"],
            ),
            table_matches_cluster: gauge_vec(
                &r,
                "lb_service_table_matches_cluster",
                "[cluster]: 1 while the service's table fingerprint is the one a strict majority \
                 of live nodes hold, 0 while it differs (absent: no majority)",
                &["service"],
            ),
            flow_entries,
            attached,
            rebuild,
            reconcile_errors: counter(
                &r,
                "lb_reconcile_errors_total",
                "Failed attempts of the reconcile loop to install or persist a change",
            ),
            table_installs: counter_vec(
                &r,
                "lb_table_installs_total",
                "Maglev tables installed in the kernel",
                &["service"],
            ),
            verdict_to_install,
            health_batches: counter(
                &r,
                "lb_health_batches_total",
                "Batches of health verdicts applied (each one install per changed service)",
            ),
            api_changes: counter_vec(
                &r,
                "lb_api_changes_total",
                "Change requests to the admin API, by result (ok, invalid, not_found, conflict, \
                 unauthorized, forbidden, rate_limited, failed)",
                &["result"],
            ),
            api_refused: counter_vec(
                &r,
                "lb_api_refused_total",
                "Admin API requests refused before reaching the API, by reason (no_token, \
                 bad_token, read_scope, tcp_read_only, rate_limited, host, peer)",
                &["reason"],
            ),
            flow_capacity: gauge_vec(
                &r,
                "lb_flow_table_capacity",
                "Entries the LRU flow table of each address family holds at most \
                 (flow_table_size)",
                &["family"],
            ),
            reconcile_pending: gauge(
                &r,
                "lb_reconcile_pending",
                "Pieces of work (changes, health batches, reloads) waiting for the reconcile loop",
            ),
            reconcile_stalled: register(
                &r,
                Gauge::new(
                    "lb_reconcile_stalled_seconds",
                    "Seconds the reconcile loop has had work waiting without finishing any of it \
                     (0 when idle)",
                ),
            ),
            quic_packets: counter_vec(
                &r,
                lb_common::metrics::QUIC_PACKETS,
                "UDP packets of QUIC-LB services by route: cid (the server id in the CID chose \
                 the backend) or why the 4-tuple did (long_header, too_short, \
                 unroutable_config, unknown_server_id, not_decrypted)",
                &["service", "route"],
            ),
            registry: r,
            exported: Mutex::new(HashSet::new()),
        }
    }

    pub fn health_result(&self, service: &str, backend: &str, result: &str) {
        self.health_checks
            .with_label_values(&[service, backend, result])
            .inc();
    }

    pub fn sweep(&self, slots_cleaned: usize, stale_pins: usize) {
        self.sweep_slots.inc_by(slots_cleaned as u64);
        self.sweep_stale.inc_by(stale_pins as u64);
    }

    pub fn observe_rebuild(&self, seconds: f64) {
        self.rebuild.observe(seconds);
    }

    pub fn reconcile_error(&self) {
        self.reconcile_errors.inc();
    }

    pub fn table_installed(&self, service: &str) {
        self.table_installs.with_label_values(&[service]).inc();
    }

    /// One change request answered with `result`.
    pub fn api_change(&self, result: &str) {
        self.api_changes.with_label_values(&[result]).inc();
    }

    /// One request refused by the access checks for `reason`.
    pub fn api_refused(&self, reason: &str) {
        self.api_refused.with_label_values(&[reason]).inc();
    }

    pub fn health_batch(&self) {
        self.health_batches.inc();
    }

    pub fn verdict_installed(&self, seconds: f64) {
        self.verdict_to_install.observe(seconds);
    }

    /// Updates everything from `snap` and renders the text exposition.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut exported = crate::lock(&self.exported);
        let now: HashSet<(String, String)> = snap
            .backend_state
            .iter()
            .map(|(s, b, _, _)| (s.clone(), b.clone()))
            .collect();
        for (s, b) in exported.difference(&now) {
            let l = [s.as_str(), b.as_str()];
            for v in [&self.packets, &self.bytes, &self.new_flows] {
                let _ = v.remove_label_values(&l);
            }
            let _ = self.backend_up.remove_label_values(&l);
            let _ = self.backend_weight.remove_label_values(&l);
        }
        *exported = now;
        for (s, b, c) in &snap.backends {
            let l = [s.as_str(), b.as_str()];
            set(&self.packets.with_label_values(&l), c.packets);
            set(&self.bytes.with_label_values(&l), c.bytes);
            set(&self.new_flows.with_label_values(&l), c.new_flows);
        }
        for (s, b, weight, up) in &snap.backend_state {
            let l = [s.as_str(), b.as_str()];
            self.backend_up.with_label_values(&l).set(i64::from(*up));
            self.backend_weight
                .with_label_values(&l)
                .set(i64::from(*weight));
        }
        for (i, name) in lb_common::XDP_ACTIONS.iter().enumerate() {
            set(&self.actions.with_label_values(&[*name]), snap.actions[i]);
        }
        for (i, name) in lb_common::REASON_NAMES.iter().enumerate() {
            set(&self.passed.with_label_values(&[*name]), snap.passed[i]);
            set(&self.dropped.with_label_values(&[*name]), snap.dropped[i]);
        }
        for (i, name) in lb_common::EVENT_NAMES.iter().enumerate() {
            set(
                &self.flow_events.with_label_values(&[*name]),
                snap.events[i],
            );
        }
        for (i, name) in lb_common::NEXTHOP_VIA_NAMES.iter().enumerate() {
            set(
                &self.next_hops.with_label_values(&[*name]),
                snap.next_hops[i],
            );
        }
        self.quic_packets.reset();
        for (s, counts) in &snap.quic {
            for (i, route) in lb_common::quic::QUIC_ROUTE_NAMES.iter().enumerate() {
                set(
                    &self.quic_packets.with_label_values(&[s.as_str(), route]),
                    counts[i],
                );
            }
        }
        for family in crate::dataplane::Family::ALL {
            self.flow_entries
                .with_label_values(&[family.name()])
                .set(snap.flow_entries[family as usize] as i64);
            self.flow_capacity
                .with_label_values(&[family.name()])
                .set(snap.flow_capacity as i64);
        }
        self.reconcile_pending.set(snap.reconcile_pending as i64);
        self.reconcile_stalled.set(snap.reconcile_stalled_seconds);
        if let Some(up) = snap.dataplane_attached {
            self.attached.set(i64::from(up));
        }
        self.fail_open.reset();
        for (s, on) in &snap.fail_open {
            self.fail_open
                .with_label_values(&[s.as_str()])
                .set(i64::from(*on));
        }
        self.announced.reset();
        for (s, on) in &snap.announced {
            self.announced
                .with_label_values(&[s.as_str()])
                .set(i64::from(*on));
        }
        if let Some(p) = &snap.pin_sync {
            for (what, v) in [
                ("sent", p.sent),
                ("received", p.received),
                ("inserted", p.inserted),
                ("datagrams_sent", p.datagrams_sent),
                ("send_errors", p.send_errors),
                ("join_fetched", p.join.pins),
                ("join_sent", p.join_pins_sent),
            ] {
                set(&self.pin_sync_pins.with_label_values(&[what]), v);
            }
            self.pin_sync_join.reset();
            self.pin_sync_join
                .with_label_values(&[p.join.state.as_str()])
                .set(1);
            for (reason, v) in &p.dropped {
                set(
                    &self.pin_sync_dropped.with_label_values(&[reason.as_str()]),
                    *v,
                );
            }
        }
        self.table_info.reset();
        for (s, fp) in &snap.table_fingerprints {
            self.table_info
                .with_label_values(&[s.as_str(), fp.as_str()])
                .set(1);
        }
        self.table_matches_cluster.reset();
        for (s, on) in &snap.table_matches_cluster {
            self.table_matches_cluster
                .with_label_values(&[s.as_str()])
                .set(i64::from(*on));
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# lb: encoding the metrics failed: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_labels() {
        let m = Metrics::new();
        m.health_result("web", "127.0.0.1:8001", "success");
        m.observe_rebuild(0.002);
        let mut snap = Snapshot {
            backends: vec![(
                "web".into(),
                "127.0.0.1:8001".into(),
                lb_common::Counters {
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                },
            )],
            backend_state: vec![("web".into(), "127.0.0.1:8001".into(), 100, true)],
            // IPv4, IPv6.
            flow_entries: [3, 1],
            ..Default::default()
        };
        snap.actions[2] = 12;
        snap.events[lb_common::Event::PinRefused as usize] = 4;
        snap.next_hops[lb_common::NextHopVia::Cache as usize] = 7;
        snap.passed[2] = 2;
        snap.dropped[lb_common::Reason::NoTxPort as usize] = 4;
        let text = m.render(&snap);
        for line in [
            "lb_packets_total{backend=\"127.0.0.1:8001\",service=\"web\"} 10",
            "lb_bytes_total{backend=\"127.0.0.1:8001\",service=\"web\"} 1000",
            "lb_new_flows_total{backend=\"127.0.0.1:8001\",service=\"web\"} 2",
            "lb_xdp_actions_total{action=\"pass\"} 12",
            "lb_passed_total{reason=\"no_service\"} 2",
            "lb_passed_total{reason=\"no_tx_port\"} 0",
            "lb_dropped_total{reason=\"no_tx_port\"} 4",
            "lb_dropped_total{reason=\"no_service\"} 0",
            "lb_backend_up{backend=\"127.0.0.1:8001\",service=\"web\"} 1",
            "lb_backend_weight{backend=\"127.0.0.1:8001\",service=\"web\"} 100",
            "lb_health_checks_total{backend=\"127.0.0.1:8001\",result=\"success\",service=\"web\"} 1",
            "lb_flow_table_entries{family=\"ipv4\"} 3",
            "lb_flow_table_entries{family=\"ipv6\"} 1",
            "lb_flow_events_total{event=\"pin_refused\"} 4",
            "lb_next_hop_lookups_total{via=\"cache\"} 7",
            "lb_next_hop_lookups_total{via=\"fib\"} 0",
            "lb_maglev_rebuild_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Counters follow the kernel's absolute values; removed backends go.
        snap.backends[0].2.packets = 15;
        assert!(
            m.render(&snap)
                .contains("lb_packets_total{backend=\"127.0.0.1:8001\",service=\"web\"} 15")
        );
        snap.backends.clear();
        snap.backend_state.clear();
        assert!(!m.render(&snap).contains("lb_packets_total{"));
    }

    #[test]
    fn renders_flow_table_capacity_and_reconcile_progress() {
        let m = Metrics::new();
        let idle = m.render(&Snapshot {
            flow_capacity: 65536,
            ..Default::default()
        });
        for line in [
            "lb_flow_table_capacity{family=\"ipv4\"} 65536",
            "lb_flow_table_capacity{family=\"ipv6\"} 65536",
            "lb_reconcile_pending 0",
            "lb_reconcile_stalled_seconds 0",
        ] {
            assert!(
                idle.lines().any(|l| l == line),
                "missing {line:?} in\n{idle}"
            );
        }
        let stuck = m.render(&Snapshot {
            flow_capacity: 65536,
            reconcile_pending: 3,
            reconcile_stalled_seconds: 12.5,
            ..Default::default()
        });
        for line in [
            "lb_reconcile_pending 3",
            "lb_reconcile_stalled_seconds 12.5",
        ] {
            assert!(
                stuck.lines().any(|l| l == line),
                "missing {line:?} in\n{stuck}"
            );
        }
    }
}
