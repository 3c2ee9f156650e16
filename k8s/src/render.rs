//! The pure part: a view of the cluster rendered as the texts dnsfence's policy loader reads.
//!
//! Every text is pretty JSON (the loader's YAML parser reads it; one field per line, so the
//! loader's line numbers point somewhere useful). The output depends only on the view and the
//! configuration, and is sorted, so an unchanged cluster renders byte-identical texts.

use dnsfence_policy::Endpoints;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};

use crate::{CgroupDriver, ClusterState, K8sConfig};

/// Path of the endpoints text in a [`ClusterState`].
pub const ENDPOINTS_PATH: &str = "k8s/endpoints";
/// Directory of the CiliumNetworkPolicy texts (`<dir>/<namespace>/<name>`).
pub const CNP_DIR: &str = "k8s/ciliumnetworkpolicies";
/// Directory of the CiliumClusterwideNetworkPolicy texts (`<dir>/<name>`).
pub const CCNP_DIR: &str = "k8s/ciliumclusterwidenetworkpolicies";

/// The label Cilium derives from a pod's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The label of every pod naming its cluster, as Cilium gives every endpoint (review
/// finding: a policy selecting by it selected no pod, which left them unrestricted).
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// The prefix of the labels Cilium derives from the pod's namespace's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The namespace label every endpoint gets from its `namespace` (the loader adds it).
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The objects a rendering reads: what the watchers' stores hold (in any order).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Pods (this node's, and others' when [`K8sConfig::remote_pods`]).
    pub pods: Vec<Arc<Pod>>,
    /// Namespaces (their labels become `io.cilium.k8s.namespace.labels.*` pod labels).
    pub namespaces: Vec<Arc<Namespace>>,
    /// Services.
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices (discovery.k8s.io/v1): the services' backends.
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// CiliumNetworkPolicy objects (cilium.io/v2).
    pub network_policies: Vec<Arc<DynamicObject>>,
    /// CiliumClusterwideNetworkPolicy objects (cilium.io/v2).
    pub clusterwide_policies: Vec<Arc<DynamicObject>>,
    /// Nodes: the others are `toEntities: remote-node`.
    pub nodes: Vec<Arc<Node>>,
}

/// What a rendering left out, so that the loader accepts the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderStats {
    /// Pod labels dropped: identity-spoofing keys (`io.kubernetes.pod.namespace`,
    /// `io.cilium.k8s.*`, `reserved:*`) and keys the loader cannot represent.
    pub dropped_labels: u64,
    /// Addresses dropped: claimed by a newer pod or another service, or not an IP address.
    pub dropped_ips: u64,
    /// cgroup paths dropped because another pod already had the same one.
    pub dropped_cgroups: u64,
    /// Pods left out: no usable address where one is required, or a duplicate name.
    pub dropped_pods: u64,
    /// Services left out: a selector on an identity key (a claim on another namespace's or
    /// service account's pods).
    pub dropped_services: u64,
    /// Entries (pods, services, nodes) the policy loader refused on their own, left out so
    /// that the rest loads (a rendering rule missed something: each one is a bug to report).
    pub refused_entries: u64,
    /// Whether the API has a Node named `K8sConfig::node_name` (else no pod is this node's,
    /// none gets a cgroup and none is enforced: a `--node-name` that is not the Node's name).
    pub local_node: bool,
}

/// A rendering: the texts (with generation 0) and what was left out.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The texts; `generation` is 0 (the source numbers what it publishes).
    pub state: ClusterState,
    /// What was left out.
    pub stats: RenderStats,
}

