//! The building blocks of dnsfence's high availability (agent + standalone proxy), with no
//! process wiring: that lives in the `dnsfence` binary.
//!
//! - [`state`]: persisted state files (`--state-dir`): atomic writes, a version and a checksum,
//!   corrupt files set aside and reported in one line so the caller can fail closed.
//!
//! This crate sits below the binary and beside the engine: it depends on neither, so both the
//! agent and the proxy (and future `observe`/`status` clients) can use it.
#![forbid(unsafe_code)]

pub mod state;
