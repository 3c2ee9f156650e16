//! `dnsfence agent`: the complete single-process deployment (policy, shards, consumer,
//! metrics). Flags are resolved once into a [`Plan`]; the plan is what runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use crossbeam_queue::ArrayQueue;
use dnsfence_engine::allow::{AllowSink, UserspaceAllowTable};
use dnsfence_engine::consumer::{self, ConsumerConfig, Observations};
use dnsfence_engine::core::{CoreConfig, UnknownSource};
use dnsfence_engine::io::{BackendChoice, IoConfig};
use dnsfence_engine::shard::{self, PolicyHandle, ShardConfig, ShardStatus};
use dnsfence_engine::wire::Rcode;
use dnsfence_policy::Snapshot;

use crate::metrics;

/// I/O backend flag values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum IoFlag {
    /// io_uring, falling back to mmsg when the kernel or seccomp refuses it.
    Auto,
    /// io_uring only.
    Uring,
    /// recvmmsg/sendmmsg with epoll.
    Mmsg,
}

/// DNS 0x20 toward the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Case0x20Flag {
    /// On, switched off for an upstream that answers a few queries in another spelling
    /// before it has ever echoed one exactly (it does not preserve case); logged once.
    Auto,
    /// On, whatever the upstream does (one that does not preserve case gets no answer
    /// accepted).
    On,
    /// Off: names go upstream as the client spelled them.
    Off,
}

/// Rcode for denied names.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RejectFlag {
    /// REFUSED (Cilium's default).
    Refused,
    /// NXDOMAIN.
    Nxdomain,
}

/// Queries from sources the endpoint registry does not know.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum UnknownFlag {
    /// REFUSED.
    Deny,
    /// Forwarded, unrestricted.
    Allow,
}

