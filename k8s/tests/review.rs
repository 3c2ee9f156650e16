//! Adversarial review of the Kubernetes source (branch review-k8s): objects an ordinary
//! namespace owner can create (pods, services, EndpointSlices, CNPs), rendered and compiled
//! with the policy loader. Each test states the expected (safe) behaviour; each failed before
//! its fix (a Service freezing the registry, a Service selector claiming another namespace's
//! identity, a hand-written EndpointSlice making an address `cluster`, a 404 after sync
//! dropping the policies, a hung relist going unnoticed) and now guards it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dnsfence_k8s::k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use dnsfence_k8s::k8s_openapi::api::discovery::v1::EndpointSlice;
use dnsfence_k8s::kube::api::DynamicObject;
use dnsfence_k8s::{ClusterView, K8sConfig, K8sSource, render};
use dnsfence_policy::cidr::NodeFacts;
use dnsfence_policy::reload::{InForce, Sources};
use dnsfence_policy::{Endpoints, PolicySet, PortProtocol, Snapshot};
use dnsfence_testkit::kube::{FakeApi, Res};
use serde_json::{Value, json};

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).expect("a valid object"))
}

fn cfg() -> K8sConfig {
    let mut c = config(Path::new("/nonexistent"), "n1");
    c.remote_pods = true;
    c
}

/// prod (team=prod) with a client and an api pod; dev (team=dev) with an attacker's pod that
/// carries, as raw Kubernetes labels, keys the renderer strips from its identity (as any pod
/// owner may).
fn base_view() -> ClusterView {
    let mut view = ClusterView::default();
    view.namespaces.push(typed::<Namespace>(namespace(
        "prod",
        json!({"team": "prod"}),
    )));
    view.namespaces
        .push(typed::<Namespace>(namespace("dev", json!({"team": "dev"}))));
    let mut client = pod("prod", "client", "n1", Some("10.0.1.5"), Some("Burstable"));
    client["metadata"]["labels"] = json!({"app": "client", "role": "admin"});
    view.pods.push(typed::<Pod>(client));
    view.pods.push(typed::<Pod>(pod(
        "prod",
        "api",
        "n2",
        Some("10.0.1.7"),
        Some("Burstable"),
    )));
    let mut evil = pod("dev", "evil", "n2", Some("10.0.2.6"), Some("Burstable"));
    evil["metadata"]["labels"] = json!({
        "app": "evil",
        "io.cilium.k8s.namespace.labels.team": "prod",
        "io.cilium.k8s.policy.serviceaccount": "prometheus",
    });
    view.pods.push(typed::<Pod>(evil));
    view
}

fn service(ns: &str, name: &str, labels: Value, selector: Value, ip: &str) -> Arc<Service> {
    typed(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"selector": selector, "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP"},
    }))
}

/// An EndpointSlice as the EndpointSlice controller writes it (managed-by, targetRef).
fn managed_slice(ns: &str, svc: &str, pod_name: &str, ip: &str) -> Arc<EndpointSlice> {
    typed(json!({
        "metadata": {"name": format!("{svc}-abcde"), "namespace": ns, "labels": {
            "kubernetes.io/service-name": svc,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name}}],
    }))
}

fn compile(view: &ClusterView, policy: &str) -> Snapshot {
    let r = render(view, &cfg());
    let e = Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1)
        .unwrap_or_else(|e| panic!("endpoints text: {e}\n{}", r.state.endpoints.1));
    let p = PolicySet::from_yaml(Path::new("p.yaml"), policy).unwrap_or_else(|e| panic!("{e}"));
    Snapshot::compile_on(&p, &e, &[], &NodeFacts::default())
}

fn l3(s: &Snapshot, ep: &str, ip: &str, port: u16) -> Option<bool> {
    let id = s.endpoint_by_name(ep).expect("endpoint");
    s.l3_verdict(id, ip.parse().unwrap(), port, PortProtocol::Tcp)
}

