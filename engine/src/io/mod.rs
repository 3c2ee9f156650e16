//! The I/O shell of a shard: sockets, batched datagram I/O and DNS-over-TCP connections.
//!
//! # Design
//!
//! One [`Io`] per shard, owned and driven by the shard's thread; nothing in here is shared
//! between shards except the listen port, which every shard (and the standalone HA proxy, a
//! second process) binds with `SO_REUSEPORT` so that the kernel spreads clients over them.
//! Each shard has:
//!
//! - a UDP listen socket and a TCP listener on [`IoConfig::listen`];
//! - per upstream server of [`IoConfig::upstreams`], [`IoConfig::upstream_sockets`] UDP
//!   sockets bound to kernel-chosen (random) ephemeral ports and `connect()`ed to it (the
//!   kernel drops datagrams from any other source, and a port scan finds no open port),
//!   each replaced by a fresh one when the core asks ([`ShardIo::replace_upstream_udp`]:
//!   port rotation against off-path spoofing). Socket `k` belongs to server
//!   `k / upstream_sockets`: no port is ever shared by two servers;
//! - per upstream server, at most one pipelined TCP connection, opened lazily;
//! - one readiness source: an io_uring ([`uring`]) or an epoll instance ([`mmsg`]).
//!
//! The shard loop is: [`ShardIo::poll`] (which hands every ready message to a callback as an
//! [`Event`] borrowing the receive buffer), feed the events to the sans-IO core, queue the
//! core's output with the `send_*` methods, then [`ShardIo::flush`].
//!
//! ## Buffer ownership
//!
//! - Received data lives in buffers owned by the backend: with io_uring, the buffers of a
//!   provided buffer ring (one group for the listen socket, one shared by the upstream
//!   sockets), lent to the kernel and given back to the ring as soon as the callback for that
//!   datagram returns; with mmsg, one `recvmmsg` batch array reused for every call. An
//!   [`Event`] borrows that memory and cannot outlive the callback.
//! - TCP data lives in per-connection input buffers ([`tcp::FrameDecoder`]) and bounded output
//!   buffers ([`tcp::OutBuf`]); the slots are reused, with their capacity, when connections
//!   come and go.
//! - `send_*` copy the message: into a send slot (io_uring: the slot's payload and address stay
//!   untouched until the send's completion arrives) or into the per-socket send queue (mmsg). The caller's buffer is free as soon as `send_*` returns.
//!
//! Nothing on the per-packet path allocates once buffers have grown to their working size.
//!
//! ## What is batched
//!
//! - Receive: one multishot receive per UDP socket keeps delivering datagrams without any
//!   new submission (io_uring); one `recvmmsg` of up to [`IoConfig::batch`] datagrams per
//!   readable socket per poll (mmsg).
//! - Send: UDP sends are queued until [`ShardIo::flush`], which makes one `io_uring_enter` for
//!   all of them (io_uring) or one `sendmmsg` per socket (mmsg). TCP output is appended to the
//!   connection's output buffer and written with one `write` per connection at flush.
//! - Wait: one `io_uring_enter` (submit and wait, with a timeout) or one `epoll_wait` per poll.
//!
//! ## TCP
//!
//! Both backends share the nonblocking-socket TCP code in `tcp_conns`: accepts, reads and
//! writes are plain nonblocking syscalls, driven by epoll (mmsg) or by one-shot
//! `IORING_OP_POLL_ADD` requests (io_uring). DNS over TCP is a small part of the traffic; the
//! framing ([`tcp`]) is sans-IO and unit-tested on its own.
//!
//! Client connections are bounded per source address ([`IoConfig::max_tcp_conns_per_source`])
//! and in number ([`IoConfig::max_tcp_conns`]: at the limit the connection longest without
//! progress is evicted); progress is a complete frame or written output, so trickled bytes do
//! not keep a connection alive. A [`ConnId`] is never reused, so an answer owed to a closed
//! connection is dropped, never delivered to the next one in its slot. A frame that cannot be
//! a query ends the input; what was asked before it is answered, then the connection closes.
//!
//! ## Counters
//!
//! [`IoStats`] counts what the I/O layer did and dropped; the shard reads it with
//! [`ShardIo::stats`] and publishes it.

