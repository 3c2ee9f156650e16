//! Helpers shared by the Kubernetes source's tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dnsfence_k8s::{CgroupDriver, ClusterState, K8sConfig, K8sSource};
use serde_json::{Value, json};

/// A source configuration for node `node`.
pub fn config(kubeconfig: &Path, node: &str) -> K8sConfig {
    K8sConfig {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        node_name: node.to_string(),
        cgroup_driver: CgroupDriver::Systemd,
        cgroup_prefix: String::new(),
        remote_pods: false,
        require_ips: false,
        optional_crds: false,
        cluster_name: "default".into(),
    }
}

/// A running pod on `node` with address `ip` and QoS class `qos`.
pub fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, qos: Option<&str>) -> Value {
    let mut status = json!({"phase": "Running"});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    if let Some(q) = qos {
        status["qosClass"] = json!(q);
    }
    json!({
        "metadata": {
            "name": name, "namespace": ns,
            "uid": format!("0000aaaa-0000-4000-8000-{name}"),
            "labels": {"app": name},
        },
        "spec": {"nodeName": node, "containers": [{"name": "c"}], "serviceAccountName": "sa"},
        "status": status,
    })
}

/// A namespace with labels.
pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

/// A CiliumNetworkPolicy allowing DNS lookups of `name` for `app: <app>`.
pub fn cnp(ns: &str, name: &str, app: &str, fqdn: &str) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": ns, "generation": 3,
            "finalizers": ["example.com/keep"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}],
            "annotations": {"a": "b"},
        },
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                "rules": {"dns": [{"matchName": fqdn}]}}]}],
        },
        "status": {"conditions": [{"type": "Valid", "status": "True"}]},
    })
}

/// The endpoints text as JSON.
pub fn endpoints_json(state: &ClusterState) -> Value {
    serde_json::from_str(&state.endpoints.1).expect("the endpoints text is JSON")
}

/// The endpoint `ns/name` of a state.
pub fn endpoint(state: &ClusterState, ns: &str, name: &str) -> Option<Value> {
    endpoints_json(state)["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name && e["namespace"] == ns)
        .cloned()
}

/// The endpoints text loaded by the policy loader, `services` left out (see
/// `load_full_endpoints`).
pub fn load_endpoints(state: &ClusterState) -> dnsfence_policy::Endpoints {
    let mut v = endpoints_json(state);
    v.as_object_mut().expect("an object").remove("services");
    let text = serde_json::to_string_pretty(&v).expect("JSON");
    dnsfence_policy::Endpoints::from_yaml(&state.endpoints.0, &text)
        .unwrap_or_else(|e| panic!("the loader rejects the endpoints text: {e}\n{text}"))
}

/// Every policy text loads; returns the policies.
pub fn load_policies(state: &ClusterState) -> Vec<dnsfence_policy::Policy> {
    let mut out = Vec::new();
    for (path, text) in &state.policies {
        match dnsfence_policy::parse_policy_file(path, text) {
            dnsfence_policy::FileVerdict::Valid(p) => out.extend(p),
            other => panic!("{}: {other:?}\n{text}", path.display()),
        }
    }
    out
}

/// The policy at `path`.
pub fn policy<'a>(state: &'a ClusterState, path: &str) -> Option<&'a str> {
    state
        .policies
        .iter()
        .find(|(p, _)| p == &PathBuf::from(path))
        .map(|(_, t)| &**t)
}

/// Polls `latest()` until a state satisfies `pred`; panics after `timeout`.
pub fn wait_state(
    src: &K8sSource,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&ClusterState) -> bool,
) -> ClusterState {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = src.latest() {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "no state with {what} within {timeout:?}; status {:?}; last state {:?}",
        src.status(),
        last.map(|s| s.endpoints.1)
    );
}

/// Waits until `pred` holds for the source's status.
pub fn wait_status(
    src: &K8sSource,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&dnsfence_k8s::K8sStatus) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pred(&src.status()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("status never had {what}: {:?}", src.status());
}
