//! What `dnsfence agent` and `dnsfence proxy` share: the data-plane flags ([`ServeArgs`]),
//! their resolution into a [`Plan`], and the running [`Server`] (shards, consumer, metrics).
//! The two differ in where policy comes from and what they do around it (`agent.rs`,
//! `proxy.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dnsfence_engine::allow::LedgerConfig;
use dnsfence_engine::consumer::{self, ConsumerConfig, Observations, RecordQueue};
use dnsfence_engine::core::{CoreConfig, UnknownSource};
use dnsfence_engine::io::{BackendChoice, IoConfig};
use dnsfence_engine::shard::{self, PolicyHandle, ShardConfig, ShardStatus};
use dnsfence_engine::wire::Rcode;

use crate::enforce::Enforcer;
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

/// How new queries are spread over the serving sockets of the agent and the standalone
/// proxy (eBPF mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReuseportFlag {
    /// Over both processes' sockets.
    Balance,
    /// Over the agent's sockets while it serves, the proxy's otherwise.
    PreferAgent,
}

/// Queries from sources the endpoint registry does not know.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum UnknownFlag {
    /// REFUSED.
    Deny,
    /// Forwarded, unrestricted.
    Allow,
}

/// The data-plane flags of `dnsfence agent` and `dnsfence proxy`
/// (shared/spec/interfaces.md; every tunable is a flag).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to serve DNS on (UDP and TCP, SO_REUSEPORT); in eBPF mode, where redirected
    /// DNS goes. Repeat it for one IPv4 and one IPv6 address (same port): each gets its own
    /// shards, and IPv6 DNS of workloads is redirected to the IPv6 one.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Upstream DNS server: every query goes there. Default (eBPF mode only): each query goes
    /// to the server its workload addressed, as the redirect recorded it, when that server is
    /// one of the --dns-server ones (a query to another server is refused: its answers would
    /// open egress); a query sent to the proxy's own address has no server (SERVFAIL).
    #[arg(long, value_name = "ADDR:PORT")]
    pub upstream: Option<SocketAddr>,
    /// Without --upstream: a DNS server workloads may use, trusted to answer for them
    /// (repeatable; e.g. the cluster DNS service address, the node's resolver). Default: the
    /// nameservers of /etc/resolv.conf, port 53.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "upstream")]
    pub dns_server: Vec<SocketAddr>,
    /// Upstream timeout before SERVFAIL (e.g. 5s, 800ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// State directory: the FQDN cache, and (proxy) the policy snapshot and what the agent
    /// has not acknowledged yet, persisted across restarts (required by `dnsfence proxy`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The agent's unix socket, where the standalone proxy gets policy and hands back what it
    /// learned (default /run/dnsfence/agent.sock; the agent binds it, mode 0600).
    #[arg(long, value_name = "PATH")]
    pub agent_socket: Option<PathBuf>,
    /// Where the eBPF programs and maps are pinned.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/dnsfence")]
    pub bpf_pin: PathBuf,
    /// Run without eBPF: userspace verdicts and allow table only (unprivileged); nothing
    /// redirects DNS or filters connections.
    #[arg(long)]
    pub no_bpf: bool,
    /// eBPF mode: how new queries are spread over the sockets of the agent and the
    /// standalone proxy (an SK_REUSEPORT program; a stopping process gets none and drains).
    /// Give both processes the same value: the last one to start applies it.
    #[arg(long, value_enum, default_value = "balance")]
    pub reuseport_mode: ReuseportFlag,
    /// Number of shard threads (default: one per CPU of --cpus, or per CPU the process may
    /// run on).
    #[arg(long)]
    pub shards: Option<usize>,
    /// CPUs to pin shards to, e.g. `0,2-3` (shard i gets the i-th CPU, round robin).
    /// Default: the CPUs of the process's affinity mask (taskset, cgroup cpuset).
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Do not pin shard threads to CPUs (without --cpus, they are pinned by default).
    #[arg(long, conflicts_with = "cpus")]
    pub no_pin: bool,
    /// I/O backend.
    #[arg(long = "io", value_enum, default_value = "auto")]
    pub io: IoFlag,
    /// io_uring backend: a shard with nothing to do sleeps until `--coalesce-batch`
    /// completions have arrived or this long has passed (then serves what came), so that one
    /// wake-up serves several queries at moderate load; a UDP query waits at most twice this
    /// (its receive and its answer), a TCP one once per step (accept, read, upstream connect,
    /// answer). `0` (default): wake on every completion. Pays off only
    /// near 20k qps per shard (bench/RESULTS.md, "Low load"). `50us`, `1ms`, at most 10ms.
    #[arg(long, default_value = "0", value_parser = parse_coalesce)]
    pub coalesce: Duration,
    /// Completions a coalescing wait asks for (see --coalesce).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub coalesce_batch: u32,
    /// Answer to denied names.
    #[arg(long, value_enum, default_value = "refused")]
    pub reject_rcode: RejectFlag,
    /// Floor for allow-entry TTLs, in seconds: an answer with TTL 0 (or a few seconds) must
    /// leave its client time to connect. Entries live 1.5 × max(TTL, floor): never shorter
    /// than the client's cached answer.
    #[arg(long, default_value_t = 60)]
    pub min_ttl: u32,
    /// Ceiling for allow-entry TTLs, in seconds. Answers that write allow entries carry no
    /// TTL above it (higher ones are lowered to it), so a client never caches an address
    /// longer than its entry lives.
    #[arg(long, default_value_t = 86_400)]
    pub max_ttl: u32,
    /// Queries from unknown sources.
    #[arg(long, value_enum, default_value = "deny")]
    pub unknown_source: UnknownFlag,
    /// Prometheus metrics and health probes (HTTP GET /metrics, /healthz, /readyz). Default:
    /// 127.0.0.1:9967 for the agent, 127.0.0.1:9968 for the proxy (both run on a node).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Disable the metrics and health listener.
    #[arg(long)]
    pub no_metrics: bool,
    /// The DNS server queries are taken to be addressed to when the datapath does not say
    /// (policy DNS rules name port 53 of the cluster DNS). Default: the upstream's IP, port 53
    /// (without `--upstream`: the first `--listen` IP, port 53).
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
    /// Most queries in flight per endpoint per shard (unknown sources count as one). Besides,
    /// an endpoint never holds as many as are free (its fair share: endpoints flooding
    /// together leave a share free for the others; counted as `pending_fair_share`).
    #[arg(long, default_value_t = 4096)]
    pub max_pending_per_endpoint: usize,
    /// Datagrams per receive batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// TCP client idle timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,
    /// TCP client connections per shard; at the limit a new connection evicts the one that
    /// has gone longest without progress.
    #[arg(long, default_value_t = 1024)]
    pub max_tcp_conns: usize,
    /// TCP client connections per source address per shard; more are closed at once.
    #[arg(long, default_value_t = 64)]
    pub max_tcp_conns_per_source: usize,
    /// Largest DNS message a TCP client may send, in bytes (12..=65535); a longer frame ends
    /// the connection. Each connection's input buffer grows to at most this plus 2.
    #[arg(long, default_value_t = 65535)]
    pub max_tcp_message: usize,
    /// Bytes of answers buffered per TCP connection beyond what the kernel took; a client
    /// that does not read and goes over it is closed.
    #[arg(long, default_value_t = 128 * 1024)]
    pub max_tcp_out_bytes: usize,
    /// SO_RCVBUF and SO_SNDBUF of each TCP client connection, in bytes (the kernel doubles
    /// them): the kernel memory one connection can hold.
    #[arg(long, default_value_t = 64 * 1024)]
    pub tcp_socket_buffer_bytes: usize,
    /// Queries of one TCP connection in flight at once; the connection is not read beyond.
    #[arg(long, default_value_t = 32)]
    pub max_tcp_pipeline: usize,
    /// Append one JSON line per query to this file.
    #[arg(long, value_name = "FILE")]
    pub flow_log: Option<PathBuf>,
    /// DNS flows kept for `dnsfence observe`: the agent keeps the last N in memory (its own
    /// and those the standalone proxy hands it after a resync) and serves them on
    /// --observe-socket; the proxy makes flow records for the agent when N is not 0. 0: no
    /// flow records (unless --flow-log), no history, no observe socket.
    #[arg(long, value_name = "N", default_value_t = 8192)]
    pub flow_history: usize,
    /// Capacity of the allow table: the eBPF allow map's size, or the userspace table's.
    /// Its books are sized and written at start (about 150 bytes an entry: no rehash and no
    /// page fault on the answer path later), so a larger table costs start-up CPU and memory
    /// up front (1M: about 0.2 s and 150 MB).
    #[arg(long, default_value_t = 1 << 18)]
    pub allow_entries: usize,
    /// Most allow entries one endpoint may hold; beyond it, answers that need new entries get
    /// SERVFAIL (counted), so one workload cannot fill the table for the others. Besides, an
    /// endpoint never holds more than the table has free (its fair share; counted as
    /// `fair_share`).
    #[arg(long, default_value_t = 1 << 16)]
    pub max_allow_per_endpoint: usize,
    /// Most allow entries one (endpoint, name) may hold (a name answering fresh addresses
    /// every time cannot take its endpoint's whole quota).
    #[arg(long, default_value_t = 256)]
    pub max_allow_per_name: usize,
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