/// Renders `view` as the policy texts and the endpoints text.
pub fn render(view: &ClusterView, config: &K8sConfig) -> Rendered {
    let mut stats = RenderStats {
        local_node: view
            .nodes
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str())),
        ..RenderStats::default()
    };
    let mut policies = Vec::new();
    for obj in &view.network_policies {
        let ns = obj.metadata.namespace.as_deref().unwrap_or("default");
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        let path = PathBuf::from(format!("{CNP_DIR}/{ns}/{name}"));
        policies.push((path, policy_text(obj, "CiliumNetworkPolicy", Some(ns))));
    }
    for obj in &view.clusterwide_policies {
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        let path = PathBuf::from(format!("{CCNP_DIR}/{name}"));
        policies.push((
            path,
            policy_text(obj, "CiliumClusterwideNetworkPolicy", None),
        ));
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    policies.dedup_by(|a, b| a.0 == b.0);

    let endpoints = endpoints_value(view, config, &mut stats);
    let services = services_value(view, config, &mut stats);
    let nodes = nodes_value(view, config, &mut stats);
    let mut file = Map::new();
    file.insert("endpoints".into(), Value::Array(endpoints));
    file.insert("services".into(), Value::Array(services));
    file.insert("nodes".into(), Value::Array(nodes));
    let mut text = pretty(&Value::Object(file.clone()));
    // The loader refuses a registry text whole, and the agent then keeps its last registry:
    // one object a rendering rule missed must not freeze every workload's identity. So the
    // text is checked as the loader reads it, and on a refusal each entry is checked alone
    // and the ones refused are left out (counted).
    let path = Path::new(ENDPOINTS_PATH);
    if Endpoints::from_yaml(path, &text).is_err() {
        for (list, entries) in file.iter_mut() {
            let Value::Array(entries) = entries else {
                continue;
            };
            entries.retain(|entry| {
                let alone = pretty(&json!({ list.as_str(): [entry] }));
                let ok = Endpoints::from_yaml(path, &alone).is_ok();
                stats.refused_entries += u64::from(!ok);
                ok
            });
        }
        text = pretty(&Value::Object(file));
    }
    Rendered {
        state: ClusterState {
            policies,
            endpoints: (PathBuf::from(ENDPOINTS_PATH), text),
            generation: 0,
        },
        stats,
    }
}

/// The cluster's other nodes (`remote-node`): name and addresses (internal and external).
fn nodes_value(view: &ClusterView, config: &K8sConfig, stats: &mut RenderStats) -> Vec<Value> {
    let mut nodes: Vec<&Node> = view.nodes.iter().map(|n| &**n).collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Vec::new();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if name == config.node_name || !valid_name(name) {
            continue;
        }
        let mut ips = BTreeSet::new();
        for a in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        {
            match canonical_ip(&a.address) {
                Some(ip) => {
                    ips.insert(ip);
                }
                None => stats.dropped_ips += 1,
            }
        }
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        out.push(json!({"name": name, "ips": ips}));
    }
    out
}

fn pretty(value: &Value) -> Arc<str> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text.into()
}

/// A Cilium policy object as the loader wants it: type, name, namespace, `spec`, `specs`.
/// Every other metadata field, and `status`, is dropped.
fn policy_text(obj: &DynamicObject, kind: &str, namespace: Option<&str>) -> Arc<str> {
    let mut meta = Map::new();
    if let Some(name) = &obj.metadata.name {
        meta.insert("name".into(), Value::String(name.clone()));
    }
    if let Some(ns) = namespace {
        meta.insert("namespace".into(), Value::String(ns.to_string()));
    }
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), Value::String("cilium.io/v2".into()));
    doc.insert("kind".into(), Value::String(kind.into()));
    doc.insert("metadata".into(), Value::Object(meta));
    for field in ["spec", "specs"] {
        if let Some(v) = obj.data.get(field) {
            doc.insert(field.into(), v.clone());
        }
    }
    pretty(&Value::Object(doc))
}

/// Whether the loader accepts `key` as a label key. Kubernetes label keys never contain ':'
/// (the loader reads `src:key` as a Cilium label source), nor are they empty.
fn representable_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(':') && key.trim() == key
}

/// Keys a pod must not set itself: they would claim another identity.
fn spoofing_key(key: &str) -> bool {
    key == POD_NAMESPACE_LABEL || key.starts_with("io.cilium.k8s.") || key.starts_with("reserved:")
}

