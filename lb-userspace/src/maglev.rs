//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016).
//!
//! Every backend walks its own permutation of the M slots and claims the next
//! free one on its turns. Weights are honoured on every pass, not only the
//! first: on each pass a backend earns `weight` credit and takes one slot per
//! `max_weight` of credit, so shares track weights to within a slot however
//! the passes end. Permutations depend only on the backend's name, so adding
//! or removing one backend moves few of the others' slots.

use thiserror::Error;

/// A backend as the table builder sees it: a stable name (its address) that
/// seeds the permutation, the id written into the table, and a weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub id: u32,
    pub weight: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime number; pick a prime such as 65537")]
    NotPrime(u32),
    #[error("Maglev table size {0} is out of range (3..={max})", max = lb_common::MAX_MAGLEV_SIZE)]
    OutOfRange(u32),
}

/// Checks that `m` is usable as a table size.
pub fn check_size(m: u32) -> Result<(), MaglevError> {
    if !(3..=lb_common::MAX_MAGLEV_SIZE).contains(&m) {
        return Err(MaglevError::OutOfRange(m));
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    Ok(())
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime at or above `n`.
pub fn next_prime(mut n: u32) -> u32 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// 64-bit FNV-1a followed by a splitmix64 finaliser: stable across runs and
/// builds, which the permutation needs.
fn hash(name: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds a table of size `m` (a prime, see [`check_size`]). Backends with
/// weight 0 get no slot; with no weighted backend every slot is
/// `lb_common::NO_BACKEND`.
pub fn build(backends: &[Entry], m: u32) -> Vec<u32> {
    let mut table = vec![lb_common::NO_BACKEND; m as usize];
    let live: Vec<&Entry> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return table;
    }
    let m64 = m as u64;
    let max_weight = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    // Position in its permutation and the step of every backend.
    let mut pos: Vec<u64> = Vec::with_capacity(live.len());
    let mut skip: Vec<u64> = Vec::with_capacity(live.len());
    for b in &live {
        pos.push(hash(&b.name, 0x5eed_0ff5) % m64);
        skip.push(hash(&b.name, 0x5eed_5e1f) % (m64 - 1) + 1);
    }
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u32;
    'passes: loop {
        for i in 0..live.len() {
            credit[i] += live[i].weight as u64;
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                // Walk this backend's permutation to its next free slot.
                let mut p = pos[i];
                while table[p as usize] != lb_common::NO_BACKEND {
                    p += skip[i];
                    if p >= m64 {
                        p -= m64;
                    }
                }
                table[p as usize] = live[i].id;
                p += skip[i];
                if p >= m64 {
                    p -= m64;
                }
                pos[i] = p;
                filled += 1;
                if filled == m {
                    break 'passes;
                }
            }
        }
    }
    table
}

