//! The config parser and the admin API's request bodies against tens of
//! thousands of seeded, mutated inputs (a bounded run of what the cargo-fuzz
//! targets in `tests/fuzz/` do without end): no input panics, every error
//! says something and points inside the file, and whatever validates keeps
//! its meaning through the shape the API and the state file use.
//!
//! `LB_FUZZ_SEED=<n>|random` picks the seed, `LB_FUZZ_SCALE=<k>` runs k times
//! as many inputs.
use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    panic::{self, AssertUnwindSafe},
    sync::Once,
    time::Instant,
};

use lb_tests::{
    inputs::{self, Body},
    rng::{self, Rng},
};

const CONFIG_CASES: usize = 20_000;
const BODY_CASES: usize = 30_000;

/// Inputs that once broke something: run every time, whatever the seed.
const CONFIG_REGRESSIONS: [&str; 4] = [
    // A duration too long for `Duration` panicked the parser.
    "[dataplane]\n[[services]]\nname = \"w\"\nhealth = { kind = \"tcp\", interval = \"99999999999999999999s\", timeout = \"1s\" }\nbackends = [{ address = \"127.0.0.1:1\" }]\n",
    "[dataplane]\n[[services]]\nname = \"w\"\nhealth = { kind = \"tcp\", timeout = \"18446744073709551616ms\" }\nbackends = [{ address = \"127.0.0.1:1\" }]\n",
    // Sub-millisecond durations were saved as "0ms", which does not load.
    "[dataplane]\n[[services]]\nname = \"w\"\nhealth = { kind = \"tcp\", interval = \"500us\", timeout = \"100us\" }\nbackends = [{ address = \"127.0.0.1:1\" }]\n",
    "[dataplane]\n[[services]]\nname = \"w\"\nhealth = { kind = \"tcp\", interval = \"1.5ms\", timeout = \"1ms\" }\nbackends = [{ address = \"127.0.0.1:1\" }]\n",
];

const BODY_REGRESSIONS: [(Body, &str); 2] = [
    (
        Body::Service,
        r#"{"listen": "0.0.0.0:8443", "health": {"kind": "tcp", "interval": "99999999999999999999s"}, "backends": [{"address": "127.0.0.1:9001"}]}"#,
    ),
    (
        Body::Service,
        r#"{"listen": "0.0.0.0:8443", "health": {"kind": "tcp", "interval": "500us", "timeout": "100us"}, "backends": [{"address": "127.0.0.1:9001"}]}"#,
    ),
];

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics of the checked code are recorded, not printed; any other panic
/// (a failing assertion) prints as usual.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                CAUGHT.with(|c| *c.borrow_mut() = Some(info.to_string()));
            } else {
                default(info);
            }
        }));
    });
}

/// Runs one check; a panic becomes an error naming where it happened.
fn guarded(check: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    CAPTURING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(check));
    CAPTURING.with(|c| c.set(false));
    match result {
        Ok(r) => r,
        Err(_) => Err(format!(
            "panicked: {}",
            CAUGHT
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| "(no message)".into())
        )),
    }
}

/// Failures grouped by their first line, keeping the shortest input of each
/// group (the easiest to reproduce).
#[derive(Default)]
struct Failures(BTreeMap<String, (usize, String, String)>);

impl Failures {
    fn add(&mut self, input: &str, what: String) {
        let key: String = what
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect();
        let e = self
            .0
            .entry(key)
            .or_insert_with(|| (0, input.to_string(), what.clone()));
        e.0 += 1;
        if input.len() < e.1.len() {
            e.1 = input.to_string();
            e.2 = what;
        }
    }

    fn report(&self, seed: u64) -> String {
        let mut s = format!(
            "{} kinds of failure (seed {seed:#x}, repeat with LB_FUZZ_SEED={seed:#x}):\n",
            self.0.len()
        );
        for (n, input, what) in self.0.values() {
            s.push_str(&format!("- {n} inputs; shortest: {input:?}\n  {what}\n"));
        }
        s
    }
}

