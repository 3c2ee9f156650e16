//! The io_uring backend: one ring per shard (raw `io-uring` crate, no runtime).
//!
//! - **Ring**: created with `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (kernel
//!   6.1+; `COOP_TASKRUN` on 6.0; refused before 6.0, which lacks multishot `recvmsg`) and
//!   `IORING_SETUP_R_DISABLED`. [`UringIo::new`] (called on whatever thread opens the shard)
//!   sets everything up and queues the first SQEs but
//!   submits nothing; the first [`ShardIo::poll`] or [`ShardIo::flush`] enables the ring
//!   (`IORING_REGISTER_ENABLE_RINGS`), which makes the calling thread, the shard's, its only
//!   submitter. This matters for cost: the kernel runs a request's completion work (the
//!   `recvmsg` of a multishot receive, say) as task work of the task that submitted it, so a
//!   ring first submitted from the opening thread has that thread woken for every batch of
//!   datagrams, then the shard thread woken for the completions. With `DEFER_TASKRUN` the work
//!   waits, batched, until the shard thread asks for completions (`io_uring_enter` with
//!   `GETEVENTS`), and nothing interrupts it in between.
//! - **Files**: the UDP sockets are registered files (0: listen, `1 + j`: upstream `j`), so
//!   SQEs on them skip the per-request file lookup and reference count.
//! - **Receive**: one multishot receive per UDP socket, taking buffers from a provided buffer
//!   ring: group 0 for the listen socket, group 1 shared by the upstream sockets (so a flood of
//!   clients cannot starve upstream answers of buffers). The listen socket uses `RecvMsg`
//!   (`IORING_RECV_MULTISHOT`): each completion carries one datagram, laid out by the kernel
//!   as `io_uring_recvmsg_out`, the source address, then the payload. The upstream sockets
//!   are connected, so their source is known: a plain multishot `Recv` puts the payload alone
//!   in the buffer (no `msghdr` to copy, no address). After the callback for a datagram
//!   returns, its buffer goes back to the ring (one entry write and a release store of the
//!   tail). When the kernel ends a multishot (no `IORING_CQE_F_MORE`: buffers ran out
//!   (`ENOBUFS`), an error, a cancel) it is re-armed at once, counted in
//!   [`IoStats::uring_rearms`].
//! - **Send**: every `send_*` copies the datagram into a free send slot (payload, destination
//!   address) and pushes a `Send` SQE (`IORING_OP_SEND` with the destination in `addr2`, i.e.
//!   `sendto`: no `msghdr`/`iovec` for the kernel to copy in); [`ShardIo::flush`] submits
//!   them all with one `io_uring_enter`. The slot is free again when its completion is reaped.
//!   No free slot: the finished sends' slots are reclaimed at once (a submit, no wait; the
//!   other completions taken meanwhile are kept for the next poll), and only when none came
//!   back is the datagram dropped and counted ([`IoStats::send_dropped`]). (Measured
//!   against the alternatives: `SendMsg` costs an extra `msghdr` copy and import per datagram;
//!   one `sendmmsg` per socket at flush would cost up to `1 + upstream_sockets` syscalls per
//!   flush instead of one `io_uring_enter`, for a per-datagram cost no lower than `Send`;
//!   `SendZc` does not pay off for DNS-sized datagrams.)
//! - **Wait**: `io_uring_enter` with `GETEVENTS`, `IORING_ENTER_EXT_ARG` and a timespec
//!   (submit, run the deferred completion work, wait for one completion or the timeout).
//! - **TCP**: the nonblocking-socket code shared with the mmsg backend (`tcp_conns`), driven
//!   by one-shot `IORING_OP_POLL_ADD` requests per socket and direction; a closed socket's
//!   armed polls are cancelled with `IORING_OP_ASYNC_CANCEL`.
//!
//! # The submission contract
//!
//! Pushing an SQE is `unsafe` because the kernel uses the memory it points to after the push,
//! asynchronously: **every buffer, `msghdr`, `iovec` and address an SQE points to must stay
//! valid, and must not be written by us, until that SQE's final completion has been reaped.**
//! This module keeps it like so:
//!
//! - the receive `msghdr` and the provided buffers live in heap/mmap memory owned by
//!   [`UringIo`] that never moves; a provided buffer is ours only between the completion that
//!   hands it out and its return to the ring;
//! - a send slot is taken from the free list before its SQE is built and goes back only when
//!   the completion with its `user_data` is reaped;
//! - poll and cancel SQEs point to no memory;
//! - on drop, every multishot receive is cancelled and the ring is drained until no
//!   operation is in flight; if that does not finish in time, the memory is leaked instead of
//!   freed.

use std::cell::UnsafeCell;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::sockets::{self, BufferSizes, RawSockAddr, parse_sockaddr};
use super::sys::{self, Interest, READ, WRITE};
use super::tcp_conns::{Poller, TOKEN_MASK, TcpSide};
use super::{Backend, ConnId, Event, IoConfig, IoError, IoStats, ShardIo};

/// `user_data` kinds (top byte); the low bits say which socket, slot or TCP token.
const UD_KIND: u64 = 0xff << 56;
const UD_RECV: u64 = 1 << 56;
const UD_SEND: u64 = 2 << 56;
const UD_POLL_READ: u64 = 3 << 56;
const UD_POLL_WRITE: u64 = 4 << 56;
const UD_CANCEL: u64 = 5 << 56;

/// The `user_data` of socket `idx`'s multishot receive of generation `gen_`.
fn recv_user_data(idx: usize, gen_: u32) -> u64 {
    UD_RECV | u64::from(gen_ & 0xff_ffff) << 32 | idx as u64
}

/// Buffer group of the listen socket and of the upstream sockets.
const BGID_CLIENT: u16 = 0;
const BGID_UPSTREAM: u16 = 1;

/// Size of the header the kernel puts in front of a multishot `recvmsg` buffer.
const RECVMSG_OUT: usize = 16;

/// An anonymous private mapping, page-aligned, unmapped on drop.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
    /// Leave the mapping in place on drop (the kernel may still use it).
    leak: bool,
}

