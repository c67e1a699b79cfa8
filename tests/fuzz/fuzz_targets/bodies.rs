//! Any bytes as an admin API request body: the first byte picks the route
//! (`'0'` PUT service, `'1'` POST backend, `'2'` PATCH backend, `'3'` POST
//! reload, `'4'` POST stop; `Body::from_byte`), the rest is the body.
//! Deserializing and validating with the API's own types must not panic,
//! errors must say something, and what validates must survive the API's
//! own shape.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/rng.rs"]
mod rng;

#[allow(dead_code)]
#[path = "../../src/inputs.rs"]
mod inputs;

use inputs::Body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((route, body)) = data.split_first() else {
        return;
    };
    let kind = Body::from_byte(*route);
    if let Ok(text) = std::str::from_utf8(body)
        && let Err(what) = inputs::check_body(kind, text)
    {
        panic!("{what}");
    }
});