// ---------------------------------------------------------------------------------------
// Finding 1: a Service whose labels or selector carry the key `io.kubernetes.pod.namespace`
// (a valid Kubernetes label key any namespace owner may use) makes the rendered endpoints
// text fail to load, so the agent keeps the LAST registry for as long as that Service exists.
// ---------------------------------------------------------------------------------------

#[test]
fn a_service_label_with_the_namespace_key_keeps_the_endpoints_text_loadable() {
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "freeze",
        json!({"io.kubernetes.pod.namespace": "kube-system"}),
        json!({"app": "evil"}),
        "10.96.0.50",
    ));
    let r = render(&view, &cfg());
    if let Err(e) = Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1) {
        panic!("one Service in dev freezes every node's registry: {e}");
    }
}

#[test]
fn a_service_selector_with_the_namespace_key_keeps_the_endpoints_text_loadable() {
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "freeze",
        json!({}),
        json!({"app": "evil", "io.kubernetes.pod.namespace": "kube-system"}),
        "10.96.0.51",
    ));
    let r = render(&view, &cfg());
    if let Err(e) = Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1) {
        panic!("one Service in dev freezes every node's registry: {e}");
    }
}

/// The agent's path (`Sources::apply_objects`): once the Service exists, a relabelled pod
/// keeps its old labels (and policy), a deleted pod its address, a new pod stays unknown.
#[test]
fn a_frozen_registry_keeps_a_relabelled_pods_old_identity() {
    let mut sources = Sources::load(&[], None).expect("no files").0;
    let accept = |_: &Endpoints| Ok(());
    let view = base_view();
    let first = render(&view, &cfg()).state;
    assert!(first.endpoints.1.contains("\"admin\""));
    sources.apply_objects(
        &InForce {
            policies: first.policies.clone(),
            endpoints: Some(first.endpoints.clone()),
        },
        &accept,
    );

    // The attacker's Service, and the admin pod relabelled to a guest.
    let mut view = view;
    view.services.push(service(
        "dev",
        "freeze",
        json!({"io.kubernetes.pod.namespace": "x"}),
        json!({"app": "evil"}),
        "10.96.0.50",
    ));
    let mut client = pod("prod", "client", "n1", Some("10.0.1.5"), Some("Burstable"));
    client["metadata"]["labels"] = json!({"app": "client", "role": "guest"});
    view.pods[0] = typed::<Pod>(client);
    let second = render(&view, &cfg()).state;
    assert!(!second.endpoints.1.contains("\"admin\""));
    let report = sources.apply_objects(
        &InForce {
            policies: second.policies.clone(),
            endpoints: Some(second.endpoints.clone()),
        },
        &accept,
    );
    let in_force = sources.in_force().endpoints.expect("a registry").1;
    assert!(
        !in_force.contains("\"admin\""),
        "the relabelled pod still has role=admin in force (rejections: {:?})",
        report
            .rejections
            .iter()
            .map(|r| r.errors.to_string())
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// Finding 2: a Service's selector may name Cilium-derived keys (namespace labels, service
// account) that the renderer strips from pods. Kubernetes matches them against raw pod labels
// any pod owner sets, but `selects_every` takes them as the identity Cilium would derive: a
// selector for "every pod of team=prod namespaces" (or "every prometheus service account")
// then reaches a dev namespace's pod through its Service.
// ---------------------------------------------------------------------------------------

const TEAM_PROD: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: to-prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: prod}}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: prometheus}}]
    toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
"#;

