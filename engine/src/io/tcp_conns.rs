//! The TCP side of a shard, shared by both backends: the listener, client connections and the
//! pipelined upstream connection, as nonblocking sockets driven by readiness.
//!
//! The backend supplies readiness through a [`Poller`] (epoll registrations, or one-shot
//! io_uring poll requests) and calls [`TcpSide::on_ready`] for each token that became ready.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::sys::{Interest, READ, WRITE};
use super::tcp::{FrameDecoder, OutBuf};
use super::{ConnId, Event, IoConfig, IoStats, sockets};

/// Token kinds (bits 48..56 of a token).
const KIND_LISTENER: u64 = 1;
const KIND_CLIENT: u64 = 2;
const KIND_UPSTREAM: u64 = 3;
/// Tokens of this module use the low 56 bits; backends may use the top 8.
pub(crate) const TOKEN_MASK: u64 = (1 << 56) - 1;

/// Connection generations are drawn from a per-shard counter of this many bits: at a million
/// accepts a second it would take nine years to come back to a value, so a [`ConnId`] never
/// names two connections in the life of a process.
const GEN_BITS: u32 = 48;

/// A readiness token: kind, the low 32 bits of the generation, slot. (Readiness of a closed
/// connection arrives within a poll or two of its close, not 2^32 accepts later.)
fn token(kind: u64, gen_: u64, slot: u16) -> u64 {
    (kind << 48) | ((gen_ & 0xffff_ffff) << 16) | u64::from(slot)
}

/// The id of a connection: generation above, slot in the low 16 bits ([`super::conn_slot`]).
fn conn_id(gen_: u64, slot: u16) -> ConnId {
    (gen_ << 16) | u64::from(slot)
}

/// The end of the idle-order list.
const NIL: u16 = u16::MAX;

/// How many of the connections longest without progress eviction looks through for one that
/// is not waiting for an answer (bounded: an accept never walks the whole list).
const EVICTION_SCAN: usize = 32;

/// Readiness registration for the TCP sockets, implemented by each backend.
pub(crate) trait Poller {
    /// Makes the backend report `want` readiness of `fd` with `token`; `state` is this
    /// registration's backend-specific state (starts at 0), updated.
    fn sync(
        &mut self,
        fd: RawFd,
        token: u64,
        want: Interest,
        state: &mut Interest,
    ) -> io::Result<()>;
    /// `fd` is about to be closed: drop its registration.
    fn forget(&mut self, fd: RawFd, token: u64, state: &mut Interest);
}

/// Reads at most this many times per connection per readiness (fairness between connections).
const READS_PER_READY: usize = 4;

/// How reading a ready connection into its frame decoder ended.
enum Filled {
    /// Everything readable now was read (or the buffer or the read budget is full).
    Drained,
    /// The peer closed its side.
    Eof,
    /// A read failed.
    Failed,
}