pub mod mmsg;
pub mod sockets;
mod sys;
pub mod tcp;
mod tcp_conns;
pub mod uring;

use std::net::SocketAddr;
use std::time::Duration;

pub use mmsg::MmsgIo;
pub use sys::raise_fd_limit;
pub use uring::UringIo;

/// Identifies one TCP client connection of a shard: its slot (low 16 bits) and a generation
/// drawn from a 48-bit per-shard counter (never reused within the life of a process in any
/// realistic time). Ids of closed connections are recognised and ignored: an answer owed to a
/// closed connection is dropped (counted in [`IoStats::tcp_send_stale`]), never delivered to a
/// later connection in the same slot.
pub type ConnId = u64;

/// The connection slot `conn` names (`0..max_tcp_conns`): the ids of one slot differ in
/// their generation only, so a table per slot holding the id it was filled for is never
/// mistaken for a later connection's.
pub fn conn_slot(conn: ConnId) -> usize {
    (conn & 0xffff) as usize
}

/// One thing that happened on the shard's sockets. Data borrows the backend's receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A datagram from a client on the listen socket.
    ClientDatagram {
        /// The client's address (and port).
        peer: SocketAddr,
        /// The datagram's payload.
        data: &'a [u8],
    },
    /// A datagram on upstream UDP socket `socket` (sockets are `connect()`ed to their
    /// server, each with a random ephemeral source port).
    UpstreamDatagram {
        /// Index of the upstream socket, `0..upstreams.len() * upstream_sockets`.
        socket: u16,
        /// The source address (always the socket's server: it is connected).
        from: SocketAddr,
        /// The datagram's payload.
        data: &'a [u8],
    },
    /// Upstream UDP socket `socket` reported that the upstream is unreachable (an ICMP port or
    /// host unreachable turned into `ECONNREFUSED`/`EHOSTUNREACH`/`ENETUNREACH` on the
    /// connected socket, by a receive or a send).
    UpstreamUnreachable {
        /// Index of the upstream socket.
        socket: u16,
    },
    /// One complete DNS message from a TCP client (2-byte length prefix already stripped).
    TcpClientMessage {
        /// The connection it came on; answer with [`ShardIo::send_client_tcp`].
        conn: ConnId,
        /// The client's address.
        peer: SocketAddr,
        /// The message, at least 12 bytes (a DNS header) with the QR bit clear.
        data: &'a [u8],
    },
    /// One complete DNS message from an upstream server over TCP.
    TcpUpstreamMessage {
        /// The server's index in [`IoConfig::upstreams`].
        server: u16,
        /// The message, at least 12 bytes (a DNS header).
        data: &'a [u8],
    },
    /// The shard's TCP connection to upstream server `server` closed (by the server, an
    /// error, a framing error) or could not be opened: whatever was sent on it and not
    /// answered will not be. Delivered once per connection lost.
    TcpUpstreamClosed {
        /// The server's index in [`IoConfig::upstreams`].
        server: u16,
    },
    /// A TCP client connection went away (closed, idle timeout, framing error, evicted).
    TcpClientClosed {
        /// The connection; its id is never reused (see [`ConnId`]).
        conn: ConnId,
    },
}

