//! Review of `dnsfence agent --k8s` (branch review-k8s): one Service created by the owner of
//! another namespace freezes the agent's registry. Helpers copied from k8s_source.rs.
//! Workloads are recognised by source address (`--no-bpf`): each pod gets a 127.0.0.x
//! address and the test's client sends from it. Covered: a pod added, relabelled and deleted;
//! a CNP added and edited; a DNS rule written `toEndpoints: k8s-app=kube-dns` satisfied by the
//! kube-dns Service's ClusterIP; a 410 Gone and the relist; the API server down (verdicts
//! unchanged) and back.
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use dnsfence_testkit::kube::{FakeApi, Res};
use dnsfence_tests::dns::{self, TYPE_A};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, poll_until};
use serde_json::{Value, json};

const NOERROR: u8 = 0;
const REFUSED: u8 = 5;
/// How long a change in the API may take to reach the verdicts.
const CHANGE: Duration = Duration::from_secs(3);

fn pod(name: &str, ip: &str, app: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort"},
    })
}

/// A CNP for `app`: DNS through kube-dns (by labels, as Cilium's examples write it) for
/// `pattern` only.
fn cnp(name: &str, app: &str, pattern: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "egress": [{
                "toEndpoints": [{"matchLabels": {
                    "k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
                "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                    "rules": {"dns": [{"matchPattern": pattern}]}}],
            }],
        },
    })
}

fn kube_dns_service(cluster_ip: &str) -> Value {
    json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"selector": {"k8s-app": "kube-dns"}, "clusterIP": cluster_ip,
                 "clusterIPs": [cluster_ip], "type": "ClusterIP",
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
    })
}

/// The rcode of `name` asked from `source` (a pod's address), or None without an answer.
fn ask(agent: SocketAddr, source: &str, name: &str) -> Option<u8> {
    let s = UdpSocket::bind((source, 0)).expect("bind the pod's address");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let id = fastrand::u16(..);
    s.send_to(&dns::query(id, name, TYPE_A, None), agent).ok()?;
    let reply = dns::recv_reply(&s, Duration::from_millis(500))?;
    Some(dns::rcode(&reply))
}

/// Waits until `name` from `source` gets `want`; how long it took.
fn until(agent: SocketAddr, source: &str, name: &str, want: u8) -> Duration {
    let start = Instant::now();
    let mut last = None;
    let got = poll_until(CHANGE, || {
        last = ask(agent, source, name);
        (last == Some(want)).then_some(())
    });
    assert!(
        got.is_some(),
        "{name} from {source}: want rcode {want}, last {last:?} after {CHANGE:?}"
    );
    start.elapsed()
}

/// A Service in namespace `dev` labelled `io.kubernetes.pod.namespace: x` (a valid label any
/// namespace owner may set) makes every later endpoints text fail to load: the agent keeps
/// the last registry, so a relabelled pod keeps its old policy and a new pod stays unknown.
#[test]
fn a_service_in_another_namespace_does_not_freeze_the_registry() {
    let api = FakeApi::start();
    let dir = TempDir::new("k8s-review-freeze");
    api.apply(Res::Namespaces, json!({"metadata": {"name": "shop"}}));
    api.apply(
        Res::Namespaces,
        json!({"metadata": {"name": "kube-system"}}),
    );
    api.apply(Res::Namespaces, json!({"metadata": {"name": "dev"}}));
    api.apply(Res::Pods, pod("web", "127.0.0.2", "web"));
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("web-dns", "web", "*.allowed.test"),
    );
    api.apply(Res::Services, kube_dns_service("127.0.0.53"));
    let upstream = Bundled::start(&[]);
    let mut config = AgentConfig::new(IoBackend::Uring, upstream.addr).args(&[
        "--node-name",
        "n1",
        "--policy-server",
        "127.0.0.53:53",
    ]);
    config.kubeconfig = Some(api.kubeconfig(dir.path()));
    let agent = Agent::start(&config);
    let a = agent.addr;
    until(a, "127.0.0.2", "x.allowed.test", NOERROR);
    assert_eq!(ask(a, "127.0.0.2", "x.denied.test"), Some(REFUSED));

    // The owner of `dev` creates a Service.
    api.apply(
        Res::Services,
        json!({
            "metadata": {"name": "freeze", "namespace": "dev",
                         "labels": {"io.kubernetes.pod.namespace": "kube-system"}},
            "spec": {"selector": {"app": "x"}, "clusterIP": "10.96.7.7",
                     "clusterIPs": ["10.96.7.7"], "type": "ClusterIP"},
        }),
    );
    std::thread::sleep(Duration::from_millis(500));
    // Relabelled: no policy selects it any more, so it is not enforced.
    api.apply(Res::Pods, pod("web", "127.0.0.2", "batch"));
    until(a, "127.0.0.2", "x.denied.test", NOERROR);
    // A new pod: known (here unrestricted) at once.
    api.apply(Res::Pods, pod("api", "127.0.0.3", "batch"));
    until(a, "127.0.0.3", "y.denied.test", NOERROR);
}
