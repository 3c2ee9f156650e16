//! Issue #3 acceptance: dnsperf at 20k queries per second for 10 s through the agent loses
//! less than 0.1%, on each I/O backend. Alone in its test binary, and the two runs take turns,
//! so no other test competes for the two CPUs.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, both_backends, dig, release_build};

both_backends! {
    dnsperf_20k_qps_10s_loses_under_0_1_percent => dnsperf_20k,
}

/// One dnsperf run at a time.
static TURN: Mutex<()> = Mutex::new(());

/// The numbers dnsperf prints at the end.
#[derive(Debug, Default)]
struct Summary {
    sent: u64,
    completed: u64,
    lost: u64,
    qps: f64,
    noerror: u64,
    refused: u64,
}

fn parse(out: &str) -> Summary {
    let mut s = Summary::default();
    let first_number = |rest: &str| -> u64 {
        rest.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Queries sent:") {
            s.sent = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("Queries completed:") {
            s.completed = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("Queries lost:") {
            s.lost = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("Queries per second:") {
            s.qps = rest.trim().parse().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("Response codes:") {
            for part in rest.split(',') {
                let mut f = part.split_whitespace();
                let (Some(code), Some(n)) = (f.next(), f.next()) else {
                    continue;
                };
                let n = n.parse().unwrap_or(0);
                match code {
                    "NOERROR" => s.noerror = n,
                    "REFUSED" => s.refused = n,
                    _ => {}
                }
            }
        }
    }
    s
}

fn dnsperf_20k(io: IoBackend) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let up = Bundled::start(&["--prefix4", "198.18.0.0/15"]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr).shards(2, None));
    let dir = TempDir::new("dnsperf");
    // 3 allowed names out of 4 (plain, CNAME chains, AAAA), 1 denied.
    let lines: Vec<(String, bool)> = (0..4000)
        .map(|i| match i % 4 {
            0 => (format!("host-{i}.allowed.test A"), true),
            1 => (format!("cname-2-h{i}.allowed.test A"), true),
            2 => (format!("host-{i}.allowed.test AAAA"), true),
            _ => (format!("host-{i}.denied.test A"), false),
        })
        .collect();
    let queries: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
    let file = dir.write("queries.txt", &queries);
    assert_eq!(dig(agent.addr, &["host-1.allowed.test"]).status, "NOERROR");

    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["-s", "KILL", "20"])
        .arg("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &agent.addr.port().to_string()])
        .arg("-d")
        .arg(&file)
        .args([
            "-Q", "20000", "-l", "10", "-q", "2000", "-t", "2", "-c", "8",
        ])
        .output()
        .expect("run dnsperf");
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dnsperf failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = parse(&text);
    eprintln!(
        "dnsperf ({} build, {io:?}, 2 shards): {s:?} in {took:?}",
        if release_build() { "release" } else { "debug" }
    );
    assert!(
        s.sent >= 190_000,
        "dnsperf sent only {} queries:\n{text}",
        s.sent
    );
    assert_eq!(s.sent, s.completed + s.lost, "{text}");
    assert!(
        s.lost * 1000 < s.sent,
        "lost {} of {} (>= 0.1%):\n{text}",
        s.lost,
        s.sent
    );
    // dnsperf sends the file's lines in order, from the start, cycling: so the queries sent
    // hold exactly this many denied ones. Each denied query is REFUSED and each allowed one
    // answered NOERROR, up to the queries that got no answer or another rcode (< 0.1 %).
    let denied = (0..s.sent as usize)
        .filter(|&i| !lines[i % lines.len()].1)
        .count() as u64;
    let allowed = s.sent - denied;
    let missing = s.sent.saturating_sub(s.noerror + s.refused);
    eprintln!(
        "expected {denied} REFUSED and {allowed} NOERROR ({}/{} %), {missing} missing",
        denied * 100 / s.sent,
        allowed * 100 / s.sent
    );
    assert!(
        missing * 1000 < s.sent,
        "{missing} of {} queries neither NOERROR nor REFUSED (>= 0.1%):\n{text}",
        s.sent
    );
    assert!(
        s.refused <= denied && s.refused + missing >= denied,
        "{} REFUSED, but {denied} of the {} queries sent were denied ({missing} missing):\n{text}",
        s.refused,
        s.sent
    );
    assert!(
        s.noerror <= allowed && s.noerror + missing >= allowed,
        "{} NOERROR, but {allowed} of the {} queries sent were allowed ({missing} missing):\n{text}",
        s.noerror,
        s.sent
    );
    assert!(took < Duration::from_secs(15), "dnsperf took {took:?}");
    let mut agent = agent;
    agent.process.assert_running();
}