#[test]
fn a_service_selector_cannot_claim_another_namespaces_labels() {
    // Without the Service: the rule works for prod's pods, and dev's pod is not reached.
    let s = compile(&base_view(), TEAM_PROD);
    assert_eq!(l3(&s, "prod/client", "10.0.1.7", 443), Some(true));
    assert_eq!(l3(&s, "prod/client", "10.0.2.6", 443), None);
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "looks-prod",
        json!({}),
        json!({"io.cilium.k8s.namespace.labels.team": "prod"}),
        "10.96.0.60",
    ));
    view.endpoint_slices
        .push(managed_slice("dev", "looks-prod", "evil", "10.0.2.6"));
    let s = compile(&view, TEAM_PROD);
    // Through the dev Service: neither its ClusterIP nor its backend.
    assert_eq!(
        l3(&s, "prod/client", "10.96.0.60", 443),
        None,
        "dev's ClusterIP reached by a team=prod selector"
    );
    assert_eq!(
        l3(&s, "prod/client", "10.0.2.6", 443),
        None,
        "dev's pod reached through its Service"
    );
}

/// The label every namespace carries (`kubernetes.io/metadata.name`) is claimable the same
/// way: a rule to kube-system written with it (a common CCNP form) reaches a dev Service.
#[test]
fn a_service_selector_cannot_claim_the_kube_system_namespace_name() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: to-kube-system}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: kube-system}}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "looks-kube-system",
        json!({}),
        json!({"io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "kube-system"}),
        "10.96.0.62",
    ));
    let s = compile(&view, policy);
    assert_eq!(
        l3(&s, "prod/client", "10.96.0.62", 443),
        None,
        "dev's ClusterIP reached by a kube-system namespace selector"
    );
}

#[test]
fn a_service_selector_cannot_claim_a_service_account() {
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "looks-prometheus",
        json!({}),
        json!({"io.cilium.k8s.policy.serviceaccount": "prometheus"}),
        "10.96.0.61",
    ));
    view.endpoint_slices
        .push(managed_slice("dev", "looks-prometheus", "evil", "10.0.2.6"));
    let s = compile(&view, TEAM_PROD);
    assert_eq!(
        l3(&s, "prod/client", "10.96.0.61", 9090),
        None,
        "dev's ClusterIP reached by a serviceaccount=prometheus selector"
    );
    assert_eq!(
        l3(&s, "prod/client", "10.0.2.6", 9090),
        None,
        "dev's pod (service account sa) reached through its Service"
    );
}

// ---------------------------------------------------------------------------------------
// Finding 3: EndpointSlice addresses are taken as they are: a hand-written slice (not the
// EndpointSlice controller's, no Pod targetRef) with the `kubernetes.io/service-name` label of
// any selector Service in the namespace puts ANY address among the registered ones. Those
// then count as `cluster` (toEntities: cluster reaches them) and no longer as `world` (an
// egressDeny of world no longer covers them), and every toEndpoints selector that selects
// the Service reaches them.
// ---------------------------------------------------------------------------------------

fn with_hand_written_slice() -> ClusterView {
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "web",
        json!({}),
        json!({"app": "evil"}),
        "10.96.0.70",
    ));
    view.endpoint_slices.push(typed::<EndpointSlice>(json!({
        "metadata": {"name": "web-manual", "namespace": "dev",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["203.0.113.7"], "conditions": {"ready": true}}],
    })));
    view
}

#[test]
fn a_hand_written_endpoint_slice_does_not_make_an_internet_address_cluster() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: in-cluster-only}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;
    let s = compile(&base_view(), policy);
    assert_eq!(l3(&s, "prod/client", "203.0.113.7", 443), None, "baseline");
    let s = compile(&with_hand_written_slice(), policy);
    assert_eq!(
        l3(&s, "prod/client", "203.0.113.7", 443),
        None,
        "an address of dev's hand-written EndpointSlice is `cluster` for prod's client"
    );
}

#[test]
fn a_hand_written_endpoint_slice_does_not_escape_a_world_deny() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-internet}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [all]
  egressDeny:
  - toEntities: [world]
"#;
    let s = compile(&base_view(), policy);
    assert_eq!(
        l3(&s, "prod/client", "203.0.113.7", 443),
        Some(false),
        "baseline"
    );
    let s = compile(&with_hand_written_slice(), policy);
    assert_eq!(
        l3(&s, "prod/client", "203.0.113.7", 443),
        Some(false),
        "dev's hand-written EndpointSlice lifts prod's world deny for its address"
    );
}

