//! System tests: real processes (dnsfence, dnsfence-loadgen, knot) on loopback.
#![forbid(unsafe_code)]
