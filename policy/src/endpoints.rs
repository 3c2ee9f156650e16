//! The endpoints file: workloads, their labels, and how their traffic is recognised.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use crate::error::{LoadError, LoadErrorKind, LoadErrors};
use crate::selector::{Labels, NAMESPACE_LABEL, normalize_key};
use crate::yaml::{self, Diag, index, join, line};

const FILE_FIELDS: &[&str] = &["endpoints", "services", "nodes"];
const NODE_FIELDS: &[&str] = &["name", "ips"];
const ENDPOINT_FIELDS: &[&str] = &["name", "namespace", "labels", "ips", "cgroup"];
const SERVICE_FIELDS: &[&str] = &["name", "namespace", "labels", "selector", "ips", "backends"];

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

/// A service: addresses that stand for the pods its selector picks (a Kubernetes Service's
/// ClusterIPs and the addresses of its EndpointSlices). Not a workload: its addresses never
/// identify a client. A `toEndpoints` selector reaches a service's addresses when it selects
/// every pod the service's selector can pick (`LabelSelector::selects_every`), so a DNS rule
/// written for `k8s-app: kube-dns` covers the kube-dns ClusterIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `name`, unique among services of its namespace.
    pub name: String,
    /// `namespace` (default `default`).
    pub namespace: String,
    /// The service's own `labels` (what `toServices.k8sServiceSelector` selects).
    pub labels: Labels,
    /// The labels its `selector` requires of its pods, plus `io.kubernetes.pod.namespace`:
    /// every pod behind it carries at least these. `None`: a service without a selector
    /// (its backends are whatever its EndpointSlices list), which no `toEndpoints` reaches
    /// (only `toServices` names it).
    pub selector: Option<Labels>,
    /// Its own addresses (ClusterIPs).
    pub ips: Vec<IpAddr>,
    /// The addresses of the pods behind it (EndpointSlices).
    pub backends: Vec<IpAddr>,
    /// Line of its entry.
    pub line: usize,
}

impl Service {
    /// Its addresses and its backends' addresses.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips.iter().chain(&self.backends).copied()
    }
}

/// Another node of the cluster (`toEntities: remote-node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `name`, unique.
    pub name: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// A validated endpoints file.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The endpoints, in file order.
    pub endpoints: Vec<Endpoint>,
    /// The services, in file order.
    pub services: Vec<Service>,
    /// The other nodes of the cluster, in file order.
    pub nodes: Vec<Node>,
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
        let (endpoints, services, nodes) = parse(
            &mut Diag {
                file,
                errors: &mut errors,
            },
            text,
        );
        errors.sort_by_key(|e| e.line);
        if errors.is_empty() {
            Ok(Endpoints {
                endpoints,
                services,
                nodes,
            })
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

fn parse(diag: &mut Diag<'_>, text: &str) -> (Vec<Endpoint>, Vec<Service>, Vec<Node>) {
    let docs = yaml::parse_documents(diag, text);
    let mut out = Vec::new();
    let mut services = Vec::new();
    let mut service_names: HashMap<(String, String), usize> = HashMap::new();
    let mut nodes = Vec::new();
    let mut names: HashMap<(String, String), usize> = HashMap::new();
    let mut ips: HashMap<IpAddr, (String, usize)> = HashMap::new();
    let mut cgroups: HashMap<String, (String, usize)> = HashMap::new();
    for doc in docs.iter().filter(|d| !yaml::is_null(d)) {
        let Some(fields) = diag.mapping(doc, "", FILE_FIELDS, "") else {
            continue;
        };
        if let Some(list) = fields.get_non_null("services") {
            parse_services(diag, list, &mut service_names, &mut services);
        }
        if let Some(list) = fields.get_non_null("nodes") {
            parse_nodes(diag, list, &mut nodes);
        }
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
            let name = name_of(diag, &f, item, &path);
            let namespace = namespace_of(diag, &f, &path);
            let mut labels = f
                .get_non_null("labels")
                .map(|l| label_map(diag, l, &join(&path, "labels")))
                .unwrap_or_default();
            let addrs = f
                .get_non_null("ips")
                .map(|list| addresses(diag, list, &join(&path, "ips")))
                .unwrap_or_default();
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
    (out, services, nodes)
}

/// The `nodes` list: the cluster's other nodes, names unique.
fn parse_nodes(diag: &mut Diag<'_>, list: &yaml::Node<'_>, out: &mut Vec<Node>) {
    let Some(items) = diag.sequence(list, "nodes") else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let path = index("nodes", i);
        let before = diag.errors.len();
        let Some(f) = diag.mapping(item, &path, NODE_FIELDS, "") else {
            continue;
        };
        let name = name_of(diag, &f, item, &path);
        let ips = f
            .get_non_null("ips")
            .map(|l| addresses(diag, l, &join(&path, "ips")))
            .unwrap_or_default();
        let Some(name) = name else { continue };
        if out.iter().any(|n: &Node| n.name == name) {
            diag.invalid(item, &join(&path, "name"), format!("duplicate node {name}"));
        }
        if diag.errors.len() != before {
            continue;
        }
        out.push(Node {
            name,
            ips: ips.into_iter().map(|(ip, _)| ip).collect(),
        });
    }
}

/// The required `name` of an entry (non-empty, no '/').
fn name_of(
    diag: &mut Diag<'_>,
    f: &yaml::Fields<'_, '_>,
    item: &yaml::Node<'_>,
    path: &str,
) -> Option<String> {
    let field = join(path, "name");
    match f.get("name") {
        None => {
            diag.push(line(item), LoadErrorKind::Missing { field });
            None
        }
        Some(n) => diag
            .string(n, &field)
            .filter(|s| valid_name(diag, n, &field, s)),
    }
}

/// The `namespace` of an entry (default `default`).
fn namespace_of(diag: &mut Diag<'_>, f: &yaml::Fields<'_, '_>, path: &str) -> Option<String> {
    match f.get_non_null("namespace") {
        None => Some("default".to_string()),
        Some(n) => diag
            .string(n, &join(path, "namespace"))
            .filter(|s| valid_name(diag, n, &join(path, "namespace"), s)),
    }
}

/// A map of labels (`k8s:` prefixes stripped); the namespace label is refused (it comes from
/// `namespace`), as are other sources (`reserved:`).
fn label_map(diag: &mut Diag<'_>, node: &yaml::Node<'_>, path: &str) -> Labels {
    let mut labels = Labels::new();
    for (k, v) in diag.string_map(node, path) {
        match normalize_key(&k) {
            Some(key) if !key.is_empty() && key != NAMESPACE_LABEL => {
                labels.insert(key.to_string(), v);
            }
            _ => diag.invalid(
                node,
                &join(path, &k),
                "invalid label key (the namespace label comes from `namespace`)",
            ),
        }
    }
    labels
}

/// A list of IP addresses, each with its node.
fn addresses<'n, 'a>(
    diag: &mut Diag<'_>,
    list: &'n yaml::Node<'a>,
    path: &str,
) -> Vec<(IpAddr, &'n yaml::Node<'a>)> {
    let mut addrs = Vec::new();
    for (j, ip_node) in diag
        .sequence(list, path)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let ip_path = index(path, j);
        let Some(text) = diag.string(ip_node, &ip_path) else {
            continue;
        };
        match text.trim().parse::<IpAddr>() {
            Ok(ip) => addrs.push((canonical_ip(ip), ip_node)),
            Err(_) => diag.invalid(ip_node, &ip_path, format!("invalid IP address {text:?}")),
        }
    }
    addrs
}

