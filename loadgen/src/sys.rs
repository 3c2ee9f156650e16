//! The only module with `unsafe`: batched UDP I/O (`recvmmsg`/`sendmmsg`), `ppoll`,
//! `getrusage`, timer slack and the shutdown signal handler.
//!
//! Every function here is a safe wrapper: buffers are owned by the batch types, and the raw
//! pointers handed to the kernel are derived from `&mut self` right before each call, so they
//! cannot dangle or alias for the duration of the syscall.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A socket address as the kernel hands it over (`sockaddr_storage` + length), cheap to copy
/// from a received datagram into the reply slot.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    /// An empty address (length 0): for connected sockets.
    pub fn none() -> Self {
        // SAFETY: sockaddr_storage is a plain C struct for which all-zero bytes are valid.
        let storage = unsafe { mem::zeroed::<libc::sockaddr_storage>() };
        Self { storage, len: 0 }
    }

    /// The address as a standard socket address, when it is IPv4 or IPv6.
    pub fn to_socket_addr(&self) -> Option<std::net::SocketAddr> {
        let family = libc::c_int::from(self.storage.ss_family);
        if family == libc::AF_INET && self.len as usize >= mem::size_of::<libc::sockaddr_in>() {
            // SAFETY: the family says the storage holds a sockaddr_in, the length covers it,
            // and sockaddr_storage is aligned for every sockaddr type.
            let sin = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            return Some((ip, u16::from_be(sin.sin_port)).into());
        }
        if family == libc::AF_INET6 && self.len as usize >= mem::size_of::<libc::sockaddr_in6>() {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            return Some((ip, u16::from_be(sin6.sin6_port)).into());
        }
        None
    }
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct (pointers, lengths, flags); all-zero is valid.
    unsafe { mem::zeroed() }
}

/// Control-message room per datagram (as u64 words, for alignment): enough for one
/// `SCM_TIMESTAMPNS` (a cmsghdr and a timespec).
const CTRL_WORDS: usize = 8;

/// Receive buffers for up to `capacity` datagrams per `recvmmsg` call.
pub struct RecvBatch {
    buf_size: usize,
    bufs: Vec<u8>,
    ctrl: Vec<u64>,
    stamps: Vec<u64>,
    lens: Vec<usize>,
    flags: Vec<libc::c_int>,
    names: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// `capacity` datagrams of at most `buf_size` bytes each.
    pub fn new(capacity: usize, buf_size: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            buf_size,
            bufs: vec![0; capacity * buf_size],
            ctrl: vec![0; capacity * CTRL_WORDS],
            stamps: vec![0; capacity],
            lens: vec![0; capacity],
            flags: vec![0; capacity],
            names: vec![RawAddr::none(); capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                capacity
            ],
            hdrs: (0..capacity).map(|_| empty_mmsghdr()).collect(),
        }
    }

    /// How many datagrams one call can return.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Receives without blocking (`MSG_DONTWAIT`); returns how many datagrams arrived
    /// (0 when none was waiting).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let cap = self.capacity();
        for i in 0..cap {
            let buf = &mut self.bufs[i * self.buf_size..(i + 1) * self.buf_size];
            self.iovs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
        }
        for i in 0..cap {
            let hdr = &mut self.hdrs[i];
            hdr.msg_hdr.msg_name =
                (&mut self.names[i].storage as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_hdr.msg_iovlen = 1;
            let ctrl = &mut self.ctrl[i * CTRL_WORDS..(i + 1) * CTRL_WORDS];
            hdr.msg_hdr.msg_control = ctrl.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = mem::size_of_val(ctrl) as _;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        loop {
            // SAFETY: `hdrs[..cap]` are initialised above and point into `bufs`, `iovs` and
            // `names`, all owned by `self` and exclusively borrowed for this call; each iovec
            // covers exactly its slot of `bufs`; the fd is valid for the borrow's lifetime.
            let n = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    cap as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                let n = n as usize;
                for i in 0..n {
                    self.lens[i] = self.hdrs[i].msg_len as usize;
                    self.flags[i] = self.hdrs[i].msg_hdr.msg_flags;
                    self.names[i].len = self.hdrs[i].msg_hdr.msg_namelen;
                    self.stamps[i] = rx_timestamp(&self.hdrs[i].msg_hdr);
                }
                return Ok(n);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                // A connected UDP socket reports an earlier ICMP port-unreachable here; the
                // error is consumed by this call, so just try again.
                Some(libc::ECONNREFUSED) => continue,
                _ => return Err(err),
            }
        }
    }

    /// The payload of datagram `i` of the last call.
    pub fn packet(&self, i: usize) -> &[u8] {
        let start = i * self.buf_size;
        &self.bufs[start..start + self.lens[i].min(self.buf_size)]
    }

    /// Whether datagram `i` was longer than the buffer (and cut).
    pub fn truncated(&self, i: usize) -> bool {
        self.flags[i] & libc::MSG_TRUNC != 0
    }

    /// The kernel's receive time of datagram `i` (CLOCK_REALTIME, ns since the epoch), when
    /// the socket has [`enable_rx_timestamps`]; 0 otherwise.
    pub fn timestamp(&self, i: usize) -> u64 {
        self.stamps[i]
    }

    /// The source address of datagram `i`.
    pub fn addr(&self, i: usize) -> &RawAddr {
        &self.names[i]
    }
}

