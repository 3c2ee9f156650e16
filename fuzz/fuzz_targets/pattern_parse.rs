//! Any string: `Pattern::parse` must not panic, and a parsed pattern's normalised form must
//! parse back to the same pattern. The checks live in `dnsfence_fuzz::pattern_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = std::str::from_utf8(data) {
        dnsfence_fuzz::pattern_parse(input);
    }
});
