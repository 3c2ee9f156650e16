//! The agent socket: a listener that admits only its own user (or root), and a client that
//! reconnects with capped, jittered exponential backoff.
//!
//! Peer credentials come from `SO_PEERCRED`, read raw (the crate's one `unsafe` block):
//! rustix's wrapper holds the pid as a `NonZeroI32`, and a peer in another pid namespace
//! (the agent and the proxy as separate pods, without `hostPID`) has pid 0 from here (review
//! finding: that was undefined behaviour; in practice every connection was refused).
//!
//! # Threads
//!
//! [`AgentListener::accept`] blocks until an admitted peer connects (or returns `WouldBlock`
//! on a listener set nonblocking); [`connect_with_backoff`] sleeps between attempts. Call
//! both from a control thread of their own (the agent's accept thread, the proxy's sync
//! thread), never from a shard or the record consumer. [`try_connect`] and [`Backoff`] are
//! for callers with their own event loop: one attempt, and the delay before the next.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Errors of the agent socket. Every `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Another process is listening on the path.
    #[error("agent socket {path:?} is in use: another process is listening on it")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it was left alone.
    #[error("agent socket {path:?} exists and is not a socket; not removing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("agent socket {path:?}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// [`connect_with_backoff`] was asked to stop before it connected.
    #[error("agent socket {path:?}: stopped before connecting")]
    Stopped {
        /// The socket path.
        path: PathBuf,
    },
}

impl ConnError {
    /// Whether this is an accept (or a read) that ran out of time, or found nothing on a
    /// nonblocking socket: nothing went wrong, there was nobody yet.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ConnError::Io { source, .. }
                if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        )
    }
}

