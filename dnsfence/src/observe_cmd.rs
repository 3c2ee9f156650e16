//! `dnsfence observe`: the agent's DNS flows (its own and the standalone proxy's), like
//! `hubble observe --protocol dns`: asks the observe socket (`observe.rs`) for the history,
//! then with `--follow` for live flows, and prints one line per flow (text or JSON).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::observe::{FlowView, Request};

/// The observe socket when `--observe-socket` is not given (the agent's default).
pub const DEFAULT_OBSERVE_SOCKET: &str = "/run/dnsfence/observe.sock";

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per flow.
    Text,
    /// One JSON object per line.
    Json,
}

/// Verdicts to filter on (Cilium's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "UPPER")]
pub enum VerdictFlag {
    /// Forwarded upstream and answered.
    Forwarded,
    /// Refused by policy (or an unknown source).
    Dropped,
    /// SERVFAIL, FORMERR/NOTIMP or no answer (timeout, unreachable upstream, no room, ...).
    Error,
}

/// Flags of `dnsfence observe`.
#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// The agent's observe socket (its --observe-socket; by default beside its agent socket).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_OBSERVE_SOCKET)]
    pub observe_socket: PathBuf,
    /// Output format: `text` (one line per flow) or `json` (one object per line).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
    /// Only flows with this verdict (repeatable; any of them).
    #[arg(long, value_enum, ignore_case = true)]
    pub verdict: Vec<VerdictFlag>,
    /// Only flows of this endpoint: `namespace/name`, `name` (any namespace) or
    /// `namespace/` (repeatable; any of them).
    #[arg(long, value_name = "ENDPOINT")]
    pub endpoint: Vec<String>,
    /// Only queries for this name or names under it (repeatable; any of them).
    #[arg(long, value_name = "NAME")]
    pub name: Vec<String>,
    /// After the history, print flows as they happen, until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The last N matching flows of the history (default: 20, or 0 with --follow).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
}

/// Runs `dnsfence observe`: exit 1 with one line when the agent cannot be asked.
pub fn run(args: &ObserveArgs) -> ExitCode {
    match observe(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dnsfence observe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn observe(args: &ObserveArgs) -> Result<(), String> {
    let path = &args.observe_socket;
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no observe socket at {} (is the agent running? --observe-socket names another)",
            path.display()
        ),
        std::io::ErrorKind::ConnectionRefused => format!(
            "nothing listens on {} (the agent is not running)",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied (run as the agent's user or root)",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    })?;
    let request = Request {
        follow: args.follow,
        last: Some(args.last.unwrap_or(if args.follow { 0 } else { 20 })),
        verdict: args
            .verdict
            .iter()
            .map(|v| {
                match v {
                    VerdictFlag::Forwarded => "FORWARDED",
                    VerdictFlag::Dropped => "DROPPED",
                    VerdictFlag::Error => "ERROR",
                }
                .to_owned()
            })
            .collect(),
        endpoint: args.endpoint.clone(),
        name: args.name.clone(),
    };
    let mut line = serde_json::to_string(&request).map_err(|e| format!("encode: {e}"))?;
    line.push('\n');
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    // The history comes at once; only a follower waits for the agent indefinitely.
    let timeout = (!args.follow).then_some(Duration::from_secs(10));
    stream.set_read_timeout(timeout).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("the agent sent {line:?}: {e}"))?;
        if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
            return Err(format!("the agent says: {error}"));
        }
        let text = match args.output {
            Output::Json => line,
            Output::Text => {
                let flow: FlowView = serde_json::from_value(value)
                    .map_err(|e| format!("the agent sent {line:?}: {e}"))?;
                text_line(&flow)
            }
        };
        // A closed stdout (`| head`) ends quietly.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    if args.follow {
        return Err("the agent closed the stream (stopping?)".to_owned());
    }
    Ok(())
}

/// One flow as a line: time, endpoint (client), query and type, verdict, rcode, the
/// reason when not forwarded, the answer's addresses and TTL, latency, who served it.
pub fn text_line(f: &FlowView) -> String {
    use std::fmt::Write as _;
    let mut line = format!(
        "{} {} ({}) DNS Query {} {} {} {}",
        f.time,
        f.endpoint,
        f.client,
        f.query,
        f.qtype,
        f.verdict,
        f.rcode.as_deref().unwrap_or("-"),
    );
    if f.verdict != "FORWARDED" {
        let _ = write!(line, " ({})", f.reason);
    }
    if !f.ips.is_empty() {
        let ips: Vec<String> = f.ips.iter().map(ToString::to_string).collect();
        let _ = write!(line, " Answer: {}", ips.join(","));
        if let Some(ttl) = f.ttl {
            let _ = write!(line, " TTL: {ttl}");
        }
    }
    if let Some(us) = f.latency_us {
        let _ = write!(line, " {:.3}ms", us as f64 / 1000.0);
    }
    let _ = write!(line, " by {}", f.served_by);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_line_has_every_field() {
        let f = FlowView {
            time: "2026-01-31T12:34:56.789Z".to_owned(),
            unix_ms: 0,
            endpoint: "default/client".to_owned(),
            namespace: Some("default".to_owned()),
            endpoint_key: None,
            client: "127.0.0.1:40000".parse().unwrap(),
            query: "www.allowed.test.".to_owned(),
            qtype: "A".to_owned(),
            verdict: "FORWARDED".to_owned(),
            reason: "Forward".to_owned(),
            rcode: Some("NOERROR".to_owned()),
            ips: vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
            ttl: Some(60),
            latency_us: Some(1234),
            served_by: "proxy".to_owned(),
        };
        assert_eq!(
            text_line(&f),
            "2026-01-31T12:34:56.789Z default/client (127.0.0.1:40000) DNS Query \
             www.allowed.test. A FORWARDED NOERROR Answer: 192.0.2.1,192.0.2.2 TTL: 60 \
             1.234ms by proxy"
        );
        let denied = FlowView {
            verdict: "DROPPED".to_owned(),
            reason: "Refuse".to_owned(),
            rcode: Some("REFUSED".to_owned()),
            ips: Vec::new(),
            ttl: None,
            latency_us: None,
            served_by: "agent".to_owned(),
            ..f
        };
        assert!(
            text_line(&denied).ends_with("A DROPPED REFUSED (Refuse) by agent"),
            "{}",
            text_line(&denied)
        );
    }
}
