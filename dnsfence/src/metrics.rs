//! The process's HTTP endpoints: `GET /metrics` (OpenMetrics text, encoded by
//! `prometheus-client` from typed families), `GET /healthz` and `GET /readyz` (`health.rs`),
//! served by the bounded HTTP/1.x server of `http.rs` (at most
//! [`crate::http::MAX_CONNECTIONS`] connections, each closed [`crate::http::DEADLINE`] after
//! its accept at the latest).
//!
//! Nothing here touches the hot path: a scrape reads what the shards publish (their counters
//! are copied into [`ShardStatus`] about every 100 ms, and their loop counters are atomics),
//! and a [`Collector`] turns it into metric families when asked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use dnsfence_engine::consumer::{Observations, RecordQueue};
use dnsfence_engine::core::Stats;
use dnsfence_engine::histogram::{Latency, Scale};
use dnsfence_engine::io::IoStats;
use dnsfence_engine::shard::{PolicyHandle, ShardStatus};

use crate::health::{Answer, Health, Observed, Role};
use crate::http::Response;

/// What the endpoints read.
pub struct State {
    /// Per-shard published status.
    pub shards: Vec<Arc<ShardStatus>>,
    /// Consumer aggregates.
    pub observations: Arc<Mutex<Observations>>,
    /// Current policy.
    pub policy: Arc<PolicyHandle>,
    /// Where allow entries go (userspace table or eBPF maps).
    pub enforcer: Arc<crate::enforce::Enforcer>,
    /// The allow table's capacity (`--allow-entries`).
    pub allow_capacity: usize,
    /// What denied queries are answered (`--reject-rcode`), as a label value.
    pub reject_rcode: &'static str,
    /// Policy and endpoint reloads.
    pub reload: Arc<ReloadStatus>,
    /// The record queue (its length is a gauge).
    pub records_queued: Arc<RecordQueue>,
    /// The agent ↔ proxy sync's counters.
    pub sync: Arc<crate::ha::SyncStats>,
    /// The standalone proxy's records kept for the agent.
    pub pending: Option<Arc<crate::ha::Pending>>,
    /// Liveness and readiness.
    pub health: Arc<Health>,
}

/// Where policy and endpoint reloads stand (written by the control loop).
#[derive(Debug, Default)]
pub struct ReloadStatus {
    /// File versions rejected so far (each reported once).
    pub errors: AtomicU64,
    /// Files whose version on disk is rejected now (their last good version, or a fail-closed
    /// stand-in, is in force).
    pub rejected: AtomicU64,
    /// Files changed on disk and not loaded yet (still changing).
    pub pending: AtomicU64,
    /// The Kubernetes source, when the agent has one.
    pub k8s: K8sGauges,
}

/// The Kubernetes source (`--k8s`) as the agent's control loop last saw it.
#[derive(Debug, Default)]
pub struct K8sGauges {
    enabled: AtomicBool,
    connected: AtomicBool,
    watch_errors: AtomicU64,
    relists: AtomicU64,
    /// What the rendering left out: labels, addresses, cgroups, pods, services, refused
    /// entries.
    left_out: [AtomicU64; 6],
}

impl K8sGauges {
    /// Stores the source's status.
    pub fn store(&self, status: &dnsfence_k8s::K8sStatus) {
        self.enabled.store(true, Ordering::Relaxed);
        self.connected.store(status.connected, Ordering::Relaxed);
        self.watch_errors
            .store(status.watch_errors, Ordering::Relaxed);
        self.relists.store(status.relists, Ordering::Relaxed);
        let r = &status.render;
        for (g, v) in self.left_out.iter().zip([
            r.dropped_labels,
            r.dropped_ips,
            r.dropped_cgroups,
            r.dropped_pods,
            r.dropped_services,
            r.refused_entries,
        ]) {
            g.store(v, Ordering::Relaxed);
        }
    }
}

/// The Kubernetes source's families (only when the agent has one).
fn k8s(e: &mut DescriptorEncoder, g: &K8sGauges) -> Fmt {
    if !g.enabled.load(Ordering::Relaxed) {
        return Ok(());
    }
    gauge(
        e,
        "k8s_connected",
        "1 when the Kubernetes API server answered the latest request (0: the last state \
         stays in force)",
        u64::from(g.connected.load(Ordering::Relaxed)),
    )?;
    counter(
        e,
        "k8s_watch_errors",
        "Kubernetes list and watch errors",
        g.watch_errors.load(Ordering::Relaxed),
    )?;
    counter(
        e,
        "k8s_relists",
        "Full relists after the first (410 Gone, watch desync)",
        g.relists.load(Ordering::Relaxed),
    )?;
    gauges(
        e,
        "k8s_left_out",
        "What the latest rendering of the cluster left out so that the rest loads \
         (identity-spoofing or unrepresentable labels, contested or unproven addresses, \
         cgroups, pods, services selecting by identity keys, entries the loader refused)",
        [
            "labels",
            "addresses",
            "cgroups",
            "pods",
            "services",
            "refused",
        ]
        .into_iter()
        .zip(&g.left_out)
        .map(|(what, v)| ([("what", what)], v.load(Ordering::Relaxed))),
    )
}

/// Where the agent serves its endpoints without `--metrics-listen`.
pub const AGENT_LISTEN: &str = "127.0.0.1:9967";
/// Where the standalone proxy serves its endpoints without `--metrics-listen`.
pub const PROXY_LISTEN: &str = "127.0.0.1:9968";

/// The default address of `role`'s endpoints.
pub fn default_listen(role: Role) -> SocketAddr {
    let addr = match role {
        Role::Agent => AGENT_LISTEN,
        Role::Proxy => PROXY_LISTEN,
    };
    addr.parse().expect("a socket address")
}

