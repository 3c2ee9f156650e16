//! dnsfence-loadgen: open-loop DNS load generator and bundled upstream.
#![deny(unsafe_code)]

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use dnsfence_loadgen::generator::{self, RunConfig};
use dnsfence_loadgen::queries::{EncodeOptions, QuerySet};
use dnsfence_loadgen::scenario::{self, Action};
use dnsfence_loadgen::sys;
use dnsfence_loadgen::upstream::respond::{MAX_IPS, Prefix, Responder};
use dnsfence_loadgen::upstream::{Delay, Upstream, UpstreamConfig};

/// Open-loop DNS load generator (the default command) and a fast deterministic upstream
/// (`upstream`).
///
/// Sends queries from a dnsperf-format file at a constant, paced rate whether or not answers
/// come back, matches answers by socket, ID and question, and reports latency percentiles,
/// rcodes, timeouts and a per-second timeline.
#[derive(Debug, Parser)]
#[command(
    name = "dnsfence-loadgen",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve DNS: a fast authoritative stand-in over UDP and TCP.
    #[command(after_long_help = UPSTREAM_NAMES)]
    Upstream(UpstreamArgs),
}

const UPSTREAM_NAMES: &str = "\
Name-driven behaviours (first label of the query name, case-insensitive):
  nxdomain-*        NXDOMAIN
  servfail-*        SERVFAIL
  refused-*         REFUSED
  drop-*            no reply at all
  tc-*              UDP: TC bit, no answers; TCP: the full answer
  cname-N-REST      N CNAMEs: cname-N-REST -> cname-(N-1)-REST -> ... -> cname-0-REST (same
                    suffix), then the A/AAAA records of cname-0-REST (N <= 16)
  extra-*           the answer plus an unrelated A record (poison.dnsfence.invalid.) in the
                    answer section and another (glue.dnsfence.invalid.) in the additional section
  delay-N-*         the answer N ms late; combines with the others (delay-50-cname-2-x.test)
Any other name: --ips A or AAAA records derived from a hash of the lowercased name, inside
--prefix4/--prefix6; other query types: NOERROR without answers. The question is copied as
received (0x20 case kept), EDNS0 OPT is echoed, a query that cannot be parsed gets FORMERR,
and a datagram shorter than a header or with QR set is dropped (counted as malformed).";

