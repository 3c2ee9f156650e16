//! The agent's flow history and the observe socket behind `dnsfence observe`.
//!
//! - [`FlowHistory`]: a bounded ring of the DNS flows the agent knows, its own (fed by the
//!   consumer thread's hook) and the standalone proxy's (fed by the sync thread as the proxy
//!   replays them, also after the agent was down), each tagged with the process that served
//!   it. The oldest flow goes when the ring is full (counted). Followers get each new flow
//!   through a bounded queue of their own: a follower whose queue is full is dropped
//!   (counted), so the consumer and the sync never wait on a client. Shards never take its
//!   lock: they only push records into their queue, as before.
//! - [`ObserveServer`]: the observe socket (`--observe-socket`, mode 0600, peers admitted as
//!   the agent's user or root, like the agent socket). A client sends one JSON line (a
//!   [`Request`]: filters, `last`, `follow`); the agent answers one JSON line per flow (a
//!   [`FlowView`]), history first, then live flows while `follow`; an `{"error": ...}` line
//!   for a request it cannot take.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dnsfence_engine::consumer::{self, Observations};
use dnsfence_engine::core::{Flow, Record, Verdict};
use dnsfence_engine::shard::PolicyHandle;
use dnsfence_policy::{EndpointKey, Snapshot};
use dnsfence_sync::conn::AgentListener;
use dnsfence_sync::proto::FlowRecord;
use serde::{Deserialize, Serialize};

use crate::ha::SyncStats;

/// Flows a follower may have waiting; a follower that falls this far behind is dropped.
pub const CLIENT_QUEUE: usize = 4096;
/// Observe clients served at once; more get an error line.
pub const MAX_CLIENTS: usize = 16;
/// The longest request line.
const MAX_REQUEST: u64 = 64 * 1024;
/// Most filters of each kind (verdicts, endpoints, names) in one request.
pub const MAX_FILTERS: usize = 32;
/// How long a client has to send its request, and a write to it may take.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a follower with nothing to send checks that its client is still there.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// Help text of `dnsfence_flow_history_drops_total` (metrics.rs).
pub const DROPS_HELP: &str = "Flows the observe history lost: overwritten (the ring was full, \
     --flow-history) or slow_client (a follower too slow to read was dropped, once each)";

/// `dnsfence observe` as Cilium's DNS proxy flows have it: FORWARDED (forwarded and
/// answered), DROPPED (refused by policy, or an unknown source), ERROR (the proxy answered
/// SERVFAIL or FORMERR/NOTIMP, or nothing: timeout, unreachable or unusable upstream, no room,
/// a failed allow write, malformed input).
pub fn cilium_verdict(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Forward => "FORWARDED",
        Verdict::Refuse | Verdict::RefuseUnknownSource => "DROPPED",
        Verdict::Timeout
        | Verdict::Malformed
        | Verdict::Overload
        | Verdict::BadAnswer
        | Verdict::Unreachable => "ERROR",
    }
}

/// [`cilium_verdict`] of a verdict as the proxy spells it in a [`FlowRecord`] (the engine's
/// name, `Forward`, `Refuse`, ...; an unknown one is an ERROR).
fn cilium_verdict_of(name: &str) -> &'static str {
    match name {
        "Forward" | "FORWARDED" => "FORWARDED",
        "Refuse" | "RefuseUnknownSource" | "DROPPED" => "DROPPED",
        _ => "ERROR",
    }
}

/// The verdicts a filter may name.
pub const VERDICTS: [&str; 3] = ["FORWARDED", "DROPPED", "ERROR"];

