//! The Kubernetes source against the fake API server (real kube-rs LIST and WATCH).

mod common;

use std::time::{Duration, Instant};

use common::*;
use dnsfence_k8s::{CgroupDriver, K8sSource};
use dnsfence_testkit::kube::{FakeApi, Res};
use serde_json::json;

const SYNC: Duration = Duration::from_secs(10);
/// A change must show within this.
const CHANGE: Duration = Duration::from_secs(2);

fn cluster() -> (FakeApi, tempfile::TempDir) {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().expect("temp dir");
    api.kubeconfig(dir.path());
    (api, dir)
}

#[test]
fn initial_sync_renders_pods_namespaces_and_policies() {
    let (api, dir) = cluster();
    api.apply(
        Res::Namespaces,
        namespace(
            "prod",
            json!({"team": "a", "kubernetes.io/metadata.name": "prod"}),
        ),
    );
    api.apply(
        Res::Pods,
        pod(
            "prod",
            "guaranteed",
            "n1",
            Some("10.0.0.1"),
            Some("Guaranteed"),
        ),
    );
    let mut burst = pod("prod", "burst", "n1", Some("10.0.0.2"), Some("Burstable"));
    burst["metadata"]["uid"] = json!("1234-abcd-5678");
    burst["metadata"]["labels"] = json!({
        "app": "burst",
        "io.kubernetes.pod.namespace": "kube-system",
        "io.cilium.k8s.policy.serviceaccount": "admin",
        "io.cilium.k8s.namespace.labels.team": "root",
    });
    api.apply(Res::Pods, burst);
    let mut besteffort = pod("prod", "be", "n1", Some("10.0.0.3"), Some("BestEffort"));
    besteffort["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccountName");
    api.apply(Res::Pods, besteffort);
    api.apply(Res::Pods, pod("prod", "fresh", "n1", None, None));
    let mut host = pod(
        "prod",
        "hostnet",
        "n1",
        Some("192.168.1.1"),
        Some("BestEffort"),
    );
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(Res::Pods, host);
    let mut done = pod("prod", "done", "n1", Some("10.0.0.9"), Some("BestEffort"));
    done["status"]["phase"] = json!("Succeeded");
    api.apply(Res::Pods, done);
    api.apply(
        Res::Pods,
        pod("prod", "remote", "n2", Some("10.0.1.1"), Some("Burstable")),
    );
    api.apply(
        Res::Pods,
        pod("prod", "remote-noip", "n2", None, Some("Burstable")),
    );
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("prod", "dns", "burst", "example.com"),
    );
    let mut ccnp = cnp("", "everyone", "guaranteed", "example.org");
    ccnp["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    api.apply(Res::CiliumClusterwideNetworkPolicies, ccnp);

    // This node only, systemd driver.
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let state = src.wait_synced(SYNC).expect("synced");
    assert_eq!(state.generation, 1);
    assert!(
        src.status().synced && src.status().connected,
        "{:?}",
        src.status()
    );
    println!("requests: {:#?}", api.requests());
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dn1")),
        "the pod list is limited to this node: {:?}",
        api.requests()
    );
    let g = endpoint(&state, "prod", "guaranteed").expect("guaranteed pod");
    assert_eq!(
        g["cgroup"],
        "kubepods.slice/kubepods-pod0000aaaa_0000_4000_8000_guaranteed.slice"
    );
    assert_eq!(g["ips"], json!(["10.0.0.1"]));
    assert_eq!(g["labels"]["io.cilium.k8s.namespace.labels.team"], "a");
    assert_eq!(
        g["labels"]["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"],
        "prod"
    );
    assert_eq!(g["labels"]["io.cilium.k8s.policy.serviceaccount"], "sa");
    let b = endpoint(&state, "prod", "burst").expect("burstable pod");
    assert_eq!(
        b["cgroup"],
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd_5678.slice"
    );
    assert_eq!(
        b["labels"],
        json!({
            "app": "burst",
            "io.cilium.k8s.policy.serviceaccount": "sa",
            "io.cilium.k8s.policy.cluster": "default",
            "io.cilium.k8s.namespace.labels.team": "a",
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
        }),
        "spoofing labels dropped"
    );
    let be = endpoint(&state, "prod", "be").expect("best-effort pod");
    assert_eq!(
        be["cgroup"],
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0000aaaa_0000_4000_8000_be.slice"
    );
    assert_eq!(
        be["labels"]["io.cilium.k8s.policy.serviceaccount"],
        "default"
    );
    assert!(
        endpoint(&state, "prod", "fresh").is_none(),
        "no IP and no QoS class yet: nothing"
    );
    assert!(
        endpoint(&state, "prod", "hostnet").is_none(),
        "hostNetwork pod skipped"
    );
    assert!(
        endpoint(&state, "prod", "done").is_none(),
        "Succeeded pod skipped"
    );
    assert!(
        endpoint(&state, "prod", "remote").is_none(),
        "not this node's"
    );
    assert!(src.status().render.dropped_labels >= 3);

    let loaded = load_endpoints(&state);
    let burst = loaded.endpoints.iter().find(|e| e.name == "burst").unwrap();
    assert_eq!(burst.labels["io.kubernetes.pod.namespace"], "prod");

    let paths: Vec<_> = state
        .policies
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "k8s/ciliumclusterwidenetworkpolicies/everyone",
            "k8s/ciliumnetworkpolicies/prod/dns"
        ]
    );
    let text = policy(&state, "k8s/ciliumnetworkpolicies/prod/dns").unwrap();
    for gone in [
        "finalizers",
        "ownerReferences",
        "status",
        "generation",
        "annotations",
    ] {
        assert!(!text.contains(gone), "{gone} dropped:\n{text}");
    }
    let policies = load_policies(&state);
    assert_eq!(policies.len(), 2);
    drop(src);

    // Every node's pods, cgroupfs driver, a prefix.
    let mut cfg = config(&dir.path().join("kubeconfig"), "n1");
    cfg.remote_pods = true;
    cfg.cgroup_driver = CgroupDriver::Cgroupfs;
    cfg.cgroup_prefix = "kubelet.slice".into();
    let src = K8sSource::start(cfg).expect("start");
    let state = src.wait_synced(SYNC).expect("synced");
    assert_eq!(
        endpoint(&state, "prod", "guaranteed").unwrap()["cgroup"],
        "kubelet.slice/kubepods/pod0000aaaa-0000-4000-8000-guaranteed"
    );
    assert_eq!(
        endpoint(&state, "prod", "burst").unwrap()["cgroup"],
        "kubelet.slice/kubepods/burstable/pod1234-abcd-5678"
    );
    assert_eq!(
        endpoint(&state, "prod", "be").unwrap()["cgroup"],
        "kubelet.slice/kubepods/besteffort/pod0000aaaa-0000-4000-8000-be"
    );
    let remote = endpoint(&state, "prod", "remote").expect("remote pod as a peer");
    assert_eq!(remote["ips"], json!(["10.0.1.1"]));
    assert!(remote.get("cgroup").is_none(), "no cgroup for a remote pod");
    assert!(endpoint(&state, "prod", "remote-noip").is_none());
    load_endpoints(&state);
}

