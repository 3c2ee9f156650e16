//! The bundled upstream: a fast authoritative stand-in over UDP and TCP.
//!
//! UDP workers (one per `threads`, sharing the port with `SO_REUSEPORT`) receive batches with
//! `recvmmsg`, build each reply in place in the send batch ([`respond::Responder`]) and send the
//! batch with one `sendmmsg`. TCP connections (RFC 1035 two-byte length framing, any number of
//! queries per connection) are served by one thread each. Global knobs add delay, random drops
//! and a stall window; name-driven behaviours are described in [`respond`].

pub mod respond;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::sys::{self, RawAddr, RecvBatch, SendBatch};
use respond::{Outcome, Responder, Transport};

/// Why the upstream could not start.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// A socket could not be created, configured or bound.
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// How long replies are held back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delay {
    /// Always this long.
    Fixed(Duration),
    /// Uniformly between the two bounds.
    Uniform(Duration, Duration),
}

impl std::str::FromStr for Delay {
    type Err = String;
    /// `MS` (fixed) or `MIN-MAX` (uniform), in milliseconds (fractions allowed).
    fn from_str(s: &str) -> Result<Self, String> {
        let ms = |t: &str| -> Result<Duration, String> {
            let v: f64 = t.trim().parse().map_err(|e| format!("{t:?}: {e}"))?;
            if !(0.0..=3_600_000.0).contains(&v) {
                return Err(format!("{v} ms is out of range"));
            }
            Ok(Duration::from_secs_f64(v / 1000.0))
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (ms(a)?, ms(b)?);
                if b < a {
                    return Err(format!("{s}: MAX is below MIN"));
                }
                Ok(Delay::Uniform(a, b))
            }
            None => Ok(Delay::Fixed(ms(s)?)),
        }
    }
}

impl Delay {
    fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Delay::Fixed(d) => d,
            Delay::Uniform(a, b) => a + (b - a).mul_f64(rng.f64()),
        }
    }
}

/// Upstream settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Address for both UDP and TCP (port 0: an ephemeral port, the same for both).
    pub listen: SocketAddr,
    /// How answers are built.
    pub responder: Responder,
    /// UDP worker threads.
    pub threads: usize,
    /// Serve TCP too.
    pub tcp: bool,
    /// Hold every reply back this long.
    pub delay: Option<Delay>,
    /// Fraction of queries silently dropped (0.0 to 1.0).
    pub drop_rate: f64,
    /// Seed of the drop and delay draws (deterministic per worker).
    pub seed: u64,
    /// Answer nothing from this long after start ...
    pub stall_after: Option<Duration>,
    /// ... for this long.
    pub stall_for: Duration,
    /// Datagrams per recvmmsg/sendmmsg.
    pub batch: usize,
    /// Socket receive buffer size in bytes (0: the system default).
    pub rcvbuf: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            responder: Responder::default(),
            threads: 1,
            tcp: true,
            delay: None,
            drop_rate: 0.0,
            seed: 1,
            stall_after: None,
            stall_for: Duration::ZERO,
            batch: 64,
            rcvbuf: 4 << 20,
        }
    }
}

/// Counters of one run of the upstream.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UpstreamStats {
    /// Datagrams and TCP messages received.
    pub received: u64,
    /// Replies sent.
    pub replied: u64,
    /// Replies that could not be sent.
    pub send_errors: u64,
    /// Queries dropped by `--drop-rate`.
    pub dropped_random: u64,
    /// Queries dropped during the stall window.
    pub dropped_stall: u64,
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// Per-outcome counts (`answer`, `nxdomain`, `truncated`, `malformed`, ...).
    pub outcomes: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Counters {
    received: u64,
    replied: u64,
    send_errors: u64,
    dropped_random: u64,
    dropped_stall: u64,
    tcp_connections: u64,
    outcomes: [u64; Outcome::ALL.len()],
}

impl Counters {
    fn merge_into(&self, stats: &mut UpstreamStats) {
        stats.received += self.received;
        stats.replied += self.replied;
        stats.send_errors += self.send_errors;
        stats.dropped_random += self.dropped_random;
        stats.dropped_stall += self.dropped_stall;
        stats.tcp_connections += self.tcp_connections;
        for (o, n) in Outcome::ALL.iter().zip(self.outcomes) {
            *stats.outcomes.entry(o.name()).or_default() += n;
        }
    }
}

/// Common per-query policy of UDP and TCP: stall, random drop, delay.
struct Gate {
    config: Arc<UpstreamConfig>,
    start: Instant,
    rng: fastrand::Rng,
}

enum GateVerdict {
    Drop,
    Pass,
}

impl Gate {
    fn check(&mut self, now: Instant, counters: &mut Counters) -> GateVerdict {
        if let Some(after) = self.config.stall_after {
            let t = now.saturating_duration_since(self.start);
            if t >= after && t < after + self.config.stall_for {
                counters.dropped_stall += 1;
                return GateVerdict::Drop;
            }
        }
        if self.config.drop_rate > 0.0 && self.rng.f64() < self.config.drop_rate {
            counters.dropped_random += 1;
            return GateVerdict::Drop;
        }
        GateVerdict::Pass
    }