/// One flow as `dnsfence observe` shows it (a line of `-o json`, and of the observe socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// When the verdict was given (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The same, in ms since the Unix epoch.
    pub unix_ms: u64,
    /// `namespace/name` of the endpoint in the agent's policy when it saw the flow, else
    /// `unknown`.
    pub endpoint: String,
    /// The endpoint's namespace (None when unknown).
    pub namespace: Option<String>,
    /// The endpoint's stable key (hex), when the proxy knew the source.
    pub endpoint_key: Option<String>,
    /// The client's address.
    pub client: SocketAddr,
    /// The question name, with its trailing dot.
    pub query: String,
    /// The question type (`A`, `AAAA`, ... or `TYPE123`).
    #[serde(rename = "type")]
    pub qtype: String,
    /// `FORWARDED`, `DROPPED` or `ERROR` (see [`cilium_verdict`]).
    pub verdict: String,
    /// dnsfence's own verdict (`Forward`, `Refuse`, `Timeout`, ...).
    pub reason: String,
    /// The rcode the client got (`NOERROR`, `REFUSED`, ...); None when it got no answer.
    pub rcode: Option<String>,
    /// The answer's addresses, as the FQDN cache holds them (toFQDNs names only).
    pub ips: Vec<IpAddr>,
    /// Their remaining lifetime in seconds (the answer's TTL raised to `--min-ttl`).
    pub ttl: Option<u32>,
    /// Query sent upstream to answer, in µs (forwarded queries only).
    pub latency_us: Option<u64>,
    /// The process that served it: `agent` or `proxy`.
    pub served_by: String,
}

/// What an observe client asks for (one JSON line). Filters of one kind are alternatives,
/// filters of different kinds must all match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    /// After the history, stream new flows until the client goes.
    pub follow: bool,
    /// The last N matching flows of the history (None: all it holds).
    pub last: Option<usize>,
    /// `FORWARDED`, `DROPPED`, `ERROR` (any case).
    pub verdict: Vec<String>,
    /// `namespace/name`, `name` (any namespace) or `namespace/` (all of it).
    pub endpoint: Vec<String>,
    /// A name (trailing dot optional, any case): that name and the names under it.
    pub name: Vec<String>,
}

/// A [`Request`]'s filters, checked and normalised.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    verdicts: Vec<&'static str>,
    endpoints: Vec<String>,
    names: Vec<String>,
}

