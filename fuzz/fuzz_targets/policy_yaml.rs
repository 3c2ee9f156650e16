//! Any UTF-8 text as a policy or endpoints file: the loader never panics and reports every
//! rejection with a line. The checks live in `dnsfence_fuzz::policy_yaml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dnsfence_fuzz::policy_yaml(text);
    }
});
