//! `dnsfence status`: asks the agent's and the proxy's endpoints (`/healthz`, `/readyz`,
//! `/metrics`) how they are and prints it; exits non-zero when one it checks is unreachable,
//! not a dnsfence endpoint of the role named, unhealthy or not ready.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::health::Role;
use crate::metrics::{AGENT_LISTEN, PROXY_LISTEN, STARTING};

/// Most bytes read from one answer (a metrics page is tens of KiB).
const MAX_ANSWER: u64 = 8 << 20;

/// Flags of `dnsfence status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's metrics address (its --metrics-listen).
    #[arg(long, value_name = "ADDR:PORT", default_value = AGENT_LISTEN)]
    pub agent_metrics: SocketAddr,
    /// The standalone proxy's metrics address (its --metrics-listen).
    #[arg(long, value_name = "ADDR:PORT", default_value = PROXY_LISTEN)]
    pub proxy_metrics: SocketAddr,
    /// Leave a process out (repeatable): `--skip proxy` where no standalone proxy runs.
    #[arg(long, value_enum)]
    pub skip: Vec<Process>,
    /// How long each request may take, from the connect to the last byte of the answer.
    #[arg(long, default_value = "2s", value_parser = crate::serve::parse_duration)]
    pub timeout: Duration,
}

/// A process `status` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Process {
    /// `dnsfence agent`.
    Agent,
    /// `dnsfence proxy`.
    Proxy,
}

/// Runs `dnsfence status`.
pub fn run(args: &StatusArgs) -> ExitCode {
    if [Process::Agent, Process::Proxy]
        .iter()
        .all(|p| args.skip.contains(p))
    {
        eprintln!("dnsfence status: --skip agent --skip proxy leaves nothing to check");
        return ExitCode::from(2);
    }
    let mut all_ok = true;
    let mut agent_version = None;
    for (process, role, addr) in [
        (Process::Agent, Role::Agent, args.agent_metrics),
        (Process::Proxy, Role::Proxy, args.proxy_metrics),
    ] {
        if args.skip.contains(&process) {
            continue;
        }
        let report = check(role, addr, args.timeout);
        if role == Role::Agent {
            agent_version = report
                .metrics
                .as_ref()
                .ok()
                .map(|m| m.one("policy_version"));
        }
        all_ok &= report.ok();
        print!("{}", report.render(agent_version));
    }
    match all_ok {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}

/// What one process said.
struct Report {
    role: Role,
    addr: SocketAddr,
    /// Why it could not be asked.
    unreachable: Option<String>,
    health: Option<Probe>,
    ready: Option<Probe>,
    /// The metrics page: parsed when it was a 200, else why not.
    metrics: Result<Samples, String>,
}

/// What a peer's text may show on the terminal: control characters (escape sequences a
/// process squatting the port could send to root's terminal, review finding) as `?`, and at
/// most [`SHOWN`] characters.
fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(SHOWN)
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    if text.chars().nth(SHOWN).is_some() {
        out.push_str("...");
    }
    out.replace('\n', "\n    ")
}

/// Most characters of a peer's text shown.
const SHOWN: usize = 400;

/// A probe's status code and body.
struct Probe {
    code: u16,
    body: String,
}

impl Probe {
    fn ok(&self) -> bool {
        self.code == 200
    }
}

fn check(role: Role, addr: SocketAddr, timeout: Duration) -> Report {
    let mut report = Report {
        role,
        addr,
        unreachable: None,
        health: None,
        ready: None,
        metrics: Err("not asked".to_owned()),
    };
    let get = |path: &str| get(addr, path, timeout);
    match get("/healthz") {
        Ok((code, body)) => report.health = Some(Probe { code, body }),
        Err(e) => {
            report.unreachable = Some(format!("{e:#}"));
            return report;
        }
    }
    report.ready = get("/readyz").ok().map(|(code, body)| Probe { code, body });
    report.metrics = match get("/metrics") {
        Ok((200, body)) => Ok(Samples::parse(&body)),
        Ok((code, _)) => Err(format!("HTTP {code}")),
        Err(e) => Err(format!("{e:#}")),
    };
    report
}

impl Report {
    /// Reachable, a dnsfence process of the role named, healthy and ready.
    fn ok(&self) -> bool {
        self.unreachable.is_none()
            && self.health.as_ref().is_some_and(Probe::ok)
            && self.ready.as_ref().is_some_and(Probe::ok)
            && self.role_seen() == Some(self.role.name())
    }

