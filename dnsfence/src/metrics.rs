//! Prometheus metrics over plain HTTP (`GET /metrics`): an acceptor thread and one short-lived
//! thread per connection, bounded in number and time, so idle clients cannot stall a scrape.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use dnsfence_engine::consumer::Observations;
use dnsfence_engine::core::{Record, Stats};
use dnsfence_engine::io::IoStats;
use dnsfence_engine::shard::{PolicyHandle, ShardStatus};

/// What the metrics page reads.
pub struct State {
    /// Per-shard published status.
    pub shards: Vec<Arc<ShardStatus>>,
    /// Consumer aggregates.
    pub observations: Arc<Mutex<Observations>>,
    /// Current policy.
    pub policy: Arc<PolicyHandle>,
    /// Where allow entries go (userspace table or eBPF maps).
    pub enforcer: Arc<crate::enforce::Enforcer>,
    /// Policy and endpoint reloads.
    pub reload: Arc<ReloadStatus>,
    /// The record queue (its length is a gauge).
    pub records_queued: Arc<ArrayQueue<Record>>,
    /// The agent ↔ proxy sync's counters.
    pub sync: Arc<crate::ha::SyncStats>,
    /// The standalone proxy's records kept for the agent.
    pub pending: Option<Arc<crate::ha::Pending>>,
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
}

/// Binds the metrics listener (before anything else starts, so a taken port fails early).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Most connections served at once. One more evicts the oldest (its reader is shut down), so
/// idle or trickling clients can delay a scrape by one accept at most, never stall it.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may take to send its request line and to take the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections being served: an id and a handle to shut each down.
type Active = Arc<Mutex<std::collections::VecDeque<(u64, TcpStream)>>>;

/// Serves `listener` until `stop` is set: one acceptor thread, and one short-lived thread per
/// connection (at most [`MAX_CONNECTIONS`]; each gets [`REQUEST_TIMEOUT`] to send its request).
pub fn serve(listener: TcpListener, state: State, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let state = Arc::new(state);
    let active: Active = Arc::default();
    std::thread::Builder::new()
        .name("dnsf-metrics".into())
        .spawn(move || {
            let mut next_id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let id = next_id;
                next_id += 1;
                {
                    let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                    while active.len() >= MAX_CONNECTIONS {
                        if let Some((_, oldest)) = active.pop_front() {
                            let _ = oldest.shutdown(Shutdown::Both);
                        }
                    }
                    match stream.try_clone() {
                        Ok(handle) => active.push_back((id, handle)),
                        Err(_) => continue,
                    }
                }
                let (state, mine) = (Arc::clone(&state), Arc::clone(&active));
                let spawned = std::thread::Builder::new()
                    .name("dnsf-metrics-conn".into())
                    .spawn(move || {
                        answer(stream, &state);
                        let mut mine = mine.lock().unwrap_or_else(|e| e.into_inner());
                        mine.retain(|(i, _)| *i != id);
                    });
                if spawned.is_err() {
                    let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
                    active.retain(|(i, _)| *i != id);
                }
            }
        })?;
    Ok(())
}

/// Reads one request (within [`REQUEST_TIMEOUT`]) and answers it.
fn answer(mut stream: TcpStream, state: &State) {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut request = [0u8; 1024];
    let mut n = 0;
    // Until the end of the headers, a full buffer, the peer's end, or the deadline.
    while n < request.len() && !request[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut request[n..]) {
            Ok(0) => break,
            Ok(read) => n += read,
            Err(_) => return,
        }
    }
    let ok = request[..n].starts_with(b"GET /metrics");
    let (status, body) = if ok {
        ("200 OK", render(state))
    } else {
        ("404 Not Found", "try GET /metrics\n".to_owned())
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A per-shard counter of `T`: metric name, help text, accessor.
type Counter<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Writes each counter as `{prefix}{name}_total{shard="i"}` over the shards' values.
fn per_shard<T>(out: &mut String, prefix: &str, counters: &[Counter<T>], shards: &[T]) {
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {prefix}{name}_total {help}.");
        let _ = writeln!(out, "# TYPE {prefix}{name}_total counter");
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{prefix}{name}_total{{shard=\"{i}\"}} {}", get(s));
        }
    }
}

