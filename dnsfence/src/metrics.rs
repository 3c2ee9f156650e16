//! Prometheus metrics over plain HTTP (`GET /metrics`), served by one thread.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use dnsfence_engine::allow::UserspaceAllowTable;
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
    /// Userspace allow table.
    pub allow_entries: Arc<UserspaceAllowTable>,
    /// Rejected policy reloads.
    pub reload_errors: Arc<AtomicU64>,
    /// The record queue (its length is a gauge).
    pub records_queued: Arc<ArrayQueue<Record>>,
}

/// Binds the metrics listener (before anything else starts, so a taken port fails early).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `listener` until `stop` is set.
pub fn serve(listener: TcpListener, state: State, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("dnsf-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut request = [0u8; 1024];
                        let n = stream.read(&mut request).unwrap_or(0);
                        let ok = request[..n].starts_with(b"GET /metrics");
                        let (status, body) = if ok {
                            ("200 OK", render(&state))
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
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
    Ok(())
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
            "timeouts",
            "Queries answered SERVFAIL after the upstream timeout",
            |s| s.timeouts,
        ),
        ("answered", "Upstream answers relayed", |s| s.answered),
        ("truncated", "Truncated answers relayed", |s| s.truncated),
        (
            "upstream_wrong_source",
            "Upstream datagrams from a wrong source",
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
            "1 when DNS 0x20 was switched off: the upstream does not preserve case",
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
            "tcp_framing_errors",
            "TCP connections closed: bad frame length",
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
    let _ = writeln!(out, "# TYPE dnsfence_ip_updates_total counter");
    let _ = writeln!(out, "dnsfence_ip_updates_total {}", obs.ip_updates);
    drop(obs);
    let _ = writeln!(out, "# TYPE dnsfence_allow_entries gauge");
    let _ = writeln!(out, "dnsfence_allow_entries {}", state.allow_entries.len());
    let _ = writeln!(out, "# TYPE dnsfence_policy_generation gauge");
    let _ = writeln!(
        out,
        "dnsfence_policy_generation {}",
        state.policy.load().generation()
    );
    let _ = writeln!(out, "# TYPE dnsfence_policy_reload_errors_total counter");
    let _ = writeln!(
        out,
        "dnsfence_policy_reload_errors_total {}",
        state.reload_errors.load(Ordering::Relaxed)
    );
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