#[test]
fn nothing_is_published_before_every_watcher_listed() {
    let (api, dir) = cluster();
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    let mut ccnp = cnp("", "slow", "a", "x.example");
    ccnp["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    api.apply(Res::CiliumClusterwideNetworkPolicies, ccnp);
    api.list_delay(
        Res::CiliumClusterwideNetworkPolicies,
        Duration::from_millis(800),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert!(
            src.latest().is_none(),
            "published before the slow list completed"
        );
        assert!(!src.status().synced);
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = src.wait_synced(SYNC).expect("synced");
    assert_eq!(s.generation, 1);
    assert!(policy(&s, "k8s/ciliumclusterwidenetworkpolicies/slow").is_some());
    assert!(endpoint(&s, "default", "a").is_some());
}

#[test]
fn pod_added_relabelled_deleted() {
    let (api, dir) = cluster();
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let first = src.wait_synced(SYNC).expect("synced");
    assert!(endpoint(&first, "default", "b").is_none());
    assert!(src.latest().is_none(), "nothing new");

    api.apply(
        Res::Pods,
        pod("default", "b", "n1", Some("10.0.0.2"), Some("Burstable")),
    );
    let s = wait_state(&src, CHANGE, "pod b", |s| {
        endpoint(s, "default", "b").is_some()
    });
    load_endpoints(&s);

    let mut b = pod("default", "b", "n1", Some("10.0.0.2"), Some("Burstable"));
    b["metadata"]["labels"] = json!({"app": "b2", "tier": "web"});
    api.apply(Res::Pods, b);
    wait_state(&src, CHANGE, "pod b relabelled", |s| {
        endpoint(s, "default", "b").is_some_and(|e| e["labels"]["tier"] == "web")
    });

    // Another node's pod does not concern this node (not even watched).
    api.apply(
        Res::Pods,
        pod("default", "c", "n2", Some("10.0.0.3"), Some("Burstable")),
    );
    api.delete(Res::Pods, "default", "b");
    let s = wait_state(&src, CHANGE, "pod b gone", |s| {
        endpoint(s, "default", "b").is_none()
    });
    assert!(endpoint(&s, "default", "a").is_some());
    assert!(endpoint(&s, "default", "c").is_none());
    // An unchanged cluster publishes nothing more.
    api.apply(
        Res::Pods,
        pod("default", "c", "n2", Some("10.0.0.4"), Some("Burstable")),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(src.latest().is_none(), "nothing changed for this node");
}

/// kube's watcher skips a watch event it cannot decode and goes on: the change was lost until
/// the next relist (a deleted pod stayed an endpoint). The source lists again at once instead.
#[test]
fn an_unreadable_watch_event_relists() {
    let (api, dir) = cluster();
    for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
        api.apply(
            Res::Pods,
            pod("default", name, "n1", Some(ip), Some("Burstable")),
        );
    }
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let first = src.wait_synced(SYNC).expect("synced");
    assert!(endpoint(&first, "default", "a").is_some());
    let relists = src.status().relists;

    assert!(api.delete_unreadable(Res::Pods, "default", "a"));
    // The watch goes on until the relist (at least 2 s later): a change after the unreadable
    // one shows at once (review finding: the kind saw nothing while it waited to relist).
    let mut b = pod("default", "b", "n1", Some("10.0.0.2"), Some("Burstable"));
    b["metadata"]["labels"] = json!({"app": "b", "tier": "web"});
    api.apply(Res::Pods, b);
    let s = wait_state(&src, CHANGE, "b relabelled", |s| {
        endpoint(s, "default", "b").is_some_and(|e| e["labels"]["tier"] == "web")
    });
    assert!(
        endpoint(&s, "default", "a").is_some(),
        "a relisted already (the relist waits 2-6 s)"
    );
    // Then the relist drops a.
    let s = wait_state(&src, Duration::from_secs(12), "pod a gone", |s| {
        endpoint(s, "default", "a").is_none()
    });
    assert!(endpoint(&s, "default", "b").is_some());
    let status = src.status();
    assert!(status.relists > relists, "{status:?}");
    assert!(status.watch_errors >= 1, "{status:?}");
    assert!(status.stopped.is_none(), "{status:?}");
}

#[test]
fn cnp_added_edited_deleted() {
    let (api, dir) = cluster();
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let first = src.wait_synced(SYNC).expect("synced");
    assert!(first.policies.is_empty());
    const PATH: &str = "k8s/ciliumnetworkpolicies/default/p";

    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("default", "p", "web", "one.example"),
    );
    let s = wait_state(&src, CHANGE, "the CNP", |s| policy(s, PATH).is_some());
    assert!(policy(&s, PATH).unwrap().contains("one.example"));
    load_policies(&s);

    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("default", "p", "web", "two.example"),
    );
    let s = wait_state(&src, CHANGE, "the CNP edited", |s| {
        policy(s, PATH).is_some_and(|t| t.contains("two.example"))
    });
    load_policies(&s);

    api.delete(Res::CiliumNetworkPolicies, "default", "p");
    wait_state(&src, CHANGE, "the CNP deleted", |s| s.policies.is_empty());
}