impl ServeArgs {
    /// The bounds of the allow entries.
    pub fn ledger(&self) -> LedgerConfig {
        LedgerConfig {
            capacity: self.allow_entries.max(1),
            per_endpoint: self.max_allow_per_endpoint.max(1),
            per_name: self.max_allow_per_name.max(1),
        }
    }
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

/// `--coalesce`: `0`, `NNus` or `NNms`, at most 10 ms.
pub fn parse_coalesce(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000)
    } else if s == "0" {
        (s, 1)
    } else {
        return Err(format!("invalid --coalesce {s:?} (e.g. 0, 50us, 1ms)"));
    };
    let micros: u64 = number
        .parse()
        .map_err(|_| format!("invalid --coalesce {s:?} (e.g. 0, 50us, 1ms)"))?;
    let d = Duration::from_micros(micros.saturating_mul(scale));
    if d > Duration::from_millis(10) {
        return Err(format!("--coalesce {s:?} is over 10ms"));
    }
    Ok(d)
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

/// A process's runtime plan: flags resolved and checked once.
pub struct Plan {
    /// The listen addresses.
    pub listen: Vec<SocketAddr>,
    /// The upstream servers, and whether each query goes to the one its workload addressed
    /// (else every query goes to the first).
    pub upstreams: Vec<SocketAddr>,
    /// See `CoreConfig::addressed`.
    pub addressed: bool,
    shards: Vec<(IoConfig, CoreConfig, Option<usize>)>,
    backend: BackendChoice,
}