/// Flags of `dnsfence agent` (shared/spec/interfaces.md; every tunable is a flag).
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to serve DNS on (UDP and TCP, SO_REUSEPORT).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Upstream DNS server.
    #[arg(long, value_name = "ADDR:PORT")]
    pub upstream: SocketAddr,
    /// Upstream timeout before SERVFAIL (e.g. 5s, 800ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy files or directories.
    #[arg(long, value_name = "PATH", required = true)]
    pub policy: Vec<PathBuf>,
    /// Endpoints file.
    #[arg(long, value_name = "FILE")]
    pub endpoints: Option<PathBuf>,
    /// State directory (persisted policy and observations).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the eBPF programs and maps are pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/dnsfence")]
    pub bpf_pin: PathBuf,
    /// Run without eBPF: userspace verdicts and allow table only (unprivileged).
    #[arg(long)]
    pub no_bpf: bool,
    /// cgroup v2 mount to attach to.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Number of shard threads (default: one per CPU of --cpus, or per available CPU).
    #[arg(long)]
    pub shards: Option<usize>,
    /// CPUs to pin shards to, e.g. `0,2-3` (shard i gets the i-th CPU, round robin).
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// I/O backend.
    #[arg(long = "io", value_enum, default_value = "auto")]
    pub io: IoFlag,
    /// Answer to denied names.
    #[arg(long, value_enum, default_value = "refused")]
    pub reject_rcode: RejectFlag,
    /// Floor for allow-entry TTLs, in seconds.
    #[arg(long, default_value_t = 0)]
    pub min_ttl: u32,
    /// Ceiling for allow-entry TTLs, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub max_ttl: u32,
    /// Queries from unknown sources.
    #[arg(long, value_enum, default_value = "deny")]
    pub unknown_source: UnknownFlag,
    /// Prometheus metrics (HTTP GET /metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9967")]
    pub metrics_listen: SocketAddr,
    /// Disable the metrics listener.
    #[arg(long)]
    pub no_metrics: bool,
    /// The DNS server queries are taken to be addressed to when the datapath does not say
    /// (policy DNS rules name port 53 of the cluster DNS). Default: the upstream's IP, port 53.
    #[arg(long, value_name = "ADDR:PORT")]
    pub policy_server: Option<SocketAddr>,
    /// Randomise the letter case of forwarded names and accept only answers that echo it
    /// (DNS 0x20; CoreDNS, unbound and BIND preserve case): one more bit per letter for an
    /// off-path spoofer to guess.
    #[arg(long, value_enum, default_value = "auto")]
    pub upstream_0x20: Case0x20Flag,
    /// Upstream UDP sockets per shard (random source ports).
    #[arg(long, default_value_t = 4)]
    pub upstream_sockets: u16,
    /// Queries an upstream UDP socket sends before it is replaced by one on a fresh random
    /// port (0: never).
    #[arg(long, default_value_t = 256)]
    pub upstream_socket_queries: u32,
    /// Answers with unknown IDs on one upstream socket after which it is taken as under
    /// attack and replaced at once, its queries re-sent from the new port (0: never).
    #[arg(long, default_value_t = 32)]
    pub upstream_unknown_id_burst: u32,
    /// Most queries in flight upstream per shard.
    #[arg(long, default_value_t = 8192)]
    pub max_pending: usize,
    /// Most queries in flight per endpoint per shard (unknown sources count as one).
    #[arg(long, default_value_t = 4096)]
    pub max_pending_per_endpoint: usize,
    /// Datagrams per receive batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// TCP client idle timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,
    /// TCP client connections per shard.
    #[arg(long, default_value_t = 1024)]
    pub max_tcp_conns: usize,
    /// Append one JSON line per query to this file.
    #[arg(long, value_name = "FILE")]
    pub flow_log: Option<PathBuf>,
    /// How often policy and endpoint files are checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Capacity of the userspace allow table (--no-bpf).
    #[arg(long, default_value_t = 1 << 20)]
    pub allow_entries: usize,
    /// Most (endpoint, name) entries of the FQDN cache (the consumer's; oldest evicted beyond).
    #[arg(long, default_value_t = 65536)]
    pub fqdn_cache_entries: usize,
    /// Most addresses the FQDN cache keeps per (endpoint, name).
    #[arg(long, default_value_t = 256)]
    pub max_ips_per_name: usize,
    /// Capacity of the shard → consumer record queue.
    #[arg(long, default_value_t = 8192)]
    pub record_queue: usize,
}

/// Parses `5s`, `800ms`, `2m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    // Durations are timeouts and intervals: from a millisecond to an hour.
    if !(0.001..=3600.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range (1ms to 60m)"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A list of CPUs from `--cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses a CPU list such as `0,2-3`.
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid CPU list {s:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(format!("empty CPU list {s:?}"));
    }
    Ok(CpuList(cpus))
}

/// The agent's runtime plan: flags resolved and checked once.
struct Plan {
    shards: Vec<(IoConfig, CoreConfig, Option<usize>)>,
    backend: BackendChoice,
}