/// Configuration of one shard's I/O.
#[derive(Debug, Clone)]
pub struct IoConfig {
    /// Address of the UDP listen socket and the TCP listener (port 0: a kernel-chosen port,
    /// the same for UDP and TCP; see [`ShardIo::local_addr`]).
    pub listen: SocketAddr,
    /// The upstream servers (at least one; at most [`MAX_UPSTREAMS`]).
    pub upstreams: Vec<SocketAddr>,
    /// Connected UDP sockets per upstream server (each with its own random source port).
    pub upstream_sockets: u16,
    /// Datagrams per `recvmmsg` (mmsg) and the scale of the per-poll budget.
    pub batch: usize,
    /// Largest UDP payload received or sent; larger datagrams are dropped and counted.
    pub max_udp_payload: usize,
    /// Whether to open the TCP listener.
    pub tcp: bool,
    /// A TCP client connection with no complete message (and nothing written) for this long is
    /// closed, so a client that stops mid-frame is closed after it.
    pub tcp_idle_timeout: Duration,
    /// TCP client connections per shard; at the limit, a new connection evicts the one that
    /// has gone longest without progress (counted in [`IoStats::tcp_evicted`]).
    pub max_tcp_conns: usize,
    /// TCP client connections per source address per shard; over it, a new connection from
    /// that address is accepted and closed at once (counted in
    /// [`IoStats::tcp_source_limit_rejected`]).
    pub max_tcp_conns_per_source: usize,
    /// Queries of one TCP connection delivered and not yet answered; at the limit the
    /// connection is not read until answers go out.
    pub max_tcp_pipeline: usize,
    /// Largest DNS message accepted over TCP (at most 65535); longer frames close the
    /// connection (framing error).
    pub max_tcp_message: usize,
    /// Bytes of unsent output per TCP client connection; a client that does not read and
    /// goes over it is closed (counted in [`IoStats::tcp_out_overflow`]).
    pub max_tcp_out_bytes: usize,
    /// Bytes queued for the upstream TCP connection (also while it connects); messages over it
    /// are dropped (counted in [`IoStats::upstream_tcp_dropped`]).
    pub max_upstream_tcp_queue: usize,
    /// `SO_RCVBUF` asked for on every UDP socket (best effort).
    pub recv_buffer_bytes: usize,
    /// `SO_SNDBUF` asked for on every UDP socket (best effort).
    pub send_buffer_bytes: usize,
    /// `SO_RCVBUF` and `SO_SNDBUF` of the TCP listener, inherited by every client connection
    /// (the kernel doubles them): bounds the kernel memory a connection can hold.
    pub tcp_socket_buffer_bytes: usize,
    /// UDP sends that may be queued between flushes (mmsg: per socket, flushed early when
    /// full; io_uring: send slots in flight, reclaimed early from sends already finished
    /// when all are taken, and beyond that further sends dropped and counted).
    pub send_queue: usize,
    /// io_uring submission queue size (the completion queue is 4 times larger); raised to
    /// the power of two that holds every socket's receive and two more.
    pub uring_entries: u32,
    /// Provided receive buffers per buffer group (a power of two, at most 32768).
    pub uring_recv_buffers: u16,
    /// Completion coalescing (io_uring backend): a wait that finds nothing to do sleeps until
    /// `coalesce_batch` completions have arrived or this much time has passed, whichever comes
    /// first (then it returns with what arrived, or keeps waiting for the first one). One
    /// wake-up then serves several datagrams at moderate load, for at most this much added
    /// latency. Zero: off (wake on every completion).
    pub coalesce_wait: Duration,
    /// Completions a coalescing wait asks for (at least 2 for coalescing to matter).
    pub coalesce_batch: u32,
}

