//! The Grafana dashboard (`deploy/grafana/dnsfence.json`) names only metrics that exist: every
//! `dnsfence_*` series in its queries is a sample on the metrics page of a running agent
//! (with the Kubernetes source) or of its standalone proxy.
use std::collections::BTreeSet;

use dnsfence_testkit::kube::{FakeApi, Res};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, free_addr};
use serde_json::{Value, json};

/// The `dnsfence_*` series named in the dashboard's queries.
fn dashboard_series() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/dnsfence.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("dnsfence_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// The sample names of a metrics page.
fn samples(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_dashboard_series_exists() {
    let names = dashboard_series();
    assert!(names.len() >= 20, "{names:?}");
    let api = FakeApi::start();
    api.apply(Res::Namespaces, json!({"metadata": {"name": "default"}}));
    let dir = TempDir::new("dashboard");
    let upstream = Bundled::start(&[]);
    let listen = free_addr();
    let mut agent =
        AgentConfig::ha_pair(dir.path(), listen, upstream.addr, false).args(&["--node-name", "n1"]);
    agent.kubeconfig = Some(api.kubeconfig(dir.path()));
    let agent = Agent::start(&agent);
    let proxy = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        true,
    ));
    let mut seen = samples(&agent.metrics_text());
    seen.extend(samples(&proxy.metrics_text()));
    let missing: Vec<&String> = names.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\nseen: {seen:?}"
    );
}
