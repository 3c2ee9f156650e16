//! Any bytes as a client query: the engine's query parser never panics and agrees with
//! hickory-proto. The checks live in `dnsfence_fuzz::query`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dnsfence_fuzz::query(data);
});