impl Filter {
    /// The filters of `request`; an unknown verdict, or more than [`MAX_FILTERS`] of a kind,
    /// is an error (one line).
    pub fn of(request: &Request) -> Result<Filter, String> {
        // Every flow is matched against them on the consumer's thread, under its locks
        // (review finding: thousands of names in a 64 KiB request slowed it for everyone).
        for (what, n) in [
            ("verdict", request.verdict.len()),
            ("endpoint", request.endpoint.len()),
            ("name", request.name.len()),
        ] {
            if n > MAX_FILTERS {
                return Err(format!("{n} {what} filters: at most {MAX_FILTERS}"));
            }
        }
        let verdicts = request
            .verdict
            .iter()
            .map(|v| {
                VERDICTS
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(v))
                    .copied()
                    .ok_or_else(|| format!("unknown verdict {v:?} (FORWARDED, DROPPED, ERROR)"))
            })
            .collect::<Result<_, _>>()?;
        let names = request.name.iter().map(|n| normal_name(n)).collect();
        Ok(Filter {
            verdicts,
            endpoints: request.endpoint.clone(),
            names,
        })
    }

    /// Whether `flow` passes.
    pub fn matches(&self, flow: &FlowView) -> bool {
        let verdict = self.verdicts.is_empty() || self.verdicts.contains(&flow.verdict.as_str());
        let endpoint = self.endpoints.is_empty()
            || self.endpoints.iter().any(|want| {
                if flow.endpoint == *want {
                    return true;
                }
                match (want.strip_suffix('/'), flow.endpoint.split_once('/')) {
                    (Some(ns), Some((flow_ns, _))) => ns == flow_ns,
                    (None, Some((_, flow_name))) => !want.contains('/') && want == flow_name,
                    _ => false,
                }
            });
        let name = self.names.is_empty() || {
            let query = normal_name(&flow.query);
            self.names.iter().any(|want| {
                query == *want
                    || want.is_empty()
                    || query
                        .strip_suffix(want.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
        };
        verdict && endpoint && name
    }
}

/// Lower case, no trailing dot (the root is empty).
fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A follower: its filter and its bounded queue.
struct Follower {
    filter: Filter,
    queue: SyncSender<Arc<FlowView>>,
}

/// A flow in the ring: the agent's own flows are kept as the engine recorded them and made
/// into a [`FlowView`] only when a client reads them (names, addresses and text cost a few
/// allocations a flow, measured at 12-16 % of a query's CPU at 20k qps when paid for every
/// query), unless a follower wants them at once.
// Inline, not boxed: no allocation per flow; the ring is bounded (--flow-history × ~480 B).
#[allow(clippy::large_enum_variant)]
enum Held {
    Agent { flow: Flow, unix_ms: u64 },
    View(Arc<FlowView>),
}

struct Inner {
    ring: VecDeque<Held>,
    capacity: usize,
    followers: Vec<Follower>,
}

impl Inner {
    /// Appends `held`, dropping the oldest when full (counted).
    fn keep(&mut self, held: Held, stats: &SyncStats) {
        if self.ring.len() >= self.capacity {
            self.ring.pop_front();
            stats
                .flow_history_overwritten
                .fetch_add(1, Ordering::Relaxed);
        }
        self.ring.push_back(held);
    }
}

/// The flows the agent keeps for `dnsfence observe` (see the module documentation).
pub struct FlowHistory {
    inner: Mutex<Inner>,
    policy: Arc<PolicyHandle>,
    stats: Arc<SyncStats>,
    /// The FQDN cache, for the addresses of flows made into views when read (set once the
    /// server runs: [`FlowHistory::attach`]).
    observations: OnceLock<Arc<Mutex<Observations>>>,
}

impl FlowHistory {
    /// A history of at most `capacity` flows (at least one), naming endpoints by `policy`,
    /// counting what it drops in `stats`.
    pub fn new(capacity: usize, policy: Arc<PolicyHandle>, stats: Arc<SyncStats>) -> Self {
        let capacity = capacity.max(1);
        FlowHistory {
            inner: Mutex::new(Inner {
                // Grown as flows come (a large --flow-history costs memory only when used).
                ring: VecDeque::with_capacity(capacity.min(1024)),
                capacity,
                followers: Vec::new(),
            }),
            policy,
            stats,
            observations: OnceLock::new(),
        }
    }

    /// The FQDN cache the server keeps: where flows read later find their addresses.
    pub fn attach(&self, observations: Arc<Mutex<Observations>>) {
        let _ = self.observations.set(observations);
    }

    /// The consumer's hook: each of the agent's own flow records, tagged `agent`. Kept as
    /// recorded (a copy into the ring) while no follower waits; made into a view with the
    /// answer's addresses from the FQDN cache (`obs`, which the consumer holds) when one does.
    pub fn forward(self: &Arc<Self>) -> consumer::Forward {
        let me = Arc::clone(self);
        let mut names = Names::new(Arc::clone(&self.policy));
        Box::new(move |record, obs| {
            if let Record::Flow(flow) = record {
                let unix_ms = unix_ms().saturating_sub(flow.at.elapsed().as_millis() as u64);
                {
                    let mut inner = me.inner.lock().unwrap_or_else(|e| e.into_inner());
                    if inner.followers.is_empty() {
                        let held = Held::Agent {
                            flow: flow.clone(),
                            unix_ms,
                        };
                        inner.keep(held, &me.stats);
                        return;
                    }
                }
                me.push(view_of_flow(flow, unix_ms, obs, &mut names));
            }
        })
    }

    /// The sync's hook: a batch of the proxy's flow records (their addresses are the ones
    /// the proxy's FQDN cache held; when the proxy sent none, the agent's `obs` is asked).
    pub fn merge_proxy(&self, items: &[FlowRecord], obs: &Observations) {
        let mut names = Names::new(Arc::clone(&self.policy));
        for record in items {
            self.push(view_of_record(record, obs, &mut names));
        }
    }

    /// Adds one flow: into the ring (the oldest goes when it is full), and to each follower
    /// it matches (a follower whose queue is full is dropped).
    fn push(&self, flow: FlowView) {
        let flow = Arc::new(flow);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.keep(Held::View(Arc::clone(&flow)), &self.stats);
        let stats = &self.stats;
        inner.followers.retain(|f| {
            if !f.filter.matches(&flow) {
                return true;
            }
            match f.queue.try_send(Arc::clone(&flow)) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    stats
                        .observe_clients_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// The last `last` flows matching `filter` (all held when None), oldest first, and with
    /// `follow` a queue of the flows that come after them: taken under one lock, so a
    /// follower misses none and sees none twice.
    pub fn subscribe(
        &self,
        filter: &Filter,
        last: Option<usize>,
        follow: bool,
    ) -> (Vec<Arc<FlowView>>, Option<Receiver<Arc<FlowView>>>) {
        // The FQDN cache before the ring: the consumer holds the cache when it calls the
        // hook, which takes the ring (one lock order).
        let cache = self.observations.get().cloned();
        let guard = cache
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()));
        let empty = Observations::default();
        let obs: &Observations = guard.as_deref().unwrap_or(&empty);
        let mut names = Names::new(Arc::clone(&self.policy));
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let want = last.unwrap_or(usize::MAX);
        let mut history = Vec::new();
        for held in inner.ring.iter_mut().rev() {
            if history.len() >= want {
                break;
            }
            // Made into a view once; the view stays in the ring for later readers.
            if let Held::Agent { flow, unix_ms } = held {
                let view = Arc::new(view_of_flow(flow, *unix_ms, obs, &mut names));
                *held = Held::View(view);
            }
            if let Held::View(view) = held
                && filter.matches(view)
            {
                history.push(Arc::clone(view));
            }
        }
        history.reverse();
        let queue = follow.then(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(CLIENT_QUEUE);
            inner.followers.push(Follower {
                filter: filter.clone(),
                queue: tx,
            });
            rx
        });
        (history, queue)
    }

    /// Flows held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ring
            .len()
    }
}

/// Endpoint names by key, from the policy snapshot in force (reloaded when it changes; the
/// policy handle's lock is taken only then).
struct Names {
    policy: Arc<PolicyHandle>,
    generation: u64,
    snapshot: Arc<Snapshot>,
}

impl Names {
    fn new(policy: Arc<PolicyHandle>) -> Names {
        let generation = policy.generation();
        let snapshot = policy.load();
        Names {
            policy,
            generation,
            snapshot,
        }
    }

    /// `namespace/name` of `key`, when the policy in force registers it.
    fn of(&mut self, key: Option<EndpointKey>) -> Option<String> {
        let generation = self.policy.generation();
        if generation != self.generation {
            self.generation = generation;
            self.snapshot = self.policy.load();
        }
        let ep = self.snapshot.endpoint_by_key(key?)?;
        Some(self.snapshot.endpoint_name(ep).to_owned())
    }
}

/// Wall-clock milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn view_of_flow(flow: &Flow, at_ms: u64, obs: &Observations, names: &mut Names) -> FlowView {
    let query = flow.name.to_string();
    let (ips, ttl) = match (flow.verdict, flow.endpoint) {
        (Verdict::Forward, Some(key)) => consumer::answer_of(obs, key, &query, flow.at),
        _ => (Vec::new(), None),
    };
    let endpoint = names.of(flow.endpoint);
    FlowView {
        time: rfc3339_ms(at_ms),
        unix_ms: at_ms,
        namespace: namespace_of(endpoint.as_deref()),
        endpoint: endpoint.unwrap_or_else(|| "unknown".to_owned()),
        endpoint_key: flow.endpoint.map(|k| format!("{:016x}", k.0)),
        client: flow.client,
        query,
        qtype: qtype_name(flow.qtype),
        verdict: cilium_verdict(flow.verdict).to_owned(),
        reason: format!("{:?}", flow.verdict),
        rcode: flow.rcode.map(|r| rcode_name(u16::from(r))),
        ips,
        ttl,
        latency_us: flow.upstream_latency.map(|d| d.as_micros() as u64),
        served_by: "agent".to_owned(),
    }
}

