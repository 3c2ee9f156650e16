//! Issue 9 item 4: `dnsfence agent --k8s` against a loopback server that replays the API
//! server's LIST and WATCH exchanges (`dnsfence_testkit::kube::FakeApi`; kube-rs for real).
//! Workloads are recognised by source address (`--no-bpf`): each pod gets a 127.0.0.x
//! address and the test's client sends from it. Covered: a pod added, relabelled and deleted;
//! a CNP added and edited; a DNS rule written `toEndpoints: k8s-app=kube-dns` satisfied by the
//! kube-dns Service's ClusterIP; a 410 Gone and the relist; the API server down (verdicts
//! unchanged) and back; and, from the review of the source, a Service of another namespace
//! that once froze the registry.
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

#[test]
fn the_agent_follows_pods_policies_and_services_from_the_api() {
    let api = FakeApi::start();
    let dir = TempDir::new("k8s-source");
    api.apply(Res::Namespaces, json!({"metadata": {"name": "shop"}}));
    api.apply(
        Res::Namespaces,
        json!({"metadata": {"name": "kube-system"}}),
    );
    api.apply(Res::Pods, pod("web", "127.0.0.2", "web"));
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("web-dns", "web", "*.allowed.test"),
    );
    let upstream = Bundled::start(&[]);
    let mut config = AgentConfig::new(IoBackend::Uring, upstream.addr).args(&[
        "--node-name",
        "n1",
        // The server DNS rules are judged against without the eBPF datapath: kube-dns.
        "--policy-server",
        "127.0.0.53:53",
    ]);
    config.kubeconfig = Some(api.kubeconfig(dir.path()));
    let agent = Agent::start(&config);
    let a = agent.addr;

    // The rule names kube-dns by labels; no Service yet: no server is kube-dns, so even the
    // allowed pattern is refused (default deny, never widened).
    assert_eq!(ask(a, "127.0.0.2", "x.allowed.test"), Some(REFUSED));
    // The kube-dns Service: its ClusterIP is the server, and the rule applies.
    api.apply(Res::Services, kube_dns_service("127.0.0.53"));
    until(a, "127.0.0.2", "x.allowed.test", NOERROR);
    assert_eq!(ask(a, "127.0.0.2", "x.denied.test"), Some(REFUSED));
    // A Service on another address does not stand for kube-dns.
    api.apply(Res::Services, kube_dns_service("127.0.0.54"));
    until(a, "127.0.0.2", "x.allowed.test", REFUSED);
    api.apply(Res::Services, kube_dns_service("127.0.0.53"));
    until(a, "127.0.0.2", "x.allowed.test", NOERROR);

    // `toServices` names the Service itself (its ClusterIP is the DNS server).
    api.apply(Res::Pods, pod("svc-user", "127.0.0.4", "svcuser"));
    api.apply(
        Res::CiliumNetworkPolicies,
        json!({
            "metadata": {"name": "svc-dns", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "svcuser"}},
                "egress": [{
                    "toServices": [{"k8sService": {"serviceName": "kube-dns", "namespace": "kube-system"}}],
                    "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                        "rules": {"dns": [{"matchPattern": "*.svc.test"}]}}],
                }],
            },
        }),
    );
    until(a, "127.0.0.4", "q.svc.test", NOERROR);
    assert_eq!(ask(a, "127.0.0.4", "q.allowed.test"), Some(REFUSED));

    // A pod added: unknown (refused) before, served with its policy right after.
    assert_eq!(ask(a, "127.0.0.3", "y.allowed.test"), Some(REFUSED));
    api.apply(Res::Pods, pod("api", "127.0.0.3", "web"));
    let took = until(a, "127.0.0.3", "y.allowed.test", NOERROR);
    assert!(took < Duration::from_secs(2), "a new pod took {took:?}");
    assert_eq!(ask(a, "127.0.0.3", "y.denied.test"), Some(REFUSED));

    // Relabelled: no policy selects it any more, so it is not enforced.
    api.apply(Res::Pods, pod("api", "127.0.0.3", "batch"));
    until(a, "127.0.0.3", "y.denied.test", NOERROR);
    // A CNP added for its new label, then edited.
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("batch-dns", "batch", "*.batch.test"),
    );
    until(a, "127.0.0.3", "y.denied.test", REFUSED);
    assert_eq!(ask(a, "127.0.0.3", "y.batch.test"), Some(NOERROR));
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("batch-dns", "batch", "*.batch2.test"),
    );
    until(a, "127.0.0.3", "y.batch.test", REFUSED);
    assert_eq!(ask(a, "127.0.0.3", "y.batch2.test"), Some(NOERROR));

    // 410 Gone: the watches end, the source relists; a deletion made meanwhile applies.
    let relists = agent.metric_sum("dnsfence_k8s_relists_total");
    api.expire();
    api.delete(Res::Pods, "shop", "api");
    until(a, "127.0.0.3", "y.batch2.test", REFUSED);
    agent.wait_metric("dnsfence_k8s_relists_total", relists + 1.0);
    assert_eq!(ask(a, "127.0.0.2", "x.allowed.test"), Some(NOERROR));

    // The API server down: nothing changes, the last state stays in force.
    api.set_down(true);
    let down = poll_until(Duration::from_secs(10), || {
        (agent.metric_sum("dnsfence_k8s_connected") == 0.0).then_some(())
    });
    assert!(down.is_some(), "{}", agent.metrics_text());
    let status = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["status", "--skip", "proxy", "--agent-metrics"])
        .arg(agent.metrics.to_string())
        .output()
        .expect("dnsfence status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("kubernetes: API server unreachable (the last state stays in force)"),
        "{text}"
    );
    for _ in 0..3 {
        assert_eq!(ask(a, "127.0.0.2", "x.allowed.test"), Some(NOERROR));
        assert_eq!(ask(a, "127.0.0.2", "x.denied.test"), Some(REFUSED));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Back: a change made while it was down applies.
    api.apply(
        Res::CiliumNetworkPolicies,
        cnp("web-dns", "web", "*.denied.test"),
    );
    api.set_down(false);
    until(a, "127.0.0.2", "x.denied.test", NOERROR);
    assert_eq!(ask(a, "127.0.0.2", "x.allowed.test"), Some(REFUSED));
    agent.wait_metric("dnsfence_k8s_connected", 1.0);
    assert!(agent.metric_sum("dnsfence_k8s_watch_errors_total") >= 1.0);
}

