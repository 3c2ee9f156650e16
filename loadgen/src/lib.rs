//! dnsfence-loadgen: an open-loop DNS load generator and a fast, deterministic upstream.
//!
//! * [`generator`]: paced UDP load (dnsperf query files), answers matched by socket, ID and
//!   question, latency histograms and a per-second timeline ([`stats`]), timed shell actions
//!   ([`scenario`]) for failover runs.
//! * [`upstream`]: an authoritative stand-in answering A/AAAA with addresses derived from the
//!   name, with name-driven behaviours (CNAME chains, NXDOMAIN, SERVFAIL, TC, extra records,
//!   drops, delays) for tests.
//!
//! Only [`sys`] contains `unsafe` (batched socket I/O, `ppoll`, `getrusage`, signals).
#![deny(unsafe_code)]

pub mod generator;
pub mod queries;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod upstream;
pub mod wire;