    fn delay(&mut self, name_delay_ms: u32) -> Duration {
        let global = self
            .config
            .delay
            .map_or(Duration::ZERO, |d| d.sample(&mut self.rng));
        global + Duration::from_millis(u64::from(name_delay_ms))
    }

    fn needs_clock(&self) -> bool {
        self.config.stall_after.is_some() || self.config.delay.is_some()
    }
}

/// A bound upstream, ready to [`Upstream::run`].
pub struct Upstream {
    config: Arc<UpstreamConfig>,
    udp: Vec<UdpSocket>,
    tcp: Option<TcpListener>,
    local: SocketAddr,
}

fn udp_socket(addr: SocketAddr, config: &UpstreamConfig) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(config.threads > 1)?;
    if config.rcvbuf > 0 {
        // Best effort: the kernel caps it at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(config.rcvbuf);
        let _ = socket.set_send_buffer_size(config.rcvbuf);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Upstream {
    /// Binds the UDP sockets (and the TCP listener) on `config.listen`.
    pub fn bind(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let threads = config.threads.max(1);
        let requested = config.listen;
        // With port 0, find a port free for both UDP and TCP.
        let attempts = if requested.port() == 0 { 20 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let first = udp_socket(requested, &config).map_err(|source| UpstreamError::Bind {
                addr: requested,
                proto: "udp",
                source,
            })?;
            let local = first.local_addr().map_err(|source| UpstreamError::Bind {
                addr: requested,
                proto: "udp",
                source,
            })?;
            let tcp = if config.tcp {
                match tcp_listener(local) {
                    Ok(l) => Some(l),
                    Err(source) => {
                        last_err = Some(UpstreamError::Bind {
                            addr: local,
                            proto: "tcp",
                            source,
                        });
                        continue;
                    }
                }
            } else {
                None
            };
            let mut udp = vec![first];
            for _ in 1..threads {
                udp.push(
                    udp_socket(local, &config).map_err(|source| UpstreamError::Bind {
                        addr: local,
                        proto: "udp",
                        source,
                    })?,
                );
            }
            return Ok(Self {
                config: Arc::new(config),
                udp,
                tcp,
                local,
            });
        }
        Err(last_err.unwrap_or(UpstreamError::Bind {
            addr: requested,
            proto: "udp",
            source: io::Error::other("no port free for both UDP and TCP"),
        }))
    }

    /// The bound address (UDP and TCP share the port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `stop` is set; returns the counters.
    pub fn run(self, stop: Arc<AtomicBool>) -> Result<UpstreamStats, UpstreamError> {
        let start = Instant::now();
        let mut handles = Vec::new();
        for (index, socket) in self.udp.into_iter().enumerate() {
            let gate = Gate {
                config: self.config.clone(),
                start,
                rng: fastrand::Rng::with_seed(self.config.seed.wrapping_add(index as u64)),
            };
            let stop = stop.clone();
            let handle = thread::Builder::new()
                .name(format!("udp-{index}"))
                .spawn(move || udp_worker(&socket, gate, &stop))
                .map_err(UpstreamError::Thread)?;
            handles.push(handle);
        }
        let shared = Arc::new(Mutex::new(UpstreamStats::default()));
        let tcp_handle = match self.tcp {
            Some(listener) => {
                let gate = Gate {
                    config: self.config.clone(),
                    start,
                    rng: fastrand::Rng::with_seed(self.config.seed ^ 0x7C9),
                };
                let (stop, shared) = (stop.clone(), shared.clone());
                Some(
                    thread::Builder::new()
                        .name("tcp-accept".into())
                        .spawn(move || tcp_acceptor(&listener, gate, &stop, &shared))
                        .map_err(UpstreamError::Thread)?,
                )
            }
            None => None,
        };
        let mut stats = UpstreamStats::default();
        for handle in handles {
            if let Ok(counters) = handle.join() {
                counters.merge_into(&mut stats);
            }
        }
        if let Some(handle) = tcp_handle {
            let _ = handle.join();
        }
        let tcp_stats = shared.lock().map(|s| s.clone()).unwrap_or_default();
        stats.received += tcp_stats.received;
        stats.replied += tcp_stats.replied;
        stats.send_errors += tcp_stats.send_errors;
        stats.dropped_random += tcp_stats.dropped_random;
        stats.dropped_stall += tcp_stats.dropped_stall;
        stats.tcp_connections += tcp_stats.tcp_connections;
        for (k, v) in tcp_stats.outcomes {
            *stats.outcomes.entry(k).or_default() += v;
        }
        Ok(stats)
    }
}

struct Delayed {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
    to: RawAddr,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

const UDP_BUF: usize = 4096;
const IDLE_POLL: Duration = Duration::from_millis(100);

fn udp_worker(socket: &UdpSocket, mut gate: Gate, stop: &AtomicBool) -> Counters {
    let mut c = Counters::default();
    let batch = gate.config.batch.clamp(1, 1024);
    let mut recv = RecvBatch::new(batch, UDP_BUF);
    let mut send = SendBatch::new(batch, UDP_BUF);
    let mut delayed: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    let mut seq = 0u64;
    let fd = socket.as_fd();
    let mut pfd = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(socket),
        events: libc::POLLIN,
        revents: 0,
    }];
    let responder = gate.config.responder;
    let mut must_wait = true;
    while !stop.load(Ordering::Relaxed) {
        if must_wait {
            let timeout = delayed.peek().map_or(IDLE_POLL, |Reverse(d)| {
                d.due
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_POLL)
            });
            if sys::poll(&mut pfd, Some(timeout)).is_err() {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let n = recv.recv(fd).unwrap_or_default();
        must_wait = n < recv.capacity();
        let now = if gate.needs_clock() || !delayed.is_empty() {
            Some(Instant::now())
        } else {
            None
        };
        for i in 0..n {
            c.received += 1;
            if recv.truncated(i) {
                c.outcomes[Outcome::Malformed as usize] += 1;
                continue;
            }
            if let GateVerdict::Drop = gate.check(now.unwrap_or_else(Instant::now), &mut c) {
                continue;
            }
            let Some(slot) = send.next_slot() else {
                break;
            };
            let reply = responder.respond(recv.packet(i), Transport::Udp, slot);
            c.outcomes[reply.outcome as usize] += 1;
            if reply.len == 0 {
                continue;
            }
            let delay = gate.delay(reply.delay_ms);
            if delay.is_zero() {
                send.commit(reply.len, recv.addr(i));
            } else {
                seq += 1;
                delayed.push(Reverse(Delayed {
                    due: now.unwrap_or_else(Instant::now) + delay,
                    seq,
                    bytes: slot[..reply.len].to_vec(),
                    to: *recv.addr(i),
                }));
            }
        }
        let report = send.flush(fd);
        c.replied += report.sent as u64;
        c.send_errors += report.failed as u64;
        if !delayed.is_empty() {
            let now = Instant::now();
            while let Some(Reverse(d)) = delayed.peek() {
                if d.due > now {
                    break;
                }
                if let Some(Reverse(d)) = delayed.pop() {
                    if send.is_full() {
                        let report = send.flush(fd);
                        c.replied += report.sent as u64;
                        c.send_errors += report.failed as u64;
                    }
                    send.push(&d.bytes, &d.to);
                }
            }
            let report = send.flush(fd);
            c.replied += report.sent as u64;
            c.send_errors += report.failed as u64;
        }
    }
    c
}

fn tcp_acceptor(
    listener: &TcpListener,
    gate: Gate,
    stop: &Arc<AtomicBool>,
    shared: &Arc<Mutex<UpstreamStats>>,
) {
    let mut pfd = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    }];
    let mut conns = Vec::new();
    let mut index = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let _ = sys::poll(&mut pfd, Some(IDLE_POLL));
        while let Ok((stream, _)) = listener.accept() {
            index += 1;
            let conn_gate = Gate {
                config: gate.config.clone(),
                start: gate.start,
                rng: fastrand::Rng::with_seed(gate.config.seed ^ index.wrapping_mul(0x9E37)),
            };
            let (stop, shared) = (stop.clone(), shared.clone());
            if let Ok(h) = thread::Builder::new()
                .name("tcp-conn".into())
                .spawn(move || tcp_connection(stream, conn_gate, &stop, &shared))
            {
                conns.push(h);
            }
        }
        conns.retain(|h| !h.is_finished());
    }
    for h in conns {
        let _ = h.join();
    }
}

