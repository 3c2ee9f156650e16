//! `dnsfence observe` (issue 9 item 2): the agent's flow history on its observe socket, with
//! real processes on loopback (`--no-bpf`), every wait bounded: allowed and denied queries
//! with their fields (`-o json` and text), `--follow`, the standalone proxy's flows made
//! while the agent was down (after it returns, tagged `proxy`), the filters, and an absent
//! socket.
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dnsfence_tests::dns::{self, TYPE_A};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{
    Agent, AgentConfig, ENDPOINTS, IoBackend, Process, TempDir, bin, free_addr, poll_until,
};
use serde_json::Value;

/// `dnsfence observe --observe-socket SOCKET ARGS`: its exit success, stdout and stderr
/// (killed after 15 s).
fn observe(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let dir = TempDir::new("observe-client");
    let mut cmd = Command::new(bin("dnsfence"));
    cmd.arg("observe")
        .arg("--observe-socket")
        .arg(socket)
        .args(args);
    let mut p = Process::spawn("dnsfence-observe", cmd, dir.path());
    let status = p
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("observe {args:?} still running after 15 s"));
    (status.success(), p.stdout(), p.stderr())
}

/// The flows `observe -o json ARGS` prints (panics when it fails).
fn flows(socket: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = observe(socket, &all);
    assert!(ok, "observe {args:?} failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The flow for `query` (with its trailing dot) among `flows`.
fn find<'a>(flows: &'a [Value], query: &str) -> Option<&'a Value> {
    flows.iter().find(|f| f["query"] == query)
}

/// Polls (10 s at most) until `observe -o json ARGS` shows a flow for each of `queries`.
fn wait_for(socket: &Path, args: &[&str], queries: &[&str]) -> Vec<Value> {
    let mut last = Vec::new();
    let got = poll_until(Duration::from_secs(10), || {
        last = flows(socket, args);
        queries
            .iter()
            .all(|q| find(&last, q).is_some())
            .then(|| last.clone())
    });
    got.unwrap_or_else(|| panic!("{queries:?} not in observe {args:?}: {last:#?}"))
}

/// Asks `name` (type A) from `from` (port 0: any), asked again once after 500 ms without an
/// answer; the answer's rcode, addresses and the source address used.
fn ask_from(
    server: SocketAddr,
    from: IpAddr,
    id: u16,
    name: &str,
) -> (u8, Vec<String>, SocketAddr) {
    let s = UdpSocket::bind((from, 0)).expect("bind client");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let q = dns::query(id, name, TYPE_A, None);
    for _ in 0..2 {
        s.send_to(&q, server).expect("send");
        if let Some(a) = dns::recv_reply(&s, Duration::from_millis(500)) {
            let msg = dns::parse(&a);
            let local = s.local_addr().expect("local addr");
            return (dns::rcode(&a), dns::addresses(&msg), local);
        }
    }
    panic!("no answer to {name} from {from}");
}

fn ask(server: SocketAddr, id: u16, name: &str) -> (u8, Vec<String>, SocketAddr) {
    ask_from(server, IpAddr::from([127, 0, 0, 1]), id, name)
}

/// An agent (io_uring, `--no-bpf`) with its observe socket at `dir/observe.sock`.
fn agent_with_socket(dir: &Path, upstream: SocketAddr, endpoints: &str) -> (Agent, PathBuf) {
    let socket = dir.join("observe.sock");
    let mut c = AgentConfig::new(IoBackend::Uring, upstream).args(&[
        "--observe-socket",
        socket.to_str().expect("utf-8"),
        "--agent-socket",
        dir.join("agent.sock").to_str().expect("utf-8"),
    ]);
    c.endpoints = endpoints.to_owned();
    (Agent::start(&c), socket)
}