/// Who is at the other end of an accepted connection (from `SO_PEERCRED`: the peer's
/// credentials when it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process id.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// Whether a peer with effective uid `peer` may talk to a process whose effective uid is
/// `own`: the same user, or root.
pub fn admitted(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// The credentials of the peer of a connected unix stream socket (`pid` 0: a process of
/// another pid namespace, whose pid this one cannot name).
#[allow(unsafe_code)]
pub fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a plain C struct the kernel writes at most `len` bytes into, `len`
    // is its size, and the descriptor is the stream's own (borrowed for the call).
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED: short answer"));
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The credentials of the process at the other end of `stream` when it is admitted (the same
/// effective user as this process, or root), None when it is another user. The proxy checks
/// the listener it connected to this way: whoever binds the socket path must not get to
/// push policy into it.
pub fn admitted_peer(stream: &UnixStream) -> io::Result<Option<Peer>> {
    let peer = peer_of(stream)?;
    Ok(admitted(peer.uid, rustix::process::geteuid().as_raw()).then_some(peer))
}

/// The agent's listening socket (`--agent-socket`).
#[derive(Debug)]
pub struct AgentListener {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket file we bound, to remove only our own on drop.
    file_id: (u64, u64),
    own_uid: u32,
    rejected: AtomicU64,
}

impl AgentListener {
    /// Binds `path` (its directory must exist): a socket file left by a process that is gone
    /// is removed first; a live listener or a file that is not a socket is an error. The
    /// socket is made mode 0600 (the peer check of [`AgentListener::accept`] is what admits,
    /// so the moment between bind and chmod lets no one in).
    pub fn bind(path: impl Into<PathBuf>) -> Result<AgentListener, ConnError> {
        let path = path.into();
        remove_stale(&path)?;
        let io = |op| {
            let path = path.clone();
            move |source| ConnError::Io { op, path, source }
        };
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            // Another agent bound it between our check and our bind.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(ConnError::InUse { path });
            }
            Err(e) => return Err(io("bind")(e)),
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io("chmod 0600"))?;
        let meta = fs::symlink_metadata(&path).map_err(io("stat"))?;
        Ok(AgentListener {
            listener,
            file_id: (meta.dev(), meta.ino()),
            own_uid: rustix::process::geteuid().as_raw(),
            rejected: AtomicU64::new(0),
            path,
        })
    }

    /// Waits for the next admitted peer. A peer of another user (not root) is closed at once
    /// and counted in [`AgentListener::rejected`], and the wait goes on. On a nonblocking
    /// listener, returns `WouldBlock` when no admitted peer is waiting.
    pub fn accept(&self) -> Result<(UnixStream, Peer), ConnError> {
        loop {
            let (stream, _) = self.listener.accept().map_err(|source| ConnError::Io {
                op: "accept",
                path: self.path.clone(),
                source,
            })?;
            match peer_of(&stream) {
                Ok(peer) if admitted(peer.uid, self.own_uid) => return Ok((stream, peer)),
                // Another user, or credentials that cannot be read: close it.
                _ => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Peers closed because of their user, over the listener's life (a metric).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Sets the listener nonblocking (for an accept loop that also polls a stop flag).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.listener.set_nonblocking(nonblocking)
    }

    /// Bounds how long [`AgentListener::accept`] waits (`SO_RCVTIMEO`; None: forever): past
    /// it, the accept fails with an error for which [`ConnError::is_timeout`] holds. For an
    /// accept loop that also checks a stop flag, yet takes each peer the moment it comes
    /// (a nonblocking listener polled with sleeps delays each by up to the sleep).
    pub fn set_accept_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        socket2::SockRef::from(&self.listener).set_read_timeout(timeout)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AgentListener {
    /// Removes the socket file if it is still the one this listener bound (a newer agent
    /// may have replaced it).
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file_id
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes a socket file nobody listens on; leaves anything else and says why. The probe is
/// a connect: a live agent sees it as a peer that closes at once.
fn remove_stale(path: &Path) -> Result<(), ConnError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ConnError::Io {
                op: "stat",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ConnError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ConnError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ConnError::Io {
                op: "remove stale socket",
                path: path.to_path_buf(),
                source,
            }),
        },
        Err(source) => Err(ConnError::Io {
            op: "probe existing socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// One connection attempt that never waits: the connect is made nonblocking, so a listener
/// whose backlog is full (where a blocking connect would wait) is `WouldBlock`, like an
/// absent one is `NotFound` and a dead one `ConnectionRefused`. The stream returned is in
/// blocking mode.
pub fn try_connect(path: &Path) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Capped exponential backoff with jitter: the n-th delay is drawn uniformly from
/// `[d/2, d]` where `d = min(initial · 2^n, max)`, so restarting proxies do not reconnect in
/// lock step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max` (e.g. 50 ms and 2 s).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: crate::proto::process_instance() | 1,
        }
    }

    /// The delay before the next attempt (and counts the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // splitmix64: plenty for jitter.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let half = ceiling / 2;
        let span = (ceiling - half).as_nanos() as u64;
        let jitter = if span == 0 { 0 } else { z % (span + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// Back to the initial delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Connects to `path`, retrying with `backoff` until it works or `stop` is set (checked at
/// least every 100 ms). Blocks the calling thread: call it from the proxy's sync thread
/// only. Resets `backoff` on success.
pub fn connect_with_backoff(
    path: &Path,
    backoff: &mut Backoff,
    stop: &AtomicBool,
) -> Result<UnixStream, ConnError> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(ConnError::Stopped {
                path: path.to_path_buf(),
            });
        }
        if let Ok(stream) = try_connect(path) {
            backoff.reset();
            return Ok(stream);
        }
        sleep_unless_stopped(backoff.next_delay(), stop);
    }
}

/// Sleeps `delay`, or less when `stop` is set meanwhile (checked at least every 100 ms).
pub fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    const SLICE: Duration = Duration::from_millis(100);
    let until = Instant::now() + delay;
    loop {
        let now = Instant::now();
        if now >= until || stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep((until - now).min(SLICE));
    }
}