/// A name the loader accepts (non-empty, no '/', no surrounding spaces).
fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s.trim() == s
}

fn canonical_ip(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.trim().parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    })
}

/// The annotation the kubelet puts on the API's copy (the mirror pod) of a static pod: the
/// UID the kubelet runs that pod under (the manifest's hash unless it gives one), which names
/// its cgroup; the mirror pod's own UID names nothing on the node.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The static pod UID a mirror pod names, when it has a usable one (a UUID or the kubelet's
/// hex hash: at most 64 letters, digits, `-` or `_`).
pub fn mirror_uid(pod: &Pod) -> Option<&str> {
    let value = pod.metadata.annotations.as_ref()?.get(MIRROR_ANNOTATION)?;
    let usable = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    usable.then_some(value.as_str())
}

/// The pod's cgroup v2 path below the cgroup root (kubelet's layout), from its UID (a mirror
/// pod's: its static pod's, [`MIRROR_ANNOTATION`]) and QoS class; `None` without either.
pub fn pod_cgroup(pod: &Pod, config: &K8sConfig) -> Option<String> {
    // Review finding: a static pod on the pod network was rendered under its mirror pod's
    // UID, a cgroup that does not exist, and so ran unenforced.
    let has_mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    let uid = match (has_mirror, mirror_uid(pod)) {
        (_, Some(uid)) => uid,
        // Not one the kubelet writes (`trim_pod` keeps it empty): no cgroup rather than the
        // mirror pod's own UID's.
        (true, None) => return None,
        (false, None) => pod.metadata.uid.as_deref()?,
    };
    if uid.is_empty() || uid.contains('/') || uid == "." || uid == ".." {
        return None;
    }
    let qos = pod.status.as_ref()?.qos_class.as_deref()?;
    let qos = match qos {
        "Guaranteed" => None,
        "Burstable" => Some("burstable"),
        "BestEffort" => Some("besteffort"),
        _ => return None,
    };
    let path = match config.cgroup_driver {
        CgroupDriver::Systemd => {
            let uid = uid.replace('-', "_");
            match qos {
                None => format!("kubepods.slice/kubepods-pod{uid}.slice"),
                Some(q) => {
                    format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice")
                }
            }
        }
        CgroupDriver::Cgroupfs => match qos {
            None => format!("kubepods/pod{uid}"),
            Some(q) => format!("kubepods/{q}/pod{uid}"),
        },
    };
    let prefix = config.cgroup_prefix.trim_matches('/');
    Some(if prefix.is_empty() {
        path
    } else {
        format!("{prefix}/{path}")
    })
}

/// One pod on its way into the endpoints list.
struct Candidate<'a> {
    pod: &'a Pod,
    namespace: &'a str,
    name: &'a str,
    local: bool,
    created: Option<&'a Time>,
    ips: Vec<IpAddr>,
    /// A local pod's cgroup path.
    cgroup: Option<String>,
}

/// How strongly `pod` claims its cgroup, strongest first: by its own UID (0; a mirror value
/// equal to a real pod's UID is forged), as a mirror pod of `node` (owned by that Node, as the
/// kubelet makes them since Kubernetes 1.17) not being deleted (1), as one being deleted (2).
/// A mirror pod the Node does not own claims nothing: none the kubelet made.
fn claim(pod: &Pod, node: &str, node_uid: Option<&str>) -> Option<u8> {
    if mirror_uid(pod).is_none() {
        return Some(0);
    }
    let owned = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node" && o.name == node && node_uid.is_none_or(|uid| o.uid == uid));
    match (owned, pod.metadata.deletion_timestamp.is_none()) {
        (false, _) => None,
        (true, true) => Some(1),
        (true, false) => Some(2),
    }
}

/// Whether `pod` is an endpoint of its own: it has a spec, it is not on its node's network
/// (its address is then its node's: `host` / `remote-node` in Cilium), and it has not
/// finished.
fn is_endpoint(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.host_network != Some(true))
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