fn view_of_record(record: &FlowRecord, obs: &Observations, names: &mut Names) -> FlowView {
    let key = record.endpoint_key.map(EndpointKey);
    let verdict = cilium_verdict_of(&record.verdict);
    let mut query = record.name.clone();
    if !query.ends_with('.') {
        query.push('.');
    }
    let (ips, ttl) = match (verdict, key) {
        _ if !record.addresses.is_empty() => (
            record.addresses.clone(),
            Some(record.ttl).filter(|t| *t > 0),
        ),
        ("FORWARDED", Some(key)) => {
            let age = Duration::from_millis(unix_ms().saturating_sub(record.unix_ms));
            let now = std::time::Instant::now();
            consumer::answer_of(obs, key, &query, now.checked_sub(age).unwrap_or(now))
        }
        _ => (Vec::new(), None),
    };
    let endpoint = names.of(key);
    FlowView {
        time: rfc3339_ms(record.unix_ms),
        unix_ms: record.unix_ms,
        namespace: namespace_of(endpoint.as_deref()),
        endpoint: endpoint.unwrap_or_else(|| "unknown".to_owned()),
        endpoint_key: key.map(|k| format!("{:016x}", k.0)),
        client: record.client,
        query,
        qtype: qtype_name(record.qtype),
        verdict: verdict.to_owned(),
        reason: record.verdict.clone(),
        rcode: (!record.dropped).then(|| rcode_name(record.rcode)),
        ips,
        ttl,
        latency_us: (verdict == "FORWARDED").then_some(record.latency_us),
        served_by: if record.served_by.is_empty() {
            "proxy".to_owned()
        } else {
            record.served_by.clone()
        },
    }
}

