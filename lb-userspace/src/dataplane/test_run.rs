//! Test and bench hooks, built only with the `test-helpers` feature:
//! running the loaded programs on a frame with `BPF_PROG_TEST_RUN`, their
//! sizes after verification, reading and emptying the flow table.

use aya::{
    TestRun, TestRunOptions, TestRunResult,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{FlowKey, FlowValue, programs};

use super::{Dataplane, DataplaneError, Result};

impl Dataplane {
    /// Removes every pin, as an LRU under pressure would evict them; returns
    /// how many there were. For tests of what misses do.
    pub fn clear_flows(&mut self) -> usize {
        let keys: Vec<FlowKey> = self.flows.iter().map(|(k, _)| k).collect();
        let mut removed = [0u64; 2];
        for k in &keys {
            if self.flows.remove(k) {
                removed[super::Family::of(k) as usize] += 1;
            }
        }
        // Counted as the daemon's removals are, so the sizes stay right.
        for family in super::Family::ALL {
            let _ = self.count_flows_removed(family, removed[family as usize]);
        }
        keys.len()
    }

    /// The flow table's pin for `key`, if there is one: which node holds a
    /// flow's pin, and to which backend.
    pub fn flow_pin(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key)
    }

    /// Runs the XDP program once on `frame` with `BPF_PROG_TEST_RUN`;
    /// returns the action and the frame as the program left it.
    pub fn test_run_xdp(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(
            self.program::<Xdp>(programs::XDP)?,
            programs::XDP,
            frame,
            None,
            1,
        )?;
        Ok((action, out))
    }

    /// Like [`Self::test_run_xdp`], as if the frame arrived on interface
    /// `ingress_ifindex` of the calling thread's network namespace (the FIB
    /// lookups of `nat`/`dsr` depend on it).
    pub fn test_run_xdp_on(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let (action, out, _) = test_run(
            self.program::<Xdp>(programs::XDP)?,
            programs::XDP,
            frame,
            Some(&ctx),
            1,
        )?;
        Ok((action, out))
    }

    /// Runs the TC egress program once on `frame`.
    pub fn test_run_tc(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(
            self.program::<SchedClassifier>(programs::TC_EGRESS)?,
            programs::TC_EGRESS,
            frame,
            None,
            1,
        )?;
        Ok((action, out))
    }

    /// Runs the TC ingress program (the balancer in TC mode) once on
    /// `frame`: its verdict (`TC_ACT_OK` 0, `TC_ACT_SHOT` 2) and the frame.
    pub fn test_run_tc_ingress(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(
            self.program::<SchedClassifier>(programs::TC_INGRESS)?,
            programs::TC_INGRESS,
            frame,
            None,
            1,
        )?;
        Ok((action, out))
    }

    /// Runs the XDP program `repeat` times on `frame` in the kernel and
    /// returns the mean time per run as the kernel measured it.
    pub fn bench_xdp(&self, frame: &[u8], repeat: u32) -> Result<std::time::Duration> {
        Ok(test_run(
            self.program::<Xdp>(programs::XDP)?,
            programs::XDP,
            frame,
            None,
            repeat,
        )?
        .2)
    }

    /// (program, instructions after the verifier's rewrites, instructions
    /// the verifier walked) for each loaded program.
    pub fn program_sizes(&self) -> Vec<(&'static str, u32, u32)> {
        [programs::XDP, programs::TC_EGRESS, programs::TC_INGRESS]
            .into_iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((
                    name,
                    info.size_translated().unwrap_or(0) / 8,
                    info.verified_instruction_count().unwrap_or(0),
                ))
            })
            .collect()
    }
}

/// One `BPF_PROG_TEST_RUN` of `prog`: its return value, the frame as the
/// last run left it, and the kernel's mean time per run.
fn test_run<P>(
    prog: &P,
    name: &'static str,
    frame: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> Result<(u32, Vec<u8>, std::time::Duration)>
where
    for<'a> P: TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 512];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat,
            ..Default::default()
        })
        .map_err(|source| DataplaneError::Program { name, source })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out, res.duration))
}
