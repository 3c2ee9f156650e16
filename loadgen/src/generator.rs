//! The open-loop load generator: one thread, many connected UDP sockets.
//!
//! Query `k` is due at `start + k / rate` (monotonic clock). Each turn of the loop sends every
//! query that is due (in `sendmmsg` batches, one socket per batch, round robin), then sleeps in
//! `ppoll` until the next mini-batch is due or an answer arrives, reads answers with
//! `recvmmsg`, and expires queries older than the timeout. Sending never waits for answers, so
//! a slow or stalled server shows up as latency and timeouts, not as a lower send rate.
//!
//! Answers are matched by (socket, DNS ID) in a pending table and must carry the question that
//! was sent (compared case-insensitively); anything else is counted, never as an answer.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::queries::QuerySet;
use crate::scenario::{Action, Scenario};
use crate::stats::{Collector, Progress, Report, RunInfo};
use crate::sys::{self, RawAddr, RecvBatch, SendBatch};
use crate::wire;

/// Why a run could not start.
#[derive(Debug, Error)]
pub enum RunError {
    /// A client socket could not be created or connected.
    #[error("cannot open a UDP socket to {server}: {source}")]
    Socket {
        /// The server.
        server: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The settings are inconsistent.
    #[error("invalid settings: {0}")]
    Invalid(&'static str),
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where to send.
    pub server: SocketAddr,
    /// Queries per second.
    pub rate: f64,
    /// How long to send.
    pub duration: Duration,
    /// How long to wait for an answer.
    pub timeout: Duration,
    /// UDP sockets (source ports).
    pub sockets: usize,
    /// Most datagrams per `sendmmsg`/`recvmmsg`.
    pub batch: usize,
    /// Socket buffer sizes in bytes (0: system default).
    pub socket_buffer: usize,
    /// Timed shell commands.
    pub actions: Vec<Action>,
    /// List every answer at least this late (µs) in the report; 0: none.
    pub slow_us: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            server: SocketAddr::from(([127, 0, 0, 1], 53)),
            rate: 1000.0,
            duration: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            sockets: 16,
            batch: 32,
            socket_buffer: 4 << 20,
            actions: Vec::new(),
            slow_us: 0,
        }
    }
}

/// Queries in flight, indexed by `socket << 16 | id` (struct of arrays, so that the zeroed
/// tables come from the allocator without being written): `seq` 0 means the slot is free.
struct Pending {
    seq: Vec<u32>,
    query: Vec<u32>,
    sent_ns: Vec<u64>,
}

impl Pending {
    fn new(sockets: usize) -> Self {
        let n = sockets << 16;
        Self {
            seq: vec![0; n],
            query: vec![0; n],
            sent_ns: vec![0; n],
        }
    }
}

fn slot(socket: usize, id: u16) -> usize {
    (socket << 16) | usize::from(id)
}

/// Expiry queue entry, in send order.
#[derive(Clone, Copy)]
struct InFlight {
    socket: u16,
    id: u16,
    seq: u32,
    sent_ns: u64,
}

