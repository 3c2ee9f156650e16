//! Issue 9 item 3: `dnsfence status` asks the agent and the standalone proxy, says what they
//! are, and exits non-zero when one of them is unreachable.
use std::process::{Command, Output};
use std::time::Duration;

use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, bin, free_addr};

/// `dnsfence status ARGS`: its output and its stdout.
fn run_status(args: &[&str]) -> (Output, String) {
    let out = Command::new(bin("dnsfence"))
        .arg("status")
        .args(args)
        .output()
        .expect("run dnsfence status");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

fn status(agent: &Agent, proxy: &Agent, extra: &[&str]) -> (Output, String) {
    let (agent, proxy) = (agent.metrics.to_string(), proxy.metrics.to_string());
    let args = ["--agent-metrics", &agent, "--proxy-metrics", &proxy];
    run_status(&[&args[..], extra].concat())
}

#[test]
fn status_reports_a_killed_proxy_and_fails() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("status");
    let listen = free_addr();
    let agent = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        false,
    ));
    let mut proxy = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        true,
    ));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    agent.wait_probe("/readyz", 200);
    proxy.wait_probe("/readyz", 200);

    let (out, text) = status(&agent, &proxy, &[]);
    assert!(out.status.success(), "{:?}: {text}", out.status);
    for line in [
        format!("agent {}: healthy, ready", agent.metrics),
        format!("proxy {}: healthy, ready", proxy.metrics),
        "policy: generation 1, version 1, 1 endpoints".to_owned(),
        "shards: 1, I/O backend uring".to_owned(),
        "sync: 1 proxies connected".to_owned(),
        "sync: synced with the agent".to_owned(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }

    proxy.process.signal("KILL");
    assert!(proxy.process.wait_timeout(Duration::from_secs(5)).is_some());
    let (out, text) = status(&agent, &proxy, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let unreachable = format!("proxy {}: UNREACHABLE", proxy.metrics);
    assert!(text.contains(&unreachable), "{text}");
    assert!(
        text.contains(&format!("agent {}: healthy, ready", agent.metrics)),
        "{text}"
    );
    // Left out, the dead proxy does not fail the agent's status.
    let (out, text) = status(&agent, &proxy, &["--skip", "proxy"]);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("proxy"), "{text}");
}

/// A listener that answers every connection with `reply` once it has read the request, then
/// (with `trickle`) one more byte every 200 ms until the client goes.
fn foreign(reply: &'static [u8], trickle: bool) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(reply);
                let started = std::time::Instant::now();
                while trickle
                    && started.elapsed() < Duration::from_secs(30)
                    && stream.write_all(b"x").is_ok()
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
    });
    addr
}

fn status_at(agent: std::net::SocketAddr, extra: &[&str]) -> (Output, String) {
    let agent = agent.to_string();
    let args = ["--agent-metrics", &agent, "--skip", "proxy"];
    run_status(&[&args[..], extra].concat())
}

/// Another HTTP server on the agent's address, answering 200 to everything, is not taken for
/// a healthy agent.
#[test]
fn status_fails_on_another_http_server() {
    let addr = foreign(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n",
        false,
    );
    let (out, text) = status_at(addr, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("not a dnsfence endpoint"), "{text}");
    assert!(!text.contains("healthy"), "{text}");
}

/// A peer that trickles its answer does not hold `status` past its --timeout.
#[test]
fn status_gives_up_on_a_trickling_peer_in_time() {
    let addr = foreign(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", true);
    let started = std::time::Instant::now();
    let (out, text) = status_at(addr, &["--timeout", "1s"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("UNREACHABLE (read: timed out after 1s)"),
        "{text}"
    );
    assert!(
        took < Duration::from_secs(3),
        "status took {took:?}: {text}"
    );
}

/// Leaving both processes out is a usage error, not an empty success.
#[test]
fn status_with_nothing_to_check_is_a_usage_error() {
    let (out, _) = run_status(&["--skip", "agent", "--skip", "proxy"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to check"));
}