/// A forwarded query of `default/client`, answered NOERROR with `ips`, served by `by`.
fn assert_forwarded(flow: &Value, by: &str, ips: &[String]) {
    assert_eq!(flow["endpoint"], "default/client", "{flow}");
    assert_eq!(flow["verdict"], "FORWARDED", "{flow}");
    assert_eq!(flow["rcode"], "NOERROR", "{flow}");
    assert_eq!(flow["served_by"], by, "{flow}");
    let mut got: Vec<String> = flow["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|v| v.as_str().expect("ip").to_owned())
        .collect();
    let mut want = ips.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the answer's addresses: {flow}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[test]
fn allowed_and_denied_queries_appear_with_their_fields() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("observe-fields");
    let (agent, socket) = agent_with_socket(dir.path(), upstream.addr, ENDPOINTS);
    let before = now_ms();
    let (rcode, ips, allowed_from) = ask(agent.addr, 1, "www.allowed.test");
    assert_eq!(rcode, 0);
    assert!(!ips.is_empty(), "the upstream answers addresses");
    let (rcode, _, denied_from) = ask(agent.addr, 2, "evil.denied.test");
    assert_eq!(rcode, 5, "denied: REFUSED");

    let all = wait_for(
        &socket,
        &["--last", "100"],
        &["www.allowed.test.", "evil.denied.test."],
    );
    let a = find(&all, "www.allowed.test.").expect("allowed flow");
    assert_forwarded(a, "agent", &ips);
    assert_eq!(a["namespace"], "default", "{a}");
    assert_eq!(a["client"], allowed_from.to_string(), "{a}");
    assert_eq!(a["type"], "A", "{a}");
    assert_eq!(a["reason"], "Forward", "{a}");
    // The bundled upstream answers TTL 300.
    let ttl = a["ttl"].as_u64().expect("ttl");
    assert!((290..=300).contains(&ttl), "{a}");
    assert!(a["latency_us"].as_u64().expect("latency") > 0, "{a}");
    let t = a["unix_ms"].as_u64().expect("unix_ms");
    assert!(t >= before && t <= now_ms(), "{a}");
    let time = a["time"].as_str().expect("time");
    assert!(time.len() == 24 && time.ends_with('Z'), "{a}");

    let d = find(&all, "evil.denied.test.").expect("denied flow");
    assert_eq!(d["endpoint"], "default/client", "{d}");
    assert_eq!(d["client"], denied_from.to_string(), "{d}");
    assert_eq!(d["verdict"], "DROPPED", "{d}");
    assert_eq!(d["reason"], "Refuse", "{d}");
    assert_eq!(d["rcode"], "REFUSED", "{d}");
    assert_eq!(d["ips"], serde_json::json!([]), "{d}");
    assert!(d["ttl"].is_null() && d["latency_us"].is_null(), "{d}");
    assert_eq!(d["served_by"], "agent", "{d}");

    // The text form: one line per flow, hubble-like.
    let (ok, text, err) = observe(&socket, &["--last", "100"]);
    assert!(ok, "{err}");
    let line = text
        .lines()
        .find(|l| l.contains("www.allowed.test."))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(&format!(
            "default/client ({allowed_from}) DNS Query www.allowed.test. A FORWARDED NOERROR \
             Answer: "
        )) && line.contains(&format!("TTL: {ttl}"))
            && line.ends_with(" by agent"),
        "{line}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("evil.denied.test."))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.ends_with("DNS Query evil.denied.test. A DROPPED REFUSED (Refuse) by agent"),
        "{line}"
    );
}

#[test]
fn follow_streams_a_query_made_after_it_started() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("observe-follow");
    let (agent, socket) = agent_with_socket(dir.path(), upstream.addr, ENDPOINTS);
    ask(agent.addr, 1, "first.allowed.test");
    wait_for(&socket, &["--last", "100"], &["first.allowed.test."]);

    let client_dir = TempDir::new("observe-follower");
    let mut cmd = Command::new(bin("dnsfence"));
    cmd.arg("observe")
        .arg("--observe-socket")
        .arg(&socket)
        .args([
            "--follow",
            "--last",
            "5",
            "--name",
            "allowed.test",
            "-o",
            "json",
        ]);
    let mut follower = Process::spawn("dnsfence-observe", cmd, client_dir.path());
    let out = follower.stdout_path().to_path_buf();
    // Its history shows the first query: it is subscribed (history and follow are taken
    // under one lock, so nothing after it is missed).
    follower.wait_ready(Duration::from_secs(10), || {
        follower_has(&out, "first.allowed.test.")
    });
    ask(agent.addr, 2, "later.allowed.test");
    ask(agent.addr, 3, "not-this.denied.test");
    let streamed = poll_until(Duration::from_secs(10), || {
        follower_has(&out, "later.allowed.test.").then_some(())
    });
    assert!(
        streamed.is_some(),
        "not streamed: {}\nstderr: {}",
        follower.stdout(),
        follower.stderr()
    );
    follower.assert_running();
    assert!(!follower.stdout().contains("not-this.denied.test."));
    let later: Value = follower
        .stdout()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON line"))
        .find(|f| f["query"] == "later.allowed.test.")
        .expect("later");
    assert_eq!(later["verdict"], "FORWARDED");
    assert_eq!(later["served_by"], "agent");
}