// ---------------------------------------------------------------------------------------
// Finding 4: a 404 for a Cilium kind AFTER it was listed (an API server restarting serves
// custom resources as 404 until their CRDs are registered again) renders that kind empty:
// every CNP is dropped from what is in force, failing open, until the next complete list.
// ---------------------------------------------------------------------------------------

#[test]
fn a_transient_404_after_sync_does_not_drop_the_policies() {
    // With or without optional CRDs: a kind that listed keeps its store on a 404.
    transient_404(false);
    transient_404(true);
}

fn transient_404(optional_crds: bool) {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().expect("temp dir");
    api.kubeconfig(dir.path());
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("default", "p", "a", "x.example"),
    );
    let mut c = config(&dir.path().join("kubeconfig"), "n1");
    c.optional_crds = optional_crds;
    let src = K8sSource::start(c).expect("start");
    let s = src.wait_synced(Duration::from_secs(10)).expect("synced");
    assert_eq!(s.policies.len(), 1);

    // The CRD is briefly not served (API server restart), then served again.
    api.missing(Res::CiliumNetworkPolicies, true);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut dropped = None;
    while Instant::now() < deadline {
        if let Some(s) = src.latest()
            && s.policies.is_empty()
        {
            dropped = Some(s.generation);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    api.missing(Res::CiliumNetworkPolicies, false);
    assert_eq!(
        dropped, None,
        "a state without the CNP was published while the CRD answered 404 (fail open)"
    );
}

// ---------------------------------------------------------------------------------------
// Probe: characters serde_json writes raw that a YAML 1.2 parser may refuse (not printable
// in YAML): a policy text that is not YAML is Unusable with scope EVERY endpoint.
// ---------------------------------------------------------------------------------------

fn cnp_object(ns: &str, name: &str, description: &str) -> Arc<DynamicObject> {
    typed(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "description": description,
            "endpointSelector": {"matchLabels": {"app": "evil"}},
            "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                "rules": {"dns": [{"matchName": "x.example"}]}}]}],
        },
    }))
}

#[test]
fn a_namespaced_policy_text_never_fails_closed_for_every_endpoint() {
    let mut failures = Vec::new();
    let odd = [
        '\u{7f}',
        '\u{80}',
        '\u{85}',
        '\u{9f}',
        '\u{a0}',
        '\u{2028}',
        '\u{feff}',
        '\u{fffe}',
        '\u{ffff}',
        '\u{d7ff}',
        '\u{e000}',
        '\u{1f600}',
    ];
    for c in odd {
        let mut view = ClusterView::default();
        view.network_policies
            .push(cnp_object("dev", "odd", &format!("a{c}b")));
        let r = render(&view, &cfg());
        let (path, text) = &r.state.policies[0];
        let verdict = dnsfence_policy::parse_policy_file(path, text);
        if let dnsfence_policy::FileVerdict::Unusable { scope, errors } = &verdict
            && scope
                .iter()
                .any(|s| !s.has_key(dnsfence_policy::NAMESPACE_LABEL))
        {
            failures.push(format!("U+{:04X}: {errors}", c as u32));
        }
    }
    assert!(
        failures.is_empty(),
        "a CNP in dev whose text is not YAML fails closed for EVERY endpoint:\n{}",
        failures.join("\n")
    );
}

