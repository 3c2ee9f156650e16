//! FQDN pattern matcher.
#![forbid(unsafe_code)]