/// The `services` list. Services may share addresses with each other and with endpoints (a
/// pod behind a service is both); names are unique per namespace.
fn parse_services(
    diag: &mut Diag<'_>,
    list: &yaml::Node<'_>,
    names: &mut HashMap<(String, String), usize>,
    out: &mut Vec<Service>,
) {
    let Some(items) = diag.sequence(list, "services") else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let path = index("services", i);
        let before = diag.errors.len();
        let Some(f) = diag.mapping(item, &path, SERVICE_FIELDS, "") else {
            continue;
        };
        let name = name_of(diag, &f, item, &path);
        let namespace = namespace_of(diag, &f, &path);
        let labels = f
            .get_non_null("labels")
            .map(|l| label_map(diag, l, &join(&path, "labels")))
            .unwrap_or_default();
        // A service without a selector stands for no pods: only `toServices` reaches it.
        // An empty selector is refused rather than read as "every pod of the namespace".
        let selector = f.get_non_null("selector").map(|l| {
            let errors = diag.errors.len();
            let sel = label_map(diag, l, &join(&path, "selector"));
            if sel.is_empty() && diag.errors.len() == errors {
                diag.invalid(
                    l,
                    &join(&path, "selector"),
                    "an empty selector names no pods (leave it out for a service without one)",
                );
            }
            sel
        });
        let ips = f
            .get_non_null("ips")
            .map(|l| addresses(diag, l, &join(&path, "ips")))
            .unwrap_or_default();
        let backends = f
            .get_non_null("backends")
            .map(|l| addresses(diag, l, &join(&path, "backends")))
            .unwrap_or_default();
        let (Some(name), Some(namespace)) = (name, namespace) else {
            continue;
        };
        let entry_line = line(item);
        if let Some(first) = names.get(&(namespace.clone(), name.clone())) {
            let n = f.get("name").unwrap_or(item);
            diag.invalid(
                n,
                &join(&path, "name"),
                format!("duplicate service {namespace}/{name} (first at line {first})"),
            );
        } else {
            names.insert((namespace.clone(), name.clone()), entry_line);
        }
        if diag.errors.len() != before {
            continue;
        }
        let selector = selector.map(|mut selector| {
            selector.insert(NAMESPACE_LABEL.to_string(), namespace.clone());
            selector
        });
        out.push(Service {
            name,
            namespace,
            labels,
            selector,
            ips: ips.into_iter().map(|(ip, _)| ip).collect(),
            backends: backends.into_iter().map(|(ip, _)| ip).collect(),
            line: entry_line,
        });
    }
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