#[test]
fn deep_nesting_in_a_policy_text_is_read() {
    // kube's JSON reader allows 128 levels; a YAML parser with a lower limit would make the
    // text Unusable for every endpoint.
    let mut v = json!("x");
    for _ in 0..120 {
        v = json!([v]);
    }
    let obj: Arc<DynamicObject> = typed(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "deep", "namespace": "dev"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "evil"}}, "deep": v},
    }));
    let mut view = ClusterView::default();
    view.network_policies.push(obj);
    let r = render(&view, &cfg());
    let (path, text) = &r.state.policies[0];
    let verdict = dnsfence_policy::parse_policy_file(path, text);
    if let dnsfence_policy::FileVerdict::Unusable { scope, errors } = &verdict {
        assert!(
            scope
                .iter()
                .all(|s| s.has_key(dnsfence_policy::NAMESPACE_LABEL)),
            "scope every endpoint: {errors}"
        );
    }
}

/// The agent at start (agent.rs: `apply_objects` of the first state, then `set_node`): when
/// the first registry text does not load, it serves with NO registry. In eBPF mode no pod
/// cgroup is redirected or filtered (every pod on the node unenforced); without BPF every
/// query is from an unknown source.
#[test]
fn a_first_registry_that_does_not_load_does_not_start_an_agent_with_no_workloads() {
    let mut sources = Sources::load(&[], None).expect("no files").0;
    let mut view = base_view();
    view.services.push(service(
        "dev",
        "freeze",
        json!({"io.kubernetes.pod.namespace": "x"}),
        json!({"app": "evil"}),
        "10.96.0.50",
    ));
    let state = render(&view, &cfg()).state;
    let report = sources.apply_objects(
        &InForce {
            policies: state.policies.clone(),
            endpoints: Some(state.endpoints.clone()),
        },
        &|_: &Endpoints| Ok(()),
    );
    let snapshot = sources.set_node(NodeFacts::default());
    assert!(
        snapshot.endpoint_by_name("prod/client").is_some(),
        "the agent would serve with an empty registry: {:?}",
        report
            .rejections
            .iter()
            .map(|r| r.errors.to_string())
            .collect::<Vec<_>>()
    );
}

/// Cost of one change in a large cluster (remote pods on, the default): the whole endpoints
/// text is rendered, parsed and compiled again on every node. Prints timings.
#[test]
#[ignore = "timing probe; run with --ignored --nocapture"]
fn cost_of_one_change_with_many_pods() {
    for n in [1_000usize, 5_000, 20_000] {
        let mut view = ClusterView::default();
        for i in 0..n {
            let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            let mut p = pod(
                "ns",
                &format!("p{i}"),
                if i % 50 == 0 { "n1" } else { "n2" },
                Some(&ip),
                Some("Burstable"),
            );
            p["metadata"]["labels"] =
                json!({"app": format!("a{}", i % 40), "pod-template-hash": format!("{i:x}")});
            view.pods.push(typed::<Pod>(p));
        }
        let t = Instant::now();
        let r = render(&view, &cfg());
        let render_t = t.elapsed();
        let t = Instant::now();
        let e = Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1).unwrap();
        let parse_t = t.elapsed();
        let t = Instant::now();
        let p = PolicySet::from_yaml(Path::new("p.yaml"), TEAM_PROD).unwrap();
        let _s = Snapshot::compile_on(&p, &e, &[], &NodeFacts::default());
        let compile_t = t.elapsed();
        println!(
            "{n} pods: text {} KiB, render {render_t:?}, parse {parse_t:?}, compile {compile_t:?}",
            r.state.endpoints.1.len() / 1024
        );
    }
}