/// Resolves and checks the flags.
pub fn plan(args: &ServeArgs) -> Result<Plan> {
    if args.listen.is_empty() {
        bail!("--listen is required");
    }
    let (upstreams, addressed) = match args.upstream {
        Some(upstream) => (vec![upstream], false),
        None if args.no_bpf => bail!(
            "--upstream is required with --no-bpf (without the eBPF redirect the proxy cannot \
             tell which server a query was addressed to)"
        ),
        None => {
            let servers = match args.dns_server.is_empty() {
                false => args.dns_server.clone(),
                true => resolv_conf_servers(RESOLV_CONF)?,
            };
            if servers.is_empty() {
                bail!(
                    "no DNS server to forward to: {RESOLV_CONF} names none; give --upstream, \
                     or --dns-server for each server workloads may use"
                );
            }
            if servers.len() > dnsfence_engine::io::MAX_UPSTREAMS {
                bail!(
                    "--dns-server: at most {} servers",
                    dnsfence_engine::io::MAX_UPSTREAMS
                );
            }
            (servers, true)
        }
    };
    let listens = args.listen.clone();
    let families = (
        listens.iter().filter(|a| a.is_ipv4()).count(),
        listens.iter().filter(|a| a.is_ipv6()).count(),
    );
    if families.0 > 1 || families.1 > 1 {
        bail!("--listen: at most one IPv4 and one IPv6 address");
    }
    if listens.iter().any(|a| a.port() != listens[0].port()) {
        bail!("--listen: both addresses need the same port (the redirect target's port)");
    }
    if args.allow_entries > u32::MAX as usize {
        bail!(
            "--allow-entries must fit the allow map (at most {})",
            u32::MAX
        );
    }
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Pinned by default: to --cpus, else to the CPUs of the affinity mask.
    let cpus: Option<Vec<usize>> = match (&args.cpus, args.no_pin) {
        (Some(list), _) => Some(list.0.clone()),
        (None, true) => None,
        (None, false) => core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect::<Vec<_>>())
            .filter(|ids| !ids.is_empty()),
    };
    // One shard per CPU of the mask, but never more than the CPU quota allows
    // (`available_parallelism` reads cgroup cpu.max: a pod limited to 2 CPUs on a 64-CPU node
    // gets 2 shards, pinned to the first 2 CPUs of its mask).
    let shards = args.shards.unwrap_or(match (&args.cpus, &cpus) {
        (Some(list), _) => list.0.len(),
        (None, Some(mask)) => mask.len().min(available),
        (None, None) => available,
    });
    for &listen in &listens {
        if listen.ip().is_unspecified() {
            bail!(
                "--listen {}: name the address to serve on (e.g. 127.0.0.1 or the node's DNS \
             address); a wildcard socket may answer from another local address than the client \
             asked, which clients drop",
                listen
            );
        }
        if listen.port() == 0 && (shards > 1 || listens.len() > 1) {
            bail!(
                "--listen with port 0 gives each shard its own port: name a port, or use --shards 1"
            );
        }
    }
    if shards == 0 {
        bail!("--shards must be at least 1");
    }
    let mut plan = Plan {
        listen: listens.clone(),
        upstreams: upstreams.clone(),
        addressed,
        shards: Vec::with_capacity(shards * listens.len()),
        backend: match args.io {
            IoFlag::Auto => BackendChoice::Auto,
            IoFlag::Uring => BackendChoice::Uring,
            IoFlag::Mmsg => BackendChoice::Mmsg,
        },
    };
    // Each listen address gets `shards` shards; shard i of each is pinned like the others' i.
    for (listen, i) in listens
        .iter()
        .flat_map(|&l| (0..shards).map(move |i| (l, i)))
    {
        // Each server gets its own connected sockets (and TCP connection).
        let mut io = IoConfig::new(listen, upstreams[0]);
        io.upstreams = upstreams.clone();
        io.upstream_sockets = args.upstream_sockets;
        io.batch = args.batch;
        io.tcp_idle_timeout = args.tcp_idle_timeout;
        io.max_tcp_conns = args.max_tcp_conns;
        io.max_tcp_conns_per_source = args.max_tcp_conns_per_source;
        io.max_tcp_message = args.max_tcp_message;
        io.max_tcp_out_bytes = args.max_tcp_out_bytes;
        io.max_tcp_pipeline = args.max_tcp_pipeline;
        io.tcp_socket_buffer_bytes = args.tcp_socket_buffer_bytes;
        io.coalesce_wait = args.coalesce;
        io.coalesce_batch = args.coalesce_batch;
        let mut core = CoreConfig::new(match addressed {
            false => upstreams[0],
            true => SocketAddr::new(listen.ip(), 53),
        });
        core.upstreams = upstreams.clone();
        core.addressed = addressed;
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
        core.require_origin = !args.no_bpf;
        core.max_pending = args.max_pending;
        core.max_pending_per_endpoint = args.max_pending_per_endpoint.max(1);
        core.flow_records = args.flow_log.is_some() || args.flow_history > 0;
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
        let cpu = cpus.as_ref().map(|cpus| cpus[i % cpus.len()]);
        plan.shards.push((io, core, cpu));
    }
    fd_budget(&plan);
    Ok(plan)
}

