//! Thin wrappers over the few raw syscalls the mmsg backend needs (epoll, `recvmmsg`,
//! `sendmmsg`), each turning the C return convention into `io::Result`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readiness interest or readiness of a file descriptor: a set of [`READ`] and [`WRITE`].
pub(crate) type Interest = u8;
/// Readable (or hung up / in error).
pub(crate) const READ: Interest = 1;
/// Writable (or hung up / in error).
pub(crate) const WRITE: Interest = 2;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An epoll instance.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        let mut events = 0u32;
        if interest & READ != 0 {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if interest & WRITE != 0 {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Makes the registration of `fd` match `want`, given that it is `state` now (empty:
    /// not registered); updates `state`. Level-triggered.
    pub(crate) fn sync(
        &self,
        fd: RawFd,
        token: u64,
        want: Interest,
        state: &mut Interest,
    ) -> io::Result<()> {
        if want == *state {
            return Ok(());
        }
        let op = match (*state, want) {
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ => libc::EPOLL_CTL_MOD,
        };
        self.ctl(op, fd, want, token)?;
        *state = want;
        Ok(())
    }

    /// Waits for events; `timeout_ms` -1 blocks. EINTR is reported as zero events.
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: libc::c_int,
    ) -> io::Result<usize> {
        let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the kernel writes at most `max` entries into `events`, which is that long.
        let r =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        match cvt(r) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Readiness from epoll event bits: errors and hang-ups count as both (the next read or
/// write reports them).
pub(crate) fn epoll_readiness(events: u32) -> Interest {
    let mut r = 0;
    let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
    if events & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | err) != 0 {
        r |= READ;
    }
    if events & (libc::EPOLLOUT as u32 | err) != 0 {
        r |= WRITE;
    }
    r
}

/// `recvmmsg(fd, msgs, MSG_DONTWAIT)`; returns the number of messages received.
///
/// # Safety
///
/// Every header in `msgs` must describe valid, writable memory (name, iovecs and the buffers
/// they point to, control) that nothing else uses during the call.
pub(crate) unsafe fn recvmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = msgs.len().min(1024) as libc::c_uint;
    // SAFETY: the caller guarantees the headers' pointers; `n` is within `msgs`.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            n,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    cvt(r).map(|n| n as usize)
}

/// `sendmmsg(fd, msgs, MSG_DONTWAIT)`; returns the number of messages sent.
///
/// # Safety
///
/// Every header in `msgs` must describe valid, readable memory (name, iovecs and the buffers
/// they point to, control) for the duration of the call.
pub(crate) unsafe fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = msgs.len().min(1024) as libc::c_uint;
    // SAFETY: the caller guarantees the headers' pointers; `n` is within `msgs`.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n, libc::MSG_DONTWAIT) };
    cvt(r).map(|n| n as usize)
}

/// A zeroed `msghdr` (null pointers, zero lengths).
pub(crate) fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct of pointers and integers; all-zero is a valid value
    // (null pointers, zero lengths), the documented way to initialise it.
    unsafe { std::mem::zeroed() }
}

/// The running kernel's release (`uname -r`), `None` if `uname` fails.
pub(crate) fn kernel_release() -> Option<String> {
    // SAFETY: utsname is a plain C struct of byte arrays; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the call to fill.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit, as a
/// server holding a socket per TCP client must (systemd's default soft limit is 1,024).
/// Returns the (soft, hard) limits in force after.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the call to write.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit the call reads.
        if cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }).is_ok() {
            limit = raised;
        }
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}