/// Whether the JSON lines in `stdout` (a file) have a flow for `query`.
fn follower_has(stdout: &Path, query: &str) -> bool {
    let text = std::fs::read_to_string(stdout).unwrap_or_default();
    text.lines()
        .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|f| f["query"] == query))
}

/// An HA pair (the agent with its observe socket) whose agent was SIGKILLed once the proxy
/// had its policy: only the proxy serves the port.
struct AgentDown {
    _upstream: Bundled,
    _dir: TempDir,
    listen: SocketAddr,
    socket: PathBuf,
    agent_config: AgentConfig,
    proxy: Agent,
}

impl AgentDown {
    fn start(upstream_args: &[&str], name: &str) -> AgentDown {
        let upstream = Bundled::start(upstream_args);
        let dir = TempDir::new(name);
        let listen = free_addr();
        let socket = dir.path().join("observe.sock");
        let agent_config = AgentConfig::ha_pair(dir.path(), listen, upstream.addr, false)
            .args(&["--observe-socket", socket.to_str().expect("utf-8")]);
        let mut agent = Agent::start(&agent_config);
        let proxy = Agent::start(&AgentConfig::ha_pair(
            dir.path(),
            listen,
            upstream.addr,
            true,
        ));
        proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
        agent.process.signal("KILL");
        assert!(agent.process.wait_timeout(Duration::from_secs(5)).is_some());
        AgentDown {
            _upstream: upstream,
            _dir: dir,
            listen,
            socket,
            agent_config,
            proxy,
        }
    }
}

/// Review finding: the proxy's flow records for the agent carried every address of the
/// name (up to `--max-ips-per-name`), and its replay buffer holds records by count: a
/// proxy flow now carries at most `FLOW_ADDRESSES` (4), the lowest.
#[test]
fn a_proxy_flow_carries_at_most_four_addresses() {
    let down = AgentDown::start(&["--ips", "10"], "observe-ha-many");
    let (rcode, mut ips, _) = ask(down.listen, 1, "many.allowed.test");
    assert_eq!(rcode, 0);
    assert_eq!(ips.len(), 10, "{ips:?}");
    down.proxy.wait_metric("dnsfence_forwarded_total", 1.0);

    let _agent = Agent::start(&down.agent_config);
    let all = wait_for(&down.socket, &["--last", "1000"], &["many.allowed.test."]);
    let flow = find(&all, "many.allowed.test.").expect("the flow");
    ips.sort_by_key(|ip| ip.parse::<IpAddr>().expect("an address"));
    assert_forwarded(flow, "proxy", &ips[..4]);
}

#[test]
fn proxy_flows_made_while_the_agent_was_down_appear_after_it_returns() {
    let down = AgentDown::start(&[], "observe-ha");
    let (listen, socket, proxy) = (down.listen, &down.socket, &down.proxy);
    let (rcode, ips, _) = ask(listen, 1, "down.allowed.test");
    assert_eq!(rcode, 0);
    let (rcode, _, _) = ask(listen, 2, "down.denied.test");
    assert_eq!(rcode, 5);
    proxy.wait_metric("dnsfence_forwarded_total", 1.0);
    proxy.wait_metric("dnsfence_refused_total", 1.0);
    // Nobody saw them yet.
    let (ok, _, err) = observe(socket, &["--last", "10"]);
    assert!(!ok, "the agent is down: observe must fail");
    assert_eq!(err.lines().count(), 1, "{err}");

    // The agent returns: the proxy replays them, and observe shows them, tagged `proxy`.
    let _agent = Agent::start(&down.agent_config);
    let all = wait_for(
        socket,
        &["--last", "1000"],
        &["down.allowed.test.", "down.denied.test."],
    );
    let a = find(&all, "down.allowed.test.").expect("allowed");
    assert_forwarded(a, "proxy", &ips);
    let d = find(&all, "down.denied.test.").expect("denied");
    assert_eq!(d["served_by"], "proxy", "{d}");
    assert_eq!(d["verdict"], "DROPPED", "{d}");
    assert_eq!(d["rcode"], "REFUSED", "{d}");
    // And `--name` finds them too (filters apply to the proxy's flows alike).
    let only = flows(socket, &["--last", "1000", "--name", "down.denied.test"]);
    assert_eq!(only.len(), 1, "{only:#?}");
}

