//! The pure rendering: views built in memory, texts checked with the policy loader.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use dnsfence_k8s::k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use dnsfence_k8s::k8s_openapi::api::discovery::v1::EndpointSlice;
use dnsfence_k8s::kube::api::DynamicObject;
use dnsfence_k8s::{CgroupDriver, ClusterView, K8sConfig, MIRROR_ANNOTATION, pod_cgroup, render};
use serde_json::{Value, json};

fn cfg() -> K8sConfig {
    config(Path::new("/nonexistent"), "n1")
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).expect("a valid object"))
}

#[test]
fn cgroup_paths_per_driver_and_qos() {
    let mut p = pod("ns", "p", "n1", Some("10.0.0.1"), Some("Guaranteed"));
    p["metadata"]["uid"] = json!("aa-bb");
    let mut c = cfg();
    let cases = [
        (
            "Guaranteed",
            "kubepods.slice/kubepods-podaa_bb.slice",
            "kubepods/podaa-bb",
        ),
        (
            "Burstable",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaa_bb.slice",
            "kubepods/burstable/podaa-bb",
        ),
        (
            "BestEffort",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podaa_bb.slice",
            "kubepods/besteffort/podaa-bb",
        ),
    ];
    for (qos, systemd, cgroupfs) in cases {
        p["status"]["qosClass"] = json!(qos);
        let pod: Arc<Pod> = typed(p.clone());
        c.cgroup_driver = CgroupDriver::Systemd;
        c.cgroup_prefix = String::new();
        assert_eq!(pod_cgroup(&pod, &c).as_deref(), Some(systemd));
        c.cgroup_driver = CgroupDriver::Cgroupfs;
        assert_eq!(pod_cgroup(&pod, &c).as_deref(), Some(cgroupfs));
        c.cgroup_prefix = "a/b".into();
        assert_eq!(
            pod_cgroup(&pod, &c).as_deref(),
            Some(format!("a/b/{cgroupfs}").as_str())
        );
    }
    p["status"].as_object_mut().unwrap().remove("qosClass");
    assert_eq!(
        pod_cgroup(&typed(p), &c),
        None,
        "no QoS class yet: no cgroup"
    );
}