fn namespace_of(endpoint: Option<&str>) -> Option<String> {
    Some(endpoint?.split_once('/')?.0.to_owned())
}

/// The mnemonic of a question type (RFC 1035, 3596, 2782, 6891, 9460), else `TYPEn`.
pub fn qtype_name(qtype: u16) -> String {
    let name = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        252 => "AXFR",
        255 => "ANY",
        257 => "CAA",
        _ => return format!("TYPE{qtype}"),
    };
    name.to_owned()
}

/// The mnemonic of an rcode of RFC 1035 and 2136 (0-10).
pub fn rcode_mnemonic(rcode: u16) -> Option<&'static str> {
    Some(match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => return None,
    })
}

/// The mnemonic of an rcode (RFC 1035, 2136), else `RCODEn`.
pub fn rcode_name(rcode: u16) -> String {
    rcode_mnemonic(rcode).map_or_else(|| format!("RCODE{rcode}"), str::to_owned)
}

/// `unix_ms` as RFC 3339 UTC with milliseconds (`2026-01-31T12:34:56.789Z`).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The observe socket.
pub struct ObserveServer {
    listener: Arc<AgentListener>,
}

impl ObserveServer {
    /// Binds `path` (its directory is created), mode 0600.
    pub fn bind(path: &Path) -> Result<ObserveServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = AgentListener::bind(path).context("observe socket")?;
        listener
            .set_accept_timeout(Some(crate::ha::ACCEPT_WAKE))
            .context("observe socket")?;
        Ok(ObserveServer {
            listener: Arc::new(listener),
        })
    }

    /// Starts the accept thread: one thread per client (at most [`MAX_CLIENTS`]), until
    /// `stop`. The socket file goes when the thread ends.
    pub fn start(self, history: Arc<FlowHistory>, stop: Arc<AtomicBool>) -> Result<()> {
        let listener = self.listener;
        let clients = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("dnsf-observe".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (stream, _peer) = match listener.accept() {
                        Ok(accepted) => accepted,
                        // Nobody within ACCEPT_WAKE: look at the stop flag again.
                        Err(e) if e.is_timeout() => continue,
                        // Out of descriptors, say: not in a tight loop.
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                        clients.fetch_sub(1, Ordering::AcqRel);
                        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                        let _ = error_line(&stream, "too many observe clients; try again later");
                        continue;
                    }
                    let (history, stop, served) = (
                        Arc::clone(&history),
                        Arc::clone(&stop),
                        Arc::clone(&clients),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("dnsf-observe-client".into())
                        .spawn(move || {
                            let _ = serve_client(stream, &history, &stop);
                            served.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        // Never ran: the client sees its connection close.
                        clients.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })
            .context("observe socket thread")?;
        Ok(())
    }
}

/// Writes `{"error": message}` and a newline.
fn error_line(mut stream: &UnixStream, message: &str) -> std::io::Result<()> {
    let line = serde_json::json!({ "error": message }).to_string();
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")
}

/// One client: its request, its history, then (follow) its live flows until it goes, falls
/// behind, or the agent stops.
fn serve_client(stream: UnixStream, history: &FlowHistory, stop: &AtomicBool) -> Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            error_line(&stream, &format!("bad request: {e}"))?;
            return Ok(());
        }
    };
    let filter = match Filter::of(&request) {
        Ok(f) => f,
        Err(e) => {
            error_line(&stream, &e)?;
            return Ok(());
        }
    };
    let (past, queue) = history.subscribe(&filter, request.last, request.follow);
    let mut out = std::io::BufWriter::new(&stream);
    for flow in &past {
        write_flow(&mut out, flow)?;
    }
    out.flush()?;
    let Some(queue) = queue else { return Ok(()) };
    stream.set_read_timeout(Some(Duration::from_millis(1)))?;
    while !stop.load(Ordering::Relaxed) {
        match queue.recv_timeout(IDLE_CHECK) {
            Ok(flow) => {
                write_flow(&mut out, &flow)?;
                // What else is queued goes in the same write.
                while let Ok(flow) = queue.try_recv() {
                    write_flow(&mut out, &flow)?;
                }
                out.flush()?;
            }
            Err(RecvTimeoutError::Timeout) => {
                // Gone? (A client sends nothing after its request: EOF means it closed.)
                let mut byte = [0u8; 1];
                if let Ok(0) = (&stream).read(&mut byte) {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Dropped for falling behind.
                drop(out);
                error_line(
                    &stream,
                    "dropped: this client did not keep up with the flows",
                )?;
                return Ok(());
            }
        }
    }
    Ok(())
}