    /// The role the process says it has (`dnsfence_process_info` on a 200 `/metrics`).
    fn role_seen(&self) -> Option<&str> {
        let m = self.metrics.as_ref().ok()?;
        m.find("process_info")
            .next()
            .and_then(|s| label(&s.labels, "role"))
    }

    /// A dnsfence process before its shards serve (every endpoint answers 503 [`STARTING`]).
    fn starting(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|p| p.code == 503 && p.body == STARTING)
    }

    fn render(&self, agent_version: Option<f64>) -> String {
        let mut out = format!("{} {}: ", self.role.name(), self.addr);
        if let Some(why) = &self.unreachable {
            out.push_str(&format!("UNREACHABLE ({why})\n"));
            return out;
        }
        if self.starting() {
            out.push_str("STARTING (HTTP 503: the shards do not serve yet)\n");
            return out;
        }
        let Some(seen) = self.role_seen() else {
            let why = match &self.metrics {
                Ok(_) => "GET /metrics: no dnsfence_process_info".to_owned(),
                Err(e) => printable(&format!("GET /metrics: {e}")),
            };
            out.push_str(&format!("FAILED: not a dnsfence endpoint ({why})\n"));
            return out;
        };
        if seen != self.role.name() {
            out.push_str(&format!(
                "WRONG PROCESS: the {} answers at this address; it says: ",
                printable(seen)
            ));
        }
        let word = |p: &Option<Probe>, yes: &str, no: &str| match p {
            Some(p) if p.ok() => yes.to_owned(),
            Some(p) => format!("{no} (HTTP {})", p.code),
            None => format!("{no} (no answer)"),
        };
        out.push_str(&format!(
            "{}, {}\n",
            word(&self.health, "healthy", "UNHEALTHY"),
            word(&self.ready, "ready", "NOT READY")
        ));
        for (what, probe) in [("health", &self.health), ("readiness", &self.ready)] {
            if let Some(p) = probe {
                out.push_str(&format!("  {what}: {}\n", printable(p.body.trim_end())));
            }
        }
        let Ok(m) = &self.metrics else {
            return out;
        };
        let version = m.one("policy_version");
        out.push_str(&format!(
            "  policy: generation {}, version {}, {} endpoints{}\n",
            m.one("policy_generation"),
            version,
            m.one("policy_endpoints"),
            match m.one("policy_in_force") {
                0.0 => " (none in force: every query is refused)",
                _ => "",
            }
        ));
        if m.find("k8s_connected").next().is_some() {
            out.push_str(&format!(
                "  kubernetes: {}, {} watch errors, {} relists\n",
                match m.one("k8s_connected") {
                    0.0 => "API server unreachable (the last state stays in force)",
                    _ => "watching",
                },
                m.one("k8s_watch_errors_total"),
                m.one("k8s_relists_total"),
            ));
        }
        let mut backends: Vec<&str> = m
            .find("shard_info")
            .filter_map(|s| label(&s.labels, "backend"))
            .collect();
        let shards = backends.len();
        backends.sort_unstable();
        backends.dedup();
        out.push_str(&format!(
            "  shards: {shards}, I/O backend {}\n",
            printable(&backends.join(", "))
        ));
        let (entries, capacity) = (m.one("allow_entries"), m.one("allow_capacity"));
        out.push_str(&format!(
            "  allow map: {entries} of {capacity} entries ({:.1} %)\n",
            100.0 * entries / capacity.max(1.0)
        ));
        let connected = m.one("sync_connected");
        let sync = match self.role {
            Role::Agent => format!("{connected} proxies connected"),
            Role::Proxy => {
                let synced = match (connected, agent_version) {
                    (0.0, _) => "not synced: no agent connected".to_owned(),
                    (_, Some(v)) if v != version => {
                        format!(
                            "connected to the agent; its policy is version {v}, not yet in force here"
                        )
                    }
                    _ => "synced with the agent".to_owned(),
                };
                format!(
                    "{synced}; {} records kept for the agent",
                    m.one("sync_pending_records")
                )
            }
        };
        out.push_str(&format!("  sync: {sync}\n"));
        out
    }
}