#[test]
fn filters_select_by_verdict_endpoint_and_name() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("observe-filters");
    // A second endpoint, prod/other on 127.0.0.2, under no policy (everything forwarded).
    let endpoints = format!(
        "{ENDPOINTS}- name: other\n  namespace: prod\n  labels: {{app: other}}\n  ips: [\"127.0.0.2\"]\n"
    );
    let (agent, socket) = agent_with_socket(dir.path(), upstream.addr, &endpoints);
    let lo = |last: u8| IpAddr::from([127, 0, 0, last]);
    assert_eq!(ask_from(agent.addr, lo(1), 1, "www.allowed.test").0, 0);
    assert_eq!(ask_from(agent.addr, lo(1), 2, "evil.denied.test").0, 5);
    assert_eq!(ask_from(agent.addr, lo(2), 3, "api.other.test").0, 0);
    // An unknown source: DROPPED, endpoint unknown.
    assert_eq!(ask_from(agent.addr, lo(3), 4, "x.stranger.test").0, 5);
    let all = wait_for(
        &socket,
        &["--last", "100"],
        &[
            "www.allowed.test.",
            "evil.denied.test.",
            "api.other.test.",
            "x.stranger.test.",
        ],
    );
    let s = find(&all, "x.stranger.test.").expect("stranger");
    assert_eq!(s["endpoint"], "unknown", "{s}");
    assert!(s["namespace"].is_null(), "{s}");
    assert_eq!(s["reason"], "RefuseUnknownSource", "{s}");
    let o = find(&all, "api.other.test.").expect("other");
    assert_eq!(o["endpoint"], "prod/other", "{o}");

    let queries = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["--last", "100"];
        all.extend_from_slice(args);
        flows(&socket, &all)
            .iter()
            .map(|f| f["query"].as_str().expect("query").to_owned())
            .filter(|q| q != "ready.probe.invalid.")
            .collect()
    };
    let dropped = flows(&socket, &["--last", "100", "--verdict", "DROPPED"]);
    assert!(
        dropped.iter().all(|f| f["verdict"] == "DROPPED"),
        "{dropped:#?}"
    );
    assert_eq!(
        queries(&["--verdict", "dropped"]),
        ["evil.denied.test.", "x.stranger.test."]
    );
    assert_eq!(
        queries(&["--verdict", "FORWARDED"]),
        ["www.allowed.test.", "api.other.test."]
    );
    for endpoint in ["prod/other", "other", "prod/"] {
        assert_eq!(
            queries(&["--endpoint", endpoint]),
            ["api.other.test."],
            "{endpoint}"
        );
    }
    assert_eq!(
        queries(&["--endpoint", "default/client", "--verdict", "FORWARDED"]),
        ["www.allowed.test."]
    );
    assert_eq!(queries(&["--name", "allowed.test"]), ["www.allowed.test."]);
    assert_eq!(
        queries(&["--name", "WWW.allowed.test."]),
        ["www.allowed.test."]
    );
    assert!(queries(&["--name", "llowed.test"]).is_empty());
    assert_eq!(
        queries(&["--name", "other.test", "--name", "stranger.test"]),
        ["api.other.test.", "x.stranger.test."]
    );
    // --last N: the newest N that match.
    assert_eq!(
        flows(&socket, &["--last", "1", "--name", "test"])
            .iter()
            .map(|f| f["query"].clone())
            .collect::<Vec<_>>(),
        ["x.stranger.test."]
    );
    // A verdict the agent does not know is refused in one line.
    let (ok, _, err) = observe(&socket, &["--verdict", "ALLOWED"]);
    assert!(!ok && !err.is_empty(), "{err}");
}

#[test]
fn an_absent_socket_fails_in_one_line() {
    let dir = TempDir::new("observe-absent");
    let (ok, out, err) = observe(&dir.path().join("nothing.sock"), &[]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no observe socket at"), "{err}");
}
