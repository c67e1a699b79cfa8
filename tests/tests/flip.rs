//! Table flips are atomic: a reader beside the writer never sees a table
//! that mixes two generations, while the writer installs thousands.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_common::MaglevSlot;
use lb_userspace::dataplane::{Dataplane, Options};

#[test]
fn readers_never_see_a_half_written_table() {
    lb_tests::require_root();
    let mut dp = Dataplane::load(Options {
        max_services: 1,
        flow_table_size: 4096,
        ..Options::default()
    })
    .expect("load");
    let m = dp.options().maglev_size as usize;
    let reader = dp.reader().expect("reader");
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let checks = thread::spawn(move || {
        let mut checked = 0u64;
        let mut copy = vec![MaglevSlot::EMPTY; m];
        while !stop.load(Ordering::Relaxed) {
            let before = reader.service(0).unwrap();
            if before.table_size == 0 {
                continue;
            }
            copy.copy_from_slice(reader.table(0, before.active));
            let after = reader.service(0).unwrap();
            // With no flip in between, the table read must be exactly the
            // generation it was installed as, every slot of it.
            if after.generation == before.generation {
                let want = before.generation;
                if let Some(bad) = copy
                    .iter()
                    .position(|s| s.backend != want || s.prev != want)
                {
                    panic!(
                        "generation {want}: slot {bad} holds {:?}: a mixed table",
                        copy[bad]
                    );
                }
                checked += 1;
            }
        }
        checked
    });
    let flips = 3000u32;
    let started = Instant::now();
    for g in 1..=flips {
        let slots = vec![MaglevSlot::clean(g); m];
        dp.install_table(0, &slots, 0).unwrap();
    }
    let spent = started.elapsed();
    // Let the reader look at the last table too.
    thread::sleep(Duration::from_millis(50));
    done.store(true, Ordering::Relaxed);
    let checked = checks.join().expect("reader saw a mixed table");
    println!(
        "{flips} flips of a {m}-slot table in {:.0} ms ({:.1} us each); {checked} consistent reads",
        spent.as_secs_f64() * 1e3,
        spent.as_secs_f64() * 1e6 / flips as f64
    );
    assert!(checked > 0, "the reader never completed a read");
}