/// The media type of `GET /metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The listening endpoints: they answer 503 until [`Endpoints::install`] gives them the
/// running process (bound first, so a taken port fails before anything starts).
pub struct Endpoints {
    installed: Arc<OnceLock<Installed>>,
}

struct Installed {
    state: Arc<State>,
    registry: Registry,
}

/// Binds `addr` and serves the endpoints there from now on (threads that live as long as the
/// process).
pub fn bind(addr: SocketAddr) -> std::io::Result<Endpoints> {
    let installed: Arc<OnceLock<Installed>> = Arc::default();
    let serving = Arc::clone(&installed);
    let listener = std::net::TcpListener::bind(addr)?;
    crate::http::spawn(
        listener,
        Arc::new(move |method: &str, path: &str| answer(method, path, serving.get())),
    )?;
    Ok(Endpoints { installed })
}

impl Endpoints {
    /// From now on the endpoints report on `state`.
    pub fn install(&self, state: State) {
        let state = Arc::new(state);
        let mut registry = Registry::with_prefix("dnsfence");
        registry.register_collector(Box::new(Collect(Arc::clone(&state))));
        let _ = self.installed.set(Installed { state, registry });
    }
}

fn probe(answer: Answer) -> Response {
    let status = match answer.ok {
        true => 200,
        false => 503,
    };
    Response::text(status, answer.text)
}

/// The body of every endpoint's 503 before the process serves (`dnsfence status` knows it).
pub const STARTING: &str = "starting: the shards do not serve yet\n";

/// One request's answer (`HEAD` is answered as `GET`; the server leaves the body out).
fn answer(method: &str, path: &str, installed: Option<&Installed>) -> Response {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "not found: try GET /metrics, /healthz or /readyz\n");
    }
    if !matches!(method, "GET" | "HEAD") {
        return Response {
            allow: Some("GET, HEAD"),
            ..Response::text(405, "GET or HEAD only\n")
        };
    }
    let Some(Installed { state, registry }) = installed else {
        return Response::text(503, STARTING);
    };
    match path {
        "/metrics" => {
            // At most a few pages made at once: making one waits on the consumer's and the
            // ledger's locks, and scrapes piling up behind a long hold would fill every
            // connection slot the probes need (review finding).
            let Some(_scrape) = Scrape::begin() else {
                return Response::text(503, "busy: other scrapes are being answered\n");
            };
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => Response {
                    content_type: OPENMETRICS,
                    ..Response::text(200, body)
                },
                Err(_) => Response::text(500, "encoding failed\n"),
            }
        }
        "/healthz" => probe(state.health.liveness(&observe(state), Instant::now())),
        _ => probe(state.health.readiness(&observe(state), Instant::now())),
    }
}

/// Most `/metrics` pages made at once (a Prometheus server or two, and `dnsfence status`).
pub const MAX_SCRAPES: usize = 4;

/// `/metrics` pages being made now.
static SCRAPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One `/metrics` page being made, counted until dropped.
struct Scrape(&'static std::sync::atomic::AtomicUsize);

impl Scrape {
    /// A scrape, unless [`MAX_SCRAPES`] are being made.
    fn begin() -> Option<Scrape> {
        Scrape::begin_on(&SCRAPES)
    }

    /// A scrape counted in `count`, unless it holds [`MAX_SCRAPES`].
    fn begin_on(count: &'static std::sync::atomic::AtomicUsize) -> Option<Scrape> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SCRAPES).then_some(n + 1)
            })
            .ok()
            .map(|_| Scrape(count))
    }
}

impl Drop for Scrape {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the probes read.
fn observe(state: &State) -> Observed {
    Observed {
        batches: state
            .shards
            .iter()
            .map(|s| s.batches.load(Ordering::Relaxed))
            .collect(),
        generation: state.policy.load().generation(),
        sync_connected: state.sync.connected.load(Ordering::Relaxed),
    }
}

/// Reads the running process into metric families at each scrape.
struct Collect(Arc<State>);

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dnsfence collector")
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// A counter (`name` without `_total`: the encoder adds it).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Fmt {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A gauge.
fn gauge<V>(e: &mut DescriptorEncoder, name: &str, help: &str, value: V) -> Fmt
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A family of counters (`name` without `_total`), one sample per label set.
fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of gauges, one sample per label set.
fn gauges<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram of seconds from the shards' fixed-bucket latencies, summed.
fn histogram<S: Scale>(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Latency<S>) -> Fmt {
    let buckets: Vec<(f64, u64)> = h.seconds().collect();
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_ns as f64 / 1e9,
        h.count(),
        &buckets,
        None,
    )
}