/// The Prometheus text exposition of every counter.
pub fn render(state: &State) -> String {
    let mut out = String::new();
    let stats: Vec<Stats> = state
        .shards
        .iter()
        .map(|s| *s.stats.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let counters: &[Counter<Stats>] = &[
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
            "Queries answered SERVFAIL: pending table full",
            |s| s.pending_full,
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
            "ttl_clamped",
            "Enforced answers whose TTLs were lowered to --max-ttl",
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
    per_shard(&mut out, "dnsfence_", counters, &stats);
    let io: Vec<IoStats> = state
        .shards
        .iter()
        .map(|s| s.io.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    let io_counters: &[Counter<IoStats>] = &[
        ("udp_rx", "Datagrams received (clients and upstream)", |s| {
            s.udp_rx
        }),
        ("udp_tx", "Datagrams sent", |s| s.udp_tx),
        (
            "udp_rx_truncated",
            "Datagrams dropped: larger than the receive buffer",
            |s| s.udp_rx_truncated,
        ),
        ("udp_rx_errors", "Receive errors", |s| s.udp_rx_errors),
        ("send_errors", "Sends the kernel rejected", |s| {
            s.send_errors
        }),
        (
            "send_dropped",
            "Sends dropped before the kernel (queue or buffer full)",
            |s| s.send_dropped,
        ),
        ("tcp_accepted", "TCP client connections accepted", |s| {
            s.tcp_accepted
        }),
        (
            "tcp_limit_rejected",
            "TCP connections closed at once: connection limit",
            |s| s.tcp_limit_rejected,
        ),
        (
            "tcp_source_limit_rejected",
            "TCP connections closed at once: per-source connection limit",
            |s| s.tcp_source_limit_rejected,
        ),
        (
            "tcp_evicted",
            "TCP connections closed to make room at the connection limit (longest idle)",
            |s| s.tcp_evicted,
        ),
        (
            "tcp_framing_errors",
            "TCP connections ended by a frame that is not a query (bad length, QR set)",
            |s| s.tcp_framing_errors,
        ),
        (
            "tcp_idle_closed",
            "TCP connections closed: idle timeout",
            |s| s.tcp_idle_closed,
        ),
        (
            "upstream_tcp_errors",
            "Upstream TCP connection errors",
            |s| s.upstream_tcp_errors,
        ),
    ];
    per_shard(&mut out, "dnsfence_io_", io_counters, &io);
    let obs = state.observations.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(out, "# TYPE dnsfence_fqdn_cache_entries gauge");
    let _ = writeln!(out, "dnsfence_fqdn_cache_entries {}", obs.cache.len());
    let _ = writeln!(out, "# TYPE dnsfence_fqdn_cache_evictions_total counter");
    let _ = writeln!(
        out,
        "dnsfence_fqdn_cache_evictions_total {}",
        obs.cache_evictions
    );
    let _ = writeln!(out, "# TYPE dnsfence_ip_updates_total counter");
    let _ = writeln!(out, "dnsfence_ip_updates_total {}", obs.ip_updates);
    drop(obs);
    let sync = &state.sync;
    for (name, kind, value) in [
        ("sync_connected", "gauge", &sync.connected),
        ("sync_connections_total", "counter", &sync.connections),
        ("sync_observations_total", "counter", &sync.observations),
        ("sync_flows_total", "counter", &sync.flows),
        ("sync_snapshots_total", "counter", &sync.snapshots),
    ] {
        let _ = writeln!(out, "# TYPE dnsfence_{name} {kind}");
        let _ = writeln!(
            out,
            "dnsfence_{name} {}",
            value.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if let Some(pending) = &state.pending {
        let (held, overflowed) = pending.counts();
        let _ = writeln!(out, "# TYPE dnsfence_sync_pending_records gauge");
        let _ = writeln!(out, "dnsfence_sync_pending_records {held}");
        let _ = writeln!(out, "# TYPE dnsfence_sync_overflow_total counter");
        let _ = writeln!(out, "dnsfence_sync_overflow_total {overflowed}");
    }
    let _ = writeln!(out, "# TYPE dnsfence_allow_entries gauge");
    let allow = state.enforcer.allow_stats();
    let _ = writeln!(out, "dnsfence_allow_entries {}", allow.entries);
    let _ = writeln!(out, "# TYPE dnsfence_allow_refused_total counter");
    for (reason, n) in [
        ("full", allow.full),
        ("endpoint_quota", allow.endpoint_quota),
        ("name_quota", allow.name_quota),
        ("map_error", allow.map_errors),
    ] {
        let _ = writeln!(
            out,
            "dnsfence_allow_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# TYPE dnsfence_allow_removed_total counter");
    for (reason, n) in [
        ("expired", allow.expired),
        ("revoked", allow.revoked),
        ("unjustified", allow.unjustified),
    ] {
        let _ = writeln!(
            out,
            "dnsfence_allow_removed_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let datapath = state.enforcer.datapath_stats();
    if !datapath.is_empty() {
        let _ = writeln!(out, "# TYPE dnsfence_datapath_events_total counter");
        for (event, n) in datapath {
            let _ = writeln!(
                out,
                "dnsfence_datapath_events_total{{event=\"{event}\"}} {n}"
            );
        }
    }
    let _ = writeln!(out, "# TYPE dnsfence_policy_generation gauge");
    let _ = writeln!(
        out,
        "dnsfence_policy_generation {}",
        state.policy.load().generation()
    );
    let reload = &state.reload;
    let (rejected, pending) = (
        reload.rejected.load(Ordering::Relaxed),
        reload.pending.load(Ordering::Relaxed),
    );
    let policy_gauges: [(&str, &str, u64); 5] = [
        (
            "dnsfence_policy_reload_errors_total",
            "counter",
            reload.errors.load(Ordering::Relaxed),
        ),
        (
            "dnsfence_policy_stale",
            "gauge",
            u64::from(rejected + pending > 0),
        ),
        ("dnsfence_policy_files_rejected", "gauge", rejected),
        ("dnsfence_policy_files_pending", "gauge", pending),
        (
            "dnsfence_policy_fail_closed_endpoints",
            "gauge",
            state.policy.load().stats().fail_closed as u64,
        ),
    ];
    for (name, kind, value) in policy_gauges {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(out, "# TYPE dnsfence_record_queue_length gauge");
    let _ = writeln!(
        out,
        "dnsfence_record_queue_length {}",
        state.records_queued.len()
    );
    for (i, s) in state.shards.iter().enumerate() {
        let backend = *s.backend.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = *s.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "dnsfence_shard_info{{shard=\"{i}\",backend=\"{}\",cpu=\"{}\"}} 1",
            backend.map_or("none".to_owned(), |b| format!("{b:?}").to_lowercase()),
            cpu.map_or("none".to_owned(), |c| c.to_string())
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnsfence_policy::Snapshot;

    fn state() -> State {
        State {
            shards: Vec::new(),
            observations: Arc::default(),
            policy: Arc::new(PolicyHandle::new(Arc::new(Snapshot::empty()))),
            enforcer: Arc::new(crate::enforce::Enforcer::userspace(
                dnsfence_engine::allow::LedgerConfig::default(),
            )),
            reload: Arc::default(),
            records_queued: Arc::new(ArrayQueue::new(1)),
            sync: Arc::default(),
            pending: None,
        }
    }

    fn scrape(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    }

    /// Idle connections (open, nothing sent) neither stall a scrape nor pile up: up to the cap
    /// they are served side by side, beyond it the oldest is shut down.
    #[test]
    fn idle_connections_do_not_stall_a_scrape() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        serve(listener, state(), Arc::clone(&stop)).unwrap();
        for idle in [50, 4 * MAX_CONNECTIONS] {
            let conns: Vec<TcpStream> = (0..idle)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            // Let the acceptor take them all before the scrape.
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            let text = scrape(addr).unwrap();
            let took = started.elapsed();
            assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
            assert!(text.contains("dnsfence_policy_generation 0"), "{text}");
            assert!(
                took < Duration::from_secs(1),
                "{idle} idle: scrape took {took:?}"
            );
            drop(conns);
        }
        stop.store(true, Ordering::Relaxed);
    }
}