fn plan(args: &AgentArgs) -> Result<Plan> {
    if !args.no_bpf {
        bail!(
            "the eBPF datapath is not available in this build; run with --no-bpf (userspace \
             verdicts and allow table)"
        );
    }
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = args
        .shards
        .unwrap_or(args.cpus.as_ref().map_or(available, |c| c.0.len()));
    if args.listen.ip().is_unspecified() {
        bail!(
            "--listen {}: name the address to serve on (e.g. 127.0.0.1 or the node's DNS \
             address); a wildcard socket may answer from another local address than the client \
             asked, which clients drop",
            args.listen
        );
    }
    if args.listen.port() == 0 && shards > 1 {
        bail!("--listen with port 0 gives each shard its own port: name a port, or use --shards 1");
    }
    if shards == 0 {
        bail!("--shards must be at least 1");
    }
    let mut plan = Plan {
        shards: Vec::with_capacity(shards),
        backend: match args.io {
            IoFlag::Auto => BackendChoice::Auto,
            IoFlag::Uring => BackendChoice::Uring,
            IoFlag::Mmsg => BackendChoice::Mmsg,
        },
    };
    for i in 0..shards {
        let mut io = IoConfig::new(args.listen, args.upstream);
        io.upstream_sockets = args.upstream_sockets;
        io.batch = args.batch;
        io.tcp_idle_timeout = args.tcp_idle_timeout;
        io.max_tcp_conns = args.max_tcp_conns;
        let mut core = CoreConfig::new(args.upstream);
        core.upstream_sockets = args.upstream_sockets;
        core.upstream_timeout = args.upstream_timeout;
        core.reject_rcode = match args.reject_rcode {
            RejectFlag::Refused => Rcode::Refused,
            RejectFlag::Nxdomain => Rcode::NxDomain,
        };
        core.min_ttl = args.min_ttl;
        core.max_ttl = args.max_ttl;
        core.unknown_source = match args.unknown_source {
            UnknownFlag::Deny => UnknownSource::Deny,
            UnknownFlag::Allow => UnknownSource::Allow,
        };
        core.max_pending = args.max_pending;
        core.max_pending_per_endpoint = args.max_pending_per_endpoint.max(1);
        core.flow_records = args.flow_log.is_some();
        core.upstream_0x20 = args.upstream_0x20 != Case0x20Flag::Off;
        core.upstream_0x20_fallback = args.upstream_0x20 == Case0x20Flag::Auto;
        core.upstream_socket_queries = args.upstream_socket_queries;
        core.upstream_unknown_id_burst = args.upstream_unknown_id_burst;
        core.max_udp_payload = io.max_udp_payload.min(usize::from(u16::MAX)) as u16;
        if !(1..65536).contains(&core.max_pending) {
            bail!("--max-pending must be in 1..65535");
        }
        if let Some(server) = args.policy_server {
            core.policy_server = server;
        }
        core.seed = os_random_key()?;
        let cpu = args.cpus.as_ref().map(|cpus| cpus.0[i % cpus.0.len()]);
        plan.shards.push((io, core, cpu));
    }
    Ok(plan)
}

/// A 128-bit secret from the kernel's random pool (the key of a shard's ID generator).
fn os_random_key() -> Result<[u64; 2]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom (upstream IDs must be unpredictable)")?;
    let (a, b) = bytes.split_at(8);
    Ok([
        u64::from_le_bytes(a.try_into().expect("8 bytes")),
        u64::from_le_bytes(b.try_into().expect("8 bytes")),
    ])
}

/// Loads policy and endpoints into a snapshot; errors are `FILE:LINE: reason` lines.
fn load(args: &AgentArgs, generation: u64) -> Result<Snapshot> {
    let mut snapshot = dnsfence_policy::load(&args.policy, args.endpoints.as_deref())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    snapshot.set_generation(generation);
    Ok(snapshot)
}

/// Reload ticks a changing policy may stay unsettled before it is loaded anyway.
const MAX_UNSETTLED: u32 = 5;

/// Refuses combinations that would quietly widen enforcement (at start and at every reload).
fn refuse_unenforceable(args: &AgentArgs, snapshot: &Snapshot) -> Result<()> {
    let without_ips = snapshot.stats().without_ips;
    if without_ips > 0 && matches!(args.unknown_source, UnknownFlag::Allow) {
        bail!(
            "{without_ips} endpoints have no source address (cgroup only) and cannot be \
             recognised without the eBPF datapath; with --unknown-source allow they would be \
             unrestricted: give them ips, or use --unknown-source deny"
        );
    }
    Ok(())
}

/// Says, once the agent serves, what this configuration does not enforce.
fn warn_about_limits(args: &AgentArgs, snapshot: &Snapshot) {
    let stats = snapshot.stats();
    if stats.without_ips > 0 {
        eprintln!(
            "dnsfence agent: warning: {} endpoints have no source address (cgroup only); without \
             the eBPF datapath their queries are refused as unknown sources",
            stats.without_ips
        );
    }
    if stats.fqdn_rules > 0 {
        eprintln!(
            "dnsfence agent: warning: --no-bpf: {} toFQDNs rules are tracked in the userspace \
             allow table but no connection filter enforces them",
            stats.fqdn_rules
        );
    }
    if args.state_dir.is_some() {
        eprintln!("dnsfence agent: warning: --state-dir is not used yet (no state is persisted)");
    }
}

