//! Any bytes as an upstream answer: the answer parser never panics and collects exactly the
//! addresses of the CNAME chain's last name (cross-checked with hickory-proto). The checks live
//! in `dnsfence_fuzz::answer`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dnsfence_fuzz::answer(data);
});
