//! Seeded randomness for the randomized tests: `rand`'s portable
//! Xoshiro256++ behind the few draws the fuzzers use. Same seed, same
//! sequence on every machine: a failure reproduces from the seed the test
//! prints, with `LB_FUZZ_SEED=<seed>`.
use std::time::{SystemTime, UNIX_EPOCH};

use rand::{RngExt, SeedableRng, rngs::Xoshiro256PlusPlus};

/// The generator of one randomized test.
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.random()
    }

    pub fn u8(&mut self) -> u8 {
        self.0.random()
    }

    pub fn u16(&mut self) -> u16 {
        self.0.random()
    }

    pub fn u32(&mut self) -> u32 {
        self.0.random()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// Uniform in `lo..hi` (`lo < hi`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        self.0.random_range(lo..hi)
    }

    /// True once in `n` times on average.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.0.fill(&mut v[..]);
        v
    }

    /// A length that is usually small and sometimes up to `max`.
    pub fn skewed_len(&mut self, max: usize) -> usize {
        match self.below(10) {
            0..=5 => self.below(max.min(32) + 1),
            6..=8 => self.below(max.min(256) + 1),
            _ => self.below(max + 1),
        }
    }
}

/// The seed of a randomized test: `LB_FUZZ_SEED` (decimal, `0x` hex, or
/// `random` for one taken from the clock) when set, else `default`, so CI
/// runs the same cases every time. Printed, so any run can be repeated.
pub fn seed(test: &str, default: u64) -> u64 {
    let seed = match std::env::var("LB_FUZZ_SEED") {
        Ok(s) if s == "random" => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(default),
        Ok(s) => {
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("LB_FUZZ_SEED={s:?} is not a number or \"random\""))
        }
        Err(_) => default,
    };
    println!("{test}: seed {seed:#x} (repeat with LB_FUZZ_SEED={seed:#x})");
    seed
}

/// How many times the default case count to run: `LB_FUZZ_SCALE` (for
/// long local runs), 1 when unset.
pub fn scale() -> usize {
    std::env::var("LB_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}