/// A LIST that never answers (a request in flight when an API server behind a VIP dies
/// without a reset, or one stuck in the server): kube's client has no read timeout (only
/// watches get an idle timeout), so the relist of that kind waits forever: its changes are
/// never seen again and the status still says connected.
#[test]
fn a_relist_that_never_answers_is_noticed() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().expect("temp dir");
    api.kubeconfig(dir.path());
    api.apply(
        Res::Pods,
        pod("default", "a", "n1", Some("10.0.0.1"), Some("Burstable")),
    );
    let src = K8sSource::start(config(&dir.path().join("kubeconfig"), "n1")).expect("start");
    src.wait_synced(Duration::from_secs(10)).expect("synced");

    // Every later LIST of pods hangs; the open watch is expired, so the pods relist.
    api.list_delay(Res::Pods, Duration::from_secs(3600));
    api.expire();
    api.apply(
        Res::Pods,
        pod("default", "b", "n1", Some("10.0.0.2"), Some("Burstable")),
    );
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        if let Some(s) = src.latest() {
            seen = endpoint(&s, "default", "b").is_some();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = src.status();
    assert!(
        seen || !status.connected,
        "pod b never seen after 12 s, and the status says connected: {status:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Review finding (2026-12-03): a selector Service backed by a host-network DaemonSet
// (node-local-dns, an ingress controller) has its pods' addresses, which are their nodes',
// in the controller's EndpointSlice. They were taken as pods the Service selects, so
// `toEndpoints` of the DaemonSet's labels reached the nodes' addresses, every port with no
// `toPorts` (the kubelet, ssh). In Cilium those are `host` / `remote-node`.
// ---------------------------------------------------------------------------------------

fn with_host_network_backend(remote_pods: bool) -> (ClusterView, K8sConfig) {
    let mut view = base_view();
    view.namespaces
        .push(typed::<Namespace>(namespace("kube-system", json!({}))));
    let mut dns = pod(
        "kube-system",
        "node-dns-x1",
        "n2",
        Some("192.168.1.12"),
        Some("Burstable"),
    );
    dns["metadata"]["labels"] = json!({"k8s-app": "node-dns"});
    dns["spec"]["hostNetwork"] = json!(true);
    // Watched only with the other nodes' pods (it runs on n2).
    if remote_pods {
        view.pods.push(typed::<Pod>(dns));
    }
    view.nodes.push(typed(json!({
        "metadata": {"name": "n2"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.12"}]},
    })));
    view.services.push(service(
        "kube-system",
        "node-dns",
        json!({}),
        json!({"k8s-app": "node-dns"}),
        "10.96.0.10",
    ));
    view.endpoint_slices.push(managed_slice(
        "kube-system",
        "node-dns",
        "node-dns-x1",
        "192.168.1.12",
    ));
    let mut config = cfg();
    config.remote_pods = remote_pods;
    (view, config)
}

#[test]
fn a_host_network_backend_does_not_make_its_node_an_endpoint() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: to-node-dns}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s-app: node-dns, k8s:io.kubernetes.pod.namespace: kube-system}}]
"#;
    // With every pod watched, and with this node's only (the DaemonSet's pod on n2 is then
    // out of the view): the node's address is no backend either way.
    for remote_pods in [true, false] {
        let (view, config) = with_host_network_backend(remote_pods);
        let r = render(&view, &config);
        let e = Endpoints::from_yaml(&r.state.endpoints.0, &r.state.endpoints.1)
            .unwrap_or_else(|e| panic!("endpoints text: {e}\n{}", r.state.endpoints.1));
        let p = PolicySet::from_yaml(Path::new("p.yaml"), policy).unwrap_or_else(|e| panic!("{e}"));
        let s = Snapshot::compile_on(&p, &e, &[], &NodeFacts::default());
        if remote_pods {
            assert!(s.endpoint_by_name("prod/client").is_some());
        }
        let Some(client) = s.endpoint_by_name("prod/client") else {
            continue;
        };
        for port in [22, 10250] {
            assert_eq!(
                s.l3_verdict(
                    client,
                    "192.168.1.12".parse().unwrap(),
                    port,
                    PortProtocol::Tcp
                ),
                None,
                "the node's address reached on {port} (remote pods watched: {remote_pods})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Review finding (2026-12-03): Cilium gives every endpoint `io.cilium.k8s.policy.cluster`
// (the cluster's name, `default` unless set); the rendered pods lacked it, so a policy
// selecting by it (ClusterMesh set-ups write them) selected no pod and left every pod
// unrestricted. A pod cannot claim another cluster (the key is stripped from its labels).
// ---------------------------------------------------------------------------------------

#[test]
fn a_policy_selecting_the_cluster_label_selects_the_clusters_pods() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cluster-wide}
spec:
  endpointSelector: {matchLabels: {k8s:io.cilium.k8s.policy.cluster: default}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;
    let mut view = base_view();
    let mut other = pod("dev", "other", "n2", Some("10.0.2.9"), Some("Burstable"));
    other["metadata"]["labels"] = json!({"app": "other", "io.cilium.k8s.policy.cluster": "c2"});
    view.pods.push(typed::<Pod>(other));
    let s = compile(&view, policy);
    for ep in ["prod/client", "prod/api", "dev/evil", "dev/other"] {
        let id = s.endpoint_by_name(ep).expect("endpoint");
        assert!(
            s.is_restricted(id),
            "{ep} is not selected by its cluster's label"
        );
    }
    // Another cluster name selects none of them.
    let s = compile(&view, &policy.replace("cluster: default", "cluster: c2"));
    for ep in ["prod/client", "dev/other"] {
        let id = s.endpoint_by_name(ep).expect("endpoint");
        assert!(!s.is_restricted(id), "{ep} claimed cluster c2");
    }
}

/// Second review: a `toEndpoints` naming the cluster label selects every pod of a service
/// whose pods all carry it, so it reaches the service's address (a service's selector now
/// carries the label too): a ClusterMesh-style DNS rule refused every query to kube-dns's
/// ClusterIP.
#[test]
fn a_selector_with_the_cluster_label_reaches_a_service_address() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: to-dns}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s-app: dns, io.cilium.k8s.policy.cluster: default, k8s:io.kubernetes.pod.namespace: prod}}]
    toPorts: [{ports: [{port: "53", protocol: TCP}]}]