fn write_flow(out: &mut impl Write, flow: &FlowView) -> Result<()> {
    serde_json::to_writer(&mut *out, flow).context("encode")?;
    out.write_all(b"\n").context("write")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: &str, endpoint: &str, query: &str) -> FlowView {
        FlowView {
            time: String::new(),
            unix_ms: 0,
            endpoint: endpoint.to_owned(),
            namespace: namespace_of(Some(endpoint)),
            endpoint_key: None,
            client: "127.0.0.1:5353".parse().unwrap(),
            query: query.to_owned(),
            qtype: "A".to_owned(),
            verdict: verdict.to_owned(),
            reason: String::new(),
            rcode: None,
            ips: Vec::new(),
            ttl: None,
            latency_us: None,
            served_by: "agent".to_owned(),
        }
    }

    fn history(capacity: usize) -> FlowHistory {
        let policy = Arc::new(PolicyHandle::new(Arc::new(Snapshot::empty())));
        FlowHistory::new(capacity, policy, Arc::default())
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
    }

    #[test]
    fn filters() {
        let f = |r: Request| Filter::of(&r).unwrap();
        let a = flow("FORWARDED", "default/client", "www.Example.com.");
        let d = flow("DROPPED", "prod/api", "evil.test.");
        let by_verdict = f(Request {
            verdict: vec!["dropped".into()],
            ..Request::default()
        });
        assert!(!by_verdict.matches(&a) && by_verdict.matches(&d));
        for (want, a_passes, d_passes) in [
            ("default/client", true, false),
            ("client", true, false),
            ("prod/", false, true),
            ("api", false, true),
            ("prod/client", false, false),
        ] {
            let by_ep = f(Request {
                endpoint: vec![want.into()],
                ..Request::default()
            });
            assert_eq!(
                (by_ep.matches(&a), by_ep.matches(&d)),
                (a_passes, d_passes),
                "{want}"
            );
        }
        for (want, passes) in [
            ("example.com", true),
            ("EXAMPLE.com.", true),
            ("www.example.com", true),
            ("ample.com", false),
            ("other.com", false),
        ] {
            let by_name = f(Request {
                name: vec![want.into()],
                ..Request::default()
            });
            assert_eq!(by_name.matches(&a), passes, "{want}");
        }
        assert!(
            Filter::of(&Request {
                verdict: vec!["ALLOWED".into()],
                ..Request::default()
            })
            .is_err()
        );
        // At most MAX_FILTERS of a kind (review finding: thousands slowed the consumer).
        let names = |n: usize| Request {
            name: (0..n).map(|i| format!("n{i}.test")).collect(),
            ..Request::default()
        };
        assert!(Filter::of(&names(MAX_FILTERS)).is_ok());
        let Err(e) = Filter::of(&names(MAX_FILTERS + 1)) else {
            panic!("{} names accepted", MAX_FILTERS + 1);
        };
        assert!(e.contains("at most 32"), "{e}");
        let endpoints = Request {
            endpoint: vec!["default/x".into(); MAX_FILTERS + 1],
            ..Request::default()
        };
        assert!(Filter::of(&endpoints).is_err());
    }

    #[test]
    fn the_ring_is_bounded_and_counts_what_it_overwrites() {
        let h = history(3);
        for i in 0..5 {
            h.push(flow("FORWARDED", "default/client", &format!("n{i}.test.")));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.stats.flow_history_overwritten.load(Ordering::Relaxed), 2);
        let (past, _) = h.subscribe(&Filter::default(), Some(2), false);
        let names: Vec<_> = past.iter().map(|f| f.query.as_str()).collect();
        assert_eq!(names, ["n3.test.", "n4.test."]);
    }

    #[test]
    fn a_slow_follower_is_dropped_and_never_blocks_the_writer() {
        let h = history(8);
        let (_, queue) = h.subscribe(&Filter::default(), Some(0), true);
        let queue = queue.unwrap();
        // Nobody reads: the writer goes on, the follower is dropped once, counted.
        for i in 0..CLIENT_QUEUE + 10 {
            h.push(flow("FORWARDED", "default/client", &format!("n{i}.test.")));
        }
        assert_eq!(h.stats.observe_clients_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(queue.try_iter().count(), CLIENT_QUEUE);
        assert!(matches!(
            queue.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn history_then_follow_misses_nothing() {
        let h = history(8);
        h.push(flow("DROPPED", "default/client", "old.test."));
        let filter = Filter::of(&Request {
            verdict: vec!["DROPPED".into()],
            ..Request::default()
        })
        .unwrap();
        let (past, queue) = h.subscribe(&filter, None, true);
        assert_eq!(past.len(), 1);
        h.push(flow("FORWARDED", "default/client", "skip.test."));
        h.push(flow("DROPPED", "default/client", "new.test."));
        let got: Vec<_> = queue.unwrap().try_iter().map(|f| f.query.clone()).collect();
        assert_eq!(got, ["new.test."]);
    }
}