/// `SO_TIMESTAMPNS` (`SO_TIMESTAMPNS_OLD`, with a 64-bit `timespec` on 64-bit targets) in
/// asm-generic/socket.h, which x86, arm and riscv use; the libc crate does not export it for
/// Linux/glibc.
const SO_TIMESTAMPNS: libc::c_int = 35;
const SCM_TIMESTAMPNS: libc::c_int = SO_TIMESTAMPNS;

/// The `SCM_TIMESTAMPNS` of a received message header, or 0.
fn rx_timestamp(hdr: &libc::msghdr) -> u64 {
    // SAFETY: `hdr` was filled by recvmmsg: msg_control points to our control buffer and
    // msg_controllen is the length the kernel wrote, so CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and was returned by CMSG_FIRSTHDR/NXTHDR for `hdr`.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET
            && c.cmsg_type == SCM_TIMESTAMPNS
            && c.cmsg_len as usize
                >= mem::size_of::<libc::cmsghdr>() + mem::size_of::<libc::timespec>()
        {
            // SAFETY: the length check above guarantees a whole timespec after the header;
            // it may be unaligned, hence read_unaligned.
            let ts =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>()) };
            return (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64;
        }
        // SAFETY: as above; returns null after the last header.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    0
}

/// Asks the kernel to stamp every received datagram with its arrival time
/// (`SO_TIMESTAMPNS`, read back with [`RecvBatch::timestamp`]).
pub fn enable_rx_timestamps(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and its size is passed; the fd is valid for the borrow.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What one [`SendBatch::flush`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams that failed (and were skipped).
    pub failed: usize,
}

/// Datagrams queued for one `sendmmsg` call.
pub struct SendBatch {
    buf_size: usize,
    bufs: Vec<u8>,
    lens: Vec<usize>,
    names: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

impl SendBatch {
    /// Room for `capacity` datagrams of at most `buf_size` bytes each.
    pub fn new(capacity: usize, buf_size: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            buf_size,
            bufs: vec![0; capacity * buf_size],
            lens: vec![0; capacity],
            names: vec![RawAddr::none(); capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                capacity
            ],
            hdrs: (0..capacity).map(|_| empty_mmsghdr()).collect(),
            len: 0,
        }
    }

    /// Queued datagrams.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no more datagram fits.
    pub fn is_full(&self) -> bool {
        self.len == self.lens.len()
    }

    /// The buffer of the next free slot, to build a datagram in place; `None` when full.
    /// Commit it with [`SendBatch::commit`].
    pub fn next_slot(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        let start = self.len * self.buf_size;
        Some(&mut self.bufs[start..start + self.buf_size])
    }

    /// Queues the first `len` bytes of the slot returned by [`SendBatch::next_slot`], to `to`
    /// (an empty address for a connected socket).
    pub fn commit(&mut self, len: usize, to: &RawAddr) {
        debug_assert!(!self.is_full() && len <= self.buf_size);
        self.lens[self.len] = len.min(self.buf_size);
        self.names[self.len] = *to;
        self.len += 1;
    }

    /// Copies `data` into the next slot and queues it; false when full or too long.
    pub fn push(&mut self, data: &[u8], to: &RawAddr) -> bool {
        let Some(slot) = self.next_slot() else {
            return false;
        };
        let Some(dst) = slot.get_mut(..data.len()) else {
            return false;
        };
        dst.copy_from_slice(data);
        self.commit(data.len(), to);
        true
    }

    /// Sends every queued datagram and empties the batch. Blocking sockets block only when
    /// their send buffer is full; a failed datagram is skipped and counted.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> SendReport {
        let count = self.len;
        self.len = 0;
        let mut report = SendReport::default();
        if count == 0 {
            return report;
        }
        for i in 0..count {
            let buf = &mut self.bufs[i * self.buf_size..i * self.buf_size + self.lens[i]];
            self.iovs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
        }
        for i in 0..count {
            let name = &mut self.names[i];
            let hdr = &mut self.hdrs[i];
            hdr.msg_hdr.msg_name = if name.len == 0 {
                std::ptr::null_mut()
            } else {
                (&mut name.storage as *mut libc::sockaddr_storage).cast()
            };
            hdr.msg_hdr.msg_namelen = name.len;
            hdr.msg_hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let mut off = 0;
        let mut retried = false;
        while off < count {
            // SAFETY: `hdrs[off..count]` are initialised above and point into `bufs`, `iovs`
            // and `names`, owned by `self` and exclusively borrowed; the iovecs cover the
            // queued bytes of their slots only; the fd is valid for the borrow's lifetime.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs[off..].as_mut_ptr(),
                    (count - off) as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                off += n as usize;
                report.sent += n as usize;
                retried = false;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // An ICMP error from an earlier datagram is reported once on a connected
                // socket; the datagram at `off` was not sent, so try it again once.
                Some(libc::ECONNREFUSED) if !retried => retried = true,
                _ => {
                    off += 1;
                    report.failed += 1;
                    retried = false;
                }
            }
        }
        report
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: forever), with nanosecond
/// resolution. Returns how many fds are ready (0 on timeout or signal).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd of the given length;
    // `ts_ptr` is null or points to a timespec living until the call returns; a null sigmask
    // leaves the signal mask unchanged.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINTR) {
        return Ok(0);
    }
    Err(err)
}

/// CPU time (user + system) consumed by this process so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: all-zero is a valid rusage.
    let mut ru = unsafe { mem::zeroed::<libc::rusage>() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF is always accepted.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Sets this thread's timer slack (how late the kernel may fire its timers) to `ns`; best
/// effort, so that paced sends and timeouts wake on time.
pub fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_shutdown_signal(_signal: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Installs a SIGTERM/SIGINT handler that sets the flag read by [`shutdown_requested`]
/// (without `SA_RESTART`, so blocking calls return `EINTR`).
pub fn install_shutdown_handler() -> io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: all-zero is a valid sigaction (empty mask, no flags).
        let mut action = unsafe { mem::zeroed::<libc::sigaction>() };
        action.sa_sigaction = on_shutdown_signal as *const () as libc::sighandler_t;
        // SAFETY: `action` is a valid sigaction whose handler only stores to an atomic
        // (async-signal-safe); the old action is not requested.
        let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGTERM or SIGINT arrived since [`install_shutdown_handler`].
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::Relaxed)
}