impl IoConfig {
    /// A configuration with the defaults for everything but the two addresses.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstreams: vec![upstream],
            upstream_sockets: 4,
            batch: 64,
            max_udp_payload: 4096,
            tcp: true,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_conns: 1024,
            max_tcp_conns_per_source: 64,
            max_tcp_pipeline: 32,
            max_tcp_message: 65535,
            max_tcp_out_bytes: 128 * 1024,
            max_upstream_tcp_queue: 1024 * 1024,
            recv_buffer_bytes: 8 * 1024 * 1024,
            send_buffer_bytes: 8 * 1024 * 1024,
            tcp_socket_buffer_bytes: 64 * 1024,
            send_queue: 1024,
            uring_entries: 1024,
            uring_recv_buffers: 512,
            coalesce_wait: Duration::ZERO,
            coalesce_batch: 16,
        }
    }

    fn validate(&self) -> Result<(), IoError> {
        let bad = |what| Err(IoError::InvalidConfig(what));
        if self.upstream_sockets == 0 {
            return bad("upstream_sockets must be at least 1");
        }
        if self.upstreams.is_empty() || self.upstreams.len() > MAX_UPSTREAMS {
            return bad("upstreams: from 1 to MAX_UPSTREAMS servers");
        }
        if self.upstreams.len() * usize::from(self.upstream_sockets) > MAX_UPSTREAM_SOCKETS {
            return bad("upstreams × upstream_sockets must be at most MAX_UPSTREAM_SOCKETS");
        }
        if self.coalesce_wait > Duration::from_secs(1) {
            return bad("coalesce_wait must be at most 1 s");
        }
        if self.coalesce_batch < 2 || self.coalesce_batch > 1024 {
            return bad("coalesce_batch must be in 2..=1024");
        }
        if self.batch == 0 || self.batch > 1024 {
            return bad("batch must be in 1..=1024");
        }
        if self.max_udp_payload < 512 || self.max_udp_payload > 65535 {
            return bad("max_udp_payload must be in 512..=65535");
        }
        if self.max_tcp_conns > 65535 {
            return bad("max_tcp_conns must be at most 65535");
        }
        if self.max_tcp_conns_per_source == 0 {
            return bad("max_tcp_conns_per_source must be at least 1");
        }

        if self.max_tcp_pipeline == 0 {
            return bad("max_tcp_pipeline must be at least 1");
        }
        if self.max_tcp_message < 12 || self.max_tcp_message > 65535 {
            return bad("max_tcp_message must be in 12..=65535");
        }
        if self.send_queue == 0 || self.send_queue > 65535 {
            return bad("send_queue must be in 1..=65535");
        }
        if !self.uring_recv_buffers.is_power_of_two() || self.uring_recv_buffers > 32768 {
            return bad("uring_recv_buffers must be a power of two, at most 32768");
        }
        if self.uring_entries < 8
            || self.uring_entries > 16384
            || !self.uring_entries.is_power_of_two()
        {
            return bad("uring_entries must be a power of two in 8..=16384");
        }
        Ok(())
    }
}

/// The I/O backend a shard runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring: multishot receives into provided buffer rings, batched send submissions.
    Uring,
    /// epoll with `recvmmsg`/`sendmmsg`.
    Mmsg,
}

/// Which backend [`open`] should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring unless the kernel or a seccomp filter refuses it (`EPERM`, `ENOSYS`,
    /// `EACCES` from `io_uring_setup`), then mmsg.
    Auto,
    /// io_uring or an error.
    Uring,
    /// epoll with `recvmmsg`/`sendmmsg`.
    Mmsg,
}