/// The longest the loop sleeps, so that progress and signals are noticed.
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Mini-batch interval: wake-ups for sending are at most this frequent (two queries per wake
/// at 20k qps; one wake per query would cost twice dnsperf's CPU there).
const SEND_QUANTUM_NS: f64 = 100_000.0;
/// How far an ID scan looks for a free slot before reusing a busy one.
const ID_PROBES: u32 = 64;

struct Client {
    sockets: Vec<UdpSocket>,
    pending: Pending,
    next_id: Vec<u16>,
    in_flight: VecDeque<InFlight>,
    outstanding: u64,
    seq: u32,
}

impl Client {
    fn allocate(&mut self, socket: usize, stats: &mut Collector) -> u16 {
        let p = &mut self.pending;
        let mut id = self.next_id[socket];
        for _ in 0..ID_PROBES {
            if p.seq[slot(socket, id)] == 0 {
                break;
            }
            id = id.wrapping_add(1);
        }
        let i = slot(socket, id);
        if p.seq[i] != 0 {
            // Every probed ID is busy (a full ID space in flight on this socket): the query
            // holding this ID is given up as lost.
            stats.on_timeout(p.sent_ns[i]);
            p.seq[i] = 0;
            self.outstanding -= 1;
        }
        self.next_id[socket] = id.wrapping_add(1);
        id
    }
}

fn open_socket(server: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if buffer > 0 {
        // Best effort: capped by net.core.{r,w}mem_max.
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    socket.connect(&server.into())?;
    Ok(socket.into())
}

/// Runs the load: sends `rate` queries per second for `duration`, then waits at most
/// `timeout` for the last answers. `on_second` is called once per completed second.
pub fn run(
    config: &RunConfig,
    queries: &QuerySet,
    on_second: &mut dyn FnMut(Progress),
) -> Result<Report, RunError> {
    if !(config.rate.is_finite() && config.rate > 0.0) {
        return Err(RunError::Invalid("the rate must be above 0"));
    }
    if config.sockets == 0 || config.sockets > usize::from(u16::MAX) {
        return Err(RunError::Invalid("--sockets must be 1 to 65535"));
    }
    if queries.is_empty() {
        return Err(RunError::Invalid("no queries"));
    }
    let total = (config.rate * config.duration.as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / config.rate;
    let quantum = ((config.rate * SEND_QUANTUM_NS / 1e9) as u64).max(1);
    let timeout_ns = config.timeout.as_nanos() as u64;
    let batch = config.batch.clamp(1, 1024);

    let mut sockets = Vec::with_capacity(config.sockets);
    for _ in 0..config.sockets {
        sockets.push(
            open_socket(config.server, config.socket_buffer).map_err(|source| {
                RunError::Socket {
                    server: config.server,
                    source,
                }
            })?,
        );
    }
    let mut rng = fastrand::Rng::new();
    let mut client = Client {
        pending: Pending::new(sockets.len()),
        next_id: (0..sockets.len()).map(|_| rng.u16(..)).collect(),
        sockets,
        in_flight: VecDeque::with_capacity(
            ((config.rate * config.timeout.as_secs_f64() * 1.2) as usize).min(1 << 24),
        ),
        outstanding: 0,
        seq: 0,
    };
    // Kernel receive timestamps make latencies exact however late the loop reads them, so
    // that while sending the loop need not wake up for every answer.
    let stamped = client
        .sockets
        .iter()
        .all(|s| sys::enable_rx_timestamps(s.as_fd()).is_ok());
    let mut pfds: Vec<libc::pollfd> = client
        .sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();

    let seconds = config.duration.as_secs_f64().ceil().max(1.0) as usize;
    let highest_us = (timeout_ns / 1000).max(1000) * 2;
    let mut stats = Collector::new(seconds, highest_us);
    stats.list_slow(config.slow_us);
    let mut send = SendBatch::new(batch, queries.max_len().max(wire::HEADER_LEN));
    let mut recv = RecvBatch::new(batch.max(64), 4096);
    let none = RawAddr::none();

    sys::set_timer_slack(1_000);
    let cpu_start = sys::process_cpu_time();
    let start = Instant::now();
    let realtime_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let scenario = Scenario::start(config.actions.clone(), start);
    let now_ns = || start.elapsed().as_nanos() as u64;

    let mut sent: u64 = 0;
    let mut next_query = 0usize;
    let mut next_socket = 0usize;
    let mut reported_second = 0usize;
    let mut send_end_ns: Option<u64> = None;
    let mut pushed: Vec<(u16, u32)> = Vec::with_capacity(batch);
    loop {
        let mut now = now_ns();
        if sys::shutdown_requested() && send_end_ns.is_none() {
            send_end_ns = Some(now);
        }

        // 1. Send everything that is due.
        if send_end_ns.is_none() {
            let due = ((now as f64 / interval_ns) as u64 + 1).min(total);
            while sent < due {
                let socket = next_socket;
                next_socket = (next_socket + 1) % client.sockets.len();
                let n = (due - sent).min(batch as u64);
                pushed.clear();
                for _ in 0..n {
                    let id = client.allocate(socket, &mut stats);
                    let msg = queries.message(next_query);
                    if let Some(slot) = send.next_slot() {
                        slot[..msg.len()].copy_from_slice(msg);
                        slot[..2].copy_from_slice(&id.to_be_bytes());
                        send.commit(msg.len(), &none);
                    }
                    client.seq = client.seq.wrapping_add(1).max(1);
                    let seq = client.seq;
                    let i = slot(socket, id);
                    client.pending.seq[i] = seq;
                    client.pending.query[i] = next_query as u32;
                    pushed.push((id, seq));
                    next_query += 1;
                    if next_query == queries.len() {
                        next_query = 0;
                    }
                }
                now = now_ns();
                let report = send.flush(client.sockets[socket].as_fd());
                stats.send_errors += report.failed as u64;
                let scheduled = (sent as f64 * interval_ns) as u64;
                stats.max_send_lag_us = stats
                    .max_send_lag_us
                    .max(now.saturating_sub(scheduled) / 1000);
                for &(id, seq) in &pushed {
                    client.pending.sent_ns[slot(socket, id)] = now;
                    client.in_flight.push_back(InFlight {
                        socket: socket as u16,
                        id,
                        seq,
                        sent_ns: now,
                    });
                    stats.on_sent(now);
                }
                client.outstanding += n;
                sent += n;
            }
            if sent >= total {
                send_end_ns = Some(now);
            }
        }

        // 2. Progress, once per completed second of sending.
        let second = (now / 1_000_000_000) as usize;
        while reported_second < second && reported_second < seconds {
            if let Some(p) = stats.progress(reported_second) {
                on_second(p);
            }
            reported_second += 1;
        }

        // 3. Done? (Everything sent, and answered or timed out.)
        if let Some(end) = send_end_ns
            && (client.outstanding == 0 || now >= end + timeout_ns)
        {
            break;
        }

        // 4. Sleep until the next mini-batch is due, an answer arrives, or a query expires.
        let wake_ns = match send_end_ns {
            None => ((sent + quantum - 1) as f64 * interval_ns) as u64,
            Some(end) => client
                .in_flight
                .front()
                .map_or(end + timeout_ns, |f| f.sent_ns + timeout_ns),
        };
        let sleep = Duration::from_nanos(wake_ns.saturating_sub(now)).min(MAX_SLEEP);
        let ready = if send_end_ns.is_none() && stamped {
            // Sleep until the next send, then collect whatever arrived meanwhile.
            if !sleep.is_zero() {
                let _ = sys::poll(&mut [], Some(sleep));
            }
            sys::poll(&mut pfds, Some(Duration::ZERO)).unwrap_or(0)
        } else {
            sys::poll(&mut pfds, Some(sleep)).unwrap_or(0)
        };

        // 5. Read answers.
        if ready > 0 {
            for (socket, pfd) in pfds.iter_mut().enumerate() {
                if pfd.revents == 0 {
                    continue;
                }
                pfd.revents = 0;
                loop {
                    let n = recv.recv(client.sockets[socket].as_fd()).unwrap_or(0);
                    let now = now_ns();
                    for i in 0..n {
                        let stamp = recv.timestamp(i);
                        let at = if stamp > realtime_start {
                            (stamp - realtime_start).min(now)
                        } else {
                            now
                        };
                        on_datagram(&mut client, socket, recv.packet(i), queries, at, &mut stats);
                    }
                    if n < recv.capacity() {
                        break;
                    }
                }
            }
        }

        // 6. Expire queries older than the timeout.
        let now = now_ns();
        while let Some(f) = client.in_flight.front().copied() {
            let i = slot(usize::from(f.socket), f.id);
            if client.pending.seq[i] != f.seq {
                client.in_flight.pop_front();
                continue;
            }
            if f.sent_ns + timeout_ns > now {
                break;
            }
            client.pending.seq[i] = 0;
            client.outstanding -= 1;
            stats.on_timeout(f.sent_ns);
            client.in_flight.pop_front();
        }
    }
    // Whatever is still pending has had its full timeout (or the run was interrupted).
    while let Some(f) = client.in_flight.pop_front() {
        let i = slot(usize::from(f.socket), f.id);
        if client.pending.seq[i] == f.seq {
            client.pending.seq[i] = 0;
            stats.on_timeout(f.sent_ns);
        }
    }
    let elapsed = start.elapsed();
    let cpu = sys::process_cpu_time().saturating_sub(cpu_start);
    while reported_second < seconds {
        if let Some(p) = stats.progress(reported_second) {
            on_second(p);
        }
        reported_second += 1;
    }
    let events = scenario.finish(Duration::from_secs(1));
    let send_s = send_end_ns.map_or(config.duration.as_secs_f64(), |e| {
        (e as f64 / 1e9).clamp(
            (sent as f64 - 1.0).max(0.0) / config.rate,
            config.duration.as_secs_f64(),
        )
    });
    let info = RunInfo {
        server: config.server.to_string(),
        rate: config.rate,
        duration_s: config.duration.as_secs_f64(),
        send_s: if sent >= total {
            config.duration.as_secs_f64()
        } else {
            send_s
        },
        elapsed_s: elapsed.as_secs_f64(),
        sockets: client.sockets.len(),
        timeout_ms: config.timeout.as_millis() as u64,
        cpu_s: cpu.as_secs_f64(),
    };
    Ok(stats.report(info, events))
}

/// Handles one received datagram.
fn on_datagram(
    client: &mut Client,
    socket: usize,
    msg: &[u8],
    queries: &QuerySet,
    now: u64,
    stats: &mut Collector,
) {
    if msg.len() < wire::HEADER_LEN || msg[2] & 0x80 == 0 {
        stats.malformed += 1;
        return;
    }
    let i = slot(socket, wire::id(msg));
    if client.pending.seq[i] == 0 {
        stats.unexpected += 1;
        return;
    }
    let rcode = msg[3] & 0x0F;
    let question = queries.question(client.pending.query[i] as usize);
    let matches = match wire::u16_at(msg, 4) {
        Some(1) => msg
            .get(wire::HEADER_LEN..wire::HEADER_LEN + question.len())
            .is_some_and(|q| q.eq_ignore_ascii_case(question)),
        // Servers may drop the question from error replies (FORMERR, NOTIMP, ...).
        Some(0) => rcode != wire::RCODE_NOERROR,
        _ => false,
    };
    if !matches {
        stats.mismatched += 1;
        return;
    }
    let sent_ns = client.pending.sent_ns[i];
    client.pending.seq[i] = 0;
    client.outstanding -= 1;
    stats.on_answer(sent_ns, now, rcode, msg[2] & 0x02 != 0);
    stats.on_slow(sent_ns, now, socket);
}
