//! The portable backend: epoll over all sockets, `recvmmsg` batches per readable UDP socket,
//! one `sendmmsg` per socket at flush. Used where io_uring is refused (e.g. the default
//! container seccomp profile) or asked for with `--io mmsg`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::sockets::{self, BufferSizes, RawSockAddr};
use super::sys::{self, Epoll, Interest};
use super::tcp_conns::{Poller, TOKEN_MASK, TcpSide};
use super::{Backend, ConnId, Event, IoConfig, IoError, IoStats, ShardIo};

/// Token of the UDP listen socket; upstream socket `i` is `TOKEN_UPSTREAM + i`. TCP tokens
/// (from `tcp_conns`) have zero in the top 8 bits.
const TOKEN_LISTEN: u64 = 1 << 56;
const TOKEN_UPSTREAM: u64 = 2 << 56;

/// Receive scratch: `batch` datagram buffers and the headers pointing into them.
struct RxBatch {
    data: Vec<u8>,
    slot: usize,
    addrs: Vec<RawSockAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` only ever point into `data`, `addrs` and
// `iovs` of the same value (heap memory that moves with it); they are rewritten before every
// use and never shared, so moving the whole to another thread is sound.
unsafe impl Send for RxBatch {}

impl RxBatch {
    fn new(batch: usize, slot: usize) -> Self {
        Self {
            data: vec![0; batch * slot],
            slot,
            addrs: vec![RawSockAddr::zeroed(); batch],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            hdrs: (0..batch)
                .map(|_| libc::mmsghdr {
                    msg_hdr: sys::zeroed_msghdr(),
                    msg_len: 0,
                })
                .collect(),
        }
    }

    /// One `recvmmsg` into the batch; returns the number of datagrams.
    fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        let base = self.data.as_mut_ptr();
        for (i, ((iov, addr), hdr)) in self
            .iovs
            .iter_mut()
            .zip(self.addrs.iter_mut())
            .zip(self.hdrs.iter_mut())
            .enumerate()
        {
            // `wrapping_add` keeps this safe code; `i * slot` is within `data`.
            iov.iov_base = base.wrapping_add(i * self.slot).cast();
            iov.iov_len = self.slot;
            hdr.msg_hdr.msg_name = addr.as_mut_ptr();
            hdr.msg_hdr.msg_namelen = RawSockAddr::CAPACITY;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        // SAFETY: every header was just pointed at its own address slot and iovec, and each
        // iovec at its own `slot`-sized part of `data`; all of it is owned by `self`, which is
        // borrowed mutably for the call, so nothing else touches it.
        unsafe { sys::recvmmsg(socket.as_raw_fd(), &mut self.hdrs) }
    }

    /// Datagram `i` of the last `recv`: (source, payload), or None if truncated/unaddressed.
    fn get(&self, i: usize) -> Result<(SocketAddr, &[u8]), ()> {
        let hdr = &self.hdrs[i];
        if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(());
        }
        let from = self.addrs[i].get(hdr.msg_hdr.msg_namelen).ok_or(())?;
        let len = (hdr.msg_len as usize).min(self.slot);
        Ok((from, &self.data[i * self.slot..i * self.slot + len]))
    }
}

/// Datagrams queued for one socket until flush: payloads back to back in `data`.
struct TxQueue {
    data: Vec<u8>,
    /// (destination, its length (0: connected socket), offset in `data`, length).
    msgs: Vec<(RawSockAddr, libc::socklen_t, usize, usize)>,
}

/// Send scratch: headers and iovecs built at flush.
struct TxScratch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the pointers in the scratch arrays are rebuilt before every `sendmmsg` and point
// only into the queue being flushed, which is borrowed for the call; nothing is shared.
unsafe impl Send for TxScratch {}

/// The epoll + `recvmmsg`/`sendmmsg` backend.
pub struct MmsgIo {
    epoll: Epoll,
    events: Vec<libc::epoll_event>,
    listen: UdpSocket,
    local: SocketAddr,
    upstream: Vec<UdpSocket>,
    /// The server of each upstream socket and the socket buffer sizes, for replacement
    /// sockets.
    upstream_addr: Vec<SocketAddr>,
    sizes: BufferSizes,
    /// Upstream sockets whose send reported the upstream unreachable (the error is consumed
    /// by the send, so the next poll reports it).
    unreachable: Vec<u16>,
    rx: RxBatch,
    /// Index 0: the listen socket; `1 + i`: upstream socket `i`.
    tx: Vec<TxQueue>,
    scratch: TxScratch,
    send_queue: usize,
    max_payload: usize,
    tcp: TcpSide,
    stats: IoStats,
}

/// epoll as the TCP side's poller.
struct EpollPoller<'a>(&'a Epoll);

impl Poller for EpollPoller<'_> {
    fn sync(
        &mut self,
        fd: std::os::fd::RawFd,
        token: u64,
        want: Interest,
        state: &mut Interest,
    ) -> std::io::Result<()> {
        self.0.sync(fd, token, want, state)
    }

    fn forget(&mut self, fd: std::os::fd::RawFd, token: u64, state: &mut Interest) {
        // Closing the descriptor removes it from the epoll set, but delete explicitly so that
        // no event of it is pending in a later wait.
        let _ = self.0.sync(fd, token, 0, state);
    }
}

impl MmsgIo {
    /// Opens the sockets and the epoll instance.
    pub fn new(config: &IoConfig) -> Result<Self, IoError> {
        config.validate()?;
        let sizes = BufferSizes {
            recv: config.recv_buffer_bytes,
            send: config.send_buffer_bytes,
        };
        let tcp_sizes = BufferSizes {
            recv: config.tcp_socket_buffer_bytes,
            send: config.tcp_socket_buffer_bytes,
        };
        let listen = sockets::bind_listen(config.listen, config.tcp, sizes, tcp_sizes)?;
        let servers = super::socket_servers(config);
        let upstream = servers
            .iter()
            .map(|&server| sockets::upstream_udp(server, sizes))
            .collect::<Result<Vec<_>, _>>()?;
        let poll_err = |op| move |source| IoError::Poll { op, source };
        let epoll = Epoll::new().map_err(poll_err("epoll_create1"))?;
        let mut state = 0;
        epoll
            .sync(listen.udp.as_raw_fd(), TOKEN_LISTEN, sys::READ, &mut state)
            .map_err(poll_err("epoll_ctl"))?;
        for (i, s) in upstream.iter().enumerate() {
            let mut state = 0;
            epoll
                .sync(
                    s.as_raw_fd(),
                    TOKEN_UPSTREAM + i as u64,
                    sys::READ,
                    &mut state,
                )
                .map_err(poll_err("epoll_ctl"))?;
        }
        let mut tcp = TcpSide::new(config, listen.tcp);
        tcp.start(&mut EpollPoller(&epoll))
            .map_err(poll_err("epoll_ctl"))?;
        let queues = 1 + upstream.len();
        Ok(Self {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            listen: listen.udp,
            local: listen.addr,
            unreachable: Vec::with_capacity(upstream.len()),
            upstream,
            upstream_addr: servers,
            sizes,
            rx: RxBatch::new(config.batch, config.max_udp_payload),
            tx: (0..queues)
                .map(|_| TxQueue {
                    data: Vec::new(),
                    msgs: Vec::with_capacity(config.send_queue),
                })
                .collect(),
            scratch: TxScratch {
                iovs: Vec::with_capacity(config.send_queue),
                hdrs: Vec::with_capacity(config.send_queue),
            },
            send_queue: config.send_queue,
            max_payload: config.max_udp_payload,
            tcp,
            stats: IoStats::default(),
        })
    }

    /// Receives one batch from UDP socket `which` (None: listen) and delivers it.
    fn recv_udp(&mut self, which: Option<u16>, on_event: &mut dyn FnMut(Event<'_>)) -> usize {
        let socket = match which {
            None => &self.listen,
            Some(i) => &self.upstream[usize::from(i)],
        };
        let n = match self.rx.recv(socket) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return 0,
            Err(e) => {
                // e.g. ECONNREFUSED on an upstream socket after an ICMP error.
                self.stats.udp_rx_errors += 1;
                if let (Some(socket), true) = (which, super::is_unreachable(&e)) {
                    on_event(Event::UpstreamUnreachable { socket });
                    return 1;
                }
                return 0;
            }
        };
        self.stats.udp_rx_batches += 1;
        let mut delivered = 0;
        for i in 0..n {
            let Ok((from, data)) = self.rx.get(i) else {
                self.stats.udp_rx_truncated += 1;
                continue;
            };
            self.stats.udp_rx += 1;
            delivered += 1;
            on_event(match which {
                None => Event::ClientDatagram { peer: from, data },
                Some(socket) => Event::UpstreamDatagram { socket, from, data },
            });
        }
        delivered
    }

    /// Counts `n` datagrams of queue `q` (0: clients, else upstream) dropped.
    fn dropped(&mut self, q: usize, n: u64) {
        self.stats.send_dropped += n;
        if q == 0 {
            self.stats.client_sends_dropped += n;
        } else {
            self.stats.upstream_sends_dropped += n;
        }
    }

    fn queue(&mut self, q: usize, to: Option<SocketAddr>, data: &[u8]) {
        if data.len() > self.max_payload {
            self.dropped(q, 1);
            return;
        }
        if self.tx[q].msgs.len() >= self.send_queue {
            self.flush_queue(q);
        }
        let mut addr = RawSockAddr::zeroed();
        let addr_len = to.map_or(0, |to| addr.set(to));
        let tx = &mut self.tx[q];
        let off = tx.data.len();
        tx.data.extend_from_slice(data);
        tx.msgs.push((addr, addr_len, off, data.len()));
    }

    /// `sendmmsg` everything queued for socket `q`; datagrams the kernel will not take now
    /// (socket buffer full) are dropped and counted.
    fn flush_queue(&mut self, q: usize) {
        let fd = if q == 0 {
            self.listen.as_raw_fd()
        } else {
            self.upstream[q - 1].as_raw_fd()
        };
        let TxQueue { data, msgs } = &mut self.tx[q];
        if msgs.is_empty() {
            return;
        }
        let TxScratch { iovs, hdrs } = &mut self.scratch;
        iovs.clear();
        hdrs.clear();
        let base = data.as_mut_ptr();
        for &(_, _, off, len) in msgs.iter() {
            iovs.push(libc::iovec {
                iov_base: base.wrapping_add(off).cast(),
                iov_len: len,
            });
        }
        for (i, (addr, addr_len, _, _)) in msgs.iter_mut().enumerate() {
            let mut hdr = sys::zeroed_msghdr();
            if *addr_len != 0 {
                hdr.msg_name = addr.as_mut_ptr();
                hdr.msg_namelen = *addr_len;
            }
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            hdrs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        let mut at = 0;
        let (mut dropped, mut failed, mut unreachable) = (0, 0, false);
        while at < hdrs.len() {
            // SAFETY: each header points at its own address in `msgs` and its own iovec in
            // `iovs`, each iovec at its payload inside `data`; all are borrowed here and not
            // touched until the call returns.
            let r = unsafe { sys::sendmmsg(fd, &mut hdrs[at..]) };
            self.stats.udp_tx_batches += 1;
            match r {
                Ok(n) => {
                    self.stats.udp_tx += n as u64;
                    at += n.max(1);
                    if n == 0 {
                        dropped += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    dropped += (hdrs.len() - at) as u64;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first remaining datagram failed (bad address, ICMP error pending on
                    // a connected socket, too large): skip it and go on.
                    unreachable |= super::is_unreachable(&e);
                    failed += 1;
                    at += 1;
                }
            }
        }
        msgs.clear();
        data.clear();
        self.stats.send_errors += failed;
        self.dropped(q, dropped);
        if q == 0 {
            self.stats.client_sends_dropped += failed;
        } else {
            self.stats.upstream_sends_dropped += failed;
            let socket = (q - 1) as u16;
            if unreachable && !self.unreachable.contains(&socket) {
                self.unreachable.push(socket);
            }
        }
    }
}

impl ShardIo for MmsgIo {
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, IoError> {
        let now = Instant::now();
        let mut n = 0;
        for socket in self.unreachable.drain(..) {
            on_event(Event::UpstreamUnreachable { socket });
            n += 1;
        }
        if self.tcp.has_pending() {
            n += self.tcp.deliver_pending(
                now,
                &mut EpollPoller(&self.epoll),
                &mut self.stats,
                on_event,
            );
        }
        let mut timeout = if n > 0 { Some(Duration::ZERO) } else { timeout };
        if let Some(deadline) = self.tcp.next_deadline() {
            let until = deadline.saturating_duration_since(now);
            timeout = Some(timeout.map_or(until, |t| t.min(until)));
        }
        let timeout_ms = match timeout {
            None => -1,
            // Round up so that a short timeout does not become a busy loop.
            Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32,
        };
        if timeout_ms != 0 {
            self.stats.waits += 1;
        }
        let ready = self
            .epoll
            .wait(&mut self.events, timeout_ms)
            .map_err(|source| IoError::Poll {
                op: "epoll_wait",
                source,
            })?;
        let now = Instant::now();
        for i in 0..ready {
            let ev = self.events[i];
            let (token, bits) = (ev.u64, ev.events);
            if token == TOKEN_LISTEN {
                n += self.recv_udp(None, on_event);
            } else if token & !TOKEN_MASK == TOKEN_UPSTREAM {
                n += self.recv_udp(Some((token & TOKEN_MASK) as u16), on_event);
            } else {
                n += self.tcp.on_ready(
                    token,
                    sys::epoll_readiness(bits),
                    now,
                    &mut EpollPoller(&self.epoll),
                    &mut self.stats,
                    on_event,
                );
            }
        }
        let mut poller = EpollPoller(&self.epoll);
        self.tcp.sweep(now, &mut poller, &mut self.stats);
        n += self
            .tcp
            .deliver_pending(now, &mut poller, &mut self.stats, on_event);
        Ok(n)
    }

    fn send_client_udp(&mut self, peer: SocketAddr, data: &[u8]) {
        self.queue(0, Some(peer), data);
    }

    fn send_client_tcp(&mut self, conn: ConnId, data: &[u8]) {
        self.tcp
            .send_client(conn, data, &mut EpollPoller(&self.epoll), &mut self.stats);
    }

    fn send_upstream_udp(&mut self, socket: u16, data: &[u8]) {
        if usize::from(socket) >= self.upstream.len() {
            self.dropped(1, 1);
            return;
        }
        self.queue(1 + usize::from(socket), None, data);
    }

    fn send_upstream_tcp(&mut self, server: u16, data: &[u8]) {
        self.tcp
            .send_upstream(server, data, &mut EpollPoller(&self.epoll), &mut self.stats);
    }

    fn flush(&mut self) -> Result<(), IoError> {
        for q in 0..self.tx.len() {
            self.flush_queue(q);
        }
        self.tcp.flush(
            Instant::now(),
            &mut EpollPoller(&self.epoll),
            &mut self.stats,
        );
        Ok(())
    }

    fn backend(&self) -> Backend {
        Backend::Mmsg
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn listen_fds(&self) -> super::ListenFds<'_> {
        self.tcp.listen_fds(&self.listen, self.local)
    }

    fn retire_listen_udp(&mut self) {
        let _ = sockets::retire_udp(&self.listen);
    }

    fn upstream_local_addr(&self, socket: u16) -> Option<SocketAddr> {
        self.upstream.get(usize::from(socket))?.local_addr().ok()
    }

    fn replace_upstream_udp(&mut self, socket: u16) -> Result<(), IoError> {
        let i = usize::from(socket);
        if i >= self.upstream.len() {
            return Err(IoError::InvalidConfig("no such upstream socket"));
        }
        let fresh = sockets::upstream_udp(self.upstream_addr[i], self.sizes)?;
        let token = TOKEN_UPSTREAM + u64::from(socket);
        let mut state = 0;
        self.epoll
            .sync(fresh.as_raw_fd(), token, sys::READ, &mut state)
            .map_err(|source| IoError::Poll {
                op: "epoll_ctl",
                source,
            })?;
        let old = std::mem::replace(&mut self.upstream[i], fresh);
        // Closing removes it from the epoll set; delete first all the same (no event of it
        // may be reported under the token the new socket now has).
        let mut state = sys::READ;
        let _ = self.epoll.sync(old.as_raw_fd(), token, 0, &mut state);
        drop(old);
        self.unreachable.retain(|&s| s != socket);
        self.stats.upstream_sockets_replaced += 1;
        Ok(())
    }
}