/// The latency histograms by phase (processing, upstream, datapath write), and upstream
/// answers by rcode.
fn latencies(e: &mut DescriptorEncoder, stats: &[Stats]) -> Fmt {
    let (mut upstream, mut write) = (Latency::default(), Latency::default());
    let mut processing = Latency::default();
    let mut rcodes = [0u64; 16];
    for s in stats {
        upstream.add(&s.upstream_latency);
        write.add(&s.write_latency);
        processing.add(&s.processing_latency);
        for (sum, n) in rcodes.iter_mut().zip(s.upstream_rcodes) {
            *sum += n;
        }
    }
    histogram(
        e,
        "query_processing_seconds",
        "Time each client query spends in the proxy before its refusal is written or its \
         forward queued (parse, endpoint, policy walk)",
        &processing,
    )?;
    histogram(
        e,
        "upstream_latency_seconds",
        "Upstream latency of the answers relayed: from forwarding the query to its answer",
        &upstream,
    )?;
    histogram(
        e,
        "datapath_write_seconds",
        "Duration of each batched allow write (eBPF map or table); the answers that needed \
         it are released after it",
        &write,
    )?;
    // The common ones always (so rates start at zero), the rest once seen; 12-15 as one.
    let other: u64 = rcodes[12..].iter().sum();
    let samples = (0..12u8)
        .map(|i| (rcode_name(i), rcodes[usize::from(i)]))
        .filter(|&(name, n)| {
            n > 0 || ["NOERROR", "SERVFAIL", "NXDOMAIN", "REFUSED"].contains(&name)
        })
        .chain((other > 0).then_some(("OTHER", other)))
        .map(|(name, n)| ([("rcode", name)], n));
    counters(
        e,
        "upstream_answers",
        "Upstream answers relayed to clients, by rcode",
        samples,
    )
}

/// The label of a DNS rcode of the header's 4 bits: its mnemonic (RFC 1035, 2136, 8490).
fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        11 => "DSOTYPENI",
        _ => crate::observe::rcode_mnemonic(u16::from(rcode)).unwrap_or("OTHER"),
    }
}

/// A per-shard counter of `T`: metric name (without `_total`), help text, accessor.
type PerShard<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Each counter as `{name}_total{shard="i"}` over the shards' values.
fn per_shard<T>(e: &mut DescriptorEncoder, counters_: &[PerShard<T>], shards: &[T]) -> Fmt {
    for (name, help, get) in counters_ {
        let samples = shards
            .iter()
            .enumerate()
            .map(|(i, s)| ([("shard", i)], get(s)));
        counters(e, name, help, samples)?;
    }
    Ok(())
}

/// The core's counters, one family each, per shard (the names the tests and scripts read).
const CORE: &[PerShard<Stats>] = &[
    ("queries", "Client queries received", |s| s.queries),
    ("forwarded", "Queries forwarded upstream", |s| s.forwarded),
    ("refused", "Queries refused by policy", |s| s.refused),
    (
        "refused_unknown_source",
        "Queries refused: unknown source",
        |s| s.refused_unknown_source,
    ),
    (
        "origin_missing",
        "Queries with no datapath origin record (eBPF mode; refused as unidentified)",
        |s| s.origin_missing,
    ),
    (
        "malformed_answered",
        "Malformed queries answered FORMERR/NOTIMP",
        |s| s.malformed_answered,
    ),
    ("malformed_dropped", "Malformed queries dropped", |s| {
        s.malformed_dropped
    }),
    (
        "responses_dropped",
        "Responses (QR set) dropped unanswered",
        |s| s.responses_dropped,
    ),
    (
        "spoofing_suspected",
        "Queries given up after repeated answers with their ID but another question",
        |s| s.spoofing_suspected,
    ),
    (
        "pending_full",
        "Queries answered SERVFAIL: pending table full, or the endpoint's quota or fair share of \
         it",
        |s| s.pending_full,
    ),
    (
        "pending_fair_share",
        "Of those, refused at the endpoint's fair share (below its quota, it held as many as \
         were free)",
        |s| s.pending_fair_share,
    ),
    (
        "no_upstream",
        "Allowed queries answered SERVFAIL: no --upstream and the client addressed the proxy itself",
        |s| s.no_upstream,
    ),
    (
        "untrusted_server",
        "Allowed queries refused: no --upstream and the client addressed a server not given by --dns-server",
        |s| s.untrusted_server,
    ),
    (
        "timeouts",
        "Queries answered SERVFAIL after the upstream timeout",
        |s| s.timeouts,
    ),
    ("answered", "Upstream answers relayed", |s| s.answered),
    ("truncated", "Truncated answers relayed", |s| s.truncated),
    (
        "upstream_wrong_source",
        "Upstream answers from another address than their socket's server",
        |s| s.upstream_wrong_source,
    ),
    ("upstream_malformed", "Malformed upstream answers", |s| {
        s.upstream_malformed
    }),
    (
        "upstream_unknown_id",
        "Upstream answers with no query in flight",
        |s| s.upstream_unknown_id,
    ),
    (
        "upstream_wrong_question",
        "Upstream answers with a wrong question",
        |s| s.upstream_wrong_question,
    ),
    ("answer_malformed", "Answers with unparsable records", |s| {
        s.answer_malformed
    }),
    (
        "off_chain_records",
        "Address records off the CNAME chain (ignored)",
        |s| s.off_chain_records,
    ),
    (
        "addresses_overflow",
        "Addresses beyond the 32 kept per answer (not allowed)",
        |s| s.addresses_overflow,
    ),
    (
        "addresses_in_cluster",
        "Answer addresses inside the cluster or node-local (loopback unless \
         --open-loopback-answers, link-local, unspecified), never allowed by a toFQDNs rule \
         (DNS rebinding)",
        |s| s.addresses_in_cluster,
    ),
    (
        "ttl_clamped",
        "Enforced answers whose TTLs were lowered to what their allow entries outlive (the \
         answer's minimum TTL, raised to --min-ttl, capped at --max-ttl)",
        |s| s.ttl_clamped,
    ),
    ("allow_writes", "Allow entries written", |s| s.allow_writes),
    ("allow_write_failures", "Failed allow write batches", |s| {
        s.allow_write_failures
    }),
    (
        "records_dropped",
        "Records dropped: consumer queue full",
        |s| s.records_dropped,
    ),
    (
        "upstream_case_mismatch",
        "Upstream answers matching the question but not its 0x20 spelling",
        |s| s.upstream_case_mismatch,
    ),
    (
        "case_mismatch_failed",
        "Queries answered SERVFAIL: answer in another spelling from an upstream not known to preserve case",
        |s| s.case_mismatch_failed,
    ),
    (
        "upstream_0x20_disabled",
        "Upstream servers DNS 0x20 was switched off for, per shard (they do not preserve case)",
        |s| s.upstream_0x20_disabled,
    ),
    (
        "upstream_sockets_rotated",
        "Upstream sockets replaced by a fresh random port",
        |s| s.upstream_sockets_rotated,
    ),
    (
        "upstream_sockets_attacked",
        "Upstream sockets replaced early after a burst of answers with unknown IDs",
        |s| s.upstream_sockets_attacked,
    ),
    (
        "upstream_socket_replace_failed",
        "Upstream socket replacements that failed (old socket kept)",
        |s| s.upstream_socket_replace_failed,
    ),
    (
        "upstream_resent",
        "Queries re-sent from a replacement upstream socket",
        |s| s.upstream_resent,
    ),
    (
        "upstream_tcp_resent",
        "Queries re-sent on a new TCP connection: theirs to the upstream was lost before the answer",
        |s| s.upstream_tcp_resent,
    ),
    (
        "upstream_socket_overrun",
        "Queries sent on a retiring upstream socket: every socket was retiring (raise --upstream-sockets)",
        |s| s.upstream_socket_overrun,
    ),
    (
        "upstream_unreachable",
        "Queries answered SERVFAIL at once: ICMP unreachable from the upstream",
        |s| s.upstream_unreachable,
    ),
    (
        "client_sends_dropped",
        "Messages to clients dropped by the I/O layer",
        |s| s.client_sends_dropped,
    ),
    (
        "upstream_sends_dropped",
        "Messages to the upstream dropped by the I/O layer",
        |s| s.upstream_sends_dropped,
    ),
];