fn endpoints_value(view: &ClusterView, config: &K8sConfig, stats: &mut RenderStats) -> Vec<Value> {
    let ns_labels: HashMap<&str, &BTreeMap<String, String>> = view
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns.metadata.labels.as_ref()?)))
        .collect();

    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for pod in &view.pods {
        let pod: &Pod = pod;
        let Some(spec) = pod.spec.as_ref().filter(|_| is_endpoint(pod)) else {
            continue;
        };
        let status = pod.status.as_ref();
        let local = spec.node_name.as_deref() == Some(config.node_name.as_str());
        if !local && !config.remote_pods {
            continue;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = pod.metadata.name.as_deref() else {
            continue;
        };
        if !valid_name(namespace) || !valid_name(name) {
            stats.dropped_pods += 1;
            continue;
        }
        let mut texts: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|p| p.ip.as_str()).collect())
            .unwrap_or_default();
        if texts.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
        {
            texts.push(ip);
        }
        let mut ips = Vec::new();
        for t in texts {
            match canonical_ip(t) {
                Some(ip) if !ips.contains(&ip) => ips.push(ip),
                Some(_) => {}
                None => stats.dropped_ips += 1,
            }
        }
        candidates.push(Candidate {
            pod,
            namespace,
            name,
            local,
            created: pod.metadata.creation_timestamp.as_ref(),
            ips,
            cgroup: if local { pod_cgroup(pod, config) } else { None },
        });
    }
    // Deterministic order; a duplicate namespace/name (impossible in one cluster) keeps the
    // first.
    candidates.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    let before = candidates.len();
    candidates.dedup_by(|a, b| (a.namespace, a.name) == (b.namespace, b.name));
    stats.dropped_pods += (before - candidates.len()) as u64;

    // Each IP goes to its newest claimant (creation time, then namespace/name).
    let mut owner: HashMap<IpAddr, usize> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        for ip in &c.ips {
            owner
                .entry(*ip)
                .and_modify(|o| {
                    let cur = &candidates[*o];
                    if (c.created, c.namespace, c.name) > (cur.created, cur.namespace, cur.name) {
                        *o = i;
                    }
                })
                .or_insert(i);
        }
    }

    // A cgroup claimed twice: only a mirror annotation can name another pod's (UIDs are
    // unique), and anyone allowed to create a pod can write one (the kubelet deletes such a
    // pod, but a finalizer keeps it). The cgroup goes to the strongest claim (`claim`), then
    // the oldest, then by namespace/name; only among the entries that will be written, so
    // that a claim which is then left out does not leave the cgroup to nobody.
    let node_uid = view
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()))
        .and_then(|n| n.metadata.uid.as_deref());
    let mut cgroup_owner: HashMap<&str, usize> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        let Some(cg) = &c.cgroup else {
            continue;
        };
        if config.require_ips && !c.ips.iter().any(|ip| owner.get(ip) == Some(&i)) {
            continue;
        }
        if claim(c.pod, &config.node_name, node_uid).is_none() {
            continue;
        }
        let rank = |j: usize| {
            let c = &candidates[j];
            (
                claim(c.pod, &config.node_name, node_uid),
                c.created,
                c.namespace,
                c.name,
            )
        };
        cgroup_owner
            .entry(cg.as_str())
            .and_modify(|o| {
                if rank(i) < rank(*o) {
                    *o = i;
                }
            })
            .or_insert(i);
    }

    let mut out = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let before = c.ips.len();
        let ips: Vec<IpAddr> = c
            .ips
            .iter()
            .copied()
            .filter(|ip| owner.get(ip) == Some(&i))
            .collect();
        stats.dropped_ips += (before - ips.len()) as u64;
        if ips.is_empty() && (config.require_ips || !c.local) {
            continue;
        }
        let mut cgroup = c.cgroup.as_deref();
        if let Some(cg) = cgroup
            && cgroup_owner.get(cg) != Some(&i)
        {
            stats.dropped_cgroups += 1;
            cgroup = None;
        }
        if ips.is_empty() && cgroup.is_none() {
            // Nothing would recognise its traffic.
            stats.dropped_pods += 1;
            continue;
        }

        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in c.pod.metadata.labels.iter().flatten() {
            if spoofing_key(k) || !representable_key(k) {
                stats.dropped_labels += 1;
            } else {
                labels.insert(k.clone(), v.clone());
            }
        }
        let sa = c
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        labels.insert(SERVICE_ACCOUNT_LABEL.into(), sa.into());
        labels.insert(CLUSTER_LABEL.into(), config.cluster_name.clone());
        for (k, v) in ns_labels.get(c.namespace).copied().into_iter().flatten() {
            let key = format!("{NAMESPACE_LABELS_PREFIX}{k}");
            if representable_key(&key) {
                labels.insert(key, v.clone());
            } else {
                stats.dropped_labels += 1;
            }
        }

        let mut entry = Map::new();
        entry.insert("name".into(), json!(c.name));
        entry.insert("namespace".into(), json!(c.namespace));
        entry.insert("labels".into(), json!(labels));
        if !ips.is_empty() {
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            entry.insert("ips".into(), json!(ips));
        }
        if let Some(cg) = cgroup {
            entry.insert("cgroup".into(), json!(cg));
        }
        out.push(Value::Object(entry));
    }
    out
}