#[derive(Debug, Args)]
struct LoadArgs {
    /// DNS server to load (UDP).
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    server: Option<SocketAddr>,
    /// dnsperf-format query file: `name TYPE` a line (`;`/`#` comments); used in a loop.
    #[arg(long, value_name = "FILE", required = true)]
    queries: Option<PathBuf>,
    /// Queries per second (paced evenly).
    #[arg(long, value_name = "QPS", required = true)]
    rate: Option<f64>,
    /// Seconds of sending.
    #[arg(long, value_name = "SECS", required = true)]
    duration: Option<f64>,
    /// Milliseconds to wait for an answer before counting the query lost.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    timeout: u64,
    /// Print one JSON object at the end instead of the human summary.
    #[arg(long)]
    json: bool,
    /// No per-second progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// UDP sockets (source ports) to spread queries over.
    #[arg(long, value_name = "N", default_value_t = 16)]
    sockets: usize,
    /// Most datagrams per sendmmsg/recvmmsg.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: usize,
    /// Socket send/receive buffer size in bytes (0: system default).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// List every answer at least this late (µs) in the JSON report: when its query was sent
    /// (ms), its latency and its socket, to place a latency spike in time (first 10,000).
    #[arg(long, value_name = "US", default_value_t = 0)]
    slow_us: u64,
    /// Add an EDNS0 OPT record advertising this UDP payload size.
    #[arg(long, value_name = "SIZE")]
    edns: Option<u16>,
    /// Set the DNSSEC OK bit (adds EDNS0).
    #[arg(long)]
    dnssec: bool,
    /// Clear the RD (recursion desired) bit.
    #[arg(long)]
    no_recurse: bool,
    /// Run `sh -c COMMAND` at SECS from the start of the run (repeatable), e.g.
    /// `--at '5:kill -TERM 1234'`; shown as an event in the timeline.
    #[arg(long = "at", value_name = "SECS:COMMAND")]
    at: Vec<String>,
    /// File of timed commands: `SECS COMMAND...` a line (`#` comments).
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UpstreamArgs {
    /// Address for UDP and TCP (port 0: pick one; the address is printed on stdout).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// TTL of every record, in seconds.
    #[arg(long, value_name = "S", default_value_t = 300)]
    ttl: u32,
    /// Addresses per A/AAAA answer.
    #[arg(long, value_name = "N", default_value_t = 1)]
    ips: u16,
    /// Prefix of A answers (127.0.0.0/8 lets tests connect to them; 198.18.0.0/15 for
    /// benchmarks).
    #[arg(long, value_name = "CIDR", default_value = "127.0.0.0/8")]
    prefix4: Prefix<Ipv4Addr>,
    /// Prefix of AAAA answers.
    #[arg(long, value_name = "CIDR", default_value = "fd00::/8")]
    prefix6: Prefix<Ipv6Addr>,
    /// UDP worker threads (SO_REUSEPORT).
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Do not serve TCP.
    #[arg(long)]
    no_tcp: bool,
    /// Hold every reply back: `MS` (fixed) or `MIN-MAX` (uniform), in milliseconds.
    #[arg(long, value_name = "MS|MIN-MAX")]
    delay_ms: Option<Delay>,
    /// Fraction of queries silently dropped (0.0 to 1.0), drawn from --seed.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    drop_rate: f64,
    /// Seed of the drop and delay draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop answering this many seconds after start ...
    #[arg(long, value_name = "SECS")]
    stall_after: Option<f64>,
    /// ... for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    stall_for: f64,
    /// Most datagrams per recvmmsg/sendmmsg.
    #[arg(long, value_name = "N", default_value_t = 64)]
    batch: usize,
    /// Socket buffer size in bytes (0: system default).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// On exit, print the counters as one JSON object on stdout.
    #[arg(long)]
    stats_json: bool,
}

fn secs(v: f64, what: &str) -> Result<Duration> {
    if !(0.0..1e9).contains(&v) {
        bail!("{what} must be a number of seconds >= 0, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Upstream(args)) => upstream(args),
        None => load(cli.load),
    }
}

fn load(args: LoadArgs) -> Result<()> {
    let (Some(server), Some(path), Some(rate), Some(duration)) =
        (args.server, args.queries, args.rate, args.duration)
    else {
        bail!("--server, --queries, --rate and --duration are required");
    };
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be above 0");
    }
    let duration = secs(duration, "--duration")?;
    let options = EncodeOptions {
        edns_udp_size: args.edns,
        dnssec_ok: args.dnssec,
        no_recurse: args.no_recurse,
    };
    let queries =
        QuerySet::load(&path, options).with_context(|| format!("query file {}", path.display()))?;
    let mut actions = Vec::new();
    for at in &args.at {
        actions.push(at.parse::<Action>()?);
    }
    if let Some(file) = &args.scenario {
        actions.extend(scenario::load_file(file)?);
    }
    sys::install_shutdown_handler().context("installing the signal handler")?;
    let config = RunConfig {
        server,
        rate,
        duration,
        timeout: Duration::from_millis(args.timeout),
        sockets: args.sockets,
        batch: args.batch,
        socket_buffer: args.socket_buffer,
        actions,
        slow_us: args.slow_us,
    };
    let progress = !args.json && !args.quiet && duration > Duration::from_secs(3);
    let mut on_second = |p: dnsfence_loadgen::stats::Progress| {
        if progress {
            eprintln!(
                "[{:4}s] sent {:8}  answered {:8}  p99 {:7} us  timeouts so far {}",
                p.second + 1,
                p.sent,
                p.answered_rx,
                p.p99_us,
                p.timeouts_total
            );
        }
    };
    let report = generator::run(&config, &queries, &mut on_second)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.human())?;
    }
    out.flush()?;
    Ok(())
}

fn upstream(args: UpstreamArgs) -> Result<()> {
    if args.ips == 0 || args.ips > MAX_IPS {
        bail!("--ips must be 1 to {MAX_IPS}");
    }
    if !(0.0..=1.0).contains(&args.drop_rate) {
        bail!("--drop-rate must be between 0 and 1");
    }
    let config = UpstreamConfig {
        listen: args.listen,
        responder: Responder {
            ttl: args.ttl,
            ips: args.ips,
            prefix4: args.prefix4,
            prefix6: args.prefix6,
        },
        threads: args.threads.clamp(1, 256),
        tcp: !args.no_tcp,
        delay: args.delay_ms,
        drop_rate: args.drop_rate,
        seed: args.seed,
        stall_after: args
            .stall_after
            .map(|s| secs(s, "--stall-after"))
            .transpose()?,
        stall_for: secs(args.stall_for, "--stall-for")?,
        batch: args.batch,
        rcvbuf: args.socket_buffer,
    };
    sys::install_shutdown_handler().context("installing the signal handler")?;
    let server = Upstream::bind(config)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.local_addr())?;
        out.flush()?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !sys::shutdown_requested() {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let stats = server.run(stop)?;
    drop(watcher);
    if args.stats_json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        eprintln!(
            "upstream: received {}  replied {}  dropped (random {}, stall {})  tcp connections {}  {:?}",
            stats.received,
            stats.replied,
            stats.dropped_random,
            stats.dropped_stall,
            stats.tcp_connections,
            stats.outcomes
        );
    }
    Ok(())
}
