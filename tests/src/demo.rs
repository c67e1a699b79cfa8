//! What the two demos (`tests/examples/demo.rs`, `cluster_demo.rs`) share:
//! Ctrl-C and SIGTERM caught before any setup, so an interrupted demo
//! still cleans up, and the once-a-second loop that prints their lines.
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Signals {
    rt: tokio::runtime::Runtime,
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Catches SIGINT and SIGTERM from now on.
    pub fn catch() -> Signals {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (int, term) = rt.block_on(async {
            (
                signal(SignalKind::interrupt()).expect("SIGINT handler"),
                signal(SignalKind::terminate()).expect("SIGTERM handler"),
            )
        });
        Signals { rt, int, term }
    }

    /// Runs `each` once a second until a signal or `limit` (from
    /// `started`); why it stopped.
    pub fn every_second(
        &mut self,
        started: Instant,
        limit: Option<Duration>,
        mut each: impl FnMut(),
    ) -> &'static str {
        loop {
            let (int, term) = (&mut self.int, &mut self.term);
            let stop = self.rt.block_on(async {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                    _ = int.recv() => Some("Ctrl-C"),
                    _ = term.recv() => Some("SIGTERM"),
                }
            });
            if let Some(r) = stop {
                return r;
            }
            each();
            if limit.is_some_and(|l| started.elapsed() >= l) {
                return "time is up";
            }
        }
    }
}
