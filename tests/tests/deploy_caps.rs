//! The capability sets of `deploy/kubernetes` are the ones that work, and each is the smallest
//! (root; real BPF and cgroups). Reads `capabilities.add` from the agent's and the proxy's
//! DaemonSet, runs each process with exactly that bounding set (`setpriv`, uid 0 as in the
//! manifests): both start, the agent installs the datapath and a redirected query from an
//! endpoint cgroup is answered, and neither loses its SO_REUSEPORT steering. Then each
//! capability is dropped in turn: each drop must break something (no start, or no steering).
use std::process::Command;
use std::time::{Duration, Instant};

use dnsfence_tests::bpf::{self, EXCLUSIVE, Env, require_root};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, free_port};

const NO_STEERING: &str = "warning: no SO_REUSEPORT steering";

/// `capabilities.add` of the one container of `deploy/kubernetes/<file>`, e.g. `["BPF", ...]`.
fn manifest_caps(file: &str) -> Vec<String> {
    let path = format!("{}/../deploy/kubernetes/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let line = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add: ["))
        .unwrap_or_else(|| panic!("{path}: no `add: [...]` line"));
    let caps: Vec<String> = line
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    assert!(
        !caps.is_empty() && caps.iter().all(|c| !c.is_empty()),
        "{path}: {line}"
    );
    caps
}

/// `setpriv` keeping only `caps` (Kubernetes names) in the bounding set: uid 0 then has exactly
/// those.
fn with_caps(caps: &[String]) -> Vec<String> {
    let mut set = String::from("-all");
    for c in caps {
        set.push_str(",+");
        set.push_str(&c.to_lowercase());
    }
    vec![
        "setpriv".into(),
        format!("--bounding-set={set}"),
        "--".into(),
    ]
}

/// Spawns `config` and waits until it serves (its "serving" line) or exits; returns its stderr
/// and whether it is still running (then it is stopped).
fn outcome(config: &AgentConfig) -> (bool, String) {
    let mut process = Agent::spawn(config);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stderr = process.process.stderr();
        if process.process.try_status().is_some() {
            return (false, stderr);
        }
        if stderr.contains(": serving ") || Instant::now() >= deadline {
            process.process.terminate(Duration::from_secs(5));
            return (true, stderr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_manifests_capability_sets_work_and_each_capability_is_needed() {
    if !require_root("deploy_caps") {
        return;
    }
    assert!(
        Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is needed"
    );
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let agent_caps = manifest_caps("agent.yaml");
    let proxy_caps = manifest_caps("proxy.yaml");
    let env = Env::new("caps", &["a", "b"]);
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("caps");
    let port = free_port();

    // Exactly the manifests' sets: both serve, the datapath redirects, steering is on.
    let mut agent_config = bpf::pair_config(&env, &dir, upstream.addr, port, false);
    agent_config.wrapper = with_caps(&agent_caps);
    let mut agent = Agent::start(&agent_config);
    let mut proxy_config = bpf::pair_config(&env, &dir, upstream.addr, port, true);
    proxy_config.wrapper = with_caps(&proxy_caps);
    let mut proxy = Agent::start(&proxy_config);
    let dig = env.dig(Some("a"), bpf::server(), &["www.allowed.test"]);
    assert_eq!(dig.status, "NOERROR", "{dig:?}\n{}", agent.process.stderr());
    for (who, p) in [("agent", &mut agent), ("proxy", &mut proxy)] {
        p.process.assert_running();
        let stderr = p.process.stderr();
        assert!(
            !stderr.contains(NO_STEERING),
            "{who} with {agent_caps:?}/{proxy_caps:?}:\n{stderr}"
        );
    }

    // The proxy without each of its capabilities (the agent still up): no steering, or no start.
    for drop in &proxy_caps {
        let fewer: Vec<String> = proxy_caps.iter().filter(|c| *c != drop).cloned().collect();
        let mut c = bpf::pair_config(&env, &dir, upstream.addr, port, true);
        c.wrapper = with_caps(&fewer);
        let (running, stderr) = outcome(&c);
        assert!(
            !running || stderr.contains(NO_STEERING),
            "the proxy without {drop} lost nothing: {drop} is not needed\n{stderr}"
        );
    }
    proxy.process.terminate(Duration::from_secs(5));
    let status = agent.process.terminate(Duration::from_secs(5));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        agent.process.stderr()
    );
    let out = Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "{out:?}");

    // The agent without each of its capabilities: no start, or no steering.
    for drop in &agent_caps {
        let fewer: Vec<String> = agent_caps.iter().filter(|c| *c != drop).cloned().collect();
        let mut c = bpf::pair_config(&env, &dir, upstream.addr, port, false);
        c.wrapper = with_caps(&fewer);
        let (running, stderr) = outcome(&c);
        let _ = Command::new(dnsfence_tests::bin("dnsfence"))
            .args(["agent", "--uninstall", "--bpf-pin"])
            .arg(&env.pin)
            .output();
        assert!(
            !running || stderr.contains(NO_STEERING),
            "the agent without {drop} lost nothing: {drop} is not needed\n{stderr}"
        );
    }
}