/// Raises the open-files limit to its hard limit and says when even that is below what the
/// shards may hold (a socket per TCP client up to `--max-tcp-conns` each, their upstream
/// sockets, and room for the rest): past it, accepts fail with EMFILE (each shard then closes
/// its longest-idle client, or refuses the new one) and so do upstream connects and state saves.
fn fd_budget(plan: &Plan) {
    let needed: u64 = 256
        + plan
            .shards
            .iter()
            .map(|(io, _, _)| {
                (io.max_tcp_conns + io.upstreams.len() * (usize::from(io.upstream_sockets) + 1) + 8)
                    as u64
            })
            .sum::<u64>();
    match dnsfence_engine::io::raise_fd_limit() {
        Ok((soft, _)) if soft < needed => eprintln!(
            "dnsfence: warning: the open-files limit is {soft}, below the {needed} the shards \
             may hold (--max-tcp-conns per shard): raise it (systemd LimitNOFILE=) or lower \
             --max-tcp-conns"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("dnsfence: warning: reading the open-files limit: {e}"),
    }
}

/// Where the node's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The `nameserver` addresses of a resolv.conf, port 53 (a scope suffix `%eth0` is dropped;
/// the proxy forwards to link-local servers only when named with --dns-server).
fn resolv_conf_servers(path: &str) -> Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("read {path} for the DNS servers to trust (give --dns-server or --upstream)")
    })?;
    Ok(parse_resolv_conf(&text))
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
            let server = SocketAddr::new(ip, 53);
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
    }
    servers
}