#[test]
fn expiry_relists_without_publishing_a_partial_view() {
    let (api, dir) = cluster();
    api.apply(
        Res::Pods,
        pod(
            "default",
            "keeper",
            "n1",
            Some("10.0.0.1"),
            Some("Burstable"),
        ),
    );
    api.apply(
        Res::Pods,
        pod(
            "default",
            "doomed",
            "n1",
            Some("10.0.0.2"),
            Some("Burstable"),
        ),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let first = src.wait_synced(SYNC).expect("synced");
    assert!(endpoint(&first, "default", "doomed").is_some());
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();

    api.expire();
    // Changes between the expiry and the relist (the watcher backs off first).
    api.apply(
        Res::Pods,
        pod("default", "late", "n1", Some("10.0.0.3"), Some("Burstable")),
    );
    api.delete(Res::Pods, "default", "doomed");

    let deadline = Instant::now() + Duration::from_secs(8);
    let mut published = 0;
    let mut done = false;
    while Instant::now() < deadline && !done {
        if let Some(s) = src.latest() {
            published += 1;
            assert!(
                endpoint(&s, "default", "keeper").is_some(),
                "a published state lacks the long-lived pod: {}",
                s.endpoints.1
            );
            done = endpoint(&s, "default", "late").is_some()
                && endpoint(&s, "default", "doomed").is_none();
        }
        std::hint::spin_loop();
    }
    assert!(
        done,
        "the relist shows the changes; status {:?}",
        src.status()
    );
    assert!(published >= 1);
    let status = src.status();
    assert!(status.relists >= 1, "{status:?}");
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    assert!(lists_after > lists_before, "pods were listed again");
    // And the source keeps watching after the relist.
    api.apply(
        Res::Pods,
        pod(
            "default",
            "later",
            "n1",
            Some("10.0.0.4"),
            Some("Burstable"),
        ),
    );
    wait_state(&src, CHANGE, "a change after the relist", |s| {
        endpoint(s, "default", "later").is_some()
    });
}

#[test]
fn api_down_publishes_nothing_and_recovers() {
    let (api, dir) = cluster();
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    src.wait_synced(SYNC).expect("synced");
    assert!(src.status().connected);

    api.set_down(true);
    wait_status(&src, Duration::from_secs(5), "errors, not connected", |s| {
        !s.connected && s.watch_errors > 0 && s.last_error.is_some()
    });
    // A change the source cannot see yet; and nothing is published while down.
    api.apply(
        Res::Pods,
        pod("default", "b", "n1", Some("10.0.0.2"), Some("Burstable")),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(src.latest().is_none(), "nothing published while down");
    assert!(!src.status().connected);
    assert!(
        src.status().synced,
        "still synced: the last state stays in force"
    );

    api.set_down(false);
    let s = wait_state(
        &src,
        Duration::from_secs(15),
        "pod b after the outage",
        |s| endpoint(s, "default", "b").is_some(),
    );
    assert!(endpoint(&s, "default", "a").is_some());
    wait_status(&src, Duration::from_secs(5), "connected again", |s| {
        s.connected
    });
}

/// Without `optional_crds`, a Cilium CRD the API server does not serve keeps the source from
/// syncing (an API server that restarts answers 404 until it registered the CRDs again: an
/// empty kind then would start an agent with no policy).
#[test]
fn missing_cilium_crds_keep_the_source_unsynced_unless_optional() {
    let (api, dir) = cluster();
    api.missing(Res::CiliumNetworkPolicies, true);
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    assert!(src.wait_synced(Duration::from_secs(3)).is_none());
    let status = src.status();
    assert!(!status.synced && status.watch_errors >= 1, "{status:?}");
    // Served at last: the source syncs.
    api.missing(Res::CiliumNetworkPolicies, false);
    assert!(src.wait_synced(Duration::from_secs(15)).is_some());
}

#[test]
fn missing_cilium_crds_sync_empty_when_optional() {
    let (api, dir) = cluster();
    api.missing(Res::CiliumNetworkPolicies, true);
    api.missing(Res::CiliumClusterwideNetworkPolicies, true);
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    let mut c = config(&dir.path().join("kubeconfig"), "n1");
    c.optional_crds = true;
    let src = K8sSource::start(c).expect("start");
    let s = src.wait_synced(SYNC).expect("synced without the CRDs");
    assert!(s.policies.is_empty());
    assert!(endpoint(&s, "default", "a").is_some());
    assert!(src.status().synced);
    assert_eq!(
        src.status().watch_errors,
        0,
        "a missing CRD is not an error"
    );

    // Installed later: picked up.
    api.missing(Res::CiliumNetworkPolicies, false);
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("default", "p", "a", "x.example"),
    );
    wait_state(
        &src,
        Duration::from_secs(15),
        "the CNP once the CRD exists",
        |s| !s.policies.is_empty(),
    );
}

#[test]
fn services_with_endpoint_slices() {
    let (api, dir) = cluster();
    api.apply(
        Res::Services,
        json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"selector": {"k8s-app": "kube-dns"}, "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
        }),
    );
    api.apply(
        Res::EndpointSlices,
        json!({
            "metadata": {"name": "kube-dns-abc", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.5.2"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "namespace": "kube-system", "name": "dns-2"}},
                {"addresses": ["10.0.5.1"],
                 "targetRef": {"kind": "Pod", "namespace": "kube-system", "name": "dns-1"}},
                {"addresses": ["10.0.5.3"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "namespace": "kube-system", "name": "dns-3"}},
                // Not a pod of the service's namespace: not one of its pods.
                {"addresses": ["10.0.5.9"],
                 "targetRef": {"kind": "Pod", "namespace": "other", "name": "dns-9"}},
            ],
        }),
    );
    api.apply(
        Res::Services,
        json!({
            "metadata": {"name": "headless", "namespace": "default"},
            "spec": {"selector": {"app": "h"}, "clusterIP": "None", "clusterIPs": ["None"]},
        }),
    );
    api.apply(
        Res::Services,
        json!({
            "metadata": {"name": "external", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "selector": {"app": "e"}},
        }),
    );
    api.apply(
        Res::Services,
        json!({
            "metadata": {"name": "manual", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"]},
        }),
    );
    // Slices written by hand: beside a selector service they are ignored (they could name
    // any address as one of its pods); a selector-less service's backends are its slices.
    for (name, service, ip) in [
        ("forged", "kube-dns", "8.8.8.8"),
        ("manual-1", "manual", "192.0.2.9"),
    ] {
        let ns = if service == "kube-dns" {
            "kube-system"
        } else {
            "default"
        };
        api.apply(
            Res::EndpointSlices,
            json!({
                "metadata": {"name": name, "namespace": ns,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip]}],
            }),
        );
    }
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let s = src.wait_synced(SYNC).expect("synced");
    let services = endpoints_json(&s)["services"].clone();
    assert_eq!(
        services,
        json!([{
            "name": "manual", "namespace": "default", "labels": {},
            "ips": ["10.96.0.20"], "backends": ["192.0.2.9"],
        }, {
            "name": "kube-dns", "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns"}, "selector": {"io.cilium.k8s.policy.cluster": "default", "k8s-app": "kube-dns"},
            "ips": ["10.96.0.10"], "backends": ["10.0.5.1", "10.0.5.2"],
        }]),
        "headless without backends and ExternalName left out; a selector-less service without \
         `selector`; a hand-written slice beside a selector service ignored"
    );
    load_endpoints(&s);

    // A backend becoming ready shows.
    api.apply(
        Res::EndpointSlices,
        json!({
            "metadata": {"name": "kube-dns-abc", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.5.3"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "namespace": "kube-system", "name": "dns-3"}}],
        }),
    );
    let s = wait_state(&src, CHANGE, "the new backend", |s| {
        endpoints_json(s)["services"][1]["backends"] == json!(["10.0.5.3"])
    });
    load_endpoints(&s);
}