/// A static pod runs under the UID its mirror pod's annotation names (the manifest's hash),
/// not the mirror pod's own: its cgroup was a path that does not exist, so it ran unenforced.
/// A pod that forges the annotation (anyone who may create pods can) takes no cgroup from a
/// pod that claims it by its own UID, nor from the node's mirror pod, even when older.
#[test]
fn a_mirror_pod_names_its_static_pods_cgroup_and_a_forgery_takes_none() {
    let cg = |uid: &str| {
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice")
    };
    let mirror = |ns: &str, name: &str, uid: &str, created: &str, owned: bool| {
        let mut p = pod(ns, name, "n1", None, Some("Burstable"));
        p["metadata"]["annotations"] = json!({MIRROR_ANNOTATION: uid, "other": "x"});
        p["metadata"]["creationTimestamp"] = json!(created);
        if owned {
            p["metadata"]["ownerReferences"] =
                json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "node-uid-1"}]);
        }
        p
    };
    let node = typed::<dnsfence_k8s::k8s_openapi::api::core::v1::Node>(
        json!({"metadata": {"name": "n1", "uid": "node-uid-1"}}),
    );
    let hash = "d41d8cd98f00b204e9800998ecf8427e";
    let real = mirror(
        "kube-system",
        "proxy-n1",
        hash,
        "2025-01-02T00:00:00Z",
        true,
    );
    assert_eq!(pod_cgroup(&typed(real.clone()), &cfg()), Some(cg(hash)));
    // Older, sorted first, owned by a Node of that name but not this one's UID.
    let mut forged = mirror("a", "forged", hash, "2025-01-01T00:00:00Z", true);
    forged["metadata"]["ownerReferences"][0]["uid"] = json!("other");
    // Older still, and owned by no Node: no kubelet made it.
    let unowned = mirror("a", "unowned", hash, "2020-01-01T00:00:00Z", false);
    // A running pod, and an older forgery naming its UID.
    let victim = pod("prod", "victim", "n1", Some("10.0.0.3"), Some("Burstable"));
    let victim_uid = victim["metadata"]["uid"].as_str().unwrap().to_string();
    let thief = mirror("a", "thief", &victim_uid, "2024-01-01T00:00:00Z", true);
    let view = ClusterView {
        pods: vec![
            typed(forged),
            typed(real),
            typed(thief),
            typed(victim),
            typed(unowned),
        ],
        nodes: vec![node],
        ..Default::default()
    };
    let r = render(&view, &cfg());
    let s = &r.state;
    assert_eq!(
        endpoint(s, "kube-system", "proxy-n1").unwrap()["cgroup"],
        json!(cg(hash))
    );
    let victim_cg = cg(&victim_uid.replace('-', "_"));
    assert_eq!(
        endpoint(s, "prod", "victim").unwrap()["cgroup"],
        json!(victim_cg)
    );
    // Without a cgroup or an address of their own, the forgeries are nothing.
    assert!(endpoint(s, "a", "forged").is_none());
    assert!(endpoint(s, "a", "thief").is_none());
    assert!(endpoint(s, "a", "unowned").is_none());
    assert_eq!(r.stats.dropped_cgroups, 3);
    // Alone, a mirror pod no Node owns still gets no cgroup.
    let alone = ClusterView {
        pods: vec![typed(mirror(
            "a",
            "unowned",
            hash,
            "2020-01-01T00:00:00Z",
            false,
        ))],
        ..Default::default()
    };
    assert!(endpoint(&render(&alone, &cfg()).state, "a", "unowned").is_none());
    load_endpoints(s);

    // A value the kubelet never writes names no cgroup, and is not kept.
    let mut odd = mirror("a", "odd", &"a".repeat(65), "2025-01-01T00:00:00Z", true);
    assert_eq!(pod_cgroup(&typed(odd.clone()), &cfg()), None);
    odd["metadata"]["annotations"][MIRROR_ANNOTATION] = json!("../x");
    let mut odd: Pod = typed::<Pod>(odd).as_ref().clone();
    assert_eq!(pod_cgroup(&odd, &cfg()), None);
    dnsfence_k8s::trim_pod(&mut odd);
    let kept = [(MIRROR_ANNOTATION.to_string(), String::new())].into();
    assert_eq!(odd.metadata.annotations, Some(kept));
    assert_eq!(pod_cgroup(&odd, &cfg()), None);
}

