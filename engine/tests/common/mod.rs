//! Helpers shared by the engine's tests: hand-built DNS messages and test policies.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;

use dnsfence_engine::wire::CLASS_IN;
use dnsfence_policy::Snapshot;
pub use dnsfence_testkit::fixtures::{CLIENT, ENDPOINTS, OPEN_CLIENT, POLICY};

/// Wire form of a dotted name (labels taken as given, any bytes).
pub fn name_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query with RD set.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&name_wire(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// Appends an EDNS0 OPT record (UDP size 4096, DO set).
pub fn with_opt(mut q: Vec<u8>) -> Vec<u8> {
    q[11] = 1;
    q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
    q
}

/// An answer (QR, RD, RA) with the given answer records (owner, type, ttl, rdata).
pub fn answer(id: u16, qname: &str, qtype: u16, records: &[(&str, u16, u32, &[u8])]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x81, 0x80, 0, 1]);
    p.extend_from_slice(&(records.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&name_wire(qname));
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    for (owner, rtype, ttl, rdata) in records {
        if owner.eq_ignore_ascii_case(qname) {
            p.extend_from_slice(&[0xc0, 0x0c]);
        } else {
            p.extend_from_slice(&name_wire(owner));
        }
        p.extend_from_slice(&rtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p.extend_from_slice(&ttl.to_be_bytes());
        p.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        p.extend_from_slice(rdata);
    }
    p
}

pub fn rdata_a(ip: &str) -> Vec<u8> {
    ip.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec()
}

pub fn rdata_aaaa(ip: &str) -> Vec<u8> {
    ip.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
}

pub fn rdata_name(name: &str) -> Vec<u8> {
    name_wire(name)
}

/// The same endpoints under a policy that allows no name.
pub const DENY_ALL: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchName: "nothing.invalid"}]
"#;

/// Writes `files` into a fresh directory under the target dir and returns its path.
pub fn write_dir(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dnsfence-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// The node facts of the tests: their upstreams answer in 127.0.0.0/8, opened as by
/// `--open-loopback-answers`.
pub fn test_node() -> dnsfence_policy::cidr::NodeFacts {
    dnsfence_policy::cidr::NodeFacts {
        open_loopback: true,
        ..Default::default()
    }
}

pub fn snapshot_of(policy: &str) -> Snapshot {
    snapshot_on(policy, &test_node())
}

/// `policy` over the test endpoints, with `node`'s facts.
pub fn snapshot_on(policy: &str, node: &dnsfence_policy::cidr::NodeFacts) -> Snapshot {
    let dir = write_dir(
        "policy",
        &[("policy.yaml", policy), ("endpoints.yaml", ENDPOINTS)],
    );
    let snapshot = dnsfence_policy::load_on(
        &[dir.join("policy.yaml")],
        Some(&dir.join("endpoints.yaml")),
        node,
    )
    .unwrap_or_else(|e| panic!("test policy: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    snapshot
}

pub fn test_snapshot() -> Snapshot {
    snapshot_of(POLICY)
}

pub fn deny_all_snapshot() -> Snapshot {
    snapshot_of(DENY_ALL)
}