/// Errors of the I/O layer.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The listen address is held by a socket without `SO_REUSEPORT` (another DNS server).
    #[error(
        "listen address {addr}/{proto} is in use by a socket that does not share it (no SO_REUSEPORT): is another DNS server running?"
    )]
    ListenAddrInUse {
        /// The address asked for.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
    },
    /// Creating, configuring, binding or connecting a socket failed.
    #[error("{op} {addr}: {source}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// io_uring is refused here (`EPERM`/`ENOSYS`/`EACCES`: old kernel, seccomp, sysctl).
    #[error("io_uring is not available: {0}")]
    UringRefused(std::io::Error),
    /// Setting up the io_uring (ring, buffer rings) failed for another reason.
    #[error("io_uring setup ({op}): {source}")]
    UringSetup {
        /// What was being set up.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// epoll setup or waiting (`epoll_wait`, `io_uring_enter`) failed.
    #[error("{op}: {source}")]
    Poll {
        /// The failing call.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid I/O configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Counters of one shard's I/O. Plain `u64`s owned by the shard: read them, sum them, publish.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoStats {
    /// Datagrams received (client and upstream).
    pub udp_rx: u64,
    /// Datagrams handed to the kernel for sending.
    pub udp_tx: u64,
    /// Receive batches: `recvmmsg` calls that returned data (mmsg) or completion-queue reaps
    /// that delivered datagrams (io_uring).
    pub udp_rx_batches: u64,
    /// Send batches: `sendmmsg` calls (mmsg) or `io_uring_enter` calls that submitted sends
    /// (io_uring).
    pub udp_tx_batches: u64,
    /// Received datagrams dropped because they were larger than the buffer.
    pub udp_rx_truncated: u64,
    /// Receive errors (e.g. `ECONNREFUSED` from an ICMP error on an upstream socket).
    pub udp_rx_errors: u64,
    /// Sends the kernel rejected.
    pub send_errors: u64,
    /// Sends dropped before the kernel: queue full, socket buffer full, message too large.
    pub send_dropped: u64,
    /// Messages to clients dropped (queue or socket buffer full, too large, send error,
    /// closed TCP connection): every drop of an answer, whatever counter above also has it.
    pub client_sends_dropped: u64,
    /// Messages to the upstream dropped (UDP or TCP), likewise.
    pub upstream_sends_dropped: u64,
    /// Upstream UDP sockets closed and replaced by a fresh one (new random port).
    pub upstream_sockets_replaced: u64,
    /// Multishot receives re-armed after the kernel ended them.
    pub uring_rearms: u64,
    /// Multishot receives ended because the buffer ring was empty (`ENOBUFS`).
    pub uring_enobufs: u64,
    /// Times the kernel reported completions it could not keep (`EBADR` from
    /// `io_uring_enter`); every receive was then cancelled and armed again.
    pub uring_lost_completions: u64,
    /// `poll` calls that waited (`epoll_wait` / `io_uring_enter` with wait).
    pub waits: u64,
    /// Waits that coalesced completions ([`IoConfig::coalesce_wait`]).
    pub coalesced_waits: u64,
    /// TCP client connections accepted and kept.
    pub tcp_accepted: u64,
    /// TCP client connections closed (all reasons, not counting limit rejections).
    pub tcp_closed: u64,
    /// TCP client connections accepted and closed at once because `max_tcp_conns` is 0.
    pub tcp_limit_rejected: u64,
    /// Accepts that failed for want of a file descriptor (`EMFILE`, `ENFILE`): each closed
    /// the client connection longest without progress, or refused the new one.
    pub tcp_no_descriptor: u64,
    /// TCP client connections accepted and closed at once: their source address already had
    /// `max_tcp_conns_per_source` connections.
    pub tcp_source_limit_rejected: u64,
    /// TCP client connections closed to make room for a new one at `max_tcp_conns` (the one
    /// longest without progress).
    pub tcp_evicted: u64,
    /// TCP client connections ended by a frame that cannot be a query: a length below 12 or
    /// above the limit, or the QR bit set (closed once earlier queries are answered).
    pub tcp_framing_errors: u64,
    /// TCP client connections closed by the idle timeout.
    pub tcp_idle_closed: u64,
    /// TCP client connections closed because their output buffer overflowed.
    pub tcp_out_overflow: u64,
    /// Complete DNS messages received over TCP (clients and upstream).
    pub tcp_rx_messages: u64,
    /// DNS messages queued for sending over TCP (clients and upstream).
    pub tcp_tx_messages: u64,
    /// TCP sends to closed or unknown connections, dropped.
    pub tcp_send_stale: u64,
    /// Upstream TCP connections established.
    pub upstream_tcp_connects: u64,
    /// Upstream TCP connections that failed or broke.
    pub upstream_tcp_errors: u64,
    /// Messages for the upstream TCP connection dropped (queue full or connect failed).
    pub upstream_tcp_dropped: u64,
}

/// The operations a shard loop needs from its I/O backend.
pub trait ShardIo {
    /// Waits up to `timeout` (None = block) until something is ready, then delivers everything
    /// ready (bounded by a per-call budget) to `on_event`. Returns the number of events.
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, IoError>;
    /// Queues (copies) a datagram to a client, sent from the listen socket at flush.
    fn send_client_udp(&mut self, peer: SocketAddr, data: &[u8]);
    /// Queues a message to a TCP client (adds the length prefix); dropped if the connection
    /// is gone. Also counts the message as answered for the pipeline limit.
    fn send_client_tcp(&mut self, conn: ConnId, data: &[u8]);
    /// Queues a datagram on upstream socket `socket` (to its server).
    fn send_upstream_udp(&mut self, socket: u16, data: &[u8]);
    /// Queues a message on the shard's pipelined TCP connection to upstream server `server`
    /// (its index), connecting it if needed; messages sent before it is up are queued
    /// (bounded).
    fn send_upstream_tcp(&mut self, server: u16, data: &[u8]);
    /// Submits all queued sends in as few syscalls as possible.
    fn flush(&mut self) -> Result<(), IoError>;
    /// The backend in use.
    fn backend(&self) -> Backend;
    /// The counters.
    fn stats(&self) -> &IoStats;
    /// The bound listen address (with the kernel-chosen port when `listen` had port 0).
    fn local_addr(&self) -> SocketAddr;
    /// The local address of upstream UDP socket `socket`.
    fn upstream_local_addr(&self, socket: u16) -> Option<SocketAddr>;
    /// The listen sockets (UDP, and the TCP listener when there is one), for the steering
    /// of the shared port ([`crate::shard::Steering`]).
    fn listen_fds(&self) -> ListenFds<'_>;
    /// Takes the UDP listen socket out of the kernel's choice for new datagrams without
    /// closing it (no eBPF steering: `connect()`s it to itself, and the kernel's
    /// `SO_REUSEPORT` selection skips connected sockets); what its queue holds can still be
    /// read and answered. Best effort: an error leaves it as it was.
    fn retire_listen_udp(&mut self);
    /// Closes upstream UDP socket `socket` and puts a fresh one in its place (same index, new
    /// kernel-chosen random port, connected to the upstream). Sends queued for it and not yet
    /// flushed go from the new socket; answers to the old port are lost. On error the old
    /// socket stays.
    fn replace_upstream_udp(&mut self, socket: u16) -> Result<(), IoError>;
}

/// A shard's listen sockets, borrowed from its I/O.
#[derive(Debug, Clone, Copy)]
pub struct ListenFds<'a> {
    /// The UDP listen socket.
    pub udp: std::os::fd::BorrowedFd<'a>,
    /// The TCP listener, when TCP is on.
    pub tcp: Option<std::os::fd::BorrowedFd<'a>>,
    /// The bound address.
    pub addr: SocketAddr,
}