fn tcp_connection(
    mut stream: TcpStream,
    mut gate: Gate,
    stop: &AtomicBool,
    shared: &Mutex<UpstreamStats>,
) {
    let mut c = Counters {
        tcp_connections: 1,
        ..Counters::default()
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IDLE_POLL));
    let _ = stream.set_nodelay(true);
    let responder = gate.config.responder;
    let mut inbuf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 65536];
    let mut out = vec![0u8; 2 + 65535];
    'conn: while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let mut consumed = 0;
        while inbuf.len() - consumed >= 2 {
            let len = usize::from(u16::from_be_bytes([inbuf[consumed], inbuf[consumed + 1]]));
            if inbuf.len() - consumed - 2 < len {
                break;
            }
            let msg = &inbuf[consumed + 2..consumed + 2 + len];
            consumed += 2 + len;
            c.received += 1;
            if let GateVerdict::Drop = gate.check(Instant::now(), &mut c) {
                continue;
            }
            let reply = responder.respond(msg, Transport::Tcp, &mut out[2..]);
            c.outcomes[reply.outcome as usize] += 1;
            if reply.len == 0 {
                continue;
            }
            let delay = gate.delay(reply.delay_ms);
            if !delay.is_zero() {
                thread::sleep(delay);
            }
            out[..2].copy_from_slice(&(reply.len as u16).to_be_bytes());
            if stream.write_all(&out[..2 + reply.len]).is_err() {
                c.send_errors += 1;
                break 'conn;
            }
            c.replied += 1;
        }
        inbuf.drain(..consumed);
    }
    if let Ok(mut s) = shared.lock() {
        c.merge_into(&mut s);
    }
}