/// The I/O layer's counters, per shard, as `dnsfence_io_*`.
const IO: &[PerShard<IoStats>] = &[
    (
        "io_udp_rx",
        "Datagrams received (clients and upstream)",
        |s| s.udp_rx,
    ),
    ("io_udp_tx", "Datagrams sent", |s| s.udp_tx),
    ("io_waits", "Polls that slept (wake-ups)", |s| s.waits),
    (
        "io_coalesced_waits",
        "Polls that slept coalescing completions (--coalesce)",
        |s| s.coalesced_waits,
    ),
    (
        "io_udp_rx_truncated",
        "Datagrams dropped: larger than the receive buffer",
        |s| s.udp_rx_truncated,
    ),
    ("io_udp_rx_errors", "Receive errors", |s| s.udp_rx_errors),
    ("io_send_errors", "Sends the kernel rejected", |s| {
        s.send_errors
    }),
    (
        "io_send_dropped",
        "Sends dropped before the kernel (queue or buffer full)",
        |s| s.send_dropped,
    ),
    ("io_tcp_accepted", "TCP client connections accepted", |s| {
        s.tcp_accepted
    }),
    (
        "io_tcp_limit_rejected",
        "TCP connections closed at once: connection limit",
        |s| s.tcp_limit_rejected,
    ),
    (
        "io_tcp_no_descriptor",
        "TCP accepts that failed for want of a file descriptor (longest idle closed, or the new one refused)",
        |s| s.tcp_no_descriptor,
    ),
    (
        "io_tcp_source_limit_rejected",
        "TCP connections closed at once: per-source connection limit",
        |s| s.tcp_source_limit_rejected,
    ),
    (
        "io_tcp_evicted",
        "TCP connections closed to make room at the connection limit (longest idle)",
        |s| s.tcp_evicted,
    ),
    (
        "io_tcp_framing_errors",
        "TCP connections ended by a frame that is not a query (bad length, QR set)",
        |s| s.tcp_framing_errors,
    ),
    (
        "io_tcp_idle_closed",
        "TCP connections closed: idle timeout",
        |s| s.tcp_idle_closed,
    ),
    (
        "io_upstream_tcp_errors",
        "Upstream TCP connection errors",
        |s| s.upstream_tcp_errors,
    ),
];

/// Sums `get` over the shards.
fn sum<T>(shards: &[T], get: impl Fn(&T) -> u64) -> u64 {
    shards.iter().map(get).sum()
}