"#;
    let mut view = base_view();
    let mut dns = pod("prod", "dns-1", "n2", Some("10.0.1.9"), Some("Burstable"));
    dns["metadata"]["labels"] = json!({"k8s-app": "dns"});
    view.pods.push(typed::<Pod>(dns));
    view.services.push(service(
        "prod",
        "dns",
        json!({}),
        json!({"k8s-app": "dns"}),
        "10.96.0.53",
    ));
    view.endpoint_slices
        .push(managed_slice("prod", "dns", "dns-1", "10.0.1.9"));
    let s = compile(&view, policy);
    assert_eq!(l3(&s, "prod/client", "10.0.1.9", 53), Some(true), "the pod");
    assert_eq!(
        l3(&s, "prod/client", "10.96.0.53", 53),
        Some(true),
        "the service's address"
    );
    // Another cluster's name reaches neither.
    let s = compile(&view, &policy.replace("cluster: default", "cluster: c2"));
    assert_eq!(l3(&s, "prod/client", "10.96.0.53", 53), None);
}

/// Second review: the host-network/finished part of the backend check, on its own (the
/// node-address check covers host-network pods too): a finished pod's address, still in
/// its service's slice, is no backend (it may be any other pod's, or nobody's, by now).
#[test]
fn a_finished_pods_address_is_no_backend() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: to-batch}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: batch, k8s:io.kubernetes.pod.namespace: prod}}]
"#;
    let mut view = base_view();
    let mut done = pod(
        "prod",
        "batch-1",
        "n2",
        Some("10.0.1.50"),
        Some("Burstable"),
    );
    done["metadata"]["labels"] = json!({"app": "batch"});
    done["status"]["phase"] = json!("Succeeded");
    view.pods.push(typed::<Pod>(done));
    view.services.push(service(
        "prod",
        "batch",
        json!({}),
        json!({"app": "batch"}),
        "10.96.0.60",
    ));
    view.endpoint_slices
        .push(managed_slice("prod", "batch", "batch-1", "10.0.1.50"));
    let s = compile(&view, policy);
    assert_eq!(l3(&s, "prod/client", "10.0.1.50", 8080), None);
}