/// Reads what `stream` has ready into `dec`: at most `READS_PER_READY` reads, stopping at a
/// short read, a full buffer or `WouldBlock`.
fn fill(stream: &mut TcpStream, dec: &mut FrameDecoder) -> Filled {
    for _ in 0..READS_PER_READY {
        let spare = dec.spare();
        if spare.is_empty() {
            break;
        }
        let want = spare.len();
        match stream.read(spare) {
            Ok(0) => return Filled::Eof,
            Ok(n) => {
                dec.commit(n);
                if n < want {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Filled::Failed,
        }
    }
    Filled::Drained
}
/// Accepts at most this many connections per listener readiness.
const ACCEPTS_PER_READY: usize = 64;

#[derive(Debug)]
struct ClientConn {
    stream: Option<TcpStream>,
    peer: SocketAddr,
    /// Generation (unique per shard, see [`GEN_BITS`]); 0 while the slot is free.
    gen_: u64,
    dec: FrameDecoder,
    out: OutBuf,
    /// Messages delivered and not answered yet.
    outstanding: usize,
    /// Last complete message received or output written (bytes of an incomplete frame do
    /// not count, so trickling a frame does not keep a connection alive).
    last_progress: Instant,
    /// Neighbours in the idle order (least recent progress first), `NIL` at the ends.
    older: u16,
    newer: u16,
    /// Backend registration state.
    state: Interest,
    /// The peer closed its side: answer what is outstanding, then close.
    eof: bool,
    /// Output is waiting for writability (a write was short).
    write_blocked: bool,
    /// In the dirty list (output to write at flush).
    dirty: bool,
}

#[derive(Debug)]
struct UpstreamConn {
    /// The server it connects to.
    server: SocketAddr,
    stream: Option<TcpStream>,
    connecting: bool,
    gen_: u64,
    dec: FrameDecoder,
    out: OutBuf,
    state: Interest,
    write_blocked: bool,
}

/// Listener, client connections and the upstream connection of one shard.
#[derive(Debug)]
pub(crate) struct TcpSide {
    listener: Option<TcpListener>,
    listener_state: Interest,
    conns: Vec<ClientConn>,
    free: Vec<u16>,
    live: usize,
    /// The next connection generation.
    next_gen: u64,
    /// Live connections, least recent progress first: the idle sweep and eviction take from
    /// the front.
    oldest: u16,
    newest: u16,
    /// Live connections per source address (sized at start: no allocation when serving).
    per_source: HashMap<IpAddr, u32, foldhash::fast::RandomState>,
    max_per_source: u32,
    dirty: Vec<ConnId>,
    resume: Vec<ConnId>,
    closed: Vec<ConnId>,
    /// One connection per upstream server, by index.
    upstream: Vec<UpstreamConn>,
    /// Upstream servers whose connection was lost (or not opened) since the last delivery,
    /// each once ([`Event::TcpUpstreamClosed`]); capacity reserved at start.
    upstream_lost: Vec<u16>,
    idle: Duration,
    max_conns: usize,
    pipeline: usize,
    max_message: usize,
    max_out: usize,
    next_sweep: Instant,
    /// A descriptor held in reserve (`/dev/null`) for when the process runs out: closed to
    /// accept and close a pending connection, then taken again (a listener whose queue holds
    /// a connection it cannot accept stays ready, and the shard would spin on it).
    spare: Option<std::fs::File>,
    /// Out of descriptors with no connection to close and no spare: the listener is not
    /// watched until then (it would stay ready, and the shard spin on it).
    accept_paused_until: Option<Instant>,
}

/// How long a listener that could not accept for want of a descriptor is left unwatched.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a client connection is closed (for the counters).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    Normal,
    Framing,
    Idle,
    Overflow,
    Evicted,
}

impl TcpSide {
    pub(crate) fn new(config: &IoConfig, listener: Option<TcpListener>) -> Self {
        let spare_fd = listener
            .as_ref()
            .and_then(|_| std::fs::File::open("/dev/null").ok());
        Self {
            listener,
            listener_state: 0,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            next_gen: 1,
            oldest: NIL,
            newest: NIL,
            // Twice the most keys ever held, so removals never force a resize.
            per_source: HashMap::with_capacity_and_hasher(
                2 * config.max_tcp_conns + 2,
                foldhash::fast::RandomState::default(),
            ),
            max_per_source: u32::try_from(config.max_tcp_conns_per_source).unwrap_or(u32::MAX),
            dirty: Vec::new(),
            resume: Vec::new(),
            closed: Vec::new(),
            upstream_lost: Vec::with_capacity(config.upstreams.len()),
            upstream: config
                .upstreams
                .iter()
                .map(|&server| UpstreamConn {
                    server,
                    stream: None,
                    connecting: false,
                    gen_: 0,
                    dec: FrameDecoder::new(65535),
                    out: OutBuf::new(config.max_upstream_tcp_queue),
                    state: 0,
                    write_blocked: false,
                })
                .collect(),
            spare: spare_fd,
            accept_paused_until: None,
            idle: config.tcp_idle_timeout,
            max_conns: config.max_tcp_conns,
            pipeline: config.max_tcp_pipeline,
            max_message: config.max_tcp_message,
            max_out: config.max_tcp_out_bytes,
            next_sweep: Instant::now(),
        }
    }

    /// The listen sockets of the shard: `udp` (the backend's) and this side's listener.
    pub(crate) fn listen_fds<'a>(
        &'a self,
        udp: &'a std::net::UdpSocket,
        addr: SocketAddr,
    ) -> super::ListenFds<'a> {
        use std::os::fd::AsFd;
        super::ListenFds {
            udp: udp.as_fd(),
            tcp: self.listener.as_ref().map(|l| l.as_fd()),
            addr,
        }
    }

    /// Registers the listener with the poller.
    pub(crate) fn start(&mut self, poller: &mut dyn Poller) -> io::Result<()> {
        if let Some(l) = &self.listener {
            poller.sync(
                l.as_raw_fd(),
                token(KIND_LISTENER, 0, 0),
                READ,
                &mut self.listener_state,
            )?;
        }
        Ok(())
    }

    /// The registration state of the connection behind `token`, for a backend that must
    /// update it when a one-shot readiness request fires. None for stale tokens.
    pub(crate) fn state_mut(&mut self, token: u64) -> Option<&mut Interest> {
        let (kind, gen_, slot) = split(token);
        match kind {
            KIND_LISTENER => Some(&mut self.listener_state),
            KIND_CLIENT => {
                let slot = self.token_slot(gen_, slot)?;
                Some(&mut self.conns[usize::from(slot)].state)
            }
            KIND_UPSTREAM => {
                let u = self.upstream.get_mut(usize::from(slot))?;
                (u.gen_ & 0xffff_ffff == gen_ && u.stream.is_some()).then_some(&mut u.state)
            }
            _ => None,
        }
    }

    /// When the backend should wake up next for the idle sweep (None: no connections).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let sweep = (self.live > 0).then_some(self.next_sweep);
        match (sweep, self.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether events are waiting to be delivered without any readiness (closes, resumed
    /// connections with buffered messages).
    pub(crate) fn has_pending(&self) -> bool {
        !self.closed.is_empty() || !self.resume.is_empty() || !self.upstream_lost.is_empty()
    }

    /// Notes that upstream `i`'s connection is lost, for the next delivery.
    fn upstream_lost(&mut self, i: usize) {
        let i = i as u16;
        if !self.upstream_lost.contains(&i) && self.upstream_lost.len() < self.upstream.len() {
            self.upstream_lost.push(i);
        }
    }

    /// Delivers what needs no readiness: buffered messages of connections that were paused
    /// by the pipeline limit and may go on, and connection closes.
    pub(crate) fn deliver_pending(
        &mut self,
        now: Instant,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let mut n = 0;
        while let Some(id) = self.resume.pop() {
            let Some(slot) = self.live_slot(id) else {
                continue;
            };
            n += self.deliver_client(slot, now, poller, stats, on_event);
        }
        for id in self.closed.drain(..) {
            on_event(Event::TcpClientClosed { conn: id });
            n += 1;
        }
        for server in self.upstream_lost.drain(..) {
            on_event(Event::TcpUpstreamClosed { server });
            n += 1;
        }
        n
    }

    fn live_slot(&self, id: ConnId) -> Option<u16> {
        let slot = (id & 0xffff) as u16;
        let c = self.conns.get(usize::from(slot))?;
        (c.stream.is_some() && c.gen_ == id >> 16).then_some(slot)
    }

    /// The live slot a readiness token (low 32 bits of the generation) names.
    fn token_slot(&self, gen32: u64, slot: u16) -> Option<u16> {
        let c = self.conns.get(usize::from(slot))?;
        (c.stream.is_some() && c.gen_ & 0xffff_ffff == gen32).then_some(slot)
    }

    /// Moves `slot` to the recent end of the idle order (or puts it there, when `linked` is
    /// false) and records progress at `now`.
    fn touch(&mut self, slot: u16, now: Instant, linked: bool) {
        if linked {
            self.unlink(slot);
        }
        let c = &mut self.conns[usize::from(slot)];
        c.last_progress = now;
        c.older = self.newest;
        c.newer = NIL;
        match self.newest {
            NIL => self.oldest = slot,
            n => self.conns[usize::from(n)].newer = slot,
        }
        self.newest = slot;
    }

    /// The connection to evict at the connection limit: among the [`EVICTION_SCAN`] that have
    /// gone longest without progress, the oldest that owes its client nothing (no query
    /// waiting for an answer, no output waiting), else the oldest of all. None without
    /// connections.
    fn eviction_victim(&self) -> Option<u16> {
        let mut slot = self.oldest;
        for _ in 0..EVICTION_SCAN {
            if slot == NIL {
                break;
            }
            let c = &self.conns[usize::from(slot)];
            if c.outstanding == 0 && c.out.is_empty() {
                return Some(slot);
            }
            slot = c.newer;
        }
        (self.oldest != NIL).then_some(self.oldest)
    }

    /// Takes `slot` out of the idle order.
    fn unlink(&mut self, slot: u16) {
        let (older, newer) = {
            let c = &self.conns[usize::from(slot)];
            (c.older, c.newer)
        };
        match older {
            NIL => self.oldest = newer,
            o => self.conns[usize::from(o)].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.conns[usize::from(n)].older = older,
        }
        let c = &mut self.conns[usize::from(slot)];
        c.older = NIL;
        c.newer = NIL;
    }

    /// Handles readiness `ready` of the socket behind `token`; returns the events delivered.
    pub(crate) fn on_ready(
        &mut self,
        token: u64,
        ready: Interest,
        now: Instant,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let (kind, gen_, slot) = split(token);
        match kind {
            KIND_LISTENER => {
                self.accept(now, poller, stats);
                0
            }
            KIND_CLIENT => {
                let Some(slot) = self.token_slot(gen_, slot) else {
                    return 0;
                };
                self.client_ready(slot, ready, now, poller, stats, on_event)
            }
            KIND_UPSTREAM
                if self
                    .upstream
                    .get(usize::from(slot))
                    .is_some_and(|u| gen_ == u.gen_ & 0xffff_ffff && u.stream.is_some()) =>
            {
                self.upstream_ready(usize::from(slot), ready, poller, stats, on_event)
            }
            _ => 0,
        }
    }

    fn accept(&mut self, now: Instant, poller: &mut dyn Poller, stats: &mut IoStats) {
        for _ in 0..ACCEPTS_PER_READY {
            let Some(listener) = &self.listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors (review finding: the listener stayed ready and the
                    // shard spun). Of the process's own (EMFILE), a connection gone longest
                    // without progress makes room, as at --max-tcp-conns; else the new one is
                    // accepted on the spare descriptor and closed at once (the client sees a
                    // reset); else (the spare taken by another thread or process meanwhile,
                    // or the system's table full) the listener rests for ACCEPT_BACKOFF.
                    stats.tcp_no_descriptor += 1;
                    if e.raw_os_error() == Some(libc::EMFILE)
                        && let Some(victim) = self.eviction_victim()
                    {
                        self.close_client(victim, CloseReason::Evicted, poller, stats);
                        continue;
                    }
                    if self.spare.is_none() {
                        self.spare = std::fs::File::open("/dev/null").ok();
                    }
                    let mut taken = false;
                    if let Some(spare) = self.spare.take() {
                        drop(spare);
                        if let Some(listener) = &self.listener {
                            taken = listener.accept().is_ok();
                        }
                        self.spare = std::fs::File::open("/dev/null").ok();
                    }
                    if !taken {
                        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                        self.watch_listener(0, poller);
                        return;
                    }
                    break;
                }
                // ECONNABORTED, ...: try again at the next readiness.
                Err(_) => break,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let source = peer.ip().to_canonical();
            let from_source = self.per_source.get(&source).copied().unwrap_or(0);
            if from_source >= self.max_per_source {
                stats.tcp_source_limit_rejected += 1;
                drop(stream);
                continue;
            }
            if self.live >= self.max_conns {
                // Make room by closing a connection that has gone long without progress: idle
                // connections cannot lock legitimate clients out.
                let Some(victim) = self.eviction_victim() else {
                    stats.tcp_limit_rejected += 1;
                    drop(stream);
                    continue;
                };
                self.close_client(victim, CloseReason::Evicted, poller, stats);
            }
            let _ = stream.set_nodelay(true);
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    let s = self.conns.len() as u16;
                    self.conns.push(ClientConn {
                        stream: None,
                        peer,
                        gen_: 0,
                        dec: FrameDecoder::new(self.max_message),
                        out: OutBuf::new(self.max_out),
                        outstanding: 0,
                        last_progress: now,
                        older: NIL,
                        newer: NIL,
                        state: 0,
                        eof: false,
                        write_blocked: false,
                        dirty: false,
                    });
                    s
                }
            };
            let gen_ = self.next_gen;
            self.next_gen = ((self.next_gen + 1) & ((1 << GEN_BITS) - 1)).max(1);
            let c = &mut self.conns[usize::from(slot)];
            c.stream = Some(stream);
            c.peer = peer;
            c.gen_ = gen_;
            c.dec.reset();
            c.out.clear();
            c.outstanding = 0;
            c.state = 0;
            c.eof = false;
            c.write_blocked = false;
            c.dirty = false;
            *self.per_source.entry(source).or_insert(0) += 1;
            self.touch(slot, now, false);
            if self.live == 0 {
                self.next_sweep = now + self.sweep_interval();
            }
            self.live += 1;
            stats.tcp_accepted += 1;
            self.sync_client(slot, poller, stats);
        }
        // One-shot pollers need re-arming; epoll keeps the registration.
        self.watch_listener(READ, poller);
    }

    /// Sets what the listener is watched for (READ, or nothing while accepts rest).
    fn watch_listener(&mut self, want: Interest, poller: &mut dyn Poller) {
        if let Some(l) = &self.listener {
            let _ = poller.sync(
                l.as_raw_fd(),
                token(KIND_LISTENER, 0, 0),
                want,
                &mut self.listener_state,
            );
        }
    }

    fn sweep_interval(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn client_ready(
        &mut self,
        slot: u16,
        ready: Interest,
        now: Instant,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let c = &mut self.conns[usize::from(slot)];
        if ready & WRITE != 0 && c.write_blocked {
            c.write_blocked = false;
            if !self.write_client(slot, now, poller, stats) {
                return 0;
            }
        }
        let c = &mut self.conns[usize::from(slot)];
        if ready & READ != 0 && !c.eof && c.outstanding < self.pipeline {
            let Some(stream) = c.stream.as_mut() else {
                return 0;
            };
            match fill(stream, &mut c.dec) {
                Filled::Drained => {}
                Filled::Eof => c.eof = true,
                Filled::Failed => {
                    self.close_client(slot, CloseReason::Normal, poller, stats);
                    return 0;
                }
            }
        }
        self.deliver_client(slot, now, poller, stats, on_event)
    }

    /// Delivers the complete messages buffered on `slot` (up to the pipeline limit), then
    /// closes or re-registers the connection as its state requires.
    ///
    /// A frame that cannot be a query (a length below a DNS header or above the limit, or
    /// the QR bit set: a response, never answered) ends the input: nothing after it is read,
    /// the counter is bumped, and the connection is closed once the answers to the messages
    /// delivered before it are written (RFC 7766 lets a server close; answering those first
    /// means a valid query is never lost to the garbage that follows it).
    fn deliver_client(
        &mut self,
        slot: u16,
        now: Instant,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let mut n = 0;
        let c = &mut self.conns[usize::from(slot)];
        let conn = conn_id(c.gen_, slot);
        let mut framing_error = false;
        while c.outstanding < self.pipeline {
            match c.dec.next_frame() {
                Ok(Some(data)) if data[2] & 0x80 == 0 => {
                    c.outstanding += 1;
                    stats.tcp_rx_messages += 1;
                    on_event(Event::TcpClientMessage {
                        conn,
                        peer: c.peer,
                        data,
                    });
                    n += 1;
                }
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => {
                    framing_error = true;
                    break;
                }
            }
        }
        if framing_error {
            stats.tcp_framing_errors += 1;
            c.eof = true;
            c.dec.reset();
        }
        if n > 0 {
            self.touch(slot, now, true);
        }
        let c = &self.conns[usize::from(slot)];
        if c.eof && c.outstanding == 0 && c.out.is_empty() {
            let reason = if framing_error {
                CloseReason::Framing
            } else {
                CloseReason::Normal
            };
            self.close_client(slot, reason, poller, stats);
        } else {
            self.sync_client(slot, poller, stats);
        }
        n
    }

    fn sync_client(&mut self, slot: u16, poller: &mut dyn Poller, stats: &mut IoStats) {
        let c = &mut self.conns[usize::from(slot)];
        let Some(stream) = &c.stream else {
            return;
        };
        let mut want = 0;
        if !c.eof && c.outstanding < self.pipeline {
            want |= READ;
        }
        if c.write_blocked {
            want |= WRITE;
        }
        let tok = token(KIND_CLIENT, c.gen_, slot);
        if poller
            .sync(stream.as_raw_fd(), tok, want, &mut c.state)
            .is_err()
        {
            self.close_client(slot, CloseReason::Normal, poller, stats);
        }
    }

    fn close_client(
        &mut self,
        slot: u16,
        reason: CloseReason,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
    ) {
        let c = &mut self.conns[usize::from(slot)];
        let Some(stream) = c.stream.take() else {
            return;
        };
        poller.forget(
            stream.as_raw_fd(),
            token(KIND_CLIENT, c.gen_, slot),
            &mut c.state,
        );
        // Shut down explicitly: an io_uring poll still armed holds a reference to the socket
        // until its cancel is submitted, so dropping the descriptor alone may not close it yet.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        drop(stream);
        self.closed.push(conn_id(c.gen_, slot));
        c.gen_ = 0;
        // Keep a small buffer for the next connection; give back what a large frame grew.
        c.dec.release();
        c.out.release();
        c.state = 0;
        let source = c.peer.ip().to_canonical();
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
        self.unlink(slot);
        self.free.push(slot);
        self.live -= 1;
        stats.tcp_closed += 1;
        match reason {
            CloseReason::Idle => stats.tcp_idle_closed += 1,
            CloseReason::Overflow => stats.tcp_out_overflow += 1,
            CloseReason::Evicted => stats.tcp_evicted += 1,
            CloseReason::Normal | CloseReason::Framing => {}
        }
    }

    /// Writes the pending output of `slot`; false if the connection was closed.
    fn write_client(
        &mut self,
        slot: u16,
        now: Instant,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
    ) -> bool {
        let c = &mut self.conns[usize::from(slot)];
        let Some(stream) = c.stream.as_mut() else {
            return false;
        };
        match write_out(stream, &mut c.out) {
            Ok(progress) => {
                c.write_blocked = !c.out.is_empty();
                if progress {
                    self.touch(slot, now, true);
                }
                let c = &self.conns[usize::from(slot)];
                if c.eof && c.outstanding == 0 && c.out.is_empty() {
                    self.close_client(slot, CloseReason::Normal, poller, stats);
                    return false;
                }
                self.sync_client(slot, poller, stats);
                true
            }
            Err(_) => {
                self.close_client(slot, CloseReason::Normal, poller, stats);
                false
            }
        }
    }

    /// Queues an answer on a client connection.
    pub(crate) fn send_client(
        &mut self,
        id: ConnId,
        data: &[u8],
        poller: &mut dyn Poller,
        stats: &mut IoStats,
    ) {
        let Some(slot) = self.live_slot(id) else {
            stats.tcp_send_stale += 1;
            stats.client_sends_dropped += 1;
            return;
        };
        let c = &mut self.conns[usize::from(slot)];
        let was_paused = c.outstanding >= self.pipeline;
        c.outstanding = c.outstanding.saturating_sub(1);
        match c.out.push_frame(data) {
            Ok(()) => stats.tcp_tx_messages += 1,
            Err(super::tcp::OutError::TooLong) => {
                stats.send_dropped += 1;
                stats.client_sends_dropped += 1;
                return;
            }
            Err(super::tcp::OutError::Overflow) => {
                stats.client_sends_dropped += 1;
                self.close_client(slot, CloseReason::Overflow, poller, stats);
                return;
            }
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
        if was_paused && c.outstanding < self.pipeline {
            self.resume.push(id);
        }
    }

    /// Queues a message for upstream server `i`, connecting first if needed.
    pub(crate) fn send_upstream(
        &mut self,
        i: u16,
        data: &[u8],
        poller: &mut dyn Poller,
        stats: &mut IoStats,
    ) {
        let i = usize::from(i);
        let Some(u) = self.upstream.get(i) else {
            stats.upstream_tcp_dropped += 1;
            stats.upstream_sends_dropped += 1;
            return;
        };
        if u.stream.is_none() {
            match sockets::upstream_tcp(u.server) {
                Ok(stream) => {
                    let u = &mut self.upstream[i];
                    u.stream = Some(stream);
                    u.connecting = true;
                    u.dec.reset();
                    u.out.clear();
                    u.state = 0;
                    u.write_blocked = false;
                    self.sync_upstream(i, poller, stats);
                }
                Err(_) => {
                    stats.upstream_tcp_errors += 1;
                    stats.upstream_tcp_dropped += 1;
                    stats.upstream_sends_dropped += 1;
                    self.upstream_lost(i);
                    return;
                }
            }
        }
        match self.upstream[i].out.push_frame(data) {
            Ok(()) => stats.tcp_tx_messages += 1,
            Err(_) => {
                stats.upstream_tcp_dropped += 1;
                stats.upstream_sends_dropped += 1;
            }
        }
    }

    fn sync_upstream(&mut self, i: usize, poller: &mut dyn Poller, stats: &mut IoStats) {
        let u = &mut self.upstream[i];
        let Some(stream) = &u.stream else {
            return;
        };
        let want = if u.connecting {
            WRITE
        } else if u.write_blocked {
            READ | WRITE
        } else {
            READ
        };
        let tok = token(KIND_UPSTREAM, u.gen_, i as u16);
        if poller
            .sync(stream.as_raw_fd(), tok, want, &mut u.state)
            .is_err()
        {
            self.close_upstream(i, poller, stats);
        }
    }

    fn close_upstream(&mut self, i: usize, poller: &mut dyn Poller, stats: &mut IoStats) {
        let u = &mut self.upstream[i];
        let Some(stream) = u.stream.take() else {
            return;
        };
        poller.forget(
            stream.as_raw_fd(),
            token(KIND_UPSTREAM, u.gen_, i as u16),
            &mut u.state,
        );
        let _ = stream.shutdown(std::net::Shutdown::Both);
        stats.upstream_tcp_errors += u64::from(u.connecting || !u.out.is_empty());
        u.gen_ = u.gen_.wrapping_add(1) & 0xffff_ffff;
        u.connecting = false;
        u.dec.reset();
        u.out.clear();
        u.state = 0;
        // The core re-sends (once) or fails what it sent on it (review finding: those
        // queries waited for the upstream timeout).
        self.upstream_lost(i);
    }

    fn upstream_ready(
        &mut self,
        i: usize,
        ready: Interest,
        poller: &mut dyn Poller,
        stats: &mut IoStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let u = &mut self.upstream[i];
        if u.connecting {
            if ready & WRITE == 0 {
                self.sync_upstream(i, poller, stats);
                return 0;
            }
            let ok = matches!(u.stream.as_ref().map(TcpStream::take_error), Some(Ok(None)))
                && u.stream.as_ref().is_some_and(|s| s.peer_addr().is_ok());
            if !ok {
                stats.upstream_tcp_dropped += 1;
                stats.upstream_sends_dropped += 1;
                self.close_upstream(i, poller, stats);
                return 0;
            }
            u.connecting = false;
            stats.upstream_tcp_connects += 1;
            if self.write_upstream(i, poller, stats) {
                self.sync_upstream(i, poller, stats);
            }
            return 0;
        }
        if ready & WRITE != 0 && u.write_blocked && !self.write_upstream(i, poller, stats) {
            return 0;
        }
        let u = &mut self.upstream[i];
        let mut n = 0;
        if ready & READ != 0 {
            let Some(stream) = u.stream.as_mut() else {
                return 0;
            };
            // The upstream closing its side is as final as an error: nothing more will come.
            let mut broken = !matches!(fill(stream, &mut u.dec), Filled::Drained);
            loop {
                match u.dec.next_frame() {
                    Ok(Some(data)) => {
                        stats.tcp_rx_messages += 1;
                        on_event(Event::TcpUpstreamMessage {
                            server: i as u16,
                            data,
                        });
                        n += 1;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        stats.tcp_framing_errors += 1;
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                self.close_upstream(i, poller, stats);
                return n;
            }
        }
        self.sync_upstream(i, poller, stats);
        n
    }

    /// Writes upstream connection `i`'s output; false if the connection was closed.
    fn write_upstream(&mut self, i: usize, poller: &mut dyn Poller, stats: &mut IoStats) -> bool {
        let u = &mut self.upstream[i];
        let Some(stream) = u.stream.as_mut() else {
            return false;
        };
        match write_out(stream, &mut u.out) {
            Ok(_) => {
                u.write_blocked = !u.out.is_empty();
                true
            }
            Err(_) => {
                self.close_upstream(i, poller, stats);
                false
            }
        }
    }

    /// Writes all queued TCP output (one `write` per connection with output).
    pub(crate) fn flush(&mut self, now: Instant, poller: &mut dyn Poller, stats: &mut IoStats) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            let Some(slot) = self.live_slot(id) else {
                continue;
            };
            let c = &mut self.conns[usize::from(slot)];
            c.dirty = false;
            if !c.write_blocked {
                self.write_client(slot, now, poller, stats);
            }
        }
        dirty.clear();
        self.dirty = dirty;
        for i in 0..self.upstream.len() {
            let u = &self.upstream[i];
            if u.stream.is_some()
                && !u.connecting
                && !u.write_blocked
                && !u.out.is_empty()
                && self.write_upstream(i, poller, stats)
            {
                self.sync_upstream(i, poller, stats);
            }
        }
    }

    /// Closes client connections idle for longer than the timeout (checked a few times per
    /// timeout period).
    pub(crate) fn sweep(&mut self, now: Instant, poller: &mut dyn Poller, stats: &mut IoStats) {
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
            self.watch_listener(READ, poller);
        }
        if self.live == 0 || now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.sweep_interval();
        // The idle order is the order of last progress: stop at the first that is not idle.
        while self.oldest != NIL {
            let slot = self.oldest;
            if now.duration_since(self.conns[usize::from(slot)].last_progress) < self.idle {
                break;
            }
            self.close_client(slot, CloseReason::Idle, poller, stats);
        }
    }
}

/// (kind, low 32 bits of the generation, slot) of a token.
fn split(token: u64) -> (u64, u64, u16) {
    let token = token & TOKEN_MASK;
    (token >> 48, (token >> 16) & 0xffff_ffff, token as u16)
}

/// Writes as much of `out` as the socket takes; Ok(whether anything was written).
fn write_out(stream: &mut TcpStream, out: &mut OutBuf) -> io::Result<bool> {
    let mut progress = false;
    while !out.is_empty() {
        match stream.write(out.pending()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.consume(n);
                progress = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(progress)
}
