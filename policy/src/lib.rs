//! Policy sources for dnsfence: CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy YAML and the
//! endpoints file, validated with `FILE:LINE: reason` errors and compiled into an immutable
//! [`Snapshot`] the data plane reads.
//!
//! See `README.md` beside this crate for the supported fields. In short: `spec`/`specs` with
//! `endpointSelector` (`matchLabels`, `matchExpressions`), `description` and `egress[]` rules
//! made of `toFQDNs` (with optional `toPorts` ports), or `toPorts` with `rules.dns` (with optional
//! `toEndpoints`). Anything else is rejected, never ignored.
#![forbid(unsafe_code)]

pub mod cidr;
mod endpoints;
mod error;
mod policy;
pub mod reload;
mod selector;
mod snapshot;
mod yaml;

use std::path::{Path, PathBuf};

pub use endpoints::{Endpoint, Endpoints, Node, Service};
pub use error::{LoadError, LoadErrorKind, LoadErrors};
pub use policy::{
    DnsPorts, DnsRule, EgressRule, FileVerdict, FqdnRule, L3Rule, L3Target, Policy, PolicyKind,
    PolicySet, PortProto, PortProtocol, Proto, ServiceRef, Spec, Summary, parse_policy_file,
};
pub use selector::{LabelSelector, Labels, NAMESPACE_LABEL};
pub use snapshot::{DnsReason, DnsVerdict, EndpointId, EndpointKey, Snapshot, SnapshotStats};

/// Loads policy files/directories and (optionally) an endpoints file, and compiles them.
/// Errors of both are collected; nothing is compiled when there is any.
pub fn load(
    policy_paths: &[PathBuf],
    endpoints_path: Option<&Path>,
) -> Result<Snapshot, LoadErrors> {
    load_on(policy_paths, endpoints_path, &cidr::NodeFacts::default())
}

/// Like [`load`], with what the node knows of itself and its cluster (`toEntities`).
pub fn load_on(
    policy_paths: &[PathBuf],
    endpoints_path: Option<&Path>,
    node: &cidr::NodeFacts,
) -> Result<Snapshot, LoadErrors> {
    let policies = PolicySet::load(policy_paths);
    let endpoints = endpoints_path.map(Endpoints::load).transpose();
    match (policies, endpoints) {
        (Ok(p), Ok(e)) => Ok(Snapshot::compile_on(&p, &e.unwrap_or_default(), &[], node)),
        (p, e) => {
            let mut errors = Vec::new();
            if let Err(LoadErrors(pe)) = p {
                errors.extend(pe);
            }
            if let Err(LoadErrors(ee)) = e {
                errors.extend(ee);
            }
            Err(LoadErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests;
