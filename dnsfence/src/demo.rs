//! `dnsfence demo`: the proof a user can run. Starts the bundled upstream and two agents
//! sharing one port (SO_REUSEPORT) on loopback, drives open-loop load with
//! `dnsfence-loadgen`, kills one agent with SIGKILL mid-run and restarts it, then prints the
//! per-second timeline and the verdict counts. Exit 0 only when no denied name was answered
//! and no allowed name was refused.
//!
//! Until the standalone proxy exists (the HA work), the second process is a second agent.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Flags of `dnsfence demo` (all optional).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 12)]
    duration: u32,
    /// Queries per second for allowed names (denied names get a quarter of it on top).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Second at which one agent is killed with SIGKILL.
    #[arg(long, default_value_t = 4)]
    kill_at: u32,
    /// Second at which it is started again.
    #[arg(long, default_value_t = 7)]
    restart_at: u32,
    /// Keep the working directory (logs, policy) instead of removing it.
    #[arg(long)]
    keep: bool,
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: demo-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: demo}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "**.allowed.demo.test"}, {matchName: "api.demo.test"}]
  - toFQDNs: [{matchPattern: "**.allowed.demo.test"}, {matchName: "api.demo.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

const ENDPOINTS: &str = r#"endpoints:
- name: demo
  namespace: default
  labels: {app: demo}
  ips: ["127.0.0.1", "::1"]
"#;

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Guard {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("demo: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

/// `s` as one single-quoted shell word (a `'` inside becomes `'\''`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A free loopback port (UDP and TCP are both needed; the race with other programs is
/// accepted for a demo).
fn free_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("pick a free port")?;
    Ok(socket.local_addr()?.port())
}

/// Sends an A query for `name` to `server` and returns the rcode of the answer, if any.
fn probe(server: SocketAddr, name: &str) -> Option<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut query = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, server).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    (n >= 12 && buf[0..2] == [0x42, 0x42]).then_some(buf[3] & 0x0f)
}

fn wait_for(server: SocketAddr, name: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if probe(server, name) == Some(0) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer on {server} within 10 s")
}

fn spawn(name: &'static str, program: &Path, args: &[String], log: &Path) -> Result<Guard> {
    let log_file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    Ok(Guard { name, child })
}

/// Runs the demo; exit status follows the proof.
pub fn run(args: &DemoArgs) -> Result<bool> {
    if args.kill_at >= args.restart_at || args.restart_at >= args.duration {
        bail!("need --kill-at < --restart-at < --duration");
    }
    let exe = std::env::current_exe().context("locate dnsfence")?;
    let loadgen = exe.with_file_name("dnsfence-loadgen");
    if !loadgen.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p dnsfence-loadgen`",
            loadgen.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("dnsfence-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let result = run_in(args, &exe, &loadgen, &dir);
    if args.keep {
        eprintln!("demo: logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(args: &DemoArgs, exe: &Path, loadgen: &Path, dir: &Path) -> Result<bool> {
    let policy = dir.join("policy.yaml");
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(&policy, POLICY)?;
    std::fs::write(&endpoints, ENDPOINTS)?;
    let allowed = dir.join("allowed.txt");
    let denied = dir.join("denied.txt");
    let mut text = String::new();
    for i in 0..500 {
        let _ = writeln!(text, "host{i}.svc{}.allowed.demo.test A", i % 7);
    }
    text.push_str("api.demo.test AAAA\n");
    std::fs::write(&allowed, text)?;
    let mut text = String::new();
    for i in 0..100 {
        let _ = writeln!(text, "exfil{i}.blocked.example A");
    }
    text.push_str("allowed.demo.test A\n"); // the apex of `**.allowed.demo.test`: denied
    std::fs::write(&denied, text)?;

    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let upstream_args = vec!["upstream".into(), "--listen".into(), upstream.to_string()];
    let _upstream = spawn(
        "upstream",
        loadgen,
        &upstream_args,
        &dir.join("upstream.log"),
    )?;
    wait_for(upstream, "probe.allowed.demo.test", "the upstream")?;

    let agent_args: Vec<String> = [
        "agent",
        "--no-bpf",
        "--listen",
        &listen.to_string(),
        "--upstream",
        &upstream.to_string(),
        "--policy",
        &policy.display().to_string(),
        "--endpoints",
        &endpoints.display().to_string(),
        "--upstream-timeout",
        "1s",
        "--no-metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent_a = spawn("agent A", exe, &agent_args, &dir.join("agent-a.log"))?;
    wait_for(listen, "probe.allowed.demo.test", "agent A")?;
    let agent_b = spawn("agent B", exe, &agent_args, &dir.join("agent-b.log"))?;
    // Both share the port: wait until B logs that it serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(dir.join("agent-b.log"))?.contains("serving") {
        if Instant::now() > deadline {
            bail!(
                "agent B did not start: see {}",
                dir.join("agent-b.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The restart runs from the loadgen's scenario, in the background, and records its PID.
    let restart_pid = dir.join("agent-a2.pid");
    let quoted: Vec<String> = agent_args.iter().map(|a| shell_quote(a)).collect();
    let restart = format!(
        "{} {} > {} 2>&1 & echo $! > {}",
        shell_quote(&exe.display().to_string()),
        quoted.join(" "),
        shell_quote(&dir.join("agent-a2.log").display().to_string()),
        shell_quote(&restart_pid.display().to_string())
    );
    println!(
        "dnsfence demo: upstream {upstream}, agents A (pid {}) and B (pid {}) on {listen}",
        agent_a.pid(),
        agent_b.pid()
    );
    println!(
        "load: {} qps allowed + {} qps denied for {} s; kill -9 agent A at {} s, restart at {} s",
        args.rate,
        args.rate / 4,
        args.duration,
        args.kill_at,
        args.restart_at
    );
    let common = |queries: &Path, rate: u32| -> Vec<String> {
        vec![
            "--server".into(),
            listen.to_string(),
            "--queries".into(),
            queries.display().to_string(),
            "--rate".into(),
            rate.to_string(),
            "--duration".into(),
            args.duration.to_string(),
            "--timeout".into(),
            "1500".into(),
            "--json".into(),
            "--quiet".into(),
        ]
    };
    let mut allowed_args = common(&allowed, args.rate);
    allowed_args.extend([
        "--at".into(),
        format!("{}:kill -9 {}", args.kill_at, agent_a.pid()),
        "--at".into(),
        format!("{}:{restart}", args.restart_at),
    ]);
    let allowed_run = Command::new(loadgen)
        .args(&allowed_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the load generator")?;
    let denied_run = Command::new(loadgen)
        .args(common(&denied, (args.rate / 4).max(1)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the load generator")?;
    let allowed_out = allowed_run.wait_with_output()?;
    let denied_out = denied_run.wait_with_output()?;
    // The killed agent is gone; reap it so its guard does not try to stop it.
    drop(agent_a);
    let restarted = std::fs::read_to_string(&restart_pid)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let restarted_served = std::fs::read_to_string(dir.join("agent-a2.log"))
        .map(|log| log.contains("serving"))
        .unwrap_or(false);
    if let Some(pid) = restarted {
        terminate(pid);
    }
    drop(agent_b);

    let allowed: Value =
        serde_json::from_slice(&allowed_out.stdout).context("load generator output (allowed)")?;
    let denied: Value =
        serde_json::from_slice(&denied_out.stdout).context("load generator output (denied)")?;
    Ok(report(&allowed, &denied, restarted_served))
}

fn count(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn report(allowed: &Value, denied: &Value, restarted_served: bool) -> bool {
    println!();
    println!("  t  | sent  answered  timeouts  p99 (µs) | event");
    println!("-----+----------------------------------+------------------");
    let events: Vec<(u64, String)> = allowed["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| {
                    let t = e["t_s"].as_f64().unwrap_or(0.0) as u64;
                    let command = e["command"].as_str().unwrap_or("");
                    let what = if command.starts_with("kill -9") {
                        "agent A killed (SIGKILL)".to_owned()
                    } else {
                        "agent A restarted".to_owned()
                    };
                    (t, what)
                })
                .collect()
        })
        .unwrap_or_default();
    let empty = Vec::new();
    let timeline = allowed["timeline"].as_array().unwrap_or(&empty);
    let denied_timeline = denied["timeline"].as_array().unwrap_or(&empty);
    for (i, row) in timeline.iter().enumerate() {
        let d = denied_timeline.get(i);
        let sent = count(row, &["sent"]) + d.map_or(0, |d| count(d, &["sent"]));
        let answered = count(row, &["answered"]) + d.map_or(0, |d| count(d, &["answered"]));
        let timeouts = count(row, &["timeouts"]) + d.map_or(0, |d| count(d, &["timeouts"]));
        let t = count(row, &["t_s"]);
        let event: Vec<&str> = events
            .iter()
            .filter(|(at, _)| *at == t)
            .map(|(_, what)| what.as_str())
            .collect();
        println!(
            "{t:>4} | {sent:>5} {answered:>9} {timeouts:>9} {:>9} | {}",
            count(row, &["p99_us"]),
            event.join(", ")
        );
    }
    let sent = count(allowed, &["sent"]) + count(denied, &["sent"]);
    let lost = count(allowed, &["timeouts"]) + count(denied, &["timeouts"]);
    let allowed_refused =
        count(allowed, &["rcodes", "REFUSED"]) + count(allowed, &["rcodes", "NXDOMAIN"]);
    let allowed_servfail = count(allowed, &["rcodes", "SERVFAIL"]);
    let denied_answered = count(denied, &["rcodes", "NOERROR"]);
    let denied_refused = count(denied, &["rcodes", "REFUSED"]);
    println!();
    println!("queries sent:              {sent}");
    println!(
        "queries lost:              {lost} ({:.3}%: what sat in the killed agent's socket \
         queue or upstream; clients retry these)",
        100.0 * lost as f64 / sent.max(1) as f64
    );
    println!(
        "allowed names answered:    {}",
        count(allowed, &["rcodes", "NOERROR"])
    );
    println!("allowed names SERVFAIL:    {allowed_servfail}");
    println!("allowed names refused:     {allowed_refused} (must be 0)");
    println!("denied names refused:      {denied_refused}");
    println!("denied names answered:     {denied_answered} (must be 0)");
    println!(
        "restarted agent served:    {}",
        if restarted_served { "yes" } else { "no" }
    );
    let holds = allowed_refused == 0
        && denied_answered == 0
        && count(allowed, &["answered"]) > 0
        && denied_refused > 0
        && restarted_served;
    println!();
    println!(
        "proof {}",
        if holds {
            "holds: DNS kept answering through the failover and policy never widened"
        } else {
            "FAILED"
        }
    );
    holds
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn shell_quoting_survives_quotes() {
        let tricky = "/tmp/it's $(here)";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(tricky)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), tricky);
    }
}