/// The upstream, for messages.
pub fn upstream_text(upstreams: &[SocketAddr], addressed: bool) -> String {
    let list = upstreams
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match addressed {
        false => list,
        true => format!("(the server each workload addressed, if one of: {list})"),
    }
}

/// The listen addresses, for messages.
pub fn listen_text(listen: &[SocketAddr]) -> String {
    listen
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// A 128-bit secret from the kernel's random pool (the key of a shard's ID generator).
pub fn os_random_key() -> Result<[u64; 2]> {
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

/// A thread of the data plane that ended (see [`Server::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shard `i`.
    Shard(usize),
    /// The consumer of the shards' records.
    Consumer,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Shard(i) => write!(f, "shard {i}"),
            Stopped::Consumer => f.write_str("the consumer thread"),
        }
    }
}

/// The running data plane of a process: shards, the consumer and the metrics listener.
pub struct Server {
    /// Per-shard published status.
    pub statuses: Vec<Arc<ShardStatus>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    shard_stop: Arc<AtomicBool>,
    consumer: std::thread::JoinHandle<()>,
    consumer_stop: Arc<AtomicBool>,
    records: Arc<RecordQueue>,
    /// The consumer's aggregates (the FQDN cache).
    pub observations: Arc<Mutex<Observations>>,
    /// Policy and endpoint reloads (shown in the metrics).
    pub reload: Arc<metrics::ReloadStatus>,
    who: &'static str,
    upstream: String,
    case_logged: bool,
    health: Arc<crate::health::Health>,
}

/// What a [`Server`] starts from.
pub struct Start<'a> {
    /// `dnsfence agent` or `dnsfence proxy`, for messages.
    pub who: &'static str,
    /// The flags.
    pub args: &'a ServeArgs,
    /// The resolved plan.
    pub plan: Plan,
    /// The policy the shards read.
    pub policy: Arc<PolicyHandle>,
    /// Where allow entries go.
    pub enforcer: Arc<Enforcer>,
    /// The FQDN cache to start from (restored from the state directory, or empty).
    pub observations: Observations,
    /// Sees every record the consumer takes (the proxy's replay buffers).
    pub forward: Option<consumer::Forward>,
    /// The sync's counters, and (proxy) the records kept for the agent, for the metrics.
    pub sync: Arc<crate::ha::SyncStats>,
    /// See [`crate::ha::Pending`].
    pub pending: Option<Arc<crate::ha::Pending>>,
    /// Liveness and readiness (the control loop beats through [`Server::check`]).
    pub health: Arc<crate::health::Health>,
    /// The metrics listener, from [`bind_metrics`] (none with `--no-metrics`).
    pub endpoints: Option<metrics::Endpoints>,
}