#[test]
fn config_parser_survives_mutated_files() {
    install_hook();
    let seed = rng::seed("config fuzz", 0xc0f16);
    let mut r = Rng::new(seed);
    let mut failures = Failures::default();
    let (mut ok, mut rejected) = (0, 0);
    let started = Instant::now();
    let cases = CONFIG_CASES * rng::scale();
    let inputs = CONFIG_REGRESSIONS
        .iter()
        .chain(&inputs::CONFIGS)
        .map(|s| s.to_string())
        .chain((0..cases).map(|_| inputs::config_case(&mut r)));
    for text in inputs {
        match guarded(|| inputs::check_config(&text)) {
            Err(what) => failures.add(&text, what),
            Ok(()) => {
                if lb_userspace::config::Config::parse(std::path::Path::new(inputs::FILE), &text)
                    .is_ok()
                {
                    ok += 1;
                } else {
                    rejected += 1;
                }
            }
        }
    }
    println!(
        "config fuzz: {} inputs in {:.1} s: {ok} valid, {rejected} rejected with a placed error, \
         {} failed",
        cases + CONFIG_REGRESSIONS.len() + inputs::CONFIGS.len(),
        started.elapsed().as_secs_f64(),
        failures.0.values().map(|f| f.0).sum::<usize>()
    );
    assert!(failures.0.is_empty(), "{}", failures.report(seed));
    // The mix must reach both outcomes, or it tests little.
    assert!(
        ok > cases / 50 && rejected > cases / 2,
        "{ok} valid, {rejected} rejected"
    );
}

#[test]
fn api_bodies_survive_mutated_json() {
    install_hook();
    let seed = rng::seed("api body fuzz", 0xb0d1e5);
    let mut r = Rng::new(seed);
    let mut failures = Failures::default();
    let mut per_kind: BTreeMap<Body, usize> = BTreeMap::new();
    let started = Instant::now();
    let cases = BODY_CASES * rng::scale();
    let valid = Body::ALL.into_iter().flat_map(|k| {
        inputs::bodies(k)
            .into_iter()
            .map(move |v| (k, v.to_string()))
    });
    let all = BODY_REGRESSIONS
        .iter()
        .map(|(k, s)| (*k, s.to_string()))
        .chain(valid)
        .chain((0..cases).map(|_| inputs::body_case(&mut r)));
    let mut n = 0;
    for (kind, text) in all {
        n += 1;
        *per_kind.entry(kind).or_default() += 1;
        if let Err(what) = guarded(|| inputs::check_body(kind, &text)) {
            failures.add(&format!("{kind:?}: {text}"), what);
        }
    }
    println!(
        "api body fuzz: {n} bodies in {:.1} s ({per_kind:?}), {} failed",
        started.elapsed().as_secs_f64(),
        failures.0.values().map(|f| f.0).sum::<usize>()
    );
    assert!(failures.0.is_empty(), "{}", failures.report(seed));
    // Every route that reads a body got its share.
    for k in Body::ALL {
        assert!(
            per_kind.get(&k).copied().unwrap_or(0) > cases / 10,
            "{k:?}: {per_kind:?}"
        );
    }
}

/// The cargo-fuzz seeds, replayed: every route that reads a body has seeds,
/// each seed's first byte names its route, and each is a body the API
/// takes through its own types and checks (a fuzzer that starts from
/// inputs the API refuses at once explores little). Config seeds must
/// load too.
#[test]
fn fuzz_seeds_cover_every_api_body_and_the_api_takes_them() {
    install_hook();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let started = Instant::now();
    let mut per_kind: BTreeMap<Body, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root.join("bodies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(f).unwrap();
        let Some((&route, body)) = data.split_first() else {
            failures.push(format!("{name}: empty; the first byte names the route"));
            continue;
        };
        let kind = Body::from_byte(route);
        if kind.byte() != route {
            failures.push(format!(
                "{name}: first byte {route:#x}; write '0'..'4' for the route"
            ));
        }
        let text = String::from_utf8_lossy(body).into_owned();
        if let Err(what) = guarded(|| inputs::check_body(kind, &text)) {
            failures.push(format!("{name} ({kind:?}): {what}"));
        }
        if let Err(what) = guarded(|| inputs::accept(kind, &text)) {
            failures.push(format!("{name} ({kind:?}): the API refuses it: {what}"));
        }
        per_kind.entry(kind).or_default().push(name);
    }
    for k in Body::ALL {
        if !per_kind.contains_key(&k) {
            failures.push(format!("{k:?}: no seed in fuzz/seeds/bodies"));
        }
    }
    let mut configs = 0;
    for e in std::fs::read_dir(root.join("config")).unwrap() {
        let f = e.unwrap().path();
        let text = std::fs::read_to_string(&f).unwrap();
        configs += 1;
        if let Err(e) = lb_userspace::config::Config::parse(&f, &text) {
            failures.push(format!("config seed {}: {e}", f.display()));
        }
    }
    println!(
        "fuzz seeds: {} body seeds ({per_kind:?}), {configs} config seeds in {:.3} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