/// `GET path` over HTTP/1.0, all of it within `timeout`: the status code and the body.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let timed_out = || anyhow::anyhow!("timed out after {timeout:?}");
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?).map_err(|e| match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => timed_out().context("connect"),
        _ => anyhow::Error::new(e).context("connect"),
    })?;
    stream.set_write_timeout(Some(left()?))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => timed_out().context("send"),
            _ => anyhow::Error::new(e).context("send"),
        })?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(left().context("read")?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                return Err(timed_out().context("read"));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("read")),
        }
        if answer.len() as u64 > MAX_ANSWER {
            bail!("answer over {} MiB", MAX_ANSWER >> 20);
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("not an HTTP answer");
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((code, body.to_owned()))
}

/// One sample of a metrics page.
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// The samples of a metrics page (names without the `dnsfence_` prefix).
struct Samples(Vec<Sample>);

impl Samples {
    fn parse(text: &str) -> Samples {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let (Some(name), Ok(value)) = (name.strip_prefix("dnsfence_"), value.parse()) else {
                continue;
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value,
            });
        }
        Samples(samples)
    }

    fn find<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.name == name)
    }

    /// The sum of `name`'s samples (0 when absent).
    fn one(&self, name: &str) -> f64 {
        // Not `sum()`: the empty sum of floats is -0, printed "-0".
        self.find(name).fold(0.0, |total, s| total + s.value)
    }
}

/// The value of label `key` in `a="x",b="y"` (values written by us: no escapes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_labels() {
        let text = "# TYPE dnsfence_shard info\n\
                    dnsfence_shard_info{shard=\"0\",backend=\"uring\",cpu=\"none\"} 1\n\
                    dnsfence_shard_info{shard=\"1\",backend=\"mmsg\",cpu=\"3\"} 1\n\
                    dnsfence_allow_fill_ratio 0.25\n\
                    other_metric 7\n# EOF\n";
        let m = Samples::parse(text);
        assert_eq!(m.0.len(), 3);
        assert_eq!(m.one("shard_info"), 2.0);
        assert_eq!(m.one("allow_fill_ratio"), 0.25);
        assert_eq!(m.one("other_metric"), 0.0);
        let backends: Vec<_> = m
            .find("shard_info")
            .filter_map(|s| label(&s.labels, "backend"))
            .collect();
        assert_eq!(backends, ["uring", "mmsg"]);
        assert_eq!(label("shard=\"1\",cpu=\"3\"", "cpu"), Some("3"));
        assert_eq!(label("shard=\"1\"", "cpu"), None);
    }

    /// The wrong process says so on its first line, and fails; a 200 page without
    /// `dnsfence_process_info` is not dnsfence.
    #[test]
    fn wrong_process_and_foreign_pages_fail() {
        let probe = || {
            Some(Probe {
                code: 200,
                body: "ok\n".to_owned(),
            })
        };
        let report = |metrics: &str| Report {
            role: Role::Agent,
            addr: "127.0.0.1:1".parse().unwrap(),
            unreachable: None,
            health: probe(),
            ready: probe(),
            metrics: Ok(Samples::parse(metrics)),
        };
        let proxy = report("dnsfence_process_info{role=\"proxy\"} 1\n# EOF\n");
        assert!(!proxy.ok());
        let first = proxy.render(None).lines().next().unwrap().to_owned();
        assert!(
            first.starts_with("agent 127.0.0.1:1: WRONG PROCESS: the proxy"),
            "{first}"
        );
        let foreign = report("up 1\n");
        assert!(!foreign.ok());
        assert!(foreign.render(None).contains("not a dnsfence endpoint"));
        let agent = report("dnsfence_process_info{role=\"agent\"} 1\n# EOF\n");
        assert!(agent.ok(), "{}", agent.render(None));
    }

    /// A probe's body reaches the terminal without its control characters (a process
    /// squatting the port could send escape sequences), and bounded.
    #[test]
    fn probe_bodies_are_shown_without_control_characters() {
        let mut r = Report {
            role: Role::Agent,
            addr: "127.0.0.1:1".parse().unwrap(),
            unreachable: None,
            health: Some(Probe {
                code: 200,
                body: "ok\x1b]2;pwned\x07\x1b[2J done\n".to_owned(),
            }),
            ready: None,
            metrics: Ok(Samples::parse(
                "dnsfence_process_info{role=\"agent\"} 1\n# EOF\n",
            )),
        };
        let text = r.render(None);
        assert!(
            !text.chars().any(|c| c == '\x1b' || c == '\x07'),
            "{text:?}"
        );
        assert!(text.contains("ok?]2;pwned??[2J done"), "{text:?}");
        r.health = Some(Probe {
            code: 200,
            body: "x".repeat(10_000),
        });
        assert!(r.render(None).len() < 2_000);
    }
}