/// Binds the metrics listener of `role` (`--metrics-listen`, else its default; none with
/// `--no-metrics`): it answers 503 until [`Server::start`] gives it the running process. Bound
/// early, so that a taken port fails at once and probes get 503, not a refused connect, while
/// the process prepares (the proxy waits for the agent's first policy).
pub fn bind_metrics(
    args: &ServeArgs,
    role: crate::health::Role,
) -> Result<Option<metrics::Endpoints>> {
    if args.no_metrics {
        return Ok(None);
    }
    let listen = args
        .metrics_listen
        .unwrap_or_else(|| metrics::default_listen(role));
    let endpoints = metrics::bind(listen).with_context(|| format!("metrics listener {listen}"))?;
    Ok(Some(endpoints))
}

impl Server {
    /// Opens the flow log (what can fail on a bad path, before any shard joins the listen
    /// port's SO_REUSEPORT group, where it would take a share of the queries; the metrics
    /// listener is bound before, by [`bind_metrics`]), then starts the shards, the consumer
    /// and the metrics.
    /// The policy is compiled before: a process takes queries only once it can answer them.
    pub fn start(start: Start<'_>) -> Result<Server> {
        let Start {
            who,
            args,
            plan,
            policy,
            enforcer,
            observations,
            forward,
            sync,
            pending,
            health,
            endpoints,
        } = start;
        let records = Arc::new(RecordQueue::new(args.record_queue));
        let flow_log: Option<Box<dyn std::io::Write + Send>> = match &args.flow_log {
            None => None,
            // 0600: every workload's queries and addresses are in it (review finding: made
            // under the umask, others could read it; one an older build made is made
            // private too).
            Some(path) => {
                use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
                // Only a regular file of this user, not reached through a symlink, is made
                // private (review: `--flow-log /dev/null` made the host's /dev/null 0600,
                // and a log another user owns made the start fail); any other is said, and
                // used as it is.
                let linked =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("flow log {}", path.display()))?;
                let meta = file
                    .metadata()
                    .with_context(|| format!("flow log {}", path.display()))?;
                // The effective user: the owner of this process's /proc entry.
                let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
                let mine = !linked && Some(meta.uid()) == euid;
                if meta.file_type().is_file() && meta.mode() & 0o077 != 0 {
                    let private = mine
                        && file
                            .set_permissions(std::fs::Permissions::from_mode(0o600))
                            .is_ok();
                    if !private {
                        eprintln!(
                            "{who}: warning: flow log {} (mode {:o}) is readable by others: \
                             every workload's queries are in it",
                            path.display(),
                            meta.mode() & 0o777
                        );
                    }
                }
                Some(Box::new(std::io::BufWriter::new(file)))
            }
        };

        let mut statuses = Vec::new();
        let mut threads = Vec::new();
        let shard_stop = Arc::new(AtomicBool::new(false));
        let shard_count = plan.shards.len();
        let placement = match plan.shards.iter().all(|(_, _, cpu)| cpu.is_none()) {
            true => "not pinned".to_owned(),
            false => format!(
                "on CPUs {}",
                plan.shards
                    .iter()
                    .map(|(_, _, cpu)| cpu.map_or("-".to_owned(), |c| c.to_string()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        let upstream = upstream_text(&plan.upstreams, plan.addressed);
        let reuseport = crate::steer::open(who, &enforcer, args);
        let mut per_addr = std::collections::HashMap::new();
        for (index, (io, core, cpu)) in plan.shards.into_iter().enumerate() {
            let on_addr = per_addr.entry(io.listen).or_insert(0usize);
            let steering = reuseport
                .as_ref()
                .map(|r| crate::steer::shard(who, r, io.listen, *on_addr));
            *on_addr += 1;
            let status = Arc::new(ShardStatus::default());
            statuses.push(Arc::clone(&status));
            let allow = enforcer.sink();
            let origin = enforcer.origin(&args.bpf_pin)?;
            let config = ShardConfig {
                index,
                core,
                io,
                backend: plan.backend,
                cpu,
                allow,
                origin,
                policy: Arc::clone(&policy),
                records: Arc::clone(&records),
                stop: Arc::clone(&shard_stop),
                steering,
                status,
            };
            match shard::spawn(config) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    shard_stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    bail!("cannot listen on {}: {e}", listen_text(&plan.listen));
                }
            }
        }

        let observations = Arc::new(Mutex::new(observations));
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
                forward,
            };
            std::thread::Builder::new()
                .name("dnsf-consumer".into())
                .spawn(move || consumer::run(records, observations, config, stop))
                .context("consumer thread")?
        };