/// The `endpointslice.kubernetes.io/managed-by` value of the slices Kubernetes derives from a
/// service's selector: their addresses are the selected pods'.
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

fn services_value(view: &ClusterView, config: &K8sConfig, stats: &mut RenderStats) -> Vec<Value> {
    // The addresses of the pods in the view, by namespace and name: a selector service's
    // backend counts only as the address of the pod its slice names. A pod that is no
    // endpoint (host network: its address is its node's; finished) stands for no address
    // (review finding: a service backed by a host-network DaemonSet made its nodes'
    // addresses reachable by `toEndpoints`, every port with no `toPorts`; in Cilium those
    // are `host` / `remote-node`).
    let pod_ips: HashMap<(&str, &str), Vec<IpAddr>> = view
        .pods
        .iter()
        .filter_map(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap_or("default");
            let name = p.metadata.name.as_deref()?;
            let status = p.status.as_ref()?;
            let endpoint = is_endpoint(p);
            let ips = status
                .pod_ips
                .iter()
                .flatten()
                .map(|i| i.ip.as_str())
                .chain(status.pod_ip.as_deref())
                .filter_map(canonical_ip)
                .filter(|_| endpoint)
                .collect();
            Some(((ns, name), ips))
        })
        .collect();
    // Every node's addresses (this one's too): never a pod's, whatever a slice says (the
    // pod a slice names may be out of the view, with only this node's pods watched).
    let node_ips: HashSet<IpAddr> = view
        .nodes
        .iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter_map(|a| canonical_ip(&a.address))
        .collect();
    // Ready backend addresses per namespace/service name, and whether each may stand for a
    // pod the service selects: named by its slice as a Pod of the service's namespace, and
    // that pod's address when the pod is in the view (else, with only this node's pods
    // watched, a slice of the EndpointSlice controller). A slice anyone else wrote may list
    // any address as any pod.
    let mut backends: HashMap<(&str, &str), BTreeSet<(IpAddr, bool)>> = HashMap::new();
    for slice in &view.endpoint_slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let managed = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
            .is_some_and(|m| m == SLICE_CONTROLLER);
        let set = backends.entry((ns, service.as_str())).or_default();
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            // The pod this endpoint names, when it names one of the service's namespace.
            let pod = ep.target_ref.as_ref().and_then(|r| {
                let same_ns = r.namespace.as_deref().unwrap_or(ns) == ns;
                (r.kind.as_deref() == Some("Pod") && same_ns).then_some(r.name.as_deref()?)
            });
            for a in &ep.addresses {
                let Some(ip) = canonical_ip(a) else {
                    stats.dropped_ips += 1;
                    continue;
                };
                let of_pod = !node_ips.contains(&ip)
                    && match pod.map(|name| pod_ips.get(&(ns, name))) {
                        None => false,
                        Some(Some(ips)) => ips.contains(&ip),
                        // The pod is not in the view: only this node's pods are watched.
                        Some(None) => managed && !config.remote_pods,
                    };
                set.insert((ip, of_pod));
            }
        }
    }

    let mut services: Vec<&Service> = view.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut seen_names = HashSet::new();
    let mut seen_ips: HashSet<IpAddr> = HashSet::new();
    let mut out = Vec::new();
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = svc.metadata.name.as_deref() else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        // Without a selector the service stands for no pods: `toServices` may name it, no
        // `toEndpoints` reaches it (the loader knows it by the missing `selector`).
        let selector = spec.selector.as_ref().filter(|s| !s.is_empty());
        if !valid_name(ns) || !valid_name(name) || !seen_names.insert((ns, name)) {
            continue;
        }
        let mut ip_texts: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if ip_texts.is_empty()
            && let Some(ip) = spec.cluster_ip.as_deref()
        {
            ip_texts.push(ip);
        }
        let mut ips = Vec::new();
        for t in ip_texts {
            if t == "None" || t.is_empty() {
                continue;
            }
            match canonical_ip(t) {
                Some(ip) if seen_ips.insert(ip) => ips.push(ip.to_string()),
                _ => stats.dropped_ips += 1,
            }
        }
        // A service with a selector stands for its pods (`toEndpoints` reaches its addresses
        // by its selector): only the controller's slices, which list the selected pods. A
        // slice written by hand beside it could name any address.
        let mut backends: Vec<String> = backends
            .get(&(ns, name))
            .into_iter()
            .flatten()
            .filter(|&&(_, of_pod)| {
                let keep = of_pod || selector.is_none();
                if !keep {
                    stats.dropped_ips += 1;
                }
                keep
            })
            .map(|(ip, _)| ip.to_string())
            .collect();
        backends.dedup();
        if ips.is_empty() && backends.is_empty() {
            continue;
        }
        let clean = |m: Option<&BTreeMap<String, String>>, stats: &mut RenderStats| {
            let mut out = BTreeMap::new();
            for (k, v) in m.into_iter().flatten() {
                if representable_key(k) && !spoofing_key(k) {
                    out.insert(k.clone(), v.clone());
                } else {
                    stats.dropped_labels += 1;
                }
            }
            out
        };
        // A selector on a key the loader keeps for identity (the namespace, Cilium's derived
        // labels) names pods by labels their owners set themselves: a service claiming
        // another namespace's or a service account's pods. It is left out whole (stripping
        // the key would widen what it stands for).
        if let Some(sel) = selector
            && sel.keys().any(|k| !representable_key(k) || spoofing_key(k))
        {
            stats.dropped_services += 1;
            continue;
        }
        let labels = clean(svc.metadata.labels.as_ref(), stats);
        let mut entry = Map::new();
        entry.insert("name".into(), json!(name));
        entry.insert("namespace".into(), json!(ns));
        entry.insert("labels".into(), json!(labels));
        if let Some(selector) = selector {
            let mut selector = clean(Some(selector), stats);
            if selector.is_empty() {
                // Every key unrepresentable: it stands for pods nobody can name here.
                continue;
            }
            // Every pod it selects carries its cluster's name: a `toEndpoints` naming the
            // cluster label selects every pod of the service, so it reaches the service's
            // address too (review: a ClusterMesh-style DNS rule refused every query sent
            // to kube-dns's ClusterIP).
            selector.insert(CLUSTER_LABEL.into(), config.cluster_name.clone());
            entry.insert("selector".into(), json!(selector));
        }
        if !ips.is_empty() {
            entry.insert("ips".into(), json!(ips));
        }
        if !backends.is_empty() {
            entry.insert("backends".into(), json!(backends));
        }
        out.push(Value::Object(entry));
    }
    out
}
