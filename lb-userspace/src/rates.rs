//! Per-backend rates for the status page: the daemon samples every
//! backend's kernel counters every [`SAMPLE_EVERY`] and keeps the last
//! [`SAMPLES`] rates (five minutes) per backend in memory. Series of
//! backends that are gone are dropped at the next sample, so memory is
//! bounded by the backends configured.
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_common::Counters;
use serde::Serialize;

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Rates kept per backend: five minutes at [`SAMPLE_EVERY`].
pub const SAMPLES: usize = 60;

/// Per second, over one sample interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    pub new_flows: f64,
    pub packets: f64,
    pub bytes: f64,
}

impl Rate {
    /// The rate from `old` to `new` over `dt`. A counter that went back
    /// (its backend id was reused after a removal) counts as 0, not as a
    /// huge wrap-around.
    pub fn between(old: &Counters, new: &Counters, dt: Duration) -> Rate {
        let secs = dt.as_secs_f64();
        if secs <= 0.0 {
            return Rate::default();
        }
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        Rate {
            new_flows: per(old.new_flows, new.new_flows),
            packets: per(old.packets, new.packets),
            bytes: per(old.bytes, new.bytes),
        }
    }
}

struct Series {
    last: Counters,
    at: Instant,
    /// Oldest first, at most [`SAMPLES`].
    rates: VecDeque<Rate>,
}

/// The rate series of every backend, keyed by (service, address).
#[derive(Default)]
pub struct Rates {
    series: HashMap<(String, SocketAddr), Series>,
}

/// One backend's rates as the API shows them: the last interval's and the
/// history, oldest first, one value per [`SAMPLE_EVERY`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RateView {
    pub new_flows_per_second: f64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    pub history: History,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct History {
    pub new_flows: Vec<f64>,
    pub packets: Vec<f64>,
    pub bytes: Vec<f64>,
}

impl Rates {
    /// Records the counters read at `now`: one rate more per backend seen
    /// before, a new series per new backend, and the series of backends
    /// not in `counters` dropped.
    pub fn record(&mut self, now: Instant, counters: &[(String, SocketAddr, Counters)]) {
        let mut seen = std::collections::HashSet::with_capacity(counters.len());
        for (service, address, c) in counters {
            let key = (service.clone(), *address);
            seen.insert(key.clone());
            match self.series.get_mut(&key) {
                Some(s) => {
                    let dt = now.saturating_duration_since(s.at);
                    if dt.is_zero() {
                        continue;
                    }
                    s.rates.push_back(Rate::between(&s.last, c, dt));
                    while s.rates.len() > SAMPLES {
                        s.rates.pop_front();
                    }
                    s.last = *c;
                    s.at = now;
                }
                None => {
                    self.series.insert(
                        key,
                        Series {
                            last: *c,
                            at: now,
                            rates: VecDeque::with_capacity(SAMPLES),
                        },
                    );
                }
            }
        }
        self.series.retain(|k, _| seen.contains(k));
    }

    /// The backend's rates; zeros and no history before two samples.
    pub fn view(&self, service: &str, address: SocketAddr) -> RateView {
        let Some(s) = self.series.get(&(service.to_string(), address)) else {
            return RateView::default();
        };
        let last = s.rates.back().copied().unwrap_or_default();
        RateView {
            new_flows_per_second: last.new_flows,
            packets_per_second: last.packets,
            bytes_per_second: last.bytes,
            history: History {
                new_flows: s.rates.iter().map(|r| r.new_flows).collect(),
                packets: s.rates.iter().map(|r| r.packets).collect(),
                bytes: s.rates.iter().map(|r| r.bytes).collect(),
            },
        }
    }

    /// Backends with a series.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        r.record(t0, &[("web".into(), a(1), c(1000, 64_000, 10))]);
        assert_eq!(
            r.view("web", a(1)),
            RateView::default(),
            "one sample: no rate"
        );
        r.record(
            t0 + Duration::from_secs(5),
            &[("web".into(), a(1), c(1500, 164_000, 35))],
        );
        let v = r.view("web", a(1));
        assert_eq!(v.packets_per_second, 100.0);
        assert_eq!(v.bytes_per_second, 20_000.0);
        assert_eq!(v.new_flows_per_second, 5.0);
        // A late sample divides by the real interval, not the nominal one.
        r.record(
            t0 + Duration::from_secs(15),
            &[("web".into(), a(1), c(2500, 164_000, 35))],
        );
        let v = r.view("web", a(1));
        assert_eq!(v.packets_per_second, 100.0);
        assert_eq!(v.history.packets, vec![100.0, 100.0]);
        assert_eq!(v.history.bytes, vec![20_000.0, 0.0]);
        assert_eq!(v.history.new_flows, vec![5.0, 0.0]);
    }

    #[test]
    fn a_counter_that_goes_back_is_a_zero_rate() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        r.record(t0, &[("web".into(), a(1), c(1000, 1000, 10))]);
        r.record(t0 + SAMPLE_EVERY, &[("web".into(), a(1), c(5, 5000, 1))]);
        let v = r.view("web", a(1));
        assert_eq!(
            (
                v.packets_per_second,
                v.bytes_per_second,
                v.new_flows_per_second
            ),
            (0.0, 800.0, 0.0)
        );
        // A sample at the same instant adds nothing.
        r.record(t0 + SAMPLE_EVERY, &[("web".into(), a(1), c(9, 9000, 1))]);
        assert_eq!(r.view("web", a(1)).history.packets.len(), 1);
    }

    #[test]
    fn history_keeps_five_minutes_and_gone_backends_are_dropped() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        for i in 0..=100u64 {
            let at = t0 + SAMPLE_EVERY * i as u32;
            let mut now = vec![("web".to_string(), a(1), c(i * 5, 0, 0))];
            if i < 50 {
                now.push(("web".to_string(), a(2), c(0, 0, 0)));
            }
            r.record(at, &now);
        }
        let v = r.view("web", a(1));
        assert_eq!(v.history.packets.len(), SAMPLES);
        assert!(v.history.packets.iter().all(|p| *p == 1.0), "{v:?}");
        assert_eq!(r.len(), 1, "the removed backend's series is gone");
        assert_eq!(r.view("web", a(2)), RateView::default());
        // The same address in another service is another series.
        r.record(
            t0 + SAMPLE_EVERY * 101,
            &[
                ("web".into(), a(1), c(505, 0, 0)),
                ("api".into(), a(1), c(7, 0, 0)),
            ],
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r.view("api", a(1)).packets_per_second, 0.0);
        assert_eq!(r.view("web", a(1)).packets_per_second, 1.0);
        r.record(t0 + SAMPLE_EVERY * 102, &[]);
        assert!(r.is_empty());
    }
}
