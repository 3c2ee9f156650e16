//! Patterns and a name from arbitrary bytes: building and looking up must not panic, and the
//! trie must agree with Cilium's per-pattern regexes. The checks live in `dnsfence_fuzz::lookup`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dnsfence_fuzz::lookup(data);
});