#[test]
fn an_ip_claimed_twice_goes_to_the_newest_pod() {
    let mut old = pod("ns", "old", "n1", Some("10.0.0.1"), Some("Burstable"));
    old["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    let mut new = pod("ns", "new", "n1", Some("10.0.0.1"), Some("Burstable"));
    new["metadata"]["creationTimestamp"] = json!("2025-01-02T00:00:00Z");
    let mut remote = pod("ns", "remote", "n2", Some("::ffff:10.0.0.1"), None);
    remote["metadata"]["creationTimestamp"] = json!("2024-01-02T00:00:00Z");
    let view = ClusterView {
        pods: vec![typed(new), typed(old), typed(remote)],
        ..Default::default()
    };
    let mut c = cfg();
    c.remote_pods = true;
    let r = render(&view, &c);
    let s = &r.state;
    assert_eq!(
        endpoint(s, "ns", "new").unwrap()["ips"],
        json!(["10.0.0.1"])
    );
    let old = endpoint(s, "ns", "old").expect("kept by its cgroup");
    assert!(old.get("ips").is_none());
    assert!(
        endpoint(s, "ns", "remote").is_none(),
        "a remote pod without an IP is nothing"
    );
    assert_eq!(r.stats.dropped_ips, 2);
    load_endpoints(s);

    c.require_ips = true;
    let s = render(&view, &c).state;
    assert!(
        endpoint(&s, "ns", "old").is_none(),
        "require_ips: no IP, no endpoint"
    );
}

#[test]
fn rendering_is_deterministic_and_drops_policy_metadata() {
    let pods: Vec<Arc<Pod>> = (0..20)
        .map(|i| {
            typed(pod(
                "ns",
                &format!("p{i}"),
                "n1",
                Some(&format!("10.0.0.{i}")),
                Some("Burstable"),
            ))
        })
        .collect();
    let mut policy = cnp("ns", "p", "x", "a.example");
    policy["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    policy["metadata"]["managedFields"] = json!([{"manager": "kubectl"}]);
    let view = ClusterView {
        pods: pods.clone(),
        network_policies: vec![typed::<DynamicObject>(policy)],
        ..Default::default()
    };
    let mut reversed = view.clone();
    reversed.pods.reverse();
    let a = render(&view, &cfg()).state;
    let b = render(&reversed, &cfg()).state;
    assert_eq!(a, b);
    let text = &a.policies[0].1;
    assert!(!text.contains("deletionTimestamp") && !text.contains("managedFields"));
    assert!(text.lines().count() > 10, "one field per line:\n{text}");
    load_policies(&a);
}

/// A random view: overlapping IPs, shared UIDs, odd labels, every phase and QoS.
fn random_view(rng: &mut fastrand::Rng) -> ClusterView {
    let nss = ["default", "kube-system", "prod"];
    let mut view = ClusterView::default();
    for ns in nss {
        let mut labels = serde_json::Map::new();
        for _ in 0..rng.usize(0..3) {
            labels.insert(
                format!("k{}", rng.u8(0..4)),
                json!(format!("v{}", rng.u8(0..3))),
            );
        }
        if rng.bool() {
            labels.insert("example.com/tier".into(), json!(""));
        }
        view.namespaces
            .push(typed::<Namespace>(namespace(ns, Value::Object(labels))));
    }
    for i in 0..rng.usize(0..30) {
        let ns = nss[rng.usize(0..nss.len())];
        let ip = match rng.u8(0..4) {
            0 => None,
            1 => Some(format!("10.0.0.{}", rng.u8(0..8))),
            2 => Some(format!("::ffff:10.0.0.{}", rng.u8(0..8))),
            _ => Some(format!("fd00::{}", rng.u8(0..8))),
        };
        let qos = ["Guaranteed", "Burstable", "BestEffort", "Weird"];
        let qos = rng.bool().then(|| qos[rng.usize(0..qos.len())]);
        let node = if rng.u8(0..3) == 0 { "n2" } else { "n1" };
        let mut p = pod(ns, &format!("p{}", rng.u8(0..20)), node, ip.as_deref(), qos);
        p["metadata"]["uid"] = json!(format!("uid-{}", rng.u8(0..10)));
        if rng.u8(0..4) == 0 {
            p["metadata"]["annotations"] =
                json!({MIRROR_ANNOTATION: format!("uid-{}", rng.u8(0..10))});
        }
        p["metadata"]["creationTimestamp"] =
            json!(format!("2025-01-01T00:00:{:02}Z", rng.u8(0..60)));
        let phases = ["Running", "Pending", "Succeeded", "Failed"];
        p["status"]["phase"] = json!(phases[rng.usize(0..phases.len())]);
        if rng.u8(0..8) == 0 {
            p["spec"]["hostNetwork"] = json!(true);
        }
        let keys = [
            "app",
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.policy.serviceaccount",
            "io.cilium.k8s.policy.cluster",
            "io.cilium.k8s.namespace.labels.k1",
            "example.com/role",
            "a",
        ];
        let mut labels = serde_json::Map::new();
        for _ in 0..rng.usize(0..4) {
            labels.insert(keys[rng.usize(0..keys.len())].into(), json!(format!("{i}")));
        }
        p["metadata"]["labels"] = Value::Object(labels);
        if rng.bool() {
            p["status"]["podIPs"] = json!([{"ip": "10.1.0.1"}, {"ip": "fd00::1"}]);
        }
        view.pods.push(typed(p));
    }
    for i in 0..rng.usize(0..6) {
        let ns = nss[rng.usize(0..nss.len())];
        let ip = format!("10.96.0.{}", rng.u8(0..4));
        view.services.push(typed::<Service>(json!({
            "metadata": {"name": format!("s{i}"), "namespace": ns, "labels": {"a": "b"}},
            "spec": {"selector": {"app": "x"}, "clusterIP": ip, "clusterIPs": [ip]},
        })));
        view.endpoint_slices.push(typed::<EndpointSlice>(json!({
            "metadata": {"name": format!("s{i}-x"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.0.0.{}", rng.u8(0..8))],
                           "conditions": {"ready": rng.bool()}}],
        })));
    }
    view
}

/// What the stores keep of a pod (`trim_pod`: no managed fields, annotations, containers,
/// volumes, conditions...) renders exactly as the whole pod (review finding: whole objects
/// were kept, a memory attack on every node's agent).
#[test]
fn trimmed_pods_render_as_whole_ones() {
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..200 {
        let view = random_view(&mut rng);
        let mut trimmed = view.clone();
        trimmed.pods = view
            .pods
            .iter()
            .map(|p| {
                let mut p = (**p).clone();
                let mirror = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(MIRROR_ANNOTATION))
                    .cloned();
                p.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert("big".to_string(), "x".repeat(1000));
                dnsfence_k8s::trim_pod(&mut p);
                let kept = mirror.map(|m| [(MIRROR_ANNOTATION.to_string(), m)].into());
                assert_eq!(p.metadata.annotations, kept);
                Arc::new(p)
            })
            .collect();
        let mut c = cfg();
        c.remote_pods = rng.bool();
        let whole = render(&view, &c);
        let kept = render(&trimmed, &c);
        assert_eq!(whole.state, kept.state, "round {round}");
        assert_eq!(whole.stats, kept.stats, "round {round}");
    }
}

#[test]
fn random_views_always_load() {
    let mut rng = fastrand::Rng::with_seed(9);
    for round in 0..300 {
        let view = random_view(&mut rng);
        let mut c = cfg();
        c.remote_pods = rng.bool();
        c.require_ips = rng.bool();
        c.cgroup_driver = if rng.bool() {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        let r = render(&view, &c);
        let loaded = load_endpoints(&r.state);
        for e in &loaded.endpoints {
            assert!(
                !e.labels.keys().any(|k| k.starts_with("io.cilium.k8s.")
                    && !k.starts_with("io.cilium.k8s.namespace.labels.")
                    && k != "io.cilium.k8s.policy.serviceaccount"
                    && k != "io.cilium.k8s.policy.cluster"),
                "round {round}: spoofed label kept: {:?}",
                e.labels
            );
            assert_eq!(
                e.labels
                    .get("io.cilium.k8s.policy.cluster")
                    .map(String::as_str),
                Some("default"),
                "round {round}: every pod carries its cluster's name"
            );
            assert!(
                e.cgroup.is_some() || !e.ips.is_empty(),
                "round {round}: an endpoint nothing recognises"
            );
        }
        assert_eq!(render(&view, &c).state, r.state, "deterministic");
    }
}

/// The full endpoints text, `services` included: every rendering loads.
#[test]
fn random_views_always_load_with_services() {
    let mut rng = fastrand::Rng::with_seed(10);
    for _ in 0..300 {
        let view = random_view(&mut rng);
        let mut c = cfg();
        c.remote_pods = rng.bool();
        let r = render(&view, &c);
        if let Err(e) =
            dnsfence_policy::Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1)
        {
            panic!("{e}\n{}", r.state.endpoints.1);
        }
    }
}