/// Most upstream servers of a shard.
pub const MAX_UPSTREAMS: usize = 64;

/// Most upstream UDP sockets of a shard, all servers together.
pub const MAX_UPSTREAM_SOCKETS: usize = 1024;

/// The server of each upstream UDP socket: `upstream_sockets` for each server, in order.
pub(crate) fn socket_servers(config: &IoConfig) -> Vec<SocketAddr> {
    config
        .upstreams
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, usize::from(config.upstream_sockets)))
        .collect()
}

/// Whether a socket error on a connected upstream UDP socket is an ICMP unreachable.
pub(crate) fn is_unreachable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// A shard's I/O, whichever backend: enum dispatch, no virtual calls.
pub enum Io {
    /// io_uring backend.
    Uring(Box<UringIo>),
    /// epoll + mmsg backend.
    Mmsg(Box<MmsgIo>),
}

/// A shard's I/O may be opened on one thread and moved to the shard's thread. (io_uring: the
/// thread that first polls or flushes becomes the ring's only submitter; see [`uring`].)
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Io>();
};

macro_rules! dispatch {
    ($self:ident, $io:ident => $e:expr) => {
        match $self {
            Io::Uring($io) => $e,
            Io::Mmsg($io) => $e,
        }
    };
}

impl ShardIo for Io {
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, IoError> {
        dispatch!(self, io => io.poll(timeout, on_event))
    }
    fn send_client_udp(&mut self, peer: SocketAddr, data: &[u8]) {
        dispatch!(self, io => io.send_client_udp(peer, data))
    }
    fn send_client_tcp(&mut self, conn: ConnId, data: &[u8]) {
        dispatch!(self, io => io.send_client_tcp(conn, data))
    }
    fn send_upstream_udp(&mut self, socket: u16, data: &[u8]) {
        dispatch!(self, io => io.send_upstream_udp(socket, data))
    }
    fn send_upstream_tcp(&mut self, server: u16, data: &[u8]) {
        dispatch!(self, io => io.send_upstream_tcp(server, data))
    }
    fn flush(&mut self) -> Result<(), IoError> {
        dispatch!(self, io => io.flush())
    }
    fn backend(&self) -> Backend {
        dispatch!(self, io => io.backend())
    }
    fn stats(&self) -> &IoStats {
        dispatch!(self, io => io.stats())
    }
    fn local_addr(&self) -> SocketAddr {
        dispatch!(self, io => io.local_addr())
    }
    fn upstream_local_addr(&self, socket: u16) -> Option<SocketAddr> {
        dispatch!(self, io => io.upstream_local_addr(socket))
    }
    fn replace_upstream_udp(&mut self, socket: u16) -> Result<(), IoError> {
        dispatch!(self, io => io.replace_upstream_udp(socket))
    }
    fn listen_fds(&self) -> ListenFds<'_> {
        dispatch!(self, io => io.listen_fds())
    }
    fn retire_listen_udp(&mut self) {
        dispatch!(self, io => io.retire_listen_udp())
    }
}