/// The cluster's other nodes (`toEntities: remote-node`): internal and external addresses,
/// this node left out, a node added later shows.
#[test]
fn other_nodes_are_rendered_as_remote_nodes() {
    let (api, dir) = cluster();
    let node = |name: &str, ips: &[(&str, &str)]| {
        let addresses: Vec<_> = ips
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .collect();
        json!({"metadata": {"name": name}, "status": {"addresses": addresses}})
    };
    api.apply(Res::Nodes, node("n1", &[("InternalIP", "172.16.0.1")]));
    api.apply(
        Res::Nodes,
        node(
            "n2",
            &[
                ("InternalIP", "172.16.0.2"),
                ("ExternalIP", "203.0.113.2"),
                ("Hostname", "n2.example"),
            ],
        ),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    let s = src.wait_synced(SYNC).expect("synced");
    assert_eq!(
        endpoints_json(&s)["nodes"],
        json!([{"name": "n2", "ips": ["172.16.0.2", "203.0.113.2"]}]),
        "this node (n1) left out, hostnames ignored"
    );
    load_endpoints(&s);
    api.apply(Res::Nodes, node("n3", &[("InternalIP", "fd00::3")]));
    let s = wait_state(&src, CHANGE, "the new node", |s| {
        endpoints_json(s)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    assert_eq!(endpoints_json(&s)["nodes"][1]["ips"], json!(["fd00::3"]));
}