        let reload = Arc::new(metrics::ReloadStatus::default());
        health.beat();
        if let Some(endpoints) = endpoints {
            endpoints.install(metrics::State {
                shards: statuses.clone(),
                observations: Arc::clone(&observations),
                policy: Arc::clone(&policy),
                enforcer: Arc::clone(&enforcer),
                allow_capacity: args.ledger().capacity,
                reject_rcode: match args.reject_rcode {
                    RejectFlag::Refused => "REFUSED",
                    RejectFlag::Nxdomain => "NXDOMAIN",
                },
                reload: Arc::clone(&reload),
                records_queued: Arc::clone(&records),
                sync,
                pending,
                health: Arc::clone(&health),
            });
        }
        let backend = statuses[0]
            .backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|b| format!("{b:?}"));
        eprintln!(
            "{who}: serving {} with {shard_count} shards ({}, {placement}), upstream {upstream}",
            listen_text(&plan.listen),
            backend.unwrap_or_default(),
        );
        Ok(Server {
            statuses,
            threads,
            shard_stop,
            consumer,
            consumer_stop,
            records: Arc::clone(&records),
            observations,
            reload,
            who,
            upstream,
            case_logged: false,
            health,
        })
    }

    /// A thread that stopped, a shard or the consumer (it should not: the process exits so
    /// that a supervisor restarts it). Also logs, once, that 0x20 was switched off for an upstream.
    /// Called on each turn of the control loop: it is the loop's heartbeat for `/healthz`.
    pub fn check(&mut self) -> Option<Stopped> {
        self.health.beat();
        if !self.case_logged
            && self.statuses.iter().any(|s| {
                s.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .upstream_0x20_disabled
                    != 0
            })
        {
            self.case_logged = true;
            eprintln!(
                "{}: an upstream of {} does not preserve the letter case of questions: \
                 DNS 0x20 switched off for it (--upstream-0x20 on keeps it)",
                self.who, self.upstream
            );
        }
        if let Some(i) = self.threads.iter().position(|t| t.is_finished()) {
            self.health.shard_died(i);
            return Some(Stopped::Shard(i));
        }
        // Review finding: a consumer that panicked (in a forward hook, say) left the process
        // healthy and ready while its FQDN cache, flow history and the proxy's records for
        // the agent stopped.
        if self.consumer.is_finished() {
            self.health.consumer_died();
            return Some(Stopped::Consumer);
        }
        None
    }

    /// Stops the shards (each takes its sockets out of the port's steering, then drains what
    /// they hold and its in-flight queries, bounded by the upstream timeout), then the
    /// consumer once the record queue is empty.
    pub fn shutdown(self) {
        self.shard_stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.consumer_stop.store(true, Ordering::Relaxed);
        self.records.wake();
        let _ = self.consumer.join();
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
    fn coalesce_values() {
        assert_eq!(parse_coalesce("0"), Ok(Duration::ZERO));
        assert_eq!(parse_coalesce("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_coalesce("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_coalesce("10ms"), Ok(Duration::from_millis(10)));
        assert!(parse_coalesce("11ms").is_err());
        assert!(parse_coalesce("50").is_err());
        assert!(parse_coalesce("1s").is_err());
        assert!(parse_coalesce("us").is_err());
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example.test\nnameserver 127.0.0.53\n\
                    nameserver fe80::1%eth0\nnameserver 10.0.0.2 # x\nnameserver 127.0.0.53\n\
                    nameserver bogus\noptions edns0\n";
        let want: Vec<SocketAddr> = ["127.0.0.53:53", "[fe80::1]:53", "10.0.0.2:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(parse_resolv_conf(text), want);
        assert!(parse_resolv_conf("").is_empty());
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