/// Checks whether io_uring may be used: sets up (and drops) a tiny ring.
pub type UringProbe = fn() -> std::io::Result<()>;

/// The real probe: `io_uring_setup` of a two-entry ring.
pub fn probe_uring() -> std::io::Result<()> {
    io_uring::IoUring::new(2).map(drop)
}

/// Opens a shard's sockets and backend. With [`BackendChoice::Auto`], io_uring unless it is
/// refused, then mmsg; [`ShardIo::backend`] says which.
pub fn open(config: &IoConfig, choice: BackendChoice) -> Result<Io, IoError> {
    open_with_probe(config, choice, probe_uring)
}

/// [`open`] with the io_uring availability probe supplied, so that tests can simulate a
/// kernel or seccomp filter that refuses io_uring.
pub fn open_with_probe(
    config: &IoConfig,
    choice: BackendChoice,
    probe: UringProbe,
) -> Result<Io, IoError> {
    config.validate()?;
    match choice {
        BackendChoice::Mmsg => Ok(Io::Mmsg(Box::new(MmsgIo::new(config)?))),
        BackendChoice::Uring => {
            probe().map_err(uring_error)?;
            Ok(Io::Uring(Box::new(UringIo::new(config)?)))
        }
        BackendChoice::Auto => {
            let refused = match probe() {
                Err(e) if is_refusal(&e) => true,
                Err(e) => return Err(uring_error(e)),
                Ok(()) => false,
            };
            if refused {
                return Ok(Io::Mmsg(Box::new(MmsgIo::new(config)?)));
            }
            match UringIo::new(config) {
                Ok(io) => Ok(Io::Uring(Box::new(io))),
                Err(IoError::UringRefused(_)) => Ok(Io::Mmsg(Box::new(MmsgIo::new(config)?))),
                Err(e) => Err(e),
            }
        }
    }
}

/// Whether an `io_uring_setup` error means "not allowed / not there" (fall back to mmsg).
fn is_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::ENOSYS | libc::EACCES)
    )
}

fn uring_error(e: std::io::Error) -> IoError {
    if is_refusal(&e) {
        IoError::UringRefused(e)
    } else {
        IoError::UringSetup {
            op: "io_uring_setup",
            source: e,
        }
    }
}
