//! Any bytes as a DNS-over-TCP stream cut into reads: the frame decoder and output buffer
//! never panic and agree with a plain reading of the stream. The checks live in
//! `dnsfence_fuzz::tcp_framing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dnsfence_fuzz::tcp_framing(data);
});
