//! Issue 9 item 1: the metrics move with traffic by exactly what the load generator sent
//! (allowed and denied apart), and the health probes say what the process is: alive and
//! ready when serving, not ready while the proxy has no policy or while a process drains.
use std::time::Duration;

use dnsfence_tests::dns::{self, TYPE_A};
use dnsfence_tests::upstream::{Bundled, FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, free_addr, loadgen, poll_until};

const T: Duration = Duration::from_secs(5);

/// The sample of `name` with exactly `labels` (0 when absent).
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    dns::metric_values(text, name)
        .into_iter()
        .find(|(l, _)| l == labels)
        .map_or(0.0, |(_, v)| v)
}

/// The sum of `name`'s samples.
fn total(text: &str, name: &str) -> f64 {
    dns::metric_values(text, name).iter().map(|(_, v)| v).sum()
}

/// The metrics page once `dnsfence_queries_total` holds still (shards publish about every
/// 100 ms) at `at_least` or more.
fn settled(agent: &Agent, at_least: f64) -> String {
    let mut last = -1.0;
    poll_until(T, || {
        std::thread::sleep(Duration::from_millis(250));
        let text = agent.metrics_text();
        let now = total(&text, "dnsfence_queries_total");
        let stable = now == last && now >= at_least;
        last = now;
        stable.then_some(text)
    })
    .unwrap_or_else(|| panic!("queries_total does not settle: {}", agent.metrics_text()))
}