impl Mmap {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self {
            ptr,
            len,
            leak: false,
        })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`; nothing refers to it any
        // more (the owner guarantees the kernel is done with it, see the module doc).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A provided buffer ring: `entries` buffers of `buf_size` bytes lent to the kernel.
struct BufRing {
    /// Ring entries (page-aligned, at the start of `map`), then the buffers.
    map: Mmap,
    ring: NonNull<BufRingEntry>,
    bufs: NonNull<u8>,
    entries: u16,
    buf_size: usize,
    /// Our copy of the tail: buffers published so far.
    tail: u16,
}

/// The kernel's `struct io_uring_buf` (`BufRingEntry`'s layout) up to `resv`, which in entry
/// 0 is the ring's tail.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
}

const _: () = assert!(size_of::<BufRingEntry>() == 16 && align_of::<BufRingEntry>() >= 8);

impl BufRing {
    /// Maps and registers a ring of `entries` (a power of two) buffers for group `bgid`,
    /// all of them given to the kernel.
    fn new(ring: &IoUring, bgid: u16, entries: u16, buf_size: usize) -> io::Result<Self> {
        let ring_bytes =
            (usize::from(entries) * size_of::<BufRingEntry>()).next_multiple_of(page_size());
        let map = Mmap::new(ring_bytes + usize::from(entries) * buf_size)?;
        let ring_ptr = map.ptr.cast::<BufRingEntry>();
        // SAFETY: `ring_bytes` is within the mapping.
        let bufs = unsafe { map.ptr.add(ring_bytes) };
        // SAFETY: the ring memory is ours, page-aligned and zeroed (tail 0); it lives in
        // `map`, which outlives the registration (unregistered in `UringIo::drop`, or leaked).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                map.ptr.as_ptr() as u64,
                entries,
                bgid,
                0,
            )?
        };
        let mut r = Self {
            map,
            ring: ring_ptr,
            bufs,
            entries,
            buf_size,
            tail: 0,
        };
        for bid in 0..entries {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Writes buffer `bid` into the entry at our tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `idx` < entries, inside the ring mapping. The kernel reads entries only
        // between its head and the published tail; the entry at our (unpublished) tail is
        // not among them, so nothing reads it while we write it. The setters do not touch
        // the shared tail field that overlays entry 0.
        // Written field by field through a raw pointer (no `&mut` to the entry, whose last
        // field is the shared tail in entry 0), in the kernel's `io_uring_buf` layout.
        let entry = unsafe { self.ring.as_ptr().add(idx) }.cast::<RawBuf>();
        // SAFETY: `bid` < entries, so the buffer is inside the mapping.
        let addr = unsafe { self.bufs.as_ptr().add(usize::from(bid) * self.buf_size) };
        // SAFETY: `entry` points to a live, aligned `io_uring_buf` that only we write (see
        // above); the three fields lie before `resv`, the tail's place in entry 0.
        unsafe {
            (&raw mut (*entry).addr).write(addr as u64);
            (&raw mut (*entry).len).write(self.buf_size as u32);
            (&raw mut (*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the kernel.
    fn publish(&self) {
        // SAFETY: `ring` is the first entry of a live, initialised ring; `tail` gives the
        // address of its tail field, a naturally aligned u16 that the kernel only reads, so
        // accessing it atomically is sound.
        let tail =
            unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.ring.as_ptr()).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Buffer `bid`, first `len` bytes.
    ///
    /// # Safety
    ///
    /// The kernel must have handed `bid` to us (a completion named it) and it must not have
    /// been given back yet, so the kernel does not write it.
    unsafe fn buf(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.buf_size);
        let bid = usize::from(bid % self.entries);
        // SAFETY: in bounds of the mapping; owned by us per the caller's guarantee, and
        // initialised (mapped zeroed, then written by the kernel).
        unsafe { std::slice::from_raw_parts(self.bufs.as_ptr().add(bid * self.buf_size), len) }
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        self.push(bid % self.entries);
        self.publish();
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// One UDP send in flight: its destination (payload in `SendSlots::data`) and the fixed file
/// it goes out on (0: listen, `1 + j`: upstream `j`), to attribute a failed completion.
struct SendSlot {
    addr: RawSockAddr,
    file: usize,
    /// `recv_gen[file]` when queued: a failed send of a socket replaced since then says
    /// nothing about its replacement.
    generation: u32,
}

/// Send slots: headers in `slots`, payloads in `data` (slot `i` at `i * size`).
struct SendSlots {
    slots: Box<[UnsafeCell<SendSlot>]>,
    data: Mmap,
    size: usize,
    free: Vec<u16>,
}

/// The receive `msghdr` template (only its name and control lengths matter to the kernel).
struct RecvHdr(Box<UnsafeCell<libc::msghdr>>);

// SAFETY: the only raw pointer is the payload mapping, owned by this value and moved with it;
// nothing is shared between threads. (The ring may be moved too: it is bound to a thread only
// when first enabled, and a submission from another thread after that fails with `EEXIST`,
// it does not touch memory.)
unsafe impl Send for SendSlots {}
// SAFETY: as for `SendSlots`: the header's pointers are null (lengths only).
unsafe impl Send for RecvHdr {}
// SAFETY: the ring and buffer pointers refer to this value's own mapping, moved with it.
unsafe impl Send for BufRing {}

/// The io_uring backend of one shard.
pub struct UringIo {
    // Field order matters: the ring is dropped (closed) before the memory it used.
    ring: IoUring,
    client_bufs: BufRing,
    upstream_bufs: BufRing,
    recv_hdr: RecvHdr,
    send: SendSlots,
    /// The UDP listen socket (fixed file 0; the upstream sockets are `1..`).
    listen: UdpSocket,
    local: SocketAddr,
    upstream: Vec<UdpSocket>,
    /// The peer of each upstream socket (connected: the only source the kernel lets in).
    upstream_peers: Vec<SocketAddr>,
    /// Whether the multishot receive of socket `i` (0: listen, `1 + j`: upstream `j`) is armed.
    armed: Vec<bool>,
    /// Generation of socket `i`'s receive, bumped when the socket is replaced: it is part of
    /// the receive's `user_data`, so the cancelled receive of a replaced socket is told apart.
    recv_gen: Vec<u32>,
    /// Receives of replaced sockets cancelled and not yet finished (drop waits for them).
    cancelling: usize,
    /// The server of each upstream socket and the socket buffer sizes, for replacement
    /// sockets.
    upstream_addr: Vec<SocketAddr>,
    sizes: BufferSizes,
    sub: SubmitState,
    cqes: Vec<cqueue::Entry>,
    /// Completions reaped outside `poll` (while freeing send slots), handled first by the
    /// next `poll`; at most `budget`.
    deferred: Vec<cqueue::Entry>,
    /// Upstream sockets (and their generations then) a send failure found unreachable
    /// while reclaiming send slots, reported by the next `poll`; one entry per socket.
    unreachable: Vec<(u16, u32)>,
    budget: usize,
    max_payload: usize,
    tcp: TcpSide,
    stats: IoStats,
    /// Completion coalescing ([`IoConfig::coalesce_wait`]; zero: off).
    coalesce_wait: Duration,
    coalesce_batch: u32,
    /// Whether the kernel has `IORING_FEAT_MIN_TIMEOUT` (6.12+): a coalescing wait is then one
    /// `io_uring_enter` with `min_wait_usec`, else a batch wait bounded by a timeout followed,
    /// when nothing came, by a plain wait.
    min_timeout: bool,
}

/// Submission bookkeeping: whether send SQEs wait for a submit, and submits forced by a full
/// queue that carried sends (added to [`IoStats::udp_tx_batches`]).
#[derive(Default)]
struct SubmitState {
    sends: bool,
    forced_batches: u64,
    /// Whether the ring was enabled (it is created disabled; see [`SubmitState::enable`]).
    enabled: bool,
    /// Cancels of forgotten TCP polls that found the submission queue full: pushed again by
    /// the next polls (an armed poll holds its socket open, so a closed connection's FIN
    /// would wait for the peer). At most [`CANCEL_RETRIES`]; capacity reserved at open.
    cancels: Vec<u64>,
}

/// How many cancels of forgotten polls wait for room at most (beyond: the poll stays armed
/// until the peer acts or the ring goes, its completion ignored as stale).
const CANCEL_RETRIES: usize = 256;

impl SubmitState {
    /// Enables the ring on first use: the calling thread becomes its only submitter (with
    /// `IORING_SETUP_SINGLE_ISSUER`), the one that runs its task work.
    fn enable(&mut self, ring: &IoUring) -> io::Result<()> {
        if !self.enabled {
            ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    /// Pushes the cancels that waited for room, as many as fit now.
    fn retry_cancels(&mut self, ring: &mut IoUring) {
        while let Some(&target) = self.cancels.last() {
            let e = opcode::AsyncCancel::new(target)
                .build()
                .user_data(UD_CANCEL);
            // SAFETY: a cancel SQE points to no memory.
            if unsafe { ring.submission().push(&e) }.is_err() {
                return;
            }
            self.cancels.pop();
        }
    }

    /// Submits the queued SQEs (enabling the ring first if needed).
    fn submit(&mut self, ring: &IoUring) -> io::Result<usize> {
        self.enable(ring)?;
        ring.submit()
    }
}

/// Creates the ring, disabled. Preferred: `SINGLE_ISSUER | DEFER_TASKRUN` (completion work runs
/// only inside our `io_uring_enter`, in the shard thread, batched); fallback for kernels older
/// than 6.1: `COOP_TASKRUN`.
///
/// `TASKRUN_FLAG`: the kernel sets `IORING_SQ_TASKRUN` while completion work is pending, and a
/// plain submit then also runs it (the crate adds `GETEVENTS`).
///
/// At least room for every socket's receive and two more in the submission queue: the
/// receives are all queued at open, before the ring may submit anything.
fn build_ring(config: &IoConfig) -> Result<IoUring, IoError> {
    let sockets = 1 + config.upstreams.len() * usize::from(config.upstream_sockets);
    let entries = config.uring_entries.max(
        u32::try_from(sockets + 2)
            .unwrap_or(u32::MAX)
            .next_power_of_two(),
    );
    let r = IoUring::builder()
        .setup_cqsize(entries * 4)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(entries);
    match r {
        Ok(ring) => return Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(super::uring_error(e)),
    }
    // A kernel without DEFER_TASKRUN (before 6.1) may still predate multishot `recvmsg`
    // (6.0): 5.19 sets up this ring and its buffer rings, then fails every receive with
    // EINVAL, re-armed each poll (a shard spinning deaf). Refused up front instead, so `Auto`
    // takes mmsg and `--io uring` says why.
    if !kernel_at_least(sys::kernel_release().as_deref().unwrap_or(""), 6, 0) {
        return Err(IoError::UringRefused(io::Error::from_raw_os_error(
            libc::ENOSYS,
        )));
    }
    IoUring::builder()
        .setup_cqsize(entries * 4)
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(entries)
        .map_err(refused_if_unsupported)
}

/// Whether a kernel release string (`uname -r`: `6.1.0-18-amd64`, `5.19.17`) is at least
/// `major.minor`; an unreadable one is not.
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(ma)), Some(Ok(mi))) => (ma, mi) >= (major, minor),
        _ => false,
    }
}

/// `EINVAL` from a setup step a kernel older than this backend needs does not know (the
/// fallback ring's flags, provided buffer rings): refused, so `Auto` takes mmsg.
fn refused_if_unsupported(e: io::Error) -> IoError {
    if e.raw_os_error() == Some(libc::EINVAL) {
        IoError::UringRefused(e)
    } else {
        super::uring_error(e)
    }
}

/// Pushes `entry`, submitting to make room if the queue is full; false if it could not.
///
/// # Safety
///
/// The submission contract (module doc): what `entry` points to stays valid and untouched
/// until its final completion is reaped.
unsafe fn try_push(ring: &mut IoUring, entry: &squeue::Entry, sub: &mut SubmitState) -> bool {
    for _ in 0..3 {
        // SAFETY: the caller keeps the submission contract for `entry`.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if sub.submit(ring).is_ok() && sub.sends {
            sub.forced_batches += 1;
            sub.sends = false;
        }
    }
    false
}

/// The ring as the TCP side's poller: one-shot poll requests per direction.
struct UringPoller<'a> {
    ring: &'a mut IoUring,
    sub: &'a mut SubmitState,
}

impl Poller for UringPoller<'_> {
    fn sync(
        &mut self,
        fd: RawFd,
        token: u64,
        want: Interest,
        state: &mut Interest,
    ) -> io::Result<()> {
        for (dir, mask, ud) in [
            (READ, libc::POLLIN, UD_POLL_READ),
            (WRITE, libc::POLLOUT, UD_POLL_WRITE),
        ] {
            if want & dir != 0 && *state & dir == 0 {
                let e = opcode::PollAdd::new(Fd(fd), mask as u32)
                    .build()
                    .user_data(ud | (token & TOKEN_MASK));
                // SAFETY: a poll SQE points to no memory.
                if !unsafe { try_push(self.ring, &e, self.sub) } {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                *state |= dir;
            }
        }
        Ok(())
    }

    fn forget(&mut self, _fd: RawFd, token: u64, state: &mut Interest) {
        for (dir, ud) in [(READ, UD_POLL_READ), (WRITE, UD_POLL_WRITE)] {
            if *state & dir != 0 {
                let target = ud | (token & TOKEN_MASK);
                let e = opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(UD_CANCEL);
                // SAFETY: a cancel SQE points to no memory. If it cannot be queued it waits
                // for the next polls (bounded); the poll's completion is ignored as stale.
                if !unsafe { try_push(self.ring, &e, self.sub) }
                    && self.sub.cancels.len() < self.sub.cancels.capacity()
                {
                    self.sub.cancels.push(target);
                }
            }
        }
        *state = 0;
    }
}

impl UringIo {
    /// Sets up the ring, its buffer rings and the sockets. `IoError::UringRefused` when the
    /// kernel or a seccomp filter refuses io_uring.
    pub fn new(config: &IoConfig) -> Result<Self, IoError> {
        config.validate()?;
        let ring = build_ring(config)?;
        if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
            return Err(IoError::UringRefused(io::Error::from_raw_os_error(
                libc::ENOSYS,
            )));
        }
        let setup = |op| move |source| IoError::UringSetup { op, source };
        let buf_size = RECVMSG_OUT + RawSockAddr::CAPACITY as usize + config.max_udp_payload;
        let client_bufs = BufRing::new(&ring, BGID_CLIENT, config.uring_recv_buffers, buf_size)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => refused_if_unsupported(e),
                _ => setup("register_buf_ring")(e),
            })?;
        let upstream_bufs = BufRing::new(&ring, BGID_UPSTREAM, config.uring_recv_buffers, buf_size)
            .map_err(setup("register_buf_ring"))?;
        let mut hdr = sys::zeroed_msghdr();
        hdr.msg_namelen = RawSockAddr::CAPACITY;
        let slots = config.send_queue;
        let send = SendSlots {
            slots: (0..slots)
                .map(|_| {
                    UnsafeCell::new(SendSlot {
                        addr: RawSockAddr::zeroed(),
                        file: 0,
                        generation: 0,
                    })
                })
                .collect(),
            data: Mmap::new(slots * config.max_udp_payload).map_err(setup("mmap"))?,
            size: config.max_udp_payload,
            free: (0..slots as u16).rev().collect(),
        };

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
        let upstream_peers = upstream
            .iter()
            .map(|s| s.peer_addr())
            .collect::<io::Result<Vec<_>>>()
            .map_err(setup("getpeername"))?;
        // Fixed file `i` is socket `i` (0: listen, `1 + j`: upstream `j`): no file lookup and
        // reference count per SQE.
        let fds: Vec<RawFd> = std::iter::once(listen.udp.as_raw_fd())
            .chain(upstream.iter().map(AsRawFd::as_raw_fd))
            .collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(setup("register_files"))?;
        let budget = config.batch * 8;
        let mut io = Self {
            ring,
            client_bufs,
            upstream_bufs,
            recv_hdr: RecvHdr(Box::new(UnsafeCell::new(hdr))),
            send,
            unreachable: Vec::with_capacity(upstream.len()),
            armed: vec![false; 1 + upstream.len()],
            recv_gen: vec![0; 1 + upstream.len()],
            cancelling: 0,
            upstream_addr: servers,
            sizes,
            listen: listen.udp,
            local: listen.addr,
            upstream,
            upstream_peers,
            sub: SubmitState {
                cancels: Vec::with_capacity(CANCEL_RETRIES),
                ..SubmitState::default()
            },
            cqes: Vec::with_capacity(2 * budget),
            deferred: Vec::with_capacity(budget),
            budget,
            max_payload: config.max_udp_payload,
            tcp: TcpSide::new(config, listen.tcp),
            stats: IoStats::default(),
            coalesce_wait: config.coalesce_wait,
            coalesce_batch: config.coalesce_batch,
            min_timeout: false,
        };
        io.min_timeout = io.ring.params().is_feature_min_timeout();
        io.arm_receives(false);
        let mut poller = UringPoller {
            ring: &mut io.ring,
            sub: &mut io.sub,
        };
        io.tcp.start(&mut poller).map_err(setup("poll listener"))?;
        // Not submitted here: the first `poll` or `flush` enables the ring and submits, from
        // the thread that owns the shard.
        Ok(io)
    }

    /// Pushes a multishot receive for every socket that has none.
    fn arm_receives(&mut self, rearm: bool) {
        for idx in 0..self.armed.len() {
            if self.armed[idx] {
                continue;
            }
            let fd = Fixed(idx as u32);
            let e = if idx == 0 {
                opcode::RecvMsgMulti::new(fd, self.recv_hdr.0.get().cast_const(), BGID_CLIENT)
                    .build()
            } else {
                // Connected sockets: the source is known, so a plain multishot recv (no
                // `msghdr`, no address copy) will do.
                opcode::RecvMulti::new(fd, BGID_UPSTREAM).build()
            }
            .user_data(recv_user_data(idx, self.recv_gen[idx]));
            // SAFETY: the msghdr lives in a box owned by `self` until drop, which cancels and
            // drains this receive first; buffers come from the registered group.
            let ok = unsafe { try_push(&mut self.ring, &e, &mut self.sub) };
            if ok {
                self.armed[idx] = true;
                if rearm {
                    self.stats.uring_rearms += 1;
                }
            }
        }
    }

    /// The kernel dropped completions (`EBADR`: it could not allocate room for an
    /// overflowing one). A receive's final completion may be among them, leaving a socket
    /// we think armed deaf: every armed receive is cancelled and, under a new generation,
    /// armed again by the poll (the old ones' completions are stale and only give buffers
    /// back; one whose final completion was lost keeps `cancelling` above 0, so drop leaks
    /// the memory rather than free it under a request it cannot see end). A send's lost
    /// completion keeps its slot out of use.
    fn resync_receives(&mut self) {
        self.stats.uring_lost_completions += 1;
        for idx in 0..self.armed.len() {
            if !self.armed[idx] {
                continue;
            }
            let e = opcode::AsyncCancel::new(recv_user_data(idx, self.recv_gen[idx]))
                .build()
                .user_data(UD_CANCEL);
            // SAFETY: a cancel SQE points to no memory.
            if unsafe { try_push(&mut self.ring, &e, &mut self.sub) } {
                self.cancelling += 1;
                self.armed[idx] = false;
                self.recv_gen[idx] = self.recv_gen[idx].wrapping_add(1);
            }
        }
    }

    /// Moves the forced-submit count into the stats.
    fn sync_stats(&mut self) {
        self.stats.udp_tx_batches += std::mem::take(&mut self.sub.forced_batches);
    }

    /// The poller view of the ring, for the TCP side.
    fn poller(&mut self) -> (UringPoller<'_>, &mut TcpSide, &mut IoStats) {
        (
            UringPoller {
                ring: &mut self.ring,
                sub: &mut self.sub,
            },
            &mut self.tcp,
            &mut self.stats,
        )
    }

    /// Counts a datagram for fixed file `idx` (0: clients, else upstream) dropped.
    fn dropped(&mut self, idx: usize) {
        self.stats.send_dropped += 1;
        self.count_drop(idx);
    }

    /// Counts a message lost on fixed file `idx` by direction.
    fn count_drop(&mut self, idx: usize) {
        if idx == 0 {
            self.stats.client_sends_dropped += 1;
        } else {
            self.stats.upstream_sends_dropped += 1;
        }
    }

    fn queue_send(&mut self, idx: usize, to: Option<SocketAddr>, data: &[u8]) {
        if data.len() > self.max_payload {
            self.dropped(idx);
            return;
        }
        let Some(slot) = self.send.free.pop().or_else(|| self.reclaim_send_slots()) else {
            self.dropped(idx);
            return;
        };
        let s = usize::from(slot);
        // SAFETY: slot `s` is free (off the free list only now), so no SQE uses its payload
        // area, which lies inside the mapping (`s * size + len <= slots * size`).
        let payload = unsafe { self.send.data.ptr.as_ptr().add(s * self.send.size) };
        // SAFETY: `payload` has room for `data.len() <= size` bytes; the regions are distinct.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), payload, data.len()) };
        let mut op = opcode::Send::new(Fixed(idx as u32), payload.cast_const(), data.len() as u32);
        let cell = self.send.slots[s].get();
        // SAFETY: the slot is free, so neither the kernel nor any reference uses it; we are
        // the only writer, through the UnsafeCell's pointer.
        let addr = unsafe { &mut *cell };
        addr.file = idx;
        addr.generation = self.recv_gen.get(idx).copied().unwrap_or(0);
        if let Some(to) = to {
            let len = addr.addr.set(to);
            op = op
                .dest_addr(addr.addr.as_mut_ptr().cast_const().cast())
                .dest_addr_len(len);
        }
        let e = op.build().user_data(UD_SEND | u64::from(slot));
        // SAFETY: the slot (header, iovec, address, payload) stays untouched until the
        // completion with this user_data is reaped, which is when it goes back on the free
        // list; drop waits for it.
        let pushed = unsafe { try_push(&mut self.ring, &e, &mut self.sub) };
        if pushed {
            self.sub.sends = true;
            self.stats.udp_tx += 1;
        } else {
            self.send.free.push(slot);
            self.dropped(idx);
        }
    }

    /// Submits the queued SQEs, counting a batch of sends when there were some. A transient
    /// error leaves them queued for the next submit (Ok).
    fn submit_queued(&mut self) -> io::Result<()> {
        let sends = self.sub.sends;
        match self.sub.submit(&self.ring) {
            Ok(_) => {
                if sends {
                    self.stats.udp_tx_batches += 1;
                    self.sub.sends = false;
                }
                Ok(())
            }
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// With every send slot in flight: submits what is queued (a UDP send mostly completes
    /// inside that call) and takes the completions there are, freeing the slots of the sends
    /// (a failed one's unreachable upstream is kept for the next `poll` to report) and keeping
    /// every other completion for the next `poll`. Never waits. A free slot, if one came
    /// back: a burst of answers larger than the send queue (the last SERVFAILs at shutdown,
    /// a whole socket's queries failed by an ICMP error) goes out whole, as on mmsg.
    fn reclaim_send_slots(&mut self) -> Option<u16> {
        if self.deferred.len() == self.deferred.capacity() {
            // No room to keep what else would come up: not even the submit.
            return None;
        }
        self.submit_queued().ok()?;
        while self.deferred.len() < self.deferred.capacity() {
            // One at a time: a completion taken is never lost for want of room.
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let ud = cqe.user_data();
            if ud & UD_KIND == UD_SEND {
                // Done with at once, failed or not (the slot comes back); an unreachable
                // upstream is reported by the next poll.
                if let Some(found) = self.send_done((ud & !UD_KIND) as u16, cqe.result())
                    && !self.unreachable.contains(&found)
                    && self.unreachable.len() < self.unreachable.capacity()
                {
                    self.unreachable.push(found);
                }
            } else {
                self.deferred.push(cqe);
            }
        }
        self.send.free.pop()
    }

    /// A send's completion: counts a failure, frees the slot, and says which upstream socket
    /// (with its generation then) a failure reports unreachable, if one does and that socket
    /// has not been replaced since.
    fn send_done(&mut self, slot: u16, res: i32) -> Option<(u16, u32)> {
        let mut unreachable = None;
        if res < 0 {
            self.stats.send_errors += 1;
            // SAFETY: the send's completion is reaped, so the kernel is done with the slot
            // and nothing else refers to it until it is back on the free list.
            let sent = unsafe { &*self.send.slots[usize::from(slot)].get() };
            let (file, generation) = (sent.file, sent.generation);
            self.count_drop(file);
            let err = io::Error::from_raw_os_error(-res);
            if file > 0
                && super::is_unreachable(&err)
                && self.recv_gen.get(file) == Some(&generation)
            {
                unreachable = Some(((file - 1) as u16, generation));
            }
        }
        self.send.free.push(slot);
        unreachable
    }

    /// Handles one completion; returns the events delivered.
    fn complete(
        &mut self,
        cqe: &cqueue::Entry,
        now: Instant,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let ud = cqe.user_data();
        let (res, flags) = (cqe.result(), cqe.flags());
        match ud & UD_KIND {
            UD_RECV => {
                let idx = (ud & 0xffff_ffff) as usize;
                if idx < self.recv_gen.len()
                    && (ud >> 32) & 0xff_ffff != u64::from(self.recv_gen[idx] & 0xff_ffff)
                {
                    // A cancelled receive (a replaced socket, a resync): give its buffer back.
                    if res >= 0
                        && let Some(bid) = cqueue::buffer_select(flags)
                    {
                        if idx == 0 {
                            self.client_bufs.recycle(bid);
                        } else {
                            self.upstream_bufs.recycle(bid);
                        }
                    }
                    if !cqueue::more(flags) {
                        self.cancelling = self.cancelling.saturating_sub(1);
                    }
                    return 0;
                }
                let n = self.complete_recv(idx, res, flags, on_event);
                if !cqueue::more(flags) && idx < self.armed.len() {
                    self.armed[idx] = false;
                }
                n
            }
            UD_SEND => match self.send_done((ud & !UD_KIND) as u16, res) {
                Some((socket, _)) => {
                    on_event(Event::UpstreamUnreachable { socket });
                    1
                }
                None => 0,
            },
            UD_POLL_READ | UD_POLL_WRITE => {
                let dir = if ud & UD_KIND == UD_POLL_READ {
                    READ
                } else {
                    WRITE
                };
                let token = ud & TOKEN_MASK;
                let Some(state) = self.tcp.state_mut(token) else {
                    return 0;
                };
                *state &= !dir;
                if res == -libc::ECANCELED {
                    return 0;
                }
                let (mut poller, tcp, stats) = self.poller();
                tcp.on_ready(token, dir, now, &mut poller, stats, on_event)
            }
            _ => 0,
        }
    }

    fn complete_recv(
        &mut self,
        idx: usize,
        res: i32,
        flags: u32,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        if res < 0 {
            match -res {
                libc::ENOBUFS => self.stats.uring_enobufs += 1,
                libc::ECANCELED => {}
                e => {
                    self.stats.udp_rx_errors += 1;
                    if idx > 0 && super::is_unreachable(&io::Error::from_raw_os_error(e)) {
                        on_event(Event::UpstreamUnreachable {
                            socket: (idx - 1) as u16,
                        });
                        return 1;
                    }
                }
            }
            return 0;
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            if res == 0 && idx > 0 {
                // An empty datagram: the kernel ends the multishot receive with it and
                // keeps the buffer (the receive is armed again at the end of the poll). It
                // is a datagram all the same, as on mmsg.
                self.stats.udp_rx += 1;
                on_event(Event::UpstreamDatagram {
                    socket: (idx - 1) as u16,
                    from: self.upstream_peers[idx - 1],
                    data: &[],
                });
                return 1;
            }
            self.stats.udp_rx_errors += 1;
            return 0;
        };
        let len = res as usize;
        let mut n = 0;
        if idx == 0 {
            // SAFETY: this completion handed buffer `bid` to us; it goes back to the ring only
            // below, after the last use of `buf`.
            let buf = unsafe { self.client_bufs.buf(bid, len) };
            // SAFETY: the template header is only read, never written after setup.
            let hdr = unsafe { &*self.recv_hdr.0.get() };
            match RecvMsgOut::parse(buf, hdr) {
                Ok(out) if !out.is_payload_truncated() && !out.is_name_data_truncated() => {
                    match parse_sockaddr(out.name_data()) {
                        Some(peer) => {
                            self.stats.udp_rx += 1;
                            n = 1;
                            let data = out.payload_data();
                            on_event(Event::ClientDatagram { peer, data });
                        }
                        None => self.stats.udp_rx_errors += 1,
                    }
                }
                Ok(_) => self.stats.udp_rx_truncated += 1,
                Err(()) => self.stats.udp_rx_errors += 1,
            }
            self.client_bufs.recycle(bid);
        } else {
            // A plain receive: the buffer holds the payload alone. The buffer is larger than
            // `max_payload`, so a longer datagram shows as a longer result.
            if len > self.max_payload {
                self.stats.udp_rx_truncated += 1;
            } else {
                // SAFETY: as above: buffer `bid` is ours until the recycle below.
                let data = unsafe { self.upstream_bufs.buf(bid, len) };
                self.stats.udp_rx += 1;
                n = 1;
                on_event(Event::UpstreamDatagram {
                    socket: (idx - 1) as u16,
                    from: self.upstream_peers[idx - 1],
                    data,
                });
            }
            self.upstream_bufs.recycle(bid);
        }
        n
    }
}

/// Whether an `io_uring_enter` error only means "nothing this time".
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

impl UringIo {
    /// Submits and waits: for one completion or `timeout`; with coalescing, for
    /// `coalesce_batch` completions at most `coalesce_wait`, then for the first one.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let submitter = self.ring.submitter();
        let wait = self.coalesce_wait;
        if wait.is_zero() || timeout.is_some_and(|t| t <= wait) {
            return match timeout {
                None => submitter.submit_and_wait(1),
                Some(t) => {
                    let ts = Timespec::from(t);
                    submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts))
                }
            };
        }
        self.stats.coalesced_waits += 1;
        let want = self.coalesce_batch as usize;
        if self.min_timeout {
            // The kernel waits up to `min_wait_usec` for `want` completions, returns then
            // if at least one came, else waits for one (until `timeout`, if any).
            let micros = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX).max(1);
            let args = SubmitArgs::new().min_wait_usec(micros);
            return match timeout {
                None => submitter.submit_with_args(want, &args),
                Some(t) => {
                    let ts = Timespec::from(t);
                    submitter.submit_with_args(want, &args.timespec(&ts))
                }
            };
        }
        // Older kernels: the batch wait bounded by `wait`, then (nothing came) a plain wait.
        let ts = Timespec::from(wait);
        let first = submitter.submit_with_args(want, &SubmitArgs::new().timespec(&ts));
        match first {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            other => return other,
        }
        if !self.ring.completion().is_empty() {
            return Ok(0);
        }
        let submitter = self.ring.submitter();
        match timeout {
            None => submitter.submit_and_wait(1),
            Some(t) => {
                let ts = Timespec::from(t.saturating_sub(wait));
                submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts))
            }
        }
    }
}

impl ShardIo for UringIo {
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, IoError> {
        let now = Instant::now();
        let mut n = 0;
        if self.tcp.has_pending() {
            let (mut poller, tcp, stats) = self.poller();
            n += tcp.deliver_pending(now, &mut poller, stats, on_event);
        }
        self.arm_receives(true);
        self.sub.retry_cancels(&mut self.ring);
        let mut timeout = if n > 0 { Some(Duration::ZERO) } else { timeout };
        if let Some(deadline) = self.tcp.next_deadline() {
            let until = deadline.saturating_duration_since(now);
            timeout = Some(timeout.map_or(until, |t| t.min(until)));
        }
        self.sub
            .enable(&self.ring)
            .map_err(|source| IoError::Poll {
                op: "io_uring_register(ENABLE_RINGS)",
                source,
            })?;
        let sends = self.sub.sends;
        let mut lost = false;
        // Completions already taken (while reclaiming send slots) are work at hand too.
        let held = !self.deferred.is_empty() || !self.unreachable.is_empty();
        let r = if held || !self.ring.completion().is_empty() || timeout == Some(Duration::ZERO) {
            // Submits, and runs pending task work if the kernel flagged some (`submit` adds
            // GETEVENTS when IORING_SQ_TASKRUN is set).
            self.ring.submit()
        } else {
            self.stats.waits += 1;
            self.wait(timeout)
        };
        match r {
            Ok(_) => {
                if sends {
                    self.stats.udp_tx_batches += 1;
                    self.sub.sends = false;
                }
            }
            Err(e) if is_transient(&e) => {}
            // Completions were lost: after handling those at hand (taken under the current
            // generations), every receive is re-armed.
            Err(e) if e.raw_os_error() == Some(libc::EBADR) => lost = true,
            Err(source) => {
                return Err(IoError::Poll {
                    op: "io_uring_enter",
                    source,
                });
            }
        }

        let now = Instant::now();
        for i in 0..self.unreachable.len() {
            let (socket, generation) = self.unreachable[i];
            if self.recv_gen.get(1 + usize::from(socket)) == Some(&generation) {
                n += 1;
                on_event(Event::UpstreamUnreachable { socket });
            }
        }
        self.unreachable.clear();
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.append(&mut self.deferred);
        cqes.extend(self.ring.completion().take(self.budget));
        let rx_before = self.stats.udp_rx;
        for cqe in &cqes {
            n += self.complete(cqe, now, on_event);
        }
        self.cqes = cqes;
        if self.stats.udp_rx > rx_before {
            self.stats.udp_rx_batches += 1;
        }
        if lost {
            self.resync_receives();
        }
        self.arm_receives(true);
        let (mut poller, tcp, stats) = self.poller();
        tcp.sweep(now, &mut poller, stats);
        n += tcp.deliver_pending(now, &mut poller, stats, on_event);
        self.sync_stats();
        Ok(n)
    }

    fn send_client_udp(&mut self, peer: SocketAddr, data: &[u8]) {
        self.queue_send(0, Some(peer), data);
    }

    fn send_client_tcp(&mut self, conn: ConnId, data: &[u8]) {
        let (mut poller, tcp, stats) = self.poller();
        tcp.send_client(conn, data, &mut poller, stats);
    }

    fn send_upstream_udp(&mut self, socket: u16, data: &[u8]) {
        if usize::from(socket) >= self.upstream.len() {
            self.dropped(1);
            return;
        }
        self.queue_send(1 + usize::from(socket), None, data);
    }

    fn send_upstream_tcp(&mut self, server: u16, data: &[u8]) {
        let (mut poller, tcp, stats) = self.poller();
        tcp.send_upstream(server, data, &mut poller, stats);
    }

    fn flush(&mut self) -> Result<(), IoError> {
        let now = Instant::now();
        let (mut poller, tcp, stats) = self.poller();
        tcp.flush(now, &mut poller, stats);
        if !self.ring.submission().is_empty() {
            self.submit_queued().map_err(|source| IoError::Poll {
                op: "io_uring_enter",
                source,
            })?;
        }
        self.sync_stats();
        Ok(())
    }

    fn backend(&self) -> Backend {
        Backend::Uring
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

    /// Cancels the old socket's multishot receive (its final completion is recognised by the
    /// generation in its `user_data` and only gives buffers back), points fixed file `1 + j`
    /// at the new socket with one `IORING_REGISTER_FILES_UPDATE`, and arms the new receive.
    /// Sends already submitted on the old socket hold their own reference to it.
    fn replace_upstream_udp(&mut self, socket: u16) -> Result<(), IoError> {
        let j = usize::from(socket);
        if j >= self.upstream.len() {
            return Err(IoError::InvalidConfig("no such upstream socket"));
        }
        let idx = 1 + j;
        let fresh = sockets::upstream_udp(self.upstream_addr[j], self.sizes)?;
        let peer = fresh.peer_addr().map_err(|source| IoError::UringSetup {
            op: "getpeername",
            source,
        })?;
        if self.armed[idx] {
            let e = opcode::AsyncCancel::new(recv_user_data(idx, self.recv_gen[idx]))
                .build()
                .user_data(UD_CANCEL);
            // SAFETY: a cancel SQE points to no memory.
            if !unsafe { try_push(&mut self.ring, &e, &mut self.sub) } {
                // Nothing changed: the old socket and its receive stay.
                return Err(IoError::UringSetup {
                    op: "io_uring cancel (submission queue full)",
                    source: io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            self.cancelling += 1;
            self.armed[idx] = false;
        }
        // From here the old receive's completions are stale (their buffers go back).
        self.recv_gen[idx] = self.recv_gen[idx].wrapping_add(1);
        // Sends still queued (not submitted) go out on the new socket, as on mmsg: a fixed
        // file is resolved when the kernel issues the SQE, after this update.
        let updated = self
            .ring
            .submitter()
            .register_files_update(idx as u32, &[fresh.as_raw_fd()]);
        if let Err(source) = updated {
            // The old socket stays; its receive, cancelled above, is armed again.
            self.arm_receives(false);
            return Err(IoError::UringSetup {
                op: "register_files_update",
                source,
            });
        }
        // Submitted now, so that the old socket closes without waiting for the next poll (a
        // transient error leaves it for the next poll).
        let _ = self.submit_queued();
        self.upstream[j] = fresh;
        self.upstream_peers[j] = peer;
        self.arm_receives(false);
        self.stats.upstream_sockets_replaced += 1;
        Ok(())
    }
}

impl Drop for UringIo {
    /// Cancels the multishot receives and waits (bounded) until no operation that uses our
    /// memory is in flight; if that does not happen, leaks the memory rather than free it
    /// under the kernel.
    fn drop(&mut self) {
        if !self.sub.enabled {
            // Never enabled: nothing was submitted, the kernel holds none of our memory.
            let submitter = self.ring.submitter();
            let _ = submitter.unregister_buf_ring(BGID_CLIENT);
            let _ = submitter.unregister_buf_ring(BGID_UPSTREAM);
            return;
        }
        for idx in 0..self.armed.len() {
            if self.armed[idx] {
                let e = opcode::AsyncCancel::new(recv_user_data(idx, self.recv_gen[idx]))
                    .build()
                    .user_data(UD_CANCEL);
                // SAFETY: a cancel SQE points to no memory.
                unsafe { try_push(&mut self.ring, &e, &mut self.sub) };
            }
        }
        let slots = self.send.slots.len();
        // What a completion taken now, or taken earlier and not yet handled by a poll (while
        // reclaiming send slots), says about the memory still in use.
        let reap = |this: &mut UringIo, cqe: &cqueue::Entry| {
            let ud = cqe.user_data();
            match ud & UD_KIND {
                UD_RECV if !cqueue::more(cqe.flags()) => {
                    let idx = (ud & 0xffff_ffff) as usize;
                    if idx < this.recv_gen.len() && ud == recv_user_data(idx, this.recv_gen[idx]) {
                        this.armed[idx] = false;
                    } else {
                        this.cancelling = this.cancelling.saturating_sub(1);
                    }
                }
                UD_SEND => this.send.free.push((ud & !UD_KIND) as u16),
                _ => {}
            }
        };
        for cqe in std::mem::take(&mut self.deferred) {
            reap(self, &cqe);
        }
        let mut idle = false;
        // After lost completions a receive's end (or a send's) may never come: leak sooner.
        let rounds = if self.stats.uring_lost_completions > 0 {
            10
        } else {
            200
        };
        for _ in 0..rounds {
            idle = !self.armed.iter().any(|&a| a)
                && self.cancelling == 0
                && self.send.free.len() == slots;
            if idle {
                break;
            }
            let ts = Timespec::from(Duration::from_millis(10));
            let args = SubmitArgs::new().timespec(&ts);
            let r = self.ring.submitter().submit_with_args(1, &args);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EEXIST)) {
                // Dropped on a thread that is not the ring's submitter: it cannot wait here,
                // so the memory is leaked below.
                break;
            }
            let taken: Vec<cqueue::Entry> = self.ring.completion().collect();
            for cqe in &taken {
                reap(self, cqe);
            }
        }
        if idle {
            let submitter = self.ring.submitter();
            let _ = submitter.unregister_buf_ring(BGID_CLIENT);
            let _ = submitter.unregister_buf_ring(BGID_UPSTREAM);
        } else {
            self.client_bufs.map.leak = true;
            self.upstream_bufs.map.leak = true;
            self.send.data.leak = true;
            std::mem::forget(std::mem::take(&mut self.send.slots));
            let hdr = Box::new(UnsafeCell::new(sys::zeroed_msghdr()));
            std::mem::forget(std::mem::replace(&mut self.recv_hdr.0, hdr));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After lost completions (`EBADR`) every receive is cancelled and armed again: both
    /// kinds of socket keep receiving, and the cancelled receives' ends are all seen, so
    /// drop has nothing left to wait for.
    #[test]
    fn a_resync_after_lost_completions_keeps_every_socket_receiving() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut config = IoConfig::new("127.0.0.1:0".parse().unwrap(), echo.local_addr().unwrap());
        config.tcp = false;
        let echoer = std::thread::spawn(move || {
            let mut buf = [0; 64];
            for _ in 0..2 {
                let (n, from) = echo.recv_from(&mut buf).unwrap();
                echo.send_to(&buf[..n], from).unwrap();
            }
        });
        let mut io = UringIo::new(&config).unwrap();
        let server = io.local_addr();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for round in 0..2u8 {
            client.send_to(&[round; 12], server).unwrap();
            io.send_upstream_udp(0, &[round; 5]);
            io.flush().unwrap();
            let (mut from_client, mut from_upstream) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(5);
            while (from_client, from_upstream) != (1, 1) && Instant::now() < deadline {
                io.poll(Some(Duration::from_millis(10)), &mut |e| match e {
                    Event::ClientDatagram { data, .. } if data == [round; 12] => from_client += 1,
                    Event::UpstreamDatagram { data, .. } if data == [round; 5] => {
                        from_upstream += 1
                    }
                    other => panic!("{other:?}"),
                })
                .unwrap();
            }
            assert_eq!((from_client, from_upstream), (1, 1), "round {round}");
            if round == 0 {
                io.resync_receives();
            }
        }
        echoer.join().unwrap();
        assert_eq!(io.stats().uring_lost_completions, 1);
        for _ in 0..10 {
            io.poll(Some(Duration::from_millis(5)), &mut |_| {})
                .unwrap();
        }
        assert_eq!(io.cancelling, 0);
        let start = Instant::now();
        drop(io);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// A forgotten poll's cancel that found no room is pushed by a later poll: the poll then
    /// ends (ECANCELED), which releases its socket.
    #[test]
    fn a_cancel_without_room_is_pushed_later() {
        let mut ring = IoUring::new(4).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let target = UD_POLL_READ | 7;
        let poll = opcode::PollAdd::new(Fd(a.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(target);
        // SAFETY: a poll SQE points to no memory.
        unsafe { ring.submission().push(&poll).unwrap() };
        ring.submit().unwrap();
        // The submission queue full, nothing submitted.
        for _ in 0..4 {
            let nop = opcode::Nop::new().build().user_data(UD_CANCEL);
            // SAFETY: a nop points to no memory.
            unsafe { ring.submission().push(&nop).unwrap() };
        }
        let mut sub = SubmitState {
            cancels: Vec::with_capacity(CANCEL_RETRIES),
            ..SubmitState::default()
        };
        sub.cancels.push(target);
        sub.retry_cancels(&mut ring);
        assert_eq!(sub.cancels, [target], "no room: kept");
        ring.submit().unwrap();
        sub.retry_cancels(&mut ring);
        assert!(sub.cancels.is_empty());
        ring.submit_and_wait(6).unwrap();
        let polled: Vec<i32> = ring
            .completion()
            .filter(|c| c.user_data() == target)
            .map(|c| c.result())
            .collect();
        assert_eq!(polled, [-libc::ECANCELED]);
    }

    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        for (release, ok) in [
            ("6.0.0", true),
            ("6.18.44-fc-v657", true),
            ("6.1.0-18-amd64", true),
            ("10.0", true),
            ("5.19.17-300.fc36.x86_64", false),
            ("5.4.0", false),
            ("6", false),
            ("", false),
            ("x.y", false),
        ] {
            assert_eq!(super::kernel_at_least(release, 6, 0), ok, "{release}");
        }
        // This machine's release reads as one.
        let here = super::sys::kernel_release().expect("uname");
        assert!(here.starts_with(|c: char| c.is_ascii_digit()), "{here}");
    }

    #[test]
    fn buf_ring_hands_out_and_takes_back() {
        let ring = IoUring::new(8).unwrap();
        let mut r = BufRing::new(&ring, 7, 4, 64).unwrap();
        assert_eq!(r.tail, 4);
        // SAFETY: no receive uses this ring, so no buffer is in the kernel's hands.
        let b = unsafe { r.buf(2, 100) };
        assert_eq!(b.len(), 64);
        r.recycle(2);
        assert_eq!(r.tail, 5);
        ring.submitter().unregister_buf_ring(7).unwrap();
    }

    /// Receive batches for 8 datagrams sent 3 ms apart, and the longest poll that got any, with coalescing `wait` (`min_timeout`: the kernel's min-wait, else
    /// the fallback).
    fn batches(wait: Duration, min_timeout: bool) -> (u64, Duration) {
        let mut config = IoConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        );
        config.tcp = false;
        config.coalesce_wait = wait;
        let mut io = UringIo::new(&config).unwrap();
        io.min_timeout &= min_timeout;
        let server = io.local_addr();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Armed and submitted before the first datagram.
        io.poll(Some(Duration::ZERO), &mut |_| {}).unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..8u8 {
                client.send_to(&[i; 12], server).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let mut got = 0;
        let mut longest = Duration::ZERO;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < 8 && Instant::now() < deadline {
            let start = Instant::now();
            let n = io.poll(Some(Duration::from_secs(1)), &mut |_| {}).unwrap();
            if n > 0 {
                longest = longest.max(start.elapsed());
            }
            got += n;
        }
        sender.join().unwrap();
        assert_eq!(got, 8);
        let coalesced = io.stats().coalesced_waits;
        assert_eq!(
            coalesced > 0,
            !wait.is_zero(),
            "coalesced waits: {coalesced}"
        );
        (io.stats().udp_rx_batches, longest)
    }

    #[test]
    fn coalescing_serves_several_datagrams_per_wake_up() {
        let (plain, _) = batches(Duration::ZERO, true);
        for min_timeout in [true, false] {
            // 8 datagrams over 24 ms, a 100 ms coalescing wait for 16: one batch (two if
            // the first datagram comes before the wait), where plain waits wake for each.
            let (coalesced, longest) = batches(Duration::from_millis(100), min_timeout);
            assert!(
                coalesced <= 2 && plain >= 3,
                "min_timeout {min_timeout}: {coalesced} batches coalesced, {plain} plain"
            );
            // The wait ends at its bound with what came (fewer than the batch asked for).
            assert!(
                longest >= Duration::from_millis(50) && longest < Duration::from_millis(900),
                "min_timeout {min_timeout}: longest poll {longest:?}"
            );
        }
    }

    #[test]
    fn coalescing_wait_alone_returns_at_its_bound() {
        // One datagram, a batch of 16 asked: the wait returns after `wait`, not `timeout`.
        for min_timeout in [true, false] {
            let mut config = IoConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                "127.0.0.1:9".parse().unwrap(),
            );
            config.tcp = false;
            config.coalesce_wait = Duration::from_millis(5);
            let mut io = UringIo::new(&config).unwrap();
            io.min_timeout &= min_timeout;
            let server = io.local_addr();
            io.poll(Some(Duration::ZERO), &mut |_| {}).unwrap();
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            client.send_to(&[0; 12], server).unwrap();
            let start = Instant::now();
            let n = io.poll(Some(Duration::from_secs(5)), &mut |_| {}).unwrap();
            let took = start.elapsed();
            assert_eq!(n, 1);
            assert!(
                took < Duration::from_secs(2),
                "min_timeout {min_timeout}: {took:?}"
            );
            // Nothing at all: the poll's own timeout still ends it.
            let start = Instant::now();
            let n = io
                .poll(Some(Duration::from_millis(30)), &mut |_| {})
                .unwrap();
            assert_eq!(n, 0);
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(25) && took < Duration::from_secs(2),
                "min_timeout {min_timeout}: idle poll took {took:?}"
            );
        }
    }
}