/// Without the API's first full state the agent does not serve; it says why and exits.
#[test]
fn no_full_state_no_service() {
    let api = FakeApi::start();
    let dir = TempDir::new("k8s-down");
    api.set_down(true);
    let upstream = Bundled::start(&[]);
    let mut config = AgentConfig::new(IoBackend::Uring, upstream.addr).args(&[
        "--node-name",
        "n1",
        "--k8s-sync-timeout",
        "1s",
    ]);
    config.kubeconfig = Some(api.kubeconfig(dir.path()));
    let mut agent = Agent::spawn(&config);
    let status = agent.process.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        agent.process.stderr()
    );
    assert!(
        agent
            .process
            .stderr()
            .contains("the Kubernetes API gave no full state within 1s"),
        "{}",
        agent.process.stderr()
    );
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

/// Review finding: without `--kubeconfig` the agent took `$KUBECONFIG` (or `~/.kube/config`)
/// before the in-cluster configuration, so an agent on a control-plane node, run as root,
/// used root's admin kubeconfig (or another cluster's). Only the pod's service account is
/// taken: outside a pod, without `--kubeconfig`, it says so and exits.
#[test]
fn without_kubeconfig_only_the_in_cluster_configuration_is_taken() {
    let api = FakeApi::start();
    let dir = TempDir::new("k8s-incluster");
    let kubeconfig = api.kubeconfig(dir.path());
    let upstream = Bundled::start(&[]);
    let mut cmd = std::process::Command::new(dnsfence_tests::bin("dnsfence"));
    cmd.args(["agent", "--no-bpf", "--k8s", "--node-name", "n1"])
        .args(["--k8s-sync-timeout", "2s", "--io", "mmsg", "--shards", "1"])
        .arg("--listen")
        .arg(dnsfence_tests::free_addr().to_string())
        .arg("--metrics-listen")
        .arg(dnsfence_tests::free_addr().to_string())
        .arg("--upstream")
        .arg(upstream.addr.to_string())
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    let mut agent = dnsfence_tests::Process::spawn("agent", cmd, dir.path());
    let status = agent.wait_timeout(Duration::from_secs(10));
    let stderr = agent.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("no in-cluster Kubernetes configuration"),
        "{stderr}"
    );
}

/// Review finding: a node name that is not the Node object's (the host name often is not)
/// made no pod this node's, so none was enforced, and nothing said so. The agent says so.
#[test]
fn a_node_name_the_api_does_not_know_is_said() {
    let api = FakeApi::start();
    api.apply(
        Res::Nodes,
        json!({"metadata": {"name": "n1"}, "status": {"addresses": []}}),
    );
    let upstream = Bundled::start(&[]);
    for (node, warned) in [("n1", false), ("n1.example.internal", true)] {
        let dir = TempDir::new("k8s-node");
        let mut config =
            AgentConfig::new(IoBackend::Uring, upstream.addr).args(&["--node-name", node]);
        config.kubeconfig = Some(api.kubeconfig(dir.path()));
        let mut agent = Agent::start(&config);
        let stderr = agent.process.stderr();
        assert_eq!(
            stderr.contains("the Kubernetes API has no Node named"),
            warned,
            "--node-name {node}: {stderr}"
        );
        agent.process.terminate(Duration::from_secs(5));
    }
}