/// `(status, body)` of `GET path`.
fn probe(agent: &Agent, path: &str) -> (u16, String) {
    dns::http_get_status(agent.metrics, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[test]
fn counters_move_by_exactly_the_queries_sent() {
    const QUERIES: u64 = 240;
    let upstream = Bundled::start(&[]);
    let agent = Agent::start(&AgentConfig::new(IoBackend::Uring, upstream.addr).shards(2, None));
    // One pass over the file: every fourth name denied, the others allowed.
    let dir = TempDir::new("metrics-load");
    let names: String = (0..QUERIES)
        .map(|i| match i % 4 {
            0 => format!("n{i}.denied.test A\n"),
            _ => format!("n{i}.allowed.test A\n"),
        })
        .collect();
    let file = dir.write("queries.txt", &names);
    let before = settled(&agent, agent.probes_answered as f64);

    let report = loadgen(agent.addr, &file, 240, 1.0);
    let sent = report["sent"].as_u64().expect("sent") as f64;
    let noerror = report["rcodes"]["NOERROR"].as_u64().unwrap_or(0) as f64;
    let refused = report["rcodes"]["REFUSED"].as_u64().unwrap_or(0) as f64;
    assert_eq!(sent, QUERIES as f64, "{report}");
    assert_eq!(
        (noerror, refused),
        (sent * 0.75, sent * 0.25),
        "every query answered: {report}"
    );

    let after = settled(&agent, total(&before, "dnsfence_queries_total") + sent);
    let moved =
        |name: &str, labels: &str| sample(&after, name, labels) - sample(&before, name, labels);
    let moved_total = |name: &str| total(&after, name) - total(&before, name);
    assert_eq!(moved_total("dnsfence_queries_total"), sent, "{after}");
    assert_eq!(moved_total("dnsfence_forwarded_total"), noerror);
    assert_eq!(moved_total("dnsfence_refused_total"), refused);
    assert_eq!(moved_total("dnsfence_answered_total"), noerror);
    let verdicts = "dnsfence_query_verdicts_total";
    assert_eq!(
        moved(verdicts, r#"verdict="forwarded""#),
        noerror,
        "{after}"
    );
    assert_eq!(moved(verdicts, r#"verdict="denied""#), refused, "{after}");
    // Every query has one verdict: they add up to the queries, before and after.
    for text in [&before, &after] {
        assert_eq!(
            total(text, verdicts),
            total(text, "dnsfence_queries_total"),
            "{text}"
        );
    }
    let local = "dnsfence_local_answers_total";
    assert_eq!(moved(local, r#"rcode="REFUSED""#), refused, "{after}");
    assert_eq!(moved(local, r#"rcode="SERVFAIL""#), 0.0, "{after}");
    assert_eq!(
        moved_total("dnsfence_upstream_errors_total"),
        0.0,
        "{after}"
    );
    // Every relayed answer is in the upstream latency histogram and counted by its rcode;
    // the allowed names' fresh addresses took batched writes, timed.
    assert_eq!(
        moved_total("dnsfence_upstream_latency_seconds_count"),
        noerror,
        "{after}"
    );
    // (Cumulative buckets: a loopback upstream answers well within 2.5 s.)
    for le in [r#"le="2.5""#, r#"le="+Inf""#] {
        let bucket = moved("dnsfence_upstream_latency_seconds_bucket", le);
        assert_eq!(bucket, noerror, "{le}: {after}");
    }
    assert!(
        moved_total("dnsfence_upstream_latency_seconds_sum") > 0.0,
        "{after}"
    );
    // Every client query, allowed or denied, went through the processing histogram.
    assert_eq!(
        moved_total("dnsfence_query_processing_seconds_count"),
        sent,
        "{after}"
    );
    let processing = moved_total("dnsfence_query_processing_seconds_sum") / sent;
    assert!(
        processing > 0.0 && processing < 0.01,
        "{processing} s per query: {after}"
    );
    assert_eq!(
        moved("dnsfence_upstream_answers_total", r#"rcode="NOERROR""#),
        noerror,
        "{after}"
    );
    let writes = moved_total("dnsfence_datapath_write_seconds_count");
    assert!(
        writes >= 1.0 && writes <= noerror,
        "{writes} writes: {after}"
    );
    // Both shards took their share, and their loops turned.
    let per_shard = dns::metric_values(&after, "dnsfence_queries_total");
    assert_eq!(per_shard.len(), 2, "{per_shard:?}");
    let loops = dns::metric_values(&after, "dnsfence_shard_loop_iterations_total");
    assert!(
        loops.len() == 2 && loops.iter().all(|(_, n)| *n > 0.0),
        "{loops:?}"
    );
    // The allowed answers' addresses are in the allow table, and its fill says so.
    let entries = total(&after, "dnsfence_allow_entries");
    let capacity = total(&after, "dnsfence_allow_capacity");
    assert!(
        entries >= noerror,
        "{entries} entries for {noerror} allowed names"
    );
    assert_eq!(
        total(&after, "dnsfence_allow_fill_ratio"),
        entries / capacity
    );

    assert_eq!(probe(&agent, "/healthz").0, 200);
    let body = agent.wait_probe("/readyz", 200);
    assert!(body.contains("2 shards serving"), "{body}");
    assert_eq!(probe(&agent, "/nothing").0, 404);
}

/// The standalone proxy with no policy serves (refusing everything) but is not ready; it is
/// once the agent's policy arrives, and says whether it is synced with the agent.
#[test]
fn the_proxy_is_ready_once_a_policy_is_in_force() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("ready");
    let listen = free_addr();
    let mut config = AgentConfig::ha_pair(dir.path(), listen, upstream.addr, true);
    config
        .extra
        .extend(["--first-policy-wait".to_owned(), "100ms".to_owned()]);
    let proxy = Agent::start(&config);
    let (code, body) = probe(&proxy, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no policy in force"), "{body}");
    assert_eq!(probe(&proxy, "/healthz").0, 200, "alive all the same");

    let mut agent = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        false,
    ));
    let ready = proxy.wait_probe("/readyz", 200);
    assert!(ready.contains("synced with the agent"), "{ready}");
    // Ready once its shards have turned their loops (within 100 ms of serving).
    agent.wait_probe("/readyz", 200);
    assert_eq!(probe(&agent, "/healthz").0, 200);

    // The agent gone, the proxy serves alone: still ready, no longer synced.
    agent.process.signal("KILL");
    assert!(agent.process.wait_timeout(T).is_some());
    let alone = poll_until(T, || {
        let (code, body) = probe(&proxy, "/readyz");
        (code == 200 && body.contains("not synced")).then_some(())
    });
    assert!(alone.is_some(), "{:?}", probe(&proxy, "/readyz"));
}

/// A stopping process (SIGTERM) drains its queries in flight: alive, and not ready, so that a
/// load balancer or Kubernetes sends it nothing new meanwhile.
#[test]
fn a_draining_agent_is_not_ready() {
    let silent = FakeUpstream::start(FakeMode::Silent);
    let mut agent = Agent::start(
        &AgentConfig::new(IoBackend::Mmsg, silent.addr).args(&["--upstream-timeout", "4s"]),
    );
    agent.wait_probe("/readyz", 200);
    // A query the upstream never answers keeps the agent draining for the upstream timeout.
    let client = dns::udp_client(T);
    let q = dns::query(7, "www.allowed.test", TYPE_A, None);
    client.send_to(&q, agent.addr).expect("send");
    agent.wait_metric("dnsfence_forwarded_total", 1.0);
    agent.process.signal("TERM");
    let draining = poll_until(Duration::from_secs(3), || {
        let (code, body) = dns::http_get_status(agent.metrics, "/readyz").ok()?;
        (code == 503).then_some(body)
    })
    .unwrap_or_else(|| panic!("still ready after SIGTERM: {}", agent.process.stderr()));
    assert!(draining.contains("stopping"), "{draining}");
    assert_eq!(probe(&agent, "/healthz").0, 200, "alive while draining");
    assert!(
        agent
            .process
            .wait_timeout(Duration::from_secs(10))
            .is_some()
    );
}