impl Collector for Collect {
    fn encode(&self, mut e: DescriptorEncoder) -> Fmt {
        let state = &self.0;
        let stats: Vec<Stats> = state
            .shards
            .iter()
            .map(|s| *s.stats.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let io: Vec<IoStats> = state
            .shards
            .iter()
            .map(|s| s.io.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        per_shard(&mut e, CORE, &stats)?;
        per_shard(&mut e, IO, &io)?;
        summaries(&mut e, state, &stats, &io)?;
        latencies(&mut e, &stats)?;
        shards(&mut e, state)?;
        consumer(&mut e, state)?;
        sync(&mut e, state)?;
        allow(&mut e, state)?;
        policy(&mut e, state)
    }
}

/// The per-shard counters summed and split the way dashboards ask: every query by its
/// verdict, the answers the proxy wrote itself by rcode, upstream errors, malformed input
/// and dropped sends by kind.
fn summaries(e: &mut DescriptorEncoder, state: &State, stats: &[Stats], io: &[IoStats]) -> Fmt {
    let s = |get: fn(&Stats) -> u64| sum(stats, get);
    counters(
        e,
        "query_verdicts",
        "Client queries by verdict (they add up to dnsfence_queries_total)",
        [
            ("forwarded", s(|s| s.forwarded)),
            ("denied", s(|s| s.refused)),
            ("unknown_source", s(|s| s.refused_unknown_source)),
            ("untrusted_server", s(|s| s.untrusted_server)),
            ("no_upstream", s(|s| s.no_upstream)),
            ("overload", s(|s| s.pending_full)),
            (
                "malformed",
                s(|s| s.malformed_answered + s.malformed_dropped + s.responses_dropped),
            ),
        ]
        .map(|(verdict, n)| ([("verdict", verdict)], n)),
    )?;
    let servfail = s(|s| {
        s.no_upstream
            + s.pending_full
            + s.timeouts
            + s.answer_malformed
            + s.spoofing_suspected
            + s.case_mismatch_failed
            + s.upstream_unreachable
            + s.allow_write_failures
    });
    counters(
        e,
        "local_answers",
        "Answers the proxy wrote itself, by rcode (denials, failures; relayed upstream \
         answers are dnsfence_answered_total, malformed queries dnsfence_malformed_total)",
        [
            (
                state.reject_rcode,
                s(|s| s.refused + s.refused_unknown_source + s.untrusted_server),
            ),
            ("SERVFAIL", servfail),
        ]
        .map(|(rcode, n)| ([("rcode", rcode)], n)),
    )?;
    counters(
        e,
        "upstream_errors",
        "Upstream failures by kind",
        [
            ("timeout", s(|s| s.timeouts)),
            ("unreachable", s(|s| s.upstream_unreachable)),
            ("malformed", s(|s| s.upstream_malformed)),
            ("bad_records", s(|s| s.answer_malformed)),
            ("wrong_source", s(|s| s.upstream_wrong_source)),
            ("unknown_id", s(|s| s.upstream_unknown_id)),
            ("wrong_question", s(|s| s.upstream_wrong_question)),
            ("spoofing_suspected", s(|s| s.spoofing_suspected)),
            ("case_mismatch", s(|s| s.case_mismatch_failed)),
            ("tcp", sum(io, |s| s.upstream_tcp_errors)),
        ]
        .map(|(kind, n)| ([("kind", kind)], n)),
    )?;
    counters(
        e,
        "malformed",
        "Malformed input by reason",
        [
            ("query_answered", s(|s| s.malformed_answered)),
            ("query_dropped", s(|s| s.malformed_dropped)),
            ("response_to_listener", s(|s| s.responses_dropped)),
            ("tcp_framing", sum(io, |s| s.tcp_framing_errors)),
            ("upstream_answer", s(|s| s.upstream_malformed)),
            ("answer_records", s(|s| s.answer_malformed)),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )?;
    counters(
        e,
        "send_drops",
        "Messages the I/O layer dropped, by destination",
        [
            ("client", s(|s| s.client_sends_dropped)),
            ("upstream", s(|s| s.upstream_sends_dropped)),
        ]
        .map(|(to, n)| ([("to", to)], n)),
    )
}

/// Per-shard load and placement.
fn shards(e: &mut DescriptorEncoder, state: &State) -> Fmt {
    counters(
        e,
        "shard_loop_iterations",
        "Shard loop turns (each handles one batch of datagrams, or wakes every 100 ms)",
        state
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| ([("shard", i)], s.batches.load(Ordering::Relaxed))),
    )?;
    gauges(
        e,
        "shard_policy_generation",
        "The policy generation each shard judges new queries by",
        state
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| ([("shard", i)], s.generation.load(Ordering::Acquire))),
    )?;
    let mut m = e.encode_descriptor(
        "shard",
        "Shards: the I/O backend in use and the CPU pinned to",
        None,
        MetricType::Info,
    )?;
    for (i, s) in state.shards.iter().enumerate() {
        let backend = *s.backend.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = *s.cpu.lock().unwrap_or_else(|e| e.into_inner());
        m.encode_info(&[
            ("shard", i.to_string()),
            (
                "backend",
                backend.map_or("none".to_owned(), |b| format!("{b:?}").to_lowercase()),
            ),
            ("cpu", cpu.map_or("none".to_owned(), |c| c.to_string())),
        ])?;
    }
    Ok(())
}

/// The consumer's FQDN cache and record queue.
fn consumer(e: &mut DescriptorEncoder, state: &State) -> Fmt {
    let (entries, evictions, ip_updates) = {
        let obs = state.observations.lock().unwrap_or_else(|e| e.into_inner());
        (obs.cache.len(), obs.cache_evictions, obs.ip_updates)
    };
    gauge(
        e,
        "fqdn_cache_entries",
        "FQDN cache entries",
        entries as u64,
    )?;
    counter(
        e,
        "fqdn_cache_evictions",
        "FQDN cache entries evicted (oldest first)",
        evictions,
    )?;
    counter(e, "ip_updates", "Address observations taken", ip_updates)?;
    gauge(
        e,
        "record_queue_length",
        "Records waiting in the shard → consumer queue",
        state.records_queued.len() as u64,
    )
}

/// The agent ↔ proxy sync.
fn sync(e: &mut DescriptorEncoder, state: &State) -> Fmt {
    let sync = &state.sync;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    gauge(
        e,
        "sync_connected",
        "Sync peers connected now (agent: proxies; proxy: the agent)",
        load(&sync.connected),
    )?;
    counter(
        e,
        "sync_connections",
        "Sync connections made",
        load(&sync.connections),
    )?;
    counter(
        e,
        "sync_observations",
        "Observations merged (agent) or acknowledged (proxy)",
        load(&sync.observations),
    )?;
    counter(
        e,
        "sync_flows",
        "Flow records merged (agent) or acknowledged (proxy)",
        load(&sync.flows),
    )?;
    counter(
        e,
        "sync_snapshots",
        "Policy snapshots sent (agent) or acknowledged (proxy: applied, or equal to the one in force)",
        load(&sync.snapshots),
    )?;
    counter(
        e,
        "sync_snapshots_refused",
        "Policy snapshots from the agent this proxy could not put in force (the policy in force \
         stays)",
        load(&sync.snapshots_refused),
    )?;
    let (name, help, drops) = sync.flow_history_drops();
    counters(e, name, help, drops)?;
    if let Some(pending) = &state.pending {
        let (held, overflowed) = pending.counts();
        gauge(
            e,
            "sync_pending_records",
            "Records kept for the agent until it acknowledges them (the replay backlog)",
            held as u64,
        )?;
        counter(
            e,
            "sync_overflow",
            "Records kept for the agent dropped by overflow (oldest first)",
            overflowed,
        )?;
    }
    let mut m = e.encode_descriptor(
        "process",
        "This process: agent or standalone proxy",
        None,
        MetricType::Info,
    )?;
    m.encode_info(&[("role", state.health.role().name())])
}

/// The allow table (userspace, or the eBPF allow map) and the datapath's counters.
fn allow(e: &mut DescriptorEncoder, state: &State) -> Fmt {
    let allow = state.enforcer.allow_stats();
    gauge(
        e,
        "allow_entries",
        "Allow entries held",
        allow.entries as u64,
    )?;
    gauge(
        e,
        "allow_capacity",
        "Allow entries the table holds at most (--allow-entries)",
        state.allow_capacity as u64,
    )?;
    gauge(
        e,
        "allow_fill_ratio",
        "Allow entries held over the table's capacity",
        allow.entries as f64 / state.allow_capacity.max(1) as f64,
    )?;
    counters(
        e,
        "allow_refused",
        "Allow entry groups refused, by reason",
        [
            ("full", allow.full),
            ("endpoint_quota", allow.endpoint_quota),
            ("fair_share", allow.fair_share),
            ("name_quota", allow.name_quota),
            ("map_error", allow.map_errors),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )?;
    counters(
        e,
        "allow_removed",
        "Allow entries removed, by reason",
        [
            ("expired", allow.expired),
            ("revoked", allow.revoked),
            ("unjustified", allow.unjustified),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    )?;
    counter(
        e,
        "allow_repaired",
        "Allow entries put back into the pinned map after the other writer (agent or standalone \
         proxy) removed them while this process's policy still justified them",
        allow.repaired,
    )?;
    counter(
        e,
        "allow_repair_dropped",
        "Allow entries the other writer removed that this process dropped from its books \
         instead of putting back (its policy no longer justifies them, they expired, or the map \
         refused them)",
        allow.repair_dropped,
    )?;
    counter(
        e,
        "allow_repairs_deferred",
        "Repairs of the pinned allow map this standalone proxy put off because the agent \
         removed entries under a policy the proxy does not have yet (it repairs once it has it)",
        allow.repairs_deferred,
    )?;
    gauge(
        e,
        "allow_behind_agent",
        "1 while the agent's policy is another than this standalone proxy's (its snapshot not \
         applied yet, or the proxy cut off from the agent): repairs of the pinned allow map wait",
        u64::from(allow.behind_agent),
    )?;
    counter(
        e,
        "allow_in_cluster",
        "Allow entries refused or revoked because their address is inside the cluster (a name \
         resolving to a pod, service or node)",
        allow.in_cluster,
    )?;
    let datapath = state.enforcer.datapath_stats();
    if !datapath.is_empty() {
        counters(
            e,
            "datapath_events",
            "eBPF datapath events",
            datapath
                .into_iter()
                .map(|(event, n)| ([("event", event)], n)),
        )?;
    }
    Ok(())
}

/// The policy in force and its reloads.
fn policy(e: &mut DescriptorEncoder, state: &State) -> Fmt {
    let snapshot = state.policy.load();
    let stats = snapshot.stats();
    gauge(
        e,
        "policy_generation",
        "The policy generation in force (1 at start, one more per reload)",
        snapshot.generation(),
    )?;
    gauge(
        e,
        "policy_version",
        "The sync's number of the policy in force (the agent's; 0: none yet)",
        state.health.policy_version(),
    )?;
    gauge(
        e,
        "policy_in_force",
        "1 when a policy is in force (0: the proxy refuses every query, waiting for the agent's)",
        u64::from(state.health.policy_in_force()),
    )?;
    gauge(
        e,
        "policy_endpoints",
        "Endpoints registered",
        stats.endpoints as u64,
    )?;
    let reload = &state.reload;
    k8s(e, &reload.k8s)?;
    let (rejected, pending) = (
        reload.rejected.load(Ordering::Relaxed),
        reload.pending.load(Ordering::Relaxed),
    );
    counter(
        e,
        "policy_reload_errors",
        "Policy or endpoint file versions rejected",
        reload.errors.load(Ordering::Relaxed),
    )?;
    gauge(
        e,
        "policy_stale",
        "1 when a file on disk is rejected or not loaded yet",
        u64::from(rejected + pending > 0),
    )?;
    gauge(
        e,
        "policy_files_rejected",
        "Files whose version on disk is rejected",
        rejected,
    )?;
    gauge(
        e,
        "policy_files_pending",
        "Files changed on disk and not loaded yet",
        pending,
    )?;
    gauge(
        e,
        "policy_fail_closed_endpoints",
        "Endpoints denied everything: a policy selecting them failed to load",
        stats.fail_closed as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{DEADLINE as REQUEST_TIMEOUT, MAX_CONNECTIONS};
    use dnsfence_policy::Snapshot;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    fn state(shards: usize) -> State {
        State {
            shards: (0..shards).map(|_| Arc::default()).collect(),
            observations: Arc::default(),
            policy: Arc::new(PolicyHandle::new(Arc::new(Snapshot::empty()))),
            enforcer: Arc::new(crate::enforce::Enforcer::userspace(
                dnsfence_engine::allow::LedgerConfig::default(),
            )),
            allow_capacity: 100,
            reject_rcode: "REFUSED",
            reload: Arc::default(),
            records_queued: Arc::new(RecordQueue::new(1)),
            sync: Arc::default(),
            pending: None,
            health: Arc::new(Health::new(Role::Agent, Arc::default())),
        }
    }

    /// A port free now (the endpoints bind it themselves).
    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    }

    fn status_line(text: &str) -> &str {
        text.lines().next().unwrap_or_default()
    }

    /// The exposition is OpenMetrics: typed families, `_total` on every counter sample, one
    /// `# EOF` at the end, and the per-shard values as the shards published them.
    #[test]
    fn exposition_is_openmetrics_with_the_shards_values() {
        let state = state(2);
        state.shards[1].stats.lock().unwrap().queries = 7;
        state.shards[1].stats.lock().unwrap().refused = 3;
        state.shards[0].stats.lock().unwrap().forwarded = 4;
        state.shards[0].stats.lock().unwrap().queries = 4;
        for (shard, us) in [(0, 80), (1, 80), (1, 3_000_000)] {
            let mut s = state.shards[shard].stats.lock().unwrap();
            s.upstream_latency.observe(Duration::from_micros(us));
            s.upstream_rcodes[3] += 1;
            s.upstream_rcodes[13 + shard] += 1;
        }
        let endpoints = Endpoints {
            installed: Arc::default(),
        };
        endpoints.install(state);
        let installed = endpoints.installed.get().unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &installed.registry).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE dnsfence_queries counter\n"), "{text}");
        assert!(
            text.contains("dnsfence_queries_total{shard=\"0\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("dnsfence_queries_total{shard=\"1\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("dnsfence_query_verdicts_total{verdict=\"denied\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("dnsfence_query_verdicts_total{verdict=\"forwarded\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("dnsfence_policy_generation 0\n"), "{text}");
        // Latency histograms: summed over the shards, cumulative buckets in seconds.
        for line in [
            "# TYPE dnsfence_upstream_latency_seconds histogram\n",
            "dnsfence_upstream_latency_seconds_count 3\n",
            "dnsfence_upstream_latency_seconds_sum 3.00016\n",
            "dnsfence_upstream_latency_seconds_bucket{le=\"0.00005\"} 0\n",
            "dnsfence_upstream_latency_seconds_bucket{le=\"0.0001\"} 2\n",
            "dnsfence_upstream_latency_seconds_bucket{le=\"2.5\"} 2\n",
            "dnsfence_upstream_latency_seconds_bucket{le=\"+Inf\"} 3\n",
            "dnsfence_datapath_write_seconds_count 0\n",
            "# TYPE dnsfence_query_processing_seconds histogram\n",
            "dnsfence_query_processing_seconds_bucket{le=\"0.000001\"} 0\n",
            "dnsfence_upstream_answers_total{rcode=\"NXDOMAIN\"} 3\n",
            "dnsfence_upstream_answers_total{rcode=\"NOERROR\"} 0\n",
            "dnsfence_upstream_answers_total{rcode=\"OTHER\"} 3\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
        assert!(!text.contains("rcode=\"NOTAUTH\""), "{text}");
        assert!(
            text.contains("dnsfence_process_info{role=\"agent\"} 1\n"),
            "{text}"
        );
        // Every counter sample ends in _total.
        let mut types = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_owned(), kind.to_owned());
            }
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.strip_suffix("_total").unwrap_or(name);
            if types.get(family).map(String::as_str) == Some("counter") {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
    }

    /// Before the process serves every endpoint answers 503; then 200; anything else 404.
    #[test]
    fn endpoints_answer_503_until_installed_then_200_and_404_elsewhere() {
        let addr = free_addr();
        let endpoints = bind(addr).unwrap();
        for path in ["/metrics", "/healthz", "/readyz"] {
            let text = get(addr, path).unwrap();
            assert!(status_line(&text).contains(" 503 "), "{path}: {text}");
        }
        let state = state(1);
        state.shards[0].batches.store(1, Ordering::Relaxed);
        state.health.policy_loaded(1);
        state.health.beat();
        endpoints.install(state);
        for path in ["/metrics", "/healthz", "/readyz"] {
            let text = get(addr, path).unwrap();
            assert!(status_line(&text).contains(" 200 "), "{path}: {text}");
        }
        let metrics = get(addr, "/metrics").unwrap();
        assert!(metrics.contains(OPENMETRICS), "{metrics}");
        for path in ["/", "/metricsx", "/metrics/../x"] {
            let text = get(addr, path).unwrap();
            assert!(status_line(&text).contains(" 404 "), "{path}: {text}");
        }
        // A request head beyond 8 KiB is refused, not buffered.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let long = "x".repeat(64 * 1024);
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: {long}\r\n\r\n"
        );
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(
            status_line(&text).contains(" 400 "),
            "{}",
            status_line(&text)
        );
    }

    /// Endpoints that answer 200 to the probes (one shard that has turned, a policy, a beat).
    fn healthy() -> SocketAddr {
        let addr = free_addr();
        let endpoints = bind(addr).unwrap();
        let state = state(1);
        state.shards[0].batches.store(1, Ordering::Relaxed);
        state.health.policy_loaded(1);
        state.health.beat();
        endpoints.install(state);
        addr
    }

    /// Sends `request` on a fresh connection and reads the answer until the server closes:
    /// the answer and how long the close took (an error: the connection was reset).
    fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(3 * REQUEST_TIMEOUT)).unwrap();
        let started = Instant::now();
        s.write_all(request).unwrap();
        let mut answer = Vec::new();
        let read = s.read_to_end(&mut answer);
        let mut text = String::from_utf8_lossy(&answer).into_owned();
        if let Err(e) = read {
            text = format!("error after {text:?}: {e}");
        }
        (text, started.elapsed())
    }

    /// At most MAX_SCRAPES pages are made at once; the next is turned away until one ends.
    #[test]
    fn scrapes_are_bounded() {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let held: Vec<Scrape> = (0..MAX_SCRAPES)
            .map(|_| Scrape::begin_on(&COUNT).expect("room"))
            .collect();
        assert!(Scrape::begin_on(&COUNT).is_none());
        drop(held);
        assert!(Scrape::begin_on(&COUNT).is_some());
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
    }

    /// Clients that send nothing, trickle a header a byte at a time, or trickle a request
    /// body, as many as the connection bound and twice as many: a probe after them is
    /// answered at once (the oldest connection is evicted; the acceptor never waits).
    #[test]
    fn slow_clients_at_and_above_the_bound_do_not_delay_a_probe() {
        let addr = healthy();
        for clients in [MAX_CONNECTIONS, 2 * MAX_CONNECTIONS] {
            let mut conns = Vec::new();
            for i in 0..clients {
                let mut s = TcpStream::connect(addr).unwrap();
                let start: &[u8] = match i % 3 {
                    0 => b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                    1 => b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
                    _ => b"",
                };
                s.write_all(start).unwrap();
                conns.push(s);
            }
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let trickle = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for (i, s) in conns.iter_mut().enumerate() {
                            if i % 3 != 2 {
                                let _ = s.write_all(b"a");
                            }
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                })
            };
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            let text = get(addr, "/healthz");
            let took = started.elapsed();
            stop.store(true, Ordering::Relaxed);
            trickle.join().unwrap();
            let text = text.unwrap();
            assert!(status_line(&text).contains(" 200 "), "{text}");
            assert!(
                took < REQUEST_TIMEOUT / 2,
                "{clients} slow clients: probe took {took:?}"
            );
        }
    }

    /// A client trickling its request head a byte at a time is answered 408 and closed at
    /// the deadline; one trickling a body is refused at once and closed by the deadline.
    #[test]
    fn trickling_clients_are_closed_at_the_deadline() {
        let addr = healthy();
        let slow = |start: &'static [u8]| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(3 * REQUEST_TIMEOUT)).unwrap();
                let started = Instant::now();
                s.write_all(start).unwrap();
                let mut writer = s.try_clone().unwrap();
                let trickle = std::thread::spawn(move || {
                    let begun = Instant::now();
                    while begun.elapsed() < 3 * REQUEST_TIMEOUT && writer.write_all(b"a").is_ok() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                let took = started.elapsed();
                let _ = s.shutdown(std::net::Shutdown::Both);
                trickle.join().unwrap();
                (String::from_utf8_lossy(&answer).into_owned(), took)
            })
        };
        let header = slow(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        let body = slow(b"GET /metrics HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n");
        for (what, client, status) in [("header", header, " 408 "), ("body", body, " 400 ")] {
            let (text, took) = client.join().unwrap();
            assert!(status_line(&text).contains(status), "{what}: {text}");
            assert!(
                took < REQUEST_TIMEOUT + Duration::from_millis(500),
                "{what}: closed after {took:?}"
            );
        }
    }

    /// A request with a body is refused; a method other than GET and HEAD is answered 405
    /// with `Allow`.
    #[test]
    fn bodies_and_other_methods_are_refused() {
        let addr = healthy();
        for request in [
            "GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ] {
            let (text, _) = exchange(addr, request.as_bytes());
            assert!(status_line(&text).contains(" 400 "), "{request:?}: {text}");
        }
        let (text, _) = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n");
        assert!(status_line(&text).contains(" 405 "), "{text}");
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
    }

    /// One request per connection: a keep-alive client gets one answer and the close right
    /// after it (nothing unsolicited later), and pipelined requests after the first are
    /// ignored (read, so that the close does not reset the connection under the answer).
    #[test]
    fn one_answer_per_connection_then_the_close() {
        let addr = healthy();
        let first = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let next = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
        // More pipelined than the server reads with the first request: it must read them
        // before it closes, else the kernel resets the connection and the answer is lost.
        let many = format!("{first}{}", next.repeat(1000));
        for request in [first.to_owned(), format!("{first}{next}"), many] {
            let (text, took) = exchange(addr, request.as_bytes());
            let request = &request[..request.len().min(80)];
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{request:?}: {text}");
            assert!(status_line(&text).contains(" 200 "), "{text}");
            assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
            assert!(text.ends_with("shards alive\n"), "{text}");
            assert!(
                took < REQUEST_TIMEOUT / 2,
                "{request:?}: closed after {took:?}"
            );
        }
    }

    /// `HEAD` gets the headers of `GET` (its `Content-Length` too) and no body.
    #[test]
    fn head_has_no_body() {
        let addr = healthy();
        let (text, _) = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(status_line(head).contains(" 200 "), "{text}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(length > 1000, "{head}");
        assert!(
            body.is_empty(),
            "HEAD answered with {} bytes of body",
            body.len()
        );
    }
}
