//! The endpoints file: workloads, their labels, and how their traffic is recognised.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use crate::error::{LoadError, LoadErrorKind, LoadErrors};
use crate::selector::{Labels, NAMESPACE_LABEL, normalize_key};
use crate::yaml::{self, Diag, index, join, line};

const FILE_FIELDS: &[&str] = &["endpoints"];
const ENDPOINT_FIELDS: &[&str] = &["name", "namespace", "labels", "ips", "cgroup"];

/// One workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `name`, unique within its namespace.
    pub name: String,
    /// `namespace` (default `default`).
    pub namespace: String,
    /// `labels` (without `k8s:` prefixes), plus `io.kubernetes.pod.namespace`.
    pub labels: Labels,
    /// Source addresses (IPv4-mapped IPv6 stored as IPv4).
    pub ips: Vec<IpAddr>,
    /// cgroup v2 path below the cgroup root, without leading or trailing `/`.
    pub cgroup: Option<String>,
    /// Line of its entry.
    pub line: usize,
}

/// A validated endpoints file.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The endpoints, in file order.
    pub endpoints: Vec<Endpoint>,
}

impl Endpoints {
    /// Reads and validates an endpoints file; every problem is collected.
    pub fn load(path: &Path) -> Result<Endpoints, LoadErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Endpoints::from_yaml(path, &text),
            Err(e) => Err(LoadErrors(vec![LoadError::new(
                path,
                0,
                LoadErrorKind::Io(e.to_string()),
            )])),
        }
    }

    /// Parses `text` as if read from `file`.
    pub fn from_yaml(file: &Path, text: &str) -> Result<Endpoints, LoadErrors> {
        if let Some(empty) = crate::policy::empty_file(file, text) {
            return Err(LoadErrors(vec![empty]));
        }
        let mut errors = Vec::new();
        let endpoints = parse(
            &mut Diag {
                file,
                errors: &mut errors,
            },
            text,
        );
        errors.sort_by_key(|e| e.line);
        if errors.is_empty() {
            Ok(Endpoints { endpoints })
        } else {
            Err(LoadErrors(errors))
        }
    }
}

/// Canonical form of a source address: IPv4-mapped IPv6 becomes IPv4.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A cgroup path without leading or trailing slashes (`/a/b/` → `a/b`).
pub(crate) fn canonical_cgroup(path: &str) -> &str {
    path.trim_matches('/')
}

fn parse(diag: &mut Diag<'_>, text: &str) -> Vec<Endpoint> {
    let docs = yaml::parse_documents(diag, text);
    let mut out = Vec::new();
    let mut names: HashMap<(String, String), usize> = HashMap::new();
    let mut ips: HashMap<IpAddr, (String, usize)> = HashMap::new();
    let mut cgroups: HashMap<String, (String, usize)> = HashMap::new();
    for doc in docs.iter().filter(|d| !yaml::is_null(d)) {
        let Some(fields) = diag.mapping(doc, "", FILE_FIELDS, "") else {
            continue;
        };
        let Some(list) = fields.get_non_null("endpoints") else {
            continue;
        };
        let Some(items) = diag.sequence(list, "endpoints") else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let path = index("endpoints", i);
            let before = diag.errors.len();
            let Some(f) = diag.mapping(item, &path, ENDPOINT_FIELDS, "") else {
                continue;
            };
            let name = match f.get("name") {
                None => {
                    diag.push(
                        line(item),
                        LoadErrorKind::Missing {
                            field: join(&path, "name"),
                        },
                    );
                    None
                }
                Some(n) => diag
                    .string(n, &join(&path, "name"))
                    .filter(|s| valid_name(diag, n, &join(&path, "name"), s)),
            };
            let namespace = match f.get_non_null("namespace") {
                None => Some("default".to_string()),
                Some(n) => diag
                    .string(n, &join(&path, "namespace"))
                    .filter(|s| valid_name(diag, n, &join(&path, "namespace"), s)),
            };
            let mut labels = Labels::new();
            if let Some(l) = f.get_non_null("labels") {
                let lpath = join(&path, "labels");
                for (k, v) in diag.string_map(l, &lpath) {
                    match normalize_key(&k) {
                        Some(key) if !key.is_empty() && key != NAMESPACE_LABEL => {
                            labels.insert(key.to_string(), v);
                        }
                        _ => diag.invalid(
                            l,
                            &join(&lpath, &k),
                            "invalid label key (the namespace label comes from `namespace`)",
                        ),
                    }
                }
            }
            let mut addrs = Vec::new();
            if let Some(list) = f.get_non_null("ips") {
                let ips_path = join(&path, "ips");
                for (j, ip_node) in diag
                    .sequence(list, &ips_path)
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    let ip_path = index(&ips_path, j);
                    let Some(text) = diag.string(ip_node, &ip_path) else {
                        continue;
                    };
                    match text.trim().parse::<IpAddr>() {
                        Ok(ip) => addrs.push((canonical_ip(ip), ip_node)),
                        Err(_) => {
                            diag.invalid(ip_node, &ip_path, format!("invalid IP address {text:?}"))
                        }
                    }
                }
            }
            let cgroup = f.get_non_null("cgroup").and_then(|c| {
                let cpath = join(&path, "cgroup");
                let text = diag.string(c, &cpath)?;
                let canon = canonical_cgroup(&text);
                if canon.is_empty()
                    || canon
                        .split('/')
                        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
                {
                    diag.invalid(c, &cpath, format!("invalid cgroup path {text:?}"));
                    return None;
                }
                Some((canon.to_string(), c))
            });
            let (Some(name), Some(namespace)) = (name, namespace) else {
                continue;
            };
            let full = format!("{namespace}/{name}");
            let entry_line = line(item);
            if let Some(first) = names.get(&(namespace.clone(), name.clone())) {
                let n = f.get("name").unwrap_or(item);
                diag.invalid(
                    n,
                    &join(&path, "name"),
                    format!("duplicate endpoint {full} (first at line {first})"),
                );
            } else {
                names.insert((namespace.clone(), name.clone()), entry_line);
            }
            for (ip, node) in &addrs {
                if let Some((owner, first)) = ips.get(ip) {
                    diag.invalid(
                        node,
                        &join(&path, "ips"),
                        format!(
                            "duplicate IP address {ip}: already used by {owner} (line {first})"
                        ),
                    );
                } else {
                    ips.insert(*ip, (full.clone(), line(node)));
                }
            }
            if let Some((cg, node)) = &cgroup {
                if let Some((owner, first)) = cgroups.get(cg) {
                    diag.invalid(
                        node,
                        &join(&path, "cgroup"),
                        format!("duplicate cgroup /{cg}: already used by {owner} (line {first})"),
                    );
                } else {
                    cgroups.insert(cg.clone(), (full.clone(), line(node)));
                }
            }
            if diag.errors.len() != before {
                continue;
            }
            labels.insert(NAMESPACE_LABEL.to_string(), namespace.clone());
            out.push(Endpoint {
                name,
                namespace,
                labels,
                ips: addrs.into_iter().map(|(ip, _)| ip).collect(),
                cgroup: cgroup.map(|(c, _)| c),
                line: entry_line,
            });
        }
    }
    out
}

fn valid_name(diag: &mut Diag<'_>, node: &yaml::Node<'_>, field: &str, s: &str) -> bool {
    if s.is_empty() || s.contains('/') || s.trim() != s {
        diag.invalid(
            node,
            field,
            format!("invalid name {s:?} (non-empty, no '/', no spaces around)"),
        );
        false
    } else {
        true
    }
}