/// How many slots each id holds.
pub fn slot_counts(table: &[u32]) -> std::collections::HashMap<u32, usize> {
    let mut counts = std::collections::HashMap::new();
    for id in table {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn backends(n: u32, weight: impl Fn(u32) -> u16) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                name: format!("10.{}.{}.{}:443", i / 65536, (i / 256) % 256, i % 256),
                id: i,
                weight: weight(i),
            })
            .collect()
    }

    #[test]
    fn sizes_must_be_prime_and_in_range() {
        assert_eq!(check_size(65537), Ok(()));
        assert_eq!(check_size(1_048_573), Ok(()));
        assert_eq!(check_size(65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(check_size(2), Err(MaglevError::OutOfRange(2)));
        assert_eq!(
            check_size(1_048_583),
            Err(MaglevError::OutOfRange(1_048_583))
        );
        assert_eq!(next_prime(65536), 65537);
    }

    #[test]
    fn every_slot_is_filled() {
        for m in [7, 251, 65537] {
            let t = build(&backends(5, |_| 1), m);
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|id| *id < 5));
        }
    }

    #[test]
    fn no_backends_means_empty_slots() {
        assert!(build(&[], 13).iter().all(|id| *id == lb_common::NO_BACKEND));
        assert!(
            build(&backends(3, |_| 0), 13)
                .iter()
                .all(|id| *id == lb_common::NO_BACKEND)
        );
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        for n in [3, 10, 100, 1000] {
            let t = build(&backends(n, |_| 100), 65537);
            let counts = slot_counts(&t);
            assert_eq!(counts.len(), n as usize);
            let max = counts.values().max().unwrap();
            let min = counts.values().min().unwrap();
            assert!(max - min <= 1, "n={n}: max {max} min {min}");
        }
    }

    /// Table size large enough that the lightest backend expects 100 slots.
    fn size_for(b: &[Entry]) -> u32 {
        let total: u64 = b.iter().map(|e| e.weight as u64).sum();
        let min = b.iter().map(|e| e.weight as u64).min().unwrap();
        next_prime(((100 * total).div_ceil(min)).max(65537) as u32)
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        for n in [3, 10, 100, 1000] {
            let b = backends(n, |i| (i % 4 + 1) as u16);
            let m = size_for(&b);
            let t = build(&b, m);
            let counts = slot_counts(&t);
            let total: f64 = b.iter().map(|e| e.weight as f64).sum();
            for e in &b {
                let expected = m as f64 * e.weight as f64 / total;
                let got = counts[&e.id] as f64;
                assert!(
                    (got - expected).abs() <= expected * 0.01,
                    "n={n} m={m} backend {} weight {}: {got} slots, expected {expected:.1}",
                    e.id,
                    e.weight
                );
            }
        }
    }

    /// Weights are honoured on every pass: a table built from the first k
    /// slots claimed must already be in proportion, which a scheme that only
    /// weights the first pass fails. Checked on a small table where a light
    /// backend would otherwise catch up in later passes.
    #[test]
    fn weights_hold_on_every_pass() {
        let b = vec![
            Entry {
                name: "a".into(),
                id: 0,
                weight: 1,
            },
            Entry {
                name: "b".into(),
                id: 1,
                weight: 3,
            },
        ];
        for m in [5, 7, 11, 13, 101, 1009] {
            let counts = slot_counts(&build(&b, m));
            let heavy = counts[&1] as f64;
            let light = counts.get(&0).copied().unwrap_or(0) as f64;
            let expected_light = m as f64 / 4.0;
            assert!(
                (light - expected_light).abs() <= 1.0,
                "m={m}: light {light} heavy {heavy}"
            );
        }
    }

    /// Share of slots that belonged to backends other than `changed` in
    /// `before` and point elsewhere in `after`.
    fn moved_share(before: &[u32], after: &[u32], changed: u32) -> f64 {
        let mut owned = 0usize;
        let mut moved = 0usize;
        for (a, b) in before.iter().zip(after) {
            if *a != changed {
                owned += 1;
                if a != b && *b != changed {
                    moved += 1;
                }
            }
        }
        moved as f64 / owned as f64
    }

    #[test]
    fn one_change_moves_at_most_one_percent_of_the_others() {
        for n in [3u32, 10, 100] {
            let m = next_prime((100 * n).max(65537));
            let all = backends(n + 1, |_| 100);
            let t_all = build(&all, m);
            let t_less = build(&all[..n as usize], m);
            // Adding backend n, and removing it again.
            let add = moved_share(&t_less, &t_all, n);
            let remove = moved_share(&t_all, &t_less, n);
            assert!(add <= 0.01, "n={n}: adding moved {:.3}%", add * 100.0);
            assert!(
                remove <= 0.01,
                "n={n}: removing moved {:.3}%",
                remove * 100.0
            );
        }
        let n = 1000u32;
        let m = next_prime(100 * n);
        let all = backends(n + 1, |_| 100);
        let t_all = build(&all, m);
        let t_less = build(&all[..n as usize], m);
        let add = moved_share(&t_less, &t_all, n);
        assert!(add <= 0.01, "n={n}: adding moved {:.3}%", add * 100.0);
    }

    #[test]
    fn sizes_up_to_the_largest_prime_work() {
        let t = build(&backends(7, |i| (i + 1) as u16), lb_common::MAX_MAGLEV_SIZE);
        assert_eq!(t.len(), lb_common::MAX_MAGLEV_SIZE as usize);
        assert!(t.iter().all(|id| *id < 7));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn equal_weights_balance_for_any_set(n in 1u32..60, m_seed in 0usize..6) {
            let m = [7u32, 61, 251, 1009, 4099, 65537][m_seed];
            prop_assume!(m >= n);
            let t = build(&backends(n, |_| 7), m);
            let counts = slot_counts(&t);
            let max = counts.values().max().unwrap();
            let min = counts.values().min().unwrap();
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn weighted_counts_track_weights_within_two_slots(
            weights in proptest::collection::vec(1u16..=1000, 1..40)
        ) {
            let b: Vec<Entry> = weights.iter().enumerate()
                .map(|(i, w)| Entry { name: format!("b{i}"), id: i as u32, weight: *w })
                .collect();
            let m = 65537u32;
            let counts = slot_counts(&build(&b, m));
            let total: f64 = weights.iter().map(|w| *w as f64).sum();
            for e in &b {
                let expected = m as f64 * e.weight as f64 / total;
                let got = counts.get(&e.id).copied().unwrap_or(0) as f64;
                // One slot for the cut-off last pass, one for unspent credit,
                // and this backend's part of everyone's unspent credit.
                let slack = 2.0 + b.len() as f64 * e.weight as f64 / total;
                prop_assert!((got - expected).abs() <= slack,
                    "weight {}: {} vs {:.1}", e.weight, got, expected);
            }
        }

        #[test]
        fn table_depends_on_names_not_order(n in 2u32..30) {
            let b = backends(n, |i| (i % 3 + 1) as u16);
            let mut rev = b.clone();
            rev.reverse();
            // Order of the list changes only tie-breaks within a pass, so
            // the two tables share nearly all slots.
            let t1 = build(&b, 4099);
            let t2 = build(&rev, 4099);
            let same = t1.iter().zip(&t2).filter(|(a, b)| a == b).count();
            prop_assert!(same as f64 / 4099.0 > 0.5);
        }
    }
}