/// The latest modification time among the policy and endpoint paths (directories included).
fn fingerprint(args: &AgentArgs) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut add = |p: &Path| {
        out.push((
            p.to_path_buf(),
            p.metadata().and_then(|m| m.modified()).ok(),
        ))
    };
    for path in args.policy.iter().chain(args.endpoints.iter()) {
        add(path);
        if let Ok(dir) = std::fs::read_dir(path) {
            let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                add(&e);
            }
        }
    }
    out
}

/// Runs the agent until SIGTERM/SIGINT, then drains and exits 0.
pub fn run(args: &AgentArgs) -> Result<()> {
    let plan = plan(args)?;
    let snapshot = load(args, 1).context("cannot load policy")?;
    refuse_unenforceable(args, &snapshot)?;
    let policy = Arc::new(PolicyHandle::new(Arc::new(snapshot)));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    let records = Arc::new(ArrayQueue::new(args.record_queue.max(1)));
    let table = Arc::new(UserspaceAllowTable::new(args.allow_entries));
    // Everything that can fail on a taken port or a bad path, before any shard joins the
    // listen port's SO_REUSEPORT group (where it would take a share of the queries).
    let metrics_listener = match args.no_metrics {
        true => None,
        false => Some(
            metrics::bind(args.metrics_listen)
                .with_context(|| format!("metrics listener {}", args.metrics_listen))?,
        ),
    };
    let flow_log: Option<Box<dyn std::io::Write + Send>> = match &args.flow_log {
        None => None,
        Some(path) => Some(Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("flow log {}", path.display()))?,
        ))),
    };

    let mut statuses = Vec::new();
    let mut threads = Vec::new();
    let shard_stop = Arc::new(AtomicBool::new(false));
    let shard_count = plan.shards.len();
    for (index, (io, core, cpu)) in plan.shards.into_iter().enumerate() {
        let status = Arc::new(ShardStatus::default());
        statuses.push(Arc::clone(&status));
        let allow: Box<dyn AllowSink + Send> = Box::new(SharedTable(Arc::clone(&table)));
        let config = ShardConfig {
            index,
            core,
            io,
            backend: plan.backend,
            cpu,
            allow,
            policy: Arc::clone(&policy),
            records: Arc::clone(&records),
            stop: Arc::clone(&shard_stop),
            status,
        };
        match shard::spawn(config) {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                shard_stop.store(true, Ordering::Relaxed);
                for t in threads {
                    let _ = t.join();
                }
                bail!("cannot listen on {}: {e}", args.listen);
            }
        }
    }

    let observations = Arc::new(Mutex::new(Observations::default()));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (records, observations, stop) = (
            Arc::clone(&records),
            Arc::clone(&observations),
            Arc::clone(&consumer_stop),
        );
        let config = ConsumerConfig {
            cache_entries: args.fqdn_cache_entries.max(1),
            max_ips_per_name: args.max_ips_per_name.max(1),
            flow_log,
        };
        std::thread::Builder::new()
            .name("dnsf-consumer".into())
            .spawn(move || consumer::run(records, observations, config, stop))
            .context("consumer thread")?
    };

    let reload_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(listener) = metrics_listener {
        let state = metrics::State {
            shards: statuses.clone(),
            observations: Arc::clone(&observations),
            policy: Arc::clone(&policy),
            allow_entries: Arc::clone(&table),
            reload_errors: Arc::clone(&reload_errors),
            records_queued: Arc::clone(&records),
        };
        metrics::serve(listener, state, Arc::clone(&stop)).context("metrics thread")?;
    }
    let backend = statuses[0]
        .backend
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map(|b| format!("{b:?}"));
    eprintln!(
        "dnsfence agent: serving {} with {shard_count} shards ({}), upstream {}",
        args.listen,
        backend.unwrap_or_default(),
        args.upstream
    );
    warn_about_limits(args, &policy.load());

    // Control loop: hot reload and expiry sweeps until a signal arrives or a shard dies.
    let mut seen = fingerprint(args);
    let mut changed: Option<Vec<(PathBuf, Option<SystemTime>)>> = None;
    let mut unsettled = 0u32;
    let mut generation = 1;
    let mut last_check = Instant::now();
    let mut failed = None;
    let mut case_logged = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if !case_logged
            && statuses.iter().any(|s| {
                s.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .upstream_0x20_disabled
                    != 0
            })
        {
            case_logged = true;
            eprintln!(
                "dnsfence agent: upstream {} does not preserve the letter case of questions: \
                 DNS 0x20 switched off for it (--upstream-0x20 on keeps it)",
                args.upstream
            );
        }
        if let Some(i) = threads.iter().position(|t| t.is_finished()) {
            failed = Some(i);
            break;
        }
        if last_check.elapsed() < args.reload_interval {
            continue;
        }
        last_check = Instant::now();
        table.sweep(Instant::now());
        let now = fingerprint(args);
        if now == seen {
            changed = None;
            continue;
        }
        // Load only once the files have stopped changing for one interval: an editor or a
        // config-map update caught half-written could otherwise parse as a smaller, valid
        // policy and leave endpoints unrestricted until the next tick.
        // A file rewritten more often than the interval would never settle: after
        // MAX_UNSETTLED ticks it is loaded anyway (a broken read is rejected like any edit).
        if changed.as_ref() != Some(&now) && unsettled < MAX_UNSETTLED {
            changed = Some(now);
            unsettled += 1;
            continue;
        }
        let loaded = load(args, generation + 1);
        if fingerprint(args) != now && unsettled < MAX_UNSETTLED {
            unsettled += 1;
            continue; // changed while loading: try again next interval
        }
        if unsettled >= MAX_UNSETTLED {
            eprintln!("dnsfence agent: policy files keep changing; loading them as they are now");
        }
        seen = now;
        changed = None;
        unsettled = 0;
        // What would widen enforcement is refused at reload as at start.
        let loaded = loaded.and_then(|snapshot| {
            refuse_unenforceable(args, &snapshot)?;
            Ok(snapshot)
        });
        match loaded {
            Ok(snapshot) => {
                generation += 1;
                let before = policy.load().stats();
                let after = snapshot.stats();
                policy.store(Arc::new(snapshot));
                eprintln!("dnsfence agent: policy reloaded (generation {generation})");
                if (before.without_ips, before.fqdn_rules) != (after.without_ips, after.fqdn_rules)
                {
                    warn_about_limits(args, &policy.load());
                }
            }
            Err(e) => {
                reload_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "dnsfence agent: policy reload rejected, keeping generation {generation}:\n{e:#}"
                );
            }
        }
    }

    if failed.is_none() {
        eprintln!("dnsfence agent: stopping; draining in-flight queries");
    }
    shard_stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    consumer_stop.store(true, Ordering::Relaxed);
    let _ = consumer.join();
    match failed {
        Some(i) => bail!("shard {i} stopped unexpectedly; exiting so a supervisor restarts us"),
        None => Ok(()),
    }
}

/// The userspace table shared by all shards.
struct SharedTable(Arc<UserspaceAllowTable>);

impl AllowSink for SharedTable {
    fn write(
        &mut self,
        entries: &[dnsfence_engine::allow::AllowEntry],
    ) -> Result<(), dnsfence_engine::allow::AllowError> {
        self.0.insert(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("800ms"), Ok(Duration::from_millis(800)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("100000000000000000000").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("61m").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0,2-4"), Ok(CpuList(vec![0, 2, 3, 4])));
        assert_eq!(parse_cpus("1"), Ok(CpuList(vec![1])));
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("a").is_err());
        assert!(parse_cpus("").is_err());
    }
}
