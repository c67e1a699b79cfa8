//! Any text as a config file: `Config::parse` must not panic, its errors
//! must name a place inside the file, and what it accepts must survive the
//! state file's shape. The checks are `tests/src/inputs.rs`, shared with
//! the bounded CI run.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/rng.rs"]
mod rng;

#[allow(dead_code)]
#[path = "../../src/inputs.rs"]
mod inputs;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(what) = inputs::check_config(text)
    {
        panic!("{what}");
    }
});
